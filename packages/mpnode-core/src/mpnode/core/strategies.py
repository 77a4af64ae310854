"""Adjoint strategies: the time/memory dial of what a solve keeps for its backward pass.

A strategy is passed as ``odeint(..., adjoint=...)``.  Every strategy runs the same
discrete adjoint (:func:`mpnode.core.backward.run_adjoint`, gradient sums in high
precision, the same float16 scaling) and differs only in where each step's graph
comes from:

* :class:`DirectAdjoint`: kept from the forward pass (no recomputation). Memory:
  every step's low-precision activations; time: about torchdiffeq's direct backprop.
* :class:`RecomputeAdjoint` (the default): rebuilt in backward from one checkpoint
  per accepted step. Memory: ``N`` states; time: one extra graph-free forward.
* :class:`SegmentedAdjoint`: rebuilt from checkpoints every ``k`` steps, each
  segment's states recomputed when backward reaches it. Memory: about
  ``N/k + k`` states; time: about two extra graph-free forwards.
* :class:`AutoAdjoint`: the fastest of these whose held memory fits a byte budget,
  decided during the forward pass (it starts direct and falls back as memory grows);
  ``SolverStats.last_adjoint`` names the one used.

Each owns the checkpoint dtype and the adjoint scaling.  ``odeint``'s ``scaler=`` and
``options["checkpoint_dtype"]`` are shorthands for ``RecomputeAdjoint(checkpoint_dtype=...,
scaling=...)``.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from .backward import BackwardPlan, StepSource, build_step_graph, run_adjoint
from .checkpoints import CheckpointStore, StoredRows, decode_row, encode_row
from .forward import TrackedForward, tracked_forward
from .graphs import StepGraph
from .guards import check_solution, first_order_only, refuse_batched_gradients
from .march import CARRIED, ForwardingRecorder, Problem, Recorder, Stepping, Trajectory, replay
from .meters import held_memory
from .parameters import reachable_grad_tensors
from .replay import Replay
from .scaling import AdjointScaling, NoAdjointScaling, default_scaling
from .stats import SolverStats


@dataclass
class SolveInputs:
    """The differentiable inputs of a solve and their host copies.

    Attributes:
        t: output times ``(T,)`` (float32/64).
        t_host: ``t`` on the host.
        grid: the fixed grid ``(N+1,)`` built from ``t`` (``None`` for adaptive steps).
        grid_host: ``grid`` on the host.
        y0: the flat initial state ``(D,)``.
        params: tensors ``func`` uses that receive gradients (before discovery).
        needs_grad: whether any input may need a gradient (else nothing is kept).
        user_stats: the caller's :class:`SolverStats` (updated when a pass completes), or ``None``.
        discover: probe the first evaluation for grad-requiring tensors ``func``
            captures (``adjoint_params`` was not given).
        constants: module parameters left out of ``adjoint_params``: they get no
            gradient (nor does any other tensor outside ``params`` when
            ``adjoint_params`` is given) and are checked for in-place changes.
        modules: the modules reachable from ``func`` (their buffers are watched).
    """

    t: torch.Tensor
    t_host: torch.Tensor
    grid: torch.Tensor | None
    grid_host: torch.Tensor | None
    y0: torch.Tensor
    params: list[torch.Tensor]
    needs_grad: bool
    user_stats: SolverStats | None
    discover: bool = False
    constants: list[torch.Tensor] = field(default_factory=list)
    modules: list[torch.nn.Module] = field(default_factory=list)

    @property
    def times_need_grad(self) -> bool:
        return any(x is not None and x.requires_grad for x in (self.t, self.grid)) and torch.is_grad_enabled()


#: What an unscaled float16 overflow says when the user turned scaling off.
SCALING_TURNED_OFF_ADVICE = (
    "adjoint scaling is off (scaler=False / scaling=False). Drop that argument so float16 solves use the default "
    "scaler (mpnode-scaler's DynamicAdjointScaler, when installed), or pass scaler=mpnode.scaler.DynamicAdjointScaler(), "
    "or autocast to torch.bfloat16."
)


def _check_checkpoint_dtype(dtype: object) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"checkpoint_dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    return dtype


def _check_scaling(scaling: object) -> AdjointScaling | bool | None:
    if scaling is None or scaling is False or isinstance(scaling, AdjointScaling):
        return scaling
    raise TypeError(
        "scaler must be an mpnode.core.AdjointScaling (e.g. mpnode.scaler.DynamicAdjointScaler()), None or False; "
        f"got {scaling!r}"
    )


def _check_count(name: str, value: object, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass
class StoreSetup:
    """What a strategy needs to size its store: rows (width, dtype, device, count if known), carried stages,
    traced times, and the differentiated tensors (not counted as held memory)."""

    width: int
    dtype: torch.dtype
    device: torch.device
    rows: int | None
    carries: bool
    need_times: bool
    params: tuple[torch.Tensor, ...] = ()


class StepStore(Recorder):
    """What a strategy keeps between forward and backward (filled by the march)."""

    #: the strategy actually used (``SolverStats.last_adjoint``).
    name: str = "store"
    #: backward may evaluate the field again (so the forward's random numbers must be replayable).
    recomputes: bool = True

    def saved_tensors(self) -> list[torch.Tensor]:
        """Tensors to hand to ``save_for_backward`` (checkpoints)."""
        return []

    @abc.abstractmethod
    def source(self, trajectory: Trajectory, saved: list[torch.Tensor], replay: Replay) -> StepSource:
        """Where backward gets the step graphs (``saved``: the tensors given by :meth:`saved_tensors`;
        ``replay``: the forward's random states and watched buffers)."""


class AdjointStrategy(abc.ABC):
    """What a solve keeps for backward and how backward gets each step's graph back.

    Args:
        checkpoint_dtype: dtype of stored states; ``None`` = the autocast dtype for a
            float32 state under autocast, else the state's dtype (autocast never lowers float64).  float16 rows are stored scaled by a
            power of two each (no range loss).
        scaling: adjoint scaling for float16 backward passes: an ``AdjointScaling``
            (e.g. ``mpnode.scaler.DynamicAdjointScaler()``), ``None`` = automatic (the
            registered float16 default when float16 is involved, none otherwise),
            ``False`` = none.
        replay_rng: replay the forward's random numbers in each recomputed step
            (dropout, ``torch.randn`` in ``func``), as ``torch.utils.checkpoint``
            does; ``False`` skips the per-step generator bookkeeping and lets a
            recomputation draw fresh numbers (gradients of another noise draw).
    """

    name: str = "adjoint"

    def __init__(self, checkpoint_dtype: torch.dtype | None = None, scaling: AdjointScaling | bool | None = None,
                 replay_rng: bool = True) -> None:
        self.checkpoint_dtype = _check_checkpoint_dtype(checkpoint_dtype)
        self.scaling = _check_scaling(scaling)
        if not isinstance(replay_rng, bool):
            raise TypeError(f"replay_rng must be True or False, got {replay_rng!r}")
        self.replay_rng = replay_rng

    @abc.abstractmethod
    def new_store(self, setup: StoreSetup) -> StepStore:
        """A fresh store for one solve."""

    def resolved_checkpoint_dtype(self, problem: Problem) -> torch.dtype:
        return self.checkpoint_dtype or problem.policy.default_checkpoint_dtype

    def resolved_scaling(self, problem: Problem) -> AdjointScaling:
        if isinstance(self.scaling, AdjointScaling):
            return self.scaling
        float16 = torch.float16 in (problem.policy.lowered_dtype, self.resolved_checkpoint_dtype(problem))
        if self.scaling is None:
            return default_scaling(float16)
        return NoAdjointScaling(raise_on_nonfinite=float16, advice=SCALING_TURNED_OFF_ADVICE)

    def solve(self, problem: Problem, stepping: Stepping, inputs: SolveInputs) -> torch.Tensor:
        """Run the forward pass; returns the ``(T, D)`` outputs, differentiable when an input needs a gradient.

        The march runs first (:func:`~mpnode.core.forward.tracked_forward`: captured
        tensors found on the first evaluation, random states and versions recorded,
        the solution checked), then the autograd Function attaches the backward.
        """
        if not inputs.needs_grad:
            return _solve_without_graph(problem, stepping, inputs, self.name)
        fixed = inputs.grid_host is not None  # the number of steps is known before the march
        store = self.new_store(StoreSetup(
            width=inputs.y0.shape[0], dtype=self.resolved_checkpoint_dtype(problem), device=inputs.y0.device,
            rows=inputs.grid_host.numel() - 1 if fixed else None,
            carries=not fixed and problem.tableau.carries_first_stage,
            need_times=inputs.times_need_grad, params=tuple(inputs.params),
        ))
        outputs, forward = tracked_forward(problem, stepping, inputs, store, self.replay_rng and store.recomputes)
        differentiable = forward.needs_grad or any(
            x is not None and x.requires_grad for x in (inputs.t, inputs.grid, inputs.y0)
        )
        # nothing differentiated, but func may read a grad-requiring tensor later in the solve: keep a graph through
        # it, so that backward's per-step check refuses it rather than the output silently having no graph
        watched = [] if differentiable else reachable_grad_tensors(problem.field.func, [*forward.params, *inputs.constants])
        if differentiable or watched:
            setup = _Setup(self, problem, inputs, forward, store, outputs)
            outputs = _AdjointFunction.apply(setup, inputs.t, inputs.grid, inputs.y0, *forward.params, *watched)
        _commit_forward(problem, forward.trajectory, inputs.user_stats, store.name, forward.nfe0)
        return outputs

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(checkpoint_dtype={self.checkpoint_dtype}, scaling={self.scaling!r}, "
                f"replay_rng={self.replay_rng})")


# -- recompute --------------------------------------------------------------------------------------


class RecomputeAdjoint(AdjointStrategy):
    """One checkpoint per accepted step; backward recomputes each step (discretize-then-optimize)."""

    name = "recompute"

    def new_store(self, setup):
        return EveryStepCheckpoints(setup)


class EveryStepCheckpoints(StepStore):
    """Stores every accepted step's start state (and carried first stage) in the checkpoint dtype."""

    name = "recompute"

    def __init__(self, setup: StoreSetup) -> None:
        self.states = CheckpointStore(setup.width, setup.dtype, setup.device, setup.rows)
        self.first_stages = CheckpointStore(setup.width, setup.dtype, setup.device) if setup.carries else None
        self.first_stage_row: dict[int, int] = {}

    def record(self, n, y, first_stage):
        self.states.append(y)
        if first_stage is not None:
            self.first_stage_row[n] = len(self.first_stages)
            self.first_stages.append(first_stage)

    def finish(self) -> "RecordedCheckpoints":
        firsts = self.first_stages.finish() if self.first_stages is not None else StoredRows([])
        return RecordedCheckpoints(self.states.finish(), firsts, dict(self.first_stage_row))

    def saved_tensors(self):
        self.recorded = self.finish()
        return self.recorded.tensors()

    def source(self, trajectory, saved, replay):
        return RecomputedSteps(trajectory, RecordedCheckpoints.from_saved(saved, self.recorded.layout()), replay)


@dataclass
class RecordedCheckpoints:
    """The rows an :class:`EveryStepCheckpoints` kept: states, carried first stages, and each carried step's row."""

    states: StoredRows
    first_stages: StoredRows
    first_row: dict[int, int]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.states.tensors(), *self.first_stages.tensors()]

    def layout(self) -> tuple:
        return (len(self.states.chunks), self.states.scales is not None, len(self.first_stages.chunks),
                self.first_stages.scales is not None, self.first_row)

    @classmethod
    def from_saved(cls, saved: list[torch.Tensor], layout: tuple) -> "RecordedCheckpoints":
        n_states, states_scaled, n_firsts, firsts_scaled, first_row = layout
        states = StoredRows.from_saved(saved, n_states, states_scaled)
        firsts = StoredRows.from_saved(saved[len(states.tensors()):], n_firsts, firsts_scaled)
        return cls(states, firsts, first_row)


