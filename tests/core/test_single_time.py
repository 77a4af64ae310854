"""A single output time returns the initial state (torchdiffeq's rule), for tensor and tuple states."""

from __future__ import annotations

import pytest
import torch

from mpnode.core import odeint

torchdiffeq = pytest.importorskip("torchdiffeq")


def field(t, y):
    return -y


def tuple_field(t, state):
    x, s = state
    return -x, x.sum(-1) * s


@pytest.mark.torchdiffeq_row("single-time")
@pytest.mark.parametrize("method, options", [("rk4", None), ("dopri5", None), ("euler", {"step_size": 0.1})])
def test_tensor_state_returns_y0_with_a_leading_dimension(method, options):
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.7], dtype=torch.float64)
    out = odeint(field, y0, t, method=method, options=options)
    ref = torchdiffeq.odeint(field, y0, t, method=method, options=options)
    assert out.shape == ref.shape == (1, 3, 2)
    assert torch.equal(out, ref)
    assert out.data_ptr() != y0.data_ptr()  # a copy, as torchdiffeq's
    weights = torch.randn(1, 3, 2, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights).sum(), y0)
    assert torch.equal(grad, weights[0])


@pytest.mark.torchdiffeq_row("single-time")
def test_tuple_state_returns_each_part_with_a_leading_dimension():
    x0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0], dtype=torch.float64)
    x, s = odeint(tuple_field, (x0, s0), t, method="rk4")
    rx, rs = torchdiffeq.odeint(tuple_field, (x0, s0), t, method="rk4")
    assert x.shape == rx.shape == (1, 4, 3) and s.shape == rs.shape == (1, 4)
    assert torch.equal(x, rx) and torch.equal(s, rs)
    gx, gs = torch.autograd.grad(x.sum() + 2 * s.sum(), (x0, s0))
    assert torch.equal(gx, torch.ones_like(x0)) and torch.equal(gs, torch.full_like(s0, 2.0))


def test_single_time_still_validates_method_and_options():
    y0 = torch.randn(3)
    t = torch.tensor([0.0])
    with pytest.raises(ValueError, match="unknown method"):
        odeint(field, y0, t, method="rk5")
    with pytest.raises(ValueError, match="adaptive methods only"):
        odeint(field, y0, t, method="rk4", options={"first_step": 0.1})


def test_single_time_evaluates_nothing():
    calls = []

    def counted(t, y):
        calls.append(t)
        return -y

    out = odeint(counted, torch.ones(2), torch.tensor([1.0]))
    assert calls == [] and torch.equal(out, torch.ones(1, 2))
