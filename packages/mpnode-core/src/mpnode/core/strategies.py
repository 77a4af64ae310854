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
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .backward import BackwardPlan, StepSource, build_step_graph, run_adjoint
from .checkpoints import CheckpointStore
from .graphs import StepGraph
from .march import CARRIED, Problem, Recorder, Stepping, Trajectory, replay
from .scaling import AdjointScaling, NoAdjointScaling, default_scaling
from .stats import SolverStats
from .testing import held_memory


@dataclass
class SolveInputs:
    """The differentiable inputs of a solve and their host copies.

    Attributes:
        t: output times ``(T,)`` (float32/64).
        t_host: ``t`` on the host.
        grid: the fixed grid ``(N+1,)`` built from ``t`` (``None`` for adaptive steps).
        grid_host: ``grid`` on the host.
        y0: the flat initial state ``(D,)``.
        params: tensors ``func`` uses that receive gradients.
        needs_grad: whether any input needs a gradient (else nothing is kept).
        user_stats: the caller's :class:`SolverStats` (updated when a pass completes), or ``None``.
    """

    t: torch.Tensor
    t_host: torch.Tensor
    grid: torch.Tensor | None
    grid_host: torch.Tensor | None
    y0: torch.Tensor
    params: list[torch.Tensor]
    needs_grad: bool
    user_stats: SolverStats | None


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

    def saved_tensors(self) -> list[torch.Tensor]:
        """Tensors to hand to ``save_for_backward`` (checkpoints)."""
        return []

    @abc.abstractmethod
    def source(self, trajectory: Trajectory, saved: list[torch.Tensor]) -> StepSource:
        """Where backward gets the step graphs (``saved``: the tensors given by :meth:`saved_tensors`)."""


