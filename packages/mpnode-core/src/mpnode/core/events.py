"""Terminal events: march until ``event_fn(t, y)`` crosses zero (torchdiffeq's ``event_fn``).

``odeint(func, y0, t, event_fn=g)`` with ``t = [t0, t1]`` (``t1`` only gives the
direction of time, as in torchdiffeq) marches from ``t0``; after every accepted
step it evaluates the event value at the step's end, and at the first sign change
it locates the root inside that step on the step's own interpolant (the dense
output of adaptive methods; the linear or cubic Hermite interpolant of fixed
grids, which need ``step_size``).  The solve returns ``(event_t, [y0, y(event_t)])``.

The pieces:

* [`EventFunction`][mpnode.core.events.EventFunction]: ``event_fn`` combined into one scalar ``g`` that is
  positive before the event: ``g = min(event_fn(t, y) * sign(event_fn(t0, y0)))``
  over its elements (torchdiffeq's rule for vector-valued event functions);
* [`EventLocator`][mpnode.core.events.EventLocator]: the hooks both marches call (``begin``, ``after_step``,
  ``output_times``; ``not_found`` for the adaptive march's bound) and the root finder;
* [`until_event`][mpnode.core.events.until_event]: the march of a solve until an event (fixed grids become
  [`FixedStepsUntilEvent`][mpnode.core.march.FixedStepsUntilEvent]);
* [`attach_event_gradient`][mpnode.core.events.attach_event_gradient]: the implicit-function-theorem link from the
  event time to ``y0``, ``t0`` and the parameters, used by ``odeint_event``.

Precision: ``event_fn`` and the root finding always run in the state's dtype with
autocast off (``t`` passed as a 0-dim tensor in the state's dtype, ``y`` in the
user's structure); only the vector field runs in the autocast dtype.  Host
synchronisations: one per accepted step (the sign of ``g`` at its end) and one per
root-finding iteration (about ten per event).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .outputs import OutputPlacement
from .precision import PrecisionPolicy
from .state import FlatState, FlatVectorField, State

if TYPE_CHECKING:
    from .march import March

#: Iterations of the root finder before it gives up (it needs about ten).
MAX_ROOT_ITERATIONS = 200

#: Steps (fixed grids) or attempts (adaptive, unless ``options['max_num_steps']`` says otherwise) taken while
#: looking for an event before the solve gives up (torchdiffeq's fixed-grid limit).
MAX_EVENT_STEPS = 20000


class EventFunction:
    """``event_fn(t, y)`` as one scalar ``g(t, y)`` that is positive until the event.

    ``event_fn`` may return a tensor of any shape; each element is multiplied by its sign at ``(t0, y0)``
    ([`calibrate`][mpnode.core.events.EventFunction.calibrate]) and ``g`` is the minimum, so the event is the first time
    any element changes sign.  A later value of another shape is multiplied by those signs with broadcasting
    (torchdiffeq's rule), so e.g. a one-element value may become a vector.  Evaluated with autocast off, in the state's
    dtype: ``g`` is a 0-dim tensor in that dtype.
    """

    def __init__(self, event_fn: Callable, layout: FlatState, policy: PrecisionPolicy) -> None:
        if not callable(event_fn):
            raise TypeError(f"event_fn must be callable as event_fn(t, y) -> tensor, got {type(event_fn).__name__}")
        self.event_fn = event_fn
        self.layout = layout
        self.policy = policy
        self.signs: torch.Tensor | None = None

    def raw(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``event_fn(t, y)`` for a flat state ``y``, in the state's dtype (autocast off)."""
        with torch.autocast(self.policy.device_type, enabled=False):
            out = self.event_fn(t.to(self.layout.dtype), self.layout.unflatten(y))
        if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
            raise TypeError(f"event_fn must return a floating tensor, got {type(out).__name__}"
                            + (f" of dtype {out.dtype}" if isinstance(out, torch.Tensor) else ""))
        return out.to(self.layout.dtype)

    def calibrate(self, t0: torch.Tensor, y0: torch.Tensor) -> None:
        """Record the sign of every element of ``event_fn(t0, y0)``."""
        with torch.no_grad():
            self.signs = torch.sign(self.raw(t0, y0.detach()))

    def _signs(self) -> torch.Tensor:
        assert self.signs is not None, "calibrate() runs first"
        return self.signs

    def holds_at_start(self) -> bool:
        """Whether an element of ``event_fn(t0, y0)`` is zero: the event holds before any step (after ``calibrate``)."""
        return bool((self._signs() == 0).any())

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out, signs = self.raw(t, y), self._signs()
        if out.shape != signs.shape:
            try:
                torch.broadcast_shapes(out.shape, signs.shape)
            except RuntimeError:
                raise ValueError(
                    f"event_fn returned shape {tuple(out.shape)} at t = {float(t):.6g} but {tuple(signs.shape)} at "
                    "t0; its elements are multiplied by their signs at t0, so later values must broadcast with the "
                    "first (as in torchdiffeq); return the same shape at every call"
                ) from None
        return (out * signs).min()


class EventLocator:
    """Detects the event at the ends of accepted steps and locates it inside the step that crosses.

    Attributes:
        g: the combined event function.
        time: the located event time (host float), ``None`` before it is found.
    """

    def __init__(self, g: EventFunction) -> None:
        self.g = g
        self.time: float | None = None
        self._t0: float | None = None
        self._last = math.nan  # g at the end of the last accepted step

    def _value(self, t: float, y: torch.Tensor) -> float:
        """``g(t, y)`` as a host float (one synchronisation)."""
        with torch.no_grad():
            v = float(self.g(torch.tensor(t, dtype=self.g.layout.dtype, device=y.device), y))
        if math.isnan(v):
            raise FloatingPointError(f"odeint: event_fn returned NaN at t = {t:.17g}; check the "
                                     "event function and the state")
        return v

    def begin(self, outputs: list[float], direction: int, y0: torch.Tensor, rows: list,
              placement: OutputPlacement) -> tuple[list[float], int]:
        """Calibrate ``g`` at ``(t0, y0)``; returns the outputs ``[t0, event]`` and the next output index.

        When the event holds at ``t0`` already (an element of ``event_fn`` is 0)
        the solution is ``[y0, y0]`` and the index returned is 2 (no step is taken).
        """
        t0 = outputs[0]
        self._t0 = t0
        self.g.calibrate(torch.tensor(t0, dtype=self.g.layout.dtype, device=y0.device), y0)
        self._last = self._value(t0, y0)
        if self._last == 0.0:
            self.time = t0
            rows[1] = y0
            placement.add_node(0, 1)
            return [t0, t0], 2
        return [t0, direction * math.inf], 1

    def after_step(self, n: int, t0: float, t1: float, y1: torch.Tensor, interp: Callable[[float], torch.Tensor],
                   rows: list, placement: OutputPlacement) -> bool:
        """After accepted step ``n`` from ``t0`` to ``t1``: if ``g`` changed sign, place the event output; True then.

        ``interp(x)`` is the step's interpolant at ``t0 + x (t1 - t0)`` (flat, state dtype).
        """
        end = self._value(t1, y1)
        if end > 0.0:
            self._last = end
            return False
        x = self._root(t0, t1, self._last, end, interp)
        self.time = t0 + x * (t1 - t0)
        rows[1] = interp(x)
        placement.add_interp(n, 1, x)
        return True

    def _root(self, t0: float, t1: float, g0: float, g1: float, interp: Callable[[float], torch.Tensor]) -> float:
        """The root of ``x -> g(t0 + x h, interp(x))`` in ``(0, 1]`` given ``g(0) > 0 >= g(1)``.

        Illinois regula falsi (Dowell & Jarratt 1971) with a bisection step whenever
        three iterations have not halved the bracket; stops when the bracket is
        below the resolution of times in the state's dtype.  Returns the bracket end
        with the smaller ``|g|``.
        """
        if g1 == 0.0:
            return 1.0
        h = t1 - t0
        eps = torch.finfo(self.g.layout.dtype).eps
        resolution = 4 * eps * max(abs(t0), abs(t1)) / abs(h)  # in units of x
        a, ga, b, gb = 0.0, g0, 1.0, g1
        fa, fb = ga, gb  # Illinois-weighted values
        width_before, side = 1.0, 0
        with torch.no_grad():
            for it in range(MAX_ROOT_ITERATIONS):
                if b - a <= resolution:
                    break
                x = (a * fb - b * fa) / (fb - fa)
                if it % 3 == 2:
                    if b - a > 0.5 * width_before:
                        x = 0.5 * (a + b)
                    width_before = b - a
                if not a < x < b:
                    x = 0.5 * (a + b)
                gx = self._value(t0 + x * h, interp(x))
                if gx == 0.0:
                    return x
                if gx > 0.0:
                    a, ga, fa = x, gx, gx
                    fb = fb / 2 if side == 1 else fb
                    side = 1
                else:
                    b, gb, fb = x, gx, gx
                    fa = fa / 2 if side == -1 else fa
                    side = -1
        return a if abs(ga) < abs(gb) else b

    def not_found(self, attempts: int, t: float) -> RuntimeError:
        """The error of an adaptive march that made ``attempts`` attempts without an event, now at time ``t``."""
        return RuntimeError(
            f"odeint: no event within {attempts} step attempts from t = {self._t0:.6g} (reached t = {t:.6g}); check "
            "that event_fn changes sign along the solution (an element of event_fn(t, y) must cross zero), or raise "
            f"options['max_num_steps'] (default {MAX_EVENT_STEPS} for a solve until an event) if it happens later"
        )

    def output_times(self, t: torch.Tensor) -> torch.Tensor:
        """``[t0, event time]`` in ``t``'s dtype and device (the outputs the backward pass differentiates)."""
        return torch.tensor([self._t0, self.time], dtype=t.dtype, device=t.device)

    def event_time(self, t: torch.Tensor) -> torch.Tensor:
        """The event time as a 0-dim tensor in ``t``'s dtype (no graph; see ``odeint_event`` for gradients)."""
        return torch.tensor(self.time, dtype=t.dtype, device=t.device)


def until_event(march: March, event_fn: Callable, layout: FlatState, policy: PrecisionPolicy,
                t_host: torch.Tensor) -> tuple[March, EventLocator]:
    """The march and event locator of ``odeint(..., event_fn=...)``; checks ``t`` and the grid option.

    A fixed grid becomes fixed steps of ``step_size`` until the event, at most
    ``MAX_EVENT_STEPS`` of them; adaptive steps get the same bound on attempts
    unless ``options['max_num_steps']`` was given.
    """
    if t_host.numel() != 2:
        raise ValueError(
            f"odeint: with event_fn, t must hold two times [t0, t1] (t0 starts the solve, t1 only gives the direction "
            f"of time, as in torchdiffeq), got {t_host.numel()}; or call odeint_event(func, y0, t0, event_fn=...)"
        )
    return march.until_event(MAX_EVENT_STEPS), EventLocator(EventFunction(event_fn, layout, policy))


def attach_event_gradient(func: Callable, event_fn: Callable, t0: torch.Tensor, y0: State, event_t: torch.Tensor,
                          state: State, policy: PrecisionPolicy) -> tuple[torch.Tensor, State]:
    """Make ``event_t`` and ``state = y(event_t)`` differentiable through the event condition.

    ``state`` comes from ``odeint`` differentiable at the fixed event time
    ``T = event_t`` (no graph).  With ``g`` the combined event function and
    ``s = dg/dt + dg/dy . f(T, y(T))`` its slope along the solution (no graph), the
    implicit function theorem gives ``dT = -(dg/dy . dy(T) + dg/dtheta_g) / s`` for
    any change of ``y0``, ``t0``, the field's or the event function's parameters.
    Returned: ``T + delta`` and ``y(T) + f delta`` with
    ``delta = (g - g.detach()) * (-1 / s)``, whose value is exactly 0 and whose
    gradient is ``dT``.  ``f`` is evaluated as in the solve (autocast), ``g`` in
    the state's dtype.  Raises when ``s`` is 0 or not finite (a tangential crossing:
    the event time has no derivative).

    Two events do not move with the inputs (``dT = 0``, as torchdiffeq computes
    them): one that holds at ``t0`` already (``T = t0``, so only ``t0`` moves it,
    one for one), and one where ``g`` does not depend on ``(t, y)`` (``event_fn``
    jumped there: a time horizon, a switch), where ``state`` is simply ``y`` at
    the fixed time ``T``.
    """
    if not torch.is_grad_enabled():
        return event_t, state
    layout = FlatState(y0)
    g = EventFunction(event_fn, layout, policy)
    g.calibrate(t0.detach().reshape(()), layout.flatten(y0).detach())
    y_e = layout.flatten(state)
    still = event_t + (y_e * 0).sum().to(event_t.dtype)  # T itself, with a zero gradient wherever the state has one
    if g.holds_at_start():
        return still + (t0 - t0.detach()).reshape(()).to(event_t.dtype), state
    t_e = event_t.detach().to(layout.dtype)
    with torch.no_grad(), policy.autocast():
        f_e = FlatVectorField(func, layout)(t_e, y_e.detach())
    with torch.enable_grad():
        t_leaf, y_leaf = t_e.clone().requires_grad_(True), y_e.detach().clone().requires_grad_(True)
        value = g(t_leaf, y_leaf)
        g_t, g_y = (torch.autograd.grad(value, (t_leaf, y_leaf), allow_unused=True) if value.requires_grad
                    else (None, None))
    slope = (g_y * f_e).sum() if g_y is not None else torch.zeros((), dtype=layout.dtype, device=layout.device)
    if g_t is not None:
        slope = slope + g_t
    g_live = g(t_e, y_e)
    if not g_live.requires_grad:
        return still, state
    s = float(slope)
    if s == 0.0 and not any(d is not None and bool(d.any()) for d in (g_t, g_y)):
        return still, state  # g does not depend on (t, y) at T: the event is a jump of event_fn, fixed in time
    if s == 0.0 or not math.isfinite(s):
        raise FloatingPointError(
            f"odeint_event: d/dt event_fn(t, y(t)) is {s} at the event t = {float(event_t):.17g}: the solution touches "
            "the event surface without crossing it, so the event time has no derivative; change event_fn or the "
            "initial condition, or detach the inputs if no gradient is needed"
        )
    delta = (g_live - g_live.detach()) * (-1.0 / s)
    return event_t + delta.to(event_t.dtype), layout.unflatten(y_e + f_e * delta, dtype=layout.user_dtype)
