"""One step evaluated with autograd on, from leaf inputs: what every adjoint strategy differentiates.

The recompute and segmented strategies build it in backward from a stored start
state; the direct strategy builds it during the forward pass and keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .stepper import StagePerturbation, Stages, rk_stages, traced_stage_times, weighted_sum


@dataclass
class StepGraph:
    """One step built with autograd on, from leaf inputs, ready for VJPs.

    Attributes:
        y: the start state, a leaf ``(D,)`` in the state dtype.
        first: the first stage as an input leaf ``(D,)`` (inherited from the previous
            step), or ``None`` when the step evaluates it.
        t0, t1: the step's nodes as leaves (0-dim, grid dtype) when times are traced.
        h: the step size (host float, or ``t1 - t0``).
        stages: the stages (with their graph).
        phi: ``sum_i b_i k_i`` (with its graph).
        end_slope: ``f(tau_{n+1}, y_{n+1})`` when the output rule needs it, else ``None``.
    """

    y: torch.Tensor
    first: torch.Tensor | None
    t0: torch.Tensor | None
    t1: torch.Tensor | None
    h: float | torch.Tensor
    stages: Stages
    phi: torch.Tensor
    end_slope: torch.Tensor | None = None

    def leaves(self) -> list[torch.Tensor]:
        return [x for x in (self.y, self.first, self.t0, self.t1) if x is not None]

    def end_state(self) -> torch.Tensor:
        """``y_{n+1}`` with its graph (the last stage's input for first-same-as-last methods)."""
        return self.stages.last_input if self._fsal else _step(self.y, self.h, self.phi)

    _fsal: bool = False


def _step(y: torch.Tensor, h: float | torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    return torch.add(y, phi, alpha=h) if isinstance(h, float) else y + h.to(y.dtype) * phi


def evaluate_step(
    problem,
    y: torch.Tensor,
    first: torch.Tensor | None,
    h: float,
    nodes: tuple[torch.Tensor, torch.Tensor],
    perturbation: StagePerturbation,
    stage_times: Sequence[torch.Tensor] | None,
    need_times: bool,
    with_end_slope: bool,
) -> StepGraph:
    """Evaluate one step from ``y`` (and an inherited ``first`` stage) with autograd on, as leaves.

    Call inside ``torch.enable_grad()`` and the solve's autocast.  ``nodes`` are the
    step's ``(tau_n, tau_{n+1})`` (0-dim, grid dtype); ``stage_times`` the step's row
    of the stage-time table, ignored when ``need_times`` (the times are then traced
    from leaf copies of ``nodes``).  ``problem`` is the solve's
    :class:`~mpnode.core.march.Problem`.
    """
    tab, state_dtype = problem.tableau, problem.policy.state_dtype
    y = y.detach().to(state_dtype).requires_grad_(True)
    first = None if first is None else first.detach().to(state_dtype).requires_grad_(True)
    t0 = t1 = None
    step: float | torch.Tensor = h
    if need_times:
        t0 = nodes[0].detach().requires_grad_(True)
        t1 = nodes[1].detach().requires_grad_(True)
        step = t1 - t0
        stage_times = traced_stage_times(tab, t0, t1, state_dtype, perturbation)
    stages = rk_stages(tab, problem.field, y, step, stage_times, first_stage=first)
    phi = weighted_sum(tab.b, stages.ks)
    graph = StepGraph(y, first, t0, t1, step, stages, phi, _fsal=tab.is_fsal)
    if with_end_slope:
        attach_end_slope(problem, graph, nodes[1])
    return graph


def attach_end_slope(problem, graph: StepGraph, t1: torch.Tensor) -> None:
    """Set ``graph.end_slope = f(tau_{n+1}, y_{n+1})`` with its graph (call with autograd on, under the solve's autocast).

    ``t1`` is the step's end node (0-dim, grid dtype); the graph's traced ``t1`` is used instead when it has one.
    """
    t_end = graph.t1 if graph.t1 is not None else t1.detach()
    graph.end_slope = problem.field(t_end.to(problem.policy.state_dtype), graph.end_state())
