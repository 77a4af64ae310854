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

Rows are plain dicts (see :data:`COLUMNS`); ratios are filled in per case.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from .implementations import Impl
from .problems import build
from .profilers import Timing, _Stopwatch, count_host_syncs, held_memory, peak_memory, synchronize

COLUMNS = (
    "suite", "problem", "axis", "sizes", "steps", "impl", "solver", "precision", "device",
    "time_s", "time_spread_s", "time_repeats", "held_bytes", "peak_bytes", "syncs_forward", "syncs_backward",
    "loss", "grad_rel_err", "time_vs_torchdiffeq", "held_vs_torchdiffeq", "speedup_vs_mpnode_f32",
    "peak_vs_mpnode_f32", "error",
)
REFERENCE = "torchdiffeq/float32"
MPNODE_F32 = "mpnode/float32"


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
    parts = [p.grad.detach().reshape(-1).double() for p in module.parameters() if p.grad is not None]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _zero_grad(module: torch.nn.Module) -> None:
    module.zero_grad(set_to_none=True)


def _measure_once(impl: Impl, case: Case, inst, device: torch.device) -> dict:
    """The untimed measured call: memory, syncs, loss, gradient."""
    _zero_grad(inst.func)
    forward = impl.forward_fn(inst, case.steps, device)
    with peak_memory(device) as pk:
        with impl.autocast(device):
            with held_memory(exclude=inst.func.parameters()) as held, count_host_syncs() as fsync:
                loss = forward()
            with count_host_syncs() as bsync:
                loss.backward()
        synchronize(device)
    peak = None if pk.peak_bytes is None else pk.peak_bytes - pk.start_bytes
    return {
        "held_bytes": held.bytes,
        "peak_bytes": peak,
        "syncs_forward": fsync.count,
        "syncs_backward": bsync.count,
        "loss": float(loss.detach()),
        "_grad": _grad_vector(inst.func),
    }


def run_case(case: Case, device: torch.device, repeats: int, suite: str = "", seed: int = 0,
             on_call: Callable[[], None] | None = None) -> list[dict]:
    """Run every implementation of ``case``; returns one row per implementation."""
    return run_group([case], device, repeats, suite=suite, seed=seed, on_call=on_call)


def run_group(cases: Sequence[Case], device: torch.device, repeats: int, suite: str = "", seed: int = 0,
              on_call: Callable[[], None] | None = None) -> list[dict]:
    """Run cases that share one problem instance (same problem and sizes, e.g. a steps sweep).

    Timing rounds interleave every (case, implementation) pair, so a load change
    on a shared machine shifts all of them alike and the time-vs-steps slope
    stays meaningful.  Returns one row per (case, implementation).
    """
    first = cases[0]
    if any((c.problem, c.sizes) != (first.problem, first.sizes) for c in cases):
        raise ValueError("run_group needs cases of one problem and one size")
    inst = build(first.problem, first.size_dict, device, seed=seed)
    per_case: list[dict[str, dict]] = []
    fns: dict[tuple[int, str], Callable] = {}
    for ci, case in enumerate(cases):
        timed = case.timed or (True,) * len(case.impls)
        rows: dict[str, dict] = {}
        per_case.append(rows)
        for impl, want_time in zip(case.impls, timed):
            row = {c: None for c in COLUMNS}
            row.update(suite=suite, problem=case.problem, axis=case.axis, sizes=case.size_text, steps=case.steps,
                       impl=impl.label, solver=impl.solver, precision=impl.precision, device=str(device))
            rows[impl.label] = row
            row["error"] = impl.unavailable()
            if row["error"] is None:
                try:
                    row.update(_measure_once(impl, case, inst, device))
                    if want_time:
                        fn = impl.step_fn(inst, case.steps, device)
                        _zero_grad(inst.func)
                        fn()  # warm-up
                        fns[(ci, impl.label)] = fn
                except Exception as exc:  # a failing implementation (float16 overflow, OOM) is a result
                    _record_failure(row, exc, device)
            if on_call:
                on_call()
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
    for (ci, label), s in samples.items():
        if s and label in per_case[ci] and per_case[ci][label]["error"] is None:
            t = Timing(tuple(s))
            per_case[ci][label].update(time_s=t.median_s, time_spread_s=t.spread_s, time_repeats=len(s))
    out = []
    for rows in per_case:
        _fill_ratios(rows)
        for row in rows.values():
            row.pop("_grad", None)
        out.extend(rows.values())
    return out


def _record_failure(row: dict, exc: Exception, device: torch.device) -> None:
    row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    row["time_s"] = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fill_ratios(rows: dict[str, dict]) -> None:
    ref = rows.get(REFERENCE)
    mp = rows.get(MPNODE_F32)
    ref_grad = None
    for cand in (ref, mp):
        if cand is not None and cand.get("_grad") is not None:
            ref_grad = cand["_grad"]
            break
    for row in rows.values():
        if ref is not None:
            row["time_vs_torchdiffeq"] = _ratio(row["time_s"], ref["time_s"])
            row["held_vs_torchdiffeq"] = _ratio(row["held_bytes"], ref["held_bytes"])
        if mp is not None:
            row["speedup_vs_mpnode_f32"] = _ratio(mp["time_s"], row["time_s"])
            row["peak_vs_mpnode_f32"] = _ratio(row["peak_bytes"], mp["peak_bytes"])
        g = row.get("_grad")
        if g is not None and ref_grad is not None and g.shape == ref_grad.shape:
            denom = float(ref_grad.norm())
            row["grad_rel_err"] = float((g - ref_grad).norm()) / denom if denom > 0 else math.nan


def run_cases(cases: Iterable[Case], device: torch.device, repeats: int, suite: str = "", seed: int = 0,
              progress: Callable[[int], Callable[[], None]] | None = None,
              on_case: Callable[[list[dict]], None] | None = None) -> list[dict]:
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
    rows: list[dict] = []
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
