"""CNF: exact divergence against brute-force autograd, Hutchinson's estimator, agreement with
torchdiffeq, and short trainings under autocast that lower the loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacrev, vmap

from mpnode.core import odeint
from mpnode.models.cnf import CNF, HyperNetField, SoftplusMLPField, exact_divergence, hutchinson_divergence
from mpnode.models.toy_data import sample


def brute_trace(field, t, z):
    J = vmap(jacrev(lambda zz: field(t, zz[None])[0]))(z)
    return J.diagonal(dim1=1, dim2=2).sum(-1)


@pytest.mark.parametrize("field_cls", [HyperNetField, SoftplusMLPField])
def test_exact_divergence_matches_the_jacobian_trace(field_cls):
    torch.manual_seed(0)
    field = field_cls().double()
    z = torch.randn(6, 2, dtype=torch.float64)
    t = torch.tensor(0.7, dtype=torch.float64)
    dz, minus_div = CNF(field)(t, (z, torch.zeros(6, dtype=torch.float64)))
    assert torch.allclose(-minus_div, brute_trace(field, t, z), atol=1e-10, rtol=0)
    assert torch.allclose(dz, field(t, z), atol=1e-12)
    zz = z.clone().requires_grad_(True)
    assert torch.allclose(exact_divergence(field(t, zz), zz, False), brute_trace(field, t, z), atol=1e-10, rtol=0)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased(noise):
    torch.manual_seed(0)
    field = SoftplusMLPField(dim=3).double()
    z = torch.randn(1, 3, dtype=torch.float64).requires_grad_(True)
    t = torch.tensor(0.2, dtype=torch.float64)
    exact = float(brute_trace(field, t, z.detach())[0].detach())
    cnf = CNF(field, divergence="hutchinson", noise=noise)
    gen = torch.Generator().manual_seed(1)
    draws = []
    for _ in range(4000):
        eps = cnf.resample_noise(z, generator=gen)
        draws.append(float(hutchinson_divergence(field(t, z), z, eps, create_graph=False)[0]))
    draws = torch.tensor(draws, dtype=torch.float64)
    stderr = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - exact) <= 3 * stderr, (float(draws.mean()), exact, stderr)
    if noise == "rademacher":
        assert set(torch.unique(cnf.noise).tolist()) <= {-1.0, 1.0}


def test_hutchinson_requires_noise_and_keeps_it_fixed_along_the_solve():
    cnf = CNF(SoftplusMLPField(), divergence="hutchinson")
    x = torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="resample_noise"):
        cnf(torch.tensor(0.0), (x, torch.zeros(4)))
    eps = cnf.resample_noise(x).clone()
    odeint(cnf, (x, torch.zeros(4)), torch.tensor([0.0, 1.0]), options={"step_size": 0.25})
    assert torch.equal(cnf.noise, eps)


def test_cnf_gradients_match_torchdiffeq_in_float32():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    cnf = CNF(HyperNetField(width=8))
    x = torch.randn(16, 2)
    t = torch.tensor([0.0, 1.0])
    grads = []
    for solve in (odeint, torchdiffeq.odeint):
        lp = cnf.log_prob(x, solve, t, method="rk4", options={"step_size": 0.25})
        grads.append(torch.autograd.grad(lp.mean(), tuple(cnf.parameters())))
    for a, b in zip(*grads):
        assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-7


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_cnf_training_lowers_the_loss(precision, amp, device):
    torch.manual_seed(0)
    cnf = CNF(HyperNetField(width=16)).to(device)
    opt = torch.optim.Adam(cnf.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0.0, 1.0], device=device)
    fixed = sample("8gaussians", 256, gen).to(device)
    with torch.no_grad(), amp(precision):
        before = float(-cnf.log_prob(fixed, odeint, t, options={"step_size": 0.25}).mean())
    for _ in range(25):
        x = sample("8gaussians", 64, gen).to(device)
        with amp(precision):
            loss = -cnf.log_prob(x, odeint, t, options={"step_size": 0.25}).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad(), amp(precision):
        after = float(-cnf.log_prob(fixed, odeint, t, options={"step_size": 0.25}).mean())
    assert after < before - 0.5, (before, after)


# relative tolerance of a log-density / gradient against the float32 solve, per autocast dtype
# (a few units of each format's roundoff: 2^-8 for bfloat16, 2^-11 for float16)
REL_TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 3e-3}


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_cnf_log_prob_and_gradients_under_autocast_stay_close_to_float32(precision, amp, device):
    torch.manual_seed(0)
    cnf = CNF(HyperNetField(width=8)).to(device)
    x = sample("8gaussians", 32, torch.Generator().manual_seed(0)).to(device)
    t = torch.tensor([0.0, 1.0], device=device)
    params = tuple(cnf.parameters())

    def solve():
        lp = cnf.log_prob(x, odeint, t, options={"step_size": 0.25})
        return lp.detach(), torch.autograd.grad(lp.mean(), params)

    ref_lp, ref_g = solve()
    with amp(precision):
        lp, g = solve()
    assert lp.dtype == torch.float32, "the log-density must come back in the state's dtype"
    tol = REL_TOL[precision]
    assert float((lp - ref_lp).abs().max()) <= tol * float(ref_lp.abs().max())
    num = sum(float((a - b).norm()) ** 2 for a, b in zip(g, ref_g)) ** 0.5
    den = sum(float(b.norm()) ** 2 for b in ref_g) ** 0.5
    assert num <= tol * den, (precision, num / den)
