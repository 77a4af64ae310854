"""Run benchmark cases: every implementation of a case on one shared problem instance.

For each case (problem, sizes, steps) the runner builds the problem once
(same weights and data for every implementation), then per implementation:

1. one measured forward+backward: bytes held for backward
   (:func:`~mpnode.bench.profilers.held_memory` over the forward, parameters
   excluded), host syncs of forward and of backward
   (:func:`~mpnode.bench.profilers.count_host_syncs`), CUDA peak memory, the
   loss and the parameter gradient (compared with the reference implementation);
2. timing: one warm-up call each, then ``repeats`` rounds in which every
   implementation runs once, in rotating order, so load changes on a shared
   machine hit all implementations alike; the median is reported.

Each implementation of a case gives one :class:`BenchRow`; ratios are filled in per case.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .implementations import Impl
from .problems import build
from .profilers import Timing, _Stopwatch, count_host_syncs, held_memory, peak_memory, synchronize

REFERENCE = "torchdiffeq/float32"
MPNODE_F32 = "mpnode/float32"


@dataclass
class BenchRow:
    """One implementation run on one case: what was measured, and how it compares.

    Attributes:
        suite, problem, axis, sizes, steps: the case (``sizes`` as ``"batch=256,dim=32"``;
            ``axis``: the sweep that produced it, ``"base"`` for a single case).
        impl, solver, precision, device: the implementation (``impl`` is its label).
        time_s: median forward+backward wall time (``None`` when not timed).
        time_spread_s: interquartile range of the timed rounds; time_repeats: their number.
        held_bytes: bytes saved for backward by the forward (parameters excluded).
        peak_bytes: CUDA peak allocated above the start of the call (``None`` off CUDA).
        syncs_forward, syncs_backward: host synchronisations of forward and of backward.
        loss: the loss value; grad_rel_err: relative error of the parameter gradient
            against :data:`REFERENCE` (or mpnode float32 when that failed).
        time_vs_torchdiffeq, held_vs_torchdiffeq: ratios to :data:`REFERENCE` of the same case.
        speedup_vs_mpnode_f32, peak_vs_mpnode_f32: mpnode float32's time over this one's,
            this one's CUDA peak over mpnode float32's.
        error: why the implementation failed or could not run (``None`` when it ran).
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BenchRow":
        """A row from its :meth:`as_dict` form (e.g. read back from results.json); unknown keys are ignored."""
        return cls(**{k: v for k, v in data.items() if k in COLUMNS})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = tuple(f.name for f in fields(BenchRow))
"""The fields of :class:`BenchRow`, in CSV column order."""


@dataclass(frozen=True)
class Case:
    """One problem size and step count, run by several implementations."""

    problem: str
    sizes: tuple[tuple[str, int], ...]
    steps: int
    impls: tuple[Impl, ...]
    axis: str = "base"  # which sweep produced it: "steps", "batch", "width", ... or "base"
    timed: tuple[bool, ...] | None = None  # per impl: time it (False: memory/syncs/accuracy only)

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


def _measure_once(impl: Impl, case: Case, inst, device: torch.device, row: BenchRow) -> torch.Tensor:
    """The untimed measured call: fills memory, syncs and loss into ``row``; returns the parameter gradient."""
    _zero_grad(inst.func)
    forward = impl.forward_fn(inst, case.steps, device)
    with peak_memory(device) as pk:
        with impl.autocast(device):
            with held_memory(exclude=inst.func.parameters()) as held, count_host_syncs() as fsync:
                loss = forward()
            with count_host_syncs() as bsync:
                loss.backward()
        synchronize(device)
    row.held_bytes = held.bytes
    row.peak_bytes = None if pk.peak_bytes is None else pk.peak_bytes - pk.start_bytes
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

    Timing rounds interleave every (case, implementation) pair, so a load change
    on a shared machine shifts all of them alike and the time-vs-steps slope
    stays meaningful.  Returns one row per (case, implementation).
    """
    first = cases[0]
    if any((c.problem, c.sizes) != (first.problem, first.sizes) for c in cases):
        raise ValueError("run_group needs cases of one problem and one size")
    inst = build(first.problem, first.size_dict, device, seed=seed)
    per_case: list[dict[str, BenchRow]] = []
    grads: list[dict[str, torch.Tensor]] = []
    fns: dict[tuple[int, str], Callable] = {}
    for ci, case in enumerate(cases):
        timed = case.timed or (True,) * len(case.impls)
        rows: dict[str, BenchRow] = {}
        per_case.append(rows)
        grads.append({})
        for impl, want_time in zip(case.impls, timed):
            row = BenchRow(suite=suite, problem=case.problem, axis=case.axis, sizes=case.size_text, steps=case.steps,
                           impl=impl.label, solver=impl.solver, precision=impl.precision, device=str(device))
            rows[impl.label] = row
            row.error = impl.unavailable()
            if row.error is None:
                try:
                    grads[ci][impl.label] = _measure_once(impl, case, inst, device, row)
                    if want_time:
                        fn = impl.step_fn(inst, case.steps, device)
                        _zero_grad(inst.func)
                        fn()  # warm-up
                        fns[(ci, impl.label)] = fn
                except Exception as exc:  # a failing implementation (float16 overflow, OOM) is a result
                    _record_failure(row, exc, device)
            if on_call:
                on_call()
    samples = _timing_rounds(fns, per_case, inst, device, repeats, on_call)
    for (ci, label), s in samples.items():
        row = per_case[ci][label]
        if s and row.error is None:
            t = Timing(tuple(s))
            row.time_s, row.time_spread_s, row.time_repeats = t.median_s, t.spread_s, len(s)
    out: list[BenchRow] = []
    for rows, case_grads in zip(per_case, grads):
        _fill_ratios(rows, case_grads)
        out.extend(rows.values())
    return out


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
                with _Stopwatch(device) as sw:
                    fns[key]()
            except Exception as exc:
                _record_failure(per_case[key[0]][key[1]], exc, device)
                del fns[key]
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


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fill_ratios(rows: dict[str, BenchRow], grads: dict[str, torch.Tensor]) -> None:
    ref = rows.get(REFERENCE)
    mp = rows.get(MPNODE_F32)
    ref_grad = grads.get(REFERENCE, grads.get(MPNODE_F32))
    for label, row in rows.items():
        if ref is not None:
            row.time_vs_torchdiffeq = _ratio(row.time_s, ref.time_s)
            row.held_vs_torchdiffeq = _ratio(row.held_bytes, ref.held_bytes)
        if mp is not None:
            row.speedup_vs_mpnode_f32 = _ratio(mp.time_s, row.time_s)
            row.peak_vs_mpnode_f32 = _ratio(row.peak_bytes, mp.peak_bytes)
        g = grads.get(label)
        if g is not None and ref_grad is not None and g.shape == ref_grad.shape:
            denom = float(ref_grad.norm())
            row.grad_rel_err = float((g - ref_grad).norm()) / denom if denom > 0 else math.nan


def run_cases(cases: Iterable[Case], device: torch.device, repeats: int, suite: str = "", seed: int = 0,
              progress: Callable[[int], Callable[[], None]] | None = None,
              on_case: Callable[[list[BenchRow]], None] | None = None) -> list[BenchRow]:
    """Run all cases in order; ``progress(total_calls)`` returns a per-call tick, ``on_case(rows)``
    sees each finished case's rows (e.g. to save partial results before a time limit)."""
    cases = list(cases)
    total = sum(len(c.impls) + repeats * sum(c.timed or (True,) * len(c.impls)) for c in cases)
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
