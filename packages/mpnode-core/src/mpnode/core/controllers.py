"""Step-size controllers of adaptive steps: one decision per attempt, made on the host from the error ratio.

* [`IntegralController`][mpnode.core.controllers.IntegralController]: torchdiffeq's rule (the default),
  ``h * min(ifactor, max(safety / r^(1/p), dfactor'))`` with ``dfactor' = 1`` after an accepted step;
* [`PIController`][mpnode.core.controllers.PIController]: Gustafsson's proportional-integral rule, which also uses
  the previous accepted ratio and gives smoother step sequences.

A controller holds only its settings; what it remembers during a solve is its *state*, which
[`init`][mpnode.core.controllers.StepSizeController.init] creates and
[`adapt`][mpnode.core.controllers.StepSizeController.adapt] returns anew after every attempt (as in diffrax and
torchode).  So one instance serves any number of solves, one after another or at once, and a new controller is
one subclass passed as ``options={"controller": ...}``: the march needs no change.

The error ratio comes from [`mpnode.core.tolerance`][mpnode.core.tolerance]; the march accepts an attempt when the
ratio is at most 1 (always at ``min_step``, never above ``max_step``).
"""

from __future__ import annotations

import abc
import math
import numbers
from typing import Any

from .validation import check_number


class StepSizeController(abc.ABC):
    """Sizes the next attempt from the current step size and error ratio (host floats).

    Subclasses implement [`adapt`][mpnode.core.controllers.StepSizeController.adapt] and, when they remember
    anything between attempts, [`init`][mpnode.core.controllers.StepSizeController.init]; they keep no per-solve
    data on ``self``.
    """

    def init(self) -> Any:
        """The state before a solve's first attempt (``None`` for a controller without memory)."""
        return None

    @abc.abstractmethod
    def adapt(self, h: float, ratio: float, accepted: bool, order: int, state: Any) -> tuple[float, Any]:
        """``(next step size > 0, new state)`` after an attempt of size ``h > 0``.

        Args:
            h: the attempt's step size (its magnitude).
            ratio: its error ratio (``<= 1`` passes the tolerance; ``inf`` for a non-finite estimate).
            accepted: whether the march accepted the attempt.
            order: the method's order ``p``.
            state: what [`init`][mpnode.core.controllers.StepSizeController.init] or the previous ``adapt``
                returned.
        """


#: Below this attempt size a next step size of exactly 0 is a float underflow of ``h * factor``, not a contract
#: violation: the march then reports the step-size underflow.
_UNDERFLOW = 1e-300


def next_step(controller: StepSizeController, h: float, ratio: float, accepted: bool, order: int,
              state: Any) -> tuple[float, Any]:
    """``controller.adapt(...)``, its result checked against the contract: ``(a positive finite number, state)``.

    A host-side check of what the controller returned (no device read); a violation raises ``TypeError`` or
    ``ValueError`` naming the controller class, rather than surfacing later as a step-size underflow or an
    unpacking error.
    """
    out = controller.adapt(h, ratio, accepted, order, state)
    name = f"{type(controller).__name__}.adapt"
    if not isinstance(out, tuple) or len(out) != 2:
        got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
        raise TypeError(f"{name} must return (next step size, state), a 2-tuple, got {got} ({out!r}); return "
                        "(h_next, state), with state None for a controller without memory")
    h_next = out[0]
    if isinstance(h_next, bool) or not isinstance(h_next, numbers.Real):
        raise TypeError(f"{name} must return the next step size as a host float (float(...)), got "
                        f"{type(h_next).__name__} ({h_next!r})")
    if not (0.0 < h_next < math.inf) and not (h_next == 0.0 and h < _UNDERFLOW):
        raise ValueError(f"{name} returned the next step size {h_next!r} after an attempt of size {h!r} (error "
                         f"ratio {ratio!r}); it must be positive and finite (a magnitude: the march applies the "
                         "direction of t)")
    return float(h_next), out[1]


class IntegralController(StepSizeController):
    """torchdiffeq's step-size rule (its documented behaviour; the default).

    ``factor = min(ifactor, max(safety / r^(1/p), dfactor'))`` with ``p`` the
    method's order and ``dfactor' = 1`` when ``r < 1`` (an accepted step never
    shrinks the next one), ``dfactor`` otherwise; ``r = 0`` gives ``ifactor``.
    It remembers nothing between attempts.
    """

    def __init__(self, safety: float = 0.9, ifactor: float = 10.0, dfactor: float = 0.2) -> None:
        self.safety = check_number("safety", safety, at_most=1.0)
        self.ifactor = check_number("ifactor", ifactor)
        self.dfactor = check_number("dfactor", dfactor, at_most=1.0)
        if self.ifactor < 1.0:
            raise ValueError(f"ifactor must be at least 1, got {self.ifactor}")

    def adapt(self, h: float, ratio: float, accepted: bool, order: int, state: Any) -> tuple[float, Any]:
        if ratio == 0.0:
            return h * self.ifactor, state
        floor = 1.0 if ratio < 1.0 else self.dfactor
        return h * min(self.ifactor, max(self.safety / ratio ** (1.0 / order), floor)), state

    def __repr__(self) -> str:
        return f"IntegralController(safety={self.safety}, ifactor={self.ifactor}, dfactor={self.dfactor})"


class PIController(StepSizeController):
    """Proportional-integral control (Gustafsson 1991; Hairer & Wanner, Solving ODEs II, IV.2).

    After an accepted step: ``factor = safety * r_n^(-beta1/p) * r_{n-1}^(beta2/p)``
    (``r_{n-1}`` the previous accepted ratio, 1 at the start), clipped to
    ``[dfactor, ifactor]``.  After a rejection the previous ratio is not used:
    ``factor = max(dfactor, safety * r^(-1/p))``.  Defaults ``beta1 = 0.7``,
    ``beta2 = 0.4`` (Hairer & Wanner's suggestion).  State: the last accepted
    ratio (``None`` before the first).
    """

    def __init__(
        self, beta1: float = 0.7, beta2: float = 0.4, safety: float = 0.9, ifactor: float = 10.0, dfactor: float = 0.2
    ) -> None:
        self.beta1 = check_number("beta1", beta1)
        self.beta2 = check_number("beta2", beta2, positive=False, hint="; it must be below beta1")
        if self.beta2 >= self.beta1:
            raise ValueError(f"beta2 must be a number in [0, beta1), got {beta2!r}")
        self.safety = check_number("safety", safety, at_most=1.0)
        self.ifactor = check_number("ifactor", ifactor)
        self.dfactor = check_number("dfactor", dfactor, at_most=1.0)

    def init(self) -> float | None:
        return None

    def adapt(self, h: float, ratio: float, accepted: bool, order: int, state: float | None) -> tuple[float, Any]:
        if ratio == 0.0:
            h_next = h * self.ifactor
        elif not accepted:
            h_next = h * max(self.dfactor, min(1.0, self.safety * ratio ** (-1.0 / order)))
        else:
            memory = (state if state else 1.0) ** (self.beta2 / order)
            factor = self.safety * ratio ** (-self.beta1 / order) * memory
            h_next = h * min(self.ifactor, max(self.dfactor, factor))
        return h_next, (ratio if accepted else state)

    def __repr__(self) -> str:
        return f"PIController(beta1={self.beta1}, beta2={self.beta2}, safety={self.safety})"
