"""Issue 8: no silent wrong, missing or zero gradient from the recompute backward.

Numbers are compared with torchdiffeq (direct backpropagation through the same
tableau and grid) in float64 at 1e-8 relative; every test runs on ``--device``.
"""

from __future__ import annotations

import pytest
import torch

from mpnode.core import AutoAdjoint, DirectAdjoint, RecomputeAdjoint, SegmentedAdjoint, SolverStats, odeint
from mpnode.core.testing import assert_relatively_close as _close
from mpnode.core.testing import relative_error as _rel

torchdiffeq = pytest.importorskip("torchdiffeq")

F64 = torch.float64




def _grads(solve, field, y0, t, loss, wrt, **kwargs):
    out = solve(field, y0, t, method="rk4", **kwargs)
    return out, torch.autograd.grad(loss(out), wrt)


def _mlp(device, dim=3, width=8, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.Tanh(), torch.nn.Linear(width, dim))
    return net.to(device, F64)


# -- 1. closure-captured tensors ------------------------------------------------------------------


@pytest.mark.parametrize("direct_term", [True, False], ids=["loss-uses-c", "only-through-solution"])
def test_captured_tensor_with_data_y0_gets_its_gradient(direct_term, device):
    """y0 is data, nothing else needs a gradient: c must still get dL/dc (was +1.0 vs -0.49, or an autograd error)."""
    c = torch.tensor(0.7, dtype=F64, device=device, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, device=device)
    t = torch.linspace(0, 1, 9, dtype=F64, device=device)

    def loss(out):
        return out[-1].sum() + (c if direct_term else 0)

    grads = [_grads(solve, lambda t, y: -c * y, y0, t, loss, (c,))[1] for solve in (odeint, torchdiffeq.odeint)]
    _close(*grads)


def test_encoder_context_of_a_latent_ode_trains(device):
    """The conditioning-vector pattern: a non-leaf context from an encoder, captured by the field."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(5, 3).to(device, F64)
    net = _mlp(device)
    x = torch.randn(4, 5, dtype=F64, device=device)
    y0 = torch.randn(4, 3, dtype=F64, device=device)
    t = torch.linspace(0, 1, 9, dtype=F64, device=device)
    wrt = (*encoder.parameters(), *net.parameters())
    grads = []
    for solve in (odeint, torchdiffeq.odeint):
        context = torch.tanh(encoder(x))
        grads.append(_grads(solve, lambda t, y, context=context: net(y) * context, y0, t, lambda o: (o[1:] ** 2).sum(),
                            wrt)[1])
    _close(*grads)


def test_module_context_attribute_is_discovered(device):
    class Conditioned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp(device)
            self.context = None

        def forward(self, t, y):
            return self.net(y) + self.context

    field = Conditioned()
    raw = torch.randn(4, 3, dtype=F64, device=device, requires_grad=True)
    y0 = torch.randn(4, 3, dtype=F64, device=device)
    t = torch.linspace(0, 1, 5, dtype=F64, device=device)
    grads = []
    for solve in (odeint, torchdiffeq.odeint):
        field.context = 2 * raw
        grads.append(_grads(solve, field, y0, t, lambda o: o[-1].pow(2).sum(), (raw, *field.parameters()))[1])
    _close(*grads)


def test_discovery_costs_no_extra_evaluation(device):
    c = torch.tensor(0.7, dtype=F64, device=device, requires_grad=True)
    calls = []

    def field(t, y):
        calls.append(1)
        return -c * y

    stats = SolverStats()
    out = odeint(field, torch.ones(2, dtype=F64, device=device), torch.linspace(0, 1, 9, dtype=F64, device=device),
                 method="rk4", options={"stats": stats})
    assert len(calls) == stats.nfe_forward == 8 * 4
    out[-1].sum().backward()
    assert c.grad is not None


# -- 2. tensors used on part of the trajectory ----------------------------------------------------


def test_tensor_used_on_the_early_part_only_gets_its_gradient(device):
    """Used only for t < 0.3: the old check looked at the last step only and its .grad stayed None."""
    c = torch.tensor(0.7, dtype=F64, device=device, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 11, dtype=F64, device=device)

    def field(t, y):
        return -c * y if t < 0.3 else -y

    grads = [_grads(solve, field, y0, t, lambda o: o[-1].sum(), (c, y0))[1] for solve in (odeint, torchdiffeq.odeint)]
    _close(*grads)


def test_tensor_first_used_later_is_refused_before_any_gradient_is_written(device):
    """The first evaluation cannot see it: backward must raise (checked at every step), writing nothing."""
    net = _mlp(device)
    c = torch.tensor(0.7, dtype=F64, device=device, requires_grad=True)
    y0 = torch.randn(4, 3, dtype=F64, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 11, dtype=F64, device=device)

    def field(t, y):
        return net(y) * (c if 0.45 < t < 0.55 else 1.0)

    stats = SolverStats()
    out = odeint(field, y0, t, method="rk4", options={"stats": stats})
    before = stats.as_dict()
    with pytest.raises(ValueError, match=r"adjoint_params.*first used later"):
        out[-1].sum().backward()
    assert c.grad is None and y0.grad is None and all(p.grad is None for p in net.parameters())
    assert stats.as_dict() == before  # the aborted backward added nothing
    # naming it in adjoint_params gives torchdiffeq's numbers
    wrt = (c, y0, *net.parameters())
    ours = _grads(odeint, field, y0, t, lambda o: o[-1].sum(), wrt, adjoint_params=(c, *net.parameters()))[1]
    ref = _grads(torchdiffeq.odeint, field, y0, t, lambda o: o[-1].sum(), wrt)[1]
    _close(ours, ref)


# -- 3. stochastic fields -----------------------------------------------------------------------------


class _Noisy(torch.nn.Module):
    """Dropout and ``randn_like`` noise: draws from the generator of the state's device."""

    def __init__(self, device):
        super().__init__()
        self.net = _mlp(device)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, t, y):
        return self.drop(self.net(y)) + 0.1 * torch.randn_like(y)


