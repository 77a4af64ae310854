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
