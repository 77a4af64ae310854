"""``odeint``: the torchdiffeq-compatible entry point."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .callbacks import Callbacks
from .contracts import Problem, SolveInputs
from .events import until_event
from .guards import refuse_function_transforms
from .march import AdaptiveMarch, FixedGridMarch, March
from .options import GridOptionIgnoredWarning, SolveOptions
from .outputs import OUTPUT_RULES
from .parameters import gradient_targets, reachable_grad_tensors, reachable_modules, restricted_parameters
from .precision import PrecisionPolicy
from .scaling import AdjointScaling
from .state import FlatState, FlatVectorField, State
from .stats import SolverStats
from .strategies import AdjointStrategy, RecomputeAdjoint
from .tableau import ButcherTableau
from .tolerance import Tolerance
from .validation import check_func, check_t, check_y0

__all__ = ["odeint", "GridOptionIgnoredWarning", "DEFAULT_RTOL", "DEFAULT_ATOL"]

#: torchdiffeq's default tolerances.
DEFAULT_RTOL, DEFAULT_ATOL = 1e-7, 1e-9


def odeint(
    func: Callable,
    y0: State,
    t: torch.Tensor,
    *,
    rtol: float | torch.Tensor | None = None,
    atol: float | torch.Tensor | None = None,
    method: str | ButcherTableau | None = None,
    options: Mapping[str, Any] | None = None,
    adjoint_params: Iterable[torch.Tensor] | None = None,
    scaler: AdjointScaling | bool | None = None,
    adjoint: AdjointStrategy | None = None,
    event_fn: Callable | None = None,
) -> State | tuple[torch.Tensor, State]:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` in mixed precision.

    Call it like ``torchdiffeq.odeint`` and, to use low precision, inside
    ``torch.autocast(y0.device.type, dtype=...)``: the vector field is then
    evaluated in the autocast dtype while the state, the stage sums, the error
    estimate, the adjoint and every gradient sum stay in ``y0``'s dtype.  Backward
    recomputes each accepted step from one checkpoint per step
    (discretize-then-optimize) unless ``adjoint`` says otherwise.

    Args:
        func: ``func(t, y) -> dy/dt``; ``t`` a 0-dim tensor in ``y0``'s dtype, ``y``
            structured like ``y0`` in its dtype, the result structured like ``y0``
            (any floating dtype: it is cast to the state's).  An ``nn.Module``'s parameters
            with ``requires_grad`` receive gradients, and so does every other
            grad-requiring tensor the first evaluation of ``func`` uses (a
            closure's tensor, a module's context attribute).  Random numbers drawn
            inside ``func`` are replayed in backward (fixed grids; on adaptive
            ones refused at the first draw, except by ``DirectAdjoint``, which
            keeps the forward's graphs), modules run in backward in the mode
            (``training``) they had in the forward, module buffers are left as the
            forward left them, and a tensor ``func`` read that is modified in place
            before backward makes it raise (docs/guarantees.md).  It may define torchdiffeq's callbacks
            ``callback_step`` etc. (see [`mpnode.core.callbacks`][mpnode.core.callbacks]).
        y0: float32/float64 tensor of any shape, or a tuple of such tensors of one
            dtype.  A float16/bfloat16 ``y0`` (the output of a layer under autocast)
            is solved in float32: states, stage sums, the error estimate and the
            adjoint are float32; ``func`` sees ``t`` and ``y`` and the outputs are
            returned in ``y0``'s dtype, as torchdiffeq returns them.
        t: 1-D float32/float64 tensor of output times, strictly increasing or
            decreasing, on ``y0``'s device.  A single time returns a copy of ``y0``
            with a leading dimension of 1 (no step is taken; gradients flow to ``y0``).
        rtol: relative tolerance of adaptive methods (a number, a per-element
            tensor, or a tuple per part of a tuple state); default 1e-7 as
            torchdiffeq.  Fixed-grid methods ignore it.
        atol: absolute tolerance, likewise; default 1e-9.
        method: a name in ``mpnode.core.TABLEAUX`` or a ``ButcherTableau``.  Default:
            ``"dopri5"`` (adaptive, as torchdiffeq) unless ``options`` has
            ``step_size`` or ``grid_constructor``, then ``"rk4"`` (the 3/8 rule, as
            torchdiffeq's ``rk4``).
        options: fixed grids: ``step_size``, ``grid_constructor``, ``interp``
            (``"linear"``/``"cubic"``), ``perturb``; adaptive methods:
            ``first_step``, ``max_num_steps``, ``min_step``, ``max_step``,
            ``safety``, ``ifactor``, ``dfactor``, ``norm``, ``step_t``, ``jump_t``,
            ``controller`` (a [`StepSizeController`][mpnode.core.controllers.StepSizeController]); both:
            ``checkpoint_dtype`` and ``stats`` (a [`SolverStats`][mpnode.core.stats.SolverStats] updated in
            place).  Unknown keys, and options of the other kind of stepping, raise.
        adjoint_params: the tensors to differentiate, instead of discovering them.
            Parameters of the modules odeint can see (``func`` itself, a bound
            method's module, modules in ``func``'s closure) that are left out are
            constants of the solve: they get no gradient, so listing a subset
            restricts which parameters train.  Any other grad-requiring tensor
            ``func`` uses (a closure's tensor) is a constant too and its ``.grad``
            stays ``None``, as with torchdiffeq's ``odeint_adjoint``.
        scaler: shorthand for ``adjoint=RecomputeAdjoint(scaling=scaler)``: adjoint
            scaling for float16; ``None`` automatic, ``False`` none.
        adjoint: an adjoint strategy, e.g. ``RecomputeAdjoint(checkpoint_dtype=...,
            scaling=...)`` (the default).
        event_fn: ``event_fn(t, y) -> tensor``: solve until an element of it changes
            sign (torchdiffeq's terminal event); ``t`` must then be ``[t0, t1]`` with
            ``t1`` giving only the direction of time, and fixed-grid methods need
            ``step_size``.  See [`mpnode.core.events`][mpnode.core.events]; for a differentiable event
            time use [`mpnode.core.odeint_event`][mpnode.core.odeint_event].

    Returns:
        ``(len(t), *y0.shape)`` tensor in ``y0``'s dtype, or a tuple of such
        tensors for a tuple ``y0``.  With ``event_fn``: ``(event_t, solution)``,
        ``event_t`` a 0-dim tensor in ``t``'s dtype (no graph) and ``solution`` the
        states at ``[t0, event_t]``, differentiable at that fixed time.
    """
    refuse_function_transforms()
    check_func(func)
    check_y0(y0)
    layout = FlatState(y0)
    t_host = check_t(t, layout.device)
    opts = SolveOptions.parse(options, method, stacklevel=2)
    policy = PrecisionPolicy.capture(y0 if isinstance(y0, torch.Tensor) else y0[0])
    march = _march(opts, rtol, atol, layout)
    if event_fn is None and t.shape[0] == 1:  # torchdiffeq's rule: the initial state, copied
        return layout.unflatten(layout.flatten(y0).clone().unsqueeze(0), (1,), dtype=layout.user_dtype)
    event = None
    if event_fn is not None:
        march, event = until_event(march, event_fn, layout, policy, t_host)
        t = torch.cat([t[:1], t[1:].detach()])  # t[1] only gives the direction: no gradient reaches it
    strategy = _strategy(adjoint, scaler, opts.checkpoint_dtype)
    callbacks = Callbacks(func, layout)
    callbacks.check_supported(opts.adaptive is not None, opts.tableau.name)
    problem = Problem(FlatVectorField(func, layout), opts.tableau, policy, march.output_rule, callbacks, event=event)
    out = strategy.solve(problem, march, _inputs(func, y0, t, t_host, march, layout, adjoint_params, opts.stats))
    if isinstance(march, AdaptiveMarch):
        march.warn_if_noise_accepted(stacklevel=2)
    solution = layout.unflatten(out, (t.shape[0],), dtype=layout.user_dtype)
    return solution if event is None else (event.event_time(t), solution)


