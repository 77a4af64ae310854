"""Run benchmark cases: every implementation of a case on one shared problem instance.

For each case (problem, sizes, stepping) the runner builds the problem once
(same weights and data for every implementation), then per implementation:

1. one measured forward+backward: bytes held for backward
   ([`held_memory`][mpnode.bench.profilers.held_memory] over the forward, parameters
   excluded), host syncs of forward and of backward
   ([`count_host_syncs`][mpnode.bench.profilers.count_host_syncs]), CUDA peak memory, the
   loss, the accepted steps, the vector-field evaluations of forward and backward
   (a forward hook on the field module) and the parameter gradient (compared with
   the reference);
2. timing: one warm-up call each, then ``repeats`` rounds in which every
   implementation runs once, in rotating order, so load changes on a shared
   machine hit all implementations alike; the median is reported.

A case that times torchdiffeq's direct backprop also times mpnode's *graph-free
forward* (float32, the same stepping, under ``torch.no_grad``) in the same
rounds: the **recompute floor** is torchdiffeq direct + one graph-free forward,
what a solver that keeps only states and recomputes each step once in backward
cannot beat.  Each row's ``time_vs_floor`` is its time over that floor.

Gradient reference: fixed grids: torchdiffeq float32 on the same grid (else
mpnode float32), or, for a case with ``reference="float64"``, a float64 mpnode
solve on the same grid (what each row's roundoff is measured against); adaptive
cases: a float64 mpnode ``dopri5`` solve at ``rtol=1e-10, atol=1e-12``
([`ADAPTIVE_REFERENCE`][mpnode.bench.runner.ADAPTIVE_REFERENCE]), i.e. the ODE's gradient to about 1e-9, since every
adaptive solver takes its own steps.

A case may name a skip reason per implementation (``Case.skip``, e.g. a low
precision without fast kernels on this machine): that row is not run and carries
the reason as its ``error``.

Each implementation of a case gives one [`BenchRow`][mpnode.bench.runner.BenchRow]; ratios are filled in per case.
"""

from __future__ import annotations

import copy
import math
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .implementations import Discretization, Impl, StepCount
from .problems import Instance, build
from .profilers import Stopwatch, Timing, count_host_syncs, held_memory, peak_memory, synchronize

REFERENCE = "torchdiffeq/float32"
MPNODE_F32 = "mpnode/float32"
FLOOR = "graph-free forward"  # the timing key of the floor measurement (not an implementation)
STEP_AXES = ("steps", "dial")
"""Case axes of sweeps over the number of fixed steps (``"dial"``: the strategies' time/memory sweep)."""
ADAPTIVE_REFERENCE = Discretization("dopri5", 0, rtol=1e-10, atol=1e-12)
"""The float64 mpnode solve whose gradient adaptive cases compare with."""