def _noisy_grads(solve, field, y0, t, seed, **kwargs):
    torch.manual_seed(seed)
    out = solve(field, y0, t, method="rk4", **kwargs)
    after_forward = torch.get_rng_state()
    grads = torch.autograd.grad(out[-1].pow(2).sum(), (y0, *field.parameters()))
    return out, grads, after_forward


@pytest.mark.torchdiffeq_row("random-fields")
@pytest.mark.parametrize("options", [None, {"step_size": 0.1, "interp": "cubic"}], ids=["grid", "step_size-cubic"])
def test_stochastic_field_gradient_matches_the_same_noise(options, device):
    field = _Noisy(device)
    y0 = torch.randn(4, 3, dtype=F64, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 6, dtype=F64, device=device)
    out, ours, state = _noisy_grads(odeint, field, y0, t, 7, options=options)
    out_ref, ref, _ = _noisy_grads(torchdiffeq.odeint, field, y0, t, 7, options=options)
    assert torch.allclose(out, out_ref, rtol=1e-12, atol=1e-12)  # the same draws in the forward
    _close(ours, ref)
    assert torch.equal(torch.get_rng_state(), state)  # backward leaves the generators where forward left them
    # without replay the recomputation draws fresh numbers: the gradient belongs to other noise
    _, fresh, _ = _noisy_grads(odeint, field, y0, t, 7, options=options, adjoint=RecomputeAdjoint(replay_rng=False))
    assert max(_rel(a, b) for a, b in zip(fresh, ref)) > 1e-3


@pytest.mark.torchdiffeq_row("random-fields")
def test_stochastic_field_on_an_adaptive_grid_is_refused(device):
    field = _Noisy(device)
    y0 = torch.randn(4, 3, dtype=F64, device=device, requires_grad=True)
    stats = SolverStats()
    with pytest.raises(RuntimeError, match=r"random numbers.*step_size.*replay_rng=False"):
        odeint(field, y0, torch.tensor([0.0, 1.0], dtype=F64, device=device), rtol=1e-4, atol=1e-6,
               options={"stats": stats})
    assert stats.as_dict() == SolverStats().as_dict()
    out = odeint(field, y0, torch.tensor([0.0, 1.0], dtype=F64, device=device), rtol=1e-4, atol=1e-6,
                 adjoint=RecomputeAdjoint(replay_rng=False))  # the opt-out
    out[-1].sum().backward()


def test_deterministic_field_keeps_no_generator_states(device):
    from mpnode.core.replay import RandomStates, StepRandomness

    log = StepRandomness(RandomStates([]))
    log.start()
    for n in range(5):
        log.at_step(n)
    assert not log.finish() and log.states == [] and log.initial is None
    log = StepRandomness(RandomStates([]))
    log.start()
    log.at_step(0)
    log.at_step(1)
    torch.rand(1)  # step 1 consumes randomness
    for n in range(2, 5):
        log.at_step(n)
    assert log.finish() and log.first_changed == 2 and len(log.states) == 3
    assert log.state(0) is log.initial and log.state(1) is log.initial


# -- 4. in-place modification between forward and backward ---------------------------------------------


def test_parameter_changed_by_an_optimizer_step_before_backward_raises(device):
    net = _mlp(device)
    y0 = torch.randn(4, 3, dtype=F64, device=device, requires_grad=True)
    out = odeint(lambda t, y: net(y), y0, torch.linspace(0, 1, 5, dtype=F64, device=device), method="rk4")
    loss = out[-1].pow(2).sum()
    with torch.no_grad():
        net[0].weight.mul_(2)
    with pytest.raises(RuntimeError, match=r"shape \(8, 3\).*modified in place"):
        loss.backward()
    assert y0.grad is None and all(p.grad is None for p in net.parameters())


def test_captured_tensor_changed_in_place_before_backward_raises(device):
    c = torch.tensor([0.7, 0.2], dtype=F64, device=device, requires_grad=True)
    out = odeint(lambda t, y: -c * y, torch.ones(2, dtype=F64, device=device),
                 torch.linspace(0, 1, 5, dtype=F64, device=device), method="rk4")
    with torch.no_grad():
        c.add_(1)
    with pytest.raises(RuntimeError, match=r"shape \(2,\).*modified in place"):
        out.sum().backward()
    assert c.grad is None


# -- 5. second order ------------------------------------------------------------------------------------


def _scalar_loss(device):
    y0 = torch.tensor([1.0, 2.0], dtype=F64, device=device)
    t = torch.linspace(0, 1, 5, dtype=F64, device=device)
    return lambda p: odeint(lambda t, y: torch.tanh(y @ p), y0, t, method="rk4", adjoint_params=(p,))[-1].sum()


