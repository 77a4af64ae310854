"""Continuous normalizing flows (FFJORD, Grathwohl et al. 2019) on top of ``mpnode.core.odeint``.

A CNF transports samples ``x`` to ``z = z(T)`` through ``dz/dt = f(t, z)`` and
tracks the log-density along the path, ``d log p / dt = -tr(df/dz)``.
[`CNF`][mpnode.models.cnf.CNF] turns a vector field into these ``(z, l)`` dynamics, with ``l`` the
accumulated ``-∫ tr(df/dz) dt``:

* exact divergence: the field's own ``forward_with_divergence(t, z)`` when it has
  one (e.g. [`HyperNetField`][mpnode.models.cnf.HyperNetField]), else one autograd pass per dimension;
* Hutchinson's estimator ``eps^T (df/dz) eps`` with Gaussian or Rademacher ``eps``
  drawn once per solve ([`CNF.resample_noise`][mpnode.models.cnf.CNF.resample_noise]) and held fixed along it.

Under autocast the field runs in low precision; the divergence is summed in the
state's dtype (float32), like the stage sums of the solver.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def exact_divergence(dz: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``tr(d dz / d z)`` per sample, one autograd pass per dimension: ``(B, d), (B, d) -> (B,)`` in ``z``'s dtype."""
    div = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for i in range(z.shape[1]):
        (row,) = torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
        div = div + row[:, i].to(z.dtype)
    return div


def hutchinson_divergence(dz: torch.Tensor, z: torch.Tensor, noise: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Unbiased estimate ``eps^T (d dz / d z) eps`` per sample, ``(B,)`` in ``z``'s dtype."""
    (vjp,) = torch.autograd.grad(dz, z, grad_outputs=noise.to(dz.dtype), create_graph=create_graph)
    return (vjp.to(z.dtype) * noise.to(z.dtype)).sum(dim=1)


class CNF(nn.Module):
    """``(z, l)`` dynamics of a CNF around ``field(t, z) -> dz/dt`` (``z`` of shape ``(B, d)``).

    ``forward(t, (z, l))`` returns ``(dz/dt, -div)``; use it as ``func`` of
    ``odeint`` with the tuple state ``(z, l)`` (``l`` of shape ``(B,)``).

    Args:
        field: the vector field; if it defines ``forward_with_divergence(t, z)``
            returning ``(dz, div)``, that exact divergence is used.
        divergence: ``"exact"`` or ``"hutchinson"``.
        noise: ``"gaussian"`` or ``"rademacher"`` (Hutchinson only).
    """

    def __init__(self, field: nn.Module, divergence: str = "exact", noise: str = "rademacher") -> None:
        super().__init__()
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
        if noise not in ("gaussian", "rademacher"):
            raise ValueError(f"noise must be 'gaussian' or 'rademacher', got {noise!r}")
        self.field = field
        self.divergence = divergence
        self.noise_kind = noise
        self.noise: torch.Tensor | None = None

    def resample_noise(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw the Hutchinson probe for the next solve (shape, dtype, device of ``z``) and keep it fixed.

        ``generator``, if given, must live on ``z``'s device.
        """
        eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        if self.noise_kind == "rademacher":
            eps = torch.sign(eps)
            eps[eps == 0] = 1
        self.noise = eps
        return eps

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z, _ = state
        outer_grad = torch.is_grad_enabled()  # backward recomputation: the divergence must be differentiable
        analytic = getattr(self.field, "forward_with_divergence", None)
        if self.divergence == "exact" and analytic is not None:
            dz, div = analytic(t, z)  # analytic: no autograd pass needed
            return dz, -div.to(z.dtype)
        with torch.enable_grad():
            zi = z if z.requires_grad else z.detach().requires_grad_(True)
            dz = self.field(t, zi)
            if self.divergence == "exact":
                div = exact_divergence(dz, zi, create_graph=outer_grad)
            else:
                if self.noise is None or self.noise.shape != z.shape:
                    raise RuntimeError("call CNF.resample_noise(z0) before each solve with the Hutchinson estimator")
                div = hutchinson_divergence(dz, zi, self.noise, create_graph=outer_grad)
        if not outer_grad:
            dz, div = dz.detach(), div.detach()
        return dz, -div.to(z.dtype)

    def log_prob(self, x: torch.Tensor, odeint: Callable, t: torch.Tensor, **kwargs) -> torch.Tensor:
        """``log p(x)`` (``(B,)``) under the flow with a standard normal base at ``t[-1]``.

        Integrates ``(x, 0)`` over ``t`` with ``odeint`` (mpnode's or torchdiffeq's);
        ``log p(x) = log N(z(T); 0, I) - l(T)``.  Resamples the Hutchinson probe.
        """
        if self.divergence == "hutchinson":
            self.resample_noise(x)
        l0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        z, log_det = odeint(self, (x, l0), t, **kwargs)
        return standard_normal_log_prob(z[-1]) - log_det[-1]


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over the last dimension (computed in float32 or higher)."""
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


class HyperNetField(nn.Module):
    """The FFJORD toy field: a hypernetwork maps ``t`` to the weights of a width-``w`` layer.

    ``f(t, z) = (1/w) * tanh(z W(t)^T + b(t)) U(t)``, with ``U = U' * sigmoid(g)`` gated
    per unit.  ``W, U'`` are ``(w, d)``, ``b, g`` are ``(w,)``.  The divergence is exact and
    analytic: ``tr(df/dz) = (1/w) sum_k (1 - h_k^2) (U_k . W_k)``, summed in ``z``'s dtype.
    """

    def __init__(self, dim: int = 2, width: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.dim, self.width = dim, width
        self.hyper = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                   nn.Linear(hidden, 2 * width * dim + 2 * width))

    def _weights(self, t: torch.Tensor, like: torch.Tensor):
        p = self.hyper(t.reshape(1, 1).to(like.dtype)).reshape(-1)
        w, d = self.width, self.dim
        W = p[: w * d].reshape(w, d)
        U = p[w * d : 2 * w * d].reshape(w, d)
        b = p[2 * w * d : 2 * w * d + w]
        gate = torch.sigmoid(p[2 * w * d + w :])
        return W, U * gate[:, None], b

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.forward_with_divergence(t, z, with_divergence=False)[0]

    def forward_with_divergence(self, t: torch.Tensor, z: torch.Tensor, with_divergence: bool = True):
        W, U, b = self._weights(t, z)
        h = torch.tanh(torch.nn.functional.linear(z, W, b))  # (B, w)
        dz = torch.nn.functional.linear(h, U.T) / self.width  # (B, d)
        if not with_divergence:
            return dz, None
        slope = 1 - h.to(z.dtype) ** 2
        div = slope @ (U.to(z.dtype) * W.to(z.dtype)).sum(-1) / self.width
        return dz, div


class SoftplusMLPField(nn.Module):
    """``f(t, z)``: an MLP on ``(z, t)`` with softplus activations (a generic CNF field)."""

    def __init__(self, dim: int = 2, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        layers, d_in = [], dim + 1
        for _ in range(depth - 1):
            layers += [nn.Linear(d_in, width), nn.Softplus()]
            d_in = width
        layers.append(nn.Linear(d_in, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tt = t.to(z.dtype).expand(z.shape[0], 1)
        return self.net(torch.cat([z, tt], dim=1))
