"""The command line the example scripts share: precision and solver choice, device, seed, output folder, sizes.

Every script in ``examples/`` takes ``--precision`` (the autocast dtype), ``--odeint`` (``mpnode``, or
``torchdiffeq`` for the comparison), ``--seed``, ``--out`` and ``--smoke`` (tiny sizes, the form the tests run;
``--quick`` is an alias); most take ``--device`` and a ``--method`` with its steps or tolerances.  This module
parses those flags and turns the two choices into objects; the model, the training loop, the autocast region and
the loss scaling stay in each script.  [`write_csv`][mpnode.models.cli.write_csv] writes their logs:

    parser = script_parser("my_script", "what it trains")
    add_solver_flags(parser)
    add_number_flags(parser, iters=300, lr=1e-2)
    args = parser.parse_args()
    device = setup(args)
    odeint = solver(args.odeint)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[args.precision], enabled=args.precision != "float32")

``mpnode.bench.experiment`` (the measurement scripts' harness) re-exports these functions.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PRECISIONS",
    "SOLVERS",
    "solver",
    "script_parser",
    "add_device_flag",
    "add_solver_flags",
    "add_method_flags",
    "add_number_flags",
    "setup",
    "write_csv",
]

PRECISIONS: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``--precision`` name -> the autocast dtype of the model (``float32``: autocast off)."""

SOLVERS: dict[str, str] = {"mpnode": "mpnode.core", "torchdiffeq": "torchdiffeq"}
"""``--odeint`` name -> the package whose functions run the ODE (both take torchdiffeq's calling convention)."""


def solver(name: str, function: str = "odeint") -> Callable[..., Any]:
    """``function`` (``"odeint"``, ``"odeint_event"`` or ``"odeint_adjoint"``) of the solver ``name``.

    ``solver("mpnode")`` is ``mpnode.core.odeint``; ``solver("torchdiffeq", "odeint_event")`` is
    ``torchdiffeq.odeint_event``.  A solver that is not installed ends the script with a message naming the
    ``pip install`` that fixes it (``SystemExit``); an unknown name or function is a ``ValueError``.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: choose one of {list(SOLVERS)}")
    try:
        module = importlib.import_module(SOLVERS[name])
    except ImportError as err:
        raise SystemExit(f"--odeint {name} needs {SOLVERS[name]}: pip install {SOLVERS[name]}") from err
    if not hasattr(module, function):
        raise ValueError(f"{SOLVERS[name]} has no function {function!r}: use odeint, odeint_event or odeint_adjoint")
    return getattr(module, function)


def script_parser(name: str, description: str) -> argparse.ArgumentParser:
    """A parser for ``<name>.py`` with the flags every script takes.

    ``--out`` (a ``Path``, default ``outputs/<name>``), ``--seed`` (default 0) and ``--smoke`` (alias
    ``--quick``): tiny sizes and counts, the form the tests run; each script applies them after parsing.
    """
    p = argparse.ArgumentParser(prog=f"{name}.py", description=description)
    p.add_argument("--out", type=Path, default=Path("outputs") / name, help="folder for the CSV files and figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", "--quick", dest="smoke", action="store_true",
                   help="tiny sizes and counts, for the tests (--quick is an alias)")
    return p


def add_device_flag(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--device`` (a torch device string; default ``cuda`` when available, else ``cpu``), with ``help``."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help=help)


def add_solver_flags(parser: argparse.ArgumentParser, what: str = "the vector field", device: bool = True) -> None:
    """``--precision`` (a name of [`PRECISIONS`][mpnode.models.cli.PRECISIONS]: the autocast dtype of ``what``),
    ``--odeint`` (a name of [`SOLVERS`][mpnode.models.cli.SOLVERS]) and, with ``device``, ``--device``."""
    parser.add_argument("--precision", choices=list(PRECISIONS), default="float32", help=f"autocast dtype of {what}")
    parser.add_argument("--odeint", choices=list(SOLVERS), default="mpnode",
                        help="which solver runs the ODE (torchdiffeq: the comparison)")
    if device:
        add_device_flag(parser)


def add_method_flags(parser: argparse.ArgumentParser, steps: int | None, rtol: float = 1e-5,
                     atol: float = 1e-7) -> None:
    """``--method`` (default ``rk4``): a fixed-grid method, with ``--steps`` (default ``steps``) unless ``steps``
    is ``None`` (the script's output times are then the grid), or an adaptive one with ``--rtol``/``--atol``."""
    parser.add_argument("--method", default="rk4",
                        help="fixed-grid (rk4, euler, midpoint, ...) or adaptive (dopri5, tsit5, "
                             "bosh3, ...) with --rtol/--atol")
    if steps is not None:
        parser.add_argument("--steps", type=int, default=steps, help="steps of a fixed-grid method")
    parser.add_argument("--rtol", type=float, default=rtol, help="relative tolerance of an adaptive method")
    parser.add_argument("--atol", type=float, default=atol, help="absolute tolerance of an adaptive method")


def add_number_flags(parser: argparse.ArgumentParser, **defaults: int | float) -> None:
    """One ``--name`` flag per keyword for a size, count or rate: a positive number typed like its default
    (``data_size=1000`` gives ``--data-size``, a positive int); ``--data-size 0`` is a usage error."""
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), type=_positive(type(default)), default=default)


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse ``type``: the text as ``kind``, which must be > 0."""

    def convert(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not a positive number")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in "invalid int value: 'x'"
    return convert


def setup(args: argparse.Namespace) -> torch.device:
    """Seed Python's and torch's generators with ``args.seed``, create the folder ``args.out``; return
    ``torch.device(args.device)`` (``cpu`` for a script without ``--device``)."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    return torch.device(getattr(args, "device", "cpu"))


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str] | None = None) -> None:
    """Write ``rows`` to the CSV file ``path``, creating its folder; no rows, no file.

    The header is ``fieldnames``, or the first row's keys; a ``None`` value is an empty cell and a key outside
    the header a ``ValueError``.
    """
    rows = list(rows)
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fieldnames or rows[0]))
        writer.writeheader()
        writer.writerows(rows)
