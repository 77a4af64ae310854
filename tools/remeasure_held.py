"""Re-measure the held-for-backward bytes of a benchmark results file, keeping its times.

Held bytes do not depend on the machine's load, times do: after a fix of the held-memory meter
(``mpnode.core.meters``) this re-runs each row's measured call (``mpnode.bench.runner``'s, one forward and backward,
untimed) and replaces ``held_bytes`` and ``held_vs_torchdiffeq``; every other field stays as it was measured.  A row
whose steps or evaluation count come out different, or its loss by more than ``LOSS_RTOL``, ran a different
computation (the code changed since): that is an error, or with ``--keep-changed`` the row keeps its figures and is
listed in the meta.  A change that leaves all three as they were (say, how many weight casts a strategy keeps) is
not seen: before quoting a figure that moved, compare with the code's history.  The meta gets ``held_remeasured``
(date, torch, command, rows kept); ``results.csv``, ``summary.txt``, the growth fits and the plots are re-rendered
from the rows as ``mpnode-bench plot`` does.

    python tools/remeasure_held.py benchmarks/results/<date>/<suite>/results.json [--dry] [--keep-changed]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

import torch

from mpnode.bench import cli, runner
from mpnode.bench.implementations import parse_impl
from mpnode.bench.problems import build
from mpnode.bench.report import read_results_json
from mpnode.bench.runner import REFERENCE, BenchRow, Case

LOSS_RTOL = 1e-3  # float rounding of a changed summation order passes; a different solve does not


def case_of(row: BenchRow) -> Case:
    """The one-implementation, untimed case that measures ``row`` again."""
    sizes = tuple((k, int(v)) for k, v in (kv.split("=") for kv in row.sizes.split(",")))
    adaptive = row.method != "rk4"
    return Case(row.problem, sizes, 0 if adaptive else row.steps, (parse_impl(row.impl),), axis=row.axis,
                timed=(False,), method=row.method, rtol=row.rtol if adaptive else None,
                atol=row.atol if adaptive else None)


def remeasure(rows: Sequence[BenchRow], seed: int, keep_changed: bool = False, log=print
              ) -> tuple[list[str], list[str]]:
    """Replace ``held_bytes`` (and ``held_vs_torchdiffeq``) of every measured row in place; returns the changes
    and the rows kept as they were (``keep_changed``: their computation changed since)."""
    device, changes, kept, instances, skip = torch.device("cpu"), [], [], {}, set()
    for row in rows:
        if row.error or row.held_bytes is None:
            continue
        if row.device != "cpu":
            raise SystemExit(f"remeasure_held: row {row.impl} ran on {row.device}; this tool re-measures CPU rows")
        case = case_of(row)
        key = (case.problem, case.sizes)
        if key not in instances:
            instances = {key: build(case.problem, case.size_dict, device, seed=seed)}  # as run_group builds it
        fresh = runner._new_row(row.suite, case, case.impls[0], device)
        start = time.perf_counter()
        runner._measure_once(case.impls[0], case, instances[key], device, fresh)
        changed = _changed(row, fresh)
        if changed:
            what = f"{row.problem} {row.sizes} steps={row.steps} {row.impl}: {changed}"
            if not keep_changed:
                raise SystemExit(f"remeasure_held: {what}: the computation changed since this file was written; "
                                 "rerun the suite (or --keep-changed to leave such rows as they are)")
            log(f"kept as run: {what}")
            kept.append(what)
            skip.add(id(row))
            continue
        if fresh.held_bytes != row.held_bytes:
            changes.append(f"{row.problem} {row.sizes} steps={row.steps} {row.impl}: "
                           f"{row.held_bytes} -> {fresh.held_bytes} bytes")
        log(f"{row.problem} {row.sizes} {row.steps} {row.impl}: {row.held_bytes} -> {fresh.held_bytes} "
            f"({time.perf_counter() - start:.1f} s)")
        row.held_bytes = fresh.held_bytes
    _held_ratios(rows, skip)
    return changes, kept


def _changed(row: BenchRow, fresh: BenchRow) -> str:
    """How the fresh measurement's computation differs from the stored row's ('' if it does not)."""
    diffs = [f"{k} {getattr(fresh, k)} != {getattr(row, k)}" for k in ("steps", "nfe")
             if getattr(row, k) is not None and getattr(fresh, k) != getattr(row, k)]  # (older files have no nfe)
    if row.loss is not None and (fresh.loss is None or abs(fresh.loss - row.loss) > LOSS_RTOL * abs(row.loss)):
        diffs.append(f"loss {fresh.loss} != {row.loss}")
    return ", ".join(diffs)


def _held_ratios(rows: Sequence[BenchRow], skip: AbstractSet[int] = frozenset()) -> None:
    """``held_vs_torchdiffeq`` against torchdiffeq float32 of the same case, as the runner computes it (rows whose
    ``id`` is in ``skip``, kept as run, keep theirs)."""
    def case_key(r: BenchRow) -> tuple:  # an adaptive row's steps are its own accepted steps, its method may be too
        return r.problem, r.sizes, r.axis, r.steps if r.rtol is None else None, r.rtol, r.atol

    refs = {case_key(r): r for r in rows if r.impl == REFERENCE}
    for r in rows:
        ref = refs.get(case_key(r))
        if ref is not None and id(r) not in skip:
            r.held_vs_torchdiffeq = runner.ratio(r.held_bytes, ref.held_bytes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("results", type=Path, help="a results.json written by mpnode-bench run")
    parser.add_argument("--seed", type=int, default=0, help="the seed the suite ran with (mpnode-bench's default 0)")
    parser.add_argument("--dry", action="store_true", help="measure and print, write nothing")
    parser.add_argument("--keep-changed", action="store_true",
                        help="leave rows whose computation changed since as they are (listed in the meta)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    meta, rows = read_results_json(args.results)
    changes, kept = remeasure(rows, args.seed, args.keep_changed)
    print(f"{len(changes)} held figure(s) changed" + "".join(f"\n  {c}" for c in changes))
    if kept:
        print(f"{len(kept)} row(s) kept as run" + "".join(f"\n  {c}" for c in kept))
    if args.dry:
        return 0
    meta["held_remeasured"] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "command": "python tools/remeasure_held.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "note": "held_bytes and held_vs_torchdiffeq re-measured with the fixed held-memory meter; times as run",
        "kept_as_run": kept,
    }
    plots = any(args.results.parent.glob("*.png"))
    return cli._emit(rows, {k: v for k, v in meta.items() if k != "growth"}, args.results.parent, plots=plots)


if __name__ == "__main__":
    sys.exit(main())