@pytest.mark.torchdiffeq_row("second-derivatives")
@pytest.mark.parametrize("how", ["hvp", "hessian", "create_graph"])
def test_second_derivatives_raise_instead_of_returning_zeros(how, device):
    loss = _scalar_loss(device)
    p = torch.eye(2, dtype=F64, device=device) * 0.5
    with pytest.raises(RuntimeError, match=r"second derivative.*first-order only"):
        if how == "hvp":
            torch.autograd.functional.hvp(loss, p, torch.ones_like(p))
        elif how == "hessian":
            torch.autograd.functional.hessian(loss, p)
        else:
            p.requires_grad_(True)
            torch.autograd.grad(loss(p), p, create_graph=True)


# -- 6. float16 checkpoints out of float16's range -------------------------------------------------------


@pytest.mark.parametrize("size", [1e-8, 1e5])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "float16-autocast"])
def test_float16_checkpoints_of_tiny_and_huge_states(size, autocast, device):
    """|y| ~ 1e-8 used to be stored as 0 (dL/da exactly 0); |y| ~ 1e5 as inf (backward failed)."""
    a = torch.tensor(1.3, device=device, requires_grad=True)
    y0 = torch.full((4,), size, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 9, device=device)
    field = lambda t, y: -a * y  # noqa: E731  (elementwise: stays float32 under autocast)
    loss = lambda o: (o[-1] / size).pow(2).sum()  # noqa: E731
    ref = _grads(torchdiffeq.odeint, field, y0.detach().double().requires_grad_(), t.double(), loss,
                 (a,))[1]  # float64 reference (a's grad only: y0 differs in dtype)
    with torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
        _, ours = _grads(odeint, field, y0, t, loss, (a, y0), options={"checkpoint_dtype": torch.float16},
                         scaler=False, adjoint_params=(a,))
    assert _rel(ours[0].double(), ref[0]) < 2e-3  # float16's unit roundoff is 4.9e-4
    assert torch.isfinite(ours[1]).all() and ours[1].abs().min() > 0


def test_scaled_checkpoint_rows_round_trip_without_host_syncs(device, sync_counter):
    from mpnode.core.checkpoints import CheckpointStore

    rows = [torch.full((3,), v, device=device) for v in (1e-8, 1e5, 0.0, -3.0, 6e4)]
    rows.append(torch.tensor([1e-8, 1.0, 1e4], device=device))
    store = CheckpointStore(3, torch.float16, device, rows=len(rows))
    counter = sync_counter()
    with counter:
        for r in rows:
            store.append(r)
        stored = store.finish()
    assert counter.count == 0 and stored.scales is not None
    for n, r in enumerate(rows):
        back = stored.row(n)
        assert back.dtype == torch.float32
        assert torch.allclose(back, r, rtol=2**-11, atol=0) or (n == 5 and torch.allclose(back[1:], r[1:], rtol=2**-11))
    assert len(stored.tensors()) == 2  # one chunk of rows, one of scales (4 bytes per row)


def test_bfloat16_and_float32_checkpoints_are_not_scaled(device):
    from mpnode.core.checkpoints import CheckpointStore

    for dtype in (torch.bfloat16, torch.float32):
        store = CheckpointStore(3, dtype, device, rows=1)
        store.append(torch.ones(3, device=device))
        assert store.finish().scales is None


def test_float16_overflow_with_scaler_false_names_the_argument(mlp_field, device):
    from mpnode.core import NonFiniteGradientError

    y0 = torch.randn(3, 4, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.float16):
        out = odeint(mlp_field.to(device), y0, torch.linspace(0, 1, 5, device=device), method="rk4", scaler=False)
        loss = 1e30 * out[-1].sum()
    with pytest.raises(NonFiniteGradientError, match=r"scaling is off \(scaler=False"):
        loss.backward()


def test_nonfinite_loss_gradient_is_named_as_such(mlp_field, device):
    from mpnode.core import NonFiniteGradientError

    y0 = torch.randn(3, 4, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.float16):
        out = odeint(mlp_field.to(device), y0, torch.linspace(0, 1, 5, device=device), method="rk4", scaler=False)
    with pytest.raises(NonFiniteGradientError, match="received an inf/NaN gradient"):
        (out[-1].sum() * float("nan")).backward()


# -- 7. side effects of the recomputation -----------------------------------------------------------------


def _buffers(module):
    return [b.clone() for b in module.buffers()]


@pytest.mark.parametrize("reach", ["module", "global"])
def test_batchnorm_buffers_are_left_as_the_forward_left_them(reach, device, normed_field):
    field = normed_field()
    holder = {"field": field}  # a closure over a dict: the module is reachable only by running func

    def through_dict(t, y):
        return holder["field"](t, y)

    func = field if reach == "module" else through_dict
    y0 = torch.randn(6, 3, dtype=F64, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=F64, device=device)
    start = _buffers(field)
    out = odeint(func, y0, t, method="rk4")
    after_forward = _buffers(field)
    wrt = (y0, field.lin.weight, field.bn.weight, field.bn.bias)  # (lin.bias's gradient is 0: BN removes it)
    ours = torch.autograd.grad(out[-1].pow(2).sum(), wrt)
    assert all(torch.equal(a, b) for a, b in zip(_buffers(field), after_forward))
    for b, s in zip(field.buffers(), start):
        b.copy_(s)
    ref = _grads(torchdiffeq.odeint, func, y0, t, lambda o: o[-1].pow(2).sum(), wrt)[1]
    # torchdiffeq made the same updates (equal up to the roundoff of its own stage arithmetic)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(_buffers(field), after_forward))
    _close(ours, ref)
    assert int(field.bn.num_batches_tracked) == 4 * 4


