"""torchdiffeq's other entry points: ``odeint_adjoint`` and ``odeint_event``.

* [`odeint_adjoint`][mpnode.core.compat.odeint_adjoint] takes torchdiffeq's arguments and runs
  [`odeint`][mpnode.core.odeint.odeint]:
  mpnode's backward pass is already an adjoint method (a discrete one, with one
  checkpoint per step), so the two give the same numbers.  The adjoint tolerances,
  method and options of torchdiffeq's continuous adjoint have no role in a
  discrete adjoint (backward walks exactly the forward's steps); they are accepted
  and, when they differ from the forward's, a warning says so once per call site.
* [`odeint_event`][mpnode.core.compat.odeint_event] solves until an event and makes the event time
  differentiable (implicit function theorem, see
  [`mpnode.core.events.attach_event_gradient`][mpnode.core.events.attach_event_gradient]).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .events import attach_event_gradient
from .odeint import DEFAULT_ATOL, DEFAULT_RTOL, odeint
from .precision import PrecisionPolicy
from .state import State


class AdjointArgumentsIgnoredWarning(UserWarning):
    """``odeint_adjoint`` got adjoint tolerances/method/options that differ from the forward's; they have no effect."""


def odeint_adjoint(
    func: Callable,
    y0: State,
    t: torch.Tensor,
    *,
    rtol: float | torch.Tensor | None = None,
    atol: float | torch.Tensor | None = None,
    method: str | None = None,
    options: Mapping[str, Any] | None = None,
    event_fn: Callable | None = None,
    adjoint_rtol: float | torch.Tensor | None = None,
    adjoint_atol: float | torch.Tensor | None = None,
    adjoint_method: str | None = None,
    adjoint_options: Mapping[str, Any] | None = None,
    adjoint_params: Iterable[torch.Tensor] | None = None,
    **mpnode_kwargs: Any,
) -> State | tuple[torch.Tensor, State]:
    """``torchdiffeq.odeint_adjoint`` with mpnode's discrete adjoint; results equal
    [`odeint`][mpnode.core.odeint.odeint]'s.

    Args:
        func: as [`odeint`][mpnode.core.odeint.odeint].
        y0: as [`odeint`][mpnode.core.odeint.odeint].
        t: as [`odeint`][mpnode.core.odeint.odeint].
        rtol: as [`odeint`][mpnode.core.odeint.odeint] (torchdiffeq's default 1e-7).
        atol: as [`odeint`][mpnode.core.odeint.odeint] (torchdiffeq's default 1e-9).
        method: as [`odeint`][mpnode.core.odeint.odeint].
        options: as [`odeint`][mpnode.core.odeint.odeint].
        event_fn: as [`odeint`][mpnode.core.odeint.odeint].
        adjoint_rtol: accepted for torchdiffeq compatibility and unused: backward differentiates the forward's own
            steps, so there is no second solve to configure.  An
            [`AdjointArgumentsIgnoredWarning`][mpnode.core.compat.AdjointArgumentsIgnoredWarning] is issued when one of
            the four adjoint arguments is given and differs from its forward counterpart.
        adjoint_atol: likewise.
        adjoint_method: likewise.
        adjoint_options: likewise; compared with ``options`` leaving out ``norm``
            on both sides: an adjoint norm such as torchdiffeq's ``"seminorm"`` only
            makes a continuous adjoint's solve cheaper, and mpnode's backward
            already takes exactly the forward's steps.
        adjoint_params: the tensors that receive gradients (torchdiffeq's meaning):
            default ``func.parameters()``, which needs ``func`` to be an
            ``nn.Module``; pass ``adjoint_params=()`` for a function without
            parameters.  A tuple or list (a single tensor is refused: pass ``(w,)``).
            Tensors with ``requires_grad=False`` are skipped; every other tensor
            ``func`` reads is a constant.  A listed tensor ``func`` never reads gets a
            zero gradient, except that a non-leaf one (``w * 1``: gradients would
            only pass through it to ``w``) is refused in backward, naming the fix.
        **mpnode_kwargs: ``scaler=`` and ``adjoint=`` of [`odeint`][mpnode.core.odeint.odeint].

    Returns:
        As [`odeint`][mpnode.core.odeint.odeint].
    """
    if adjoint_params is not None:
        params = adjoint_params  # odeint checks it (a bare tensor is refused there, not iterated into its rows)
    elif isinstance(func, torch.nn.Module):
        params = tuple(func.parameters())
    else:
        raise ValueError(
            "odeint_adjoint: func is not an nn.Module, so its parameters cannot be found; pass the tensors to "
            "differentiate as adjoint_params=(...), or adjoint_params=() if there are none (as torchdiffeq requires)"
        )
    unknown = sorted(set(mpnode_kwargs) - {"scaler", "adjoint"})
    if unknown:
        raise TypeError(f"odeint_adjoint got unexpected keyword argument(s) {unknown}")
    _warn_ignored_adjoint_arguments(
        rtol, atol, method, options, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options
    )
    return odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn,
                  adjoint_params=params, **mpnode_kwargs)


