"""OT-Flow: gradient and Hessian trace of the potential against autograd, a short training
under autocast that lowers the loss, sample generation and the MMD metric."""

from __future__ import annotations

import math

import pytest
import torch

from mpnode.core import odeint
from mpnode.models.otflow import OTPotential, generate, mmd, otflow_loss
from mpnode.models.toy_data import sample


@pytest.mark.parametrize("dim, width, layers", [(2, 16, 2), (5, 8, 3)])
def test_otflow_gradient_and_trace_match_autograd(dim, width, layers):
    torch.manual_seed(0)
    P = OTPotential(dim, width, layers).double()
    with torch.no_grad():
        P.w.normal_()
        P.c.weight.normal_()
    s = torch.randn(7, dim + 1, dtype=torch.float64, requires_grad=True)
    grad, trace = P.grad_and_trace(s)
    (ref,) = torch.autograd.grad(P(s).sum(), s, create_graph=True)
    ref_trace = sum(torch.autograd.grad(ref[:, k].sum(), s, retain_graph=True)[0][:, k] for k in range(dim))
    assert torch.allclose(grad, ref, atol=1e-10, rtol=0)
    assert torch.allclose(trace, ref_trace, atol=1e-10, rtol=0)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_otflow_training_lowers_the_loss(precision, amp, device):
    torch.manual_seed(0)
    P = OTPotential(2, 16, 2).to(device)
    opt = torch.optim.Adam(P.parameters(), lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    fixed = sample("8gaussians", 256, gen).to(device)
    with torch.no_grad(), amp(precision):
        start, _ = otflow_loss(P, fixed, odeint, n_steps=4)
    for _ in range(30):
        with amp(precision):
            loss, _ = otflow_loss(P, sample("8gaussians", 64, gen).to(device), odeint, n_steps=4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad(), amp(precision):
        end, info = otflow_loss(P, fixed, odeint, n_steps=4)
    assert float(end) < 0.9 * float(start), (float(start), float(end))
    assert all(math.isfinite(v) for v in info.values())
    with torch.no_grad():
        xs = generate(P, torch.randn(256, 2, generator=gen).to(device), odeint, n_steps=4)
    assert xs.shape == (256, 2) and torch.isfinite(xs).all()


def test_mmd_separates_distributions():
    gen = torch.Generator().manual_seed(0)
    a, b = sample("8gaussians", 400, gen), sample("8gaussians", 400, gen)
    c = sample("checkerboard", 400, gen)
    assert mmd(a, b) < 0.2 * mmd(a, c)


# relative tolerance against the float32 solve, per autocast dtype (a few units of roundoff)
REL_TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 3e-3}


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_otflow_loss_and_gradients_under_autocast_stay_close_to_float32(precision, amp, device):
    torch.manual_seed(0)
    P = OTPotential(2, 8, 2).to(device)
    with torch.no_grad():
        P.w.normal_()  # a non-trivial ResNet term (w starts at zero)
    x = sample("8gaussians", 32, torch.Generator().manual_seed(0)).to(device)
    params = tuple(P.parameters())

    def solve():
        loss, parts = otflow_loss(P, x, odeint, n_steps=4)
        return loss.detach(), parts, torch.autograd.grad(loss, params)

    ref_loss, ref_parts, ref_g = solve()
    with amp(precision):
        loss, parts, g = solve()
    assert loss.dtype == torch.float32, "the loss must come back in the state's dtype"
    tol = REL_TOL[precision]
    assert abs(float(loss - ref_loss)) <= tol * abs(float(ref_loss))
    for key in ("L", "C", "R"):
        assert abs(parts[key] - ref_parts[key]) <= tol * (abs(ref_parts[key]) + 1.0), (key, parts, ref_parts)
    num = sum(float((a - b).norm()) ** 2 for a, b in zip(g, ref_g)) ** 0.5
    den = sum(float(b.norm()) ** 2 for b in ref_g) ** 0.5
    assert num <= tol * den, (precision, num / den)