# -- 8. fields that do not depend on y --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["g(t)", "zero", "detached"])
def test_field_independent_of_y_gives_the_identity(kind, device):
    w = torch.tensor([0.5, -1.0], dtype=F64, device=device, requires_grad=True)
    fields = {
        "g(t)": lambda t, y: torch.sin(3 * t) * w,
        "zero": lambda t, y: torch.zeros_like(y),
        "detached": lambda t, y: -w * y.detach(),
    }
    y0 = torch.tensor([1.0, 2.0], dtype=F64, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=F64, device=device)
    wrt = (y0, w)

    def loss(o):
        return (o[-1] * torch.arange(1, 3, device=device)).sum() + 0 * w.sum()

    ours = _grads(odeint, fields[kind], y0, t, loss, wrt)[1]
    ref = _grads(torchdiffeq.odeint, fields[kind], y0, t, loss, wrt)[1]
    assert torch.equal(ours[0], torch.tensor([1.0, 2.0], dtype=F64, device=device))
    if kind == "zero":
        assert torch.equal(ours[1], ref[1])  # both zero
    else:
        _close(ours, ref)


# -- 9. 0-dim y0 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["tensor", "tuple"])
def test_zero_dim_state(structure, device):
    a = torch.tensor(0.8, dtype=F64, device=device, requires_grad=True)
    y0 = torch.tensor(1.5, dtype=F64, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=F64, device=device)
    if structure == "tensor":
        field, state, pick = (lambda t, y: -a * y), y0, (lambda o: o[-1])
    else:
        v0 = torch.ones(2, dtype=F64, device=device)
        field, state, pick = (lambda t, s: (-a * s[0], s[1] * s[0])), (y0, v0), (lambda o: o[0][-1] + o[1][-1].sum())
    out = odeint(field, state, t, method="rk4")
    shape = out.shape if structure == "tensor" else out[0].shape
    assert shape == (5,)
    ours = torch.autograd.grad(pick(out), (a, y0))
    ref = torch.autograd.grad(pick(torchdiffeq.odeint(field, state, t, method="rk4")), (a, y0))
    _close(ours, ref)


# -- 10. a failed call adds nothing ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_forward_blow_up_adds_nothing_to_the_stats(method, device):
    stats = SolverStats()
    with pytest.raises(FloatingPointError, match="inf/NaN"):
        odeint(lambda t, y: -y if t < 0.5 else y * float("inf"), torch.ones(2, device=device),
               torch.tensor([0.0, 1.0], device=device), method=method, options={"stats": stats})
    assert stats == SolverStats()


# -- 11. messages that name the fix -----------------------------------------------------------------------------


def _solve_kwargs(device):
    return dict(func=lambda t, y: -y, y0=torch.ones(2, device=device), t=torch.linspace(0, 1, 3, device=device))


