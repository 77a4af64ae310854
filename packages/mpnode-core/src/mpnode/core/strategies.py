"""Adjoint strategies: the time/memory dial of what a solve keeps for its backward pass.

A strategy is passed as ``odeint(..., adjoint=...)``.  Every strategy runs the same
discrete adjoint ([`run_adjoint`][mpnode.core.backward.run_adjoint], gradient sums in high
precision, the same float16 scaling) and differs only in where each step's graph
comes from (the interface: [`AdjointStrategy`][mpnode.core.adjoint.AdjointStrategy]):

* [`DirectAdjoint`][mpnode.core.strategies.DirectAdjoint]: kept from the forward pass (no recomputation). Memory:
  every step's low-precision activations; time: about torchdiffeq's direct backprop.
* [`RecomputeAdjoint`][mpnode.core.strategies.RecomputeAdjoint] (the default): rebuilt in backward from one
  checkpoint per accepted step. Memory: ``N`` states; time: one extra graph-free forward.
* [`SegmentedAdjoint`][mpnode.core.strategies.SegmentedAdjoint]: rebuilt from checkpoints every ``k`` steps, each
  segment's states recomputed when backward reaches it. Memory: about
  ``N/k + k`` states; time: about two extra graph-free forwards.
* [`AutoAdjoint`][mpnode.core.strategies.AutoAdjoint]: the fastest of these whose held memory fits a byte budget,
  decided during the forward pass (it starts direct and falls back as memory grows);
  ``SolverStats.last_adjoint`` names the one used.

Each owns the checkpoint dtype and the adjoint scaling.  ``odeint``'s ``scaler=`` and
``options["checkpoint_dtype"]`` are shorthands for ``RecomputeAdjoint(checkpoint_dtype=...,
scaling=...)``.
"""

from __future__ import annotations

import math

import torch

from .adjoint import AdjointStrategy
from .backward import BackwardSteps
from .checkpoints import CheckpointRows, EveryStepCheckpoints, SparseCheckpoints, SparseRows
from .contracts import ForwardingRecorder, Kept, SavedReader, StepGraph, StoreSetup
from .meters import HeldMemory, held_memory
from .scaling import AdjointScaling
from .validation import check_number

__all__ = ["AdjointStrategy", "RecomputeAdjoint", "DirectAdjoint", "SegmentedAdjoint", "AutoAdjoint", "KeptGraphs"]


class RecomputeAdjoint(AdjointStrategy):
    """One checkpoint per accepted step; backward recomputes each step (discretize-then-optimize)."""

    name = "recompute"

    def keep(self, setup: StoreSetup) -> Kept:
        return EveryStepCheckpoints(setup)

    def start_state(self, saved: CheckpointRows, steps: BackwardSteps, n: int) -> torch.Tensor:
        return saved.state(n)

    def step_graph(self, saved: CheckpointRows, steps: BackwardSteps, n: int, with_end_slope: bool) -> StepGraph:
        return steps.rebuild(n, saved.state(n), saved.first_stage(n), with_end_slope)


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
    recomputes = False
    retains_graphs = True

    def keep(self, setup: StoreSetup) -> Kept:
        return KeptGraphs(setup.need_times)

    def start_state(self, saved: list[StepGraph], steps: BackwardSteps, n: int) -> torch.Tensor:
        return saved[n].y.detach()

    def step_graph(self, saved: list[StepGraph], steps: BackwardSteps, n: int, with_end_slope: bool) -> StepGraph:
        return saved[n]


class KeptGraphs(Kept):
    """Holds each accepted step's [`StepGraph`][mpnode.core.contracts.StepGraph] (they hold their own saved
    tensors); the backward pass reads the list of graphs."""

    def __init__(self, need_times: bool) -> None:
        self._need_times = need_times
        self.graphs: list[StepGraph] = []

    @property
    def keeps_graphs(self) -> bool:
        return True

    @property
    def need_times(self) -> bool:
        return self._need_times

    def keep(self, n: int, graph: StepGraph) -> None:
        self.graphs.append(graph)

    def finish(self) -> tuple[list[torch.Tensor], SavedReader]:
        graphs = self.graphs
        return [], lambda saved: graphs


