"""Rows of the README's migration table not covered by a feature's own tests, each against torchdiffeq 0.2.5.

Float64 throughout unless a row is about dtypes.  Gradients of adaptive solves are
compared with ``first_step`` given: torchdiffeq differentiates through its
initial-step heuristic, mpnode treats step sizes as constants (row
``gradients-adaptive``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mpnode.core
from mpnode.core import odeint

torchdiffeq = pytest.importorskip("torchdiffeq")

F64 = torch.float64


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class Field(torch.nn.Module):
    """``tanh(y W^T) cos(2t) + b s(t)`` on ``(B, 3)``; ``s = 1 + t`` (smooth) or ``[t > 0.6]`` (a jump at 0.6).

    The jump is for ``step_t``/``jump_t``: elsewhere it would make the step-size control hypersensitive (the two
    error estimates differ in roundoff, which moves the rejected steps at the jump).
    """

    def __init__(self, dtype=F64, jump: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(3, 3, generator=gen, dtype=dtype))
        self.b = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=dtype))
        self.jump = jump

    def forward(self, t, y):
        s = (t > 0.6).to(y.dtype) if self.jump else 1 + t
        return torch.tanh(y @ self.W.T) * torch.cos(2 * t) + self.b * s


class TupleField(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = Field()

    def forward(self, t, state):
        x, s = state
        return self.f(t, x), x.sum(-1) * torch.sin(s)


def _solve(solve, times=(0.0, 0.45, 1.2), tuple_state=False, dtype=F64, jump=False, **kw):
    """Outputs and gradients w.r.t. y0, t and the parameters of a fixed random loss."""
    func = TupleField() if tuple_state else Field(dtype, jump)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, generator=gen, dtype=dtype, requires_grad=True)
    y0 = (x0, torch.randn(2, generator=gen, dtype=dtype, requires_grad=True)) if tuple_state else x0
    t = torch.tensor(times, dtype=dtype, requires_grad=True)
    out = solve(func, y0, t, **kw)
    outs = out if tuple_state else (out,)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=dtype)).sum() for o in outs)
    inputs = [*(y0 if tuple_state else (y0,)), t, *func.parameters()]
    return [*(o.detach() for o in outs), *torch.autograd.grad(loss, inputs)]


def _compare(tol, **kw):
    ours, ref = _solve(odeint, **kw), _solve(torchdiffeq.odeint, **kw)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype
        assert _rel(a, b) <= tol


# -- odeint, defaults --------------------------------------------------------------------------------


@pytest.mark.torchdiffeq_row("odeint")
@pytest.mark.torchdiffeq_row("default-method")
@pytest.mark.torchdiffeq_row("default-tolerances")
@pytest.mark.torchdiffeq_row("method-dopri5")
def test_default_call_matches_torchdiffeq():
    """No method, no tolerances: dopri5 at rtol=1e-7, atol=1e-9; gradients: see gradients-adaptive."""
    ours, ref = _solve(odeint), _solve(torchdiffeq.odeint)
    assert _rel(ours[0], ref[0]) <= 1e-12
    _compare(1e-10, options={"first_step": 0.01})


@pytest.mark.torchdiffeq_row("gradients-adaptive")
def test_adaptive_gradients_differ_by_torchdiffeqs_initial_step_term_only():
    ours, ref = _solve(odeint), _solve(torchdiffeq.odeint)
    for a, b in zip(ours[1:], ref[1:]):
        assert _rel(a, b) <= 1e-6
    assert max(_rel(a, b) for a, b in zip(ours[1:], ref[1:])) > 1e-12  # the term exists ...
    _compare(1e-10, options={"first_step": 0.01})  # ... and is all of the difference


@pytest.mark.torchdiffeq_row("grid-options-without-method")
def test_a_grid_option_without_method_selects_rk4():
    ours = _solve(odeint, options={"step_size": 0.1})
    ref = _solve(torchdiffeq.odeint, method="rk4", options={"step_size": 0.1})
    for a, b in zip(ours, ref):
        assert _rel(a, b) <= 1e-10
    with pytest.warns(UserWarning, match="Unexpected arguments"):  # torchdiffeq: dopri5, step_size ignored
        torchdiffeq.odeint(Field(), torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                           options={"step_size": 0.1})


@pytest.mark.torchdiffeq_row("adaptive-grid-options")
@pytest.mark.parametrize("option", [
    {"step_size": 0.01}, {"grid_constructor": lambda f, y0, t: torch.linspace(0, 1.2, 50, dtype=F64)},
])
def test_an_adaptive_method_ignores_a_grid_option_with_one_warning_as_torchdiffeq(option):
    """dopri5 with step_size or grid_constructor: adaptive steps as without the option (torchdiffeq warns
    "Unexpected arguments" and ignores it); mpnode's warning names the fixes, once per call site."""
    with pytest.warns(UserWarning, match="Unexpected arguments"):
        theirs = _solve(torchdiffeq.odeint, method="dopri5", options={"first_step": 0.01, **option})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for _ in range(2):
            ours = _solve(odeint, method="dopri5", options={"first_step": 0.01, **option})
    assert [type(w.message) for w in record] == [mpnode.core.GridOptionIgnoredWarning]
    assert "method='rk4'" in str(record[0].message) and "fixed_grid()" in str(record[0].message)
    plain = _solve(odeint, method="dopri5", options={"first_step": 0.01})
    for a, b, c in zip(ours, plain, theirs):
        assert torch.equal(a, b) and _rel(a, c) <= 1e-10
    stats = mpnode.core.SolverStats()
    with pytest.warns(mpnode.core.GridOptionIgnoredWarning):
        odeint(Field(), torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="dopri5",
               options={"stats": stats, **option})
    assert stats.nfe_forward < 100  # adaptive steps, not 1/0.01 fixed ones


