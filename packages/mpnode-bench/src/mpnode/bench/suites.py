"""Named benchmark suites: which problems, sizes, step counts and implementations.

* ``core-mlp``: the headline CPU comparison (MLP field, state 32, width 128,
  batch 256, 64 RK4 steps): mpnode float32, float32 with bfloat16
  checkpoints, bfloat16 autocast, against torchdiffeq ``odeint`` and
  ``odeint_adjoint``.
* ``quick``: CPU, float32 and bfloat16, every problem at small size plus
  sweeps over steps, batch and width of the MLP, and adaptive ``dopri5`` cases
  (MLP, CNF) against torchdiffeq and torchode (a few minutes on 2 cores).
* ``dial``: CPU, the time/memory dial: every mpnode adjoint strategy (recompute,
  direct, segmented) against torchdiffeq direct and adjoint, float32 timed, and
  bfloat16 memory/accuracy (torchdiffeq with and without the cast cache), on the
  MLP (16/64/256 steps) and the conv block (4/8/32 steps).
* ``dial-long``: CPU, MLP at 4096 steps: segmented vs recompute (the issue's
  memory/time/gradient targets); direct strategies would hold gigabytes.
* ``full``: CPU, larger sweeps (steps 16 ... 1024), every precision.
* ``gpu``: CUDA, GPU sizes (OT-Flow d = 63, m = 1024; conv block
  128 x 128 x 128), every implementation timed, and the dial cases at GPU sizes.
* ``syncs``: host synchronisations per backward against the step count,
  float32/bfloat16 (none) and float16 with the dynamic scaler.
* ``speed`` (CPU) / ``speed-gpu`` (CUDA): what mixed precision buys: the
  training-step time (forward + backward) of realistic fields (MLPs of width
  128/512/1024, the MNIST ODE-Net block, the exact-trace CNF, OT-Flow at d = 63,
  and the overhead-bound ``ode_demo`` field with ``dopri5``) for torchdiffeq
  (float32; bfloat16 with and without the cast cache) and mpnode's three
  strategies in float32/bfloat16/float16, each row with its held memory and its
  gradient error against float64 on the same grid.  The machine is measured first
  ([`mpnode.bench.hardware`][mpnode.bench.hardware]): a low precision without fast kernels here is
  skipped, with the reason (``--force-low-precision`` times it anyway).
  ``--smoke`` runs it at tiny sizes (the tests).
* ``smoke``: tiny sizes, for the test suite.

On a CPU, low-precision implementations are measured for memory, host syncs
and accuracy but not timed (CPU autocast is 20-100x slower than float32 and
says nothing about GPU speed); see `Suite.time_low_precision`.  The
``speed`` suites are the exception: they time a low precision wherever the
hardware check finds fast kernels for it (`Suite.gate_on_hardware`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .implementations import Impl, parse_impl
from .runner import STEP_AXES, Case

# every implementation the suites use, by label (Impl.label / parse_impl)
(MP32, MP32_CK16, MPBF16, MPF16, TD32, TDA32, TDBF16, TDF16, TDNC_BF16, MPD32, MPS32, MPD_BF16, MPS_BF16,
 MPD_F16, MPS_F16, TORCHODE_DOPRI5, TORCHODE_TSIT5) = map(parse_impl, (
    "mpnode/float32", "mpnode/float32+ckpt-bfloat16", "mpnode/bfloat16", "mpnode/float16", "torchdiffeq/float32",
    "torchdiffeq-adjoint/float32", "torchdiffeq/bfloat16", "torchdiffeq/float16", "torchdiffeq-nocache/bfloat16",
    "mpnode-direct/float32", "mpnode-segmented/float32", "mpnode-direct/bfloat16", "mpnode-segmented/bfloat16",
    "mpnode-direct/float16", "mpnode-segmented/float16", "torchode/float32", "torchode/float32+tsit5",
))

CORE_IMPLS = (MP32, MP32_CK16, MPBF16, TD32, TDA32, TDBF16)
CPU_F32 = (MP32, TD32)
GPU_IMPLS = (MP32, MPBF16, MPF16, TD32, TDA32, TDBF16, TDNC_BF16, TDF16)
DIAL_IMPLS = (MP32, MPD32, MPS32, TD32, TDA32, MPBF16, MPD_BF16, MPS_BF16, TDBF16, TDNC_BF16)
ADAPTIVE_IMPLS = (MP32, MPBF16, TD32, TDA32, TORCHODE_DOPRI5, TORCHODE_TSIT5)
ADAPTIVE = {"method": "dopri5", "rtol": 1e-7, "atol": 1e-9}  # torchdiffeq's default tolerances
SPEED_IMPLS = (TD32, TDBF16, TDNC_BF16, MP32, MPD32, MPS32, MPBF16, MPD_BF16, MPS_BF16, MPF16, MPD_F16, MPS_F16)
"""torchdiffeq float32 and bfloat16 (cast cache on and off), mpnode's three strategies in every precision."""
SPEED_OVERHEAD_IMPLS = (TD32, MP32, MPD32, MPS32)
"""The overhead-bound ``demo`` case: float32 only (its target is mpnode no slower than torchdiffeq in float32)."""