class SegmentedAdjoint(AdjointStrategy):
    """Checkpoints every ``k`` accepted steps; backward recomputes one segment's states at a time.

    Args:
        checkpoints: the most checkpoints to hold between forward and backward
            (``k`` follows: ``ceil(N / checkpoints)`` for fixed grids; for adaptive
            steps ``k`` doubles, dropping every other checkpoint, whenever the count
            would exceed it).  Default: ``ceil(sqrt(N))`` for fixed grids (memory about
            ``2 sqrt(N)`` states), 64 for adaptive steps.
        checkpoint_dtype: dtype of the stored states (see [`AdjointStrategy`][mpnode.core.adjoint.AdjointStrategy]).
        scaling: adjoint scaling (see [`AdjointStrategy`][mpnode.core.adjoint.AdjointStrategy]).
        replay_rng: replay the forward's random numbers (see [`AdjointStrategy`][mpnode.core.adjoint.AdjointStrategy]).

    Held between forward and backward: at most ``checkpoints`` states; during
    backward, one segment's ``k`` states more.  Time: one extra graph-free forward
    beyond [`RecomputeAdjoint`][mpnode.core.strategies.RecomputeAdjoint], whose gradients it gives.
    """

    name = "segmented"

    def __init__(self, checkpoints: int | None = None, checkpoint_dtype: torch.dtype | None = None,
                 scaling: AdjointScaling | bool | None = None, replay_rng: bool = True) -> None:
        super().__init__(checkpoint_dtype, scaling, replay_rng)
        self.checkpoints = None if checkpoints is None else check_number("checkpoints", checkpoints, integer=True)

    def keep(self, setup: StoreSetup) -> Kept:
        budget = self.checkpoints
        if budget is None:
            budget = max(1, math.isqrt(setup.rows - 1) + 1) if setup.rows else 64
        return SparseCheckpoints(setup, budget)

    def start_state(self, saved: SparseRows, steps: BackwardSteps, n: int) -> torch.Tensor:
        return self._states(saved, steps, n)[0]

    def step_graph(self, saved: SparseRows, steps: BackwardSteps, n: int, with_end_slope: bool) -> StepGraph:
        y, first = self._states(saved, steps, n)
        return steps.rebuild(n, y, first, with_end_slope)

    @staticmethod
    def _states(saved: SparseRows, steps: BackwardSteps, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Step ``n``'s start state and carried first stage, from its segment's states: recomputed from the
        segment's checkpoint when backward first needs one of them (callbacks may ask before backward reaches the
        step, or after it left its segment)."""
        if n not in steps.cache:
            start, stop = saved.segment(n, steps.trajectory.n_steps)
            steps.cache = dict(zip(range(start, stop), steps.rerun(start, stop, *saved.kept[start])))
        return steps.cache[n]

    def __repr__(self) -> str:
        return f"SegmentedAdjoint(checkpoints={self.checkpoints}, checkpoint_dtype={self.checkpoint_dtype})"


class AutoAdjoint(AdjointStrategy):
    """The fastest strategy whose memory held between forward and backward fits ``budget_bytes``.

    Decided during the forward pass, so it works for adaptive steps too: it keeps
    step graphs (direct) while their saved bytes fit; past the budget it converts
    them to one checkpoint per step (recompute); if those no longer fit it keeps
    every ``k``-th (segmented, as many checkpoints as fit).  No step is evaluated
    twice for the decision.  ``SolverStats.last_adjoint`` names the strategy used,
    and the backward pass runs as that strategy.

    Args:
        budget_bytes: the most bytes to hold between forward and backward.
        checkpoint_dtype: dtype of stored states (see [`AdjointStrategy`][mpnode.core.adjoint.AdjointStrategy]).
        scaling: adjoint scaling (see [`AdjointStrategy`][mpnode.core.adjoint.AdjointStrategy]).
        replay_rng: replay the forward's random numbers (see [`AdjointStrategy`][mpnode.core.adjoint.AdjointStrategy]).
    """

    name = "auto"

    def __init__(self, budget_bytes: int, checkpoint_dtype: torch.dtype | None = None,
                 scaling: AdjointScaling | bool | None = None, replay_rng: bool = True) -> None:
        super().__init__(checkpoint_dtype, scaling, replay_rng)
        self.budget_bytes = check_number("budget_bytes", budget_bytes, integer=True, hint=" (bytes)")

    def keep(self, setup: StoreSetup) -> Kept:
        return _BudgetedKept(setup, self.budget_bytes)

    def used(self, kept: Kept) -> AdjointStrategy:
        assert isinstance(kept, _BudgetedKept)
        return kept.strategy

    def __repr__(self) -> str:
        return f"AutoAdjoint(budget_bytes={self.budget_bytes}, checkpoint_dtype={self.checkpoint_dtype})"


class _BudgetedKept(ForwardingRecorder[Kept], Kept):
    """Direct while the kept graphs fit the budget, then recompute, then segmented (``inner`` is what the current
    ``strategy`` keeps)."""

    def __init__(self, setup: StoreSetup, budget_bytes: int) -> None:
        self.setup = setup
        self.budget = budget_bytes
        self.strategy: AdjointStrategy = DirectAdjoint()
        self.inner: Kept = KeptGraphs(setup.need_times)
        self.meter: HeldMemory = held_memory(exclude=setup.params, chain=True)  # bytes the kept graphs hold
        self.carried: set[int] = set()  # steps whose first stage is carried (the others' are recomputable)
        self.replay_row_bytes = 0  # bytes per step of the field's in-place-modified buffers kept for their replay

    def graph_context(self) -> HeldMemory:
        return self.meter

    @property
    def row_bytes(self) -> int:
        """Bytes of one checkpoint row (in the dtype that follows the field, once it is known)."""
        return self.setup.width * (self.setup.settled_dtype() or self.setup.dtype).itemsize + self.replay_row_bytes

    def keep(self, n: int, graph: StepGraph) -> None:
        self.inner.keep(n, graph)
        if self.meter.bytes > self.budget:
            self._fall_back()

    def record(self, n: int, y: torch.Tensor, first_stage: torch.Tensor | None) -> None:
        if first_stage is not None:
            self.carried.add(n)
        if not self.inner.keeps_graphs:
            self.inner.record(n, y, first_stage)
            if isinstance(self.inner, EveryStepCheckpoints) and len(self.inner) * self.row_bytes > self.budget:
                self._to_segments()

    def finish(self) -> tuple[list[torch.Tensor], SavedReader]:
        return self.inner.finish()

    def count_row_bytes(self, nbytes: int) -> None:
        """Each recorded step also holds ``nbytes`` of the field's in-place-modified buffers (for their replay)."""
        self.replay_row_bytes += nbytes

    def _unsized(self) -> StoreSetup:
        return StoreSetup(**{**self.setup.__dict__, "rows": None})

    def _fall_back(self) -> None:
        """Turn the kept graphs into checkpoints (their start states) and stop keeping graphs."""
        assert isinstance(self.inner, KeptGraphs)
        checkpoints = EveryStepCheckpoints(self._unsized())
        for n, graph in enumerate(self.inner.graphs):
            first = graph.first.detach() if n in self.carried and graph.first is not None else None
            checkpoints.record(n, graph.y.detach(), first)
        self.strategy, self.inner = RecomputeAdjoint(), checkpoints
        if len(checkpoints) * self.row_bytes > self.budget:
            self._to_segments()

    def _to_segments(self) -> None:
        assert isinstance(self.inner, EveryStepCheckpoints)
        budget = max(1, self.budget // (self.row_bytes * (2 if self.setup.carries else 1)))
        segments = SparseCheckpoints(self._unsized(), budget)
        rows = self.inner.rows()
        for n in range(len(rows.states)):
            segments.record(n, rows.state(n), rows.first_stage(n))
        self.strategy, self.inner = SegmentedAdjoint(), segments