class RecomputedSteps(StepSource):
    """Rebuilds each step's graph from the checkpoints saved for backward, replaying the forward's random numbers."""

    def __init__(self, trajectory: Trajectory, checkpoints: RecordedCheckpoints, replay: Replay) -> None:
        self.trajectory = trajectory
        self.checkpoints = checkpoints
        self.replay = replay

    def session(self):
        return self.replay.session()

    def state(self, plan, n):
        return self.checkpoints.states.row(n)

    def first_is_input(self, n):
        return self.trajectory.first_stage[n] == CARRIED

    def graph(self, plan, n, with_end_slope):
        first = self.checkpoints.first_stages.row(self.checkpoints.first_row[n]) if self.first_is_input(n) else None
        self.replay.before_step(n)
        return build_step_graph(plan, n, self.state(plan, n), first, with_end_slope)


# -- direct ------------------------------------------------------------------------------------------


class DirectAdjoint(AdjointStrategy):
    """Keeps every step's graph from the forward pass: no recomputation, the most memory.

    The field's activations are stored in the autocast dtype; the state, the adjoint
    and every gradient sum stay in high precision, because backward still takes one
    vector-Jacobian product per step and sums them in ``y0``'s (parameters') dtype.
    Under autocast each weight is cast once per solve (autocast's weight-cast cache,
    as in the recompute strategy's backward) and that one low-precision copy is held:
    a step's VJP sums its stages' weight gradients in the autocast dtype, converts the
    step's total to the weight's dtype, and the steps are summed there, so the error
    does not grow with the number of steps.  ``checkpoint_dtype`` has no role here.
    """

    name = "direct"

    def new_store(self, setup):
        return KeptGraphs(setup.need_times)