@dataclass(frozen=True)
class Sweep:
    """Cases varying one axis (``"steps"``, ``"dial"`` or a size name) around ``base`` sizes.

    ``axis="base"`` gives a single case at ``base`` and ``steps``; with an adaptive
    ``method`` (and ``rtol``/``atol``, ``steps=0``) its axis is ``"adaptive"``.
    ``axis="speed"`` is a single case of the ``speed`` suites (adaptive or not).
    ``reference``: the gradient reference of its cases (see [`Case`][mpnode.bench.runner.Case]).
    """

    problem: str
    base: dict
    steps: int
    impls: tuple[Impl, ...]
    axis: str = "base"
    values: tuple[int, ...] = ()
    method: str = "rk4"
    rtol: float | None = None
    atol: float | None = None
    reference: str = "torchdiffeq"

    def cases(self, time_low_precision: bool, skip: Mapping[str, str] | None = None) -> list[Case]:
        """The sweep's cases; ``skip`` maps a precision name to why its rows are not run here."""
        timed = tuple(time_low_precision or not i.is_low_precision for i in self.impls)
        reasons = tuple((skip or {}).get(i.precision) for i in self.impls)
        if self.axis in ("base", "speed"):
            points = [(dict(self.base), self.steps)]
        elif self.axis in STEP_AXES:
            points = [(dict(self.base), v) for v in self.values]
        else:
            points = [({**self.base, self.axis: v}, self.steps) for v in self.values]
        axis = "adaptive" if self.axis == "base" and self.method != "rk4" else self.axis
        return [Case(self.problem, tuple(s.items()), n, self.impls, axis, timed, self.method, self.rtol, self.atol,
                     reasons if any(reasons) else None, self.reference)
                for s, n in points]


@dataclass(frozen=True)
class Suite:
    """A named list of sweeps with its device type and repeat count.

    Attributes:
        time_low_precision: time the low-precision rows (else memory/syncs/accuracy only).
        gate_on_hardware: measure the machine first and skip the rows of a low precision
            without fast kernels ([`mpnode.bench.hardware`][mpnode.bench.hardware]; the CLI does it).
        smoke: the same sweeps at tiny sizes (``--smoke``), or empty when the suite has none.
    """

    name: str
    device_type: str
    sweeps: tuple[Sweep, ...]
    repeats: int
    time_low_precision: bool
    describe: str
    gate_on_hardware: bool = False
    smoke: tuple[Sweep, ...] = ()

    def cases(self, smoke: bool = False, skip: Mapping[str, str] | None = None) -> list[Case]:
        """The cases (``smoke``: of the tiny variant); ``skip``: precision name -> why its rows are not run."""
        if smoke and not self.smoke:
            raise ValueError(f"suite {self.name!r} has no --smoke variant; suites with one: "
                             f"{sorted(n for n, s in SUITES.items() if s.smoke)}")
        sweeps = self.smoke if smoke else self.sweeps
        return [c for s in sweeps for c in s.cases(self.time_low_precision, skip)]


