"""One step of a march: the single-step evaluation every loop calls.

[`take_step`][mpnode.core.step.take_step] evaluates one explicit Runge–Kutta step: without a graph, or (when the
[`Recorder`][mpnode.core.contracts.Recorder] keeps graphs) into a [`StepGraph`][mpnode.core.contracts.StepGraph]
built from leaf inputs, the march continuing on detached copies of its values.  The forward marches (fixed grid,
fixed steps until an event, adaptive) and the graph-free re-run of recorded steps
([`rerun`][mpnode.core.march.rerun]) all step through it, so every loop computes a step by one arithmetic path.

Around it: the first stage of an adaptive step, evaluated before the step
([`first_stage`][mpnode.core.step.first_stage]), and the outputs read off a step
([`interpolate`][mpnode.core.step.interpolate], [`StepInterpolant`][mpnode.core.step.StepInterpolant]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .contracts import Problem, Recorder, StepGraph
from .graphs import FirstStageGraph, attach_end_slope, end_state, evaluate_first_stage, evaluate_step
from .rk import StagePerturbation, Stages, first_stage_time, rk_stages, step_end, weighted_sum

#: The recorder of a march that keeps nothing (inference, a re-run of recorded steps).
KEEP_NOTHING = Recorder()


@dataclass
class Step:
    """One evaluated step: detached stages, ``phi = sum b_i k_i`` and ``y1`` for the march; its graph when the
    recorder keeps graphs (else ``None``)."""

    stages: Stages
    phi: torch.Tensor
    y1: torch.Tensor
    graph: StepGraph | None = None


def take_step(problem: Problem, recorder: Recorder, y: torch.Tensor, first: torch.Tensor | None, h: float,
              nodes: tuple[torch.Tensor, torch.Tensor], rule: StagePerturbation, times: Sequence[torch.Tensor],
              with_end_slope: bool = False, start: FirstStageGraph | None = None) -> Step:
    """Take one step of size ``h`` (host float) from ``y`` (flat, state dtype).

    ``first``: an inherited first stage (else it is evaluated); ``nodes``: the step's ``(tau_n, tau_{n+1})``
    (0-dim, grid dtype) and ``rule`` its stage-time perturbation, used when a graph traces the times; ``times``:
    the step's row of the stage-time table.  With graphs kept, ``with_end_slope`` evaluates
    ``f(tau_{n+1}, y_{n+1})`` into the graph and ``start`` is the step's first stage already evaluated into it
    ([`first_stage`][mpnode.core.step.first_stage]).
    """
    tab = problem.tableau
    if not recorder.keeps_graphs:
        stages = rk_stages(tab, problem.field, y, h, times, first_stage=first)
        phi = weighted_sum(tab.b, stages.ks)
        return Step(stages, phi, step_end(tab, y, h, stages, phi))
    with torch.enable_grad(), recorder.graph_context():
        graph = evaluate_step(problem, y, first, h, nodes, rule, times, recorder.need_times, with_end_slope, start)
    stages = Stages([k.detach() for k in graph.stages.ks], graph.stages.last_input.detach())
    return Step(stages, graph.phi.detach(), end_state(graph).detach(), graph)


def first_stage(problem: Problem, recorder: Recorder, node: torch.Tensor, y: torch.Tensor,
                rule: StagePerturbation) -> tuple[torch.Tensor, FirstStageGraph | None]:
    """``f`` at the first stage of a step from ``(node, y)`` (``node`` 0-dim, grid dtype), evaluated once (as
    torchdiffeq does): when graphs are kept it is evaluated into them and the step's graph starts from it
    (returned second, else ``None``)."""
    if not recorder.keeps_graphs:
        return problem.field(first_stage_time(node, problem.policy.state_dtype, rule), y), None
    with torch.enable_grad(), recorder.graph_context():
        start = evaluate_first_stage(problem, y, node, rule, recorder.need_times)
    return start.k.detach(), start


def interpolate(problem: Problem, y: torch.Tensor, h: float, step: Step, x: float,
                end_slope: torch.Tensor | None) -> torch.Tensor:
    """The output at ``tau_n + x h`` inside a step from ``y``: ``y + h Psi(x)`` by the problem's output rule."""
    return torch.add(y, problem.output_rule.increment(x, step.stages, step.phi, end_slope), alpha=h)


def end_slope(problem: Problem, t1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
    """``f(tau_{n+1}, y_{n+1})`` without a graph, for output rules that need it (cubic Hermite)."""
    return problem.field(t1.to(problem.policy.state_dtype), y1)


class StepInterpolant:
    """``x -> y_n + h Psi(x)`` of one step; the end slope a rule needs is evaluated once, when first needed.

    When the step's graph is kept (direct strategy), the end slope is evaluated into that graph, so the backward
    pass differentiates the output the forward returned.  ``t1``: the step's end node (0-dim, grid dtype), needed
    by rules with an end slope only.
    """

    def __init__(self, problem: Problem, recorder: Recorder, y: torch.Tensor, h: float, step: Step,
                 t1: torch.Tensor | None = None) -> None:
        self.problem, self.recorder, self.y, self.h, self.step, self.t1 = problem, recorder, y, h, step, t1
        self.slope: torch.Tensor | None = None

    def __call__(self, x: float) -> torch.Tensor:
        if self.problem.output_rule.needs_end_slope and self.slope is None:
            self.slope = self._end_slope()
        return interpolate(self.problem, self.y, self.h, self.step, x, self.slope)

    def _end_slope(self) -> torch.Tensor:
        graph = self.step.graph
        assert self.t1 is not None, "an output rule with an end slope needs the step's end node"
        if graph is None:
            return end_slope(self.problem, self.t1, self.step.y1)
        if graph.end_slope is None:  # not evaluated with the step (take_step's with_end_slope)
            with torch.enable_grad(), self.recorder.graph_context():
                attach_end_slope(self.problem, graph, self.t1)
        assert graph.end_slope is not None
        return graph.end_slope.detach()
