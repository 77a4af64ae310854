"""Issue 15, items 9-15: no crash, leak, hang or internal error where torchdiffeq works or a user slips.

Each test names its item.  References are torchdiffeq 0.2.5 (float64) where it gives a
number, else the solve's own float64 numbers.
"""

from __future__ import annotations

import gc

import pytest
import torch

from mpnode.core import AutoAdjoint, DirectAdjoint, RecomputeAdjoint, SegmentedAdjoint, odeint
from mpnode.core.contracts import StepGraph

torchdiffeq = pytest.importorskip("torchdiffeq")

F64 = torch.float64

STRATEGIES = {
    "direct": DirectAdjoint,
    "recompute": RecomputeAdjoint,
    "segmented": lambda: SegmentedAdjoint(checkpoints=2),
    "auto-direct": lambda: AutoAdjoint(budget_bytes=2**30),
    "auto-fallback": lambda: AutoAdjoint(budget_bytes=200),
}
STEPPINGS = {
    "fixed": dict(method="rk4", options=dict(step_size=0.125)),
    "adaptive": dict(method="dopri5", rtol=1e-10, atol=1e-10),
}


def _problem(device, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (0.5 * torch.randn(dim, dim, generator=g, dtype=F64)).to(device).requires_grad_(True)
    y0 = torch.randn(3, dim, generator=g, dtype=F64).to(device).requires_grad_(True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64, device=device)
    return W, y0, t


def _field(W):
    return lambda t, y: torch.tanh(y @ W.T) + 0.1 * t * y


# -- 9. retain_graph, gradcheck, jacobian -----------------------------------------------------------


@pytest.mark.parametrize("stepping", STEPPINGS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_second_backward_through_one_solve_gives_the_numbers_of_a_fresh_solve(strategy, stepping, device):
    """Two losses on one trajectory (retain_graph=True): was AttributeError 'NoneType' ... 'source'."""
    W, y0, t = _problem(device)

    def losses(out):
        return out[-1].sum(), (out[1:] ** 2).sum()

    out = odeint(_field(W), y0, t, adjoint=STRATEGIES[strategy](), **STEPPINGS[stepping])
    first, second = losses(out)
    g1 = torch.autograd.grad(first, (y0, W), retain_graph=True)
    g1_again = torch.autograd.grad(first, (y0, W), retain_graph=True)
    g2 = torch.autograd.grad(second, (y0, W))
    for loss, got in ((0, g1), (0, g1_again), (1, g2)):
        fresh = odeint(_field(W), y0, t, adjoint=STRATEGIES[strategy](), **STEPPINGS[stepping])
        want = torch.autograd.grad(losses(fresh)[loss], (y0, W))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(first, (y0, W))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects() meets deprecated torch.distributed names
@pytest.mark.parametrize("strategy", ["direct", "auto-direct"])
def test_kept_graphs_are_freed_by_a_backward_without_retain_graph(strategy, device):
    """Keeping the store for a retained graph must not keep it after an ordinary backward (the output still alive)."""
    W, y0, t = _problem(device)
    out = odeint(_field(W), y0, t, adjoint=STRATEGIES[strategy](), **STEPPINGS["fixed"])

    def live_graphs():
        gc.collect()
        return sum(isinstance(o, StepGraph) for o in gc.get_objects())

    assert live_graphs() > 0
    out[-1].sum().backward(retain_graph=True)
    assert live_graphs() > 0
    out[-1].sum().backward()
    assert live_graphs() == 0
    del out


@pytest.mark.parametrize("stepping", STEPPINGS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck(strategy, stepping, device):
    """torch.autograd.gradcheck (float64, finite differences) w.r.t. y0, a captured weight and (fixed grids) t."""
    W, y0, t = _problem(device)
    kwargs = STEPPINGS[stepping]
    t = t.clone().requires_grad_(stepping == "fixed")

    def solve(y0, W, t):
        return odeint(_field(W), y0, t, adjoint=STRATEGIES[strategy](), **kwargs)

    assert torch.autograd.gradcheck(solve, (y0, W, t), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["direct", "recompute", "segmented"])
def test_jacobian_row_by_row_and_batched_gradients_refused(strategy, device):
    W, y0, t = _problem(device)
    y0 = y0.detach()

    def solve(odeint_):
        return lambda y: odeint_(_field(W.detach()), y, t, method="rk4", options=dict(step_size=0.125),
                                 **({} if odeint_ is torchdiffeq.odeint else {"adjoint": STRATEGIES[strategy]()}))[-1]

    ours = torch.autograd.functional.jacobian(solve(odeint), y0)
    ref = torch.autograd.functional.jacobian(solve(torchdiffeq.odeint), y0)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="vectorize=False"):
        torch.autograd.functional.jacobian(solve(odeint), y0, vectorize=True)
    y = y0.clone().requires_grad_(True)
    out = solve(odeint)(y)
    with pytest.raises(RuntimeError, match="is_grads_batched=False"):
        torch.autograd.grad(out, y, torch.eye(out.numel(), dtype=F64).reshape(-1, *out.shape), is_grads_batched=True)


def test_the_private_torch_api_that_tells_a_retained_graph_still_answers():
    """adjoint.graph_retained asks autograd's engine (private API); without it every graph would count as retained."""
    from mpnode.core.adjoint import graph_retained

    seen = []
    x = torch.ones(2, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(graph_retained()))
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    assert seen == [True, False]


# -- 10. AutoAdjoint in a training loop -------------------------------------------------------------


def _live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.layout == torch.strided:
            s = o.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("budget", [4_000, 2**30], ids=["falls-back", "direct"])
def test_auto_adjoint_in_a_loop_holds_no_memory_between_iterations(budget, device):
    """Was: about budget_bytes leaked per call when it fell back (its meter's pack hook tied graphs into cycles)."""
    from mpnode.core.testing import MLPField

    torch.manual_seed(0)
    field = MLPField(dim=4, width=32).to(device, F64)
    y0 = torch.randn(16, 4, dtype=F64, device=device, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64, device=device)
    sizes = []
    for _ in range(4):
        out = odeint(field, y0, t, method="rk4", options=dict(step_size=0.1), adjoint=AutoAdjoint(budget_bytes=budget))
        out[-1].sum().backward()
        del out
        sizes.append(_live_tensor_bytes())
    assert sizes[-1] == sizes[1], sizes


# -- 11. adjoint callbacks under every strategy -----------------------------------------------------


class _LoggingField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[-0.5, 0.3], [-0.2, -0.4]], dtype=F64))
        self.log = []

    def forward(self, t, y):
        return y @ self.w.T

    def _note(self, name, t0, y0, dt):
        self.log.append((name, float(t0), y0.detach().double().cpu(), float(dt)))

    def callback_step_adjoint(self, t0, y0, dt):
        self._note("step", t0, y0, dt)

    def callback_accept_step_adjoint(self, t0, y0, dt):
        self._note("accept", t0, y0, dt)