BAD_CALLS = {
    "stats wrong type": (dict(options={"stats": {}}), TypeError,
                         r"options\['stats'\] must be a mpnode.core.SolverStats"),
    "func not callable": (dict(func=3), TypeError, "func must be callable as func"),
    "options not a mapping": (dict(options=[("step_size", 0.1)]), TypeError, "options must be a dict"),
    "y0 sparse": (dict(y0=torch.eye(2).to_sparse()), TypeError, r"dense tensor.*y0.to_dense\(\)"),
    "y0 meta": (dict(y0=torch.ones(2, device="meta")), ValueError, "meta device.*real device"),
    "adjoint_params a tensor": (dict(adjoint_params=torch.ones(2)), TypeError, r"pass \(tensor,\)"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_is_refused_before_any_evaluation(case, device):
    calls = []
    kwargs = _solve_kwargs(device)
    update, error, message = BAD_CALLS[case]
    kwargs.update(update)
    if callable(kwargs["func"]):
        inner = kwargs["func"]
        kwargs["func"] = lambda t, y: calls.append(1) or inner(t, y)
    with pytest.raises(error, match=message):
        odeint(kwargs.pop("func"), kwargs.pop("y0"), kwargs.pop("t"), method="rk4", **kwargs)
    assert calls == []


def test_tableau_refuses_non_numbers_nan_and_bool_order():
    from mpnode.core import ButcherTableau

    with pytest.raises(ValueError, match=r"a\[1\]\[0\] = 'half' is not a number.*'1/3'"):
        ButcherTableau("x", [[], ["half"]], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"a\[1\]\[0\] = nan is not finite"):
        ButcherTableau("x", [[], [float("nan")]], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"b\[0\] = inf is not finite"):
        ButcherTableau("x", [[]], [float("inf")])
    with pytest.raises(ValueError, match="order must be a positive integer, got True"):
        ButcherTableau("x", [[]], [1.0], order=True)


@pytest.mark.parametrize("transform", ["vmap", "grad", "jacrev"])
def test_torch_func_transforms_are_refused(transform, device):
    t = torch.linspace(0, 1, 3, device=device)
    y0 = torch.ones(3, 2, device=device)
    solve = lambda y: odeint(lambda t, y: -y, y, t, method="rk4")[-1].sum()  # noqa: E731
    wrapped = {"vmap": torch.func.vmap(solve), "grad": torch.func.grad(solve), "jacrev": torch.func.jacrev(solve)}
    with pytest.raises(RuntimeError, match=r"torch.func transforms.*batch into y0.*torch.autograd.grad"):
        wrapped[transform](y0)


def test_step_size_beyond_the_step_limit_names_steps_and_bytes(device):
    with pytest.raises(ValueError, match=r"makes 1,000,000,000,000,000 steps: the grid alone needs .* GiB .*bytes"):
        odeint(lambda t, y: -y, torch.ones(2, device=device), torch.tensor([0.0, 1.0], device=device),
               options={"step_size": 1e-15})


def test_step_size_whose_grid_would_not_fit_in_memory(device, monkeypatch):
    import mpnode.core.grids as grids

    monkeypatch.setattr(grids, "available_memory_bytes", lambda device: 2**20)  # 1 MiB left
    allocated = []
    monkeypatch.setattr(torch, "arange", lambda *a, **k: allocated.append(a))
    with pytest.raises(ValueError, match=r"makes 1,000,000 steps: .*8,000,008 bytes.*only 0.000977 GiB is available"):
        odeint(lambda t, y: -y, torch.ones(2, device=device), torch.tensor([0.0, 1.0], device=device),
               options={"step_size": 1e-6})
    assert allocated == []  # refused before allocating


# -- 12. adjoint_params restricting a module's parameters ---------------------------------------------------------


@pytest.mark.parametrize("form", ["module", "closure"])
def test_adjoint_params_restricts_a_modules_parameters(form, device):
    net = _mlp(device)

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    func = Field() if form == "module" else (lambda t, y: net(y))
    y0 = torch.randn(4, 3, dtype=F64, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=F64, device=device)
    listed = (net[0].weight, net[2].bias)
    out = odeint(func, y0, t, method="rk4", adjoint_params=listed)
    out[-1].pow(2).sum().backward()
    ours = [y0.grad, *(p.grad for p in listed)]
    assert net[0].bias.grad is None and net[2].weight.grad is None  # constants of this solve
    ref = torch.autograd.grad(torchdiffeq.odeint(func, y0, t, method="rk4")[-1].pow(2).sum(), (y0, *listed))
    _close(ours, ref)


# -- 13. a tensor replaced between forward and backward -----------------------------------------------------------

RECOMPUTING = {
    "recompute": RecomputeAdjoint,
    "segmented": lambda: SegmentedAdjoint(checkpoints=2),
    "auto-falling-back": lambda: AutoAdjoint(budget_bytes=1),
}


class _Conditioned(torch.nn.Module):
    """A conditional field reading its context from an attribute set before each solve."""

    def __init__(self, device):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 3).to(device, F64)
        self.context = None

    def forward(self, t, y):
        return torch.tanh(self.lin(torch.cat([y, self.context.expand_as(y)], -1)))


def _two_contexts(device, grad):
    torch.manual_seed(1)
    encoder = torch.nn.Linear(3, 3).to(device, F64)
    x1, x2 = torch.randn(1, 3, dtype=F64, device=device), 3 * torch.randn(1, 3, dtype=F64, device=device)
    return encoder, ((encoder(x1), encoder(x2)) if grad else (x1, x2))


def _loss_of_two_solves(solve, set_context, field, contexts, device, **kwargs):
    """Two solves of one field in one loss, its context replaced between them (before the backward pass)."""
    y0 = torch.randn(4, 3, dtype=F64, device=device, generator=torch.Generator(device).manual_seed(2))
    t = torch.linspace(0, 1, 3, dtype=F64, device=device)
    loss = 0
    for context in contexts:
        set_context(context)
        loss = loss + solve(field, y0, t, method="rk4", options={"step_size": 0.1}, **kwargs)[-1].pow(2).sum()
    return loss


@pytest.mark.parametrize("grad", [False, True], ids=["constant-context", "encoded-context"])
@pytest.mark.parametrize("strategy", list(RECOMPUTING))
def test_context_attribute_replaced_before_backward_is_refused(strategy, grad, device):
    """The recomputation would read the second context for the first solve: dL/dW was off by 1.05 (relative),
    silently (with an encoded context: a ValueError that named adjoint_params)."""
    field = _Conditioned(device)
    encoder, contexts = _two_contexts(device, grad)
    loss = _loss_of_two_solves(odeint, lambda c: setattr(field, "context", c), field, contexts, device,
                               adjoint=RECOMPUTING[strategy]())
    with pytest.raises(RuntimeError, match=r"_Conditioned\.context .*replaced by another tensor.*functools\.partial"
                                           r".*DirectAdjoint\(\).*No gradient was written"):
        loss.backward()
    assert all(p.grad is None for p in (*field.parameters(), *encoder.parameters()))


@pytest.mark.parametrize("grad", [False, True], ids=["constant-context", "encoded-context"])
def test_context_attribute_replaced_before_backward_is_right_with_direct_adjoint(grad, device):
    field = _Conditioned(device)
    encoder, contexts = _two_contexts(device, grad)
    wrt = (*field.parameters(), *(encoder.parameters() if grad else ()))
    grads = []
    for solve, kwargs in ((odeint, {"adjoint": DirectAdjoint()}), (torchdiffeq.odeint, {})):
        loss = _loss_of_two_solves(solve, lambda c: setattr(field, "context", c), field, contexts, device, **kwargs)
        grads.append(torch.autograd.grad(loss, wrt, retain_graph=True))  # the encoder's graph serves both
    _close(*grads)


@pytest.mark.parametrize("listed", [False, True], ids=["discovered", "adjoint_params"])
@pytest.mark.parametrize("strategy", list(RECOMPUTING))
def test_captured_variable_rebound_before_backward_is_refused(strategy, listed, device):
    """A closure variable rebound between two solves: no attribute to watch; the recomputation of the first
    evaluation reads another tensor."""
    lin = _Conditioned(device).lin
    _, (x1, x2) = _two_contexts(device, grad=False)
    context = None

    def field(t, y):
        return torch.tanh(lin(torch.cat([y, context.expand_as(y)], -1)))

    def set_context(c):
        nonlocal context
        context = c

    kwargs = {"adjoint_params": tuple(lin.parameters())} if listed else {}
    loss = _loss_of_two_solves(odeint, set_context, field, (x1, x2), device, adjoint=RECOMPUTING[strategy](),
                               **kwargs)
    with pytest.raises(RuntimeError, match=r"read other tensors.*shapes \(1, 3\).*DirectAdjoint\(\).*No gradient"):
        loss.backward()
    assert all(p.grad is None for p in lin.parameters())


@pytest.mark.parametrize("strategy", list(RECOMPUTING))
def test_fields_reading_other_tensors_by_design_are_not_refused(strategy, device):
    """Not a replacement: a piecewise field reads another tensor late in the solve, a tensor made afresh per call
    (``torch.from_numpy``), an attribute replaced by an equal copy before backward."""
    lin = _Conditioned(device).lin
    early, late = (torch.randn(1, 3, dtype=F64, device=device) for _ in range(2))
    array = torch.randn(3, dtype=F64).numpy()
    holder = _Conditioned(device)
    holder.context = torch.randn(1, 3, dtype=F64, device=device)

    def field(t, y):
        shift = torch.from_numpy(array).to(y.device) + holder.context
        return torch.tanh(lin(torch.cat([y, (early if t < 0.5 else late).expand_as(y)], -1))) + shift

    y0 = torch.randn(4, 3, dtype=F64, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64, device=device)
    grads = []
    for solve, kwargs in ((odeint, {"adjoint": RECOMPUTING[strategy]()}), (torchdiffeq.odeint, {})):
        out = solve(field, y0, t, method="rk4", options={"step_size": 0.1}, **kwargs)
        holder.context = holder.context.clone()
        grads.append(torch.autograd.grad(out[-1].pow(2).sum(), (y0, *lin.parameters())))
    _close(*grads)


# -- 14. random numbers from the caller's own generator ------------------------------------------------------------


def _generator_field(device):
    lin = _mlp(device)
    generator = torch.Generator(device)

    def field(t, y):
        noise = torch.randn(y.shape, dtype=y.dtype, device=y.device, generator=generator)
        return torch.tanh(lin(y)) * (1 + 0.5 * noise)

    return field, lin, generator


@pytest.mark.torchdiffeq_row("random-fields")
@pytest.mark.parametrize("strategy", list(RECOMPUTING))
def test_draws_from_a_user_generator_are_replayed(strategy, device):
    """``generator=`` in func: the recomputation drew other numbers (dL/dW 4-7% off) and backward advanced the
    caller's generator."""
    field, lin, generator = _generator_field(device)
    y0 = torch.randn(4, 3, dtype=F64, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64, device=device)
    grads, outs = [], []
    for solve, kwargs in ((odeint, {"adjoint": RECOMPUTING[strategy]()}), (torchdiffeq.odeint, {})):
        generator.manual_seed(42)
        out = solve(field, y0, t, method="rk4", options={"step_size": 0.1}, **kwargs)
        after_forward, global_state = generator.get_state(), torch.get_rng_state()
        grads.append(torch.autograd.grad(out[-1].pow(2).sum(), (y0, *lin.parameters())))
        assert torch.equal(generator.get_state(), after_forward)  # backward consumed none of the caller's draws
        assert torch.equal(torch.get_rng_state(), global_state)
        outs.append(out)
    assert torch.allclose(*outs, rtol=1e-12, atol=1e-12)  # the same draws in the forward
    _close(*grads)


@pytest.mark.parametrize("strategy", list(RECOMPUTING))
def test_draws_from_a_user_generator_on_adaptive_steps_are_refused(strategy, device):
    field, _, generator = _generator_field(device)
    generator.manual_seed(0)
    y0 = torch.randn(4, 3, dtype=F64, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"random numbers.*adjoint=DirectAdjoint\(\)"):
        odeint(field, y0, torch.tensor([0.0, 1.0], dtype=F64, device=device), rtol=1e-3, atol=1e-3,
               adjoint=RECOMPUTING[strategy]())


# -- 15. autocast's weight-cast cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [*RECOMPUTING, "direct"])
def test_weight_changed_in_place_after_a_cached_cast_is_solved_with_its_new_value(strategy, device):
    """In one autocast region: the net is called (its weight's bfloat16 copy is cached), the weight is changed in
    place, then solved. The forward used the stale copy and the recompute backward the new weight: the gradient
    matched neither (0.24-0.43 off). Now every strategy solves with the new weight, as a fresh region does."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4).to(device)
    y0 = torch.randn(8, 4, device=device)
    t = torch.tensor([0.0, 1.0], device=device)
    make = RECOMPUTING.get(strategy, DirectAdjoint)

    def solve_and_grad(warm_up):
        with torch.no_grad():
            lin.weight.copy_(torch.linspace(-1, 1, 16, device=device).reshape(4, 4))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if warm_up:
                lin(y0).sum().backward()  # caches the bfloat16 copy of the weight
                with torch.no_grad():
                    lin.weight.mul_(2)
            else:
                with torch.no_grad():
                    lin.weight.mul_(2)
            out = odeint(lambda t, y: torch.tanh(lin(y)), y0, t, method="rk4", options={"step_size": 0.1},
                         adjoint=make())
            loss = out[-1].float().pow(2).sum()
        return out, torch.autograd.grad(loss, lin.weight)[0]

    (out, grad), (out_ref, grad_ref) = solve_and_grad(True), solve_and_grad(False)
    assert torch.equal(out, out_ref) and torch.equal(grad, grad_ref)


@pytest.mark.parametrize("strategy", list(RECOMPUTING))
def test_a_cache_rebuilt_for_a_new_batch_size_is_not_refused(strategy, device):
    """The first evaluation asks the previous solve's cache for its shape only, then replaces it: not a tensor the
    recomputation must read again."""

    class Lazy(_Conditioned):
        def forward(self, t, y):
            if self.context is None or self.context.shape != y.shape:
                self.context = torch.ones_like(y)
            return super().forward(t, y)

    field = Lazy(device)
    t = torch.linspace(0, 1, 3, dtype=F64, device=device)
    for batch in (4, 5):
        y0 = torch.randn(batch, 3, dtype=F64, device=device, requires_grad=True)
        grads = []
        for solve, kwargs in ((odeint, {"adjoint": RECOMPUTING[strategy]()}), (torchdiffeq.odeint, {})):
            out = solve(field, y0, t, method="rk4", options={"step_size": 0.1}, **kwargs)
            grads.append(torch.autograd.grad(out[-1].pow(2).sum(), (y0, *field.parameters())))
        _close(*grads)


# -- tensors the field modifies as it runs; rebinding by the field itself ------------------------------------------


def _spectral(api: str) -> torch.nn.Module:
    torch.manual_seed(1)
    lin = torch.nn.Linear(6, 6).double()
    if api == "parametrizations":
        return torch.nn.utils.parametrizations.spectral_norm(lin)
    return torch.nn.utils.spectral_norm(lin)


@pytest.mark.parametrize("api", ["parametrizations", "hook"])
@pytest.mark.parametrize("strategy", list(RECOMPUTING))
def test_spectral_norm_in_training_mode_matches_torchdiffeq(api, strategy):
    """Power iteration updates u/v in place at every evaluation and they change the output: each recomputed step
    must start from the forward's values (dL/dtheta was 4e-2..1e-1 off, silently)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    lin = _spectral(api)
    state = {k: v.clone() for k, v in lin.state_dict().items()}
    y0 = torch.randn(3, 6, dtype=torch.float64)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    grads = []
    for solve, kwargs in ((odeint, {"adjoint": RECOMPUTING[strategy]()}), (torchdiffeq.odeint, {})):
        lin.load_state_dict(state)
        lin.zero_grad()
        solve(lambda t, y: torch.tanh(lin(y)), y0, t, method="rk4", options={"step_size": 0.125},
              **kwargs).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lin.parameters()]))
        after = {k: v.clone() for k, v in lin.state_dict().items()}
    assert _rel(grads[0], grads[1]) < 1e-10
    assert all(torch.equal(after[k], lin.state_dict()[k]) for k in after)