MLP_CORE = {"batch": 256, "dim": 32, "width": 128}
MLP_ADAPTIVE = {**MLP_CORE, "gain": 32}  # 32x the default field: about 30 dopri5 steps at rtol 1e-7
CONV_CPU = {"batch": 32, "channels": 64, "size": 6}
CNF_CPU = {"batch": 512, "width": 64}
MLP_GPU = {"batch": 1024, "dim": 32, "width": 128}
CONV_GPU = {"batch": 8, "channels": 128, "size": 128}

SUITES: dict[str, Suite] = {}


def _register(s: Suite) -> None:
    SUITES[s.name] = s


_register(Suite(
    "core-mlp", "cpu",
    (Sweep("mlp", MLP_CORE, 64, CORE_IMPLS),),
    repeats=9, time_low_precision=False,
    describe="MLP field (state 32, width 128, batch 256, 64 RK4 steps): mpnode vs torchdiffeq, float32 timing",
))

_register(Suite(
    "quick", "cpu",
    (
        Sweep("mlp", MLP_CORE, 64, CORE_IMPLS),
        Sweep("mlp", MLP_CORE, 64, (MP32, MPBF16, TD32), "steps", (16, 32, 64, 128)),
        Sweep("mlp", MLP_CORE, 32, CPU_F32, "batch", (64, 256, 1024)),
        Sweep("mlp", MLP_CORE, 32, CPU_F32, "width", (64, 128, 256)),
        Sweep("otflow", {"batch": 256, "d": 16, "width": 64}, 16, (MP32, MPBF16, TD32)),
        Sweep("conv", CONV_CPU, 8, (MP32, MPBF16, TD32, TDA32)),
        Sweep("cnf", CNF_CPU, 16, (MP32, MPBF16, TD32)),
        Sweep("cnf", CNF_CPU, 0, ADAPTIVE_IMPLS, **ADAPTIVE),
        Sweep("mlp", MLP_ADAPTIVE, 0, ADAPTIVE_IMPLS, **ADAPTIVE),
    ),
    repeats=5, time_low_precision=False,
    describe="CPU, float32 timing + bfloat16 memory/accuracy, all problems small, MLP sweeps, adaptive dopri5 "
             "(MLP, CNF) vs torchdiffeq and torchode",
))

_register(Suite(
    "dial", "cpu",
    (
        Sweep("mlp", MLP_CORE, 0, DIAL_IMPLS, "dial", (16, 64, 256)),
        Sweep("conv", CONV_CPU, 0, DIAL_IMPLS, "dial", (4, 8, 32)),
    ),
    repeats=5, time_low_precision=False,
    describe="CPU, the time/memory dial: mpnode recompute/direct/segmented vs torchdiffeq direct/adjoint, "
             "float32 timed, bfloat16 memory/accuracy (torchdiffeq with and without the cast cache)",
))

_register(Suite(
    "dial-long", "cpu",
    (Sweep("mlp", MLP_CORE, 0, (MP32, MPS32), "dial", (4096,)),),
    repeats=3, time_low_precision=False,
    describe="CPU, MLP at 4096 RK4 steps: segmented vs recompute (targets: held <= 1/20, time <= 1.6x, "
             "gradients equal to 1e-6); direct strategies would hold gigabytes and are left out",
))

