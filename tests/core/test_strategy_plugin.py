"""A new adjoint strategy is one class: a test-only strategy that keeps its checkpoints on the host.

It subclasses ``mpnode.core.AdjointStrategy`` and says what it keeps (``keep``: a recorder of each accepted step's
start state, copied to the CPU in float64) and how it rebuilds a step's graph (``step_graph``, through
``BackwardSteps.rebuild``).  Its gradients must be the default strategy's, bitwise in float64, on fixed grids,
adaptive steps and a method that carries its first stage, with ``retain_graph=True`` twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from mpnode.core import AdjointStrategy, RecomputeAdjoint, SolverStats, odeint
from mpnode.core.backward import BackwardSteps
from mpnode.core.contracts import Kept, StepGraph, StoreSetup

F64 = torch.float64


class _HostRows(Kept):
    """Each accepted step's start state (and carried first stage) as a float64 row on the CPU."""

    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []
        self.firsts: dict[int, torch.Tensor] = {}

    def record(self, n: int, y: torch.Tensor, first_stage: torch.Tensor | None) -> None:
        self.states.append(y.detach().to("cpu", F64, copy=True))
        if first_stage is not None:
            self.firsts[n] = first_stage.detach().to("cpu", F64, copy=True)

    def finish(self):
        carried = sorted(self.firsts)
        tensors = [torch.stack(self.states), *(self.firsts[n] for n in carried)]

        def read(saved: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
            return saved[0], dict(zip(carried, saved[1:]))

        return tensors, read


class HostCheckpointAdjoint(AdjointStrategy):
    """Test-only: one float64 checkpoint per accepted step, kept on the host; backward rebuilds each step."""

    name = "host-checkpoints"

    def keep(self, setup: StoreSetup) -> Kept:
        return _HostRows()

    def start_state(self, saved, steps: BackwardSteps, n: int) -> torch.Tensor:
        return saved[0][n].to(steps.trajectory.grid.device)

    def step_graph(self, saved, steps: BackwardSteps, n: int, with_end_slope: bool) -> StepGraph:
        states, firsts = saved
        device = steps.trajectory.grid.device
        first = firsts[n].to(device) if n in firsts else None
        return steps.rebuild(n, states[n].to(device), first, with_end_slope)


class Field(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()

    def forward(self, t, y):
        return self.net(y) * torch.cos(t)


CASES = {
    "rk4-step_size-cubic": dict(method="rk4", options={"step_size": 0.1, "interp": "cubic"}),
    "dopri5": dict(method="dopri5", rtol=1e-6, atol=1e-8),
    "fehlberg2-carried-first-stage": dict(method="fehlberg2", rtol=1e-5, atol=1e-7),
}


def _gradients(adjoint: AdjointStrategy, case: str, device: str):
    field = Field().to(device)
    y0 = torch.tensor([0.5, -0.2, 0.1], dtype=F64, device=device, requires_grad=True)
    t = torch.tensor([0.0, 0.35, 1.0], dtype=F64, device=device, requires_grad=True)
    stats = SolverStats()
    kwargs = CASES[case]
    out = odeint(field, y0, t, adjoint=adjoint, **{**kwargs, "options": {**kwargs.get("options", {}), "stats": stats}})
    loss = (out ** 2).sum()
    grads = [torch.autograd.grad(loss, [y0, t, *field.parameters()], retain_graph=True) for _ in range(2)]
    return out.detach(), grads, stats


@pytest.mark.parametrize("case", list(CASES))
def test_a_strategy_in_one_class_gives_the_default_strategys_gradients(case, device):
    out, grads, stats = _gradients(HostCheckpointAdjoint(), case, device)
    ref_out, ref_grads, ref_stats = _gradients(RecomputeAdjoint(), case, device)
    assert torch.equal(out, ref_out)
    for again, ref in zip(grads, ref_grads):  # two backward passes through the retained graph
        assert all(torch.equal(a, b) for a, b in zip(again, ref))
    assert stats.last_adjoint == "host-checkpoints" and ref_stats.last_adjoint == "recompute"
    assert stats.nfe_backward == ref_stats.nfe_backward


def test_a_strategy_missing_keep_is_refused_when_made():
    class Incomplete(AdjointStrategy):
        pass

    with pytest.raises(TypeError, match="keep"):
        Incomplete()


class _ForgetsFirstStage(HostCheckpointAdjoint):
    """Drops the carried first stage (main: a silently wrong gradient, 1.6e-3 relative on adaptive_heun)."""

    def step_graph(self, saved, steps: BackwardSteps, n: int, with_end_slope: bool) -> StepGraph:
        return steps.rebuild(n, saved[0][n].to(steps.trajectory.grid.device), None, with_end_slope)


class _InventsFirstStage(HostCheckpointAdjoint):
    """Passes a first stage for steps that evaluate their own (would replace f(t_n, y_n) by another tensor)."""

    def step_graph(self, saved, steps: BackwardSteps, n: int, with_end_slope: bool) -> StepGraph:
        y = saved[0][n].to(steps.trajectory.grid.device)
        return steps.rebuild(n, y, torch.zeros_like(y), with_end_slope)


class _IgnoresEndSlope(HostCheckpointAdjoint):
    def step_graph(self, saved, steps: BackwardSteps, n: int, with_end_slope: bool) -> StepGraph:
        return super().step_graph(saved, steps, n, False)


class _ReturnsATensor(HostCheckpointAdjoint):
    def step_graph(self, saved, steps: BackwardSteps, n: int, with_end_slope: bool) -> StepGraph:
        return saved[0][n]


@pytest.mark.parametrize("strategy, case, error, match", [
    (_ForgetsFirstStage, "fehlberg2-carried-first-stage", ValueError,
     r"_ForgetsFirstStage: steps.rebuild\(n=\d+, ...\) got first=None, but this step's first stage was carried.*"
     r"saved.first_stage\(n\)"),
    (_InventsFirstStage, "dopri5", ValueError, r"got first=a tensor, but this step evaluates its own.*first=None"),
    (_IgnoresEndSlope, "rk4-step_size-cubic", TypeError,
     r"_IgnoresEndSlope.step_graph\(saved, steps, n=\d+, with_end_slope=True\) returned a graph without the end "
     r"slope.*steps.rebuild\(n, y, first, with_end_slope\)"),
    (_ReturnsATensor, "dopri5", TypeError, r"_ReturnsATensor.step_graph returned Tensor for step \d+; it must return "
     r"a StepGraph"),
], ids=["first-none-for-carried", "first-for-evaluated", "ignores-with_end_slope", "returns-a-tensor"])
def test_a_strategy_breaking_the_step_graph_contract_is_refused(strategy, case, error, match, device):
    """What a user strategy can get wrong in ``step_graph`` raises naming the fix, before any gradient is written
    (main: a silently wrong gradient for a dropped carried first stage, a bare AssertionError under cubic outputs,
    a TypeError under ``python -O``)."""
    with pytest.raises(error, match=match):
        _gradients(strategy(), case, device)
