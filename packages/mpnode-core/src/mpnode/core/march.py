"""The forward pass: stepping over a fixed grid or with adaptive step-size control.

Both steppings walk the accepted steps in order, hand each step's start state to
a :class:`Recorder` (the adjoint strategy decides what to keep), fill the outputs
and return a :class:`Trajectory`: the constants the backward pass needs (the
accepted nodes, step sizes, how each step's first stage was obtained, where each
output lies).  Under ``torch.no_grad`` nothing else is kept; with autograd on (the
direct strategy) the graph of every step is.
"""

from __future__ import annotations

import abc
import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .callbacks import Callbacks
from .controllers import GridRule, IntegralController, RoundoffNoise, StepSizeController, Tolerance, initial_step
from .graphs import FirstStage, StepGraph, evaluate_first_stage, evaluate_step
from .outputs import DenseOutput, OutputPlacement, OutputRule, place_on_grid
from .precision import PrecisionPolicy, field_roundoff
from .state import FlatVectorField
from .stats import SolverStats
from .stepper import (
    NEXT, NONE, PREV, StagePerturbation, Stages, first_stage_time, rk_stages, stage_time_table, step_end, weighted_sum,
)
from .tableau import ButcherTableau

#: Marks a step whose first stage is inherited from the previous step rather than evaluated.
CARRIED = 2


class MixedPrecisionToleranceWarning(UserWarning):
    """Adaptive steps were accepted because their error estimate was within the rounding noise of a vector field
    evaluated in bfloat16/float16 (``SolverStats.noise_accepted_steps`` counts them)."""


class Recorder:
    """What the forward pass hands to the adjoint strategy; the base class keeps nothing.

    Attributes:
        keeps_graphs: the march evaluates every step with autograd on (from leaf
            inputs) and hands the step's graph to :meth:`keep` (the direct strategy).
        need_times: those graphs must trace the step times (gradients w.r.t. ``t``).
    """

    keeps_graphs: bool = False
    need_times: bool = False

    def record(self, n: int, y: torch.Tensor, first_stage: torch.Tensor | None) -> None:
        """Accepted step ``n`` starts from ``y``; ``first_stage`` is its inherited first stage (carrying methods only)."""

    def keep(self, n: int, graph: StepGraph) -> None:
        """Accepted step ``n``'s graph (only called while :attr:`keeps_graphs`)."""

    def graph_context(self):
        """A context entered around each step evaluated with autograd (e.g. to meter saved tensors)."""
        return contextlib.nullcontext()


class ForwardingRecorder(Recorder):
    """A recorder that hands everything to ``self.inner``; subclasses intercept what they need."""

    inner: Recorder

    @property
    def keeps_graphs(self) -> bool:
        return self.inner.keeps_graphs

    @property
    def need_times(self) -> bool:
        return self.inner.need_times

    def record(self, n, y, first_stage):
        self.inner.record(n, y, first_stage)

    def keep(self, n, graph):
        self.inner.keep(n, graph)

    def graph_context(self):
        return self.inner.graph_context()


