"""Several seeds of ``examples/ode_mnist.py`` per configuration, one run at a time, and their summary.

Each run is a subprocess ``ode_mnist.py --precision P --odeint S --seed K --out <work>/<run> <extra>``
(``<extra>``: everything after ``--``).  Its CPU time (user + system) and peak
resident memory come from ``os.wait4``.  Into ``--results`` go, per run,
``<run>_log.csv`` (the per-epoch log) and ``<run>_final.csv`` (the last
evaluations), and a row of ``runs.csv``; then ``summary.csv`` and
``summary.md`` (mean, sample std, min and max of the final test accuracy over
seeds per configuration, and the per-seed values).  Runs already listed in
``runs.csv`` are skipped, so an interrupted series resumes where it stopped.

    OMP_NUM_THREADS=1 python benchmarks/mnist_seeds.py --results benchmarks/results/<date>/mnist \\
        --seeds 0 1 2 -- --data-root ../shared/data --train-subset 12000 --epochs 3 --final-evals 3
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "ode_mnist.py"
CONFIGS = ("float32/mpnode", "bfloat16/mpnode", "bfloat16/torchdiffeq")
RUN_COLUMNS = ("config", "seed", "final_test_acc", "last_mean", "last_min", "last_max", "n_last", "epochs",
               "train_n", "test_n", "train_s_per_epoch", "test_s_per_eval", "step_held_mib", "cpu_s",
               "max_rss_mib", "date", "command")


def run_name(config: str, seed: int) -> str:
    precision, odeint = config.split("/")
    return f"{precision}_{odeint}_seed{seed}"


def read_csv(path: Path) -> list[dict]:
    with Path(path).open() as fh:
        return list(csv.DictReader(fh))


def write_csv(rows: list[dict], path: Path, columns: tuple[str, ...]) -> None:
    with Path(path).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def run_once(config: str, seed: int, extra: list[str], work: Path) -> tuple[list[str], float, float]:
    """Run one training; returns ``(command, cpu seconds, peak RSS in MiB)``; its output goes to ``<work>/run.log``."""
    precision, odeint = config.split("/")
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(EXAMPLE), "--precision", precision, "--odeint", odeint, "--seed", str(seed),
           "--out", str(work), *extra]
    with (work / "run.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (work / "run.log").read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; end of {work / 'run.log'}:\n{tail}")
    max_rss_kib = usage.ru_maxrss  # KiB on Linux
    return cmd, usage.ru_utime + usage.ru_stime, max_rss_kib / 1024


def run_record(config: str, seed: int, log: list[dict], final: list[dict], cmd: list[str], cpu_s: float,
               max_rss_mib: float) -> dict:
    """One ``runs.csv`` row from a run's epoch log and final evaluations."""
    accs = [float(r["test_acc"]) for r in final]
    shown = [a if not a.startswith(str(REPO)) else os.path.relpath(a, REPO) for a in cmd[1:]]
    return dict(config=config, seed=seed, final_test_acc=accs[-1], last_mean=round(statistics.fmean(accs), 5),
                last_min=min(accs), last_max=max(accs), n_last=len(accs), epochs=len(log),
                train_n=log[-1]["train_n"], test_n=log[-1]["test_n"],
                train_s_per_epoch=round(statistics.fmean(float(r["train_time_s"]) for r in log), 1),
                test_s_per_eval=round(statistics.fmean(float(r["test_time_s"]) for r in log), 1),
                step_held_mib=log[0]["step_held_mib"], cpu_s=round(cpu_s, 1), max_rss_mib=round(max_rss_mib),
                date=_dt.date.today().isoformat(), command="python " + " ".join(shown))


