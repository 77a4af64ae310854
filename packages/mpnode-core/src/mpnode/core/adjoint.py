"""The adjoint-strategy interface, and the autograd Function every strategy's solve goes through.

An [`AdjointStrategy`][mpnode.core.adjoint.AdjointStrategy] is one class that says

* what it keeps from the forward pass: ``keep(setup)`` returns a fresh [`Kept`][mpnode.core.contracts.Kept] per
  solve, which the march fills step by step and which hands its tensors to autograd when the march ends;
* how it gets a step's graph back in the backward pass: ``step_graph(saved, steps, n, with_end_slope)`` (and
  ``start_state`` for the adjoint callbacks), where ``saved`` is what it kept, read back for this pass, and
  ``steps`` a [`BackwardSteps`][mpnode.core.backward.BackwardSteps] offering the means to rebuild a step.

Everything else is shared: [`solve`][mpnode.core.adjoint.AdjointStrategy.solve] runs the tracked march
([`tracked_forward`][mpnode.core.forward.tracked_forward]) and attaches the one discrete adjoint
([`run_adjoint`][mpnode.core.backward.run_adjoint]); each strategy owns its checkpoint dtype and adjoint scaling.
The built-in strategies are in [`mpnode.core.strategies`][mpnode.core.strategies].
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .backward import AdjointResult, BackwardPlan, BackwardSteps, run_adjoint
from .contracts import Kept, Problem, SavedReader, SolveInputs, StepGraph, StoreSetup, Trajectory
from .forward import TrackedForward, forget_cached_casts, tracked_forward
from .guards import check_solution, first_order_only, refuse_batched_gradients
from .march import March
from .parameters import reachable_grad_tensors
from .scaling import AdjointScaling, NoAdjointScaling, default_scaling
from .stats import SolverStats
from .step import KEEP_NOTHING
from .validation import check_flag

#: What an unscaled float16 overflow says when the user turned scaling off.
SCALING_TURNED_OFF_ADVICE = (
    "adjoint scaling is off (scaler=False / scaling=False). Drop that argument so float16 solves use the default "
    "scaler (mpnode-scaler's DynamicAdjointScaler, when installed), or pass "
    "scaler=mpnode.scaler.DynamicAdjointScaler(), "
    "or autocast to torch.bfloat16."
)


class AdjointStrategy(abc.ABC):
    """What a solve keeps for backward and how backward gets each step's graph back.

    Subclasses set ``name`` (``SolverStats.last_adjoint``) and implement ``keep``, ``step_graph`` and
    ``start_state``; ``recomputes`` says whether backward evaluates the field again (then the forward's random
    numbers are tracked for replay) and ``retains_graphs`` whether the graphs handed to backward are the forward's
    own (their VJPs then retain them while a scaled block may be redone).

    Args:
        checkpoint_dtype: dtype of stored states; ``None`` = the autocast dtype for a
            float32 state under autocast when the field's first evaluation shows it runs in that dtype, else the
            state's dtype (autocast never lowers float64, nor the ops it keeps in float32).
            float16 rows are stored scaled by a power of two each (no range loss).
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
    recomputes: bool = True
    retains_graphs: bool = False

    def __init__(self, checkpoint_dtype: torch.dtype | None = None, scaling: AdjointScaling | bool | None = None,
                 replay_rng: bool = True) -> None:
        self.checkpoint_dtype = _check_checkpoint_dtype(checkpoint_dtype)
        self.scaling = _check_scaling(scaling)
        self.replay_rng = check_flag("replay_rng", replay_rng)

    # -- what a strategy says ----------------------------------------------------------------------------

    @abc.abstractmethod
    def keep(self, setup: StoreSetup) -> Kept:
        """What this strategy keeps from one forward pass: a fresh recorder, filled by the march."""

    def step_graph(self, saved: Any, steps: BackwardSteps, n: int, with_end_slope: bool) -> StepGraph:
        """Step ``n``'s graph for the backward pass, from ``saved`` (what ``keep``'s recorder kept, read back for
        this pass); ``with_end_slope``: the graph must include ``f(tau_{n+1}, y_{n+1})``."""
        raise NotImplementedError(f"{type(self).__name__} does not say how it rebuilds a step's graph")

    def start_state(self, saved: Any, steps: BackwardSteps, n: int) -> torch.Tensor:
        """Step ``n``'s start state as kept or recomputed (handed to the adjoint callbacks)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how it finds a step's start state")

    def used(self, kept: Kept) -> AdjointStrategy:
        """The strategy the backward pass of the solve that filled ``kept`` runs as (itself; ``AutoAdjoint``: the
        one it settled on)."""
        return self

    # -- shared ---------------------------------------------------------------------------------------

    def resolved_checkpoint_dtype(self, problem: Problem) -> torch.dtype:
        """``checkpoint_dtype``, else the policy's for the precision the field was found to run in (before its first
        evaluation: the autocast dtype for a float32 state)."""
        return self.checkpoint_dtype or problem.policy.checkpoint_dtype_for(problem.field.precision)

    def resolved_scaling(self, problem: Problem) -> AdjointScaling:
        if isinstance(self.scaling, AdjointScaling):
            return self.scaling
        float16 = torch.float16 in (problem.policy.lowered_dtype, self.resolved_checkpoint_dtype(problem))
        if self.scaling is None:
            return default_scaling(float16)
        return NoAdjointScaling(raise_on_nonfinite=float16, advice=SCALING_TURNED_OFF_ADVICE)

    def solve(self, problem: Problem, march: March, inputs: SolveInputs) -> torch.Tensor:
        """Run the forward pass; returns the ``(T, D)`` outputs, differentiable when an input needs a gradient.

        The march runs first ([`tracked_forward`][mpnode.core.forward.tracked_forward]: captured
        tensors found on the first evaluation, random states and versions recorded,
        the solution checked), then the autograd Function attaches the backward.
        """
        if not inputs.needs_grad:
            return _solve_without_graph(problem, march, inputs, self.name)
        kept = self.keep(self._store_setup(problem, inputs))
        outputs, forward = tracked_forward(problem, march, inputs, kept, self.replay_rng and self.recomputes)
        used = self.used(kept)
        differentiable = forward.needs_grad or any(
            x is not None and x.requires_grad for x in (inputs.t, inputs.grid, inputs.y0)
        )
        # nothing differentiated, but func may read a grad-requiring tensor later in the solve: keep a graph through
        # it, so that backward's per-step check refuses it rather than the output silently having no graph
        known = [*forward.params, *inputs.constants]
        watched = [] if differentiable else reachable_grad_tensors(problem.field.func, known)
        if differentiable or watched:
            tensors, read = kept.finish()
            setup = _Setup(self, used, problem, inputs, forward, read, tensors, outputs)
            outputs = _AdjointFunction.apply(setup, inputs.t, inputs.grid, inputs.y0, *forward.params, *watched)
        _commit_forward(problem, forward.trajectory, inputs.user_stats, used.name, forward.nfe0)
        return outputs

    def _store_setup(self, problem: Problem, inputs: SolveInputs) -> StoreSetup:
        fixed = inputs.grid_host is not None  # the number of steps is known before the march
        return StoreSetup(
            width=inputs.y0.shape[0], dtype=self.resolved_checkpoint_dtype(problem), device=inputs.y0.device,
            rows=inputs.grid_host.numel() - 1 if inputs.grid_host is not None else None,
            carries=not fixed and problem.tableau.carries_first_stage,
            need_times=inputs.times_need_grad, params=tuple(inputs.params), follow_field=self._follow_field(problem),
        )

    def _follow_field(self, problem: Problem) -> Callable[[], torch.dtype | None] | None:
        """By default under autocast, checkpoints follow what the field turns out to run in (``StoreSetup``)."""
        field, policy = problem.field, problem.policy
        if self.checkpoint_dtype is not None or policy.lowered_dtype is None:
            return None

        def settled() -> torch.dtype | None:
            return None if field.precision is None else policy.checkpoint_dtype_for(field.precision)

        return settled

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(checkpoint_dtype={self.checkpoint_dtype}, scaling={self.scaling!r}, "
                f"replay_rng={self.replay_rng})")


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
        "scaler must be an mpnode.core.AdjointScaling (e.g. mpnode.scaler.DynamicAdjointScaler()), None "
        f"or False; got {scaling!r}"
    )


# -- the autograd Function shared by every strategy ----------------------------------------------------


def _solve_without_graph(problem: Problem, march: March, inputs: SolveInputs, name: str) -> torch.Tensor:
    """A solve nothing will differentiate: march under ``no_grad`` from a copy of ``y0``, keep nothing."""
    nfe0 = problem.field.nfe
    forget_cached_casts(problem.policy)
    with torch.no_grad(), problem.policy.autocast():
        outputs, trajectory = march.march(problem, inputs, inputs.y0.detach().clone(), KEEP_NOTHING)
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
    """What the autograd Function of one solve holds between forward and backward.

    ``read`` turns the saved tensors back into what ``used`` reads (``None`` once a backward pass without
    ``retain_graph`` has run: a direct strategy's graphs are freed with it); ``tensors`` and ``outputs`` are handed
    to autograd by ``forward`` and then dropped (no reference cycle)."""

    strategy: AdjointStrategy
    used: AdjointStrategy
    problem: Problem
    inputs: SolveInputs
    forward: TrackedForward
    read: SavedReader | None
    tensors: list[torch.Tensor] | None
    outputs: torch.Tensor | None


class _AdjointFunction(torch.autograd.Function):
    """``apply(setup, t, grid, y0, *params, *watched) -> (T, D)`` outputs; backward by the strategy's step graphs.

    ``watched``: grad-requiring tensors ``func`` may read that the solve does not
    differentiate (they give the output its graph; they get no gradient, and backward
    raises if a step uses one).

    The march has already run ([`tracked_forward`][mpnode.core.forward.tracked_forward]);
    ``forward`` saves the strategy's checkpoints through ``save_for_backward`` (float16
    rows with one float32 scale each); a direct strategy's graphs hold their own saved
    tensors.  Backward checks the version counters of everything the steps read,
    refuses second derivatives, and runs [`run_adjoint`][mpnode.core.backward.run_adjoint].
    """

    @staticmethod
    def forward(ctx: Any, setup: _Setup, t: torch.Tensor, grid: torch.Tensor | None, y0: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.setup = setup
        ctx.save_for_backward(*(setup.tensors or ()))
        outputs = setup.outputs
        assert outputs is not None, "a setup is applied once"
        setup.tensors = setup.outputs = None  # they belong to autograd now
        return outputs

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        setup: _Setup = ctx.setup
        problem, inputs, forward = setup.problem, setup.inputs, setup.forward
        saved = list(ctx.saved_tensors)  # after a pass without retain_graph: autograd's "backward ... a second time"
        refuse_batched_gradients(grad_outputs)
        forward.versions.check()
        retain = graph_retained()
        need_t, need_grid, _need_y0 = ctx.needs_input_grad[1:4]
        params = forward.params
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[4:4 + len(params)]) if need]
        problem.counters = SolverStats()
        known = [*params, *inputs.constants] if inputs.discover else None  # adjoint_params given: the rest is constant
        plan = BackwardPlan(problem, forward.trajectory, [params[i] for i in wanted], known,
                            inputs.t.detach(), need_times=need_t or need_grid, retain_graph=retain)
        assert setup.read is not None, "autograd refuses a second backward through a freed graph first"
        steps = BackwardSteps(setup.used, setup.read(saved), plan, forward.replay)
        result = run_adjoint(plan, steps, grad_outputs, setup.strategy.resolved_scaling(problem))
        if not retain:
            setup.read = None  # a direct strategy's graphs are freed with the rest of the graph
        if inputs.user_stats is not None:
            inputs.user_stats.add(problem.counters)
        problem.counters = SolverStats()
        return _input_gradients(result, inputs, forward.trajectory, ctx.needs_input_grad, wanted, len(params))


def _input_gradients(result: AdjointResult, inputs: SolveInputs, trajectory: Trajectory,
                     needs_input_grad: tuple[bool, ...], wanted: list[int], n_params: int) -> tuple[Any, ...]:
    """The gradients ``_AdjointFunction.backward`` returns, one per input of ``apply``."""
    need_t, need_grid, need_y0 = needs_input_grad[1:4]
    t_grad = _output_time_gradient(result, inputs, trajectory, need_t, adaptive=inputs.grid is None)
    param_grads: list[torch.Tensor | None] = [None] * n_params
    for i, g in zip(wanted, result.param_grads):
        param_grads[i] = g
    grid_grad = result.grid_grad if need_grid else None
    watched = [None] * (len(needs_input_grad) - 4 - n_params)
    return (None, t_grad, grid_grad, result.lam0 if need_y0 else None, *param_grads, *watched)


def graph_retained() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``: backward may run through it again).

    The one place mpnode asks autograd's engine this (a private torch API that
    torch's own compiled-autograd code uses); where it is missing the graph counts
    as retained, which keeps the store until autograd frees the node.
    """
    query = getattr(getattr(torch._C, "_autograd", None), "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _output_time_gradient(result: AdjointResult, inputs: SolveInputs, trajectory: Trajectory, need_t: bool,
                          adaptive: bool) -> torch.Tensor | None:
    """``dL/dt``: interpolation terms per output, plus (adaptive steps) the terms of the nodes that move with
    ``t[0]``."""
    if not need_t:
        return None
    grad = torch.zeros_like(inputs.t)
    for j, g in result.out_time.items():
        grad[j] += g.to(grad.dtype)
    if adaptive and result.grid_grad is not None:
        moving = result.grid_grad[: trajectory.anchored_from]  # tau_n = t[0] + constants before a step_t/jump_t mark
        grad[0] += moving.sum().to(grad.dtype)
    return grad