def test_batch_norm_in_training_mode_still_matches_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh()).double()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    y0 = torch.randn(5, 4, dtype=torch.float64)
    grads, stats = [], []
    for solve, kwargs in ((odeint, {"adjoint": RecomputeAdjoint()}), (torchdiffeq.odeint, {})):
        net.load_state_dict(state)
        net.zero_grad()
        solve(lambda t, y: net(y), y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
              options={"step_size": 0.25}, **kwargs).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        stats.append(net[1].running_mean.clone())
    assert _rel(grads[0], grads[1]) < 1e-10
    assert _rel(stats[0], stats[1]) < 1e-12


def test_spectral_norm_in_training_mode_on_adaptive_steps_is_refused():
    lin = _spectral("parametrizations")
    out = odeint(lambda t, y: torch.tanh(lin(y)), torch.randn(3, 6, dtype=torch.float64),
                 torch.tensor([0.0, 1.0], dtype=torch.float64), method="dopri5", adjoint=RecomputeAdjoint())
    with pytest.raises(RuntimeError, match=r"modifies 2 buffer.*DirectAdjoint\(\).*fixed grid"):
        out.sum().backward()
    assert all(p.grad is None for p in lin.parameters())


class _Monitored(torch.nn.Module):
    """Rebinds its own tensor attributes at every call (an NFE counter, an energy monitor)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.nfe = torch.zeros(())
        self.energy = torch.zeros(())

    def forward(self, t, y):
        dy = torch.tanh(self.lin(y))
        self.nfe = self.nfe + 1
        self.energy = self.energy + dy.detach().pow(2).mean()
        return dy


class _CachedEmbedding(torch.nn.Module):
    """Caches a time embedding (no gradient) on itself, rebuilt only when t changes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.cached_t, self.embedding = None, None

    def forward(self, t, y):
        if self.cached_t != float(t):
            self.embedding, self.cached_t = torch.sin(torch.arange(4.0) * float(t)), float(t)
        return torch.tanh(self.lin(y) + self.embedding)