@pytest.mark.torchdiffeq_row("tolerance-tensors")
@pytest.mark.torchdiffeq_row("tuple-state")
@pytest.mark.torchdiffeq_row("option-norm")
def test_per_element_and_per_part_tolerances_match_torchdiffeq():
    rtol = torch.tensor([1e-6, 1e-8, 1e-7], dtype=F64)
    _compare(1e-10, rtol=rtol, atol=1e-9, options={"first_step": 0.01})
    _compare(1e-10, tuple_state=True, rtol=(1e-6, 1e-8), atol=(1e-8, 1e-10), options={"first_step": 0.01})


@pytest.mark.torchdiffeq_row("time-dtypes")
@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.1}), ("dopri5", {"first_step": 0.01})])
def test_float32_states_and_times_match_torchdiffeq(method, options):
    """float32 y0 and t: outputs in float32; fixed grids in t's dtype, adaptive times in float64 (as torchdiffeq)."""
    _compare(1e-5, dtype=torch.float32, method=method, options=options, rtol=1e-5, atol=1e-7)


@pytest.mark.torchdiffeq_row("gradients-fixed")
@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "heun3", "rk4"])
def test_fixed_grid_gradients_match_backprop_through_torchdiffeq(method):
    _compare(1e-10, method=method, options={"step_size": 0.05})


# -- methods -------------------------------------------------------------------------------------------

FIXED = ["euler", "midpoint", "heun2", "heun3", "rk4"]
ADAPTIVE = ["dopri5", "bosh3", "fehlberg2", "adaptive_heun"]


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.torchdiffeq_row(f"method-{m}")) for m in FIXED])
def test_fixed_methods_match_torchdiffeq(method):
    _compare(1e-10, method=method)


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.torchdiffeq_row(f"method-{m}"))
                                    for m in ADAPTIVE])
@pytest.mark.parametrize("times", [(0.0, 0.45, 1.2), (1.2, 0.45, 0.0)])
def test_adaptive_methods_match_torchdiffeq(method, times):
    _compare(1e-9, method=method, times=times, rtol=1e-6, atol=1e-8, options={"first_step": 0.01})


@pytest.mark.torchdiffeq_row("method-dopri8")
def test_dopri8_is_close_to_torchdiffeq():
    """Its error estimate differs from torchdiffeq's by about 1e-5 relative, so its steps differ slightly."""
    ours = _solve(odeint, method="dopri8", rtol=1e-6, atol=1e-8, options={"first_step": 0.01})
    ref = _solve(torchdiffeq.odeint, method="dopri8", rtol=1e-6, atol=1e-8, options={"first_step": 0.01})
    assert _rel(ours[0], ref[0]) <= 1e-5
    assert _rel(ours[0], ref[0]) > 1e-12


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.torchdiffeq_row(f"method-{m}"))
    for m in ["explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver"]
])
def test_methods_mpnode_does_not_have_are_refused_with_the_reason(method):
    y0, t = torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    torchdiffeq.odeint(lambda t, y: -y, y0, t, method=method)  # torchdiffeq has them
    reason = "multistep" if "adams" in method else "scipy"
    with pytest.raises(ValueError, match=rf"method '{method}' \(torchdiffeq\) is not available in mpnode: .*{reason}"):
        odeint(lambda t, y: -y, y0, t, method=method)