@pytest.mark.parametrize("stepping", STEPPINGS)
@pytest.mark.parametrize("strategy", ["direct", "segmented", "auto-fallback"])
def test_adjoint_callbacks_see_the_recompute_states(strategy, stepping, device):
    """Was: SegmentedAdjoint (and AutoAdjoint falling back to segments) raised 'NoneType' object has no attribute
    'to'."""
    logs = []
    for name in ("recompute", strategy):
        field = _LoggingField().to(device)
        y0 = torch.tensor([[1.0, 0.5], [0.2, -1.0]], dtype=F64, device=device, requires_grad=True)
        t = torch.tensor([0.0, 0.6, 1.5], dtype=F64, device=device)
        odeint(field, y0, t, adjoint=STRATEGIES[name](), **STEPPINGS[stepping])[-1].sum().backward()
        logs.append(field.log)
    ref, got = logs
    assert len(got) == len(ref) > 4
    for (n1, t1, y1, h1), (n2, t2, y2, h2) in zip(got, ref):
        assert (n1, t1, h1) == (n2, t2, h2)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)


# -- 12. an adaptive event search that finds nothing ends ---------------------------------------------


@pytest.mark.parametrize("given", [None, 40])
def test_adaptive_event_search_is_bounded_like_fixed_grids(given, monkeypatch, device):
    """Was: marching towards t = inf for hours. Default bound MAX_EVENT_STEPS (shrunk here to keep the test short)."""
    import time

    from mpnode.core import events, odeint_event

    monkeypatch.setattr(events, "MAX_EVENT_STEPS", 60)
    y0 = torch.tensor([1.0, 0.0], dtype=F64, device=device)
    options = {} if given is None else {"max_num_steps": given}
    start = time.perf_counter()
    expected = rf"no event within {given or 60} step attempts .*options\['max_num_steps'\]"
    with pytest.raises(RuntimeError, match=expected):
        odeint_event(lambda t, y: torch.stack([y[1], -y[0]]), y0, torch.tensor(0.0, dtype=F64, device=device),
                     event_fn=lambda t, y: y[0] - 2.0, options=options)
    assert time.perf_counter() - start < 60
    if given is None:  # fixed grids: the same bound, on steps
        with pytest.raises(RuntimeError, match=r"no event within 60 steps of size 0.01"):
            odeint_event(lambda t, y: torch.stack([y[1], -y[0]]), y0, torch.tensor(0.0, dtype=F64, device=device),
                         event_fn=lambda t, y: y[0] - 2.0, method="rk4", options={"step_size": 0.01})