def summarize(runs: list[dict]) -> list[dict]:
    """Per configuration (in first-seen order): final test accuracy over seeds and mean costs."""
    rows = []
    for config in dict.fromkeys(r["config"] for r in runs):
        mine = sorted((r for r in runs if r["config"] == config), key=lambda r: int(r["seed"]))
        accs = [float(r["final_test_acc"]) for r in mine]
        within = [float(r["last_max"]) - float(r["last_min"]) for r in mine]
        rows.append(dict(
            config=config, seeds=" ".join(str(r["seed"]) for r in mine), n=len(accs),
            acc_mean=round(statistics.fmean(accs), 4),
            acc_std=round(statistics.stdev(accs), 4) if len(accs) > 1 else "",
            acc_min=min(accs), acc_max=max(accs), per_seed=" ".join(f"{a:.4f}" for a in accs),
            within_run_range_max=round(max(within), 4),
            train_s_per_epoch=round(statistics.fmean(float(r["train_s_per_epoch"]) for r in mine), 1),
            test_s_per_eval=round(statistics.fmean(float(r["test_s_per_eval"]) for r in mine), 1),
            step_held_mib=mine[0]["step_held_mib"],
            max_rss_mib=round(statistics.fmean(float(r["max_rss_mib"]) for r in mine)),
            cpu_s_per_run=round(statistics.fmean(float(r["cpu_s"]) for r in mine)),
            cpu_s_total=round(sum(float(r["cpu_s"]) for r in mine), 1)))
    return rows


def markdown(summary: list[dict]) -> str:
    """The summary as a markdown table (accuracy as mean ± sample std [min, max])."""
    head = ("| configuration | final test acc. mean ± std [min, max] | per seed | largest change over a run's "
            "last evaluations | train s / epoch (wall) | CPU s / run | held for backward (MiB) | peak RSS (MiB) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        std = f" ± {r['acc_std']:.4f}" if r["acc_std"] != "" else ""
        lines.append(f"| {r['config']} | {r['acc_mean']:.4f}{std} [{r['acc_min']:.4f}, {r['acc_max']:.4f}] | "
                     f"{r['per_seed']} | {r['within_run_range_max']:.4f} | {r['train_s_per_epoch']} | "
                     f"{r['cpu_s_per_run']} | {r['step_held_mib']} | {r['max_rss_mib']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="mnist_seeds.py", description=__doc__.splitlines()[0],
                                epilog="Arguments after -- go to examples/ode_mnist.py unchanged.")
    p.add_argument("--results", type=Path, required=True, help="folder for the small CSV files and summary.md")
    p.add_argument("--work", type=Path, default=Path("outputs") / "mnist_seeds",
                   help="folder for each run's full output (figure, run.log)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of each configuration (model init, training subset and batch order; default 0 1 2)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="precision/odeint pairs")
    args = p.parse_args(own)
    reserved = {"--precision", "--odeint", "--seed", "--out"} & set(extra)
    if reserved:
        p.error(f"{', '.join(sorted(reserved))} after -- is set by mnist_seeds.py itself; remove it")
    return args, extra


def main(argv: list[str] | None = None) -> list[dict]:
    args, extra = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    runs_path = args.results / "runs.csv"
    runs = read_csv(runs_path) if runs_path.exists() else []
    done = {(r["config"], int(r["seed"])) for r in runs}
    for seed in args.seeds:  # seeds outermost: a stopped series still has every configuration for the first seeds
        for config in args.configs:
            if (config, seed) in done:
                print(f"skip {config} seed {seed}: already in {runs_path}")
                continue
            name = run_name(config, seed)
            print(f"run {name} ...", flush=True)
            cmd, cpu_s, rss = run_once(config, seed, extra, args.work / name)
            for kind in ("log", "final"):
                shutil.copyfile(args.work / name / f"{kind}.csv", args.results / f"{name}_{kind}.csv")
            record = run_record(config, seed, read_csv(args.work / name / "log.csv"),
                                read_csv(args.work / name / "final.csv"), cmd, cpu_s, rss)
            runs.append(record)
            write_csv(runs, runs_path, RUN_COLUMNS)
            print(f"  final test accuracy {record['final_test_acc']:.4f}, {cpu_s:.0f} s CPU", flush=True)
    summary = summarize(runs)
    write_csv(summary, args.results / "summary.csv", tuple(summary[0]))
    table = markdown(summary)
    (args.results / "summary.md").write_text(
        f"{table}\n\nMeasured {_dt.date.today().isoformat()} on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}).\n")
    print(table)
    return summary


if __name__ == "__main__":
    main()
