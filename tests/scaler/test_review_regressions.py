"""Regression tests for defects found in review of DynamicAdjointScaler: a missing init event when the
first scale is 1, a NaN loss gradient that used to shrink the learned target for good, and a failed pass
whose backoffs were counted but missing from the history.  CPU float16 autocast (float16 column)."""
import pytest
import torch

from mpnode.core import NonFiniteGradientError, odeint
from mpnode.scaler import DynamicAdjointScaler


def _setup():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    return net, tuple(net.parameters()), torch.randn(8, 4), torch.linspace(0, 1, 9)


def _grads(net, params, y0, t, scaler, weight, amp=True):
    with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
        out = odeint(lambda t, y: net(y), y0, t, method="rk4", adjoint_params=params, scaler=scaler)
        loss = (out[-1] * weight).sum()
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("precision", ["float16"])
def test_init_event_is_recorded_when_the_initial_scale_is_one(precision):
    net, params, y0, t = _setup()
    weight = torch.zeros(8, 4)
    weight[0, 0] = 200.0  # target 2^8: S = 2^floor(log2(256/200)) = 1
    scaler = DynamicAdjointScaler()
    _grads(net, params, y0, t, scaler, weight)
    assert [e.kind for e in scaler.history].count("init") == 1, scaler.history


@pytest.mark.parametrize("precision", ["float16"])
def test_a_nonfinite_loss_gradient_does_not_poison_later_passes(precision):
    net, params, y0, t = _setup()
    weight = torch.ones(8, 4)
    ref = _grads(net, params, y0, t, None, weight, amp=False)
    scaler = DynamicAdjointScaler()
    target = scaler.target
    for _ in range(3):  # e.g. three batches whose loss is NaN
        with pytest.raises(NonFiniteGradientError):
            _grads(net, params, y0, t, scaler, weight * float("nan"))
    got = _grads(net, params, y0, t, scaler, weight)
    err = max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref))
    assert err < 1e-2 and scaler.target == target, (err, scaler.target)


@pytest.mark.parametrize("precision", ["float16"])
def test_counters_and_history_agree_after_a_failed_pass(precision):
    net, params, y0, t = _setup()
    scaler = DynamicAdjointScaler(max_retries=2)
    with pytest.raises(NonFiniteGradientError):
        _grads(net, params, y0, t, scaler, torch.full((8, 4), float("nan")))
    assert scaler.counters["backoffs"] == sum(e.kind == "backoff" for e in scaler.history), (
        scaler.counters, scaler.history)
