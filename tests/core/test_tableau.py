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


def test_zero_error_estimate_is_refused():
    """b_hat == b makes the error estimate zero on every step: adaptive stepping would accept anything."""
    with pytest.raises(ValueError, match=r"error weights b - b_hat are all zero.*fixed-grid"):
        ButcherTableau("zero-estimate", a=[[], ["1/2"]], b=[0, 1], order=2, b_hat=[0, 1], embedded_order=2,
                       c_mid=["1/4", "1/4"])
    with pytest.raises(ValueError, match="all zero"):
        ButcherTableau("zero-estimate", a=[[], ["1/2"]], b=[0, 1], order=2, b_err=[0, 0], embedded_order=2,
                       c_mid=["1/4", "1/4"])


def test_embedded_pair_without_dense_output_is_refused():
    """An adaptive method reads outputs between its steps off the dense output: without one it is refused on
    construction (not accepted as adaptive and refused by odeint later)."""
    with pytest.raises(ValueError, match=r"needs a dense output.*c_mid=.*dense="):
        ButcherTableau("heun-euler", a=[[], [1]], b=["1/2", "1/2"], order=2, b_hat=[1, 0], embedded_order=1)
    ok = ButcherTableau("heun-euler", a=[[], [1]], b=["1/2", "1/2"], order=2, b_hat=[1, 0], embedded_order=1,
                        c_mid=["3/8", "1/8"])
    assert ok.is_adaptive


@pytest.mark.parametrize("field, stages, value, match", [
    ("order", 1, 9, r"order = 9 is out of reach of 1 stage"),
    ("order", 30, 30, r"order = 30 is above 12"),
    ("embedded_order", 2, 3, r"embedded_order = 3 is out of reach of 2 stage"),
    ("dense_order", 2, 5, r"dense_order = 5 is out of reach of 2 stage"),
])
def test_unreachable_order_is_refused_at_once(field, stages, value, match):
    """An order no explicit method with that many stages has (or one above what is checked) is refused before any
    order condition is evaluated (main evaluated all of them: order=20 took over 10 minutes and 4.6 GB)."""
    kwargs = dict(a=[[]] + [[0] * i for i in range(1, stages)], b=[1] + [0] * (stages - 1), order=1)
    if field != "order":
        kwargs = dict(a=[[], [1]], b=["1/2", "1/2"], order=2, b_hat=[1, 0], embedded_order=1, c_mid=["3/8", "1/8"])
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        ButcherTableau("claims", **kwargs)


def test_order_conditions_stop_at_the_lowest_failed_order():
    """Euler padded to 12 stages claiming order 12: the order-2 conditions fail and the higher ones are not
    evaluated; the message says which order failed."""
    stages = 12
    with pytest.raises(ValueError, match=r"order-12 conditions \(those of order 2 fail"):
        ButcherTableau("padded-euler", a=[[]] + [[0] * i for i in range(1, stages)], b=[1] + [0] * (stages - 1),
                       order=12)


def test_numeric_coefficient_types_are_accepted_alike():
    """numpy scalars and tensors are accepted wherever a coefficient goes (a, b, c_mid), with the same values as
    floats (main: fractions' 'argument should be a string or a Rational instance' for a numpy float32 in a or a
    tensor a)."""
    np = pytest.importorskip("numpy")
    ref = ButcherTableau("ralston", a=[[], [2 / 3]], b=[0.25, 0.75], order=2)
    variants = [
        dict(a=[[], [np.float64(2 / 3)]], b=[np.float32(0.25), 0.75]),
        dict(a=torch.tensor([[0.0, 0.0], [2 / 3, 0.0]], dtype=torch.float64), b=torch.tensor([0.25, 0.75])),
        dict(a=np.array([[0.0, 0.0], [2 / 3, 0.0]]), b=np.array([0.25, 0.75])),
        dict(a=[[], [torch.tensor(2 / 3, dtype=torch.float64)]], b=[0.25, np.float32(0.75)]),
    ]
    for kwargs in variants:
        tab = ButcherTableau("ralston", order=2, **kwargs)
        assert (tab.a, tab.b, tab.c) == (ref.a, ref.b, ref.c)
    with pytest.raises(ValueError, match=r"a\[1\]\[0\] = tensor\(\[0.5000, 0.5000\]\) is not a number"):
        ButcherTableau("bad", a=[[], [torch.tensor([0.5, 0.5])]], b=[0, 1], order=1)
