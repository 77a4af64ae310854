"""The experiment harness of the measurement scripts (``examples/modeleq_demo.py``,
``examples/adaptive_precision.py``), ``demos/`` and the benchmark runner.

One home for what every experiment script needs:

* command-line flags, from their home [`mpnode.models.cli`][mpnode.models.cli] (the training examples use
  it too): [`script_parser`][mpnode.models.cli.script_parser] (``--out``, ``--seed``, ``--smoke`` with its alias
  ``--quick``), [`add_device_flag`][mpnode.models.cli.add_device_flag],
  [`add_solver_flags`][mpnode.models.cli.add_solver_flags] (``--precision``, ``--odeint``, ``--device``),
  [`add_method_flags`][mpnode.models.cli.add_method_flags] (``--method``, ``--steps``, ``--rtol``, ``--atol``)
  with [`tolerance_kwargs`][mpnode.bench.experiment.tolerance_kwargs],
  [`add_number_flags`][mpnode.models.cli.add_number_flags] and [`setup`][mpnode.models.cli.setup];
* precision and solver by name: [`PRECISIONS`][mpnode.bench.experiment.PRECISIONS],
  [`autocast`][mpnode.bench.experiment.autocast], [`SOLVERS`][mpnode.bench.experiment.SOLVERS],
  [`solver`][mpnode.bench.experiment.solver], [`make_grad_scaler`][mpnode.bench.experiment.make_grad_scaler];
* output: [`CSVLog`][mpnode.bench.experiment.CSVLog] / [`write_csv`][mpnode.models.cli.write_csv],
  [`format_table`][mpnode.bench.experiment.format_table] / [`print_table`][mpnode.bench.experiment.print_table] (rich
  when installed, aligned plain text otherwise), [`progress`][mpnode.bench.experiment.progress] (a tqdm bar when
  installed, counts on stderr otherwise), [`pyplot`][mpnode.bench.experiment.pyplot] /
  [`save_figure`][mpnode.bench.experiment.save_figure] (matplotlib on its Agg backend),
  [`label_steps`][mpnode.bench.experiment.label_steps].

The training examples (``ode_demo.py``, ``cnf8g.py``, ...) do not use this module: each shows its own loop
with torch and mpnode only (their flags come from ``mpnode.models.cli``).  matplotlib, rich and tqdm are imported
only by the functions that use them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from mpnode.models import cli
from mpnode.models.cli import (
    add_device_flag,
    add_method_flags,
    add_number_flags,
    add_solver_flags,
    script_parser,
    setup,
    write_csv,
)

__all__ = [
    "PRECISIONS",
    "SOLVERS",
    "MPNODE_STRATEGIES",
    "autocast",
    "solver",
    "solver_unavailable",
    "make_grad_scaler",
    "script_parser",
    "add_device_flag",
    "add_solver_flags",
    "add_number_flags",
    "add_method_flags",
    "is_adaptive",
    "tolerance_kwargs",
    "setup",
    "CSVLog",
    "write_csv",
    "format_table",
    "plain_table",
    "print_table",
    "progress",
    "pyplot",
    "save_figure",
    "label_steps",
]

PRECISIONS: dict[str, torch.dtype | None] = {
    name: None if dtype == torch.float32 else dtype for name, dtype in cli.PRECISIONS.items()}
"""Precision name (those of [`mpnode.models.cli.PRECISIONS`][mpnode.models.cli.PRECISIONS]) -> autocast dtype
(``None``: float32, no autocast)."""

MPNODE_STRATEGIES: dict[str, str] = {
    "mpnode": "RecomputeAdjoint",
    "mpnode-direct": "DirectAdjoint",
    "mpnode-segmented": "SegmentedAdjoint",
    "mpnode-auto": "AutoAdjoint",
}
"""mpnode solver name -> the ``mpnode.core`` adjoint strategy class it runs with."""

SOLVERS = (*MPNODE_STRATEGIES, "torchdiffeq", "torchdiffeq-nocache", "torchdiffeq-adjoint", "torchode")
"""Solver names [`solver`][mpnode.bench.experiment.solver] knows; all share torchdiffeq's ``odeint`` calling convention.

``torchdiffeq-nocache`` is ``torchdiffeq.odeint`` meant to run under ``autocast(..., cache=False)``: the solver is the
same, the cast cache is the caller's. ``torchode`` is
[`mpnode.bench.peers.torchode_odeint`][mpnode.bench.peers.torchode_odeint] (states ``(batch, features)``).
"""


# ------------------------------------------------------------------ precision and solver


def autocast(precision: str, device: torch.device | str, cache: bool = True) -> contextlib.AbstractContextManager:
    """The autocast context of a precision name on ``device`` (a no-op for ``"float32"``).

    ``cache=False`` turns off autocast's weight-cast cache (``cache_enabled=False``):
    every evaluation then casts the weights anew, so each evaluation's weight
    gradient is converted to float32 before it is summed over the steps.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache)