_register(Suite(
    "full", "cpu",
    (
        Sweep("mlp", MLP_CORE, 64, (*CORE_IMPLS, MPF16)),
        Sweep("mlp", MLP_CORE, 64, (MP32, MP32_CK16, TD32, TDA32), "steps", (16, 32, 64, 128, 256, 512, 1024)),
        Sweep("mlp", {"batch": 64, "dim": 32, "width": 64}, 32, (MPBF16, MPF16), "steps", (16, 64, 256)),
        Sweep("mlp", MLP_CORE, 32, (MP32, TD32, TDA32), "batch", (64, 256, 1024, 4096)),
        Sweep("mlp", MLP_CORE, 32, (MP32, TD32, TDA32), "width", (32, 64, 128, 256, 512)),
        Sweep("otflow", {"batch": 256, "d": 63, "width": 128}, 16, (MP32, MPBF16, MPF16, TD32, TDA32)),
        Sweep("otflow", {"batch": 256, "d": 16, "width": 64}, 16, (MP32, TD32), "width", (32, 64, 128, 256)),
        Sweep("conv", {"batch": 64, "channels": 64, "size": 6}, 8, (MP32, MPBF16, MPF16, TD32, TDA32)),
        Sweep("cnf", {"batch": 1024, "width": 64}, 32, (MP32, MPBF16, MPF16, TD32, TDA32)),
    ),
    repeats=5, time_low_precision=False,
    describe="CPU, larger sweeps (steps 16..1024, batch, width), every precision",
))

_register(Suite(
    "gpu", "cuda",
    (  # the issue's target problems first, so a time limit cuts the sweeps, not the targets
        Sweep("conv", {"batch": 8, "channels": 128, "size": 128}, 8, GPU_IMPLS),
        Sweep("otflow", {"batch": 256, "d": 63, "width": 1024}, 16, GPU_IMPLS),
        Sweep("mlp", {"batch": 1024, "dim": 32, "width": 128}, 64, GPU_IMPLS),
        Sweep("cnf", {"batch": 4096, "width": 256}, 64, GPU_IMPLS),
        Sweep("mlp", MLP_GPU, 0, DIAL_IMPLS, "dial", (16, 64, 256)),
        Sweep("conv", CONV_GPU, 0, DIAL_IMPLS, "dial", (4, 8, 16)),
        Sweep("mlp", {"batch": 1024, "dim": 32, "width": 128}, 64, (MP32, MPBF16, TD32), "steps",
              (16, 64, 256, 1024)),
        Sweep("mlp", {"batch": 1024, "dim": 32, "width": 128}, 32, (MP32, MPBF16, MPF16, TD32), "width",
              (128, 512, 2048)),
        Sweep("conv", {"batch": 8, "channels": 128, "size": 128}, 8, (MP32, MPBF16, MPF16, TD32), "steps", (4, 16)),
        Sweep("otflow", {"batch": 256, "d": 63, "width": 1024}, 16, (MP32, MPBF16, MPF16, TD32), "steps", (8, 32)),
    ),
    repeats=5, time_low_precision=True,
    describe="CUDA: all implementations timed at GPU sizes (targets: low precision >= 2x "
             "mpnode float32, memory <= 0.5x)",
))

_register(Suite(
    "syncs", "cpu",
    (Sweep("mlp", {"batch": 64, "dim": 32, "width": 64}, 64, (MP32, MPBF16, MPF16, TD32), "steps", (16, 64, 256)),),
    repeats=1, time_low_precision=False,
    describe="host syncs per backward vs steps: 0 unscaled, about N/K + 1 with the float16 dynamic scaler",
))

_register(Suite(
    "smoke", "cpu",
    (
        Sweep("mlp", {"batch": 8, "dim": 4, "width": 8}, 8, (MP32, MP32_CK16, MPBF16, TD32, TDA32)),
        Sweep("mlp", {"batch": 8, "dim": 4, "width": 8}, 8, (MP32, TD32), "steps", (4, 8, 16)),
        Sweep("mlp", {"batch": 8, "dim": 4, "width": 8}, 8, (MP32, TD32), "batch", (4, 16)),
        Sweep("otflow", {"batch": 8, "d": 3, "width": 8}, 4, (MP32, TD32)),
        Sweep("conv", {"batch": 2, "channels": 8, "size": 4}, 2, (MP32, TD32)),
        Sweep("cnf", {"batch": 8, "width": 8}, 4, (MP32, TD32)),
        Sweep("mlp", {"batch": 8, "dim": 4, "width": 8}, 0, (MP32, MPD32, MPS32, TD32, MPBF16, TDNC_BF16), "dial",
              (4, 8)),
        Sweep("mlp", {"batch": 8, "dim": 4, "width": 8, "gain": 8}, 0, ADAPTIVE_IMPLS, **ADAPTIVE),
    ),
    repeats=2, time_low_precision=False,
    describe="tiny sizes for the tests (seconds)",
))


