"""``mpnode-bench`` (also ``python -m mpnode.bench``): run a suite, print the table, write CSV/JSON/plots.

    mpnode-bench list
    mpnode-bench run --suite quick                 # CPU, a few minutes
    mpnode-bench run --suite core-mlp              # the headline float32 comparison
    mpnode-bench run --suite dial                  # adjoint strategies: time vs held memory (CPU, ~2 min)
    mpnode-bench run --suite gpu --out $OUT/bench  # on a CUDA machine
    mpnode-bench run --suite speed                 # what mixed precision buys on this CPU (1 thread)
    mpnode-bench run --suite speed --smoke         # the same at tiny sizes (seconds)
    mpnode-bench plot outputs/bench/quick/results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import hardware
from .report import (
    dial_targets,
    growth_with_steps,
    read_results_json,
    render_adaptive,
    render_dial,
    render_growth,
    render_speed,
    render_table,
    speed_targets,
    write_results_csv,
    write_results_json,
)
from .runner import REFERENCE, BenchRow, run_cases
from .suites import SUITES, get_suite

GPU_TARGET_PROBLEMS = ("conv", "otflow")
DEFAULT_SUITE = "quick"
PARTIAL_META = "meta.partial.json"
"""Written next to ``results.partial.jsonl`` when a run starts (the machine, the skipped precisions), removed at its
end."""


def _progress(disable: bool) -> Callable[[int], Callable[[], None]]:
    def make(total: int) -> Callable[[], None]:
        if disable:
            return lambda: None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            state = {"n": 0}

            def tick() -> None:
                state["n"] += 1
                if state["n"] % 10 == 0 or state["n"] == total:
                    print(f"  {state['n']}/{total} calls", file=sys.stderr)

            return tick
        bar = tqdm(total=total, desc="benchmark calls", unit="call", file=sys.stderr)

        def tick() -> None:
            bar.update(1)
            if bar.n >= total:
                bar.close()

        return tick

    return make


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(["mpnode-bench", *sys.argv[1:]]),
        "load_average_start": _load_average(),
    }
    try:
        import torchdiffeq

        info["torchdiffeq"] = getattr(torchdiffeq, "__version__", "unknown")
    except ImportError:
        info["torchdiffeq"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return info


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none): how busy the machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def headline(rows: Sequence[BenchRow]) -> str:
    """One line per mpnode row of each base case: the ratios the docs quote."""
    lines = []
    cases: dict[tuple, list[BenchRow]] = {}
    for r in rows:
        if r.axis == "base":
            cases.setdefault((r.problem, r.sizes, r.steps), []).append(r)
    for (problem, sizes, steps), rs in cases.items():
        by = {r.impl: r for r in rs}
        adj = by.get("torchdiffeq-adjoint/float32")
        lines.append(f"{problem} [{sizes}] {steps} steps:")
        for r in rs:
            if r.solver != "mpnode" or r.error:
                continue
            parts = []
            if r.time_vs_torchdiffeq is not None:
                parts.append(f"time {r.time_vs_torchdiffeq:.2f}x torchdiffeq direct")
                if adj and adj.time_s and r.time_s is not None:
                    parts.append(f"{r.time_s / adj.time_s:.2f}x torchdiffeq adjoint")
            if r.time_vs_floor is not None:
                parts.append(f"{r.time_vs_floor:.2f}x the floor (torchdiffeq direct + one graph-free forward)")
            if r.speedup_vs_mpnode_f32 is not None and r.precision != "float32":
                parts.append(f"speed-up {r.speedup_vs_mpnode_f32:.2f}x vs mpnode float32")
            if r.held_vs_torchdiffeq:
                parts.append(f"held 1/{1 / r.held_vs_torchdiffeq:.1f} of torchdiffeq direct")
            if r.peak_vs_mpnode_f32 is not None:
                parts.append(f"CUDA peak {r.peak_vs_mpnode_f32:.2f}x mpnode float32")
            parts.append(f"host syncs forward/backward {r.syncs_forward}/{r.syncs_backward}")
            if r.grad_rel_err is not None:
                parts.append(f"grad rel. err {r.grad_rel_err:.1e}")
            lines.append(f"  {r.impl}: " + ", ".join(parts))
        if REFERENCE in by and by[REFERENCE].error:
            lines.append(f"  (reference {REFERENCE} failed: {by[REFERENCE].error})")
    return "\n".join(lines)


def gpu_targets(rows: Sequence[BenchRow]) -> str:
    """The issue's GPU targets on conv and OT-Flow: low precision >= 2x mpnode float32 speed, peak <= 0.5x."""
    lines = ["GPU targets (base cases; low precision vs mpnode float32):"]
    for r in rows:
        if r.axis != "base" or r.problem not in GPU_TARGET_PROBLEMS or r.solver != "mpnode":
            continue
        if r.precision == "float32":
            continue
        s, p = r.speedup_vs_mpnode_f32, r.peak_vs_mpnode_f32
        ok = s is not None and p is not None and s >= 2.0 and p <= 0.5
        s_txt = "-" if s is None else f"{s:.2f}x"
        p_txt = "-" if p is None else f"{p:.2f}x"
        lines.append(f"  {r.problem} {r.impl}: speed-up {s_txt} (>= 2), peak {p_txt} (<= 0.5): "
                     + ("met" if ok else "MISSED"))
    return "\n".join(lines)