@pytest.mark.parametrize("field", [_Monitored, _CachedEmbedding])
@pytest.mark.parametrize("strategy", list(RECOMPUTING))
def test_fields_rebinding_their_own_tensors_are_not_refused(field, strategy):
    """Each solve backpropagated at once: nothing was replaced between solve and backward (was refused)."""
    torch.manual_seed(3)
    f = field()
    y0, t = torch.randn(5, 4), torch.linspace(0, 1, 3)
    for _ in range(2):
        grads = []  # two recomputing solves in a row: the second's first evaluation reads what the first left
        for adjoint in (RECOMPUTING[strategy](), RECOMPUTING[strategy](), DirectAdjoint()):
            f.zero_grad()
            odeint(f, y0, t, method="euler", options={"step_size": 0.25}, adjoint=adjoint).pow(2).sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in f.parameters()]))
        assert _rel(grads[1], grads[2]) < 1e-6


def test_whole_number_options_accept_numpy_ints_and_integral_floats():
    np = pytest.importorskip("numpy")
    lin = torch.nn.Linear(3, 3)

    def f(t, y):
        return lin(y)

    y0, t = torch.randn(2, 3), torch.linspace(0, 1, 3)
    ref = odeint(f, y0, t, method="dopri5")
    for kwargs in ({"options": {"max_num_steps": np.int64(1000)}}, {"options": {"max_num_steps": 1e4}},
                   {"adjoint": AutoAdjoint(budget_bytes=1e9)}, {"adjoint": SegmentedAdjoint(checkpoints=np.int64(4))}):
        assert torch.equal(odeint(f, y0, t, method="dopri5", **kwargs), ref)
    with pytest.raises(ValueError, match=r"checkpoints must be a whole number >= 1, got 2\.5 \(a fraction\)"):
        SegmentedAdjoint(checkpoints=2.5)


