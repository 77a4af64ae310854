"""Adjoint strategies: how a solve keeps what its backward pass needs.

A strategy is passed as ``odeint(..., adjoint=...)`` and owns the checkpoint
dtype and the adjoint scaling of the solves it runs:

* :class:`RecomputeAdjoint` (the default): one checkpoint of the state per
  accepted step; backward rebuilds each step from its checkpoint and applies the
  discrete adjoint recurrence (:mod:`mpnode.core.backward`).  Time: about one
  extra graph-free forward; memory: ``N`` checkpoints.

``odeint``'s ``scaler=`` and ``options["checkpoint_dtype"]`` are shorthands for
``RecomputeAdjoint(checkpoint_dtype=..., scaling=...)``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from .backward import BackwardPlan, StepGraph, StepSource, build_step_graph, run_adjoint
from .checkpoints import CheckpointStore, StoredRows
from .forward import TrackedForward, tracked_forward
from .guards import check_solution, first_order_only
from .march import CARRIED, AdaptiveStepping, Problem, Recorder, Stepping, Trajectory
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
        constants: grad-requiring tensors ``func`` may use that get no gradient
            (module parameters left out of ``adjoint_params``).
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


class AdjointStrategy(abc.ABC):
    """What a solve keeps for backward and how backward uses it."""

    #: label reported in ``SolverStats.last_adjoint``.
    name: str = "adjoint"

    @abc.abstractmethod
    def solve(self, problem: Problem, stepping: Stepping, inputs: SolveInputs) -> torch.Tensor:
        """Run the forward pass and return the ``(T, D)`` outputs, differentiable as this strategy provides."""


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
        raise TypeError(
            f"checkpoint_dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}"
        )
    return dtype


def _check_scaling(scaling: object) -> AdjointScaling | bool | None:
    if scaling is None or scaling is False or isinstance(scaling, AdjointScaling):
        return scaling
    raise TypeError(
        "scaler must be an mpnode.core.AdjointScaling (e.g. mpnode.scaler.DynamicAdjointScaler()), None or False; "
        f"got {scaling!r}"
    )


class RecomputeAdjoint(AdjointStrategy):
    """One checkpoint per accepted step; backward recomputes each step (discretize-then-optimize).

    Args:
        checkpoint_dtype: dtype of the stored states; ``None`` = the autocast dtype
            under autocast, else the state's dtype.
        scaling: adjoint scaling for float16 backward passes: an ``AdjointScaling``
            (e.g. ``mpnode.scaler.DynamicAdjointScaler()``), ``None`` = automatic
            (the registered float16 default when float16 is involved, none
            otherwise), ``False`` = none.
        replay_rng: replay the forward's random numbers in each recomputed step
            (dropout, ``torch.randn`` in ``func``), as ``torch.utils.checkpoint``
            does; ``False`` skips the per-step generator bookkeeping and lets the
            recomputation draw fresh numbers (gradients of another noise draw).
    """

    name = "recompute"

    def __init__(self, checkpoint_dtype: torch.dtype | None = None, scaling: AdjointScaling | bool | None = None,
                 replay_rng: bool = True) -> None:
        self.checkpoint_dtype = _check_checkpoint_dtype(checkpoint_dtype)
        self.scaling = _check_scaling(scaling)
        if not isinstance(replay_rng, bool):
            raise TypeError(f"replay_rng must be True or False, got {replay_rng!r}")
        self.replay_rng = replay_rng

    def __repr__(self) -> str:
        return (f"RecomputeAdjoint(checkpoint_dtype={self.checkpoint_dtype}, scaling={self.scaling!r}, "
                f"replay_rng={self.replay_rng})")

    def resolved_checkpoint_dtype(self, problem: Problem) -> torch.dtype:
        policy = problem.policy
        return self.checkpoint_dtype or policy.autocast_dtype or policy.state_dtype

    def resolved_scaling(self, problem: Problem) -> AdjointScaling:
        if isinstance(self.scaling, AdjointScaling):
            return self.scaling
        float16 = torch.float16 in (problem.policy.autocast_dtype, self.resolved_checkpoint_dtype(problem))
        if self.scaling is None:
            return default_scaling(float16)
        return NoAdjointScaling(raise_on_nonfinite=float16, advice=SCALING_TURNED_OFF_ADVICE)

    def solve(self, problem, stepping, inputs):
        if not inputs.needs_grad:
            return _solve_without_graph(problem, stepping, inputs, self.name)
        fixed = not isinstance(stepping, AdaptiveStepping)
        recorder = CheckpointRecorder(
            inputs.y0.shape[0], self.resolved_checkpoint_dtype(problem), inputs.y0.device,
            inputs.grid_host.numel() - 1 if fixed else None, not fixed and problem.tableau.carries_first_stage,
        )
        outputs, forward = tracked_forward(problem, stepping, inputs, recorder, self.replay_rng)
        if not (forward.needs_grad or any(x is not None and x.requires_grad for x in (inputs.t, inputs.grid, inputs.y0))):
            _commit_forward(problem, forward.trajectory, inputs.user_stats, self.name, forward.nfe0)
            return outputs  # nothing turned out to need a gradient
        setup = _RecomputeSetup(self, problem, inputs, forward, recorder.finish(), outputs)
        outputs = _RecomputeFunction.apply(setup, inputs.t, inputs.grid, inputs.y0, *forward.params)
        _commit_forward(problem, forward.trajectory, inputs.user_stats, self.name, forward.nfe0)
        return outputs


def _solve_without_graph(problem: Problem, stepping: Stepping, inputs: SolveInputs, name: str) -> torch.Tensor:
    """A solve nothing will differentiate: march under ``no_grad``, keep nothing."""
    nfe0 = problem.field.nfe
    with torch.no_grad(), problem.policy.autocast():
        outputs, trajectory = stepping.march(
            problem, inputs.y0, inputs.t, inputs.t_host, inputs.grid, inputs.grid_host, Recorder()
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
    counters.last_grid = tuple(trajectory.nodes)
    counters.last_adjoint = name
    if user_stats is not None:
        user_stats.add(counters)
    problem.counters = SolverStats()


class CheckpointRecorder(Recorder):
    """Stores every accepted step's start state (and carried first stage) in ``checkpoint_dtype``."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device, rows: int | None, carries: bool) -> None:
        self.states = CheckpointStore(width, dtype, device, rows)
        self.first_stages = CheckpointStore(width, dtype, device) if carries else None
        self.first_stage_row: dict[int, int] = {}

    def record(self, n, y, first_stage):
        self.states.append(y)
        if first_stage is not None:
            self.first_stage_row[n] = len(self.first_stages)
            self.first_stages.append(first_stage)

    def finish(self) -> "RecordedCheckpoints":
        firsts = self.first_stages.finish() if self.first_stages is not None else StoredRows([])
        return RecordedCheckpoints(self.states.finish(), firsts, dict(self.first_stage_row))


