"""``odeint``'s options, parsed once into small validated objects (torchdiffeq's names).

[`SolveOptions.parse`][mpnode.core.options.SolveOptions.parse] is the one path: unknown and refused keys, the
method (its default follows the grid options), the options of the other kind of stepping, and each value, checked
with [`check_number`][mpnode.core.validation.check_number] and friends.  The result holds either
[`FixedGridOptions`][mpnode.core.options.FixedGridOptions] or
[`AdaptiveOptions`][mpnode.core.options.AdaptiveOptions], and the options both kinds share.  Every error names the
option and the fix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .controllers import IntegralController, StepSizeController
from .grids import ConstructedGrid, GridRule, OutputTimesGrid, StepSizeGrid
from .methods import get_tableau
from .outputs import OUTPUT_RULES
from .stats import SolverStats
from .tableau import ButcherTableau
from .validation import check_flag, check_number

FIXED_GRID_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb")
ADAPTIVE_OPTIONS = (
    "first_step", "max_num_steps", "min_step", "max_step", "safety", "ifactor", "dfactor", "norm", "step_t", "jump_t",
    "controller",
)
COMMON_OPTIONS = ("checkpoint_dtype", "stats")
KNOWN_OPTIONS = FIXED_GRID_OPTIONS + ADAPTIVE_OPTIONS + COMMON_OPTIONS
#: torchdiffeq options mpnode refuses, with the reason (see docs/migration.md).
REFUSED_OPTIONS = {
    "dtype": "mpnode keeps the times of adaptive solves in float64 always (torchdiffeq's default); remove it",
    "max_iters": "it configures torchdiffeq's implicit Adams method, which mpnode does not provide",
    "max_order": "it configures torchdiffeq's Adams methods, which mpnode does not provide",
    "solver": "it configures torchdiffeq's scipy_solver, which mpnode does not provide",
}
#: The options that make a grid (and make ``rk4`` the default method).
GRID_OPTIONS = ("step_size", "grid_constructor")


class GridOptionIgnoredWarning(UserWarning):
    """An adaptive method got ``step_size``/``grid_constructor``; it chooses its own steps and ignores them."""


@dataclass(frozen=True)
class FixedGridOptions:
    """Validated options of a fixed grid.

    Attributes:
        grid: how the grid is built (from ``step_size``, ``grid_constructor``, or the output times).
        interp: ``"linear"`` or ``"cubic"``: how outputs between nodes are read off a step.
        perturb: evaluate stage times at a node on the side of the step they belong to.
    """

    grid: GridRule
    interp: str = "linear"
    perturb: bool = False

    @classmethod
    def parse(cls, opts: Mapping[str, Any]) -> FixedGridOptions:
        if opts.get("step_size") is not None:
            grid: GridRule = StepSizeGrid(opts["step_size"])
        elif opts.get("grid_constructor") is not None:
            grid = ConstructedGrid(opts["grid_constructor"])
        else:
            grid = OutputTimesGrid()
        interp = opts.get("interp", "linear")
        if interp not in OUTPUT_RULES:
            raise ValueError(f"options['interp'] must be one of {sorted(OUTPUT_RULES)}, got {interp!r}")
        return cls(grid, interp, check_flag("options['perturb']", opts.get("perturb", False)))


@dataclass
class AdaptiveOptions:
    """Validated options of adaptive stepping (torchdiffeq's names).

    Attributes:
        first_step: the first attempt's size, else Hairer's rule chooses it.
        min_step: attempts are at least this long and always accepted at it.
        max_step: attempts are at most this long.
        max_num_steps: attempts allowed between two outputs; ``None``: no bound of ours (2**31 - 1), or
            ``MAX_EVENT_STEPS`` until an event.
        step_t: times every solve steps onto.
        jump_t: times of discontinuities: steps end there and the next first stage is evaluated just after.
        max_rejections: consecutive rejections before the solve raises instead of looping.
        controller: sizes the attempts.
        norm: ``norm(scaled error) -> number`` of the error ratio, else the RMS norm.
    """

    first_step: float | None = None
    min_step: float = 0.0
    max_step: float = math.inf
    max_num_steps: int | None = None
    step_t: tuple[float, ...] = ()
    jump_t: tuple[float, ...] = ()
    max_rejections: int = 64
    controller: StepSizeController = field(default_factory=IntegralController)
    norm: Callable | None = None

    @classmethod
    def parse(cls, opts: Mapping[str, Any]) -> AdaptiveOptions:
        out = cls(controller=_controller(opts), norm=_norm(opts.get("norm")))
        if opts.get("first_step") is not None:
            out.first_step = _step_size("first_step", opts["first_step"])
        if opts.get("min_step") is not None:
            out.min_step = _step_size("min_step", opts["min_step"], positive=False)
        if opts.get("max_step") is not None:
            out.max_step = _step_size("max_step", opts["max_step"], finite=False)
        if out.min_step > out.max_step:
            raise ValueError(f"options['min_step'] = {out.min_step} exceeds options['max_step'] = {out.max_step}")
        if opts.get("max_num_steps") is not None:
            out.max_num_steps = check_number("options['max_num_steps']", opts["max_num_steps"], integer=True)
        out.step_t = _times("step_t", opts.get("step_t"))
        out.jump_t = _times("jump_t", opts.get("jump_t"))
        if set(out.step_t) & set(out.jump_t):
            raise ValueError("options 'step_t' and 'jump_t' must not share any time; a jump already ends a step there")
        return out


@dataclass(frozen=True)
class SolveOptions:
    """Everything ``odeint``'s ``method`` and ``options`` say, validated.

    Attributes:
        tableau: the method.
        fixed: the fixed-grid options (a method without an error estimate), else ``None``.
        adaptive: the adaptive options (a method with one), else ``None``.
        checkpoint_dtype: ``options['checkpoint_dtype']`` (checked by the adjoint strategy it configures).
        stats: the caller's ``SolverStats``, or ``None``.
    """

    tableau: ButcherTableau
    fixed: FixedGridOptions | None
    adaptive: AdaptiveOptions | None
    checkpoint_dtype: Any = None
    stats: SolverStats | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None, method: str | ButcherTableau | None,
              stacklevel: int = 1) -> SolveOptions:
        """Parse ``odeint``'s ``options`` and ``method``.  A warning points ``stacklevel`` frames up from here: 1 is
        the caller (``odeint`` passes 2: its own caller)."""
        opts = _known(options)
        stats = opts.get("stats")
        if stats is not None and not isinstance(stats, SolverStats):
            raise TypeError(f"options['stats'] must be a mpnode.core.SolverStats, got {type(stats).__name__}")
        grid_given = [k for k in GRID_OPTIONS if opts.get(k) is not None]
        tableau = get_tableau(method if method is not None else ("rk4" if grid_given else "dopri5"))
        common = {"checkpoint_dtype": opts.get("checkpoint_dtype"), "stats": stats}
        if not tableau.is_adaptive:
            _refuse(opts, ADAPTIVE_OPTIONS, f"apply to adaptive methods only, but this solve uses a fixed grid "
                    f"(method {tableau.name!r}{' with a grid option' if grid_given else ''}); remove them")
            return cls(tableau, FixedGridOptions.parse(opts), None, **common)
        if grid_given:
            _warn_grid_options_ignored(tableau, sorted(grid_given), stacklevel + 1)
            opts = {k: v for k, v in opts.items() if k not in GRID_OPTIONS}
        _refuse(opts, FIXED_GRID_OPTIONS, f"apply to fixed grids only, but method {tableau.name!r} is adaptive; "
                "remove them, or use a fixed-grid method such as method='rk4'")
        return cls(tableau, None, AdaptiveOptions.parse(opts), **common)


def _known(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options as a dict; unknown and refused keys raise, naming the known ones."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict such as {{'step_size': 0.1}}, got {type(options).__name__}")
    opts = dict(options)
    refused = sorted(set(opts) & set(REFUSED_OPTIONS))
    if refused:
        raise ValueError(f"option {refused[0]!r} (torchdiffeq) is not supported: {REFUSED_OPTIONS[refused[0]]}")
    unknown = sorted(set(opts) - set(KNOWN_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; odeint accepts {list(KNOWN_OPTIONS)}")
    if all(opts.get(k) is not None for k in GRID_OPTIONS):
        raise ValueError("options 'step_size' and 'grid_constructor' are mutually exclusive; pass one of them")
    return opts


def _refuse(opts: Mapping[str, Any], names: tuple[str, ...], why: str) -> None:
    """Raise if any of ``names`` is set (not ``None``) in ``opts``; ``why`` says what the solve is and the fix."""
    given = sorted(n for n in names if opts.get(n) is not None)
    if given:
        raise ValueError(f"option(s) {given} {why}")


def _warn_grid_options_ignored(tableau: ButcherTableau, given: list[str], stacklevel: int) -> None:
    warnings.warn(
        f"odeint: method {tableau.name!r} is adaptive and chooses its own steps, so options {given} are "
        "ignored (as torchdiffeq ignores them). Remove them to silence this warning; to solve on that grid pass "
        f"a fixed-grid method such as method='rk4', or method=get_tableau({tableau.name!r}).fixed_grid() "
        "(mpnode.core.get_tableau) for this method's steps.",
        GridOptionIgnoredWarning, stacklevel=stacklevel + 1,
    )


def _controller(opts: Mapping[str, Any]) -> StepSizeController:
    factors = {k: opts[k] for k in ("safety", "ifactor", "dfactor") if opts.get(k) is not None}
    controller = opts.get("controller")
    if controller is None:
        return IntegralController(**factors)
    if not isinstance(controller, StepSizeController):
        raise TypeError(
            f"options['controller'] must be a mpnode.core.StepSizeController such as PIController(), got {controller!r}"
        )
    if factors:
        raise ValueError(f"options {sorted(factors)} configure the default controller; pass them "
                         f"to {controller!r} instead")
    return controller


def _norm(norm: Any) -> Callable | None:
    if norm is not None and not callable(norm):
        raise TypeError(f"options['norm'] must be callable as norm(error) -> 0-dim tensor, got {norm!r}")
    return norm


def _step_size(name: str, value: Any, positive: bool = True, finite: bool = True) -> float:
    return check_number(f"options[{name!r}]", value, positive=positive, finite=finite,
                        hint=" (step sizes are magnitudes)")


def _times(name: str, value: Any) -> tuple[float, ...]:
    if value is None:
        return ()
    try:
        values = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"options[{name!r}] must be a list or 1-D tensor of times (numbers), got {value!r}") from None
    if values.dim() > 1:
        raise ValueError(f"options[{name!r}] must be a list or 1-D tensor of times, got shape {tuple(values.shape)}; "
                         f"pass {name}.flatten() (or a list of the times)")
    values = values.reshape(-1)  # a single time may be a number
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"options[{name!r}] contains inf or NaN")
    if values.unique().numel() != values.numel():
        raise ValueError(f"options[{name!r}] has repeated times; pass each time once")
    return tuple(values.tolist())