# -- options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    pytest.param({"step_size": 0.07}, marks=pytest.mark.torchdiffeq_row("option-step_size")),
    pytest.param({"grid_constructor": lambda f, y0, t: t[0] + (t[-1] - t[0]) * torch.linspace(0, 1, 17, dtype=t.dtype)},
                 marks=pytest.mark.torchdiffeq_row("option-grid_constructor")),
])
@pytest.mark.parametrize("times", [(0.0, 0.45, 1.2), (1.2, 0.45, 0.0)])
def test_fixed_grid_options_match_torchdiffeq(options, times):
    _compare(1e-10, method="rk4", times=times, options=options)


ADAPTIVE_OPTIONS = [
    pytest.param({"first_step": 0.2}, marks=pytest.mark.torchdiffeq_row("option-first_step")),
    pytest.param({"first_step": 0.01, "min_step": 0.05}, marks=pytest.mark.torchdiffeq_row("option-min_step")),
    pytest.param({"first_step": 0.01, "max_step": 0.02}, marks=pytest.mark.torchdiffeq_row("option-max_step")),
    pytest.param({"first_step": 0.01, "safety": 0.5, "ifactor": 3.0, "dfactor": 0.5},
                 marks=[pytest.mark.torchdiffeq_row("option-safety"), pytest.mark.torchdiffeq_row("option-ifactor"),
                        pytest.mark.torchdiffeq_row("option-dfactor")]),
    pytest.param({"first_step": 0.01, "step_t": torch.tensor([0.3, 0.6], dtype=F64)},
                 marks=pytest.mark.torchdiffeq_row("option-step_t")),
    pytest.param({"first_step": 0.01, "jump_t": torch.tensor([0.6], dtype=F64)},
                 marks=pytest.mark.torchdiffeq_row("option-jump_t")),
    pytest.param({"first_step": 0.01, "norm": lambda e: e.abs().max()},
                 marks=pytest.mark.torchdiffeq_row("option-norm")),
]


@pytest.mark.parametrize("options", ADAPTIVE_OPTIONS)
@pytest.mark.parametrize("times", [(0.0, 0.45, 1.2), (1.2, 0.45, 0.0)])
def test_adaptive_options_match_torchdiffeq(options, times):
    jump = "step_t" in options or "jump_t" in options
    _compare(1e-9, times=times, rtol=1e-6, atol=1e-8, options=options, jump=jump)
    baseline = _solve(odeint, times=times, rtol=1e-6, atol=1e-8, options={"first_step": 0.01}, jump=jump)
    assert _rel(_solve(odeint, times=times, rtol=1e-6, atol=1e-8, options=options, jump=jump)[0], baseline[0]) > 1e-12


@pytest.mark.torchdiffeq_row("option-max_num_steps")
def test_max_num_steps_raises_a_runtime_error_where_torchdiffeq_asserts():
    y0, t = torch.ones(3, dtype=F64), torch.tensor([0.0, 5.0], dtype=F64)
    with pytest.raises(AssertionError, match="max_num_steps exceeded"):
        torchdiffeq.odeint(Field(), y0, t, options={"max_num_steps": 3})
    with pytest.raises(RuntimeError, match=r"max_num_steps = 3 .* raise options\['max_num_steps'\]"):
        odeint(Field(), y0, t, options={"max_num_steps": 3})
    _compare(1e-9, options={"max_num_steps": 1000, "first_step": 0.01})  # a bound that holds changes nothing


@pytest.mark.torchdiffeq_row("option-dtype")
def test_the_time_dtype_option_is_refused():
    y0, t = torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    torchdiffeq.odeint(Field(), y0, t, options={"dtype": torch.float32})
    with pytest.raises(ValueError, match=r"option 'dtype' .* float64"):
        odeint(Field(), y0, t, options={"dtype": torch.float32})


