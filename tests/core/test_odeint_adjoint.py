"""``odeint_adjoint``: torchdiffeq's signature on mpnode's discrete adjoint; results equal ``odeint``'s."""

from __future__ import annotations

import warnings

import pytest
import torch

from mpnode.core import AdjointArgumentsIgnoredWarning, DirectAdjoint, SegmentedAdjoint, odeint, odeint_adjoint

torchdiffeq = pytest.importorskip("torchdiffeq")


class Field(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)
        self.scale = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, t, y):
        return self.scale * torch.tanh(self.lin(y)) * torch.cos(t)


def _outputs_and_grads(solve, func, params, times=(0.0, 0.4, 1.1), **kw):
    torch.manual_seed(1)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(times, dtype=torch.float64, requires_grad=True)
    out = solve(func, y0, t, **kw)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum()
    return [out.detach(), *torch.autograd.grad(loss, [y0, t, *params])]


@pytest.mark.parametrize("method, options", [("rk4", None), ("euler", {"step_size": 0.05}), ("dopri5", None)])
def test_results_equal_odeint(method, options):
    func = Field()
    params = list(func.parameters())
    ours = _outputs_and_grads(odeint_adjoint, func, params, method=method, options=options)
    ref = _outputs_and_grads(odeint, func, params, method=method, options=options)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


@pytest.mark.torchdiffeq_row("odeint_adjoint")
@pytest.mark.torchdiffeq_row("adjoint-gradients")
@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_forward_matches_torchdiffeq_and_gradients_agree_to_discretisation_error(method):
    """Same forward solution; torchdiffeq's continuous-adjoint gradients differ by the solver's error only.

    (Two output times: at an interior output on a grid node the two differ by design, see the README.)
    """
    func = Field()
    params = list(func.parameters())
    options = {"step_size": 0.01} if method == "rk4" else None
    kw = dict(method=method, options=options, rtol=1e-9, atol=1e-11, times=(0.0, 1.1))
    ours = _outputs_and_grads(odeint_adjoint, func, params, **kw)
    ref = _outputs_and_grads(torchdiffeq.odeint_adjoint, func, params, **kw)
    assert float((ours[0] - ref[0]).norm() / ref[0].norm()) < 1e-12
    for a, b in zip(ours[1:], ref[1:]):
        assert float((a - b).norm() / b.norm()) < 1e-6


@pytest.mark.torchdiffeq_row("adjoint-params")
def test_adjoint_params_of_a_closure_and_the_module_default():
    func = Field()
    weight = func.lin.weight

    def closure(t, y):
        return func(t, y)

    with pytest.raises(ValueError, match="adjoint_params"):
        odeint_adjoint(closure, torch.ones(3, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64))
    ours = _outputs_and_grads(odeint_adjoint, closure, list(func.parameters()), adjoint_params=tuple(func.parameters()),
                              method="rk4")
    ref = _outputs_and_grads(odeint, func, list(func.parameters()), method="rk4")
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    out = odeint_adjoint(lambda t, y: -y, torch.ones(3, requires_grad=True), torch.tensor([0.0, 1.0]),
                         method="rk4", adjoint_params=())
    assert out.requires_grad and weight.grad is None


@pytest.mark.torchdiffeq_row("adjoint-params")
def test_a_subset_of_adjoint_params_restricts_the_gradients_like_torchdiffeq():
    """Module parameters left out of adjoint_params are constants: no gradient, the listed ones exact."""
    func = Field()
    y0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    kw = dict(method="rk4", options={"step_size": 0.25})
    out = odeint_adjoint(func, y0, t, adjoint_params=(func.scale,), **kw)
    out.sum().backward()
    assert func.lin.weight.grad is None and func.lin.bias.grad is None  # constants, as torchdiffeq leaves them
    func.zero_grad(set_to_none=True)
    torchdiffeq.odeint_adjoint(func, y0, t, adjoint_params=(func.scale,), **kw).sum().backward()
    assert func.lin.weight.grad is None
    # the listed gradient is the discrete one: torchdiffeq's direct backprop through the same rk4 steps
    (ours,) = torch.autograd.grad(odeint_adjoint(func, y0, t, adjoint_params=(func.scale,), **kw).sum(), [func.scale])
    (theirs,) = torch.autograd.grad(torchdiffeq.odeint(func, y0, t, **kw).sum(), [func.scale])
    assert float((ours - theirs).abs() / theirs.abs()) <= 1e-12


@pytest.mark.torchdiffeq_row("adjoint-params")
@pytest.mark.parametrize("solve", [odeint, odeint_adjoint])
@pytest.mark.parametrize("adjoint", [None, DirectAdjoint(), SegmentedAdjoint()])
def test_tensors_left_out_of_adjoint_params_are_constants_like_torchdiffeq(solve, adjoint):
    """A closure's grad-requiring tensor that adjoint_params leaves out gets no gradient (its .grad stays None),
    also when func first uses it late in the solve, and the listed gradients are those with it held constant."""
    func = Field()
    c = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def closure(t, y):
        return func(t, y) - (c * y if t > 0.5 else 0.0)

    y0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    kw = dict(method="rk4", options={"step_size": 0.125})
    params = tuple(func.parameters())
    extra = {} if adjoint is None else {"adjoint": adjoint}
    out = solve(closure, y0, t, adjoint_params=params, **kw, **extra)
    ours = torch.autograd.grad(out.square().sum(), [y0, *params])
    solve(closure, y0, t, adjoint_params=params, **kw, **extra).square().sum().backward()
    assert c.grad is None
    c.grad = None
    torchdiffeq.odeint_adjoint(closure, y0, t, adjoint_params=params, **kw).square().sum().backward()
    assert c.grad is None  # torchdiffeq's rule
    held = c.detach()

    def constant(t, y):
        return func(t, y) - (held * y if t > 0.5 else 0.0)

    ref = torch.autograd.grad(torchdiffeq.odeint(constant, y0, t, **kw).square().sum(), [y0, *params])
    for a, b in zip(ours, ref):
        assert float((a - b).norm() / b.norm()) <= 1e-12


