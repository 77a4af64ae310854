"""CNF and OT-Flow: exact derivatives against brute-force autograd, Hutchinson's estimator,
and short trainings under autocast that lower the loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacrev, vmap

from mpnode.core import odeint
from mpnode.models.cnf import CNF, HyperNetField, MLPField, exact_divergence, hutchinson_divergence
from mpnode.models.otflow import OTPotential, generate, mmd, otflow_loss
from mpnode.models.toy_data import DATASETS, eight_gaussians_log_density, sample


def brute_trace(field, t, z):
    J = vmap(jacrev(lambda zz: field(t, zz[None])[0]))(z)
    return J.diagonal(dim1=1, dim2=2).sum(-1)


@pytest.mark.parametrize("field_cls", [HyperNetField, MLPField])
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
    field = MLPField(dim=3).double()
    z = torch.randn(1, 3, dtype=torch.float64).requires_grad_(True)
    t = torch.tensor(0.2, dtype=torch.float64)
    exact = float(brute_trace(field, t, z.detach())[0])
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
    cnf = CNF(MLPField(), divergence="hutchinson")
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


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_toy_data(name):
    x = sample(name, 2000, torch.Generator().manual_seed(0))
    assert x.shape == (2000, 2) and x.dtype == torch.float32
    assert float(x.mean(0).abs().max()) < 0.2 and 0.7 < float(x.std(0).min()) < 2.0
    with pytest.raises(ValueError, match="unknown toy data set"):
        sample("moons?", 3)


def test_eight_gaussians_log_density_integrates_to_one():
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    dens = eight_gaussians_log_density(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    assert abs(float(dens.sum() * (grid[1] - grid[0]) ** 2) - 1.0) < 1e-3