def solver_unavailable(name: str) -> str | None:
    """Why solver ``name`` cannot run here (a package missing, with the fix), or ``None``."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {SOLVERS}")
    if name.startswith("torchdiffeq"):
        try:
            import torchdiffeq  # noqa: F401
        except ImportError:
            return "unavailable: pip install torchdiffeq"
    if name == "torchode":
        from .peers import torchode_unavailable

        return torchode_unavailable()
    return None


def solver(name: str, **strategy_options: Any) -> Callable[..., Any]:
    """The ``odeint``-like function of a solver name (see [`SOLVERS`][mpnode.bench.experiment.SOLVERS]).

    mpnode names run ``mpnode.core.odeint`` with the adjoint strategy of
    [`MPNODE_STRATEGIES`][mpnode.bench.experiment.MPNODE_STRATEGIES], built with ``strategy_options`` (e.g.
    ``checkpoint_dtype=torch.bfloat16``, ``budget_bytes=2**24`` for ``mpnode-auto``);
    plain ``"mpnode"`` without options is ``odeint`` itself.  The other names take no options.
    """
    reason = solver_unavailable(name)
    if reason is not None:
        raise ImportError(f"solver {name!r} is {reason}")
    if name in MPNODE_STRATEGIES:
        return _mpnode_solver(name, strategy_options)
    if strategy_options:
        raise TypeError(f"solver {name!r} takes no strategy options, got {sorted(strategy_options)}")
    if name == "torchode":
        from .peers import torchode_odeint

        return torchode_odeint
    import torchdiffeq

    return torchdiffeq.odeint_adjoint if name == "torchdiffeq-adjoint" else torchdiffeq.odeint


def _mpnode_solver(name: str, strategy_options: dict[str, Any]) -> Callable[..., Any]:
    import mpnode.core as core

    if name == "mpnode" and not strategy_options:
        return core.odeint
    strategy = getattr(core, MPNODE_STRATEGIES[name])(**strategy_options)
    return functools.partial(core.odeint, adjoint=strategy)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """``torch.amp.GradScaler`` for a training loop: enabled for float16 only (a pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "float16")


# ------------------------------------------------------------------ command line


def is_adaptive(method: str) -> bool:
    """Whether ``method`` (a name in ``mpnode.core.TABLEAUX``) chooses its own steps."""
    from mpnode.core import get_tableau

    return get_tableau(method).is_adaptive


def tolerance_kwargs(args: argparse.Namespace) -> dict[str, float]:
    """``rtol``/``atol`` for an adaptive ``args.method`` (either solver takes them), nothing for a fixed grid."""
    return dict(rtol=args.rtol, atol=args.atol) if is_adaptive(args.method) else {}


# ------------------------------------------------------------------ CSV


class CSVLog:
    """Rows written to a CSV file as they come (flushed after each one).

    The header is ``fieldnames``, or the first row's keys; ``None`` values are
    written as empty cells, keys outside the header are an error.
    """

    def __init__(self, path: Path, fieldnames: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.fieldnames = list(fieldnames) if fieldnames is not None else None
        self._file = None
        self._writer: csv.DictWriter | None = None

    def write(self, **row: Any) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self.fieldnames or list(row))
            self._writer.writeheader()
        self._writer.writerow(row)
        assert self._file is not None
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> CSVLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ tables


def format_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], *, width: int = 120,
                 left: Iterable[str] = ()) -> str:
    """Rows of strings as a table: rich's box table ``width`` characters wide when installed, else aligned
    plain text that wraps to the terminal's width (see [`plain_table`][mpnode.bench.experiment.plain_table]).

    Columns named in ``left`` are left-aligned, the others right-aligned (rich only).
    """
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return plain_table(title, header, rows, width=shutil.get_terminal_size((width, 24)).columns,
                           key=[h for h in header if h in set(left)])
    left = set(left)
    table = Table(title=title or None)
    for h in header:
        table.add_column(h, justify="left" if h in left else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(width=width, color_system=None, force_terminal=False)
    with console.capture() as captured:
        console.print(table)
    return captured.get().rstrip()


def plain_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], width: int = 10**9,
                key: Iterable[str] = ()) -> str:
    """Aligned plain text; a table wider than ``width`` characters is cut into blocks of columns that fit, one
    under the other, each repeating the ``key`` columns (e.g. problem and implementation) that name its rows."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    keep = [i for i, h in enumerate(header) if h in set(key)]
    blocks: list[list[int]] = [[]]
    used = sum(widths[i] + 2 for i in keep)
    for i in (i for i in range(len(header)) if i not in keep):
        if blocks[-1] and used + widths[i] > width:
            blocks.append([])
            used = sum(widths[k] + 2 for k in keep)
        blocks[-1].append(i)
        used += widths[i] + 2
    lines = [title] if title else []
    for n, block in enumerate(blocks):
        cols = keep + block
        line = "  ".join(header[i].ljust(widths[i]) for i in cols).rstrip()
        lines += ([""] if n else []) + [line, "-" * len(line)]
        lines += ["  ".join(r[i].ljust(widths[i]) for i in cols).rstrip() for r in rows]
    return "\n".join(lines)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], **kwargs: Any) -> None:
    """Print [`format_table`][mpnode.bench.experiment.format_table]."""
    print(format_table(title, header, rows, **kwargs))


T = TypeVar("T")


def progress(items: Sequence[T], desc: str, unit: str = "it") -> Iterator[T]:
    """Yield ``items``, showing progress on stderr: a tqdm bar when tqdm is installed, otherwise a
    ``desc: k/n`` line after every tenth of them (tqdm is optional)."""
    try:
        from tqdm import tqdm
    except ImportError:
        n = len(items)
        every = max(1, n // 10)
        for k, item in enumerate(items, 1):
            yield item
            if k % every == 0 or k == n:
                print(f"{desc}: {k}/{n} {unit}", file=sys.stderr, flush=True)
        return
    yield from tqdm(items, desc=desc, unit=unit)


# ------------------------------------------------------------------ figures


@functools.cache
def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (selected here, once, before pyplot loads)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("figures need matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_steps(ax, steps: Iterable[int]) -> None:
    """A base-2 log x axis with one plain-integer tick per step count in ``steps`` and no minor labels
    (matplotlib's default labels, ``3x10^1 4x10^1 ...``, overlap on a short axis)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ticks = sorted(set(steps))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(lambda x, _pos: f"{x:g}")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` and close it (frees its memory); returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)
