"""Terminal events: ``odeint(..., event_fn=...)`` and ``odeint_event`` against torchdiffeq in float64.

Event times and gradients (w.r.t. ``y0``, ``t0`` and parameters) agree to 1e-8;
torchdiffeq's bisection is run to ``atol = 1e-12`` so that its own root error
stays below that.
"""

from __future__ import annotations

import math

import pytest
import torch

from mpnode.core import events, odeint, odeint_adjoint, odeint_event

torchdiffeq = pytest.importorskip("torchdiffeq")

TOL = 1e-8
ROOT = {"atol": 1e-12, "rtol": 1e-10}  # tolerances of both solvers (torchdiffeq bisects to atol)
# dopri5 starts from a given first step: torchdiffeq differentiates through its initial-step heuristic, which
# changes its gradients by about 1e-8 relative (a documented difference; see the README's migration table).
METHODS = {
    "dopri5": ("dopri5", {"first_step": 0.01}),
    "rk4-linear": ("rk4", {"step_size": 0.01}),
    "rk4-cubic": ("rk4", {"step_size": 0.01, "interp": "cubic"}),
    "euler-perturb": ("euler", {"step_size": 0.005, "perturb": True}),
}


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Ball(torch.nn.Module):
    """Height and velocity ``(x, v)`` under gravity ``g`` with quadratic drag ``k v |v|``."""

    def __init__(self, g: float = 9.81, drag: float = 0.1, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(g, dtype=dtype))
        self.drag = torch.nn.Parameter(torch.tensor(drag, dtype=dtype))

    def forward(self, t, y):
        v = y[..., 1]
        return torch.stack([v, -self.g - self.drag * v * v.abs()], -1)


def ground(t, y):
    return y[..., 0]


def _event_and_grads(event_solver, func, y0, t0, params, **kw):
    """``[event_t, solution part(s), d loss / d (y0 parts that require grad, t0, params)]``."""
    event_t, sol = event_solver(func, y0, t0, **kw)
    parts = sol if isinstance(sol, tuple) else (sol,)
    loss = 2.0 * event_t + sum((p[-1] * torch.linspace(0.3, 0.9, p[-1].numel(), dtype=p.dtype).reshape(p[-1].shape))
                               .sum() for p in parts)
    inputs = [y for y in (y0 if isinstance(y0, tuple) else (y0,)) if y.requires_grad] + [t0, *params]
    return [event_t.detach(), *(p.detach() for p in parts), *torch.autograd.grad(loss, inputs)]


def _ball_inputs():
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    return y0, t0


def _matches_torchdiffeq(make, **kw):
    """Run ``_event_and_grads`` with mpnode's and torchdiffeq's ``odeint_event`` on fresh ``make() -> (func, y0,
    t0)`` (the parameters: ``func``'s); assert every result agrees to ``TOL``; return mpnode's."""
    results = []
    for solver in (odeint_event, torchdiffeq.odeint_event):
        func, y0, t0 = make()
        results.append(_event_and_grads(solver, func, y0, t0, list(func.parameters()), **kw))
    for a, b in zip(*results):
        assert _rel(a, b) <= TOL
    return results[0]


@pytest.mark.torchdiffeq_row("odeint_event")
@pytest.mark.torchdiffeq_row("event-gradients")
@pytest.mark.torchdiffeq_row("event-fixed-grid")
@pytest.mark.parametrize("name", list(METHODS))
def test_bouncing_ball_matches_torchdiffeq(name):
    method, options = METHODS[name]
    _matches_torchdiffeq(lambda: (Ball(), *_ball_inputs()), event_fn=ground, method=method, options=options, **ROOT)


@pytest.mark.torchdiffeq_row("odeint_event")
def test_default_dopri5_event_time_and_state_match_torchdiffeq():
    results = []
    for solver in (odeint_event, torchdiffeq.odeint_event):
        y0, t0 = _ball_inputs()
        event_t, sol = solver(Ball(), y0, t0, event_fn=ground, **ROOT)
        results.append((event_t.detach(), sol.detach()))
    for a, b in zip(*results):
        assert _rel(a, b) <= 1e-10


