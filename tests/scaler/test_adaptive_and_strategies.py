"""The dynamic scaler unchanged under adaptive steps and under every adjoint strategy."""

from __future__ import annotations

import pytest
import torch

from mpnode.core import DirectAdjoint, SegmentedAdjoint, SolverStats, odeint
from mpnode.core.testing import DynamicRangeODE
from mpnode.scaler import DynamicAdjointScaler


@pytest.mark.parametrize("precision", ["float16"])
def test_dopri5_under_float16_with_the_dynamic_scaler(precision, amp, device):
    """The adjoint spans many orders of magnitude (2.3e-4 down to 2.5e-11): unscaled float16 loses it.

    Compared with the same adaptive solve in float64; ``max_step`` bounds every step, so both take the same accepted
    steps and the difference is the precision (not dopri5's truncation error, ~1e-2 at tolerances float16 resolves).
    """
    problem = DynamicRangeODE()
    kwargs = dict(n_steps=1, method="dopri5", rtol=1e-3, atol=1e-8, device=device, options={"max_step": 0.01})
    reference = problem.solve(odeint, dtype=torch.float64, **kwargs)
    stats = SolverStats()
    with amp(precision):
        scaled = problem.solve(odeint, scaler=DynamicAdjointScaler(), **{**kwargs, "options": {"max_step": 0.01,
                                                                                              "stats": stats}})
        unscaled = problem.solve(odeint, scaler=False, **kwargs)

    def rel(result, key):
        return float(((result[key].double().cpu() - reference[key].cpu()).norm() / reference[key].norm()))

    assert stats.steps >= 100
    assert max(rel(scaled, k) for k in ("dy0", "dcoef")) <= 1e-2
    assert rel(unscaled, "dcoef") > 0.1  # the problem does need scaling


@pytest.mark.parametrize("strategy", [DirectAdjoint, lambda **kw: SegmentedAdjoint(checkpoints=10, **kw)])
@pytest.mark.parametrize("precision", ["float16"])
def test_every_strategy_takes_the_dynamic_scaler(strategy, precision, amp, device):
    problem = DynamicRangeODE()
    with amp(precision):
        result = problem.solve(odeint, n_steps=200, device=device, adjoint=strategy(scaling=DynamicAdjointScaler()))
    errors = problem.errors(result)
    assert max(errors[k] for k in ("dy0", "da", "db", "dc")) <= 1e-2, errors