@pytest.mark.torchdiffeq_row("unknown-options")
def test_unknown_and_misplaced_options_raise_where_torchdiffeq_warns():
    y0, t = torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    for options, method in (({"stepsize": 0.1}, "rk4"), ({"perturb": True}, "dopri5"), ({"first_step": 0.1}, "rk4")):
        with pytest.warns(UserWarning, match="Unexpected arguments"):
            torchdiffeq.odeint(Field(), y0, t, method=method, options=options)
        with pytest.raises(ValueError, match="option"):
            odeint(Field(), y0, t, method=method, options=options)


# -- inputs ----------------------------------------------------------------------------------------------


@pytest.mark.torchdiffeq_row("complex-y0")
def test_complex_states_are_refused_naming_the_fix():
    y0, t = torch.ones(3, dtype=torch.complex64), torch.tensor([0.0, 1.0])
    torchdiffeq.odeint(lambda t, y: -y, y0, t, method="euler")
    with pytest.raises(TypeError, match="real and imaginary"):
        odeint(lambda t, y: -y, y0, t, method="euler")


class _Stem(torch.nn.Module):
    """An autocast model's pieces: a linear stem (its output is the ODE block's y0) and the block's field."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = torch.nn.Linear(5, 4)
        self.field = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def forward(self, t, y):
        return self.field(y)


@pytest.mark.torchdiffeq_row("state-dtypes")
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.125}), ("dopri5", {"first_step": 0.05})])
def test_a_low_precision_y0_from_an_autocast_model_is_solved_in_float32(low, method, options):
    """A float16/bfloat16 y0 (what a layer under autocast returns): solved in float32, outputs and dL/dy0 in y0's
    dtype as torchdiffeq returns them; the result is the float32 solve of the same y0, rounded."""
    model, x, t = _Stem(), torch.randn(6, 5), torch.tensor([0.0, 0.5, 1.0])
    kw = dict(method=method, options=options, rtol=1e-3, atol=1e-5)

    def run(solve, upcast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=low):
            y0 = model.stem(x)
            y0.retain_grad()
            out = solve(model, y0.float() if upcast else y0, t, **kw).to(low)  # upcast: the same rounded outputs
            loss = (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        loss.backward()
        return out, y0.grad, [p.grad.clone() for p in model.parameters()]

    ours, dy0, dparams = run(odeint, upcast=False)
    ref, ref_dy0, ref_dparams = run(odeint, upcast=True)  # the field's first layer casts to `low` either way
    assert y0_dtype(ours, dy0) == (low, low)
    assert torch.equal(ours, ref) and torch.equal(dy0, ref_dy0)
    assert all(torch.equal(a, b) for a, b in zip(dparams, ref_dparams))  # the stem's gradient too, through dL/dy0
    theirs, their_dy0, _ = run(torchdiffeq.odeint, upcast=False)
    assert y0_dtype(theirs, their_dy0) == (low, low)  # the dtypes a torchdiffeq user gets
    assert _rel(ours.float(), theirs.float()) < 0.05  # and about the same numbers (theirs accumulate in `low`)


def y0_dtype(out, grad):
    return out.dtype, grad.dtype


@pytest.mark.torchdiffeq_row("state-dtypes")
def test_func_sees_t_and_y_in_a_low_precision_y0s_dtype_as_with_torchdiffeq():
    """A model converted to bfloat16 (no autocast) runs as it does with torchdiffeq; the state stays float32."""
    model = _Stem().to(torch.bfloat16)
    y0, t = torch.randn(6, 4, dtype=torch.bfloat16), torch.tensor([0.0, 1.0])
    seen = []

    def func(t, y):
        seen.append((t.dtype, y.dtype))
        return model(t, y)

    out = odeint(func, y0, t, method="rk4", options={"step_size": 0.25})
    theirs = torchdiffeq.odeint(func, y0, t, method="rk4", options={"step_size": 0.25})
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)} and out.dtype == theirs.dtype == torch.bfloat16
    exact = odeint(lambda t, y: model.double()(t, y), y0.double(), t.double(), method="rk4",
                   options={"step_size": 0.25})
    model.to(torch.bfloat16)
    assert _rel(out.double(), exact) <= _rel(theirs.double(), exact) + 2 ** -8


@pytest.mark.torchdiffeq_row("low-precision-t")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_times_are_refused_naming_the_fix(dtype):
    y0, t = torch.ones(3), torch.tensor([0.0, 0.5, 1.0], dtype=dtype)
    torchdiffeq.odeint(lambda t, y: -y, y0, t, method="rk4")
    with pytest.raises(TypeError, match=r"float32 or float64.*t.float\(\)"):
        odeint(lambda t, y: -y, y0, t, method="rk4")


@pytest.mark.torchdiffeq_row("t-device")
def test_t_on_another_device_raises_naming_the_fix():
    with pytest.raises(ValueError, match=r"t.to\(y0.device\)"):
        odeint(lambda t, y: -y, torch.ones(3), torch.tensor([0.0, 1.0], device="meta"), method="euler")


@pytest.mark.torchdiffeq_row("captured-tensors")
def test_a_captured_tensor_gets_its_gradient_and_one_first_used_later_raises():
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    y0, t = torch.ones(3, dtype=F64, requires_grad=True), torch.tensor([0.0, 1.0], dtype=F64)

    def field(t, y):
        return -w * y

    (ref,) = torch.autograd.grad(torchdiffeq.odeint(field, y0, t, method="rk4").sum(), w)
    (ours,) = torch.autograd.grad(odeint(field, y0, t, method="rk4").sum(), w)  # found on the first evaluation
    assert _rel(ours, ref) <= 1e-12

    def late(t, y):  # w enters only after t = 0.5: the first evaluation cannot see it
        return -w * y if t > 0.5 else -y

    with pytest.raises(ValueError, match="adjoint_params"):
        odeint(late, y0, t, method="rk4", options={"step_size": 0.25}).sum().backward()
    (listed,) = torch.autograd.grad(odeint(late, y0, t, method="rk4", options={"step_size": 0.25},
                                           adjoint_params=(w,)).sum(), w)
    (ref,) = torch.autograd.grad(torchdiffeq.odeint(late, y0, t, method="rk4", options={"step_size": 0.25}).sum(), w)
    assert _rel(listed, ref) <= 1e-12


@pytest.mark.torchdiffeq_row("odeint_dense")
def test_odeint_dense_is_not_provided():
    assert callable(torchdiffeq.odeint_dense)
    with pytest.raises(ImportError):
        from mpnode.core import odeint_dense  # noqa: F401
    assert not hasattr(mpnode.core, "odeint_dense")


@pytest.mark.torchdiffeq_row("autocast")
def test_under_bfloat16_autocast_gradients_stay_accurate_where_torchdiffeqs_drift():
    """y' = A y with A a Linear layer, 256 rk4 steps: relative error of dL/dA against float64."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    y0 = torch.randn(16, 8)
    t = torch.linspace(0, 1, 257)

    def grad_a(solve, y, weight, autocast):
        layer = torch.nn.Linear(8, 8, bias=False, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = solve(lambda t, y: layer(y), y, t.to(y.dtype), method="rk4", **(
                {"adjoint_params": tuple(layer.parameters())} if solve is odeint else {}))
            loss = out[-1].square().sum()
        return torch.autograd.grad(loss, layer.weight)[0].double()

    exact = grad_a(odeint, y0.double(), lin.weight.double(), autocast=False)
    ours = _rel(grad_a(odeint, y0, lin.weight, autocast=True), exact)
    theirs = _rel(grad_a(torchdiffeq.odeint, y0, lin.weight, autocast=True), exact)
    assert ours < 1e-2 and theirs > 3 * ours


# -- callbacks --------------------------------------------------------------------------------------------


@pytest.mark.torchdiffeq_row("callbacks-unsupported")
def test_both_warn_about_accept_and_reject_callbacks_on_fixed_grids(decay_with_method):
    y0, t = torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.warns(UserWarning, match="does not support callbacks.*callback_accept_step"):
        torchdiffeq.odeint(decay_with_method("callback_accept_step"), y0, t, method="rk4")
    with pytest.warns(UserWarning, match="callback_accept_step.*never called for method 'rk4'"):
        odeint(decay_with_method("callback_accept_step"), y0, t, method="rk4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        odeint(decay_with_method("callback_accept_step"), y0, t, method="dopri5")
