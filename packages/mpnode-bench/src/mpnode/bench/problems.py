"""The benchmark problems: a vector field, an initial state and a scalar loss, at a given size.

Every problem builds an [`Instance`][mpnode.bench.problems.Instance] from a dict of sizes; the solver
integrates ``t in [0, 1]`` (fixed RK4 steps or an adaptive method) and the loss
is a function of the final state only.  The fields are the library's own:

* ``mlp``: [`mpnode.core.testing.MLPField`][mpnode.core.testing.MLPField] with two tanh hidden layers
  of ``width``, time appended to the input; ``y`` of shape ``(batch, dim)``.
  Optional size ``gain`` (default 1): the output layer (weight and bias) is
  multiplied by it, so the field is ``gain`` times the default one (about the
  default field over ``t in [0, gain]``): adaptive solvers then take tens of
  steps instead of three.  The field accepts a ``(batch, 1)`` time column.
* ``otflow``: OT-Flow (Onken et al. 2021), [`mpnode.models.otflow.OTFlowDynamics`][mpnode.models.otflow.OTFlowDynamics]
  of an [`OTPotential`][mpnode.models.otflow.OTPotential] with a two-layer ResNet of
  width ``width`` on the state ``(x, l, L, R)``, ``x`` of shape ``(batch, d)``;
  gradient and exact Hessian trace of the potential in one pass.
* ``conv``: the ODE-Net block (two time-concatenated 3x3 convolutions with
  GroupNorm, [`mpnode.models.mnist.ODEFunc`][mpnode.models.mnist.ODEFunc]) on ``(batch, channels, size, size)``.
* ``cnf``: a 2-D continuous normalising flow with exact trace,
  [`mpnode.models.cnf.CNF`][mpnode.models.cnf.CNF] around the FFJORD hypernetwork field
  [`HyperNetField`][mpnode.models.cnf.HyperNetField] of width ``width``; state
  ``(z, l)``, ``z`` of shape ``(batch, 2)``, ``l`` of shape ``(batch,)``.
* ``demo``: the field of torchdiffeq's ``ode_demo.py`` (a spiral): a tanh MLP
  ``2 -> width -> 2`` applied to ``y**3`` ([`CubicMLPField`][mpnode.bench.problems.CubicMLPField]), ``y`` of shape
  ``(batch, 2)`` around ``(2, 0)``.  So small that Python and dispatch overhead,
  not arithmetic, set its time: the overhead-bound case.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpnode.core.testing import MLPField
from mpnode.models.cnf import CNF, HyperNetField, standard_normal_log_prob
from mpnode.models.mnist import ODEFunc
from mpnode.models.otflow import OTFlowDynamics, OTPotential

State = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class Instance:
    """One problem at one size on one device.

    Attributes:
        func: the vector field ``func(t, y)`` (an ``nn.Module``; its parameters get gradients).
        y0: float32 initial state (tensor or tuple), not requiring grad.
        loss: ``loss(y_T) -> scalar`` from the final state (same structure as ``y0``).
        time_column: whether ``func`` also accepts ``t`` of shape ``(batch, 1)``, one
            time per sample (as torchode's per-sample adaptive steps pass it).
    """

    func: nn.Module
    y0: State
    loss: Callable[[Any], torch.Tensor]  # takes the solution's final state, structured like y0
    time_column: bool = False

    def state_bytes(self) -> int:
        parts = (self.y0,) if isinstance(self.y0, torch.Tensor) else self.y0
        return sum(p.numel() * p.element_size() for p in parts)


def _mean_square(y: torch.Tensor) -> torch.Tensor:
    return (y**2).mean()


def build_mlp(sizes: dict[str, int], device: torch.device) -> Instance:
    func = MLPField(sizes["dim"], sizes["width"], hidden_layers=2).to(device)
    gain = sizes.get("gain", 1)
    if gain != 1:
        with torch.no_grad():
            func.out.weight.mul_(gain)
            func.out.bias.mul_(gain)
    y0 = torch.randn(sizes["batch"], sizes["dim"], device=device)
    return Instance(func, y0, _mean_square, time_column=True)


def build_otflow(sizes: dict[str, int], device: torch.device) -> Instance:
    d, batch, width = sizes["d"], sizes["batch"], sizes["width"]
    potential = OTPotential(d, width, n_layers=2)
    with torch.no_grad():  # OTPotential starts with w = 0 (ResNet switched off); a trained one has w != 0
        potential.w.copy_(torch.randn(width) / math.sqrt(width))
    func = OTFlowDynamics(potential).to(device)
    x = torch.randn(batch, d, device=device)
    zeros = torch.zeros(batch, device=device)
    y0 = (x, zeros, zeros.clone(), zeros.clone())

    def loss(y: tuple[torch.Tensor, ...]) -> torch.Tensor:
        xT, log_det, L, R = y
        nll = 0.5 * (xT**2).sum(-1) + 0.5 * d * math.log(2 * math.pi) - log_det
        return L.mean() + nll.mean() + 5.0 * R.mean()

    return Instance(func, y0, loss)


def build_conv(sizes: dict[str, int], device: torch.device) -> Instance:
    c, n = sizes["channels"], sizes["size"]
    func = ODEFunc(c).to(device)
    y0 = torch.randn(sizes["batch"], c, n, n, device=device)
    return Instance(func, y0, _mean_square)


def build_cnf(sizes: dict[str, int], device: torch.device) -> Instance:
    func = CNF(HyperNetField(dim=2, width=sizes["width"]), divergence="exact").to(device)
    z = torch.randn(sizes["batch"], 2, device=device)
    y0 = (z, torch.zeros(sizes["batch"], device=device))

    def loss(y: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        zT, log_det = y  # the negative log-likelihood: log p(x) = log N(z_T) - l_T (the flow runs data -> noise)
        return (log_det - standard_normal_log_prob(zT)).mean()

    return Instance(func, y0, loss)


class CubicMLPField(nn.Module):
    """``f(t, y) = W_2 tanh(W_1 y^3 + b_1) + b_2`` on ``y`` of shape ``(..., 2)`` (the spiral of ``ode_demo.py``)."""

    def __init__(self, width: int = 50) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 2))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y**3)


def build_demo(sizes: dict[str, int], device: torch.device) -> Instance:
    func = CubicMLPField(sizes["width"]).to(device)
    y0 = torch.tensor([2.0, 0.0], device=device) + 0.5 * torch.randn(sizes["batch"], 2, device=device)
    return Instance(func, y0, _mean_square, time_column=True)


# ------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Problem:
    """A named problem: its builder, the size names it needs and those it may take."""

    name: str
    build: Callable[[dict[str, int], torch.device], Instance]
    size_names: tuple[str, ...]
    describe: str
    optional_sizes: tuple[str, ...] = ()


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem("mlp", build_mlp, ("batch", "dim", "width"), "tanh MLP field, state (batch, dim)", ("gain",)),
        Problem("otflow", build_otflow, ("batch", "d", "width"),
                "OT-Flow potential flow, x (batch, d), ResNet width m"),
        Problem("conv", build_conv, ("batch", "channels", "size"), "ODE-Net conv block, state (batch, C, size, size)"),
        Problem("cnf", build_cnf, ("batch", "width"), "2-D CNF (hypernetwork field, exact trace), z (batch, 2)"),
        Problem("demo", build_demo, ("batch", "width"), "torchdiffeq's ode_demo field (tanh MLP of y**3), "
                "y (batch, 2): overhead-bound"),
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
    unknown = sorted(set(sizes) - set(p.size_names) - set(p.optional_sizes))
    if unknown:
        raise ValueError(f"problem {problem!r} takes sizes {list(p.size_names + p.optional_sizes)}; unknown {unknown}")
    torch.manual_seed(seed)
    return p.build(dict(sizes), torch.device(device))
