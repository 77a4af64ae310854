"""What every experiment script shares: command-line flags, precision, solver choice, logging.

Each example is run as ``python examples/<name>.py [--precision ...] [--odeint ...] ...``
and writes its CSV log and figures under ``--out`` (default ``outputs/<name>``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import random
from pathlib import Path
from typing import Any, Callable

import torch

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Flags common to all experiments; scripts add their own iteration counts."""
    p = argparse.ArgumentParser(prog=f"{name}.py", description=description)
    p.add_argument("--precision", choices=list(PRECISIONS), default="float32", help="autocast dtype of the vector field")
    p.add_argument("--odeint", choices=["mpnode", "torchdiffeq"], default="mpnode", help="which solver runs the ODE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs") / name, help="folder for the CSV log and figures")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and counts, for the test suite")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Seed every generator, create the output folder, return the device."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    return torch.device(args.device)


def autocast(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for ``--precision`` (a no-op for float32)."""
    dtype = PRECISIONS[args.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def solver(name: str) -> Callable[..., Any]:
    """``odeint`` of mpnode or torchdiffeq (same calling convention)."""
    if name == "mpnode":
        from mpnode.core import odeint
    else:
        from torchdiffeq import odeint
    return odeint


class CSVLog:
    """Append rows (dicts) to ``path``; the header is the first row's keys."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._writer = None
        self._file = None

    def write(self, **row: Any) -> None:
        if self._writer is None:
            self._file = self.path.open("w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=list(row))
            self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def print_table(title: str, header: list[str], cells: list[list[str]]) -> None:
    """Print rows of strings as a rich table, or as ``|``-separated text when rich is not installed."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for row in [header, *cells]:
            print(" | ".join(row))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right")
    for row in cells:
        table.add_row(*row)
    Console(width=120).print(table)


def profiled_train_step(device: torch.device, model: torch.nn.Module, opt: torch.optim.Optimizer,
                        grad_scaler: torch.amp.GradScaler, compute_loss: Callable[[], Any]):
    """One training iteration measured by ``mpnode.bench.profilers.profile`` (weights excluded from held bytes).

    ``compute_loss()`` runs the forward (call it under the autocast you want) and returns the loss or a
    ``(loss, extras)`` tuple; backward goes through ``grad_scaler``.  Returns ``(record, compute_loss() result)``.
    """
    from mpnode.bench.profilers import profile

    with profile(device, sync_count=False, exclude=list(model.parameters())) as rec:
        out = compute_loss()
        loss = out[0] if isinstance(out, tuple) else out
        opt.zero_grad(set_to_none=True)
        grad_scaler.scale(loss).backward()
        grad_scaler.step(opt)
        grad_scaler.update()
    return rec, out
