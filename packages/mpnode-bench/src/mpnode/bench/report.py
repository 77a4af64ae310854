"""Results out: CSV and JSON files, a printed table, linear growth fits.

Every function takes the :class:`~mpnode.bench.runner.BenchRow` records of
:mod:`mpnode.bench.runner`.  The table uses rich when it is installed and
plain text otherwise (:func:`mpnode.bench.experiment.format_table`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .experiment import format_table, write_csv
from .runner import COLUMNS, BenchRow


def write_results_csv(rows: Sequence[BenchRow], path: Path) -> None:
    """One line per row, the columns of :data:`~mpnode.bench.runner.COLUMNS` (``None`` as an empty cell)."""
    write_csv(path, (r.as_dict() for r in rows), COLUMNS)


def write_results_json(rows: Sequence[BenchRow], meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=1, default=str))


def read_results_json(path: Path) -> tuple[dict, list[BenchRow]]:
    """``(meta, rows)`` of a ``results.json`` written by :func:`write_results_json`."""
    data = json.loads(Path(path).read_text())
    return data["meta"], [BenchRow.from_dict(r) for r in data["rows"]]


# ------------------------------------------------------------------ formatting


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def fmt_ratio(r: float | None, inverse: bool = False) -> str:
    if r is None or (isinstance(r, float) and math.isnan(r)):
        return "-"
    if inverse and r > 0:
        return f"1/{1 / r:.1f}"
    return f"{r:.2f}x"


def fmt_err(e: float | None) -> str:
    return "-" if e is None else f"{e:.1e}"


TABLE_HEADERS = ("problem", "sizes", "steps", "impl", "time", "±iqr", "vs td", "held", "held vs td",
                 "peak", "syncs f/b", "grad err")


def table_rows(rows: Iterable[BenchRow]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        if r.error:
            out.append((r.problem, r.sizes, str(r.steps), r.impl, "error: " + r.error[:60],
                        "", "", "", "", "", "", ""))
            continue
        syncs = "-" if r.syncs_forward is None else f"{r.syncs_forward}/{r.syncs_backward}"
        out.append((
            r.problem, r.sizes, str(r.steps), r.impl, fmt_time(r.time_s), fmt_time(r.time_spread_s),
            fmt_ratio(r.time_vs_torchdiffeq), fmt_bytes(r.held_bytes), fmt_ratio(r.held_vs_torchdiffeq, inverse=True),
            fmt_bytes(r.peak_bytes), syncs, fmt_err(r.grad_rel_err),
        ))
    return out


def render_table(rows: Sequence[BenchRow], title: str = "") -> str:
    """The results table as text (rich when available)."""
    return format_table(title, TABLE_HEADERS, table_rows(rows), width=200, left=("problem", "sizes", "impl"))


# ------------------------------------------------------------------ growth fits


@dataclass(frozen=True)
class LinearFit:
    """``y = intercept + slope * x`` by least squares, with its coefficient of determination."""

    slope: float
    intercept: float
    r2: float
    n: int


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    n = len(xs)
    if n < 2:
        raise ValueError("a linear fit needs at least two points")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx > 0 else 0.0
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return LinearFit(slope, intercept, r2, n)


def growth_with_steps(rows: Sequence[BenchRow]) -> list[dict]:
    """Per (problem, sizes, impl) of the ``steps`` sweeps: linear fits of time and held bytes vs steps."""
    groups: dict[tuple, list[BenchRow]] = {}
    for r in rows:
        if r.axis == "steps" and not r.error:
            groups.setdefault((r.problem, r.sizes, r.impl), []).append(r)
    out = []
    for (problem, sizes, impl), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.steps)
        if len(rs) < 2:
            continue
        entry = {"problem": problem, "sizes": sizes, "impl": impl, "steps": [r.steps for r in rs]}
        timed = [r for r in rs if r.time_s is not None]
        if len(timed) >= 2:
            f = linear_fit([r.steps for r in timed], [r.time_s for r in timed])
            entry.update(time_slope_s=f.slope, time_intercept_s=f.intercept, time_r2=f.r2)
        f = linear_fit([r.steps for r in rs], [r.held_bytes for r in rs])
        entry.update(held_slope_bytes=f.slope, held_intercept_bytes=f.intercept, held_r2=f.r2)
        out.append(entry)
    return out


def render_growth(fits: Sequence[dict]) -> str:
    lines = ["growth with steps (least-squares line over the steps sweep):"]
    for f in fits:
        t = (f"time {f['time_slope_s'] * 1e3:.3f} ms/step (R^2 {f['time_r2']:.3f})" if "time_slope_s" in f
             else "time not measured")
        lines.append(f"  {f['problem']} [{f['sizes']}] {f['impl']}: {t}; held "
                     f"{fmt_bytes(f['held_slope_bytes'])}/step (R^2 {f['held_r2']:.4f}), steps {f['steps']}")
    return "\n".join(lines)