class KeptGraphs(StepStore):
    """Holds each accepted step's :class:`StepGraph`."""

    name = "direct"
    keeps_graphs = True
    recomputes = False

    def __init__(self, need_times: bool) -> None:
        self.need_times = need_times
        self.graphs: list[StepGraph] = []

    def keep(self, n, graph):
        self.graphs.append(graph)

    def source(self, trajectory, saved, replay):
        return KeptSteps(self.graphs, replay)


class KeptSteps(StepSource):
    """Hands out the graphs the forward kept (retained while a scaled block may be redone)."""

    retain_graphs = True

    def __init__(self, graphs: list[StepGraph], replay: Replay) -> None:
        self.graphs = graphs
        self.replay = replay

    def session(self):
        return self.replay.session()

    def state(self, plan, n):
        return self.graphs[n].y.detach()

    def first_is_input(self, n):
        return self.graphs[n].first is not None

    def graph(self, plan, n, with_end_slope):
        return self.graphs[n]


# -- segmented ---------------------------------------------------------------------------------------


class SegmentedAdjoint(AdjointStrategy):
    """Checkpoints every ``k`` accepted steps; backward recomputes one segment's states at a time.

    Args:
        checkpoints: the most checkpoints to hold between forward and backward
            (``k`` follows: ``ceil(N / checkpoints)`` for fixed grids; for adaptive
            steps ``k`` doubles, dropping every other checkpoint, whenever the count
            would exceed it).  Default: ``ceil(sqrt(N))`` for fixed grids (memory about
            ``2 sqrt(N)`` states), 64 for adaptive steps.
        checkpoint_dtype: dtype of the stored states (see :class:`AdjointStrategy`).
        scaling: adjoint scaling (see :class:`AdjointStrategy`).
        replay_rng: replay the forward's random numbers (see :class:`AdjointStrategy`).

    Held between forward and backward: at most ``checkpoints`` states; during
    backward, one segment's ``k`` states more.  Time: one extra graph-free forward
    beyond :class:`RecomputeAdjoint`.  Gradients equal :class:`RecomputeAdjoint`'s.
    """

    name = "segmented"

    def __init__(self, checkpoints: int | None = None, checkpoint_dtype: torch.dtype | None = None,
                 scaling: AdjointScaling | bool | None = None, replay_rng: bool = True) -> None:
        super().__init__(checkpoint_dtype, scaling, replay_rng)
        self.checkpoints = _check_count("checkpoints", checkpoints, 1)

    def new_store(self, setup):
        budget = self.checkpoints
        if budget is None:
            budget = max(1, math.isqrt(setup.rows - 1) + 1) if setup.rows else 64
        return SegmentCheckpoints(setup, budget)

    def __repr__(self) -> str:
        return f"SegmentedAdjoint(checkpoints={self.checkpoints}, checkpoint_dtype={self.checkpoint_dtype})"