@dataclass
class Trajectory:
    """What the forward pass decided, held as constants for the backward pass.

    Attributes:
        nodes: accepted step nodes ``tau_0 .. tau_N`` as host floats (grid dtype values).
        steps: signed step sizes ``h_n = tau_{n+1} - tau_n`` as host floats.
        grid: the nodes as a device tensor in the grid dtype (for fixed grids the
            differentiable grid built from ``t``).
        perturbations: stage-time perturbation of every step (one entry for all
            steps, or one per step).
        first_stage: per step, ``CARRIED`` when its first stage is inherited, else the
            perturbation (``NONE``/``NEXT``/``PREV``) of its freshly evaluated first stage.
        placement: where each output time lies.
        rejected: rejected attempts (adaptive).
        noise_accepted: accepted steps (adaptive) whose error estimate was above the tolerance but within its
            rounding noise (:class:`~mpnode.core.controllers.RoundoffNoise`).
        output_times: the output times when the march decided them (``[t0, event time]``
            of a solve until an event, ``t``'s dtype), else ``None`` (they are ``t``).
        anchored_from: index of the first node that landed on a ``step_t``/``jump_t``
            mark: nodes before it are ``t[0]`` plus constants, it and later ones do not
            move with ``t[0]`` (``None``: no mark was hit).
    """

    nodes: list[float]
    steps: list[float]
    grid: torch.Tensor
    perturbations: list[StagePerturbation]
    first_stage: list[int]
    placement: OutputPlacement
    rejected: int = 0
    noise_accepted: int = 0
    output_times: torch.Tensor | None = None
    anchored_from: int | None = None

    def perturbation(self, n: int) -> StagePerturbation:
        return self.perturbations[0] if len(self.perturbations) == 1 else self.perturbations[n]

    @property
    def n_steps(self) -> int:
        return len(self.steps)


@dataclass
class Problem:
    """Everything a solve's forward and backward share besides the differentiable inputs."""

    field: FlatVectorField
    tableau: ButcherTableau
    policy: PrecisionPolicy
    output_rule: OutputRule
    callbacks: Callbacks
    counters: SolverStats = field(default_factory=SolverStats)
    #: a :class:`mpnode.core.events.EventLocator` when the solve runs until an event, else ``None``.
    event: Any = None


class Stepping(abc.ABC):
    """How the steps of a solve are chosen: a fixed grid or adaptive control."""

    output_rule: OutputRule

    @abc.abstractmethod
    def march(
        self, problem: Problem, y0: torch.Tensor, t: torch.Tensor, t_host: torch.Tensor, grid: torch.Tensor | None,
        grid_host: torch.Tensor | None, recorder: Recorder,
    ) -> tuple[torch.Tensor, Trajectory]:
        """Run the forward pass; returns the ``(len(t), D)`` outputs and the trajectory."""


@dataclass
class _Attempt:
    """One evaluated step: detached stages for the march, and its graph when the recorder keeps graphs."""

    stages: Stages
    phi: torch.Tensor
    y1: torch.Tensor
    graph: StepGraph | None = None


def _evaluate(problem: Problem, recorder: Recorder, y: torch.Tensor, first: torch.Tensor | None, h: float,
              nodes: tuple[torch.Tensor, torch.Tensor], rule: StagePerturbation, times: Sequence[torch.Tensor],
              with_end_slope: bool = False, start: FirstStage | None = None) -> _Attempt:
    """Take one step; with graphs kept, the march continues on detached copies of the graph's values
    (``start``: the step's first stage already evaluated into the graph, see :func:`evaluate_step`)."""
    tab = problem.tableau
    if not recorder.keeps_graphs:
        stages = rk_stages(tab, problem.field, y, h, times, first_stage=first)
        phi = weighted_sum(tab.b, stages.ks)
        return _Attempt(stages, phi, step_end(tab, y, h, stages, phi))
    with torch.enable_grad(), recorder.graph_context():
        graph = evaluate_step(problem, y, first, h, nodes, rule, times, recorder.need_times, with_end_slope, start)
    stages = Stages([k.detach() for k in graph.stages.ks], graph.stages.last_input.detach())
    return _Attempt(stages, graph.phi.detach(), graph.end_state().detach(), graph)


def _interp_output(problem: Problem, y: torch.Tensor, h: float, stages: Stages, phi: torch.Tensor, x: float,
                   end_slope: torch.Tensor | None) -> torch.Tensor:
    return torch.add(y, problem.output_rule.increment(x, stages, phi, end_slope), alpha=h)


