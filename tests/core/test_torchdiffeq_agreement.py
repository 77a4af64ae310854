"""float32 agreement with torchdiffeq: solution and gradients w.r.t. y0, t and parameters."""

from __future__ import annotations

import itertools

import pytest
import torch

torchdiffeq = pytest.importorskip("torchdiffeq")

from mpnode.core import odeint  # noqa: E402

SHARED_METHODS = ["euler", "midpoint", "heun2", "heun3", "rk4"]
TOL = 1e-5


class TimeMLP(torch.nn.Module):
    """A small non-autonomous field on states of shape (B, 3)."""

    def __init__(self, dim: int = 3, width: int = 16) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(dim + 1, width)
        self.l2 = torch.nn.Linear(width, dim)

    def forward(self, t, y):
        tt = t.expand(*y.shape[:-1], 1)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], -1)))) * torch.cos(t)


class TupleField(torch.nn.Module):
    """Coupled tuple state ``(x (B, 3), s (B,))``: ds/dt depends on x."""

    def __init__(self) -> None:
        super().__init__()
        self.f = TimeMLP()
        self.w = torch.nn.Parameter(torch.randn(3))

    def forward(self, t, state):
        x, s = state
        return self.f(t, x), (x * self.w).sum(-1) * s.tanh()


def uniform_grid(func, y0, t):
    """A user grid constructor: 3 sub-steps per output interval, as torchdiffeq users write them."""
    pieces = [torch.linspace(a, b, 4, dtype=t.dtype, device=t.device)[:-1] for a, b in itertools.pairwise(t)]
    return torch.cat([*pieces, t[-1:]])


GRIDS = {
    "default": None,
    "step_size": {"step_size": 0.07},
    "grid_constructor": {"grid_constructor": uniform_grid},
}


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _compare(func, y0, t, method, options):
    params = list(func.parameters())
    y0s = y0 if isinstance(y0, tuple) else (y0,)
    results = []
    for solve in (odeint, torchdiffeq.odeint):
        out = solve(func, y0, t, method=method, options=options)
        outs = out if isinstance(out, tuple) else (out,)
        gen = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [*y0s, t, *params])
        results.append(([o.detach() for o in outs], grads))
    (outs_a, grads_a), (outs_b, grads_b) = results
    for a, b in zip(outs_a, outs_b):
        assert _rel(a, b) <= TOL
    for a, b in zip(grads_a, grads_b):
        assert _rel(a, b) <= TOL


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("method", SHARED_METHODS)
@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
def test_tensor_state_matches_torchdiffeq(method, grid, direction):
    torch.manual_seed(0)
    func = TimeMLP()
    y0 = torch.randn(5, 3, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.55, 1.0])
    if direction == "decreasing":
        t = t.flip(0)
    _compare(func, y0, t.requires_grad_(), method, GRIDS[grid])


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_tuple_state_matches_torchdiffeq(method, grid):
    torch.manual_seed(0)
    func = TupleField()
    y0 = (torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True))
    t = torch.tensor([1.0, 0.6, 0.0]).requires_grad_()
    _compare(func, y0, t, method, GRIDS[grid])


def test_rk4_is_the_three_eighths_rule_like_torchdiffeq():
    """rk4 matches torchdiffeq to roundoff, rk4_classic differs by truncation error."""
    func = TimeMLP()
    y0 = torch.randn(2, 3)
    t = torch.tensor([0.0, 2.0])
    ref = torchdiffeq.odeint(func, y0, t, method="rk4")
    with torch.no_grad():
        ours = odeint(func, y0, t, method="rk4")
        classic = odeint(func, y0, t, method="rk4_classic")
    assert _rel(ours, ref) < 1e-6
    assert _rel(classic, ref) > 1e-5


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("method", ["euler", "heun3", "rk4"])
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_low_precision_is_close_to_float32(precision, method, grid, amp):
    """Under autocast the same call (tuple state, decreasing t) stays within the autocast roundoff."""
    torch.manual_seed(0)
    func = TupleField()
    y0 = (torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True))
    t = torch.tensor([1.0, 0.6, 0.0]).requires_grad_()
    params = list(func.parameters())
    results = []
    for ctx in (amp("float32"), amp(precision)):
        with ctx:
            x, s = odeint(func, y0, t, method=method, options=GRIDS[grid])
            loss = (x**2).sum() + (s**2).sum()
        results.append([loss.detach(), *torch.autograd.grad(loss, [*y0, t, *params])])
    tol = {"bfloat16": 3e-2, "float16": 5e-3}[precision]
    for a, b in zip(results[1], results[0]):
        assert a.dtype == b.dtype == torch.float32
        assert _rel(a, b) <= tol