@pytest.mark.torchdiffeq_row("adjoint-params-mistakes")
@pytest.mark.parametrize("solve", [odeint, odeint_adjoint])
def test_a_single_tensor_as_adjoint_params_is_refused(solve):
    """adjoint_params=w (not (w,)): main's odeint_adjoint iterated w into its rows, which func never reads, and
    gave w a silent zero gradient (as torchdiffeq does); both entry points refuse it, naming (tensor,)."""
    w = torch.tensor([0.5, -0.2, 0.9], dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(TypeError, match=r"got a tensor; pass \(tensor,\)"):
        solve(lambda t, y: torch.tanh(y) * w, y0, t, method="rk4", adjoint_params=w)


@pytest.mark.torchdiffeq_row("adjoint-params-mistakes")
@pytest.mark.parametrize("solve", [odeint, odeint_adjoint])
@pytest.mark.parametrize("adjoint", [None, DirectAdjoint(), SegmentedAdjoint()])
def test_a_listed_non_leaf_tensor_func_never_reads_is_refused(solve, adjoint):
    """adjoint_params=(w * 1,) while func reads w: the copy's gradient is zero and w got a silent zero (main, and
    torchdiffeq); backward refuses it, naming the fix.  A non-leaf tensor func does read passes its gradient on."""
    raw = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64, requires_grad=True)
    w = raw.exp()  # a non-leaf tensor func reads
    y0 = torch.ones(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    kw = dict(method="rk4", options={"step_size": 0.25}, **({} if adjoint is None else {"adjoint": adjoint}))
    out = solve(lambda t, y: torch.tanh(y) * w, y0, t, adjoint_params=(w * 1,), **kw)
    with pytest.raises(ValueError, match=r"computed from other tensors \(non-leaf.*never reads them.*adjoint_params"):
        out.square().sum().backward()
    assert raw.grad is None
    (ours,) = torch.autograd.grad(solve(lambda t, y: torch.tanh(y) * w, y0, t, adjoint_params=(w,), **kw)
                                  .square().sum(), [raw])
    w_again = raw.exp()  # the graph of w was freed by the backward pass above
    (ref,) = torch.autograd.grad(torchdiffeq.odeint(lambda t, y: torch.tanh(y) * w_again, y0, t, method="rk4",
                                                    options={"step_size": 0.25}).square().sum(), [raw])
    assert float((ours - ref).norm() / ref.norm()) <= 1e-12


def _call_with(**adjoint_kw):
    """The solution and its gradients w.r.t. y0 and the parameters."""
    torch.manual_seed(0)
    func = Field()
    y0 = torch.ones(3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = odeint_adjoint(func, y0, t, method="rk4", options={"step_size": 0.5}, **adjoint_kw)
    return [out.detach(), *torch.autograd.grad(out.square().sum(), [y0, *func.parameters()])]


@pytest.mark.torchdiffeq_row("adjoint-arguments")
@pytest.mark.parametrize("adjoint_kw", [
    {"adjoint_rtol": 1e-3}, {"adjoint_atol": 1e-3}, {"adjoint_method": "dopri5", "adjoint_options": {}},
    {"adjoint_options": {"step_size": 0.1}},
])
def test_differing_adjoint_arguments_warn_that_they_have_no_effect(adjoint_kw):
    with pytest.warns(AdjointArgumentsIgnoredWarning, match="no effect.*discrete") as record:
        results = _call_with(**adjoint_kw)
    assert any(name in str(record[0].message) for name in adjoint_kw)
    assert all(torch.equal(a, b) for a, b in zip(results, _call_with()))


@pytest.mark.torchdiffeq_row("adjoint-arguments")
@pytest.mark.torchdiffeq_row("adjoint-seminorm")
@pytest.mark.parametrize("adjoint_kw", [
    {}, {"adjoint_rtol": 1e-7, "adjoint_atol": torch.tensor(1e-9)}, {"adjoint_method": "rk4"},
    {"adjoint_options": {"step_size": 0.5, "norm": "seminorm"}},
])
def test_adjoint_arguments_equal_to_the_forwards_do_not_warn(adjoint_kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdjointArgumentsIgnoredWarning)
        _call_with(**adjoint_kw)


def test_the_warning_is_shown_once_per_call_site():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for _ in range(3):
            _call_with(adjoint_rtol=1e-3)
    assert sum(issubclass(r.category, AdjointArgumentsIgnoredWarning) for r in record) == 1


def test_event_fn_and_mpnode_arguments_pass_through():
    func = Field()
    y0 = torch.tensor([0.5, 0.2, -0.1], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def event(t, y):
        return t - 0.3 - 0.1 * y[0]  # crosses zero near t = 0.35

    a = odeint_adjoint(func, y0, t, event_fn=event, scaler=False)
    b = odeint(func, y0, t, event_fn=event)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(TypeError, match="unexpected keyword"):
        odeint_adjoint(func, y0, t, adjoint_step_size=0.1)