class SegmentCheckpoints(StepStore):
    """Keeps the start state (and carried first stage) of steps ``0, k, 2k, ...``, at most ``budget`` of them."""

    name = "segmented"

    def __init__(self, setup: StoreSetup, budget: int) -> None:
        self.setup = setup
        self.budget = budget
        self.every = max(1, -(-setup.rows // budget)) if setup.rows else 1
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def record(self, n, y, first_stage):
        if n % self.every:
            return
        first = None if first_stage is None else encode_row(first_stage, self.setup.dtype)
        self.kept[n] = (encode_row(y, self.setup.dtype), first)
        while len(self.kept) > self.budget:  # adaptive steps: thin to every other checkpoint
            self.every *= 2
            self.kept = {m: v for m, v in self.kept.items() if m % self.every == 0}

    def saved_tensors(self):
        """Per kept step its encoded row (and its scale for narrow-range dtypes), then the same for a carried first stage."""
        self.index = sorted(self.kept)
        self.has_first = [self.kept[m][1] is not None for m in self.index]
        out = []
        for m in self.index:
            for stored, scale in [self.kept[m][0]] + ([self.kept[m][1]] if self.kept[m][1] is not None else []):
                out += [stored] if scale is None else [stored, scale]
        self.scaled = bool(out) and len(out) > len(self.index) + sum(self.has_first)
        self.kept = {}
        return out

    def source(self, trajectory, saved, replay):
        saved = iter(saved)

        def row() -> torch.Tensor:
            stored = next(saved)
            return decode_row(stored, next(saved) if self.scaled else None)

        kept = {m: (row(), row() if has_first else None) for m, has_first in zip(self.index, self.has_first)}
        return SegmentReplay(trajectory, kept, replay)


class SegmentReplay(StepSource):
    """Rebuilds a segment's states from its checkpoint when backward first needs one of its steps."""

    def __init__(self, trajectory: Trajectory, kept: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
                 replay: Replay) -> None:
        self.trajectory = trajectory
        self.kept = kept
        self.replay = replay
        self.starts = sorted(kept)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _segment(self, plan: BackwardPlan, n: int) -> None:
        start = max(m for m in self.starts if m <= n)
        later = [m for m in self.starts if m > start]
        stop = later[0] if later else self.trajectory.n_steps
        y, first = self.kept[start]
        state_dtype = plan.problem.policy.state_dtype
        with torch.no_grad():
            states = replay(plan.problem, self.trajectory, plan.stage_times, start, stop, y.to(state_dtype),
                            None if first is None else first.to(state_dtype), before_step=self.replay.before_step)
        self.cache = dict(zip(range(start, stop), states))

    def state(self, plan, n):
        if n not in self.cache:  # callbacks may ask before backward reaches the step, or after it left its segment
            self._segment(plan, n)
        return self.cache[n][0]

    def first_is_input(self, n):
        return self.trajectory.first_stage[n] == CARRIED

    def session(self):
        return self.replay.session()

    def graph(self, plan, n, with_end_slope):
        if n not in self.cache:
            self._segment(plan, n)
        y, first = self.cache[n]
        self.replay.before_step(n)
        return build_step_graph(plan, n, y, first if self.first_is_input(n) else None, with_end_slope)


# -- auto -------------------------------------------------------------------------------------------


class AutoAdjoint(AdjointStrategy):
    """The fastest strategy whose memory held between forward and backward fits ``budget_bytes``.

    Decided during the forward pass, so it works for adaptive steps too: it keeps
    step graphs (direct) while their saved bytes fit; past the budget it converts
    them to one checkpoint per step (recompute); if those no longer fit it keeps
    every ``k``-th (segmented, as many checkpoints as fit).  No step is evaluated
    twice for the decision.  ``SolverStats.last_adjoint`` names the strategy used.

    Args:
        budget_bytes: the most bytes to hold between forward and backward.
        checkpoint_dtype: dtype of stored states (see :class:`AdjointStrategy`).
        scaling: adjoint scaling (see :class:`AdjointStrategy`).
        replay_rng: replay the forward's random numbers (see :class:`AdjointStrategy`).
    """

    name = "auto"

    def __init__(self, budget_bytes: int, checkpoint_dtype: torch.dtype | None = None,
                 scaling: AdjointScaling | bool | None = None, replay_rng: bool = True) -> None:
        super().__init__(checkpoint_dtype, scaling, replay_rng)
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be a positive int (bytes), got {budget_bytes!r}")
        self.budget_bytes = budget_bytes

    def new_store(self, setup):
        return BudgetedStore(setup, self.budget_bytes)

    def __repr__(self) -> str:
        return f"AutoAdjoint(budget_bytes={self.budget_bytes}, checkpoint_dtype={self.checkpoint_dtype})"


class BudgetedStore(ForwardingRecorder, StepStore):
    """Direct while the kept graphs fit the budget, then recompute, then segmented (``inner`` is the current one)."""

    def __init__(self, setup: StoreSetup, budget_bytes: int) -> None:
        self.setup = setup
        self.budget = budget_bytes
        self.row_bytes = setup.width * setup.dtype.itemsize
        self.inner: StepStore = KeptGraphs(setup.need_times)
        self.meter = held_memory(exclude=setup.params, chain=True)  # bytes the kept graphs hold, weights excluded
        self.carried: set[int] = set()  # steps whose first stage is carried (the others' are recomputable)

    @property
    def name(self) -> str:
        return self.inner.name

    def graph_context(self):
        return self.meter

    def keep(self, n, graph):
        self.inner.keep(n, graph)
        if self.meter.bytes > self.budget:
            self._fall_back()

    def record(self, n, y, first_stage):
        if first_stage is not None:
            self.carried.add(n)
        if not self.inner.keeps_graphs:
            self.inner.record(n, y, first_stage)
            if isinstance(self.inner, EveryStepCheckpoints) and self._checkpoint_bytes() > self.budget:
                self._to_segments()

    def _checkpoint_bytes(self) -> int:
        rows = len(self.inner.states) + (len(self.inner.first_stages) if self.inner.first_stages is not None else 0)
        return rows * self.row_bytes

    def _fall_back(self) -> None:
        """Turn the kept graphs into checkpoints (their start states) and stop keeping graphs."""
        graphs = self.inner.graphs
        checkpoints = EveryStepCheckpoints(StoreSetup(**{**self.setup.__dict__, "rows": None}))
        for n, graph in enumerate(graphs):
            checkpoints.record(n, graph.y.detach(), graph.first.detach() if n in self.carried else None)
        self.inner = checkpoints
        if self._checkpoint_bytes() > self.budget:
            self._to_segments()

    def _to_segments(self) -> None:
        old: EveryStepCheckpoints = self.inner
        budget = max(1, self.budget // (self.row_bytes * (2 if self.setup.carries else 1)))
        segments = SegmentCheckpoints(StoreSetup(**{**self.setup.__dict__, "rows": None}), budget)
        recorded = old.finish()
        for n in range(len(recorded.states)):
            first = recorded.first_stages.row(recorded.first_row[n]) if n in recorded.first_row else None
            segments.record(n, recorded.states.row(n), first)
        self.inner = segments

    def saved_tensors(self):
        return self.inner.saved_tensors()

    def source(self, trajectory, saved, replay):
        return self.inner.source(trajectory, saved, replay)


# -- the autograd Function shared by every strategy ----------------------------------------------------


def _solve_without_graph(problem: Problem, stepping: Stepping, inputs: SolveInputs, name: str) -> torch.Tensor:
    """A solve nothing will differentiate: march under ``no_grad`` from a copy of ``y0``, keep nothing."""
    nfe0 = problem.field.nfe
    with torch.no_grad(), problem.policy.autocast():
        outputs, trajectory = stepping.march(
            problem, inputs.y0.detach().clone(), inputs.t, inputs.t_host, inputs.grid, inputs.grid_host, Recorder()
        )
    check_solution(outputs, problem.policy)
    _commit_forward(problem, trajectory, inputs.user_stats, name, nfe0)
    return outputs


def _commit_forward(problem: Problem, trajectory: Trajectory, user_stats: SolverStats | None, name: str,
                    nfe0: int) -> None:
    """Add a completed forward pass's counters to the caller's stats (after the solution was checked)."""
    counters = problem.counters
    counters.nfe_forward += problem.field.nfe - nfe0
    counters.steps += trajectory.n_steps
    counters.rejected_steps += trajectory.rejected
    counters.noise_accepted_steps += trajectory.noise_accepted
    counters.last_grid = tuple(trajectory.nodes)
    counters.last_adjoint = name
    if user_stats is not None:
        user_stats.add(counters)
    problem.counters = SolverStats()


@dataclass
class _Setup:
    strategy: AdjointStrategy
    problem: Problem
    inputs: SolveInputs
    forward: TrackedForward
    store: StepStore | None
    outputs: torch.Tensor | None  # handed to autograd by forward, then dropped (no reference cycle)


class _AdjointFunction(torch.autograd.Function):
    """``apply(setup, t, grid, y0, *params, *watched) -> (T, D)`` outputs; backward by the strategy's step source.

    ``watched``: grad-requiring tensors ``func`` may read that the solve does not
    differentiate (they give the output its graph; they get no gradient, and backward
    raises if a step uses one).

    The march has already run (:func:`~mpnode.core.forward.tracked_forward`);
    ``forward`` saves the strategy's checkpoints through ``save_for_backward`` (float16
    rows with one float32 scale each); a direct strategy's graphs hold their own saved
    tensors.  Backward checks the version counters of everything the steps read,
    refuses second derivatives, and runs :func:`~mpnode.core.backward.run_adjoint`.
    """

    @staticmethod
    def forward(ctx, setup: _Setup, t, grid, y0, *params):
        ctx.setup = setup
        ctx.save_for_backward(*setup.store.saved_tensors())
        outputs = setup.outputs
        setup.outputs = None  # the outputs belong to autograd now
        return outputs

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx, grad_outputs):
        setup = ctx.setup
        problem, inputs, forward = setup.problem, setup.inputs, setup.forward
        saved = list(ctx.saved_tensors)  # after a pass without retain_graph: autograd's "backward ... a second time"
        refuse_batched_gradients(grad_outputs)
        forward.versions.check()
        trajectory = forward.trajectory
        retain = graph_retained()
        source = setup.store.source(trajectory, saved, forward.replay)
        need_t, need_grid, need_y0 = ctx.needs_input_grad[1:4]
        params = forward.params
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[4:4 + len(params)]) if need]
        problem.counters = SolverStats()
        known = [*params, *inputs.constants] if inputs.discover else None  # adjoint_params given: the rest is constant
        plan = BackwardPlan(problem, trajectory, [params[i] for i in wanted], known,
                            inputs.t.detach(), need_times=need_t or need_grid, retain_graph=retain)
        result = run_adjoint(plan, source, grad_outputs, setup.strategy.resolved_scaling(problem))
        if not retain:
            setup.store = None  # a direct strategy's graphs are freed with the rest of the graph
        t_grad = _output_time_gradient(result, inputs, trajectory, need_t, adaptive=inputs.grid is None)
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        for i, g in zip(wanted, result.param_grads):
            param_grads[i] = g
        if inputs.user_stats is not None:
            inputs.user_stats.add(problem.counters)
        problem.counters = SolverStats()
        grid_grad = result.grid_grad if need_grid else None
        watched = [None] * (len(ctx.needs_input_grad) - 4 - len(params))
        return (None, t_grad, grid_grad, result.lam0 if need_y0 else None, *param_grads, *watched)


def graph_retained() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``: backward may run through it again).

    The one place mpnode asks autograd's engine this (a private torch API that
    torch's own compiled-autograd code uses); where it is missing the graph counts
    as retained, which keeps the store until autograd frees the node.
    """
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _output_time_gradient(result, inputs: SolveInputs, trajectory: Trajectory, need_t: bool, adaptive: bool):
    """``dL/dt``: interpolation terms per output, plus (adaptive steps) the terms of the nodes that move with ``t[0]``."""
    if not need_t:
        return None
    grad = torch.zeros_like(inputs.t)
    for j, g in result.out_time.items():
        grad[j] += g.to(grad.dtype)
    if adaptive and result.grid_grad is not None:
        moving = result.grid_grad[: trajectory.anchored_from]  # tau_n = t[0] + constants before a step_t/jump_t mark
        grad[0] += moving.sum().to(grad.dtype)
    return grad