def _warn_ignored_adjoint_arguments(rtol, atol, method, options, adjoint_rtol, adjoint_atol, adjoint_method,
                                    adjoint_options) -> None:
    def without_norm(opts):
        return None if opts is None else {k: v for k, v in opts.items() if k != "norm"}

    forward_options, adjoint_options = without_norm(options or {}), without_norm(adjoint_options)
    differs = [
        name for name, given, forward in (
            ("adjoint_rtol", adjoint_rtol, DEFAULT_RTOL if rtol is None else rtol),
            ("adjoint_atol", adjoint_atol, DEFAULT_ATOL if atol is None else atol),
            ("adjoint_method", adjoint_method, method),
            ("adjoint_options", adjoint_options, forward_options),
        )
        if given is not None and not _same(given, forward)
    ]
    if differs:
        warnings.warn(
            f"odeint_adjoint: {', '.join(differs)} differ from the forward's and have no effect: mpnode's adjoint is "
            "discrete (backward differentiates the forward's own steps with the forward's method), so there is no "
            "separate adjoint solve to configure. Drop these arguments to silence this warning.",
            AdjointArgumentsIgnoredWarning,
            stacklevel=3,
        )


def _same(a: Any, b: Any) -> bool:
    """Equality of tolerances, method names and option dicts, tensors compared by value."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return a.shape == b.shape and bool((a.detach().cpu() == b.detach().cpu()).all())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return a is b


def odeint_event(
    func: Callable,
    y0: State,
    t0: torch.Tensor,
    *,
    event_fn: Callable,
    reverse_time: bool = False,
    odeint_interface: Callable = odeint,
    **kwargs: Any,
) -> tuple[torch.Tensor, State]:
    """Solve from ``t0`` until ``event_fn(t, y)`` crosses zero; the event time is differentiable.

    torchdiffeq's ``odeint_event``: integrates forward (backward in time with
    ``reverse_time=True``) until an element of ``event_fn(t, y)`` changes sign,
    locates the root on the step's interpolant in the state's dtype and returns it.
    Gradients of the event time and of the final state reach ``y0``, ``t0``, the
    field's parameters and tensors ``event_fn`` uses (a learned threshold, say) by
    the implicit function theorem; torchdiffeq's version gives no gradient to the
    latter.  Under ``torch.autocast`` the field runs in low precision, the event
    function and the root finding in the state's dtype.

    Args:
        func: the vector field, as [`odeint`][mpnode.core.odeint.odeint].
        y0: initial state (tensor or tuple), float32/float64.
        t0: the start time, a 0-dim (or one-element) float32/float64 tensor.
        event_fn: ``event_fn(t, y) -> tensor``; ``t`` a 0-dim tensor in the state's dtype.
        reverse_time: integrate towards decreasing time.
        odeint_interface: [`odeint`][mpnode.core.odeint.odeint] (default) or
            [`odeint_adjoint`][mpnode.core.compat.odeint_adjoint].
        **kwargs: passed on (``rtol``, ``atol``, ``method``, ``options``, ...); fixed-grid
            methods need ``options={"step_size": ...}``.

    Returns:
        ``(event_t, solution)``: ``event_t`` a 0-dim tensor in ``t0``'s dtype and
        ``solution`` the states at ``[t0, event_t]``, ``(2, *y0.shape)`` (a tuple
        for a tuple ``y0``).
    """
    if not isinstance(t0, torch.Tensor) or t0.numel() != 1:
        raise TypeError(f"odeint_event: t0 must be a one-element tensor such as torch.tensor(0.0), got {t0!r}")
    start = t0.reshape(1)
    t = torch.cat([start, start.detach() + (-1.0 if reverse_time else 1.0)])
    event_t, solution = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
    policy = PrecisionPolicy.capture(y0 if isinstance(y0, torch.Tensor) else y0[0])
    if isinstance(solution, torch.Tensor):
        event_t, last = attach_event_gradient(func, event_fn, start, y0, event_t, solution[-1], policy)
        assert isinstance(last, torch.Tensor)
        return event_t, torch.cat([solution[:-1], last.unsqueeze(0)])
    event_t, last = attach_event_gradient(func, event_fn, start, y0, event_t, tuple(s[-1] for s in solution), policy)
    return event_t, tuple(torch.cat([s[:-1], e.unsqueeze(0)]) for s, e in zip(solution, last))
