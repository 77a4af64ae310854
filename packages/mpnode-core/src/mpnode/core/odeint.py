"""``odeint``: the torchdiffeq-compatible entry point."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch

from .callbacks import Callbacks
from .controllers import (
    ConstructedGrid,
    IntegralController,
    OutputTimesGrid,
    StepSizeController,
    StepSizeGrid,
    Tolerance,
)
from .events import until_event
from .march import AdaptiveOptions, AdaptiveStepping, FixedGridStepping, Problem, Stepping
from .methods import get_tableau
from .outputs import OUTPUT_RULES
from .guards import refuse_function_transforms
from .parameters import gradient_targets, reachable_grad_tensors, reachable_modules, restricted_parameters
from .precision import PrecisionPolicy
from .scaling import AdjointScaling
from .state import FlatState, FlatVectorField, State
from .stats import SolverStats
from .strategies import AdjointStrategy, RecomputeAdjoint, SolveInputs
from .tableau import ButcherTableau
from .validation import (
    ADAPTIVE_OPTIONS,
    FIXED_GRID_OPTIONS,
    check_func,
    check_options,
    check_t,
    check_y0,
    refuse_options,
)

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
            ``callback_step`` etc. (see :mod:`mpnode.core.callbacks`).
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
            ``controller`` (a :class:`StepSizeController`); both:
            ``checkpoint_dtype`` and ``stats`` (a :class:`SolverStats` updated in
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
            ``step_size``.  See :mod:`mpnode.core.events`; for a differentiable event
            time use :func:`mpnode.core.odeint_event`.

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
    opts = check_options(options)
    stats = _check_stats(opts.get("stats"))
    tableau = get_tableau(method if method is not None else _default_method(opts))
    policy = PrecisionPolicy.capture(y0 if isinstance(y0, torch.Tensor) else y0[0])
    stepping = _stepping(tableau, opts, rtol, atol, layout, policy)
    if event_fn is None and t.shape[0] == 1:  # torchdiffeq's rule: the initial state, copied
        return layout.unflatten(layout.flatten(y0).clone().unsqueeze(0), (1,), dtype=layout.user_dtype)
    event = None
    if event_fn is not None:
        stepping, event = until_event(stepping, event_fn, layout, policy, t_host)
        t = torch.cat([t[:1], t[1:].detach()])  # t[1] only gives the direction: no gradient reaches it
    strategy = _strategy(adjoint, scaler, opts.get("checkpoint_dtype"))
    callbacks = Callbacks(func, layout)
    callbacks.check_supported(isinstance(stepping, AdaptiveStepping), tableau.name)
    problem = Problem(FlatVectorField(func, layout), tableau, policy, stepping.output_rule, callbacks, event=event)
    y0_flat = layout.flatten(y0)
    targets = gradient_targets(func, adjoint_params)
    grid = grid_host = None
    if isinstance(stepping, FixedGridStepping):
        grid, grid_host = stepping.rule.build(func, y0, t, t_host)
    discover = torch.is_grad_enabled() and adjoint_params is None  # func may capture tensors that need gradients
    constants = restricted_parameters(func, targets) if adjoint_params is not None else []
    needs_grad = torch.is_grad_enabled() and (discover or any(
        x is not None and x.requires_grad for x in (t, grid, y0_flat, *targets)
    ) or bool(reachable_grad_tensors(func, constants)))  # an unlisted tensor func may read: backward refuses it
    inputs = SolveInputs(
        t, t_host, grid, grid_host, y0_flat, targets, needs_grad, stats, discover=discover,
        constants=constants, modules=reachable_modules(func),
    )
    out = strategy.solve(problem, stepping, inputs)
    if isinstance(stepping, AdaptiveStepping):
        stepping.warn_if_noise_accepted(stacklevel=2)
    solution = layout.unflatten(out, (t.shape[0],), dtype=layout.user_dtype)
    return solution if event is None else (event.event_time(t), solution)


def _default_method(opts: Mapping[str, Any]) -> str:
    grid_given = opts.get("step_size") is not None or opts.get("grid_constructor") is not None
    return "rk4" if grid_given else "dopri5"


def _check_stats(stats: Any) -> SolverStats | None:
    if stats is not None and not isinstance(stats, SolverStats):
        raise TypeError(f"options['stats'] must be a mpnode.core.SolverStats, got {type(stats).__name__}")
    return stats


class GridOptionIgnoredWarning(UserWarning):
    """An adaptive method got ``step_size``/``grid_constructor``; it chooses its own steps and ignores them."""


def _stepping(tableau: ButcherTableau, opts: dict, rtol, atol, layout: FlatState, policy: PrecisionPolicy) -> Stepping:
    """Fixed grid when the method has no error estimate; adaptive otherwise (grid options then warn and are ignored)."""
    grid_options = sorted(k for k in ("step_size", "grid_constructor") if opts.get(k) is not None)
    if grid_options and tableau.is_adaptive:
        warnings.warn(
            f"odeint: method {tableau.name!r} is adaptive and chooses its own steps, so options {grid_options} are "
            "ignored (as torchdiffeq ignores them). Remove them to silence this warning; to solve on that grid pass "
            f"a fixed-grid method such as method='rk4', or method=get_tableau({tableau.name!r}).fixed_grid() "
            "(mpnode.core.get_tableau) for this method's steps.",
            GridOptionIgnoredWarning, stacklevel=3,
        )
        opts = {k: v for k, v in opts.items() if k not in grid_options}
    grid_given = bool(grid_options) and not tableau.is_adaptive
    if not tableau.is_adaptive:
        refuse_options(opts, ADAPTIVE_OPTIONS, f"apply to adaptive methods only, but this solve uses a fixed grid "
                       f"(method {tableau.name!r}{' with a grid option' if grid_given else ''}); remove them")
        return _fixed_grid_stepping(opts)
    refuse_options(opts, FIXED_GRID_OPTIONS, f"apply to fixed grids only, but method {tableau.name!r} is adaptive; "
                   "remove them, or use a fixed-grid method such as method='rk4'")
    tolerance = Tolerance(
        DEFAULT_RTOL if rtol is None else rtol, DEFAULT_ATOL if atol is None else atol, layout, opts.get("norm")
    )
    return AdaptiveStepping(tableau, tolerance, _controller(opts), _adaptive_options(opts))


def _fixed_grid_stepping(opts: dict) -> FixedGridStepping:
    if opts.get("step_size") is not None:
        rule = StepSizeGrid(opts["step_size"])
    elif opts.get("grid_constructor") is not None:
        rule = ConstructedGrid(opts["grid_constructor"])
    else:
        rule = OutputTimesGrid()
    interp = opts.get("interp", "linear")
    if interp not in OUTPUT_RULES:
        raise ValueError(f"options['interp'] must be one of {sorted(OUTPUT_RULES)}, got {interp!r}")
    perturb = opts.get("perturb", False)
    if not isinstance(perturb, bool):
        raise TypeError(f"options['perturb'] must be True or False, got {perturb!r}")
    return FixedGridStepping(rule, OUTPUT_RULES[interp](), perturb)


def _controller(opts: dict) -> StepSizeController:
    factors = {k: opts[k] for k in ("safety", "ifactor", "dfactor") if opts.get(k) is not None}
    controller = opts.get("controller")
    if controller is None:
        return IntegralController(**factors)
    if not isinstance(controller, StepSizeController):
        raise TypeError(
            f"options['controller'] must be a mpnode.core.StepSizeController such as PIController(), got {controller!r}"
        )
    if factors:
        raise ValueError(f"options {sorted(factors)} configure the default controller; pass them to {controller!r} instead")
    return controller


def _adaptive_options(opts: dict) -> AdaptiveOptions:
    out = AdaptiveOptions()
    if opts.get("first_step") is not None:
        out.first_step = _positive_time("first_step", opts["first_step"])
    if opts.get("min_step") is not None:
        out.min_step = _positive_time("min_step", opts["min_step"], allow_zero=True)
    if opts.get("max_step") is not None:
        out.max_step = _positive_time("max_step", opts["max_step"], allow_inf=True)
    if out.min_step > out.max_step:
        raise ValueError(f"options['min_step'] = {out.min_step} exceeds options['max_step'] = {out.max_step}")
    if opts.get("max_num_steps") is not None:
        n = opts["max_num_steps"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"options['max_num_steps'] must be a positive int, got {n!r}")
        out.max_num_steps = n
    out.step_t = _times("step_t", opts.get("step_t"))
    out.jump_t = _times("jump_t", opts.get("jump_t"))
    if set(out.step_t) & set(out.jump_t):
        raise ValueError("options 'step_t' and 'jump_t' must not share any time; a jump already ends a step there")
    return out


def _positive_time(name: str, value: Any, allow_zero: bool = False, allow_inf: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"options[{name!r}] must be a number, got {value!r}") from None
    if isinstance(value, bool) or math.isnan(v) or v < 0 or (v == 0 and not allow_zero) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"options[{name!r}] must be {'non-negative' if allow_zero else 'positive'}"
                         f"{'' if allow_inf else ' and finite'}, got {value!r} (step sizes are magnitudes)")
    return v


def _times(name: str, value: Any) -> tuple[float, ...]:
    if value is None:
        return ()
    try:
        values = torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"options[{name!r}] must be a list or 1-D tensor of times (numbers), got {value!r}") from None
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"options[{name!r}] contains inf or NaN")
    if values.unique().numel() != values.numel():
        raise ValueError(f"options[{name!r}] has repeated times; pass each time once")
    return tuple(values.tolist())


def _strategy(adjoint: AdjointStrategy | None, scaler: AdjointScaling | bool | None, checkpoint_dtype) -> AdjointStrategy:
    if adjoint is None:
        return RecomputeAdjoint(checkpoint_dtype=checkpoint_dtype, scaling=scaler)
    if not isinstance(adjoint, AdjointStrategy):
        raise TypeError(f"adjoint must be a mpnode.core.AdjointStrategy such as RecomputeAdjoint(), got {adjoint!r}")
    if scaler is not None or checkpoint_dtype is not None:
        raise ValueError(
            "scaler= and options['checkpoint_dtype'] are shorthands for the default adjoint strategy; with adjoint= "
            f"pass them to the strategy instead, e.g. RecomputeAdjoint(checkpoint_dtype=..., scaling=...) (got {adjoint!r})"
        )
    return adjoint
