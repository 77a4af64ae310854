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
        return float((result[key].double().cpu() - reference[key].cpu()).norm() / reference[key].norm())

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


@pytest.mark.parametrize("case", ["adaptive", "fixed grid"])
@pytest.mark.parametrize("precision", ["float16"])
def test_the_scale_fits_the_gradient_of_an_output_inside_a_step(case, precision, amp, device):
    """The step holding the output the loss reads is seeded only with that output's gradient (the adjoint after
    it is still zero): the scale must come from that seed.  The state is small there (it decays to 1e-4 of y0, or
    starts at 1e-3), so at scale 1 the seed's VJP underflows in float16.  Measured dL/dA error against float64:
    3.3e-2 (adaptive) and 2.4e-2 (fixed grid) with the scale taken from the zero adjoint, 2.2e-3 and 4.2e-4 with it
    taken from the seed."""
    torch.manual_seed(0)
    A = (-3 * torch.eye(6) + 0.5 * torch.randn(6, 6)).to(device)
    y0 = torch.randn(4, 6, device=device)
    if case == "adaptive":  # dopri5 steps past T = 3 and interpolates
        t, kwargs, read = torch.tensor([0.0, 3.0]), dict(method="dopri5", rtol=1e-6, atol=1e-6), -1
    else:  # 0.33 lies inside a step of the grid; the solve goes on to 1, y0 is small instead
        y0 = y0 * 1e-3
        t, kwargs, read = torch.tensor([0.0, 0.33, 1.0]), dict(method="rk4", options={"step_size": 0.05}), 1

    def grad(dtype, autocast):
        weight = A.to(dtype).requires_grad_(True)
        with amp(precision) if autocast else torch.autocast(device.type, enabled=False):
            out = odeint(lambda t, y: torch.nn.functional.linear(y, weight), y0.to(dtype), t.to(device, dtype),
                         **kwargs)
            loss = 0.5 * out[read].float().pow(2).sum()
        return torch.autograd.grad(loss, weight)[0].double()

    ref = grad(torch.float64, autocast=False)
    low = grad(torch.float32, autocast=True)
    assert float((low - ref).norm() / ref.norm()) < 5e-3