class AdjointStrategy(abc.ABC):
    """What a solve keeps for backward and how backward gets each step's graph back.

    Args:
        checkpoint_dtype: dtype of stored states; ``None`` = the autocast dtype under
            autocast, else the state's dtype.
        scaling: adjoint scaling for float16 backward passes: an ``AdjointScaling``
            (e.g. ``mpnode.scaler.DynamicAdjointScaler()``), ``None`` = automatic (the
            registered float16 default when float16 is involved, none otherwise),
            ``False`` = none.
    """

    name: str = "adjoint"

    def __init__(self, checkpoint_dtype: torch.dtype | None = None, scaling: AdjointScaling | bool | None = None) -> None:
        self.checkpoint_dtype = _check_checkpoint_dtype(checkpoint_dtype)
        self.scaling = _check_scaling(scaling)

    @abc.abstractmethod
    def new_store(self, setup: StoreSetup) -> StepStore:
        """A fresh store for one solve."""

    def resolved_checkpoint_dtype(self, problem: Problem) -> torch.dtype:
        policy = problem.policy
        return self.checkpoint_dtype or policy.autocast_dtype or policy.state_dtype

    def resolved_scaling(self, problem: Problem) -> AdjointScaling:
        if isinstance(self.scaling, AdjointScaling):
            return self.scaling
        float16 = torch.float16 in (problem.policy.autocast_dtype, self.resolved_checkpoint_dtype(problem))
        if self.scaling is None:
            return default_scaling(float16)
        return NoAdjointScaling(raise_on_nonfinite=float16)

    def solve(self, problem: Problem, stepping: Stepping, inputs: SolveInputs) -> torch.Tensor:
        """Run the forward pass; returns the ``(T, D)`` outputs, differentiable when an input needs a gradient."""
        if not inputs.needs_grad:
            nfe0 = problem.field.nfe
            with torch.no_grad(), problem.policy.autocast():
                outputs, trajectory = stepping.march(
                    problem, inputs.y0, inputs.t, inputs.t_host, inputs.grid, inputs.grid_host, Recorder()
                )
            _commit_forward(problem, trajectory, inputs.user_stats, self.name, nfe0)
            return outputs
        return _AdjointFunction.apply(_Setup(self, problem, stepping, inputs), inputs.t, inputs.grid, inputs.y0,
                                      *inputs.params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(checkpoint_dtype={self.checkpoint_dtype}, scaling={self.scaling!r})"


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

    def saved_tensors(self):
        states = self.states.finish()
        self._n_state_chunks = len(states)
        return states + (self.first_stages.finish() if self.first_stages is not None else [])

    def source(self, trajectory, saved):
        k = self._n_state_chunks
        return RecomputedSteps(trajectory, saved[:k], saved[k:], self.first_stage_row)


class RecomputedSteps(StepSource):
    """Rebuilds each step's graph from the checkpoints saved for backward."""

    def __init__(self, trajectory: Trajectory, state_chunks: list[torch.Tensor], first_chunks: list[torch.Tensor],
                 first_row: dict[int, int]) -> None:
        self.trajectory = trajectory
        self.state_chunks, self.first_chunks, self.first_row = state_chunks, first_chunks, first_row

    def state(self, n):
        return CheckpointStore.row(self.state_chunks, n)

    def first_is_input(self, n):
        return self.trajectory.first_stage[n] == CARRIED

    def graph(self, plan, n, with_end_slope):
        first = CheckpointStore.row(self.first_chunks, self.first_row[n]) if self.first_is_input(n) else None
        return build_step_graph(plan, n, self.state(n), first, with_end_slope)


# -- direct ------------------------------------------------------------------------------------------


class DirectAdjoint(AdjointStrategy):
    """Keeps every step's graph from the forward pass: no recomputation, the most memory.

    The field's activations are stored in the autocast dtype; the state, the adjoint
    and every gradient sum stay in high precision, because backward still takes one
    vector-Jacobian product per step and sums them in ``y0``'s (parameters') dtype.
    Under autocast the forward runs with the weight-cast cache off, so each
    evaluation's weight gradient is converted to the weight's dtype before any sum
    (one low-precision weight copy is held per evaluation).  ``checkpoint_dtype`` has
    no role here.
    """

    name = "direct"

    def new_store(self, setup):
        return KeptGraphs(setup.need_times)


class KeptGraphs(StepStore):
    """Holds each accepted step's :class:`StepGraph`."""

    name = "direct"
    keeps_graphs = True
    disable_cast_cache = True

    def __init__(self, need_times: bool) -> None:
        self.need_times = need_times
        self.graphs: list[StepGraph] = []

    def keep(self, n, graph):
        self.graphs.append(graph)

    def source(self, trajectory, saved):
        return KeptSteps(self.graphs)


class KeptSteps(StepSource):
    """Hands out the graphs the forward kept (retained while a scaled block may be redone)."""

    retain_graphs = True

    def __init__(self, graphs: list[StepGraph]) -> None:
        self.graphs = graphs

    def state(self, n):
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

    Held between forward and backward: at most ``checkpoints`` states; during
    backward, one segment's ``k`` states more.  Time: one extra graph-free forward
    beyond :class:`RecomputeAdjoint`.  Gradients equal :class:`RecomputeAdjoint`'s.
    """

    name = "segmented"

    def __init__(self, checkpoints: int | None = None, checkpoint_dtype: torch.dtype | None = None,
                 scaling: AdjointScaling | bool | None = None) -> None:
        super().__init__(checkpoint_dtype, scaling)
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
        row = y.to(self.setup.dtype, copy=True)
        first = None if first_stage is None else first_stage.to(self.setup.dtype, copy=True)
        self.kept[n] = (row, first)
        while len(self.kept) > self.budget:  # adaptive steps: thin to every other checkpoint
            self.every *= 2
            self.kept = {m: v for m, v in self.kept.items() if m % self.every == 0}

    def saved_tensors(self):
        self.index = sorted(self.kept)
        out = [self.kept[m][0] for m in self.index]
        self.has_first = [self.kept[m][1] is not None for m in self.index]
        out += [self.kept[m][1] for m in self.index if self.kept[m][1] is not None]
        self.kept = {}
        return out

    def source(self, trajectory, saved):
        count = len(self.index)
        states, firsts = saved[:count], iter(saved[count:])
        kept = {m: (states[i], next(firsts) if has else None) for i, (m, has) in enumerate(zip(self.index, self.has_first))}
        return SegmentReplay(trajectory, kept)


class SegmentReplay(StepSource):
    """Rebuilds a segment's states from its checkpoint when backward first needs one of its steps."""

    def __init__(self, trajectory: Trajectory, kept: dict[int, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self.trajectory = trajectory
        self.kept = kept
        self.starts = sorted(kept)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.plan: BackwardPlan | None = None

    def _segment(self, plan: BackwardPlan, n: int) -> None:
        start = max(m for m in self.starts if m <= n)
        later = [m for m in self.starts if m > start]
        stop = later[0] if later else self.trajectory.n_steps
        y, first = self.kept[start]
        state_dtype = plan.problem.policy.state_dtype
        with torch.no_grad():
            states = replay(plan.problem, self.trajectory, plan.stage_times, start, stop, y.to(state_dtype),
                            None if first is None else first.to(state_dtype))
        self.cache = dict(zip(range(start, stop), states))

    def state(self, n):
        if n in self.cache:
            return self.cache[n][0]
        return self.kept[n][0] if n in self.kept else None

    def first_is_input(self, n):
        return self.trajectory.first_stage[n] == CARRIED

    def graph(self, plan, n, with_end_slope):
        if n not in self.cache:
            self._segment(plan, n)
        y, first = self.cache[n]
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
    """

    name = "auto"

    def __init__(self, budget_bytes: int, checkpoint_dtype: torch.dtype | None = None,
                 scaling: AdjointScaling | bool | None = None) -> None:
        super().__init__(checkpoint_dtype, scaling)
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be a positive int (bytes), got {budget_bytes!r}")
        self.budget_bytes = budget_bytes

    def new_store(self, setup):
        return BudgetedStore(setup, self.budget_bytes)

    def __repr__(self) -> str:
        return f"AutoAdjoint(budget_bytes={self.budget_bytes}, checkpoint_dtype={self.checkpoint_dtype})"


class BudgetedStore(StepStore):
    """Direct while the kept graphs fit the budget, then recompute, then segmented."""

    def __init__(self, setup: StoreSetup, budget_bytes: int) -> None:
        self.setup = setup
        self.budget = budget_bytes
        self.row_bytes = setup.width * setup.dtype.itemsize
        self.inner: StepStore = KeptGraphs(setup.need_times)
        self.meter = held_memory(exclude=setup.params)  # bytes the kept graphs hold, weights excluded
        self.carried: set[int] = set()  # steps whose first stage is carried (the others' are recomputable)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def keeps_graphs(self) -> bool:
        return self.inner.keeps_graphs

    @property
    def need_times(self) -> bool:
        return self.setup.need_times

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
        chunks = old.states.finish()
        firsts = old.first_stages.finish() if old.first_stages is not None else []
        for n in range(len(old.states)):
            first = CheckpointStore.row(firsts, old.first_stage_row[n]) if n in old.first_stage_row else None
            segments.record(n, CheckpointStore.row(chunks, n), first)
        self.inner = segments

    def saved_tensors(self):
        return self.inner.saved_tensors()

    def source(self, trajectory, saved):
        return self.inner.source(trajectory, saved)


# -- the autograd Function shared by every strategy ----------------------------------------------------


def _commit_forward(problem: Problem, trajectory: Trajectory, user_stats: SolverStats | None, name: str,
                    nfe0: int) -> None:
    """Add a completed forward pass's counters to the caller's stats."""
    counters = problem.counters
    counters.nfe_forward += problem.field.nfe - nfe0
    counters.steps += trajectory.n_steps
    counters.rejected_steps += trajectory.rejected
    counters.last_grid = tuple(trajectory.nodes)
    counters.last_adjoint = name
    if user_stats is not None:
        user_stats.add(counters)
    problem.counters = SolverStats()


@dataclass
class _Setup:
    strategy: AdjointStrategy
    problem: Problem
    stepping: Stepping
    inputs: SolveInputs


class _AdjointFunction(torch.autograd.Function):
    """``apply(setup, t, grid, y0, *params) -> (T, D)`` outputs; backward by the strategy's step source.

    Saved for backward (through ``save_for_backward``): the strategy's checkpoints;
    a direct strategy's graphs hold their own saved tensors.
    """

    @staticmethod
    def forward(ctx, setup: _Setup, t, grid, y0, *params):
        problem, stepping, inputs, strategy = setup.problem, setup.stepping, setup.inputs, setup.strategy
        fixed = inputs.grid_host is not None  # the number of steps is known before the march
        store = strategy.new_store(StoreSetup(
            width=y0.shape[0], dtype=strategy.resolved_checkpoint_dtype(problem), device=y0.device,
            rows=inputs.grid_host.numel() - 1 if fixed else None,
            carries=not fixed and problem.tableau.carries_first_stage,
            need_times=ctx.needs_input_grad[1] or ctx.needs_input_grad[2], params=tuple(params),
        ))
        nfe0 = problem.field.nfe
        with problem.policy.autocast(cache_enabled=not getattr(store, "disable_cast_cache", False)):
            outputs, trajectory = stepping.march(problem, y0, inputs.t, inputs.t_host, inputs.grid, inputs.grid_host,
                                                 store)
        ctx.setup, ctx.trajectory, ctx.store = setup, trajectory, store
        ctx.save_for_backward(*store.saved_tensors())
        _commit_forward(problem, trajectory, inputs.user_stats, store.name, nfe0)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_outputs):
        setup, trajectory, store = ctx.setup, ctx.trajectory, ctx.store
        problem, inputs = setup.problem, setup.inputs
        source = store.source(trajectory, list(ctx.saved_tensors))
        need_t, need_grid, need_y0 = ctx.needs_input_grad[1:4]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[4:]) if need]
        problem.counters = SolverStats()
        plan = BackwardPlan(problem, trajectory, [inputs.params[i] for i in wanted], inputs.params, inputs.t.detach(),
                            need_times=need_t or need_grid)
        result = run_adjoint(plan, source, grad_outputs, setup.strategy.resolved_scaling(problem))
        ctx.store = None  # a direct strategy's graphs are not needed any more
        t_grad = _output_time_gradient(result, inputs, trajectory, need_t, adaptive=inputs.grid is None)
        param_grads: list[torch.Tensor | None] = [None] * len(inputs.params)
        for i, g in zip(wanted, result.param_grads):
            param_grads[i] = g
        if inputs.user_stats is not None:
            inputs.user_stats.add(problem.counters)
        problem.counters = SolverStats()
        grid_grad = result.grid_grad if need_grid else None
        return (None, t_grad, grid_grad, result.lam0 if need_y0 else None, *param_grads)


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
