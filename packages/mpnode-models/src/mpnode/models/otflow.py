"""OT-Flow (Onken et al. 2021): a potential-based CNF with exact, cheap Hessian traces.

The velocity is ``v = -grad_x Phi(x, t)`` for the potential

    Phi(s) = w^T N(s) + 1/2 s^T (A^T A) s + c^T s + c0,    s = (x, t) in R^{d+1},

with ``N`` a ResNet ``u_0 = sigma(K_0 s + b_0)``, ``u_i = u_{i-1} + h sigma(K_i u_{i-1} + b_i)`` (``sigma = log cosh``,
so ``sigma' = tanh``, ``sigma'' = 1 - tanh^2``) and ``A`` of rank ``min(10, d+1)``.
[`OTPotential.grad_and_trace`][mpnode.models.otflow.OTPotential.grad_and_trace] returns ``grad_s Phi`` and ``tr(Hess_x
Phi)`` in one forward/backward sweep without autograd:

* backward sweep: ``z_{M-1} = w``, ``z_{i-1} = z_i + h K_i^T (tanh(a_i) * z_i)``,
  ``grad_s(w^T N) = K_0^T (tanh(a_0) * z_0)``;
* forward Jacobians ``J_0 = diag(tanh a_0) K_0[:, :d]``, ``J_i = J_{i-1} + h diag(tanh a_i) K_i J_{i-1}``;
* ``tr = sum_j sigma''(a_0)_j z_0j |K_0[j, :d]|^2 + h sum_{i>=1} sum_j sigma''(a_i)_j z_ij |(K_i J_{i-1})_j|^2
  + tr((A^T A)[:d, :d])``.

The dynamics integrate ``(x, l, L, R)``: ``dx/dt = -grad_x Phi``, ``dl/dt = -tr(Hess_x Phi)``
(log-determinant), ``dL/dt = 1/2 |grad_x Phi|^2`` (transport cost) and
``dR/dt = |d_t Phi - 1/2 |grad_x Phi|^2|`` (HJB penalty).  Traces and norms are
summed in the state's dtype (float32) even when autocast lowers the matmuls.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable

import torch
from torch import nn

from .cnf import standard_normal_log_prob


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """``log(cosh(x))`` computed stably as ``|x| + log1p(exp(-2|x|)) - log 2``."""
    ax = x.abs()
    return ax + torch.log1p(torch.exp(-2 * ax)) - math.log(2.0)


class OTPotential(nn.Module):
    """``Phi(x, t)`` of OT-Flow for ``x`` in ``R^d`` with a ResNet of ``n_layers`` layers of width ``width``."""

    def __init__(self, dim: int, width: int = 32, n_layers: int = 2, rank: int | None = None) -> None:
        super().__init__()
        if n_layers < 2:
            raise ValueError("n_layers must be >= 2 (an opening layer and at least one residual layer)")
        self.dim, self.width, self.n_layers = dim, width, n_layers
        self.h = 1.0 / (n_layers - 1)
        rank = min(10, dim + 1) if rank is None else rank
        self.opening = nn.Linear(dim + 1, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layers - 1))
        self.w = nn.Parameter(torch.zeros(width))
        self.A = nn.Parameter(0.1 * torch.randn(rank, dim + 1))
        self.c = nn.Linear(dim + 1, 1)
        nn.init.zeros_(self.c.weight)
        nn.init.zeros_(self.c.bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """``Phi(s)`` for ``s = (x, t)`` of shape ``(B, d+1)`` -> ``(B,)``."""
        u = log_cosh(self.opening(s))
        for layer in self.layers:
            u = u + self.h * log_cosh(layer(u))
        quad = 0.5 * ((s @ self.A.T) ** 2).sum(-1)
        return (u * self.w.to(u.dtype)).sum(-1) + quad + self.c(s).squeeze(-1)

    def _weight(self, i: int) -> torch.Tensor:
        """The weight of the ``i``-th residual layer."""
        layer = self.layers[i]
        assert isinstance(layer, nn.Linear)
        return layer.weight

    def grad_and_trace(self, s: torch.Tensor,
                       out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``grad_s Phi`` (``(B, d+1)``) and ``tr(Hess_x Phi)`` (``(B,)``), in ``out_dtype`` (default ``s``'s)."""
        out_dtype = out_dtype or s.dtype
        d, h = self.dim, self.h
        K0 = self.opening.weight
        a0 = self.opening(s)  # (B, m)
        acts, us = [a0], [log_cosh(a0)]
        for layer in self.layers:
            a = layer(us[-1])
            acts.append(a)
            us.append(us[-1] + h * log_cosh(a))
        tanhs = [torch.tanh(a) for a in acts]
        # backward sweep: z_i = d(w^T u_{M-1}) / d u_i
        z = self.w.to(us[-1].dtype).expand_as(us[-1])
        zs = [z]  # filled from the last layer back: zs[i] for i = len(acts) - 1 .. 0
        for i in range(len(self.layers), 0, -1):
            z = z + h * (tanhs[i] * z) @ self._weight(i - 1).to(z.dtype)
            zs.insert(0, z)
        grad = ((tanhs[0] * zs[0]) @ K0.to(z.dtype)).to(out_dtype)
        AtA = self.A.T.to(out_dtype) @ self.A.to(out_dtype)
        grad = grad + s.to(out_dtype) @ AtA + self.c.weight.to(out_dtype)
        # Hessian trace over x
        K0x = K0[:, :d]
        trace = ((1 - tanhs[0].to(out_dtype) ** 2) * zs[0].to(out_dtype)) @ (K0x.to(out_dtype) ** 2).sum(-1)
        J = tanhs[0].unsqueeze(-1) * K0x.to(tanhs[0].dtype)  # (B, m, d)
        for i in range(1, len(self.layers) + 1):
            KJ = torch.matmul(self._weight(i - 1).to(J.dtype), J)  # (B, m, d)
            weight = h * (1 - tanhs[i].to(out_dtype) ** 2) * zs[i].to(out_dtype)
            trace = trace + (weight * (KJ.to(out_dtype) ** 2).sum(-1)).sum(-1)
            J = J + h * tanhs[i].unsqueeze(-1) * KJ
        trace = trace + (AtA.diagonal()[:d]).sum()
        return grad, trace