@pytest.mark.torchdiffeq_row("event-fn")
@pytest.mark.parametrize("name", ["dopri5", "rk4-cubic"])
@pytest.mark.parametrize("decreasing", [False, True])
def test_odeint_event_fn_matches_torchdiffeq(name, decreasing):
    """odeint's own event_fn: event time and the solution, differentiable at the fixed event time."""
    method, options = METHODS[name]
    results = []
    for solve in (odeint, torchdiffeq.odeint):
        func = Ball()
        y0 = torch.tensor([1.0, -0.5 if decreasing else 0.5], dtype=torch.float64, requires_grad=True)
        t = torch.tensor([0.1, -0.9 if decreasing else 1.1], dtype=torch.float64)
        event_t, sol = solve(func, y0, t, event_fn=ground, method=method, options=options, **ROOT)
        assert event_t.dtype == t.dtype and event_t.shape == () and not event_t.requires_grad
        grads = torch.autograd.grad(sol[-1].sum(), [y0, *func.parameters()])
        results.append([event_t, sol.detach(), *grads])
    for a, b in zip(*results):
        assert _rel(a, b) <= TOL


@pytest.mark.torchdiffeq_row("event-reverse-time")
@pytest.mark.parametrize("name", ["dopri5", "rk4-linear"])
def test_reverse_time_matches_torchdiffeq(name):
    method, options = METHODS[name]

    def make():
        y0 = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
        return Ball(), y0, torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    ours = _matches_torchdiffeq(make, event_fn=ground, reverse_time=True, method=method, options=options, **ROOT)
    assert float(ours[0]) < 0.1


class Spiral(torch.nn.Module):
    """A damped rotation ``x' = A x (1 + 0.1 sin t)`` in 2-D, with a constant threshold ``th`` carried in the state."""

    def __init__(self) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64))

    def forward(self, t, state):
        x, th = state
        return x @ self.A.T * (1 + 0.1 * torch.sin(t)), torch.zeros_like(th)


class Threshold(torch.nn.Module):
    """The event ``x_2 = theta`` with a learned ``theta`` (a parameter of the event function)."""

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, t, state):
        x, _ = state
        return x[1] - self.theta


def _spiral_inputs():
    x0 = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    th = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    return x0, th, t0


@pytest.mark.torchdiffeq_row("odeint_event")
@pytest.mark.torchdiffeq_row("tuple-state")
@pytest.mark.parametrize("name", ["dopri5", "rk4-linear"])
@pytest.mark.parametrize("reverse_time", [False, True])
def test_learned_threshold_in_the_state_matches_torchdiffeq(name, reverse_time):
    method, options = METHODS[name]

    def crossing(t, state):
        x, th = state
        return x[1] - th

    def make():
        x0, th, t0 = _spiral_inputs()
        return Spiral(), (x0, th), t0

    _matches_torchdiffeq(make, event_fn=crossing, reverse_time=reverse_time, method=method, options=options, **ROOT)


@pytest.mark.torchdiffeq_row("event-fn-parameters")
@pytest.mark.parametrize("name", ["dopri5", "rk4-cubic"])
def test_threshold_as_an_event_function_parameter_gets_the_implicit_gradient(name):
    """torchdiffeq gives event_fn's own parameters no gradient; mpnode's equals the gradient of the state form."""
    method, options = METHODS[name]
    func, event = Spiral(), Threshold(0.5)
    x0, th, t0 = _spiral_inputs()
    ours = _event_and_grads(odeint_event, func, (x0, th.detach()), t0, [event.theta, *func.parameters()],
                            event_fn=event, method=method, options=options, **ROOT)

    def crossing(t, state):
        x, th = state
        return x[1] - th

    func_ref = Spiral()
    ref = _event_and_grads(torchdiffeq.odeint_event, func_ref, (x0, th), t0, list(func_ref.parameters()),
                           event_fn=crossing, method=method, options=options, **ROOT)
    # ours: [T, x, th, dx0, dt0, dtheta, dA]; ref: [T, x, th, dx0, dth, dt0, dA]
    for i, j in [(0, 0), (1, 1), (3, 3), (4, 5), (6, 6)]:
        assert _rel(ours[i], ref[j]) <= TOL
    # d/dtheta == d/d(threshold carried in the state), less the loss's direct read of the carried value (weight 0.3)
    assert _rel(ours[5], ref[4] - 0.3) <= TOL


@pytest.mark.torchdiffeq_row("event-fn")
def test_vector_event_function_stops_at_the_first_component_to_cross():
    """A floor at x = -0.2 and a ceiling at x = 1.01 (the ball reaches 1.0127 without it): the ceiling is met first.

    torchdiffeq's rule: each element is multiplied by its initial sign and the minimum is the event value.
    """

    def walls(t, y):
        return torch.stack([y[..., 0] + 0.2, 1.01 - y[..., 0]])

    ours = _matches_torchdiffeq(lambda: (Ball(), *_ball_inputs()), event_fn=walls, **ROOT)
    assert float(ours[1][-1, 0]) == pytest.approx(1.01, abs=1e-9)  # the height at the event


