"""The benchmark problems: a vector field, an initial state and a scalar loss, at a given size.

Every problem builds an :class:`Instance` from a dict of sizes; the solver
integrates ``t in [0, 1]`` with ``steps`` fixed RK4 steps and the loss is a
function of the final state only.

* ``mlp``: tanh MLP field ``f(t, y)``, ``y`` of shape ``(batch, dim)``, two
  hidden layers of ``width`` with time concatenated to the input.
* ``otflow``: the OT-Flow field (Onken et al. 2021) on the state
  ``(x, l, L, R)``: velocity ``-grad_x Phi`` of the potential
  ``Phi(s) = w^T N(s) + 1/2 s^T A^T A s + b^T s``, ``s = (x, t)``, ``N`` a
  two-layer ResNet with ``log cosh`` activation, and the exact trace of the
  Hessian computed alongside the gradient in one pass; ``x`` is ``(batch, d)``.
* ``conv``: the ODE-Net block (two time-concatenated 3x3 convolutions with
  GroupNorm, ``mpnode.models.ODEFunc``) on ``(batch, channels, size, size)``.
* ``cnf``: a 2-D continuous normalising flow with exact trace: state
  ``(z, log p)``, ``z`` of shape ``(batch, 2)``, field a tanh MLP whose
  Jacobian is propagated alongside the forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

State = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class Instance:
    """One problem at one size on one device.

    Attributes:
        func: the vector field ``func(t, y)`` (an ``nn.Module``; its parameters get gradients).
        y0: float32 initial state (tensor or tuple), not requiring grad.
        loss: ``loss(y_T) -> scalar`` from the final state (same structure as ``y0``).
    """

    func: nn.Module
    y0: State
    loss: Callable[[State], torch.Tensor]

    def state_bytes(self) -> int:
        parts = (self.y0,) if isinstance(self.y0, torch.Tensor) else self.y0
        return sum(p.numel() * p.element_size() for p in parts)


# ----------------------------------------------------------------------- MLP


class MLPField(nn.Module):
    """``f(t, y) = W3 tanh(W2 tanh(W1 [y, t] + b1) + b2) + b3``; ``y`` is ``(B, dim)``."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim + 1, width)
        self.l2 = nn.Linear(width, width)
        self.l3 = nn.Linear(width, dim)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ty = t.to(y.dtype).expand(y.shape[0], 1)
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(torch.cat([y, ty], dim=-1))))))


def build_mlp(sizes: dict[str, int], device: torch.device) -> Instance:
    func = MLPField(sizes["dim"], sizes["width"]).to(device)
    y0 = torch.randn(sizes["batch"], sizes["dim"], device=device)
    return Instance(func, y0, lambda y: (y**2).mean())


# ------------------------------------------------------------------- OT-Flow


def _log_cosh(x: torch.Tensor) -> torch.Tensor:
    """``log cosh x`` without overflow: ``|x| + log1p(exp(-2|x|)) - log 2``."""
    a = x.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - math.log(2.0)


