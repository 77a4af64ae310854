"""Taylor tests (docs/tests.md) of the gradients w.r.t. inputs, weights and times.

For a loss ``L`` with gradient ``g`` at ``p`` and a unit direction ``v``, the
remainder ``|L(p + eps v) - L(p) - eps g.v|`` must fall as ``eps^2`` (slope 2
in log-log) over at least a decade of ``eps`` before it hits the roundoff floor.

Under autocast the loss is a residual ``1/2 ||y - target||^2`` whose target is
the solution at ``p`` (same precision) plus a small offset: the gradient is
then nonzero but small, so roundoff in the low-precision forward and backward
(first order in ``eps``) stays below the ``eps^2`` term over a wide range.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch

from mpnode.core import odeint


class Field(torch.nn.Module):
    """Bias-free tanh MLP with a time modulation, on states of shape (B, 4)."""

    def __init__(self, dim: int = 4, width: int = 32) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(dim, width, bias=False)
        self.l2 = torch.nn.Linear(width, dim, bias=False)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.5 * torch.sin(3 * t))


def second_order_run(remainders: list[float], lo: float = 1.6, hi: float = 2.4) -> int:
    """Longest run of consecutive halvings of eps over which the remainder falls as eps^2."""
    best = run = 0
    for a, b in itertools.pairwise(remainders):
        slope = math.log2(a / b) if a > 0 and b > 0 else float("nan")
        run = run + 1 if lo <= slope <= hi else 0
        best = max(best, run)
    return best


def taylor_remainders(kind: str, state_dtype: torch.dtype, autocast, residual: bool, eps0: float = 4.0, n: int = 14):
    torch.manual_seed(0)
    f = Field().to(state_dtype)
    y0 = 0.1 * torch.randn(16, 4, dtype=state_dtype)
    t = torch.linspace(0, 2, 9, dtype=state_dtype)
    target = None

    def loss(y0, t):
        with autocast():
            out = odeint(f, y0, t, method="rk4")
        if target is None:
            return 0.5 * (out**2).sum()
        return 0.5 * ((out - target) ** 2).sum()

    if residual:
        with torch.no_grad():
            base = loss(y0, t)  # noqa: F841 (warm the same code path)
            with autocast():
                out = odeint(f, y0, t, method="rk4")
            target = out + 1e-3 * torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)

    p = {"inputs": y0, "times": t, "weights": f.l1.weight}[kind]
    p.requires_grad_(True)
    l0 = loss(y0, t)
    (g,) = torch.autograd.grad(l0, p)
    p.requires_grad_(False)
    v = torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype)
    if kind == "times":
        v[0] = v[-1] = 0  # keep the end points; interior moves stay below the spacing 0.25
        v = 0.2 * v / v.norm()
        eps0 = 1.0
    else:
        v = v / v.norm()
    gv = float((g * v).sum())
    l0 = float(l0.detach())
    out = []
    for k in range(n):
        eps = eps0 * 2.0**-k
        with torch.no_grad():
            if kind == "inputs":
                lk = loss(y0 + eps * v, t)
            elif kind == "times":
                lk = loss(y0, t + eps * v)
            else:
                w = f.l1.weight.clone()
                f.l1.weight.add_(eps * v)
                lk = loss(y0, t)
                f.l1.weight.copy_(w)
        out.append((abs(float(lk) - l0), abs(float(lk) - l0 - eps * gv)))
    return out


KINDS = ["inputs", "weights", "times"]


@pytest.mark.parametrize("kind", KINDS)
def test_taylor_float64(kind):
    rem = taylor_remainders(kind, torch.float64, contextlib.nullcontext, residual=False, n=26)
    zeroth, first = zip(*rem)
    assert second_order_run(list(first)) >= 10, [f"{r:.2e}" for r in first]
    # |L(p + eps v) - L(p)| falls as eps once the first-order term dominates
    k = next(i for i, (z, r) in enumerate(rem) if r < 0.01 * z)
    assert 0.8 <= math.log2(zeroth[k] / zeroth[k + 1]) <= 1.2


@pytest.mark.parametrize("kind", KINDS)
def test_taylor_float32(kind):
    first = [r for _, r in taylor_remainders(kind, torch.float32, contextlib.nullcontext, residual=True)]
    assert second_order_run(first) >= 6, [f"{r:.2e}" for r in first]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_taylor_under_autocast(kind, precision, amp):
    rem = taylor_remainders(kind, torch.float32, lambda: amp(precision), residual=True)
    first = [r for _, r in rem]
    assert second_order_run(first) >= 4, [f"{r:.2e}" for r in first]  # >= 16x in eps, more than a decade
