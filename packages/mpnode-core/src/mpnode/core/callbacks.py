"""torchdiffeq's callbacks on the vector field: ``callback_step``, ``callback_accept_step``, ... .

A vector field may define methods named like torchdiffeq's; ``odeint`` calls
them with ``(t0, y0, dt)``: ``t0`` and ``dt`` 0-dim tensors in the grid's dtype on
the state's device (``dt`` the step's size, positive whichever the direction of
time, as torchdiffeq passes it), ``y0`` the state at the step's start in the
user's structure (a tensor or tuple; no graph attached).

* ``callback_step``: before every step of the forward pass (every attempt for
  adaptive methods);
* ``callback_accept_step`` / ``callback_reject_step``: after an adaptive attempt is
  accepted / rejected;
* ``callback_step_adjoint``: before each step of mpnode's backward pass, with
  ``y0`` the step's recomputed checkpoint (its stored state, in the state's dtype);
* ``callback_accept_step_adjoint`` / ``callback_reject_step_adjoint``: after a
  backward step's vector-Jacobian product is accepted / discarded (a float16
  scaler rejected its block and the steps are redone).

An attribute whose name starts with ``callback_`` but is none of these triggers
a warning naming the valid ones, and so does ``callback_accept_step`` /
``callback_reject_step`` on a fixed grid, where no step is accepted or rejected
(torchdiffeq warns likewise).  With no callback defined nothing is built or called
(no extra host synchronisation).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .state import FlatState

FORWARD_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
BACKWARD_CALLBACKS = tuple(name + "_adjoint" for name in FORWARD_CALLBACKS)
VALID = FORWARD_CALLBACKS + BACKWARD_CALLBACKS


class Callbacks:
    """The callbacks ``func`` defines, called with torchdiffeq's signature."""

    def __init__(self, func: Any, layout: FlatState) -> None:
        self.layout = layout
        self._found: dict[str, Callable] = {}
        for name in _callback_names(func):
            if name in VALID:
                hook = getattr(func, name)
                if callable(hook):
                    self._found[name] = hook
            else:
                warnings.warn(
                    f"odeint: func has an attribute {name!r} that is not a known callback and will never be called; "
                    f"valid callbacks are {list(VALID)}",
                    stacklevel=3,
                )

    def check_supported(self, adaptive: bool, method: str) -> None:
        """Warn about defined forward callbacks that this kind of stepping never calls."""
        if adaptive:
            return
        unused = [name for name in ("callback_accept_step", "callback_reject_step") if name in self._found]
        if unused:
            warnings.warn(
                f"odeint: func defines {unused}, which are never called for method {method!r} on a fixed grid "
                "(no step is accepted or rejected there); use callback_step, or an adaptive method such as 'dopri5'",
                stacklevel=3,
            )

    def __bool__(self) -> bool:
        return bool(self._found)

    def wants(self, name: str) -> bool:
        return name in self._found

    def call(self, name: str, t0: torch.Tensor | float, y: torch.Tensor, dt: torch.Tensor | float,
             dtype: torch.dtype) -> None:
        """Call ``name`` if defined; host floats are turned into 0-dim tensors on the state's device."""
        hook = self._found.get(name)
        if hook is None:
            return
        device = self.layout.device
        t0 = t0.detach() if isinstance(t0, torch.Tensor) else torch.tensor(t0, dtype=dtype, device=device)
        dt = dt.detach().abs() if isinstance(dt, torch.Tensor) else torch.tensor(abs(dt), dtype=dtype, device=device)
        hook(t0, self.layout.unflatten(y.detach()), dt)


def _callback_names(func: Any) -> list[str]:
    names = set()
    for name in dir(type(func)) + list(getattr(func, "__dict__", {})):
        if name.startswith("callback_"):
            names.add(name)
    return sorted(names)