class OTFlowField(nn.Module):
    """OT-Flow dynamics on ``(x, l, L, R)`` with ``x`` of shape ``(B, d)`` and scalars ``(B, 1)``.

    ``Phi(s) = w^T u1 + 1/2 |A s|^2 + b^T s`` with ``u0 = sigma(K0 s + b0)``,
    ``u1 = u0 + h sigma(K1 u0 + b1)``, ``sigma = log cosh``, ``A`` of shape
    ``(rank, d+1)``, ``rank = min(10, d+1)``.  Returned derivatives:
    ``dx = -grad_x Phi``, ``dl = -tr(grad_x^2 Phi)``, ``dL = 1/2 |grad_x Phi|^2``,
    ``dR = |dPhi/dt - 1/2 |grad_x Phi|^2|``.  Gradient and trace are analytic
    (one pass, no nested autograd); the trace needs a ``(B, m, d)`` Jacobian.
    """

    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        self.d, self.m, self.h = d, m, 1.0
        rank = min(10, d + 1)
        self.K0 = nn.Linear(d + 1, m)
        self.K1 = nn.Linear(m, m)
        self.w = nn.Parameter(torch.randn(m) / math.sqrt(m))
        self.A = nn.Parameter(torch.randn(rank, d + 1) * 0.1)
        self.b = nn.Parameter(torch.zeros(d + 1))

    def potential(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``Phi(x, t)`` per sample, ``(B,)`` (used by the tests to check gradient and trace)."""
        s = torch.cat([x, t.to(x.dtype).expand(x.shape[0], 1)], dim=-1)
        u0 = _log_cosh(self.K0(s))
        u1 = u0 + self.h * _log_cosh(self.K1(u0))
        return u1 @ self.w + 0.5 * ((s @ self.A.t()) ** 2).sum(-1) + s @ self.b

    def grad_and_trace(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grad_s Phi (B, d+1), tr grad_x^2 Phi (B,))`` computed analytically."""
        d = self.d
        s = torch.cat([x, t.to(x.dtype).expand(x.shape[0], 1)], dim=-1)
        z1 = self.K0(s)
        tanh1 = torch.tanh(z1)
        u0 = _log_cosh(z1)
        z2 = self.K1(u0)
        tanh2 = torch.tanh(z2)
        w = self.w.to(tanh2.dtype)
        a = w + self.h * (tanh2 * w) @ self.K1.weight.to(tanh2.dtype)  # dPhi_N/du0, (B, m)
        AtA = self.A.t() @ self.A
        grad = (tanh1 * a) @ self.K0.weight.to(a.dtype) + s @ AtA.to(s.dtype) + self.b.to(s.dtype)
        K0x = self.K0.weight[:, :d].to(a.dtype)  # (m, d)
        term0 = ((1 - tanh1**2) * a) @ (K0x**2).sum(1)  # sum_i sigma''(z1_i) a_i |K0_i,x|^2
        J = tanh1.unsqueeze(-1) * K0x  # du0/dx, (B, m, d)
        KJ = torch.matmul(self.K1.weight.to(J.dtype), J)  # (B, m, d)
        term1 = self.h * ((1 - tanh2**2) * w * (KJ**2).sum(-1)).sum(-1)
        trace = term0 + term1 + torch.diagonal(AtA)[:d].sum().to(term0.dtype)
        return grad, trace

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = state[0]
        grad, trace = self.grad_and_trace(x, t)
        gx, gt = grad[:, : self.d], grad[:, self.d :]
        kinetic = 0.5 * (gx**2).sum(-1, keepdim=True)
        return -gx, -trace.unsqueeze(-1), kinetic, (gt - kinetic).abs()


def build_otflow(sizes: dict[str, int], device: torch.device) -> Instance:
    d, batch = sizes["d"], sizes["batch"]
    func = OTFlowField(d, sizes["width"]).to(device)
    x = torch.randn(batch, d, device=device)
    zeros = torch.zeros(batch, 1, device=device)
    y0 = (x, zeros, zeros.clone(), zeros.clone())

    def loss(y: tuple[torch.Tensor, ...]) -> torch.Tensor:
        xT, l, L, R = y
        nll = 0.5 * (xT**2).sum(-1) + 0.5 * d * math.log(2 * math.pi) - l.squeeze(-1)
        return L.mean() + nll.mean() + 5.0 * R.mean()

    return Instance(func, y0, loss)


# ---------------------------------------------------------------------- conv


def build_conv(sizes: dict[str, int], device: torch.device) -> Instance:
    from mpnode.models.mnist import ODEFunc  # the ODE-Net block of mpnode-models

    c, n = sizes["channels"], sizes["size"]
    func = ODEFunc(c).to(device)
    y0 = torch.randn(sizes["batch"], c, n, n, device=device)
    return Instance(func, y0, lambda y: (y**2).mean())


# ----------------------------------------------------------------------- CNF


class CNFField(nn.Module):
    """2-D CNF with exact trace: ``d z/dt = g(t, z)``, ``d log p/dt = -tr(dg/dz)``.

    ``g = W3 tanh(W2 tanh(W1 [z, t]))`` (with biases); the ``(B, width, 2)``
    Jacobian is carried through the layers alongside the activations, so the
    trace is exact and needs no nested autograd.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, width)
        self.l2 = nn.Linear(width, width)
        self.l3 = nn.Linear(width, 2)

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z = state[0]
        a1 = torch.tanh(self.l1(torch.cat([z, t.to(z.dtype).expand(z.shape[0], 1)], dim=-1)))
        J1 = (1 - a1**2).unsqueeze(-1) * self.l1.weight[:, :2].to(a1.dtype)  # (B, w, 2)
        a2 = torch.tanh(self.l2(a1))
        J2 = (1 - a2**2).unsqueeze(-1) * torch.matmul(self.l2.weight.to(J1.dtype), J1)
        dz = self.l3(a2)
        J3 = torch.matmul(self.l3.weight.to(J2.dtype), J2)  # (B, 2, 2)
        trace = J3.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
        return dz, -trace


def build_cnf(sizes: dict[str, int], device: torch.device) -> Instance:
    func = CNFField(sizes["width"]).to(device)
    z = torch.randn(sizes["batch"], 2, device=device)
    y0 = (z, torch.zeros(sizes["batch"], 1, device=device))

    def loss(y: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        zT, dlogp = y  # log p(x) = log N(z_T) - dlogp (the flow runs data -> noise)
        return (0.5 * (zT**2).sum(-1) + math.log(2 * math.pi) - dlogp.squeeze(-1)).mean()

    return Instance(func, y0, loss)


# ------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Problem:
    """A named problem: its builder and the size names it reads."""

    name: str
    build: Callable[[dict[str, int], torch.device], Instance]
    size_names: tuple[str, ...]
    describe: str


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem("mlp", build_mlp, ("batch", "dim", "width"), "tanh MLP field, state (batch, dim)"),
        Problem("otflow", build_otflow, ("batch", "d", "width"), "OT-Flow potential flow, x (batch, d), ResNet width m"),
        Problem("conv", build_conv, ("batch", "channels", "size"), "ODE-Net conv block, state (batch, C, size, size)"),
        Problem("cnf", build_cnf, ("batch", "width"), "2-D CNF with exact trace, z (batch, 2)"),
    )
}


def build(problem: str, sizes: dict[str, int], device: torch.device | str, seed: int = 0) -> Instance:
    """Build ``problem`` at ``sizes`` on ``device`` with a fixed seed (weights and data)."""
    if problem not in PROBLEMS:
        raise ValueError(f"unknown problem {problem!r}; choose one of {sorted(PROBLEMS)}")
    p = PROBLEMS[problem]
    missing = [k for k in p.size_names if k not in sizes]
    if missing:
        raise ValueError(f"problem {problem!r} needs sizes {list(p.size_names)}; missing {missing}")
    torch.manual_seed(seed)
    return p.build(dict(sizes), torch.device(device))