@dataclass
class BenchRow:
    """One implementation run on one case: what was measured, and how it compares.

    Attributes:
        suite, problem, axis, sizes, steps: the case (``sizes`` as ``"batch=256,dim=32"``;
            ``axis``: the sweep that produced it, ``"base"`` for a single case, ``"adaptive"``
            for a single adaptive case, ``"dial"`` for a strategy/steps sweep); ``steps``:
            the grid's steps, or for adaptive cases the accepted steps this row measured.
        impl, solver, precision, device: the implementation (``impl`` is its label).
        time_s: median forward+backward wall time (``None`` when not timed).
        time_spread_s: interquartile range of the timed rounds; time_repeats: their number.
        held_bytes: bytes saved for backward by the forward (parameters excluded).
        peak_bytes: CUDA peak allocated above the start of the call (``None`` off CUDA).
        syncs_forward, syncs_backward: host synchronisations of forward and of backward.
        loss: the loss value; grad_rel_err: relative error of the parameter gradient against the case's reference (fixed
            grids: `REFERENCE`, or mpnode float32 when that failed or is absent, or float64 on the same grid when the
            case asks for it; adaptive: [`ADAPTIVE_REFERENCE`][mpnode.bench.runner.ADAPTIVE_REFERENCE]); grad_reference:
            which.
        time_vs_torchdiffeq, held_vs_torchdiffeq: ratios to `REFERENCE` of the same case.
        speedup_vs_mpnode_f32, peak_vs_mpnode_f32: mpnode float32's time over this one's,
            this one's CUDA peak over mpnode float32's.
        error: why the implementation failed or could not run (``None`` when it ran).
        method: the method this row ran (``"rk4"``, ``"dopri5"``, ``"tsit5"``); rtol, atol: its
            tolerances (adaptive only).
        accepted_steps: accepted steps of the measured call (mpnode: ``SolverStats``;
            torchdiffeq: ``callback_accept_step``, or the grid for fixed steps; torchode:
            the largest per-sample count of its solution stats).
        nfe: vector-field calls of the measured forward+backward (a forward hook on the
            field module; batched calls, so one per evaluation of the whole batch).
        graph_free_forward_s: the case's median graph-free forward (mpnode float32 under
            ``torch.no_grad``), the same in every row of the case.
        time_vs_floor: ``time_s`` over the recompute floor, torchdiffeq direct's time +
            ``graph_free_forward_s``.
        grad_vs_mpnode_f32: relative difference of the gradient to mpnode float32's
            (recompute adjoint) in the same case.
    """

    suite: str
    problem: str
    axis: str
    sizes: str
    steps: int
    impl: str
    solver: str
    precision: str
    device: str
    time_s: float | None = None
    time_spread_s: float | None = None
    time_repeats: int | None = None
    held_bytes: int | None = None
    peak_bytes: int | None = None
    syncs_forward: int | None = None
    syncs_backward: int | None = None
    loss: float | None = None
    grad_rel_err: float | None = None
    time_vs_torchdiffeq: float | None = None
    held_vs_torchdiffeq: float | None = None
    speedup_vs_mpnode_f32: float | None = None
    peak_vs_mpnode_f32: float | None = None
    error: str | None = None
    method: str = "rk4"
    rtol: float | None = None
    atol: float | None = None
    accepted_steps: int | None = None
    nfe: int | None = None
    graph_free_forward_s: float | None = None
    time_vs_floor: float | None = None
    grad_vs_mpnode_f32: float | None = None
    grad_reference: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchRow:
        """A row from its `as_dict` form (e.g. read back from results.json); unknown keys are ignored."""
        return cls(**{k: v for k, v in data.items() if k in COLUMNS})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = tuple(f.name for f in fields(BenchRow))
"""The fields of [`BenchRow`][mpnode.bench.runner.BenchRow], in CSV column order."""


@dataclass(frozen=True)
class Case:
    """One problem size and stepping, run by several implementations.

    ``method="rk4"`` with ``steps`` fixed steps, or an adaptive ``method`` with
    ``rtol``/``atol`` and ``steps=0`` (each row then reports its accepted steps).
    ``skip``: per implementation, ``None`` or why it is not run here.  ``reference``:
    ``"torchdiffeq"`` (fixed grids: torchdiffeq float32 on the same grid) or
    ``"float64"`` (mpnode in float64 on the same grid); adaptive cases always use
    [`ADAPTIVE_REFERENCE`][mpnode.bench.runner.ADAPTIVE_REFERENCE].
    """

    problem: str
    sizes: tuple[tuple[str, int], ...]
    steps: int
    impls: tuple[Impl, ...]
    axis: str = "base"  # which sweep produced it: "steps", "dial", "batch", "width", ..., "adaptive" or "base"
    timed: tuple[bool, ...] | None = None  # per impl: time it (False: memory/syncs/accuracy only)
    method: str = "rk4"
    rtol: float | None = None
    atol: float | None = None
    skip: tuple[str | None, ...] | None = None
    reference: str = "torchdiffeq"

    def __post_init__(self) -> None:
        self.discretization  # noqa: B018 (validates method, steps and tolerances)
        if self.reference not in ("torchdiffeq", "float64"):
            raise ValueError(f"reference must be 'torchdiffeq' or 'float64', got {self.reference!r}")
        if self.skip is not None and len(self.skip) != len(self.impls):
            raise ValueError(f"skip needs one entry per implementation ({len(self.impls)}), got {len(self.skip)}")

    def skip_reason(self, index: int) -> str | None:
        """Why implementation ``index`` is not run in this case, or ``None``."""
        return None if self.skip is None else self.skip[index]

    @property
    def discretization(self) -> Discretization:
        return Discretization(self.method, self.steps, self.rtol, self.atol)

    @property
    def timed_flags(self) -> tuple[bool, ...]:
        return self.timed or (True,) * len(self.impls)

    @property
    def has_floor(self) -> bool:
        """Whether the case times torchdiffeq direct, hence the recompute floor."""
        return any(i.label == REFERENCE and t and self.skip_reason(k) is None
                   for k, (i, t) in enumerate(zip(self.impls, self.timed_flags)))

    @property
    def size_dict(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def size_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.sizes)