class _Symmetric(torch.nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).T


@pytest.mark.parametrize("strategy", list(RECOMPUTING))
def test_parametrize_cached_around_solve_and_backward(strategy):
    """``with parametrize.cached(): loss = odeint(...) + uses of the weight; loss.backward()`` (was refused; and a
    weight cached by the graph-free forward would have reached the caller's later uses without a gradient)."""
    parametrize = torch.nn.utils.parametrize
    torch.manual_seed(4)
    lin = torch.nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", _Symmetric())
    y0, x = torch.randn(5, 4), torch.randn(2, 4)
    grads = []
    for adjoint in (RECOMPUTING[strategy](), DirectAdjoint()):
        lin.zero_grad()
        with parametrize.cached():
            loss = odeint(lambda t, y: torch.tanh(lin(y)), y0, torch.linspace(0, 1, 3), method="rk4",
                          options={"step_size": 0.25}, adjoint=adjoint).pow(2).sum() + lin(x).pow(2).sum()
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in lin.parameters()]))
    assert _rel(grads[0], grads[1]) < 1e-6


def test_rebound_encoding_in_a_summed_loss_names_the_rebinding():
    """Lambdas made in a loop read the loop's latest encoding: the first solve's backward meets the second one
    (the message named only adjoint_params, which would not help)."""
    torch.manual_seed(5)
    lin, encoder = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    y0, t = torch.randn(3, 4), torch.linspace(0, 1, 3)
    total = 0
    for x in (torch.randn(4), torch.randn(4)):
        c = encoder(x)
        total = total + odeint(lambda t, y: torch.tanh(lin(y) + c), y0, t, method="rk4",  # noqa: B023 (the late binding under test)
                               options={"step_size": 0.25}).pow(2).sum()
    with pytest.raises(RuntimeError, match=r"computed from the same 2 grad-requiring.*rebound.*lambda made in a "
                                           r"loop.*adjoint_params would not help.*DirectAdjoint\(\)"):
        total.backward()
    assert all(p.grad is None for p in (*lin.parameters(), *encoder.parameters()))


class _SinceStepStart(torch.nn.Module):
    """Reads the step's start time that its callback_step stores."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.t0 = None

    def callback_step(self, t0, y0, dt):
        self.t0 = t0

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) + 0.1 * (t - self.t0)


def test_field_reading_what_a_callback_sets_names_callbacks():
    f = _SinceStepStart()
    out = odeint(f, torch.randn(3, 4), torch.linspace(0, 1, 3), method="rk4", options={"step_size": 0.25})
    with pytest.raises(RuntimeError, match=r"read other tensors.*a callback sets \(callback_step.*do not run while "
                                           r"backward recomputes.*DirectAdjoint\(\)"):
        out.pow(2).sum().backward()


@pytest.mark.parametrize("grad", [False, True], ids=["constant-context", "encoded-context"])
def test_context_replaced_before_backward_is_refused_with_a_bfloat16_checkpoint(grad, device):
    """The output comparison is made at the forward's own state when the checkpoint of y0 was rounded."""
    field = _Conditioned(device)
    _, contexts = _two_contexts(device, grad)
    loss = _loss_of_two_solves(odeint, lambda c: setattr(field, "context", c), field, contexts, device,
                               adjoint=RecomputeAdjoint(checkpoint_dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"_Conditioned\.context .*replaced by another tensor"):
        loss.backward()


def test_self_rebinding_field_with_a_bfloat16_checkpoint_is_not_refused():
    torch.manual_seed(6)
    f = _Monitored()
    y0, t = torch.randn(5, 4), torch.linspace(0, 1, 3)
    for _ in range(2):
        odeint(f, y0, t, method="rk4", options={"step_size": 0.25},
               adjoint=RecomputeAdjoint(checkpoint_dtype=torch.bfloat16)).pow(2).sum().backward()
    assert all(p.grad is not None for p in f.parameters())