def _resolve_device(name: str | None, suite_device: str) -> torch.device:
    if name is None:
        name = suite_device
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "mpnode-bench: this suite runs on CUDA but torch.cuda.is_available() is False. "
            "Run it on a GPU machine, or pick a CPU suite: mpnode-bench run --suite quick"
        )
    return dev


def cmd_run(args: argparse.Namespace) -> int:
    if args.suite is None:
        print(f"mpnode-bench: no --suite given, running the default suite {DEFAULT_SUITE!r}; "
              "`mpnode-bench list` shows the others", file=sys.stderr)
        args.suite = DEFAULT_SUITE
    suite = get_suite(args.suite)
    if args.dry:
        device = torch.device(args.device or suite.device_type)
    else:
        device = _resolve_device(args.device, suite.device_type)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    speed, skip = _hardware_gate(suite, device, args)
    cases = suite.cases(smoke=args.smoke, skip=skip)
    if args.problems:
        wanted = set(args.problems.split(","))
        cases = [c for c in cases if c.problem in wanted]
    if args.sizes:
        wanted_sizes = set(args.sizes.split(","))
        cases = [c for c in cases if wanted_sizes <= {f"{k}={v}" for k, v in c.sizes}]
    if args.precisions:
        cases = _only_precisions(cases, set(args.precisions.split(",")))
    repeats = args.repeats or suite.repeats
    if args.dry:
        for c in cases:
            impls = ", ".join(i.label + ("" if t else " (untimed)") for i, t in zip(c.impls, c.timed_flags))
            disc = c.discretization
            stepping = (f"{disc.method} rtol={disc.rtol:g} atol={disc.atol:g}" if disc.adaptive
                        else f"{disc.method} steps={c.steps}")
            print(f"{c.problem:7s} {c.axis:8s} {c.size_text:40s} {stepping:28s} {impls}")
        print(f"{len(cases)} cases, {repeats} timed repeats each, device {device}")
        return 0
    out = Path(args.out) if args.out else Path("outputs") / "bench" / f"{suite.name}-{device.type}"
    meta = {**machine_info(device), "suite": suite.name, "repeats": repeats, "describe": suite.describe,
            "smoke": args.smoke}
    if speed is not None:
        meta["hardware"] = speed.as_dict()
        meta["hardware_line"] = speed.describe()
        meta["skipped_precisions"] = {p: speed.skip_reason(p) for p in skip}
        meta["forced_low_precision"] = args.force_low_precision
    print(f"mpnode-bench: suite {suite.name} ({suite.describe}) on {device}, torch {meta['torch']}, "
          f"{meta['cpu_count']} CPUs, {meta['torch_threads']} threads; {len(cases)} cases", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "results.partial.jsonl"  # one line per finished case, kept if a time limit stops the run
    partial.write_text("")
    partial_meta = out / PARTIAL_META  # the machine, for re-rendering a cut run
    partial_meta.write_text(json.dumps(meta, default=str))

    def save_partial(case_rows: list[BenchRow]) -> None:
        with partial.open("a") as fh:
            for r in case_rows:
                fh.write(json.dumps(r.as_dict(), default=str) + "\n")

    rows = run_cases(cases, device, repeats, suite=suite.name, seed=args.seed, progress=_progress(args.no_progress),
                     on_case=save_partial)
    meta["load_average_end"] = _load_average()
    status = _emit(rows, meta, out, plots=not args.no_plots)
    partial.unlink()  # the complete results are written
    partial_meta.unlink()
    return status


def _only_precisions(cases: list, precisions: set[str]) -> list:
    """The cases with only the implementations in ``precisions`` (cases left with none are dropped)."""
    unknown = precisions - {"float32", "bfloat16", "float16"}
    if unknown:
        raise SystemExit(f"mpnode-bench: unknown precisions {sorted(unknown)}; choose from float32, bfloat16, float16")
    def pick(seq, keep: list[int]):
        return None if seq is None else tuple(seq[k] for k in keep)

    out = []
    for c in cases:
        keep = [k for k, i in enumerate(c.impls) if i.precision in precisions]
        if keep:
            out.append(dataclasses.replace(c, impls=pick(c.impls, keep), timed=pick(c.timed, keep),
                                           skip=pick(c.skip, keep)))
    return out


def _hardware_gate(suite, device: torch.device, args: argparse.Namespace
                   ) -> tuple[hardware.LowPrecisionSpeed | None, dict[str, str]]:
    """For a suite that gates on hardware: the measured machine and ``precision -> why its rows are skipped``
    (the short note each skipped row carries; empty with ``--force-low-precision``)."""
    if not suite.gate_on_hardware or args.dry:
        return None, {}
    speed = hardware.measure(device)
    print(f"mpnode-bench: {speed.describe()}", file=sys.stderr)
    if args.force_low_precision:
        return speed, {}
    skip = {p: note for p in hardware.LOW_PRECISIONS if (note := speed.row_note(p)) is not None}  # the slow ones
    for p in skip:
        print(f"mpnode-bench: {speed.skip_reason(p)}", file=sys.stderr)
    return speed, skip


def _machine_lines(meta: dict) -> str:
    """The measured low-precision capability and what was skipped (speed suites), else empty."""
    if "hardware_line" not in meta:
        return ""
    lines = ["machine: " + meta["hardware_line"],
             f"load average (1, 5, 15 min) at start {meta.get('load_average_start')}, "
             f"at end {meta.get('load_average_end')}; torch threads {meta.get('torch_threads')}"]
    lines += [f"{p}: {reason}" for p, reason in (meta.get("skipped_precisions") or {}).items()]
    if meta.get("forced_low_precision"):
        lines.append("low precisions timed on request (--force-low-precision), whatever the hardware check said")
    return "\n".join(lines)


def _emit(rows: list[BenchRow], meta: dict, out: Path, plots: bool) -> int:
    where = meta.get("gpu") or meta.get("device")
    title = f"mpnode-bench {meta.get('suite', '')} on {where} (torch {meta.get('torch')})"
    table = render_table(rows, title)
    fits = growth_with_steps(rows)
    device_type = str(meta.get("device", "cpu")).split(":")[0]
    only_speed = bool(rows) and all(r.axis == "speed" for r in rows)  # the speed table says it all
    text = [] if only_speed else [table, headline(rows)]
    text += [t for t in (_machine_lines(meta), render_speed(rows), speed_targets(rows, device_type),
                         render_adaptive(rows), render_dial(rows), dial_targets(rows)) if t]
    if fits:
        text.append(render_growth(fits))
    if meta.get("device", "").startswith("cuda"):
        text.append(gpu_targets(rows))
    summary = "\n\n".join(text)
    print(summary)
    out.mkdir(parents=True, exist_ok=True)
    write_results_csv(rows, out / "results.csv")
    write_results_json(rows, {**meta, "growth": fits}, out / "results.json")
    (out / "summary.txt").write_text(summary + "\n")
    written = []
    if plots:
        from .plots import plot_all

        written = plot_all(rows, out, title=meta.get("suite", ""))
    print(f"\nwrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'summary.txt'}"
          + (f" and {len(written)} plot(s)" if written else ""))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    path = Path(args.results)
    if path.suffix == ".jsonl":  # partial results of an interrupted run
        rows = [BenchRow.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
        meta: dict[str, Any] = {"suite": rows[0].suite if rows else "", "device": rows[0].device if rows else ""}
        if (path.parent / PARTIAL_META).exists():
            meta = json.loads((path.parent / PARTIAL_META).read_text())
        meta["partial"] = True
    else:
        meta, rows = read_results_json(path)
    out = Path(args.out) if args.out else Path(args.results).parent
    return _emit(rows, meta, out, plots=True)


def cmd_list(args: argparse.Namespace) -> int:
    for s in SUITES.values():
        print(f"{s.name:9s} [{s.device_type}] {len(s.cases()):3d} cases  {s.describe}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpnode-bench", description="Benchmarks of mpnode against torchdiffeq: "
                                "time, memory held for backward, CUDA peak memory, host syncs, gradient accuracy.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a suite and write results.csv, results.json, summary.txt and plots")
    r.add_argument("--suite", default=None, choices=sorted(SUITES),
                   help=f"the suite to run (default: {DEFAULT_SUITE}; `mpnode-bench list` describes them)")
    r.add_argument("--device", default=None, help="override the suite's device (cpu, cuda, cuda:1)")
    r.add_argument("--out", default=None, help="output folder (default outputs/bench/<suite>-<device>)")
    r.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default: the suite's)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; default 1 on CPU (stable ratios on a shared machine: several "
                        "threads on a busy CPU make small ops 10-100x slower), 0 keeps torch's default")
    r.add_argument("--problems", default=None, help="comma-separated subset: mlp,otflow,conv,cnf,demo")
    r.add_argument("--sizes", default=None,
                   help="keep the cases whose sizes include all of these, e.g. width=512 or batch=256,width=512")
    r.add_argument("--precisions", default=None,
                   help="comma-separated subset of the implementations' precisions: float32,bfloat16,float16")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dry", action="store_true", help="list the cases without running them")
    r.add_argument("--smoke", action="store_true", help="the suite at tiny sizes (suites with a smoke variant: "
                   + ", ".join(sorted(n for n, s in SUITES.items() if s.smoke)) + ")")
    r.add_argument("--force-low-precision", action="store_true",
                   help="speed suites: time bfloat16/float16 rows even where the hardware check finds no fast "
                        "kernels for them (on such a machine they measure emulation, not mixed precision)")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_run)
    pl = sub.add_parser("plot", help="re-render table and plots from results.json (or results.partial.jsonl)")
    pl.add_argument("results")
    pl.add_argument("--out", default=None)
    pl.set_defaults(func=cmd_plot)
    ls = sub.add_parser("list", help="list the suites")
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