def _march(opts: SolveOptions, rtol: Any, atol: Any, layout: FlatState) -> March:
    """The fixed-grid march of a method without an error estimate, else the adaptive one."""
    if opts.fixed is not None:
        return FixedGridMarch(opts.fixed.grid, OUTPUT_RULES[opts.fixed.interp](), opts.fixed.perturb)
    assert opts.adaptive is not None
    tolerance = Tolerance(DEFAULT_RTOL if rtol is None else rtol, DEFAULT_ATOL if atol is None else atol, layout,
                          opts.adaptive.norm)
    return AdaptiveMarch(opts.tableau, tolerance, opts.adaptive)


def _inputs(func: Callable, y0: State, t: torch.Tensor, t_host: torch.Tensor, march: March, layout: FlatState,
            adjoint_params: Iterable[torch.Tensor] | None, stats: SolverStats | None) -> SolveInputs:
    """The differentiable inputs: the flat ``y0``, the grid built from ``t`` (fixed grids), the gradient targets,
    and whether anything may need a gradient."""
    y0_flat = layout.flatten(y0)
    targets = gradient_targets(func, adjoint_params)
    grid = grid_host = None
    if isinstance(march, FixedGridMarch):
        grid, grid_host = march.rule.build(func, y0, t, t_host)
    discover = torch.is_grad_enabled() and adjoint_params is None  # func may capture tensors that need gradients
    constants = restricted_parameters(func, targets) if adjoint_params is not None else []
    needs_grad = torch.is_grad_enabled() and (discover or any(
        x is not None and x.requires_grad for x in (t, grid, y0_flat, *targets)
    ) or bool(reachable_grad_tensors(func, constants)))  # an unlisted tensor func may read: backward refuses it
    return SolveInputs(t, t_host, grid, grid_host, y0_flat, targets, needs_grad, stats, discover=discover,
                       constants=constants, modules=reachable_modules(func))


def _strategy(adjoint: AdjointStrategy | None, scaler: AdjointScaling | bool | None,
              checkpoint_dtype: Any) -> AdjointStrategy:
    if adjoint is None:
        return RecomputeAdjoint(checkpoint_dtype=checkpoint_dtype, scaling=scaler)
    if not isinstance(adjoint, AdjointStrategy):
        raise TypeError(f"adjoint must be a mpnode.core.AdjointStrategy such as RecomputeAdjoint(), got {adjoint!r}")
    if scaler is not None or checkpoint_dtype is not None:
        raise ValueError(
            "scaler= and options['checkpoint_dtype'] are shorthands for the default adjoint strategy; with adjoint= "
            "pass them to the strategy instead, e.g. RecomputeAdjoint(checkpoint_dtype=..., "
            f"scaling=...) (got {adjoint!r})"
        )
    return adjoint
