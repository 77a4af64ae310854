"""The forward marches: the loops that walk a solve's steps, every step taken by
[`take_step`][mpnode.core.step.take_step].

* [`FixedGridMarch`][mpnode.core.march.FixedGridMarch]: steps on a grid built before the solve (a
  [`GridRule`][mpnode.core.grids.GridRule]);
* [`FixedStepsUntilEvent`][mpnode.core.march.FixedStepsUntilEvent]: steps of ``step_size`` from ``t0`` until an
  event (that grid cannot be built before the event time is known);
* [`AdaptiveMarch`][mpnode.core.march.AdaptiveMarch]: embedded-pair stepping with an error-ratio controller and
  dense output (torchdiffeq's algorithm);
* [`rerun`][mpnode.core.march.rerun]: accepted steps of a trajectory again, graph-free (what the segmented strategy
  recomputes in backward).

A forward march hands each accepted step's start state to a [`Recorder`][mpnode.core.contracts.Recorder] (the
adjoint strategy decides what to keep), fills the outputs and returns a
[`Trajectory`][mpnode.core.contracts.Trajectory]: the constants the backward pass needs.  Under ``torch.no_grad``
nothing else is kept; with autograd on (the direct strategy) the graph of every step is.  A solve until an event
([`EventLocator`][mpnode.core.events.EventLocator]) calls the same three hooks from both the fixed-step and the
adaptive march: ``begin``, ``after_step`` and ``output_times``.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable, Sequence

import torch

from .contracts import FirstStageMode, Nudge, Problem, Recorder, SolveInputs, Trajectory
from .controllers import StepSizeController, next_step
from .grids import GridRule, StepSizeGrid
from .options import AdaptiveOptions
from .outputs import DenseOutput, OutputPlacement, OutputRule, place_on_grid
from .rk import StagePerturbation, Stages, stage_time_table, weighted_sum
from .step import KEEP_NOTHING, Step, StepInterpolant, first_stage, take_step
from .tableau import ButcherTableau
from .tolerance import RoundoffNoise, Tolerance, initial_step


class MixedPrecisionToleranceWarning(UserWarning):
    """Adaptive steps were accepted because their error estimate was within the rounding noise of a vector field
    evaluated in bfloat16/float16 (``SolverStats.noise_accepted_steps`` counts them)."""


class March(abc.ABC):
    """How the steps of a solve are chosen and walked: a fixed grid or adaptive control."""

    output_rule: OutputRule

    @abc.abstractmethod
    def march(self, problem: Problem, inputs: SolveInputs, y0: torch.Tensor,
              recorder: Recorder) -> tuple[torch.Tensor, Trajectory]:
        """Run the forward pass from ``y0`` (flat, state dtype; the solve's copy of ``inputs.y0``); returns the
        ``(len(t), D)`` outputs and the trajectory."""

    @abc.abstractmethod
    def until_event(self, max_steps: int) -> March:
        """This march for a solve until an event, taking at most ``max_steps`` steps unless told otherwise."""


def _stack(rows: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The outputs as one ``(T, D)`` tensor (every row is filled by the time a march ends)."""
    assert all(row is not None for row in rows), "every output is placed before the march ends"
    return torch.stack([row for row in rows if row is not None])


# -- fixed grids --------------------------------------------------------------------------------------


class FixedGridMarch(March):
    """Steps on a grid built before the solve by a [`GridRule`][mpnode.core.grids.GridRule]."""

    def __init__(self, rule: GridRule, output_rule: OutputRule, perturb: bool = False) -> None:
        self.rule = rule
        self.output_rule = output_rule
        self.perturb = bool(perturb)

    def perturbation(self, direction: int) -> StagePerturbation:
        if not self.perturb:
            return StagePerturbation(direction=direction)
        return StagePerturbation(first=Nudge.NEXT, end=Nudge.PREV, direction=direction)

    def until_event(self, max_steps: int) -> March:
        if not isinstance(self.rule, StepSizeGrid):
            raise ValueError(
                "odeint: with event_fn, fixed-grid methods need options['step_size'] (the grid cannot be built before "
                "the event time is known, as in torchdiffeq); pass step_size, or use an "
                "adaptive method such as 'dopri5'"
            )
        return FixedStepsUntilEvent(self, self.rule.step_size, max_steps)

    def march(self, problem, inputs, y0, recorder):
        grid, grid_host = inputs.grid, inputs.grid_host
        assert grid is not None and grid_host is not None, "a fixed grid is built before the march"
        nodes = grid_host.tolist()
        steps = (grid_host[1:] - grid_host[:-1]).tolist()  # h_n, bitwise as the device computes them
        rule = self.perturbation(1 if nodes[-1] > nodes[0] else -1)
        placement = place_on_grid(grid_host, inputs.t_host, self.output_rule)
        times = stage_time_table(problem.tableau, grid, problem.policy.state_dtype, rule)
        rows: list[torch.Tensor | None] = [None] * inputs.t.shape[0]
        cb = problem.callbacks
        y = y0
        for n, h in enumerate(steps):
            if cb:
                cb.call("callback_step", grid[n], y, grid[n + 1] - grid[n], grid.dtype)
            recorder.record(n, y, None)
            for j in placement.at_node.get(n, ()):
                rows[j] = y
            inside = placement.in_step.get(n, ())
            with_slope = bool(inside) and self.output_rule.needs_end_slope
            step = take_step(problem, recorder, y, None, h, (grid[n], grid[n + 1]), rule, times[n], with_slope)
            if step.graph is not None:
                recorder.keep(n, step.graph)
            interp = StepInterpolant(problem, recorder, y, h, step, grid[n + 1])
            for j, x in inside:
                rows[j] = interp(x)
            y = step.y1
        for j in placement.at_node.get(len(steps), ()):
            rows[j] = y
        modes = [FirstStageMode.evaluated(rule.first)] * len(steps)
        return _stack(rows), Trajectory(nodes, steps, grid, [rule], modes, placement)


class FixedStepsUntilEvent(March):
    """Steps of ``step_size`` from ``t0`` until the event (torchdiffeq's fixed-grid event search).

    The nodes ``t0, t0 +- h, ...`` are formed one by one in ``t``'s dtype; the
    outputs are read off the grid's interpolant (``interp``) and stage times are
    perturbed as ``perturb`` says, as on any fixed grid.  At most ``max_steps``
    steps are taken.
    """

    def __init__(self, grid_march: FixedGridMarch, step_size: float, max_steps: int) -> None:
        self.grid_march = grid_march
        self.step_size = step_size
        self.max_steps = max_steps
        self.output_rule = grid_march.output_rule

    def until_event(self, max_steps: int) -> March:
        return self

    def march(self, problem, inputs, y0, recorder):
        event, t, t_host = problem.event, inputs.t, inputs.t_host
        assert event is not None, "this march runs until an event"
        direction = 1 if bool(t_host[1] > t_host[0]) else -1
        rule = self.grid_march.perturbation(direction)
        rows: list[torch.Tensor | None] = [y0, None]
        placement = OutputPlacement()
        placement.add_node(0, 0)
        _, j = event.begin([float(t_host[0]), float(t_host[1])], direction, y0, rows, placement)
        nodes, steps, y = [float(t_host[0])], [], y0
        while j < 2:
            n = len(steps)
            if n == self.max_steps:
                raise RuntimeError(
                    f"odeint: no event within {self.max_steps} steps of size {self.step_size:g} from t = "
                    f"{nodes[0]:.6g}; use a larger step_size, or check that event_fn changes sign along the solution"
                )
            pair = torch.tensor([nodes[-1], nodes[-1] + direction * self.step_size], dtype=t.dtype)
            t0, t1 = pair.tolist()
            h = t1 - t0
            pair = pair.to(t.device)
            step = self._step(problem, recorder, n, y, h, pair, rule)
            if event.after_step(n, t0, t1, step.y1, StepInterpolant(problem, recorder, y, h, step, pair[1]), rows,
                                placement):
                j = 2
            nodes.append(t1)
            steps.append(h)
            y = step.y1
        grid = torch.tensor(nodes, dtype=t.dtype, device=t.device)
        modes = [FirstStageMode.evaluated(rule.first)] * len(steps)
        trajectory = Trajectory(nodes, steps, grid, [rule], modes, placement, output_times=event.output_times(t))
        return _stack(rows), trajectory

    def _step(self, problem: Problem, recorder: Recorder, n: int, y: torch.Tensor, h: float, pair: torch.Tensor,
              rule: StagePerturbation) -> Step:
        """Step ``n`` between the nodes ``pair`` (device, ``t``'s dtype), recorded and, with graphs, kept."""
        if problem.callbacks:
            problem.callbacks.call("callback_step", pair[0], y, pair[1] - pair[0], pair.dtype)
        recorder.record(n, y, None)
        times = stage_time_table(problem.tableau, pair, problem.policy.state_dtype, rule)[0]
        step = take_step(problem, recorder, y, None, h, (pair[0], pair[1]), rule, times)
        if step.graph is not None:
            recorder.keep(n, step.graph)
        return step


# -- adaptive steps -----------------------------------------------------------------------------------


class AdaptiveMarch(March):
    """Embedded-pair stepping with an error-ratio controller and dense output (torchdiffeq's algorithm).

    Per attempt: clamp ``h`` to ``[min_step, max_step]``; shorten it to land on the
    next ``step_t``/``jump_t`` inside the step; take the step; error ratio
    ``r = norm(h sum b_err_i k_i / tol)`` (one host read); accept when ``r <= 1``
    (always at ``min_step``); the controller sizes the next attempt.  When the
    first evaluation shows the field ran in a lower precision than the state
    (autocast lowered it), ``r`` discounts the estimate's rounding noise
    ([`RoundoffNoise`][mpnode.core.tolerance.RoundoffNoise]): rtol/atol are kept as given.  Outputs are
    the dense output of the accepted step that reaches them.  After a ``jump_t``
    the next first stage is evaluated just after the jump.  More than
    ``max_rejections`` consecutive rejections raise instead of looping.
    """

    def __init__(self, tableau: ButcherTableau, tolerance: Tolerance, options: AdaptiveOptions) -> None:
        if tableau.b_err is None or tableau.dense is None:
            raise ValueError(
                f"method {tableau.name!r} has no embedded error estimate and dense output, so it "
                "cannot choose its steps; "
                "pass options={'step_size': ...} for a fixed grid or use an adaptive method such as 'dopri5'"
            )
        self.tableau = tableau
        self.b_err = tableau.b_err
        self.tolerance = tolerance
        self.options = options
        self.output_rule = DenseOutput(tableau)
        #: of the latest march: the coarsest precision the field's first evaluation carried, and the accepted steps
        #: that passed on the noise criterion only
        self.field_dtype: torch.dtype | None = None
        self.noise_accepted = 0

    @property
    def controller(self) -> StepSizeController:
        return self.options.controller

    def until_event(self, max_steps: int) -> March:
        if self.options.max_num_steps is None:
            self.options.max_num_steps = max_steps
        return self

    def march(self, problem, inputs, y0, recorder):
        run = _AdaptiveRun(self, problem, inputs.t_host, y0, recorder)
        while run.j < len(run.outputs):
            run.attempt()
        self.noise_accepted = run.on_noise
        return _stack(run.rows), run.trajectory(inputs.t)

    def error_ratio(self, err: torch.Tensor, y: torch.Tensor, y1: torch.Tensor, noise: RoundoffNoise | None,
                    h: float, stages: Stages) -> tuple[float, bool]:
        """The attempt's error ratio (accept when ``<= 1``; the controller's input) and whether only the rounding
        noise of the field made it pass; one host read.  Without noise: ``norm(err / tol)``, torchdiffeq's."""
        tol = self.tolerance
        overflow = tol.norm is None  # a non-finite default norm: recomputed without overflow (tiny rtol/atol)
        if noise is None:
            ratio = float(tol.error_ratio(err, y, y1))
            tol.check_norm_value(ratio, lambda: err / tol.scale(y, y1))
            if not math.isfinite(ratio) and overflow:
                ratio = float(tol.error_ratio(err, y, y1, safe=True))
            return (ratio if math.isfinite(ratio) else math.inf), False
        size = noise.size(h, stages.ks)
        plains, floors = tol.noisy_error_ratios(err, y, y1, size).tolist()
        tol.check_norm_value(plains[0], lambda: err / tol.scale(y, y1))
        if not all(map(math.isfinite, plains + floors)) and overflow:
            plains, floors = tol.noisy_error_ratios(err, y, y1, size, safe=True).tolist()
        if not all(map(math.isfinite, plains + floors)):
            return math.inf, False
        return noise.judge_parts(plains, floors)

    def warn_if_noise_accepted(self, stacklevel: int) -> None:
        """One [`MixedPrecisionToleranceWarning`][mpnode.core.march.MixedPrecisionToleranceWarning] when the latest
        march accepted steps on the noise criterion.

        The text does not change with the counts, so Python shows it once per call site.
        """
        if not self.noise_accepted:
            return
        dtype = self.field_dtype
        warnings.warn(
            f"odeint: some adaptive steps had an error estimate above rtol/atol but within the rounding noise of the "
            f"vector field's {dtype} evaluations, so they were accepted (SolverStats.noise_accepted_steps counts "
            f"them): there the solution is as accurate as {dtype} allows, not as rtol/atol ask. For tighter results "
            "evaluate the field in float32 (outside torch.autocast); loosening rtol/atol to what "
            "it resolves silences this.",
            MixedPrecisionToleranceWarning,
            stacklevel=stacklevel + 1,
        )

    def clamp(self, h: float) -> float:
        if not math.isfinite(h):
            h = self.options.min_step
        return min(max(h, self.options.min_step), self.options.max_step)

    def underflow_error(self, problem: Problem, t0: float, h: float, last_ratio: float) -> Exception:
        if last_ratio == math.inf:
            return self.rejection_error(problem, t0, h, last_ratio)
        return FloatingPointError(
            f"odeint: the step size underflowed at t = {t0:.17g} (h = {h:.3g}); the problem may be stiff or the "
            "field non-smooth there: loosen rtol/atol, set options['min_step'], mark a known discontinuity with "
            "options['jump_t'], or use a fixed grid"
        )

    def rejection_error(self, problem: Problem, t0: float, h: float, ratio: float) -> Exception:
        if ratio == math.inf:
            return FloatingPointError(
                f"odeint: the solution became inf/NaN near t = {t0:.6g} and smaller steps did not help; check the "
                f"vector field for blow-up (under float16 autocast it may overflow: try bfloat16)"
            )
        dtype = self.field_dtype or problem.policy.state_dtype  # what the field ran in
        return RuntimeError(
            f"odeint: {self.options.max_rejections} consecutive steps were rejected at t = {t0:.6g} (last h = "
            f"{abs(h):.3g}, error ratio {ratio:.3g}); the tolerances cannot be met in {dtype} here: loosen rtol/atol, "
            f"set options['min_step'], or use a fixed grid"
        )


class _AdaptiveRun:
    """The loop state of one [`AdaptiveMarch`][mpnode.core.march.AdaptiveMarch] run: ``attempt()`` until every
    output (or the event) is reached, then ``trajectory()``."""

    def __init__(self, march: AdaptiveMarch, problem: Problem, t_host: torch.Tensor, y0: torch.Tensor,
                 recorder: Recorder) -> None:
        self.march, self.problem, self.recorder = march, problem, recorder
        tab, opts, f = march.tableau, march.options, problem.field
        self.outputs: list[float] = t_host.to(torch.float64).tolist()
        self.direction = 1 if self.outputs[-1] > self.outputs[0] else -1
        self.t0 = self.outputs[0]
        self.k_first, self.start = first_stage(problem, recorder, self._time(self.t0), y0,
                                               StagePerturbation(direction=self.direction))
        precision = f.precision  # what the field ran in decides (found on its first evaluation), not autocast
        assert precision is not None, "the first stage evaluates the field"
        march.field_dtype = precision.coarsest
        self.noise = RoundoffNoise.for_field(precision, f.layout, tab.b_err)
        self.mode = FirstStageMode.AT_NODE
        self.h = opts.first_step if opts.first_step is not None else initial_step(
            f, self.t0, self.direction, y0, self.k_first, tab.order, march.tolerance, torch.float64
        )
        self.nodes, self.steps = [self.t0], []
        self.modes: list[FirstStageMode] = []
        self.rules: list[StagePerturbation] = []
        self.anchored_from: int | None = None
        self.placement = OutputPlacement()
        self.placement.add_node(0, 0)
        self.rows: list[torch.Tensor | None] = [y0] + [None] * (len(self.outputs) - 1)
        self.step_t = _upcoming(opts.step_t, self.t0, self.direction)
        self.jump_t = _upcoming(opts.jump_t, self.t0, self.direction)
        self.y, self.j = y0, 1
        self.attempts = self.rejections = self.rejected = self.on_noise = 0
        self.last_ratio = 0.0
        self.control = march.controller.init()  # the controller's state, owned by this run
        if problem.event is not None:  # outputs become [t0, event time]; j = 2 if the event holds at t0
            self.outputs, self.j = problem.event.begin(self.outputs, self.direction, y0, self.rows, self.placement)

    def _time(self, value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float64, device=self.problem.field.layout.device)

    def attempt(self) -> None:
        """One attempt from ``(t0, y)``: take the step, judge it, accept or reject it, size the next one."""
        march, problem, opts, cb = self.march, self.problem, self.march.options, self.problem.callbacks
        h, t0, y = march.clamp(self.h), self.t0, self.y
        t1 = t0 + self.direction * h
        if cb:
            cb.call("callback_step", t0, y, h, torch.float64)
        if t1 == t0:
            raise march.underflow_error(problem, t0, h, self.last_ratio)
        t1, on_step, on_jump = _clip_to_marks(t0, t1, self.direction, self.step_t, self.jump_t)
        hn = t1 - t0
        size = abs(hn) if (on_step or on_jump) else h  # the size the rules compare (not t1 - t0's rounding)
        rule = StagePerturbation(first=self.mode.nudge, end=Nudge.PREV, direction=self.direction)
        step = self._evaluate(y, t0, t1, hn, rule)
        err = weighted_sum(march.b_err, step.stages.ks) * hn
        ratio, noise_only = march.error_ratio(err, y, step.y1, self.noise, hn, step.stages)  # the one host read
        self.last_ratio = ratio
        accept = (ratio <= 1.0 and size <= opts.max_step) or size <= opts.min_step
        self.attempts += 1
        if self.attempts > (opts.max_num_steps or 2**31 - 1):
            raise self._too_many_attempts()
        if accept:
            self._accept(step, t1, hn, rule, on_step, on_jump, noise_only)
        else:
            self._reject(hn, ratio)
        self.h, self.control = next_step(march.controller, size, ratio, accept, march.tableau.order, self.control)

    def _evaluate(self, y: torch.Tensor, t0: float, t1: float, h: float, rule: StagePerturbation) -> Step:
        """Take the attempted step; a kept graph contains a fresh first stage (it depends on ``y``): the one
        evaluated into it (``start``) or a new one."""
        pair = torch.tensor([t0, t1], dtype=torch.float64, device=y.device)
        times = stage_time_table(self.march.tableau, pair, self.problem.policy.state_dtype, rule)[0]
        inherited = self.k_first if (self.mode.inherited or not self.recorder.keeps_graphs) else None
        return take_step(self.problem, self.recorder, y, inherited, h, (pair[0], pair[1]), rule, times,
                         start=self.start)

    def _too_many_attempts(self) -> Exception:
        opts = self.march.options
        if self.problem.event is not None:
            return self.problem.event.not_found(self.attempts - 1, self.t0)
        return RuntimeError(
            f"odeint: max_num_steps = {opts.max_num_steps} attempts were exceeded before reaching "
            f"t = {self.outputs[self.j]:.6g}; raise options['max_num_steps'] or loosen rtol/atol"
        )

    def _accept(self, step: Step, t1: float, hn: float, rule: StagePerturbation, on_step: bool, on_jump: bool,
                noise_only: bool) -> None:
        problem, recorder, y = self.problem, self.recorder, self.y
        if problem.callbacks:
            problem.callbacks.call("callback_accept_step", self.t0, y, hn, torch.float64)
        self.on_noise += noise_only
        n = len(self.steps)
        recorder.record(n, y, self.k_first if self.mode is FirstStageMode.CARRIED else None)
        if step.graph is not None:
            recorder.keep(n, step.graph)
        self.modes.append(self.mode)
        self.rules.append(rule)
        self._place_outputs(n, StepInterpolant(problem, recorder, y, hn, step), t1, step.y1)
        if (on_step or on_jump) and self.anchored_from is None:
            self.anchored_from = len(self.nodes)
        self.nodes.append(t1)
        self.steps.append(hn)
        if on_step:
            self.step_t.pop(0)
        if on_jump:
            self.jump_t.pop(0)
        self._next_first_stage(step, t1, on_jump)
        self.y, self.t0 = step.y1, t1
        self.rejections = 0

    def _place_outputs(self, n: int, interp: Callable[[float], torch.Tensor], t1: float, y1: torch.Tensor) -> None:
        """Fill the outputs the accepted step ``n`` reaches (its dense output); with an event, look for it."""
        t0, outputs, event = self.t0, self.outputs, self.problem.event
        while self.j < len(outputs) and self.direction * (outputs[self.j] - t1) <= 0:
            x = (outputs[self.j] - t0) / (t1 - t0)
            self.placement.add_interp(n, self.j, x)
            self.rows[self.j] = interp(x)
            self.j += 1
            self.attempts = 0
        if event is not None and event.after_step(n, t0, t1, y1, interp, self.rows, self.placement):
            self.j = len(outputs)

    def _next_first_stage(self, step: Step, t1: float, on_jump: bool) -> None:
        """The first stage of the step after an accepted one: evaluated just after a jump, else reused or carried
        from the step's last stage when the method allows it, else evaluated by the next step."""
        tab = self.march.tableau
        self.start = None
        if on_jump:
            after_jump = StagePerturbation(Nudge.NEXT, direction=self.direction)
            self.k_first, self.start = first_stage(self.problem, self.recorder, self._time(t1), step.y1, after_jump)
            self.mode = FirstStageMode.AFTER_NODE
        elif tab.reuse_last_stage:
            self.k_first = step.stages.ks[-1]
            self.mode = FirstStageMode.REUSED if tab.is_fsal else FirstStageMode.CARRIED
        else:
            self.k_first, self.mode = None, FirstStageMode.AT_NODE

    def _reject(self, hn: float, ratio: float) -> None:
        if self.problem.callbacks:
            self.problem.callbacks.call("callback_reject_step", self.t0, self.y, hn, torch.float64)
        self.rejected += 1
        self.rejections += 1
        if self.rejections > self.march.options.max_rejections:
            raise self.march.rejection_error(self.problem, self.t0, hn, ratio)

    def trajectory(self, t: torch.Tensor) -> Trajectory:
        grid = torch.tensor(self.nodes, dtype=torch.float64, device=t.device)
        event = self.problem.event
        return Trajectory(self.nodes, self.steps, grid, self.rules, self.modes, self.placement, self.rejected,
                          noise_accepted=self.on_noise, anchored_from=self.anchored_from,
                          output_times=event.output_times(t) if event is not None else None)


def _upcoming(marks: Sequence[float], t0: float, direction: int) -> list[float]:
    """Marks strictly ahead of ``t0`` in the direction of integration, in the order they will be met."""
    ahead = sorted((m for m in marks if direction * (m - t0) >= 0), key=lambda m: direction * m)
    return [m for m in ahead if m != t0] if ahead else []


def _clip_to_marks(t0: float, t1: float, direction: int, step_t: list[float],
                   jump_t: list[float]) -> tuple[float, bool, bool]:
    """Shorten the step to end on the next ``step_t`` / ``jump_t`` strictly inside it (jumps win)."""
    on_step = on_jump = False
    if step_t and direction * (step_t[0] - t0) > 0 and direction * (t1 - step_t[0]) > 0:
        t1, on_step = step_t[0], True
    if jump_t and direction * (jump_t[0] - t0) > 0 and direction * (t1 - jump_t[0]) > 0:
        t1, on_step, on_jump = jump_t[0], False, True
    return t1, on_step, on_jump


# -- re-running recorded steps --------------------------------------------------------------------------


def rerun(
    problem: Problem,
    trajectory: Trajectory,
    stage_times: Sequence[Sequence[torch.Tensor]],
    start: int,
    stop: int,
    y: torch.Tensor,
    first_stage: torch.Tensor | None,
    before_step: Callable[[int], None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Re-run accepted steps ``start .. stop-1`` from ``y`` exactly as the forward ran them (no graph).

    ``first_stage`` is step ``start``'s inherited first stage when it carries one;
    ``before_step(m)`` runs before step ``m`` (e.g. to restore its random state).
    Returns each step's start state and, for carried steps, its inherited first
    stage: what a checkpoint strategy would have stored for those steps.
    """
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    last = None
    for m in range(start, stop):
        mode = trajectory.first_stage[m]
        if m == start:  # a reused first stage is evaluated again, bitwise alike
            k1 = first_stage if mode is FirstStageMode.CARRIED else None
        else:
            k1 = last if mode.inherited else None
        out.append((y, k1 if mode is FirstStageMode.CARRIED else None))
        if before_step is not None:
            before_step(m)
        nodes = (trajectory.grid[m], trajectory.grid[m + 1])
        step = take_step(problem, KEEP_NOTHING, y, k1, trajectory.steps[m], nodes, trajectory.perturbation(m),
                         stage_times[m])
        y, last = step.y1, step.stages.ks[-1]
    return out
