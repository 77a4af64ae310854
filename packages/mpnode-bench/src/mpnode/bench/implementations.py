"""The solvers being compared: mpnode at each precision, torchdiffeq direct and adjoint.

An :class:`Impl` turns a problem :class:`~mpnode.bench.problems.Instance` into
one forward+backward call: ``y_T`` from ``t = 0`` to ``1`` in ``steps`` fixed
RK4 (3/8 rule) steps, ``loss(y_T)``, ``loss.backward()``, all inside
``torch.autocast`` for a low precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from . import experiment
from .experiment import PRECISIONS, SOLVERS
from .problems import Instance


@dataclass(frozen=True)
class Impl:
    """One solver configuration.

    Attributes:
        solver: ``"mpnode"``, ``"torchdiffeq"`` (direct backprop through the steps) or
            ``"torchdiffeq-adjoint"`` (``odeint_adjoint``, continuous adjoint).
        precision: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (autocast dtype; the
            state ``y0`` is float32 in every case).
        checkpoint: mpnode only: ``checkpoint_dtype`` name (e.g. ``"bfloat16"``), or
            ``None`` for the default (the autocast dtype, else float32).
    """

    solver: str
    precision: str = "float32"
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {SOLVERS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {list(PRECISIONS)}")
        if self.checkpoint is not None and (self.solver != "mpnode" or self.checkpoint not in PRECISIONS):
            raise ValueError("checkpoint applies to the mpnode solver only and must be a precision name")

    @property
    def label(self) -> str:
        """``solver/precision`` plus ``+ckpt-<dtype>`` or ``+scaler`` where relevant."""
        out = f"{self.solver}/{self.precision}"
        if self.checkpoint is not None:
            out += f"+ckpt-{self.checkpoint}"
        if self.solver == "mpnode" and self.precision == "float16":
            out += "+scaler"
        return out

    @property
    def is_low_precision(self) -> bool:
        return self.precision != "float32"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return experiment.autocast(self.precision, device)

    def unavailable(self) -> str | None:
        """Why this implementation cannot run here (a missing package), or ``None``."""
        if self.solver.startswith("torchdiffeq"):
            try:
                import torchdiffeq  # noqa: F401
            except ImportError:
                return "torchdiffeq is not installed (pip install torchdiffeq)"
        return None

    def forward_fn(self, inst: Instance, steps: int, device: torch.device) -> Callable[[], torch.Tensor]:
        """A closure computing the loss (inside this implementation's autocast)."""
        solve = experiment.solver(self.solver)
        t = torch.tensor([0.0, 1.0], device=device)
        options: dict = {"step_size": 1.0 / steps}
        if self.checkpoint is not None:
            options["checkpoint_dtype"] = PRECISIONS[self.checkpoint] or torch.float32

        def forward() -> torch.Tensor:
            out = solve(inst.func, inst.y0, t, method="rk4", options=options)
            y_T = out[-1] if isinstance(out, torch.Tensor) else tuple(o[-1] for o in out)
            return inst.loss(y_T)

        return forward

    def step_fn(self, inst: Instance, steps: int, device: torch.device) -> Callable[[], torch.Tensor]:
        """A closure running forward and backward (gradients accumulate into ``inst.func``)."""
        forward = self.forward_fn(inst, steps, device)

        def step() -> torch.Tensor:
            with self.autocast(device):
                loss = forward()
                loss.backward()
            return loss

        return step


def parse_impl(text: str) -> Impl:
    """``"mpnode/bfloat16"``, ``"torchdiffeq-adjoint/float32"``, ``"mpnode/float32+ckpt-bfloat16"``."""
    solver, _, rest = text.partition("/")
    precision, _, extra = (rest or "float32").partition("+")
    checkpoint = None
    if extra.startswith("ckpt-"):
        checkpoint = extra[len("ckpt-") :]
    elif extra not in ("", "scaler"):
        raise ValueError(f"cannot parse implementation {text!r}; write solver/precision[+ckpt-<dtype>]")
    return Impl(solver, precision, checkpoint)