def _speed_sweeps(mlp: dict, widths: tuple[int, ...], conv: dict, cnf: dict, otflow: dict, demo: dict,
                  steps: int, conv_steps: int, rtol: float, atol: float, gpu_targets_first: bool = False
                  ) -> tuple[Sweep, ...]:
    """The ``speed`` cases at given sizes: one case per field, every row against float64 on the same grid.

    ``gpu_targets_first``: the conv block and OT-Flow (the GPU targets) first, so a time limit cuts the others.
    """
    mlps = [Sweep("mlp", {**mlp, "width": w}, steps, SPEED_IMPLS, "speed", reference="float64") for w in widths]
    targets = [Sweep("conv", conv, conv_steps, SPEED_IMPLS, "speed", reference="float64"),
               Sweep("otflow", otflow, steps, SPEED_IMPLS, "speed", reference="float64")]
    fixed = (targets + mlps) if gpu_targets_first else (mlps + targets)
    fixed.append(Sweep("cnf", cnf, steps, SPEED_IMPLS, "speed", reference="float64"))
    return (*fixed, Sweep("demo", demo, 0, SPEED_OVERHEAD_IMPLS, "speed", method="dopri5", rtol=rtol, atol=atol))


SPEED_SMOKE = _speed_sweeps({"batch": 8, "dim": 4}, (8, 16), {"batch": 2, "channels": 8, "size": 4},
                            {"batch": 8, "width": 8}, {"batch": 8, "d": 3, "width": 8}, {"batch": 4, "width": 8},
                            steps=2, conv_steps=2, rtol=1e-5, atol=1e-7)

_register(Suite(
    "speed", "cpu",
    _speed_sweeps({"batch": 256, "dim": 32}, (128, 512, 1024), {"batch": 32, "channels": 64, "size": 6},
                  {"batch": 1024, "width": 64}, {"batch": 256, "d": 63, "width": 64}, {"batch": 20, "width": 50},
                  steps=8, conv_steps=4, **{k: ADAPTIVE[k] for k in ("rtol", "atol")}),
    repeats=5, time_low_precision=True, gate_on_hardware=True, smoke=SPEED_SMOKE,
    describe="CPU (1 thread), what mixed precision buys: forward+backward time, held memory and float64 gradient "
             "error of MLPs (width 128/512/1024), the MNIST ODE-Net block, OT-Flow d=63, the exact-trace CNF and the "
             "overhead-bound ode_demo field (dopri5); torchdiffeq fp32/bf16 (cache on/off), mpnode "
             "recompute/direct/segmented in fp32/bf16/fp16; low precisions without fast kernels here are skipped",
))

_register(Suite(
    "speed-gpu", "cuda",
    _speed_sweeps({"batch": 4096, "dim": 32}, (128, 512, 1024), {"batch": 8, "channels": 128, "size": 128},
                  {"batch": 4096, "width": 256}, {"batch": 1024, "d": 63, "width": 1024}, {"batch": 20, "width": 50},
                  steps=8, conv_steps=8, gpu_targets_first=True, **{k: ADAPTIVE[k] for k in ("rtol", "atol")}),
    repeats=5, time_low_precision=True, gate_on_hardware=True, smoke=SPEED_SMOKE,
    describe="CUDA: the speed suite at GPU sizes (targets: bf16/fp16 >= 2x own float32 on the conv block and "
             "OT-Flow, CUDA peak <= 0.5x)",
))


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose one of {sorted(SUITES)}")
    return SUITES[name]
