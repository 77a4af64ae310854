"""One step evaluated with autograd on, from leaf inputs: what every adjoint strategy differentiates.

The recompute and segmented strategies build it in backward from a stored start
state; the direct strategy builds it during the forward pass and keeps it.  The
result is a [`StepGraph`][mpnode.core.contracts.StepGraph].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .contracts import Problem, StepGraph
from .rk import StagePerturbation, first_stage_time, rk_stages, traced_stage_times, weighted_sum, with_traced_step


@dataclass
class FirstStageGraph:
    """A step's first stage evaluated with autograd on before the step itself (the adaptive march needs it to size
    the step): the step's graph starts from these leaves instead of evaluating the stage a second time.

    Attributes:
        y: the step's start state, a leaf ``(D,)`` in the state dtype.
        t0: the step's first node as a leaf (0-dim, grid dtype) when times are traced, else ``None``.
        k: ``f`` at the first stage's time and ``y``, with its graph ``(D,)``.
    """

    y: torch.Tensor
    t0: torch.Tensor | None
    k: torch.Tensor


def evaluate_first_stage(problem: Problem, y: torch.Tensor, t0: torch.Tensor, perturbation: StagePerturbation,
                         need_times: bool) -> FirstStageGraph:
    """Evaluate the first stage of a step from node ``t0`` (0-dim, grid dtype) and ``y`` with autograd on, from leaves.

    Call inside ``torch.enable_grad()`` and the solve's autocast; hand the result to
    [`evaluate_step`][mpnode.core.graphs.evaluate_step] as ``start`` (for every attempt of the step).
    """
    y = y.detach().to(problem.policy.state_dtype).requires_grad_(True)
    node = t0.detach().requires_grad_(True) if need_times else t0.detach()
    k = problem.field(first_stage_time(node, problem.policy.state_dtype, perturbation), y)
    return FirstStageGraph(y, node if need_times else None, k)


def evaluate_step(
    problem: Problem,
    y: torch.Tensor,
    first: torch.Tensor | None,
    h: float,
    nodes: tuple[torch.Tensor, torch.Tensor],
    perturbation: StagePerturbation,
    stage_times: Sequence[torch.Tensor] | None,
    need_times: bool,
    with_end_slope: bool,
    start: FirstStageGraph | None = None,
) -> StepGraph:
    """Evaluate one step from ``y`` (and an inherited ``first`` stage) with autograd on, as leaves.

    Call inside ``torch.enable_grad()`` and the solve's autocast.  ``nodes`` are the
    step's ``(tau_n, tau_{n+1})`` (0-dim, grid dtype); ``stage_times`` the step's row
    of the stage-time table, ignored when ``need_times`` (the times are then traced
    from leaf copies of ``nodes``).  ``start``: the step's first stage already
    evaluated from ``y`` ([`evaluate_first_stage`][mpnode.core.graphs.evaluate_first_stage]; ``first`` is then
    ``None``), whose leaves the graph shares.
    """
    tab, state_dtype = problem.tableau, problem.policy.state_dtype
    y = y.detach().to(state_dtype).requires_grad_(True) if start is None else start.y
    first = None if first is None else first.detach().to(state_dtype).requires_grad_(True)
    t0 = t1 = h_traced = None
    if need_times:
        t0 = nodes[0].detach().requires_grad_(True) if start is None else start.t0
        assert t0 is not None, "a first stage evaluated for traced times has its node"
        t1 = nodes[1].detach().requires_grad_(True)
        h_traced = t1 - t0
        stage_times = traced_stage_times(tab, t0, t1, state_dtype, perturbation)
    assert stage_times is not None, "stage_times are given unless the times are traced"
    k1 = first if start is None else start.k
    stages = rk_stages(tab, problem.field, y, h, stage_times, first_stage=k1, h_traced=h_traced)
    phi = weighted_sum(tab.b, stages.ks)
    graph = StepGraph(y, first, t0, t1, h, h_traced, stages, phi, fsal=tab.is_fsal)
    if with_end_slope:
        attach_end_slope(problem, graph, nodes[1])
    return graph


def end_state(graph: StepGraph) -> torch.Tensor:
    """``y_{n+1}`` with its graph (the last stage's input for first-same-as-last methods).

    The arithmetic of [`step_end`][mpnode.core.rk.step_end], plus the traced step's zero-valued term.
    """
    if graph.fsal:
        return graph.stages.last_input
    y1 = torch.add(graph.y, graph.phi, alpha=graph.h)
    return y1 if graph.h_traced is None else with_traced_step(y1, graph.h_traced, graph.phi)


def attach_end_slope(problem: Problem, graph: StepGraph, t1: torch.Tensor) -> None:
    """Set ``graph.end_slope = f(tau_{n+1}, y_{n+1})`` with its graph (call with autograd on, under the solve's
    autocast).

    ``t1`` is the step's end node (0-dim, grid dtype); the graph's traced ``t1`` is used instead when it has one.
    """
    t_end = graph.t1 if graph.t1 is not None else t1.detach()
    graph.end_slope = problem.field(t_end.to(problem.policy.state_dtype), end_state(graph))