def test_adaptive_event_default_bound_is_the_fixed_grid_limit():
    from mpnode.core import events
    from mpnode.core.march import AdaptiveMarch
    from mpnode.core.methods import get_tableau
    from mpnode.core.options import AdaptiveOptions
    from mpnode.core.precision import PrecisionPolicy
    from mpnode.core.state import FlatState
    from mpnode.core.tolerance import Tolerance

    y0 = torch.zeros(2, dtype=F64)
    layout = FlatState(y0)
    stepping = AdaptiveMarch(get_tableau("dopri5"), Tolerance(1e-7, 1e-9, layout), AdaptiveOptions())
    stepping, _ = events.until_event(stepping, lambda t, y: y[0], layout, PrecisionPolicy.capture(y0),
                                     torch.tensor([0.0, 1.0], dtype=F64))
    assert stepping.options.max_num_steps == events.MAX_EVENT_STEPS == 20000


# -- 13. random numbers in func on adaptive steps -----------------------------------------------------


class _NoisyField(torch.nn.Module):
    """``y' = -w y + sigma * noise`` (additive) or ``-(w + sigma * noise) y`` (multiplicative, one draw per call)."""

    def __init__(self, sigma, multiplicative=False, after=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))
        self.sigma, self.multiplicative, self.after, self.nfe = sigma, multiplicative, after, 0

    def forward(self, t, y):
        self.nfe += 1
        if self.after is not None and t <= self.after:
            return -self.w * y
        if self.multiplicative:
            return -(self.w + self.sigma * torch.randn((), dtype=y.dtype, device=y.device)) * y
        return -self.w * y + self.sigma * torch.randn_like(y)


@pytest.mark.parametrize("strategy", ["recompute", "segmented", "auto-direct", "auto-fallback"])
def test_noise_that_collapses_adaptive_steps_is_refused_at_the_first_evaluation(strategy, device):
    """Was: refused only after the march, which additive noise makes endless (max_num_steps keeps main finite here)."""
    field = _NoisyField(sigma=0.5).to(device)
    y0 = torch.ones(4, dtype=F64, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"draws random numbers.*adjoint=DirectAdjoint\(\)"):
        odeint(field, y0, torch.tensor([0.0, 1.0], dtype=F64, device=device), adjoint=STRATEGIES[strategy](),
               options=dict(max_num_steps=500))
    assert field.nfe == 1


def test_a_field_that_starts_drawing_late_is_refused_at_the_next_accepted_step(device):
    y0 = torch.ones(4, dtype=F64, device=device, requires_grad=True)
    t = torch.tensor([0.0, 4.0], dtype=F64, device=device)
    quiet = _NoisyField(sigma=0.0, after=float("inf")).to(device)
    odeint(quiet, y0, t)
    field = _NoisyField(sigma=1e-12, after=0.5).to(device)
    with pytest.raises(RuntimeError, match="draws random numbers"):
        odeint(field, y0, t)
    assert field.nfe < quiet.nfe / 2


def test_direct_adjoint_backpropagates_through_the_forwards_own_draws_on_adaptive_steps(device):
    """y' = -(w + sigma xi) y with one scalar draw per evaluation: y(T) = J y0 for the forward's draws, so
    dL/dy0 = y(T)/y0."""
    torch.manual_seed(0)
    field = _NoisyField(sigma=1e-3, multiplicative=True).to(device)
    y0 = torch.tensor([1.0, 2.0, -0.5], dtype=F64, device=device, requires_grad=True)
    out = odeint(field, y0, torch.tensor([0.0, 1.0], dtype=F64, device=device), rtol=1e-4, atol=1e-6,
                 adjoint=DirectAdjoint())
    (grad,) = torch.autograd.grad(out[-1].sum(), y0)
    torch.testing.assert_close(grad, (out[-1] / y0).detach(), rtol=1e-13, atol=0)


# -- 14. events: at t0, changing shape, a value that stops depending on (t, y) -----------------------------


def _ballistic(t, y):
    """Height and velocity under gravity: y = (x, v), x' = v, v' = -9.8."""
    return torch.cat([y[1:], torch.full_like(y[:1], -9.8)])