def _end_slope(problem: Problem, t1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
    """``f(tau_{n+1}, y_{n+1})`` for rules that need it (cubic Hermite)."""
    return problem.field(t1.to(problem.policy.state_dtype), y1)


class FixedGridStepping(Stepping):
    """Steps on a grid built before the solve by a :class:`GridRule`."""

    def __init__(self, rule: GridRule, output_rule: OutputRule, perturb: bool = False) -> None:
        self.rule = rule
        self.output_rule = output_rule
        self.perturb = bool(perturb)

    def perturbation(self, direction: int) -> StagePerturbation:
        if not self.perturb:
            return StagePerturbation(direction=direction)
        return StagePerturbation(first=NEXT, end=PREV, direction=direction)

    def march(self, problem, y0, t, t_host, grid, grid_host, recorder):
        tab = problem.tableau
        nodes = grid_host.tolist()
        steps = (grid_host[1:] - grid_host[:-1]).tolist()  # h_n, bitwise as the device computes them
        direction = 1 if nodes[-1] > nodes[0] else -1
        rule = self.perturbation(direction)
        placement = place_on_grid(grid_host, t_host, self.output_rule)
        times = stage_time_table(tab, grid, problem.policy.state_dtype, rule)
        rows: list[torch.Tensor | None] = [None] * t.shape[0]
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
            step = _evaluate(problem, recorder, y, None, h, (grid[n], grid[n + 1]), rule, times[n], with_slope)
            if step.graph is not None:
                recorder.keep(n, step.graph)
            if inside:
                slope = None
                if with_slope:
                    slope = step.graph.end_slope.detach() if step.graph is not None else _end_slope(
                        problem, grid[n + 1], step.y1)
                for j, x in inside:
                    rows[j] = _interp_output(problem, y, h, step.stages, step.phi, x, slope)
            y = step.y1
        for j in placement.at_node.get(len(steps), ()):
            rows[j] = y
        trajectory = Trajectory(nodes, steps, grid, [rule], [rule.first] * len(steps), placement)
        return torch.stack(rows), trajectory


@dataclass
class AdaptiveOptions:
    """Validated options of adaptive stepping (torchdiffeq's names)."""

    first_step: float | None = None
    min_step: float = 0.0
    max_step: float = math.inf
    max_num_steps: int | None = None  # None: no bound of ours (2**31 - 1), or MAX_EVENT_STEPS until an event
    step_t: tuple[float, ...] = ()
    jump_t: tuple[float, ...] = ()
    max_rejections: int = 64


class AdaptiveStepping(Stepping):
    """Embedded-pair stepping with an error-ratio controller and dense output (torchdiffeq's algorithm).

    Per attempt: clamp ``h`` to ``[min_step, max_step]``; shorten it to land on the
    next ``step_t``/``jump_t`` inside the step; take the step; error ratio
    ``r = norm(h sum b_err_i k_i / tol)`` (one host read); accept when ``r <= 1``
    (always at ``min_step``); the controller proposes the next size.  When the
    first evaluation shows the field ran in a lower precision than the state
    (autocast lowered it), ``r`` discounts the estimate's rounding noise
    (:class:`~mpnode.core.controllers.RoundoffNoise`): rtol/atol are kept as given.  Outputs are
    the dense output of the accepted step that reaches them.  After a ``jump_t``
    the next first stage is evaluated just after the jump.  More than
    ``max_rejections`` consecutive rejections raise instead of looping.
    """

    def __init__(self, tableau: ButcherTableau, tolerance: Tolerance, controller: StepSizeController | None,
                 options: AdaptiveOptions) -> None:
        if not tableau.is_adaptive or tableau.dense is None:
            raise ValueError(
                f"method {tableau.name!r} has no embedded error estimate and dense output, so it cannot choose its steps; "
                "pass options={'step_size': ...} for a fixed grid or use an adaptive method such as 'dopri5'"
            )
        self.tableau = tableau
        self.tolerance = tolerance
        self.controller = controller or IntegralController()
        self.options = options
        self.output_rule = DenseOutput(tableau)
        #: of the latest march: the least precise dtype of the field's first evaluation, and the accepted steps
        #: that passed on the noise criterion only
        self.field_dtype: torch.dtype | None = None
        self.noise_accepted = 0

    # -- helpers ---------------------------------------------------------------------------------
    def _time(self, value: float, problem: Problem) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float64, device=problem.field.layout.device)

    def _first_stage(self, problem: Problem, recorder: Recorder, t0: float, y: torch.Tensor,
                     rule: StagePerturbation) -> tuple[torch.Tensor, FirstStage | None]:
        """``f`` at the first stage of a step from ``(t0, y)``, evaluated once (as torchdiffeq does): when graphs are
        kept it is evaluated into them and the step's graph starts from it (returned second, else ``None``)."""
        node = self._time(t0, problem)
        if not recorder.keeps_graphs:
            return problem.field(first_stage_time(node, problem.policy.state_dtype, rule), y), None
        with torch.enable_grad(), recorder.graph_context():
            start = evaluate_first_stage(problem, y, node, rule, recorder.need_times)
        return start.k.detach(), start

    def _error_ratio(self, err: torch.Tensor, y: torch.Tensor, y1: torch.Tensor, noise: RoundoffNoise | None,
                     h: float, stages: Stages) -> tuple[float, bool]:
        """The attempt's error ratio (accept when ``<= 1``; the controller's input) and whether only the rounding
        noise of the field made it pass; one host read.  Without noise: ``norm(err / tol)``, torchdiffeq's."""
        tol = self.tolerance
        if noise is None:
            ratio = float(tol.error_ratio(err, y, y1))
            tol.check_norm_value(ratio, lambda: err / tol.scale(y, y1))
            return (ratio if math.isfinite(ratio) else math.inf), False
        plain, floor = tol.noisy_error_ratios(err, y, y1, noise.size(h, stages.ks)).tolist()
        tol.check_norm_value(plain, lambda: err / tol.scale(y, y1))
        if not (math.isfinite(plain) and math.isfinite(floor)):
            return math.inf, False
        return noise.judge(plain, floor)

    # -- the march -------------------------------------------------------------------------------
    def march(self, problem, y0, t, t_host, grid, grid_host, recorder):
        tab, f, opts, cb = self.tableau, problem.field, self.options, problem.callbacks
        outputs = t_host.to(torch.float64).tolist()
        direction = 1 if outputs[-1] > outputs[0] else -1
        t0 = outputs[0]
        k_first, start = self._first_stage(problem, recorder, t0, y0, StagePerturbation(direction=direction))
        self.field_dtype = f.out_dtype  # what the field ran in decides, not whether autocast is on
        u = field_roundoff(f.out_dtype, problem.policy.state_dtype)
        noise = RoundoffNoise(u, tab.b_err) if u else None
        mode = NONE
        h = opts.first_step if opts.first_step is not None else initial_step(
            f, t0, direction, y0, k_first, tab.order, self.tolerance, torch.float64
        )
        nodes, steps, modes, rules = [t0], [], [], []
        anchored_from = None
        placement = OutputPlacement()
        placement.add_node(0, 0)
        rows: list[torch.Tensor | None] = [y0] + [None] * (len(outputs) - 1)
        step_t = _upcoming(opts.step_t, t0, direction)
        jump_t = _upcoming(opts.jump_t, t0, direction)
        y, j, attempts, rejections, rejected, previous_ratio, last_ratio = y0, 1, 0, 0, 0, None, 0.0
        on_noise = 0
        if problem.event is not None:  # outputs become [t0, event time]; j = 2 if the event holds at t0
            outputs, j = problem.event.begin(outputs, direction, y0, rows, placement)
        while j < len(outputs):
            h = self._clamp(h)
            t1 = t0 + direction * h
            if cb:
                cb.call("callback_step", t0, y, h, torch.float64)
            if t1 == t0:
                raise self._underflow_error(problem, t0, h, last_ratio)
            t1, on_step, on_jump = _clip_to_marks(t0, t1, direction, step_t, jump_t)
            hn = t1 - t0
            size = abs(hn) if (on_step or on_jump) else h  # the size the rules compare (not t1 - t0's rounding)
            rule = StagePerturbation(first=NONE if mode == CARRIED else mode, end=PREV, direction=direction)
            pair = torch.tensor([t0, t1], dtype=torch.float64, device=y.device)
            times = stage_time_table(tab, pair, problem.policy.state_dtype, rule)[0]
            # a kept graph contains a fresh first stage (it depends on y): the one evaluated into it (start) or a new one
            inherited = k_first if (mode in (PREV, CARRIED) or not recorder.keeps_graphs) else None
            step = _evaluate(problem, recorder, y, inherited, hn, (pair[0], pair[1]), rule, times, start=start)
            stages, phi, y1 = step.stages, step.phi, step.y1
            err = weighted_sum(tab.b_err, stages.ks) * hn
            ratio, noise_only = self._error_ratio(err, y, y1, noise, hn, stages)  # the attempt's one host read
            last_ratio = ratio
            accept = ratio <= 1.0
            if size > opts.max_step:
                accept = False
            if size <= opts.min_step:
                accept = True
            attempts += 1
            if attempts > (opts.max_num_steps or 2**31 - 1):
                if problem.event is not None:
                    raise problem.event.not_found(attempts - 1, t0)
                raise RuntimeError(
                    f"odeint: max_num_steps = {opts.max_num_steps} attempts were exceeded before reaching t = {outputs[j]:.6g}; "
                    "raise options['max_num_steps'] or loosen rtol/atol"
                )
            if accept:
                if cb:
                    cb.call("callback_accept_step", t0, y, hn, torch.float64)
                on_noise += noise_only
                n = len(steps)
                recorder.record(n, y, k_first if mode == CARRIED else None)
                if step.graph is not None:
                    recorder.keep(n, step.graph)
                modes.append(mode)
                rules.append(rule)
                slope = None
                while j < len(outputs) and direction * (outputs[j] - t1) <= 0:
                    x = (outputs[j] - t0) / (t1 - t0)
                    placement.add_interp(n, j, x)
                    rows[j] = _interp_output(problem, y, hn, stages, phi, x, slope)
                    j += 1
                    attempts = 0
                if problem.event is not None and problem.event.after_step(
                    n, t0, t1, y1, lambda x: _interp_output(problem, y, hn, stages, phi, x, None), rows, placement
                ):
                    j = len(outputs)
                if (on_step or on_jump) and anchored_from is None:
                    anchored_from = len(nodes)
                nodes.append(t1)
                steps.append(hn)
                if on_step:
                    step_t.pop(0)
                start = None
                if on_jump:
                    jump_t.pop(0)
                    after_jump = StagePerturbation(NEXT, direction=direction)
                    k_first, start = self._first_stage(problem, recorder, t1, y1, after_jump)
                    mode = NEXT
                elif tab.reuse_last_stage:
                    k_first = stages.ks[-1]
                    mode = PREV if tab.is_fsal else CARRIED
                else:
                    k_first, mode = None, NONE
                y, t0 = y1, t1
                rejections = 0
            else:
                if cb:
                    cb.call("callback_reject_step", t0, y, hn, torch.float64)
                rejected += 1
                rejections += 1
                if rejections > opts.max_rejections:
                    raise self._rejection_error(problem, t0, hn, ratio)
            h = self.controller.propose(size, ratio, accept, tab.order, previous_ratio)
            if accept:
                previous_ratio = ratio
        grid = torch.tensor(nodes, dtype=torch.float64, device=y0.device)
        trajectory = Trajectory(nodes, steps, grid, rules, modes, placement, rejected, noise_accepted=on_noise,
                                anchored_from=anchored_from)
        self.noise_accepted = on_noise
        if problem.event is not None:
            trajectory.output_times = problem.event.output_times(t)
        return torch.stack(rows), trajectory

    def warn_if_noise_accepted(self, stacklevel: int) -> None:
        """One :class:`MixedPrecisionToleranceWarning` when the latest march accepted steps on the noise criterion.

        The text does not change with the counts, so Python shows it once per call site.
        """
        if not self.noise_accepted:
            return
        dtype = self.field_dtype
        warnings.warn(
            f"odeint: some adaptive steps had an error estimate above rtol/atol but within the rounding noise of the "
            f"vector field's {dtype} evaluations, so they were accepted (SolverStats.noise_accepted_steps counts them): "
            f"there the solution is as accurate as {dtype} allows, not as rtol/atol ask. For tighter results evaluate "
            "the field in float32 (outside torch.autocast); loosening rtol/atol to what it resolves silences this.",
            MixedPrecisionToleranceWarning,
            stacklevel=stacklevel + 1,
        )

    def _clamp(self, h: float) -> float:
        if not math.isfinite(h):
            h = self.options.min_step
        return min(max(h, self.options.min_step), self.options.max_step)

    def _underflow_error(self, problem: Problem, t0: float, h: float, last_ratio: float) -> Exception:
        if last_ratio == math.inf:
            return self._rejection_error(problem, t0, h, last_ratio)
        return FloatingPointError(
            f"odeint: the step size underflowed at t = {t0:.17g} (h = {h:.3g}); the problem may be stiff or the "
            "field non-smooth there: loosen rtol/atol, set options['min_step'], mark a known discontinuity with "
            "options['jump_t'], or use a fixed grid"
        )

    def _rejection_error(self, problem: Problem, t0: float, h: float, ratio: float) -> Exception:
        if ratio == math.inf:
            return FloatingPointError(
                f"odeint: the solution became inf/NaN near t = {t0:.6g} and smaller steps did not help; check the vector "
                "field for blow-up (under float16 autocast it may overflow: try bfloat16)"
            )
        dtype = self.field_dtype or problem.policy.state_dtype  # what the field ran in
        return RuntimeError(
            f"odeint: {self.options.max_rejections} consecutive steps were rejected at t = {t0:.6g} (last h = {abs(h):.3g}, "
            f"error ratio {ratio:.3g}); the tolerances cannot be met in {dtype} here: loosen rtol/atol, set "
            "options['min_step'], or use a fixed grid"
        )


