"""Butcher tableaux: validation on construction, user tableaux, observed convergence order."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from mpnode.core import TABLEAUX, ButcherTableau, get_tableau, odeint


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(a=[[0, 1], [0.5, 0]], b=[0.5, 0.5]), "on or above the diagonal"),
        (dict(a=[[], [1]], b=[0.5, 0.6]), "sum to"),
        (dict(a=[[], [1]], b=[0.5, 0.5], c=[0, 0.9]), "differs from the row sum"),
        (dict(a=[[]], b=[]), "at least one weight"),
        (dict(a=[[], []], b=[1.0]), "rows but b has"),
        (dict(a=[[], [1]], b=[0.5, 0.5], order=0), "positive integer"),
    ],
)
def test_invalid_tableau_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ButcherTableau("bad", **kwargs)


def test_named_tableaux_are_consistent():
    expected = {"euler": 1, "midpoint": 2, "heun2": 2, "ralston": 2, "heun3": 3, "ssprk3": 3, "rk4": 4,
                "rk4_classic": 4, "dopri5": 5, "bosh3": 3, "fehlberg2": 2, "adaptive_heun": 2, "dopri8": 8, "tsit5": 5}
    assert {k: v.order for k, v in TABLEAUX.items()} == expected
    for tab in TABLEAUX.values():
        assert math.isclose(sum(tab.b), 1.0, abs_tol=1e-15)
        assert all(math.isclose(c, sum(r), abs_tol=1e-15) for c, r in zip(tab.c, tab.a))
    assert TABLEAUX["rk4"].b == (0.125, 0.375, 0.375, 0.125)  # 3/8 rule, like torchdiffeq
    assert get_tableau("rk4_classic").b == (1 / 6, 1 / 3, 1 / 3, 1 / 6)


def test_user_tableau_is_used_as_method():
    # Kutta's third-order method, not among the named ones.
    kutta3 = ButcherTableau("kutta3", [[], ["1/2"], [-1, 2]], ["1/6", "2/3", "1/6"], order=3)
    A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0, 1, 33, dtype=torch.float64)
    y = odeint(lambda t, y: A @ y, y0, t, method=kutta3)
    exact = torch.stack([torch.cos(t), -torch.sin(t)], -1)
    err = (y - exact).abs().max()
    assert 1e-9 < err < 1e-5  # third-order accurate, not exact


A = torch.tensor([[-0.3, 2.0, 0.1], [-2.0, -0.2, 0.4], [0.0, -0.5, -0.6]], dtype=torch.float64)
Y0 = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)


def forced_linear(t, y):
    """A non-autonomous linear field, so the stage times matter too."""
    return A @ y + torch.sin(3 * t) * Y0


T_SPAN = torch.tensor([0.0, 2.0], dtype=torch.float64)


@functools.lru_cache(maxsize=1)
def _reference() -> torch.Tensor:
    with torch.no_grad():
        return odeint(forced_linear, Y0, T_SPAN, method=TABLEAUX["dopri8"].fixed_grid(),
                      options={"step_size": 2 / 512})[-1]


def _linear_error(tab: ButcherTableau, n: int) -> float:
    with torch.no_grad():
        y = odeint(forced_linear, Y0, T_SPAN, method=tab.fixed_grid(), options={"step_size": 2 / n})[-1]
    return float((y - _reference()).norm())


@pytest.mark.parametrize("name", list(TABLEAUX))
def test_observed_convergence_order(name):
    tab = TABLEAUX[name]
    n = 40 if tab.order <= 4 else (32 if tab.order <= 5 else 8)  # asymptotic, above float64 roundoff
    e1, e2 = _linear_error(tab, n), _linear_error(tab, 2 * n)
    observed = math.log2(e1 / e2)
    assert abs(observed - tab.order) <= 0.2, f"{name}: observed order {observed:.3f}, declared {tab.order}"


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown method 'dopri7'.*rk4"):
        get_tableau("dopri7")
