"""Outputs read off a step's interpolant (adaptive methods, ``interp="cubic"``) under the dynamic scaler.

Issue 15 item 4: such an output seeds its step's backward like a node output does, scaled, so a small loss
gradient does not underflow in float16; item 8: an inf/NaN arriving there is named, not retried.
"""

from __future__ import annotations

import pytest
import torch

from mpnode.core import NonFiniteGradientError, odeint
from mpnode.scaler import DynamicAdjointScaler

METHODS = {"dopri5": ("dopri5", None), "tsit5": ("tsit5", None),
           "rk4-cubic": ("rk4", {"step_size": 0.1, "interp": "cubic"})}


def _mlp(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(device)


def _float16_solve(net, device, name, t):
    method, options = METHODS[name]
    y0 = torch.randn(8, 4, device=device)
    with torch.autocast(device.type, dtype=torch.float16):
        return odeint(lambda t, y: net(y), y0, torch.tensor(t, device=device), method=method, options=options,
                      rtol=1e-3, atol=1e-3, scaler=DynamicAdjointScaler())


def _weight_grad(device, name, scale):
    net = _mlp(device)
    out = _float16_solve(net, device, name, [0.0, 0.7, 1.0])
    (out[1:].pow(2).sum() * scale).backward()
    return net[0].weight.grad / scale


@pytest.mark.parametrize("name", list(METHODS))
def test_float16_gradient_does_not_depend_on_the_loss_scale(name, device):
    """dL/dW / s is the same for s = 1 and s = 2^-27 (bitwise: a power of two) and 1e-8 (float16 rounding only);
    before the fix the last step ran unscaled and dL/dW / s moved by 0.1-0.5."""
    ref = _weight_grad(device, name, 1.0)
    assert ref.abs().max() > 0
    assert torch.equal(_weight_grad(device, name, 2.0**-27), ref)
    assert float((_weight_grad(device, name, 1e-8) - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("name", ["dopri5", "rk4-cubic"])
def test_float16_nonfinite_gradient_at_an_interpolated_output_is_named_not_retried(name, device):
    net = _mlp(device)
    out = _float16_solve(net, device, name, [0.0, 0.4, 1.0])
    with pytest.raises(NonFiniteGradientError, match=r"adjoint entering step \d+ of \d+ is already inf/NaN"):
        (out[1].sum() * float("nan") + out[-1].sum()).backward()
    assert all(p.grad is None for p in net.parameters())