def _upcoming(marks: Sequence[float], t0: float, direction: int) -> list[float]:
    """Marks strictly ahead of ``t0`` in the direction of integration, in the order they will be met."""
    ahead = sorted((m for m in marks if direction * (m - t0) >= 0), key=lambda m: direction * m)
    return [m for m in ahead if m != t0] if ahead else []


def _clip_to_marks(t0: float, t1: float, direction: int, step_t: list[float], jump_t: list[float]):
    """Shorten the step to end on the next ``step_t`` / ``jump_t`` strictly inside it (jumps win)."""
    on_step = on_jump = False
    if step_t and direction * (step_t[0] - t0) > 0 and direction * (t1 - step_t[0]) > 0:
        t1, on_step = step_t[0], True
    if jump_t and direction * (jump_t[0] - t0) > 0 and direction * (t1 - jump_t[0]) > 0:
        t1, on_step, on_jump = jump_t[0], False, True
    return t1, on_step, on_jump


def replay(
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
    tab, f = problem.tableau, problem.field
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    last = None
    for m in range(start, stop):
        mode = trajectory.first_stage[m]
        if m == start:
            k1 = first_stage if mode == CARRIED else None  # a reused (PREV) first stage is re-evaluated, bitwise alike
        else:
            k1 = last if mode in (PREV, CARRIED) else None
        out.append((y, k1 if mode == CARRIED else None))
        if before_step is not None:
            before_step(m)
        h = trajectory.steps[m]
        stages = rk_stages(tab, f, y, h, stage_times[m], first_stage=k1)
        y = step_end(tab, y, h, stages)
        last = stages.ks[-1]
    return out
