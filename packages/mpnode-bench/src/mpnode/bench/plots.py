"""Figures from benchmark rows (matplotlib through [`mpnode.bench.experiment.pyplot`][mpnode.bench.experiment.pyplot];
skipped when absent).

* ``ratios_<problem>_<axis>.png`` for each size sweep: time and held memory
  relative to torchdiffeq float32 (and, where timed, speed-up and CUDA peak
  relative to mpnode float32) against the swept size.
* ``steps_<problem>.png`` for each steps sweep: time and held memory against
  the number of steps, with the fitted slope and its unit (ms/step, KiB/step, ...) in the legend.
* ``dial_<problem>.png`` for each dial sweep: time against held memory (log-log),
  one marker per implementation, one point per step count (labelled ``N=...``),
  the points of one implementation joined in order of steps.
* ``speed.png`` for the ``speed`` suites: one panel per case, time relative to
  torchdiffeq float32 against held memory relative to it (log-log), colour =
  precision, marker = solver, each point labelled with its gradient error against
  float64: speed, memory and accuracy read together.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .experiment import label_steps, pyplot, save_figure
from .report import fmt_bytes, linear_fit
from .runner import BenchRow


def _series(rows: Sequence[BenchRow], x_of, key: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        value = getattr(r, key)
        if r.error or value is None:
            continue
        xs, ys = out.setdefault(r.impl, ([], []))
        xs.append(x_of(r))
        ys.append(value)
    for xs, ys in out.values():
        order = sorted(range(len(xs)), key=xs.__getitem__)
        xs[:] = [xs[i] for i in order]
        ys[:] = [ys[i] for i in order]
    return out


def _size_value(axis: str):
    def get(r: BenchRow) -> int:
        return int(dict(kv.split("=") for kv in r.sizes.split(","))[axis])

    return get


def plot_all(rows: Sequence[BenchRow], out_dir: Path, title: str = "") -> list[Path]:
    """Write every figure the rows allow; returns the written paths (empty without matplotlib)."""
    try:
        plt = pyplot()
    except ImportError as err:
        print(f"no plots: {err}")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sweeps: dict[tuple[str, str], list[BenchRow]] = {}
    for r in rows:
        if r.axis and r.axis != "base":
            sweeps.setdefault((r.problem, r.axis), []).append(r)
    speed_rows = [r for r in rows if r.axis == "speed"]
    if speed_rows:
        path = _plot_speed(plt, speed_rows, out_dir / "speed.png", title)
        if path is not None:
            written.append(path)
    for (problem, axis), rs in sorted(sweeps.items()):
        if axis in ("adaptive", "speed"):
            continue
        if axis == "dial":
            path = _plot_dial(plt, rs, out_dir / f"dial_{problem}.png", f"{title} {problem}".strip())
            if path is not None:
                written.append(path)
        elif axis == "steps":
            written.append(_plot_steps(plt, rs, out_dir / f"steps_{problem}.png", f"{title} {problem}".strip()))
        else:
            written.append(_plot_ratios(plt, rs, axis, out_dir / f"ratios_{problem}_{axis}.png",
                                        f"{title} {problem}".strip()))
    return written


def _plot_ratios(plt, rows, axis, path: Path, title: str) -> Path:
    x_of = _size_value(axis)
    panels = [("time_vs_torchdiffeq", "time / torchdiffeq float32"),
              ("held_vs_torchdiffeq", "held memory / torchdiffeq float32")]
    if any(r.peak_bytes for r in rows):
        panels += [("speedup_vs_mpnode_f32", "speed-up vs mpnode float32"),
                   ("peak_vs_mpnode_f32", "CUDA peak / mpnode float32")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6))
    for ax, (key, label) in zip(axes, panels):
        for impl, (xs, ys) in _series(rows, x_of, key).items():
            ax.plot(xs, ys, marker="o", label=impl)
        ax.set_xscale("log", base=2)
        if key.startswith(("held", "peak")):
            ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(axis)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path, dpi=110)


def _plot_steps(plt, rows, path: Path, title: str) -> Path:
    x_of = lambda r: r.steps  # noqa: E731
    # (row field, axis label, scale to the axis unit, text of the fitted slope per step, in the row's unit)
    panels = (("time_s", "time per forward+backward [ms]", 1e3, lambda s: f"{s * 1e3:.3g} ms/step"),
              ("held_bytes", "held for backward [MiB]", 2.0**-20, lambda b: f"{fmt_bytes(b)}/step"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, label, scale, slope_text) in zip(axes, panels):
        for impl, (xs, ys) in _series(rows, x_of, key).items():
            note = f" (slope {slope_text(linear_fit(xs, ys).slope)})" if len(xs) >= 2 else ""
            ax.plot(xs, [y * scale for y in ys], marker="o", label=impl + note)
        label_steps(ax, (r.steps for r in rows))
        ax.set_yscale("log")
        ax.set_xlabel("RK4 steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path, dpi=110)


_MARKERS = "osD^v<>ph*X"


def _plot_dial(plt, rows, path: Path, title: str) -> Path | None:
    """Time vs held bytes of every timed implementation and step count; ``None`` when nothing was timed."""
    points: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        if not r.error and r.time_s is not None and r.held_bytes:
            points.setdefault(r.impl, []).append((r.steps, r.held_bytes / 2**20, r.time_s))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for i, (impl, pts) in enumerate(sorted(points.items())):
        pts.sort()
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        line, = ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], ls="-", lw=0.8, ms=7, label=impl)
        for steps, x, y in pts:
            ax.annotate(f"N={steps}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7,
                        color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("held for backward [MiB]")
    ax.set_ylabel("forward+backward time [s]")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: time vs memory (one point per step count)")
    return save_figure(fig, path, dpi=110)


_PRECISION_COLOURS = {"float32": "tab:blue", "bfloat16": "tab:orange", "float16": "tab:green"}
_SOLVER_MARKERS = {"torchdiffeq": "s", "torchdiffeq-nocache": "D", "mpnode": "o", "mpnode-direct": "^",
                   "mpnode-segmented": "v"}


def _plot_speed(plt, rows, path: Path, title: str) -> Path | None:
    """One panel per speed case: time vs held memory relative to torchdiffeq float32, errors as labels."""
    cases: dict[tuple, list[BenchRow]] = {}
    for r in rows:
        if not r.error and r.time_vs_torchdiffeq is not None and r.held_vs_torchdiffeq:
            cases.setdefault((r.problem, r.sizes), []).append(r)
    if not cases:
        return None
    n = len(cases)
    cols = min(3, n)
    rows_ = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(max(5.2 * cols, 9.0), 4.2 * rows_ + 0.4), squeeze=False)
    for ax, ((problem, sizes), rs) in zip(axes.flat, cases.items()):
        for r in rs:
            ax.scatter(r.held_vs_torchdiffeq, r.time_vs_torchdiffeq, s=45, c=_PRECISION_COLOURS.get(r.precision, "k"),
                       marker=_SOLVER_MARKERS.get(r.solver, "x"))
            if r.grad_rel_err is not None:
                ax.annotate(f"{r.grad_rel_err:.0e}", (r.held_vs_torchdiffeq, r.time_vs_torchdiffeq),
                            textcoords="offset points", xytext=(4, 3), fontsize=6)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("held for backward / torchdiffeq float32")
        ax.set_ylabel("forward+backward time / torchdiffeq float32")
        ax.set_title(f"{problem} [{sizes}]", fontsize=8)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=p) for p, c in _PRECISION_COLOURS.items()]
    handles += [plt.Line2D([], [], ls="", marker=m, color="k", label=s) for s, m in _SOLVER_MARKERS.items()]
    axes.flat[0].legend(handles=handles, fontsize=6, loc="best")
    fig.suptitle(f"{title}: time vs memory held for backward (labels: gradient error vs float64)".strip(": "))
    return save_figure(fig, path, dpi=110)
