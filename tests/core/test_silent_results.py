"""Issue 15, items 1-8: no silently wrong result from the new capabilities.

Each test compares with torchdiffeq (direct backpropagation through the same
tableau and steps) or with another strategy in float64, or checks an invariant
a user relies on (the loss scale does not change float16 gradients); every test
runs on ``--device``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mpnode.core import (
    TABLEAUX,
    AutoAdjoint,
    ButcherTableau,
    DirectAdjoint,
    NonFiniteGradientError,
    RecomputeAdjoint,
    SegmentedAdjoint,
    SolverStats,
    odeint,
)
from mpnode.core.testing import assert_relatively_close as _close

torchdiffeq = pytest.importorskip("torchdiffeq")

F64 = torch.float64
TOL = 1e-8

STRATEGIES = {
    "recompute": RecomputeAdjoint,
    "direct": DirectAdjoint,
    "segmented": lambda: SegmentedAdjoint(checkpoints=2),
    "auto-falling-back": lambda: AutoAdjoint(budget_bytes=1),
}




# -- 1. module modes changed between forward and backward ---------------------------------------------------------


def _modes(module):
    return [m.training for m in module.modules()]


def _grads_after_switch(solve, field, forward_mode, y0, t, **kwargs):
    field.train(forward_mode == "train")
    torch.manual_seed(3)
    out = solve(field, y0, t, method="rk4", **kwargs)
    field.train(forward_mode != "train")  # the switch between forward and backward
    wrt = (y0, field.lin.weight, field.bn.weight, field.out.weight)
    return torch.autograd.grad(out[-1].pow(2).sum(), wrt)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("forward_mode", ["train", "eval"])
def test_module_modes_switched_before_backward_are_replayed(forward_mode, strategy, device, normed_field):
    """``model.eval()`` (or ``.train()``) between forward and backward: the gradient is the forward's function's.

    A fresh BatchNorm in eval mode is the identity; in train mode it normalises by the batch: the two differ by
    O(1), as do dropout on and off (main: dL/dW off by 0.1-1 under every recomputing strategy).
    """
    field = normed_field(dropout=True)
    start = copy.deepcopy(field.state_dict())
    y0 = torch.randn(6, 3, dtype=F64, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=F64, device=device)
    ours = _grads_after_switch(odeint, field, forward_mode, y0, t, adjoint=STRATEGIES[strategy]())
    assert _modes(field) == [forward_mode != "train"] * len(_modes(field))  # the user's flags are given back
    after = copy.deepcopy(field.state_dict())
    field.load_state_dict(start)
    ref = _grads_after_switch(torchdiffeq.odeint, field, forward_mode, y0, t)
    _close(ours, ref)
    for name, value in field.state_dict().items():  # buffers as torchdiffeq's forward left them
        assert torch.allclose(after[name], value, rtol=1e-12, atol=1e-15), name


def test_module_modes_are_given_back_when_backward_raises(device, normed_field):
    field = normed_field(dropout=True)
    state = {"fail": False}

    def func(t, y):
        if state["fail"]:
            raise RuntimeError("the field failed in backward")
        return field(t, y)

    y0 = torch.randn(6, 3, dtype=F64, device=device, requires_grad=True)
    out = odeint(func, y0, torch.linspace(0, 1, 5, dtype=F64, device=device), method="rk4")
    field.eval()
    field.drop.train()  # a mixed setting must come back exactly
    expected = _modes(field)
    state["fail"] = True
    with pytest.raises(RuntimeError, match="failed in backward"):
        out[-1].sum().backward()
    assert _modes(field) == expected
    assert y0.grad is None


# -- 2. tensors without gradient changed in place between forward and backward ------------------------------------


def _field_reading(kind, device):
    """A field reading a tensor that does not require grad, and that tensor."""
    lin = torch.nn.Linear(2, 2).to(device, F64)
    if kind == "captured-constant":
        c = torch.tensor([0.7, 0.3], dtype=F64, device=device)
        return (lambda t, y: -c * y), c, lin
    if kind == "frozen-parameter":
        lin.weight.requires_grad_(False)
        return (lambda t, y: torch.tanh(lin(y))), lin.weight, lin
    if kind == "registered-buffer":
        lin.register_buffer("scale", torch.tensor([1.0, 2.0], dtype=F64, device=device))
        return (lambda t, y: torch.tanh(lin(y)) * lin.scale), lin.scale, lin
    bn = torch.nn.BatchNorm1d(2).to(device, F64).eval()  # eval mode reads the running statistics
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
    return (lambda t, y: torch.tanh(bn(lin(y)))), bn.running_mean, lin


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("kind", ["captured-constant", "frozen-parameter", "registered-buffer", "eval-batchnorm-stats"])
def test_tensor_without_gradient_changed_before_backward_raises(kind, strategy, device):
    """As torchdiffeq does (autograd's saved-tensor check); main silently used the new values (dL/dy0 off by 0.1-1)."""
    func, read, lin = _field_reading(kind, device)
    y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=F64, device=device, requires_grad=True)
    out = odeint(func, y0, torch.linspace(0, 1, 5, dtype=F64, device=device), method="rk4",
                 adjoint=STRATEGIES[strategy]())
    with torch.no_grad():
        read.mul_(2)
    with pytest.raises(RuntimeError, match=r"modified in place after the forward pass"):
        out[-1].sum().backward()
    assert y0.grad is None and all(p.grad is None for p in lin.parameters())


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("listed", [False, True], ids=["discovered", "adjoint_params"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_buffers_the_forward_updates_and_optimizer_steps_after_backward_do_not_raise(mode, momentum, listed, strategy,
                                                                                     device):
    """Two solves sharing a BatchNorm (each forward updates its statistics), a no-grad call of the model between
    forward and backward, and optimizer steps after each backward: no false alarm, gradients as torchdiffeq's."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(3, 3)
            self.bn = torch.nn.BatchNorm1d(3, momentum=momentum)
            self.frozen = torch.nn.Linear(3, 3).requires_grad_(False)

        def forward(self, t, y):
            return torch.tanh(self.bn(self.lin(y))) + 0.1 * self.frozen(y)

    net = Net().to(device, F64).train(mode == "train")
    start = copy.deepcopy(net.state_dict())
    y0 = torch.randn(6, 3, dtype=F64, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=F64, device=device)
    params = tuple(p for p in net.parameters() if p.requires_grad)

    def iteration(solve, **kwargs):
        first = solve(net, y0, t, method="rk4", **kwargs)
        second = solve(net, 2 * y0, t, method="rk4", **kwargs)
        with torch.no_grad():
            net(t[0], y0)  # e.g. a validation batch between forward and backward
        return torch.autograd.grad(first[-1].sum() + second[-1].pow(2).sum(), (y0, *params))

    kwargs = {"adjoint_params": params} if listed else {}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    ours = []
    for _ in range(2):
        grads = iteration(odeint, adjoint=STRATEGIES[strategy](), **kwargs)
        ours.append(grads)
        for p, g in zip(params, grads[1:]):
            p.grad = g
        optimizer.step()
    net.load_state_dict(start)
    for a, b in zip(ours[0], iteration(torchdiffeq.odeint), strict=True):  # (lin.bias's is 0 in train mode: BN)
        assert torch.allclose(a, b, rtol=TOL, atol=1e-13), (a, b)


# -- 3. a tensor first used late in the solve when y0 needs no gradient --------------------------------------------

_LATE = {}


def _late_global_field(t, y):
    return -_LATE["w"] * y if float(t) > 0.5 else -y


class _LateObject:
    def __init__(self, w):
        self.w = w

    def __call__(self, t, y):
        return -self.w * y if float(t) > 0.5 else -y


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("capture", ["closure", "callable-object", "global"])
def test_tensor_first_used_late_with_data_y0_is_refused(capture, strategy, device):
    """Main returned an output without graph: with a weight-decay term in w, dL/dw silently lost the ODE part."""
    w = torch.tensor([0.7, 0.3], dtype=F64, device=device, requires_grad=True)
    func = _late_field(capture, w)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, device=device)
    t = torch.linspace(0, 1, 5, dtype=F64, device=device)
    out = odeint(func, y0, t, method="rk4", adjoint=STRATEGIES[strategy]())
    with pytest.raises(ValueError, match="adjoint_params"):
        (out[-1].sum() + w.pow(2).sum()).backward()
    assert w.grad is None
    ours = torch.autograd.grad(odeint(func, y0, t, method="rk4", adjoint_params=(w,))[-1].sum() + w.pow(2).sum(), w)
    ref = torch.autograd.grad(torchdiffeq.odeint(func, y0, t, method="rk4")[-1].sum() + w.pow(2).sum(), w)
    _close(ours, ref)


@pytest.mark.parametrize("capture", ["closure", "callable-object", "global"])
def test_tensor_left_out_of_an_explicit_adjoint_params_is_a_constant(capture, device):
    """An explicit list is the whole list (torchdiffeq's odeint_adjoint rule): w gets only the other term's gradient."""
    w = torch.tensor([0.7, 0.3], dtype=F64, device=device, requires_grad=True)
    func = _late_field(capture, w)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, device=device)
    t = torch.linspace(0, 1, 5, dtype=F64, device=device)
    ours = torch.autograd.grad(odeint(func, y0, t, method="rk4", adjoint_params=())[-1].sum() + w.pow(2).sum(), w)
    ref = torch.autograd.grad(torchdiffeq.odeint_adjoint(func, y0, t, method="rk4", adjoint_params=())[-1].sum()
                              + w.pow(2).sum(), w)
    _close(ours, ref)
    _close(ours, (2 * w.detach(),))


def _late_field(capture: str, w: torch.Tensor):
    _LATE["w"] = w
    return {
        "closure": lambda t, y: -w * y if float(t) > 0.5 else -y,
        "callable-object": _LateObject(w),
        "global": _late_global_field,
    }[capture]


def test_solve_of_data_only_keeps_no_graph(device):
    frozen = torch.nn.Linear(2, 2).to(device, F64).requires_grad_(False)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, device=device)
    out = odeint(lambda t, y: torch.tanh(frozen(y)), y0, torch.linspace(0, 1, 3, dtype=F64, device=device),
                 method="rk4")
    assert not out.requires_grad


# -- 4. float16: the loss scale does not change the gradient: tests/scaler/test_interpolated_outputs.py (the dynamic
# scaler is mpnode-scaler's; core alone runs float16 unscaled and raises on overflow) ----------------------------------


# -- 5. evaluation counts of the strategies that keep graphs on adaptive steps ---------------------------------------


@pytest.mark.parametrize("strategy", ["direct", "auto-keeping-graphs", "recompute"])
@pytest.mark.parametrize("options", [None, {"jump_t": [0.45]}, {"first_step": 1.0}],
                         ids=["default", "jump_t", "rejected-first-attempt"])
def test_adaptive_steps_evaluate_the_field_as_often_as_torchdiffeq(options, strategy, device, normed_field):
    """Main evaluated the first stage of the first step (and after each rejected first attempt and each jump) twice
    under DirectAdjoint and AutoAdjoint: BatchNorm statistics were updated once more than torchdiffeq's."""
    adjoint = {"direct": DirectAdjoint(), "auto-keeping-graphs": AutoAdjoint(budget_bytes=2**30),
               "recompute": RecomputeAdjoint()}[strategy]
    field = normed_field(time_factor=True)
    start = copy.deepcopy(field.state_dict())
    y0 = torch.randn(5, 3, dtype=F64, device=device, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64, device=device)
    stats = SolverStats()
    kwargs = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-8}
    ours = odeint(field, y0, t, adjoint=adjoint, options={**(options or {}), "stats": stats}, **kwargs)
    ours_buffers = copy.deepcopy(field.state_dict())
    field.load_state_dict(start)
    ref = torchdiffeq.odeint(field, y0, t, options=options, **kwargs)
    assert stats.last_adjoint == {"auto-keeping-graphs": "direct"}.get(strategy, strategy)
    assert int(ours_buffers["bn.num_batches_tracked"]) == int(field.bn.num_batches_tracked) == stats.nfe_forward
    for name, value in field.state_dict().items():
        assert torch.allclose(ours_buffers[name], value, rtol=1e-10, atol=1e-14), name
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)


# -- 6. a user tableau's dense output ------------------------------------------------------------------------------

_BOSH3 = {"a": [[], ["1/2"], [0, "3/4"], ["2/9", "1/3", "4/9"]], "b": ["2/9", "1/3", "4/9", 0], "order": 3,
          "b_hat": ["7/24", "1/4", "1/3", "1/8"], "embedded_order": 2, "reuse_last_stage": True}


@pytest.mark.parametrize("case, match", [
    ({"c_mid": [0, "0.52", 0, 0]}, r"c_mid sums to 0.52, not 1/2.*check c_mid"),  # main: accepted, outputs 4 % off
    ({"dense": [[1, "-3/2"], ["1/2", 0], [0, "3/2"], [0, 0]]}, r"x = 1"),
    ({"dense": [[0, "2/9"], [0, "1/3"], [0, "4/9"], [0, 0]]}, r"dense output \(from dense\).*order-1"),
    ({"c_mid": [0, "1/2", 0, 0], "dense_order": 2}, r"order-2 conditions.*dense_order"),
    ({"dense_order": 2}, r"dense_order is given but there is no dense output"),
], ids=["c_mid-sum", "dense-end", "dense-consistency", "declared-order", "order-without-dense"])
def test_inconsistent_dense_output_is_refused(case, match):
    with pytest.raises(ValueError, match=match):
        ButcherTableau("user", **_BOSH3, **case)


def test_builtin_dense_outputs_have_their_declared_order():
    from mpnode.core.tableau import dense_order_defect

    for name, tab in TABLEAUX.items():
        if tab.dense is not None:
            assert dense_order_defect(tab.a, tab.dense, tab.dense_order) < 1e-12, name
            assert dense_order_defect(tab.a, tab.dense, tab.dense_order + 1) > 1e-3, name  # declared as high as it is
    ok = ButcherTableau("user-bosh3", **_BOSH3, c_mid=[0, "1/2", 0, 0])
    assert ok.dense == TABLEAUX["bosh3"].dense and ok.dense_order == 1


# -- 7. time gradients under DirectAdjoint take the same steps ------------------------------------------------------


@pytest.mark.parametrize("method", ["dopri8", "dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun"])
def test_direct_adjoint_with_time_gradients_takes_the_same_steps(method, device):
    """Main: a kept graph with traced times computed its stages with other arithmetic than the graph-free march,
    so DirectAdjoint with ``t.requires_grad`` took another step sequence (dopri8: 1e-7 here, 8.5e-9 in the issue)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device, F64)
    y0 = torch.randn(4, 3, dtype=F64, device=device, requires_grad=True)
    runs = []
    for adjoint in (RecomputeAdjoint(), DirectAdjoint()):
        t = torch.tensor([0.0, 0.3, 1.0], dtype=F64, device=device, requires_grad=True)
        stats = SolverStats()
        out = odeint(lambda s, y: net(y) * torch.cos(s), y0, t, method=method, adjoint=adjoint,
                     options={"stats": stats})
        runs.append((stats.last_grid, out.detach(), torch.autograd.grad(out.pow(2).sum(), (y0, t, *net.parameters()))))
    (grid_r, out_r, grads_r), (grid_d, out_d, grads_d) = runs
    assert grid_d == grid_r
    assert torch.equal(out_d, out_r)
    _close(grads_d, grads_r, tol=1e-12)


# -- 8. an inf/NaN gradient arriving at the solution -----------------------------------------------------------------


@pytest.mark.parametrize("method, options", [("dopri5", None), ("rk4", {"step_size": 0.25, "interp": "cubic"})],
                         ids=["dopri5", "rk4-cubic"])
def test_float16_nonfinite_gradient_at_an_interpolated_output_names_the_loss(method, options, device):
    """Without a scaler the error names the loss (dynamic scaler: tests/scaler/test_interpolated_outputs.py)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(device)
    y0 = torch.randn(8, 4, device=device)
    with torch.autocast(device.type, dtype=torch.float16):
        out = odeint(lambda t, y: net(y), y0, torch.tensor([0.0, 0.4, 1.0], device=device), method=method,
                     options=options, rtol=1e-3, atol=1e-3, scaler=False)
    with pytest.raises(NonFiniteGradientError, match=r"received an inf/NaN gradient at the solution"):
        (out[1].sum() * float("nan") + out[-1].sum()).backward()
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_nonfinite_loss_gradient_without_float16_reaches_grad_as_documented(precision, amp, device):
    """docs/guarantees.md: without float16 the backward makes no host synchronisation, so it does not check;
    an inf/NaN loss gradient reaches ``.grad`` as under autograd and torchdiffeq."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(device)
    y0 = torch.randn(8, 4, device=device)
    with amp(precision):
        out = odeint(lambda t, y: net(y), y0, torch.tensor([0.0, 0.4, 1.0], device=device), rtol=1e-3, atol=1e-3)
    (out[1].sum() * float("nan") + out[-1].sum()).backward()
    assert torch.isnan(net[0].weight.grad).all()