@pytest.mark.torchdiffeq_row("event-fn")
def test_event_at_the_start_returns_y0_like_torchdiffeq():
    y0 = torch.tensor([0.0, 0.5], dtype=torch.float64)
    t = torch.tensor([0.3, 1.3], dtype=torch.float64)
    ours = odeint(Ball(), y0, t, event_fn=ground)
    ref = torchdiffeq.odeint(Ball(), y0, t, event_fn=ground)
    assert float(ours[0]) == float(ref[0]) == 0.3
    assert torch.equal(ours[1], ref[1]) and torch.equal(ours[1], torch.stack([y0, y0]))


@pytest.mark.torchdiffeq_row("event-odeint-interface")
def test_odeint_adjoint_as_the_interface_gives_the_same_gradients():
    results = []
    for interface in (odeint, odeint_adjoint):
        func = Ball()
        y0, t0 = _ball_inputs()
        results.append(_event_and_grads(odeint_event, func, y0, t0, list(func.parameters()), event_fn=ground,
                                        odeint_interface=interface))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.torchdiffeq_row("event-gradients")
def test_three_bounces_with_a_learned_restitution_match_torchdiffeq():
    """The bouncing-ball example's computation: chained events, velocity flipped and scaled by e at each bounce."""

    def bounce_times(solver, func, e, y0, t0):
        times, state, t = [], y0, t0
        for _ in range(3):
            t, sol = solver(func, state, t, event_fn=ground, **ROOT)
            x, v = sol[-1].unbind(-1)
            state = torch.stack([x.detach() * 0 + 1e-9, -e * v])  # restart just above the ground
            times.append(t)
        return torch.stack(times)

    results = []
    for solver in (odeint_event, torchdiffeq.odeint_event):
        func = Ball(drag=0.05)
        e = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        y0, t0 = _ball_inputs()
        times = bounce_times(solver, func, e, y0, t0)
        loss = (times * torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)).sum()
        results.append([times.detach(), *torch.autograd.grad(loss, [e, y0, t0, *func.parameters()])])
    for a, b in zip(*results):
        assert _rel(a, b) <= TOL


# -- mixed precision -------------------------------------------------------------------------------


