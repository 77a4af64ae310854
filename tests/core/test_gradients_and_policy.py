"""Which tensors get gradients, the precision policy, statistics and the float16 guard."""

from __future__ import annotations

import pytest
import torch

from mpnode.core import NonFiniteGradientError, SolverStats, odeint

torchdiffeq = pytest.importorskip("torchdiffeq")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_frozen_parameters_are_skipped(mlp_field):
    mlp_field.hidden[0].weight.requires_grad_(False)
    y0 = torch.randn(3, 4, requires_grad=True)
    t = torch.linspace(0, 1, 6)
    odeint(mlp_field, y0, t, method="rk4")[-1].pow(2).sum().backward()
    ours = [p.grad.clone() for p in mlp_field.parameters() if p.requires_grad]
    assert mlp_field.hidden[0].weight.grad is None
    mlp_field.zero_grad(set_to_none=True)
    torchdiffeq.odeint(mlp_field, y0, t, method="rk4")[-1].pow(2).sum().backward()
    ref = [p.grad for p in mlp_field.parameters() if p.requires_grad]
    assert all(_rel(a, b) < 1e-5 for a, b in zip(ours, ref))


def test_closure_with_adjoint_params_including_a_non_leaf():
    torch.manual_seed(0)
    W = torch.randn(4, 4, requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    y0 = torch.randn(2, 4)
    t = torch.linspace(0, 1, 9)
    grads = []
    for solve, kwargs in ((odeint, {"adjoint_params": None}), (torchdiffeq.odeint, {})):
        A = scale * (W - W.T)  # non-leaf captured tensor
        if "adjoint_params" in kwargs:
            kwargs["adjoint_params"] = (A,)
        out = solve(lambda t, y, A=A: torch.tanh(y @ A), y0, t, method="rk4", **kwargs)
        grads.append(torch.autograd.grad(out[-1].sum(), (W, scale)))
    (gW, gs), (rW, rs) = grads
    assert _rel(gW, rW) < 1e-5 and _rel(gs, rs) < 1e-5


def test_loss_on_intermediate_outputs_only(mlp_field):
    y0 = torch.randn(3, 4, requires_grad=True)
    t = torch.linspace(0, 2, 5)
    grads = []
    for solve in (odeint, torchdiffeq.odeint):
        out = solve(mlp_field, y0, t, method="rk4", options={"step_size": 0.1})
        grads.append(torch.autograd.grad(out[1:3].pow(2).sum(), (y0, *mlp_field.parameters())))
    assert all(_rel(a, b) < 1e-5 for a, b in zip(*grads))


def test_float64_state_with_float32_times(mlp_field):
    f = mlp_field.double()
    y0 = torch.randn(3, 4, dtype=torch.float64)
    out = odeint(f, y0, torch.linspace(0, 1, 4), method="rk4")
    assert out.dtype == torch.float64 and out.shape == (4, 3, 4)


def test_statistics_are_counted(mlp_field):
    stats = SolverStats()
    y0 = torch.randn(3, 4, requires_grad=True)
    out = odeint(mlp_field, y0, torch.linspace(0, 1, 11), method="heun3", options={"stats": stats})
    assert (stats.steps, stats.nfe_forward, stats.nfe_backward) == (10, 30, 0)
    out.sum().backward()
    assert (stats.nfe_backward, stats.backward_steps, stats.retries) == (30, 10, 0)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_precision_policy(precision, amp, device):
    """State, outputs and gradient sums in float32; the network in low precision; low checkpoints."""
    low = {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, t, y):
            h = self.lin(y)
            seen.append((t.dtype, y.dtype, h.dtype))
            return h

    f = Probe().to(device)
    y0 = torch.randn(3, 4, device=device, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: packed.append(x.dtype) or x, lambda x: x):
        with amp(precision):
            out = odeint(f, y0, torch.linspace(0, 1, 5, device=device), method="rk4", scaler=False)
    assert out.dtype == torch.float32
    assert set(seen) == {(torch.float32, torch.float32, low)}
    assert low in packed  # the checkpoints
    out[-1].sum().backward()
    assert f.lin.weight.dtype == torch.float32 and f.lin.weight.grad.dtype == torch.float32
    assert y0.grad.dtype == torch.float32
    # autocast on y0's device was honoured: the result differs from a float32 solve
    with torch.no_grad():
        ref = odeint(f, y0, torch.linspace(0, 1, 5, device=device), method="rk4")
    assert 0 < float((out.detach() - ref).abs().max()) < 0.05


def test_float16_overflow_without_scaler_raises_and_writes_no_gradient(mlp_field, amp, device):
    f = mlp_field.to(device)
    y0 = torch.randn(3, 4, device=device, requires_grad=True)
    with amp("float16"):
        out = odeint(f, y0, torch.linspace(0, 1, 5, device=device), method="rk4", scaler=False)
        loss = 1e30 * out[-1].sum()  # the adjoint seed overflows float16
    before = [p.detach().clone() for p in f.parameters()]
    with pytest.raises(NonFiniteGradientError, match="mpnode-scaler"):
        loss.backward()
    assert all(p.grad is None for p in f.parameters()) and y0.grad is None
    assert all(torch.equal(a, b) for a, b in zip(before, f.parameters()))