def _event_grads(odeint_event_, event_fn, y0, t0, **kwargs):
    y0 = y0.clone().requires_grad_(True)
    t0 = t0.clone().requires_grad_(t0.requires_grad)
    event_t, sol = odeint_event_(_ballistic, y0, t0, event_fn=event_fn, **kwargs)
    wrt = (y0, t0) if t0.requires_grad else (y0,)
    g_t = torch.autograd.grad(event_t, wrt, retain_graph=True, allow_unused=True)
    g_y = torch.autograd.grad(sol[-1].sum(), wrt, allow_unused=True)
    return event_t.detach(), sol.detach(), g_t, g_y


def _assert_like_torchdiffeq(event_fn, y0, atol, **kwargs):
    t0 = torch.tensor(0.0, dtype=F64, device=y0.device)
    from mpnode.core import odeint_event

    ours = _event_grads(odeint_event, event_fn, y0, t0, **kwargs)
    ref = _event_grads(torchdiffeq.odeint_event, event_fn, y0, t0, **kwargs)
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=atol)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=atol * 50)
    for a, b in zip(ours[2] + ours[3], ref[2] + ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=atol * 50)
    return ours


def test_event_that_holds_at_t0_returns_y0_with_torchdiffeqs_gradients(device):
    """Was: a false 'touches the event surface without crossing it' error whenever gradients were on."""
    y0 = torch.tensor([0.0, 5.0], dtype=F64, device=device)
    event_t, sol, g_t, g_y = _assert_like_torchdiffeq(lambda t, y: y[0], y0, atol=0)
    assert float(event_t) == 0.0 and torch.equal(sol[1], y0)
    assert torch.equal(g_t[0], torch.zeros(2, dtype=F64, device=device))  # the event time does not move with y0
    assert torch.equal(g_y[0], torch.ones(2, dtype=F64, device=device))  # y(T) = y0
    from mpnode.core import odeint_event

    t0 = torch.tensor(0.25, dtype=F64, device=device, requires_grad=True)
    for kwargs in ({}, {"method": "rk4", "options": {"step_size": 0.1}}):  # torchdiffeq's fixed grids never return here
        event_t, _ = odeint_event(_ballistic, y0.clone().requires_grad_(True), t0, event_fn=lambda t, y: y[0], **kwargs)
        assert float(event_t.detach()) == 0.25 and torch.autograd.grad(event_t, t0)[0] == 1.0  # T = t0 moves with t0


def test_event_fn_whose_value_changes_shape_is_broadcast_like_torchdiffeq(device):
    """Was: ValueError 'it must return the same shape at every call'; torchdiffeq multiplies by the t0 signs."""

    def grows(t, y):
        return y[:1] if t < 0.3 else y[:1].expand(2)

    _assert_like_torchdiffeq(grows, torch.tensor([1.0, 5.0], dtype=F64, device=device), atol=1e-8)
    from mpnode.core import odeint_event

    with pytest.raises(ValueError, match=r"shape \(3,\) .* but \(2,\) at t0.*broadcast"):
        odeint_event(_ballistic, torch.tensor([1.0, 5.0], dtype=F64, device=device),
                     torch.tensor(0.0, dtype=F64, device=device),
                     event_fn=lambda t, y: y[:2] if t < 0.3 else y[:1].expand(3))


@pytest.mark.parametrize("kind", ["constant", "where"])
def test_event_value_that_stops_depending_on_t_and_y_has_a_fixed_event_time(kind, device):
    """A time horizon: was 'element 0 of tensors does not require grad'; the event time does not move (dT = 0)."""

    def horizon(t, y):
        if kind == "constant":
            return torch.tensor(1.0 if t < 0.5 else -1.0, dtype=y.dtype, device=y.device)
        return torch.where(t < 0.5, y[0] + 100.0, torch.full_like(y[0], -1.0))

    y0 = torch.tensor([1.0, 5.0], dtype=F64, device=device)
    if kind == "constant":  # torchdiffeq's bisection stops within its atol of 0.5
        event_t, _, g_t, g_y = _assert_like_torchdiffeq(horizon, y0, atol=1e-8)
    else:  # torchdiffeq lands on either side of the jump; compare with the constant horizon's numbers
        from mpnode.core import odeint_event

        event_t, _, g_t, g_y = _event_grads(odeint_event, horizon, y0, torch.tensor(0.0, dtype=F64, device=device))
    assert abs(float(event_t) - 0.5) < 1e-12
    assert torch.equal(g_t[0], torch.zeros(2, dtype=F64, device=device))
    torch.testing.assert_close(g_y[0], torch.tensor([1.0, 1.0 + float(event_t)], dtype=F64, device=device))