def _grad_vector(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter's gradient, flattened to float64; a parameter the loss does not use counts as zeros.

    (torchdiffeq leaves such a gradient ``None``, mpnode returns zeros: both mean the same.)
    """
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double()
             for p in module.parameters()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _zero_grad(module: torch.nn.Module) -> None:
    module.zero_grad(set_to_none=True)


def _measure_once(impl: Impl, case: Case, inst: Instance, device: torch.device, row: BenchRow) -> torch.Tensor:
    """The untimed measured call: fills memory, syncs, loss, steps and evaluations into ``row``;
    returns the parameter gradient."""
    _zero_grad(inst.func)
    count = StepCount()
    forward = impl.forward_fn(inst, case.discretization, device, count)
    calls = [0]
    hook = inst.func.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        with peak_memory(device) as pk:
            with impl.autocast(device):
                with held_memory(exclude=inst.func.parameters()) as held, count_host_syncs() as fsync:
                    loss = forward()
                with count_host_syncs() as bsync:
                    loss.backward()
            synchronize(device)
    finally:
        hook.remove()
    row.nfe, row.accepted_steps = calls[0], count.accepted
    if case.discretization.adaptive:
        assert count.accepted is not None, "every solver reports its accepted steps"
        row.steps = count.accepted
    row.held_bytes = held.bytes
    row.peak_bytes = None if pk.peak_bytes is None or pk.start_bytes is None else pk.peak_bytes - pk.start_bytes
    row.syncs_forward, row.syncs_backward = fsync.count, bsync.count
    row.loss = float(loss.detach())
    return _grad_vector(inst.func)


def run_case(case: Case, device: torch.device, repeats: int, suite: str = "", seed: int = 0,
             on_call: Callable[[], None] | None = None) -> list[BenchRow]:
    """Run every implementation of ``case``; returns one row per implementation."""
    return run_group([case], device, repeats, suite=suite, seed=seed, on_call=on_call)


def run_group(cases: Sequence[Case], device: torch.device, repeats: int, suite: str = "", seed: int = 0,
              on_call: Callable[[], None] | None = None) -> list[BenchRow]:
    """Run cases that share one problem instance (same problem and sizes, e.g. a steps sweep).

    Timing rounds interleave every (case, implementation) pair and each case's
    graph-free forward, so a load change on a shared machine shifts all of them
    alike and the ratios and the time-vs-steps slope stay meaningful.  Returns one
    row per (case, implementation).
    """
    first = cases[0]
    if any((c.problem, c.sizes) != (first.problem, first.sizes) for c in cases):
        raise ValueError("run_group needs cases of one problem and one size")
    inst = build(first.problem, first.size_dict, device, seed=seed)
    per_case: list[dict[str, BenchRow]] = []
    grads: list[dict[str, torch.Tensor]] = []
    fns: dict[tuple[int, str], Callable] = {}
    for ci, case in enumerate(cases):
        disc = case.discretization
        rows: dict[str, BenchRow] = {}
        per_case.append(rows)
        grads.append({})
        for k, (impl, want_time) in enumerate(zip(case.impls, case.timed_flags)):
            row = _new_row(suite, case, impl, device)
            rows[impl.label] = row
            row.error = case.skip_reason(k) or impl.unavailable(inst, disc)
            if row.error is None:
                try:
                    grads[ci][impl.label] = _measure_once(impl, case, inst, device, row)
                    if want_time:
                        fns[(ci, impl.label)] = _warm(impl.step_fn(inst, disc, device), inst)
                except Exception as exc:  # a failing implementation (float16 overflow, OOM) is a result
                    _record_failure(row, exc, device)
            if on_call:
                on_call()
        if case.has_floor and (ci, REFERENCE) in fns:
            fns[(ci, FLOOR)] = _warm(graph_free_forward(inst, disc, device), inst)
    samples = _timing_rounds(fns, per_case, inst, device, repeats, on_call)
    floors: dict[int, float] = {}
    for (ci, label), s in samples.items():
        if not s:
            continue
        t = Timing(tuple(s))
        if label == FLOOR:
            floors[ci] = t.median_s
            continue
        row = per_case[ci][label]
        if row.error is None:
            row.time_s, row.time_spread_s, row.time_repeats = t.median_s, t.spread_s, len(s)
    out: list[BenchRow] = []
    for ci, (case, rows, case_grads) in enumerate(zip(cases, per_case, grads)):
        reference, name = None, None
        if case.discretization.adaptive:
            reference, name = _float64_gradient(inst, device), "float64 dopri5 rtol=1e-10 atol=1e-12"
        elif case.reference == "float64":
            reference, name = _float64_gradient(inst, device, case.discretization), "float64 on the same grid"
        _fill_ratios(rows, case_grads, floors.get(ci), reference)
        for row in rows.values():
            if row.grad_rel_err is not None:
                row.grad_reference = name or (REFERENCE if REFERENCE in case_grads else MPNODE_F32)
        out.extend(rows.values())
    return out


def _new_row(suite: str, case: Case, impl: Impl, device: torch.device) -> BenchRow:
    disc = case.discretization.with_method(impl.method)
    return BenchRow(suite=suite, problem=case.problem, axis=case.axis, sizes=case.size_text, steps=case.steps,
                    impl=impl.label, solver=impl.solver, precision=impl.precision, device=str(device),
                    method=disc.method, rtol=disc.rtol, atol=disc.atol)


def _warm(fn: Callable[[], Any], inst: Instance) -> Callable[[], Any]:
    """``fn`` after one untimed call (gradients zeroed first)."""
    _zero_grad(inst.func)
    fn()
    return fn


def graph_free_forward(inst: Instance, disc: Discretization, device: torch.device) -> Callable[[], torch.Tensor]:
    """mpnode float32's forward of ``disc`` under ``torch.no_grad``: the extra work of a recompute adjoint."""
    forward = Impl("mpnode").forward_fn(inst, disc, device)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return forward()

    return run


def _float64_gradient(inst: Instance, device: torch.device,
                      disc: Discretization = ADAPTIVE_REFERENCE) -> torch.Tensor:
    """The parameter gradient of a float64 copy of ``inst`` solved by mpnode with ``disc``
    (default [`ADAPTIVE_REFERENCE`][mpnode.bench.runner.ADAPTIVE_REFERENCE]), outside any autocast."""
    from mpnode.core import odeint

    func = copy.deepcopy(inst.func).double()
    _zero_grad(func)
    y0 = inst.y0.double() if isinstance(inst.y0, torch.Tensor) else tuple(p.double() for p in inst.y0)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
    with torch.autocast(device.type, enabled=False):
        out = odeint(func, y0, t, **disc.solve_kwargs())
    y_T = out[-1] if isinstance(out, torch.Tensor) else tuple(o[-1] for o in out)
    inst.loss(y_T).backward()
    return _grad_vector(func)


def _timing_rounds(fns: dict[tuple[int, str], Callable], per_case: list[dict[str, BenchRow]], inst,
                   device: torch.device, repeats: int, on_call: Callable[[], None] | None
                   ) -> dict[tuple[int, str], list[float]]:
    """``repeats`` rounds, each calling every function once in rotating order; a failure drops that function."""
    samples: dict[tuple[int, str], list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        keys = list(fns)
        order = keys[r % len(keys):] + keys[: r % len(keys)] if keys else []
        for key in order:
            _zero_grad(inst.func)
            synchronize(device)
            try:
                with Stopwatch(device) as sw:
                    fns[key]()
            except Exception as exc:
                if key[1] != FLOOR:
                    _record_failure(per_case[key[0]][key[1]], exc, device)
                del fns[key]
                samples[key].clear()
                continue
            samples[key].append(sw.elapsed_s)
            if on_call:
                on_call()
    return samples


def _record_failure(row: BenchRow, exc: Exception, device: torch.device) -> None:
    row.error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    row.time_s = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def _relative_difference(g: torch.Tensor | None, ref: torch.Tensor | None) -> float | None:
    if g is None or ref is None or g.shape != ref.shape:
        return None
    denom = float(ref.norm())
    return float((g - ref).norm()) / denom if denom > 0 else math.nan


def _fill_ratios(rows: dict[str, BenchRow], grads: dict[str, torch.Tensor], graph_free_s: float | None,
                 reference_grad: torch.Tensor | None = None) -> None:
    """Ratios to torchdiffeq direct, mpnode float32 and the floor; gradient errors against the reference
    (``reference_grad``, else torchdiffeq float32's, else mpnode float32's)."""
    ref = rows.get(REFERENCE)
    mp = rows.get(MPNODE_F32)
    if reference_grad is None:
        reference_grad = grads.get(REFERENCE, grads.get(MPNODE_F32))
    floor = None if ref is None or ref.time_s is None or graph_free_s is None else ref.time_s + graph_free_s
    for label, row in rows.items():
        if ref is not None:
            row.time_vs_torchdiffeq = ratio(row.time_s, ref.time_s)
            row.held_vs_torchdiffeq = ratio(row.held_bytes, ref.held_bytes)
        if mp is not None:
            row.speedup_vs_mpnode_f32 = ratio(mp.time_s, row.time_s)
            row.peak_vs_mpnode_f32 = ratio(row.peak_bytes, mp.peak_bytes)
        row.graph_free_forward_s = graph_free_s
        row.time_vs_floor = ratio(row.time_s, floor)
        row.grad_rel_err = _relative_difference(grads.get(label), reference_grad)
        row.grad_vs_mpnode_f32 = _relative_difference(grads.get(label), grads.get(MPNODE_F32))


def run_cases(cases: Iterable[Case], device: torch.device, repeats: int, suite: str = "", seed: int = 0,
              progress: Callable[[int], Callable[[], None]] | None = None,
              on_case: Callable[[list[BenchRow]], None] | None = None) -> list[BenchRow]:
    """Run all cases in order; ``progress(total_calls)`` returns a per-call tick, ``on_case(rows)``
    sees each finished case's rows (e.g. to save partial results before a time limit)."""
    cases = list(cases)
    total = sum(len(c.impls) + repeats * (c.has_floor + sum(t and c.skip_reason(k) is None
                                                             for k, t in enumerate(c.timed_flags))) for c in cases)
    tick = progress(total) if progress else None
    groups: list[list[Case]] = []
    for case in cases:  # consecutive cases of one problem and size share an instance and timing rounds
        if groups and (groups[-1][0].problem, groups[-1][0].sizes) == (case.problem, case.sizes):
            groups[-1].append(case)
        else:
            groups.append([case])
    rows: list[BenchRow] = []
    for group in groups:
        try:
            case_rows = run_group(group, device, repeats, suite=suite, seed=seed, on_call=tick)
        except Exception:
            raise RuntimeError(f"benchmark cases {group[0].problem} {group[0].size_text} failed:\n"
                               + traceback.format_exc()) from None
        rows.extend(case_rows)
        if on_case:
            on_case(case_rows)
    return rows
