"""Every input error a user can provoke: a clear message, and nothing mutated."""

from __future__ import annotations

import pytest
import torch

from mpnode.core import odeint


@pytest.fixture
def setup(mlp_field):
    y0 = torch.randn(3, 4, requires_grad=True)
    t = torch.linspace(0, 1, 5)
    snapshot = [p.detach().clone() for p in (*mlp_field.parameters(), y0, t)]
    yield mlp_field, y0, t
    after = [p.detach() for p in (*mlp_field.parameters(), y0, t)]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after)), "inputs were mutated"
    assert all(p.grad is None for p in mlp_field.parameters())


CASES = {
    "t not 1-D": (lambda f, y0, t: dict(t=t.reshape(1, -1)), ValueError, "t must be 1-D"),
    "t not floating": (lambda f, y0, t: dict(t=torch.arange(5)), TypeError, "t must be a floating tensor"),
    "t float16": (lambda f, y0, t: dict(t=t.half()), TypeError, "float32 or float64"),
    "t bfloat16": (lambda f, y0, t: dict(t=t.bfloat16()), TypeError, "float32 or float64"),
    "t not monotone": (lambda f, y0, t: dict(t=torch.tensor([0.0, 0.5, 0.3, 1.0])),
        ValueError, "strictly increasing or strictly decreasing"),
    "t repeated": (lambda f, y0, t: dict(t=torch.tensor([0.0, 0.5, 0.5, 1.0])), ValueError, "no repeats"),
    "t on another device": (lambda f, y0, t: dict(t=torch.linspace(0, 1, 5, device="meta")),
        ValueError, "t.to\\(y0.device\\)"),
    "t empty": (lambda f, y0, t: dict(t=t[:0]), ValueError, "at least one time"),
    "t NaN": (lambda f, y0, t: dict(t=torch.tensor([0.0, float("nan"), 1.0])), ValueError, "inf or NaN"),
    "t not a tensor": (lambda f, y0, t: dict(t=[0.0, 1.0]), TypeError, "torch.tensor"),
    "y0 integer": (lambda f, y0, t: dict(y0=torch.ones(3, 4, dtype=torch.long)),
        TypeError, "y0 must be a real floating tensor.*y0.float\\(\\)"),
    "y0 complex": (lambda f, y0, t: dict(y0=torch.ones(3, 4, dtype=torch.complex64)), TypeError, "real and imaginary"),
    "y0 NaN": (lambda f, y0, t: dict(y0=torch.full((3, 4), float("nan"))), ValueError, "y0 contains inf or NaN"),
    "y0 mixed tuple": (lambda f, y0, t: dict(y0=(y0, y0.detach().double())), TypeError, "share one dtype"),
    "y0 list": (lambda f, y0, t: dict(y0=[y0]), TypeError, "tensor or a non-empty tuple"),
    "unknown method": (lambda f, y0, t: dict(method="dopri7"), ValueError, "unknown method 'dopri7'"),
    "unknown option": (lambda f, y0, t: dict(options={"stepsize": 0.1}),
        ValueError, "unknown option\\(s\\) \\['stepsize'\\]"),
    "step_size zero": (lambda f, y0, t: dict(options={"step_size": 0.0}), ValueError, "must be positive"),
    "step_size negative": (lambda f, y0, t: dict(options={"step_size": -0.1}), ValueError, "direction comes from t"),
    # main parsed strings with float() (torchdiffeq 0.2.5 refuses them with raw TypeErrors)
    "step_size string": (lambda f, y0, t: dict(options={"step_size": "0.1"}),
        TypeError, r"options\['step_size'\] must be a number, got the string '0.1'.*float\('0.1'\)"),
    "rtol string": (lambda f, y0, t: dict(method="dopri5", rtol="1e-3"),
        TypeError, "rtol must be a number, got the string"),
    "first_step string": (lambda f, y0, t: dict(method="dopri5", options={"first_step": "0.1"}),
        TypeError, r"options\['first_step'\] must be a number, got the string"),
    "step_t 2-D": (lambda f, y0, t: dict(method="dopri5", options={"step_t": torch.tensor([[0.3], [0.6]])}),
        ValueError, r"options\['step_t'\] must be a list or 1-D tensor of times, got shape \(2, 1\)"),
    "step_size and grid": (lambda f, y0, t: dict(options={"step_size": 0.1, "grid_constructor": lambda f, y, t: t}),
        ValueError, "mutually exclusive"),
    "bad grid end": (lambda f, y0, t: dict(options={"grid_constructor": lambda f, y, t: t[:-1]}),
        ValueError, "end at t\\[-1\\]"),
    "bad checkpoint dtype": (lambda f, y0, t: dict(options={"checkpoint_dtype": torch.int8}),
        TypeError, "floating torch.dtype"),
    "bad scaler": (lambda f, y0, t: dict(scaler="yes"), TypeError, "scaler must be"),
    "wrong output shape": (lambda f, y0, t: dict(func=lambda t, y: y[:, :2]),
        ValueError, "has shape \\(3, 2\\) but the state has shape \\(3, 4\\)"),
    "wrong output dtype": (lambda f, y0, t: dict(func=lambda t, y: (y > 0).long()), TypeError, "real floating tensor"),
    "output not a tensor": (lambda f, y0, t: dict(func=lambda t, y: y.tolist()), TypeError, "must return a tensor"),
    "tuple output mismatch": (lambda f, y0, t: dict(y0=(y0, y0), func=lambda t, y: y[0]),
        TypeError, "tuple of 2 tensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_input_error(case, setup):
    f, y0, t = setup
    make, error, message = CASES[case]
    kwargs = dict(func=f, y0=y0, t=t, method="rk4")
    kwargs.update(make(f, y0, t))
    func, y, tt = kwargs.pop("func"), kwargs.pop("y0"), kwargs.pop("t")
    with pytest.raises(error, match=message):
        odeint(func, y, tt, **kwargs)


def test_blow_up_in_forward_is_reported(setup):
    _f, y0, t = setup
    with pytest.raises(FloatingPointError, match="became inf/NaN"):
        odeint(lambda t, y: torch.exp(torch.exp(10 * y.abs())), y0.detach(), t, method="rk4")


def test_captured_tensor_is_refused_at_backward(setup):
    """Without adjoint_params, a grad-requiring tensor func first uses after its first evaluation raises."""
    f, y0, t = setup
    w = torch.randn(4, requires_grad=True)
    out = odeint(lambda t, y: f(t, y) * (w if t > 0.5 else 1.0), y0, t, method="rk4")
    with pytest.raises(ValueError, match="adjoint_params"):
        out.sum().backward()
    assert w.grad is None
    f.zero_grad(set_to_none=True)
    y0.grad = None