class NeuralBall(torch.nn.Module):
    """Gravity plus a small learned correction (a Linear layer, so autocast lowers it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def forward(self, t, y):
        v = y[..., 1]
        return torch.stack([v, torch.full_like(v, -9.81)], -1) + 0.1 * self.net(y)


@pytest.mark.filterwarnings("ignore::mpnode.core.MixedPrecisionToleranceWarning")  # steps within bfloat16's noise
@pytest.mark.parametrize("precision", ["bfloat16"])
@pytest.mark.parametrize("name", ["dopri5", "rk4-cubic"])
def test_bfloat16_locates_the_event_near_float32(precision, name):
    """The field in bfloat16, the event function and root finding in float32: close to the float32 run.

    bfloat16's rounding limits the adaptive steps' accuracy (rtol 1e-5 is below what it resolves; the steps within
    its noise are accepted): the event time within 1e-3, the implicit-function gradients within 5 % of the accurate
    float32 run (measured for dopri5: 5.6e-5 and 0.59 %).  The field's bfloat16 correction is added to a float32
    model, so its noise is small (its output is float32, but it carries bfloat16 rounding); the noise-dominated
    error estimates let dopri5's steps grow as fast as the controller allows, to steps as long as the tolerance
    permits at their ends, and the gradient of an event located inside a long step is not under error control
    (float32 itself: 1.1 % at rtol 1e-5, 4.9 % at 1e-4, 8.7 % at 1e-3; bfloat16 without ``max_step``: 0.5 % to 25 %
    depending on where the event falls): both runs take steps of at most 0.2, as docs/solvers.md advises.
    """
    method, options = METHODS[name]
    options = {**options, "max_step": 0.2} if method == "dopri5" else options
    seen = []

    def event(t, y):
        seen.append((t.dtype, y.dtype, torch.is_autocast_enabled("cpu")))
        return y[..., 0]

    results = []
    for ctx in (torch.autocast("cpu", enabled=False), torch.autocast("cpu", dtype=torch.bfloat16)):  # CPU tensors
        func = NeuralBall()
        y0 = torch.tensor([1.0, 0.5], requires_grad=True)
        t0 = torch.tensor(0.0, requires_grad=True)
        with ctx:
            results.append(_event_and_grads(odeint_event, func, y0, t0, list(func.parameters()), event_fn=event,
                                            method=method, options=options, rtol=1e-5, atol=1e-7))
    assert {s[:2] for s in seen} == {(torch.float32, torch.float32)} and not any(s[2] for s in seen)
    (t32, *rest32), (t16, *rest16) = results
    assert t16.dtype == torch.float32 and abs(float(t16 - t32)) < 1e-3 * float(t32)
    for a, b in zip(rest16, rest32):
        assert a.dtype == b.dtype == torch.float32 and _rel(a, b) < 5e-2


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.torchdiffeq_row("event-nan-tangent")
@pytest.mark.torchdiffeq_row("event-fixed-grid")
def test_errors_name_the_fix(monkeypatch):
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="two times"):
        odeint(Ball(), y0, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), event_fn=ground)
    with pytest.raises(ValueError, match="step_size"):
        odeint(Ball(), y0, torch.tensor([0.0, 1.0], dtype=torch.float64), event_fn=ground, method="rk4")
    with pytest.raises(TypeError, match="event_fn must be callable"):
        odeint(Ball(), y0, torch.tensor([0.0, 1.0], dtype=torch.float64), event_fn=3)
    with pytest.raises(TypeError, match="floating tensor"):
        odeint(Ball(), y0, torch.tensor([0.0, 1.0], dtype=torch.float64), event_fn=lambda t, y: 1)
    with pytest.raises(FloatingPointError, match="NaN"):
        odeint(Ball(), y0, torch.tensor([0.0, 1.0], dtype=torch.float64),
               event_fn=lambda t, y: torch.where(t > 0.2, math.nan, 1.0) + 0 * y[0])
    with pytest.raises(TypeError, match="one-element tensor"):
        odeint_event(Ball(), y0, 0.0, event_fn=ground)
    monkeypatch.setattr(events, "MAX_EVENT_STEPS", 20)
    with pytest.raises(RuntimeError, match="no event within 20 steps"):
        odeint(Ball(), y0, torch.tensor([0.0, 1.0], dtype=torch.float64), event_fn=ground, method="rk4",
               options={"step_size": 0.01})


@pytest.mark.torchdiffeq_row("event-nan-tangent")
def test_a_tangential_crossing_refuses_to_differentiate_the_event_time():
    """x(t) = (t - 1)^2 touches zero at t = 1 without crossing it: dT/dy0 does not exist."""

    def field(t, y):
        return torch.stack([y[1], torch.full_like(y[1], 2.0)])

    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(FloatingPointError, match="touches the event surface"):
        odeint_event(field, y0, torch.tensor(0.0, dtype=torch.float64), event_fn=lambda t, y: y[0] - 0 * t,
                     method="rk4", options={"step_size": 0.25})


def test_t1_gets_no_gradient_it_only_gives_the_direction():
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    t = torch.tensor([0.0, 5.0], dtype=torch.float64, requires_grad=True)
    _, sol = odeint(Ball(), y0, t, event_fn=ground)
    (grad,) = torch.autograd.grad(sol[-1].sum(), t)
    assert grad[1] == 0 and grad[0] != 0


@pytest.mark.torchdiffeq_row("event-root")
def test_the_root_is_located_to_the_time_resolution_not_to_atol():
    """Free fall: dopri5's dense output is exact for a quadratic, so the event time is known in closed form.

    torchdiffeq bisects to ``atol`` (here 1e-6); mpnode's root is exact to roundoff whatever ``atol``.
    """

    def fall(t, y):
        return torch.stack([y[1], torch.full_like(y[1], -9.81)])

    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    exact = (0.5 + math.sqrt(0.25 + 2 * 9.81)) / 9.81
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ours, _ = odeint(fall, y0, t, event_fn=ground, atol=1e-6, rtol=1e-6)
    ref, _ = torchdiffeq.odeint(fall, y0, t, event_fn=ground, atol=1e-6, rtol=1e-6)
    assert abs(float(ours) - exact) < 1e-14
    assert 1e-12 < abs(float(ref) - exact) < 1e-6


@pytest.mark.torchdiffeq_row("event-callbacks")
def test_fixed_grid_event_search_calls_callback_step():
    steps = []

    class Logged(Ball):
        def callback_step(self, t0, y0, dt):
            steps.append(float(t0))

    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    event_t, _ = odeint(Logged(), y0, torch.tensor([0.0, 1.0], dtype=torch.float64), event_fn=ground, method="rk4",
                        options={"step_size": 0.1})
    assert steps == pytest.approx([0.1 * k for k in range(len(steps))], abs=1e-12)
    assert steps[-1] < float(event_t) <= steps[-1] + 0.1
    torchdiffeq_steps = len(steps)
    steps.clear()
    torchdiffeq.odeint(Logged(), y0, torch.tensor([0.0, 1.0], dtype=torch.float64), event_fn=ground, method="rk4",
                       options={"step_size": 0.1})
    assert steps == [] and torchdiffeq_steps > 0  # torchdiffeq's fixed-grid event search calls none