# -- 15. messages that name the cause and the fix --------------------------------------------------------


def _decay(t, y):
    return -y


@pytest.mark.parametrize("case", ["zero-tolerances", "nan-norm", "vector-norm", "negative-norm", "step_t-string"])
def test_user_slips_get_a_message_naming_the_cause(case, device):
    """Were: 'step size underflowed ... may be stiff', or internal errors (reshape, complex comparison, new())."""
    y0 = torch.ones(3, dtype=F64, device=device)
    t = torch.tensor([0.0, 1.0], dtype=F64, device=device)
    zeros = torch.zeros(3, dtype=F64, device=device)
    kwargs, error, match = {
        "zero-tolerances": (dict(rtol=zeros, atol=zeros), ValueError, "rtol and atol are both zero for 3 of 3"),
        "nan-norm": (dict(options=dict(norm=lambda e: e.sum() * float("nan"))), ValueError,
                     r"options\['norm'\] returned NaN for a finite"),
        "vector-norm": (dict(options=dict(norm=lambda e: e.abs())), TypeError,
                        r"options\['norm'\] returned a tensor of shape \(3,\).*one number"),
        "negative-norm": (dict(options=dict(norm=lambda e: -e.abs().max())), ValueError,
                          r"options\['norm'\] returned -.*never negative"),
        "step_t-string": (dict(options=dict(step_t="0.5")), TypeError, r"options\['step_t'\] must be a list or 1-D"),
    }[case]
    with pytest.raises(error, match=match):
        odeint(_decay, y0, t, **kwargs)


def test_zero_tolerance_for_some_elements_only_is_refused_too(device):
    rtol = torch.tensor([1e-6, 0.0, 1e-6], dtype=F64)
    with pytest.raises(ValueError, match="both zero for 1 of 3 state elements"):
        odeint(_decay, torch.ones(3, dtype=F64, device=device), torch.tensor([0.0, 1.0], dtype=F64, device=device),
               rtol=rtol, atol=torch.tensor([1e-9, 0.0, 0.0], dtype=F64))


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_an_empty_batch_is_solved_like_torchdiffeqs_fixed_grids(method, device):
    """Was (adaptive): 'step size underflowed ... may be stiff' (torchdiffeq: 'underflow in dt'); fixed grids worked."""
    y0 = torch.ones(0, 3, dtype=F64, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=F64, device=device)
    out = odeint(_decay, y0, t, method=method)
    assert out.shape == (4, 0, 3)
    (grad,) = torch.autograd.grad(out.sum(), y0)
    assert grad.shape == (0, 3)
    if method == "rk4":
        assert torchdiffeq.odeint(_decay, y0, t, method=method).shape == out.shape


@pytest.mark.parametrize("stepping", STEPPINGS)
@pytest.mark.parametrize("strategy", ["recompute", "segmented", "direct", "auto-fallback", "no-grad"])
def test_a_field_that_writes_into_y_is_refused_and_y0_stays_as_it_was(strategy, stepping, device):
    """Was: the in-place write reached the caller's y0 (even a leaf that requires grad) and the solve went on.

    A strategy that keeps graphs evaluates its steps (and an adaptive solve's first stage) with autograd on, where
    autograd itself refuses the write (its leaf check comes first); elsewhere odeint's message names the fix."""

    def halves_y(t, y):
        y.mul_(0.5)
        return -y

    y0 = torch.ones(3, dtype=F64, device=device, requires_grad=strategy != "no-grad")
    adjoint = None if strategy == "no-grad" else STRATEGIES[strategy]()
    ours = "func modified its input y in place.*Your y0 was not changed"
    autograd = "leaf Variable that requires grad is being used in an in-place operation"
    keeps_graphs = strategy in ("direct", "auto-fallback")
    with pytest.raises(RuntimeError, match=autograd if keeps_graphs else ours):
        odeint(halves_y, y0, torch.tensor([0.0, 1.0], dtype=F64, device=device), adjoint=adjoint,
               **STEPPINGS[stepping])
    assert torch.equal(y0.detach(), torch.ones(3, dtype=F64, device=device)) and y0._version == 0


def test_a_tuple_field_that_writes_into_a_part_of_y_is_refused(device):
    y0 = (torch.ones(3, dtype=F64, device=device), torch.ones(2, dtype=F64, device=device))
    with pytest.raises(RuntimeError, match="modified its input y in place"):
        odeint(lambda t, y: (y[0].add_(1.0), -y[1]), y0, torch.tensor([0.0, 1.0], dtype=F64, device=device))
    assert all(torch.equal(p, torch.ones_like(p)) for p in y0)

