"""Results out: CSV and JSON files, a printed table, linear growth fits.

Every function takes the [`BenchRow`][mpnode.bench.runner.BenchRow] records of
[`mpnode.bench.runner`][mpnode.bench.runner].  The table uses rich when it is installed and
plain text otherwise ([`mpnode.bench.experiment.format_table`][mpnode.bench.experiment.format_table]).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .experiment import format_table, write_csv
from .runner import COLUMNS, STEP_AXES, BenchRow, ratio


def write_results_csv(rows: Sequence[BenchRow], path: Path) -> None:
    """One line per row, the columns of [`COLUMNS`][mpnode.bench.runner.COLUMNS] (``None`` as an empty cell)."""
    write_csv(path, (r.as_dict() for r in rows), COLUMNS)


def write_results_json(rows: Sequence[BenchRow], meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=1, default=str))


def read_results_json(path: Path) -> tuple[dict, list[BenchRow]]:
    """``(meta, rows)`` of a ``results.json`` written by `write_results_json`."""
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


def fmt_method(r: BenchRow) -> str:
    """``rk4``, or ``dopri5 1e-07/1e-09`` (method, rtol/atol) for adaptive rows."""
    return r.method if r.rtol is None else f"{r.method} {r.rtol:.0e}/{r.atol:.0e}"


def _syncs(r: BenchRow) -> str:
    return "-" if r.syncs_forward is None else f"{r.syncs_forward}/{r.syncs_backward}"


# (header, cell of a row, shown only when some row has a value)
_TABLE_COLUMNS: tuple[tuple[str, Callable[[BenchRow], str], bool], ...] = (
    ("problem", lambda r: r.problem, False),
    ("sizes", lambda r: r.sizes, False),
    ("method", lambda r: fmt_method(r) if r.method != "rk4" else "-", True),
    ("steps", lambda r: str(r.steps), False),
    ("impl", lambda r: r.impl, False),
    ("time", lambda r: fmt_time(r.time_s), False),
    ("±iqr", lambda r: fmt_time(r.time_spread_s), False),
    ("vs td", lambda r: fmt_ratio(r.time_vs_torchdiffeq), False),
    ("vs floor", lambda r: fmt_ratio(r.time_vs_floor), True),
    ("held", lambda r: fmt_bytes(r.held_bytes), False),
    ("held vs td", lambda r: fmt_ratio(r.held_vs_torchdiffeq, inverse=True), False),
    ("peak", lambda r: fmt_bytes(r.peak_bytes), False),
    ("syncs f/b", _syncs, False),
    ("nfe", lambda r: "-" if r.nfe is None else str(r.nfe), True),
    ("grad err", lambda r: fmt_err(r.grad_rel_err), False),
)
_FIRST_MEASURED = "time"  # an error row shows its message from this column on


def _table(rows: Sequence[BenchRow], columns) -> tuple[list[str], list[tuple[str, ...]]]:
    """Headers and cells; optional columns without any value are dropped, error rows carry their message."""
    keep = [c for c in columns if not c[2] or any(not r.error and c[1](r) != "-" for r in rows)]
    headers = [c[0] for c in keep]
    first = headers.index(_FIRST_MEASURED)
    cells = []
    for r in rows:
        if r.error:
            ident = [c[1](r) for c in keep[:first]]
            cells.append((*ident, "error: " + r.error[:60], *([""] * (len(keep) - first - 1))))
        else:
            cells.append(tuple(c[1](r) for c in keep))
    return headers, cells


def render_table(rows: Sequence[BenchRow], title: str = "") -> str:
    """The results table as text (rich when available); the method, floor and nfe columns appear where filled."""
    headers, cells = _table(rows, _TABLE_COLUMNS)
    return format_table(title, headers, cells, width=220, left=("problem", "sizes", "method", "impl"))


def _column(name: str, get) -> tuple:
    return (name, get, False)


_PROBLEM, _IMPL = _column("problem", lambda r: r.problem), _column("impl", lambda r: r.impl)
_TIME, _HELD = _column("time", lambda r: fmt_time(r.time_s)), _column("held", lambda r: fmt_bytes(r.held_bytes))
_GRAD = _column("grad err", lambda r: fmt_err(r.grad_rel_err))

_DIAL_COLUMNS = (
    _PROBLEM, _column("steps", lambda r: str(r.steps)), _IMPL, _TIME, _HELD,
    _column("time vs td", lambda r: fmt_ratio(r.time_vs_torchdiffeq)),
    _column("time vs floor", lambda r: fmt_ratio(r.time_vs_floor)), _GRAD,
)

_ADAPTIVE_COLUMNS = (
    _PROBLEM, _column("method", fmt_method), _IMPL,
    _column("accepted", lambda r: "-" if r.accepted_steps is None else str(r.accepted_steps)),
    _column("nfe", lambda r: "-" if r.nfe is None else str(r.nfe)), _TIME,
    _column("vs td", lambda r: fmt_ratio(r.time_vs_torchdiffeq)),
    _column("vs floor", lambda r: fmt_ratio(r.time_vs_floor)), _HELD, _GRAD,
)


def _render_axis(rows: Sequence[BenchRow], axis: str, columns, title: str, left: tuple[str, ...]) -> str:
    """The table of the rows of one sweep ``axis`` (empty string when there are none)."""
    selected = [r for r in rows if r.axis == axis]
    if not selected:
        return ""
    headers, cells = _table(selected, columns)
    return format_table(title, headers, cells, width=160, left=left)


def render_dial(rows: Sequence[BenchRow]) -> str:
    """The compact table of the ``dial`` cases (empty string when there are none)."""
    return _render_axis(rows, "dial", _DIAL_COLUMNS, "the time/memory dial (grad err vs torchdiffeq float32 on the "
                        "same grid, or vs mpnode float32 where torchdiffeq is not run)", ("problem", "impl"))


def render_adaptive(rows: Sequence[BenchRow]) -> str:
    """The table of the adaptive cases (empty string when there are none)."""
    title = ("adaptive steps (grad err vs a float64 dopri5 solve at rtol 1e-10, atol 1e-12; nfe: field "
             "calls of forward + backward)")
    return _render_axis(rows, "adaptive", _ADAPTIVE_COLUMNS, title, ("problem", "method", "impl"))


def dial_targets(rows: Sequence[BenchRow]) -> str:
    """Per dial case: direct vs torchdiffeq direct (issue target <= 1.05x) and segmented vs recompute
    (held <= 1/20, time <= 1.6x, gradients equal to 1e-6), float32; empty string without dial cases."""
    cases: dict[tuple, dict[str, BenchRow]] = {}
    for r in rows:
        if r.axis == "dial" and not r.error:
            cases.setdefault((r.problem, r.sizes, r.steps), {})[r.impl] = r
    lines = []
    for (problem, sizes, steps), by in cases.items():
        parts = []
        direct, rec, seg = by.get("mpnode-direct/float32"), by.get("mpnode/float32"), by.get("mpnode-segmented/float32")
        if direct is not None and direct.time_vs_torchdiffeq is not None:
            parts.append(f"direct time {direct.time_vs_torchdiffeq:.2f}x torchdiffeq direct (target <= 1.05)")
        if rec is not None and seg is not None:
            held = ratio(seg.held_bytes, rec.held_bytes)
            time = ratio(seg.time_s, rec.time_s)
            if held is not None:
                parts.append(f"segmented held {fmt_ratio(held, inverse=True)} of recompute (target <= 1/20)")
            if time is not None:
                parts.append(f"segmented time {time:.2f}x recompute (target <= 1.6)")
            if seg.grad_vs_mpnode_f32 is not None:
                parts.append(f"segmented gradient vs recompute {seg.grad_vs_mpnode_f32:.1e} relative (target <= 1e-6)")
        floors = [f"{label.split('/')[0]} {row.time_vs_floor:.2f}x" for label, row in by.items()
                  if row.precision == "float32" and row.time_vs_floor is not None]
        if floors:
            parts.append("vs the floor: " + ", ".join(floors))
        if parts:
            lines.append(f"  {problem} [{sizes}] {steps} steps: " + "; ".join(parts))
    return "dial targets (float32):\n" + "\n".join(lines) if lines else ""


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
    """Per (problem, sizes, impl) of the steps sweeps (``steps``, ``dial``): linear fits of time and held bytes
    vs steps (held bytes only where measured)."""
    groups: dict[tuple, list[BenchRow]] = {}
    for r in rows:
        if r.axis in STEP_AXES and not r.error:
            groups.setdefault((r.problem, r.sizes, r.axis, r.impl), []).append(r)
    out = []
    for (problem, sizes, _, impl), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.steps)
        if len(rs) < 2:
            continue
        entry = {"problem": problem, "sizes": sizes, "impl": impl, "steps": [r.steps for r in rs]}
        timed = [(r.steps, r.time_s) for r in rs if r.time_s is not None]
        if len(timed) >= 2:
            f = linear_fit([s for s, _ in timed], [v for _, v in timed])
            entry.update(time_slope_s=f.slope, time_intercept_s=f.intercept, time_r2=f.r2)
        held = [(r.steps, r.held_bytes) for r in rs if r.held_bytes is not None]
        if len(held) >= 2:
            f = linear_fit([s for s, _ in held], [v for _, v in held])
            entry.update(held_slope_bytes=f.slope, held_intercept_bytes=f.intercept, held_r2=f.r2)
        out.append(entry)
    return out


def render_growth(fits: Sequence[dict]) -> str:
    lines = ["growth with steps (least-squares line over the steps sweep):"]
    for f in fits:
        t = (f"time {f['time_slope_s'] * 1e3:.3f} ms/step (R^2 {f['time_r2']:.3f})" if "time_slope_s" in f
             else "time not measured")
        h = (f"held {fmt_bytes(f['held_slope_bytes'])}/step (R^2 {f['held_r2']:.4f})" if "held_slope_bytes" in f
             else "held not measured")
        lines.append(f"  {f['problem']} [{f['sizes']}] {f['impl']}: {t}; {h}, steps {f['steps']}")
    return "\n".join(lines)


# ------------------------------------------------------------------ the speed suite


def _own_float32(r: BenchRow, by: dict[str, BenchRow]) -> BenchRow | None:
    """The float32 row of ``r``'s own solver (the same strategy; torchdiffeq's for its cache-off variant)."""
    return by.get(f"{r.solver.replace('-nocache', '')}/float32")


def speedup_vs_own_float32(r: BenchRow, by: dict[str, BenchRow]) -> float | None:
    """The same solver's float32 time over ``r``'s (``> 1``: mixed precision is faster)."""
    own = _own_float32(r, by)
    return None if own is None or r.precision == "float32" else ratio(own.time_s, r.time_s)


def _speed_cases(rows: Sequence[BenchRow]) -> dict[tuple, dict[str, BenchRow]]:
    cases: dict[tuple, dict[str, BenchRow]] = {}
    for r in rows:
        if r.axis == "speed":
            cases.setdefault((r.problem, r.sizes, r.steps, r.method), {})[r.impl] = r
    return cases


def render_speed(rows: Sequence[BenchRow]) -> str:
    """The ``speed`` cases: time, ratios to torchdiffeq float32 and to the row's own float32, held memory,
    CUDA peak and the gradient error against float64, one block per case (empty string without speed rows)."""
    cases = _speed_cases(rows)
    if not cases:
        return ""
    headers = ["case", "impl", "time", "±iqr", "vs td fp32", "vs own fp32", "held", "held vs td", "peak",
               "grad err vs f64"]
    show_peak = any(r.peak_bytes for by in cases.values() for r in by.values())
    cells = []
    for (problem, sizes, steps, method), by in cases.items():
        case = f"{problem} ({sizes}), " + (f"{steps} rk4 steps" if method == "rk4" else f"{method}: {steps} steps")
        skipped: dict[str, list[str]] = {}  # one line per skip reason (a precision without fast kernels)
        for r in by.values():
            if r.error and r.error.startswith("skipped"):
                skipped.setdefault(r.error, []).append(r.impl)
            elif r.error:
                cells.append((case, r.impl, r.error[:110], "", "", "", "", "", "", ""))
                case = ""
            else:
                s = speedup_vs_own_float32(r, by)
                cells.append((case, r.impl, fmt_time(r.time_s), fmt_time(r.time_spread_s),
                              fmt_ratio(r.time_vs_torchdiffeq), "-" if s is None else f"{1 / s:.2f}x",
                              fmt_bytes(r.held_bytes), fmt_ratio(r.held_vs_torchdiffeq, inverse=True),
                              fmt_bytes(r.peak_bytes), fmt_err(r.grad_rel_err)))
                case = ""
        for reason, impls in skipped.items():
            cells.append((case, f"{len(impls)} {impls[0].split('/')[1].split('+')[0]} rows", reason, "", "", "", "",
                          "", "", ""))
            case = ""
    if not show_peak:
        k = headers.index("peak")
        headers = headers[:k] + headers[k + 1:]
        cells = [c[:k] + c[k + 1:] for c in cells]
    return format_table("speed: forward+backward time (medians of interleaved rounds), memory held for backward, "
                        "gradient error against float64 on the same grid", headers, cells, width=200,
                        left=("case", "impl"))


@dataclass(frozen=True)
class SpeedTarget:
    """``time(numerator) / time(denominator) <= bound`` in the ``speed`` case of ``problem`` whose sizes contain
    ``sizes`` (e.g. ``"width=512"``), on ``device_type``."""

    device_type: str
    problem: str
    sizes: str
    numerator: str
    denominator: str
    bound: float
    what: str


def _targets(device_type: str, problem: str, sizes: str, *rows: tuple[str, str, float, str]) -> list[SpeedTarget]:
    """One [`SpeedTarget`][mpnode.bench.report.SpeedTarget] per ``(numerator, denominator, bound, what)`` row."""
    return [SpeedTarget(device_type, problem, sizes, *row) for row in rows]


_OVERHEAD_BOUND = (
    ("mpnode/float32", "torchdiffeq/float32", 1.0, "overhead-bound field, the default no slower than torchdiffeq"),
    ("mpnode-direct/float32", "torchdiffeq/float32", 1.0, "overhead-bound field, direct no slower than torchdiffeq"),
)

SPEED_TARGETS = (
    *_targets("cpu", "mlp", "width=512",
              ("mpnode-direct/bfloat16", "torchdiffeq-nocache/bfloat16", 0.90,
               "direct beats the equally accurate peer (torchdiffeq bf16, cast cache off)"),
              ("mpnode/bfloat16", "torchdiffeq/float32", 0.45, "the default in bf16 vs torchdiffeq fp32"),
              ("mpnode/bfloat16", "mpnode-direct/bfloat16", 1.35, "recompute vs direct (the recompute floor is 4/3)")),
    *_targets("cpu", "conv", "",
              ("mpnode/bfloat16", "torchdiffeq/float32", 1.0, "the default in bf16 no slower than torchdiffeq fp32"),
              ("mpnode-direct/bfloat16", "torchdiffeq-nocache/bfloat16", 1.0,
               "direct bf16 no slower than torchdiffeq bf16 without the cast cache")),
    *_targets("cpu", "demo", "", *_OVERHEAD_BOUND),
    *_targets("cuda", "demo", "", *_OVERHEAD_BOUND),
)
"""The targets of issue 17 that are ratios of two rows (CPU, 1 thread; and the overhead-bound case on a GPU)."""
GPU_SPEEDUP_TARGET, GPU_PEAK_TARGET = 2.0, 0.5
"""On a GPU: each low precision of an mpnode strategy at least 2x faster than the same strategy in float32,
with at most half its CUDA peak, on the conv block and OT-Flow."""
GPU_TARGET_PROBLEMS_SPEED = ("conv", "otflow")


def _verdict(value: float | None, bound: float, below: bool = True) -> str:
    if value is None:
        return "not measured"
    return "met" if (value <= bound if below else value >= bound) else "MISSED"


def speed_targets(rows: Sequence[BenchRow], device_type: str) -> str:
    """Issue 17's targets on this device type, each with its measured ratio and met/MISSED; float16's standing;
    empty string without speed rows."""
    cases = _speed_cases(rows)
    if not cases:
        return ""
    lines = [f"speed targets ({device_type}; ratios of medians measured in this run):"]
    for t in SPEED_TARGETS:
        if t.device_type != device_type:
            continue
        for (problem, sizes, _, _), by in cases.items():
            if problem != t.problem or t.sizes not in sizes:
                continue
            num, den = by.get(t.numerator), by.get(t.denominator)
            value = None if num is None or den is None else ratio(num.time_s, den.time_s)
            why = next((r.error for r in (num, den) if r is not None and r.error), "")
            lines.append(f"  {problem} [{sizes}] {t.numerator} / {t.denominator}: "
                         + ("-" if value is None else f"{value:.2f}x") + f" (<= {t.bound:g}; {t.what}): "
                         + _verdict(value, t.bound) + (f" ({why.split(':')[0]})" if value is None and why else ""))
    if len(lines) == 1:
        lines.append("  (no target names these cases' sizes)")
    if device_type == "cuda":
        for (problem, sizes, _, _), by in cases.items():
            if problem not in GPU_TARGET_PROBLEMS_SPEED:
                continue
            for r in by.values():
                if r.solver.startswith("mpnode") and r.precision != "float32":
                    own = _own_float32(r, by)
                    s = speedup_vs_own_float32(r, by)
                    peak = None if own is None else ratio(r.peak_bytes, own.peak_bytes)
                    ok = _verdict(s, GPU_SPEEDUP_TARGET, below=False), _verdict(peak, GPU_PEAK_TARGET)
                    lines.append(f"  {problem} [{sizes}] {r.impl}: speed-up {fmt_ratio(s)} vs own float32 "
                                 f"(>= {GPU_SPEEDUP_TARGET:g}): {ok[0]}; CUDA peak {fmt_ratio(peak)} of own float32 "
                                 f"(<= {GPU_PEAK_TARGET:g}): {ok[1]}")
    header = len(lines)
    lines.append("float16 (mpnode default strategy, vs float32 and bfloat16 of the same case):")
    failed: dict[str, list[str]] = {}
    for (problem, sizes, _, _), by in cases.items():
        f16, f32, bf16 = by.get("mpnode/float16+scaler"), by.get("mpnode/float32"), by.get("mpnode/bfloat16")
        if f16 is None:
            continue
        if f16.error:
            failed.setdefault(f16.error, []).append(problem)
            continue
        vs32, vsbf = ratio(f16.time_s, f32.time_s if f32 else None), ratio(f16.time_s, bf16.time_s if bf16 else None)
        lines.append(f"  {problem} [{sizes}]: time {fmt_ratio(vs32)} of float32, {fmt_ratio(vsbf)} of bfloat16; "
                     f"grad err {fmt_err(f16.grad_rel_err)} (bfloat16 {fmt_err(bf16.grad_rel_err if bf16 else None)})"
                     + ("; slower than float32: do not use float16 here" if vs32 is not None and vs32 > 1 else ""))
    lines += [f"  {', '.join(problems)}: {error}" for error, problems in failed.items()]
    if len(lines) == header + 1:  # no float16 row in these cases
        lines.pop()
    return "\n".join(lines)