@dataclass
class RecordedCheckpoints:
    """The rows a :class:`CheckpointRecorder` kept: states, carried first stages, and each carried step's row."""

    states: StoredRows
    first_stages: StoredRows
    first_row: dict[int, int]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.states.tensors(), *self.first_stages.tensors()]

    def layout(self) -> tuple:
        return (len(self.states.chunks), self.states.scales is not None, len(self.first_stages.chunks),
                self.first_stages.scales is not None, self.first_row)

    @classmethod
    def from_saved(cls, saved: tuple[torch.Tensor, ...], layout: tuple) -> "RecordedCheckpoints":
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

    def state(self, n):
        return self.checkpoints.states.row(n)

    def first_is_input(self, n):
        return self.trajectory.first_stage[n] == CARRIED

    def graph(self, plan: BackwardPlan, n: int, with_end_slope: bool) -> StepGraph:
        first = self.checkpoints.first_stages.row(self.checkpoints.first_row[n]) if self.first_is_input(n) else None
        times = None if plan.need_times else plan.stage_times[n]
        self.replay.before_step(n)
        return build_step_graph(plan.problem, self.trajectory, n, self.state(n), first, plan.need_times, times,
                                with_end_slope)


@dataclass
class _RecomputeSetup:
    strategy: RecomputeAdjoint
    problem: Problem
    inputs: SolveInputs
    forward: TrackedForward
    checkpoints: RecordedCheckpoints | None
    outputs: torch.Tensor | None  # handed to autograd by forward, then dropped (no reference cycle)


class _RecomputeFunction(torch.autograd.Function):
    """``apply(setup, t, grid, y0, *params) -> (T, D)`` outputs; backward by recomputation.

    The march has already run (:func:`~mpnode.core.forward.tracked_forward`);
    ``forward`` saves the checkpoint chunks through ``save_for_backward`` (``N`` rows
    of ``D`` in the checkpoint dtype, plus one float32 scale per row for float16
    checkpoints) and, for methods that carry their first stage, one more row per
    carried step; nothing per stage.
    """

    @staticmethod
    def forward(ctx, setup: _RecomputeSetup, t, grid, y0, *params):
        ctx.setup = setup
        ctx.layout = setup.checkpoints.layout()
        ctx.save_for_backward(*setup.checkpoints.tensors())
        outputs = setup.outputs
        setup.checkpoints = setup.outputs = None  # backward reads the saved tensors; the outputs belong to autograd
        return outputs

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx, grad_outputs):
        setup = ctx.setup
        problem, inputs, forward = setup.problem, setup.inputs, setup.forward
        forward.versions.check()
        trajectory = forward.trajectory
        source = RecomputedSteps(trajectory, RecordedCheckpoints.from_saved(ctx.saved_tensors, ctx.layout),
                                 forward.replay)
        need_t, need_grid, need_y0 = ctx.needs_input_grad[1:4]
        params = forward.params
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[4:]) if need]
        problem.counters = SolverStats()
        plan = BackwardPlan(problem, trajectory, [params[i] for i in wanted], [*params, *inputs.constants],
                            inputs.t.detach(), need_times=need_t or need_grid)
        result = run_adjoint(plan, source, grad_outputs, setup.strategy.resolved_scaling(problem))
        t_grad = _output_time_gradient(result, inputs, trajectory, need_t, adaptive=inputs.grid is None)
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        for i, g in zip(wanted, result.param_grads):
            param_grads[i] = g
        if inputs.user_stats is not None:
            inputs.user_stats.add(problem.counters)
        problem.counters = SolverStats()
        grid_grad = result.grid_grad if need_grid else None
        return (None, t_grad, grid_grad, result.lam0 if need_y0 else None, *param_grads)


def _output_time_gradient(result, inputs: SolveInputs, trajectory: Trajectory, need_t: bool, adaptive: bool):
    """``dL/dt``: interpolation terms per output, plus (adaptive steps) every node's term on ``t[0]``."""
    if not need_t:
        return None
    grad = torch.zeros_like(inputs.t)
    for j, g in result.out_time.items():
        grad[j] += g.to(grad.dtype)
    if adaptive and result.grid_grad is not None:
        grad[0] += result.grid_grad.sum().to(grad.dtype)  # tau_n = t[0] + constants
    return grad
