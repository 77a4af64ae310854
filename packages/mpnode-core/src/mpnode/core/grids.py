"""Fixed grids as objects: each rule validates its own option and builds the grid from ``t`` with autograd on, so
gradients w.r.t. grid nodes flow back to ``t``.

* [`OutputTimesGrid`][mpnode.core.grids.OutputTimesGrid]: the output times are the grid;
* [`StepSizeGrid`][mpnode.core.grids.StepSizeGrid]: ``t[0], t[0] +- h, ...`` ending exactly at ``t[-1]``
  (torchdiffeq's ``step_size``);
* [`ConstructedGrid`][mpnode.core.grids.ConstructedGrid]: a user ``grid_constructor(func, y0, t)``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import torch

from .meters import available_memory_bytes
from .validation import check_grid, check_number


class GridRule(abc.ABC):
    """A fixed grid built from the output times before the solve."""

    @abc.abstractmethod
    def build(self, func: Callable, y0: Any, t: torch.Tensor,
              t_host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grid, grid_host)``: the grid (1-D, ``t``'s dtype and device, differentiable in ``t``) and its host
        copy."""


class OutputTimesGrid(GridRule):
    """Steps between consecutive output times."""

    def build(self, func, y0, t, t_host):
        return t, t_host


class StepSizeGrid(GridRule):
    """``t[0], t[0] +- h, ...`` up to and ending exactly at ``t[-1]`` (torchdiffeq's rule).

    The number of nodes is ``ceil(|t[-1] - t[0]| / h + 1)``; the last node is
    ``t[-1]``.  Interior nodes that would land on or beyond ``t[-1]`` through
    roundoff are dropped so the grid stays strictly monotone.
    """

    #: Refuse grids with more steps than this before allocating anything.
    MAX_STEPS = 2**31 - 1

    def __init__(self, step_size: float) -> None:
        self.step_size = check_number("options['step_size']", step_size, hint="; the direction comes from t")

    def build(self, func, y0, t, t_host):
        sign = 1.0 if bool(t_host[-1] >= t_host[0]) else -1.0
        span = float((t_host[-1] - t_host[0]) * sign)
        n_nodes = math.ceil(span / self.step_size + 1)
        self._check_size(n_nodes, span, t, t_host, y0)
        offsets = torch.arange(0, n_nodes - 1, dtype=t_host.dtype) * (self.step_size * sign)
        keep = int(((offsets + t_host[0] - t_host[-1]) * sign < 0).sum())
        inner = offsets[:keep].to(t.device) + t[0]  # differentiable in t[0]
        grid = torch.cat([inner, t[-1:]])
        return grid, grid.detach().cpu()

    def _check_size(self, n_nodes: int, span: float, t: torch.Tensor, t_host: torch.Tensor, y0: Any) -> None:
        """Refuse, before allocating, a grid with too many steps or one that would not fit in memory.

        The grid takes ``n_nodes`` values on the host (while it is built) and on
        ``t``'s device; the message also states what training would keep (one
        checkpoint of the state per step, at most ``y0``'s dtype).
        """
        steps = n_nodes - 1
        grid_bytes = n_nodes * (t_host.element_size() + t.element_size())
        parts = (y0,) if isinstance(y0, torch.Tensor) else tuple(y0)
        checkpoint_bytes = steps * sum(p.numel() * p.element_size() for p in parts)
        available = available_memory_bytes(t.device)
        if steps <= self.MAX_STEPS and (available is None or grid_bytes <= available):
            return
        if available is None or steps > self.MAX_STEPS:
            limit = f"more than the {self.MAX_STEPS:,} steps a grid may have"
        else:
            limit = f"but only {_gib(available)} is available on {t.device}"
        raise ValueError(
            f"options['step_size'] = {self.step_size:g} over |t[-1] - t[0]| = {span:g} makes {steps:,} steps: the grid "
            f"alone needs {_gib(grid_bytes)} ({grid_bytes:,} bytes) and training keeps one checkpoint per step "
            f"({_gib(checkpoint_bytes)} more), {limit}; use a larger step_size"
        )


class ConstructedGrid(GridRule):
    """A user grid ``grid_constructor(func, y0, t)``: 1-D, ``t``'s dtype/device, from ``t[0]`` to ``t[-1]``,
    monotone."""

    def __init__(self, grid_constructor: Callable) -> None:
        if not callable(grid_constructor):
            raise TypeError("options['grid_constructor'] must be callable as grid_constructor(func, y0, t) -> grid")
        self.grid_constructor = grid_constructor

    def build(self, func, y0, t, t_host):
        grid = self.grid_constructor(func, y0, t)
        return grid, check_grid(grid, t, t_host)


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.3g} GiB"