class OTFlowDynamics(nn.Module):
    """``func(t, (x, l, L, R))`` for ``odeint``: OT-Flow's state and its right-hand side.

    ``x`` is ``(B, d)``; ``l`` (log-det), ``L`` (transport cost) and ``R`` (HJB penalty) are ``(B,)``.
    """

    def __init__(self, potential: OTPotential) -> None:
        super().__init__()
        self.potential = potential

    def forward(self, t: torch.Tensor, state):
        x = state[0]
        s = torch.cat([x, t.to(x.dtype).expand(x.shape[0], 1)], dim=1)
        grad, trace = self.potential.grad_and_trace(s, out_dtype=x.dtype)
        gx, gt = grad[:, :-1], grad[:, -1]
        half_sq = 0.5 * (gx**2).sum(-1)
        return -gx, -trace, half_sq, (gt - half_sq).abs()


class OTFlowVelocity(nn.Module):
    """``func(t, x) = -grad_x Phi(x, t)`` alone: for generating samples (integrate from ``T`` back to 0)."""

    def __init__(self, potential: OTPotential) -> None:
        super().__init__()
        self.potential = potential

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = torch.cat([x, t.to(x.dtype).expand(x.shape[0], 1)], dim=1)
        return -self.potential.grad_and_trace(s, out_dtype=x.dtype)[0][:, :-1]


def otflow_loss(
    potential: OTPotential, x: torch.Tensor, odeint: Callable, n_steps: int = 8, T: float = 1.0,
    alphas: tuple[float, float, float] = (1.0, 100.0, 5.0), method: str = "rk4", **kwargs,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``a0 L + a1 C + a2 R`` (batch means) for data ``x`` ``(B, d)``, integrated on ``[0, T]``.

    The output times are ``n_steps + 1`` equally spaced points: the grid of a fixed
    ``method`` (``n_steps`` RK4 steps by default); an adaptive ``method`` (with
    ``rtol``/``atol`` in ``kwargs``) chooses its own steps.

    ``C`` is the negative log-likelihood ``-(log N(z(T)) + l(T))``.  Returns the loss and the
    float values of ``L``, ``C``, ``R`` and the NLL.
    """
    zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    t = torch.linspace(0.0, T, n_steps + 1, device=x.device, dtype=x.dtype)
    z, log_det, L, R = (
        v[-1] for v in odeint(OTFlowDynamics(potential), (x, zeros, zeros, zeros), t, method=method, **kwargs)
    )
    C = -(standard_normal_log_prob(z) + log_det)
    a0, a1, a2 = alphas
    loss = a0 * L.mean() + a1 * C.mean() + a2 * R.mean()
    return loss, {"L": float(L.mean().detach()), "C": float(C.mean().detach()), "R": float(R.mean().detach()),
                  "nll": float(C.mean().detach())}


def generate(potential: OTPotential, z: torch.Tensor, odeint: Callable, n_steps: int = 8, T: float = 1.0,
             method: str = "rk4", **kwargs):
    """Samples: integrate ``z ~ N(0, I)`` (``(B, d)``) from ``T`` back to 0 (as in
    [`otflow_loss`][mpnode.models.otflow.otflow_loss]); returns ``(B, d)``."""
    t = torch.linspace(T, 0.0, n_steps + 1, device=z.device, dtype=z.dtype)
    return odeint(OTFlowVelocity(potential), z, t, method=method, **kwargs)[-1]


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 5.0)) -> float:
    """Squared maximum mean discrepancy (biased V-statistic) with a sum of Gaussian kernels."""
    x, y = x.double(), y.double()
    xy = torch.cat([x, y])
    d2 = torch.cdist(xy, xy) ** 2
    k = functools.reduce(operator.add, [torch.exp(-d2 / (2 * b**2)) for b in bandwidths])
    n = x.shape[0]
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


def gaussian_mixture(n: int, dim: int, n_components: int = 8, radius: float = 4.0, std: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples of a ``dim``-dimensional mixture of ``n_components`` isotropic Gaussians with random centres
    of norm ``radius`` (the centres are drawn from a fixed seed, the samples from ``generator``)."""
    centres = torch.randn(n_components, dim, generator=torch.Generator().manual_seed(1234))
    centres = radius * centres / centres.norm(dim=1, keepdim=True)
    k = torch.randint(0, n_components, (n,), generator=generator)
    return centres[k] + std * torch.randn(n, dim, generator=generator)
