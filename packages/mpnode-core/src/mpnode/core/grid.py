"""Integration grids and where the requested output times fall on them.

The grid ``tau_0 .. tau_N`` is where steps are taken; the output times ``t``
are separate (torchdiffeq's fixed-grid semantics): an output that lands on a
grid node is that node's state, any other is linearly interpolated between
the two nodes around it.  The grid is built from ``t`` with autograd enabled,
so gradients with respect to grid nodes flow back to ``t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

GridConstructor = Callable[[Callable, torch.Tensor, torch.Tensor], torch.Tensor]


def grid_from_step_size(t: torch.Tensor, t_host: torch.Tensor, step_size: float) -> torch.Tensor:
    """``t[0], t[0] +- h, ...`` up to and ending exactly at ``t[-1]`` (torchdiffeq's rule).

    The number of nodes is ``ceil(|t[-1] - t[0]| / h + 1)``; the last node is
    replaced by ``t[-1]``.  Interior nodes that would land on or beyond
    ``t[-1]`` through roundoff are dropped so the grid stays strictly monotone.
    """
    sign = 1.0 if bool(t_host[-1] >= t_host[0]) else -1.0
    span = float((t_host[-1] - t_host[0]) * sign)
    n_nodes = int(math.ceil(span / step_size + 1))
    offsets = torch.arange(0, n_nodes - 1, dtype=t_host.dtype) * (step_size * sign)
    keep = int(((offsets + t_host[0] - t_host[-1]) * sign < 0).sum())
    inner = offsets[:keep].to(t.device) + t[0]  # differentiable in t[0]
    return torch.cat([inner, t[-1:]])


@dataclass(frozen=True)
class OutputPlan:
    """How each output time is read off the grid.

    Attributes:
        nodes: sorted grid indices whose states the solver must return.
        rows: for output ``j``, the row (in ``nodes``) of the node at or before ``t[j]``.
        interp: for output ``j``, whether it lies strictly between node ``rows[j]``
            and the next one (and is linearly interpolated).
    """

    nodes: tuple[int, ...]
    rows: tuple[int, ...]
    interp: tuple[bool, ...]
    left: tuple[int, ...]

    @property
    def is_identity(self) -> bool:
        """Outputs are exactly the returned nodes, in order."""
        return not any(self.interp) and self.rows == tuple(range(len(self.nodes)))


def plan_outputs(grid_host: torch.Tensor, t_host: torch.Tensor) -> OutputPlan:
    """Locate every ``t[j]`` on the grid, from host copies of both."""
    g = grid_host.tolist()
    ts = t_host.tolist()
    sign = 1.0 if g[-1] >= g[0] else -1.0
    left: list[int] = [0]
    interp: list[bool] = [False]
    j = 1
    for n in range(len(g) - 1):
        while j < len(ts) and sign * g[n + 1] >= sign * ts[j]:
            if ts[j] == g[n]:
                left.append(n)
                interp.append(False)
            elif ts[j] == g[n + 1]:
                left.append(n + 1)
                interp.append(False)
            else:
                left.append(n)
                interp.append(True)
            j += 1
    needed = set(left) | {n + 1 for n, i in zip(left, interp) if i}
    nodes = tuple(sorted(needed))
    index = {n: r for r, n in enumerate(nodes)}
    return OutputPlan(nodes, tuple(index[n] for n in left), tuple(interp), tuple(left))


def read_outputs(plan: OutputPlan, node_states: torch.Tensor, grid: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(len(t), D)`` outputs from the ``(len(plan.nodes), D)`` node states.

    Interpolated outputs use ``y_n + s (y_{n+1} - y_n)``,
    ``s = (t_j - tau_n) / (tau_{n+1} - tau_n)``, differentiable in ``t`` and ``tau``.
    """
    if plan.is_identity:
        return node_states
    out = []
    for j, (r, n, lin) in enumerate(zip(plan.rows, plan.left, plan.interp)):
        y_n = node_states[r]
        if lin:
            s = (t[j] - grid[n]) / (grid[n + 1] - grid[n])
            y_n = y_n + s.to(y_n.dtype) * (node_states[r + 1] - y_n)
        out.append(y_n)
    return torch.stack(out)
