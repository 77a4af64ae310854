"""The contracts every layer of ``mpnode.core`` shares: plain data and small interfaces, no solver logic.

* [`Problem`][mpnode.core.contracts.Problem]: what a solve's forward and backward passes share besides the
  differentiable inputs (field, tableau, precision policy, output rule, callbacks, counters, event);
* [`SolveInputs`][mpnode.core.contracts.SolveInputs]: the differentiable inputs and their host copies;
* [`Recorder`][mpnode.core.contracts.Recorder]: what a march hands to the adjoint strategy at each accepted step,
  and [`Kept`][mpnode.core.contracts.Kept]: a strategy's recorder, which hands what it kept on to the backward pass;
* [`Trajectory`][mpnode.core.contracts.Trajectory]: what the forward pass decided, held as constants for the
  backward pass;
* [`StepGraph`][mpnode.core.contracts.StepGraph]: one step evaluated with autograd on, from leaf inputs (what every
  adjoint strategy differentiates);
* [`Nudge`][mpnode.core.contracts.Nudge] and [`FirstStageMode`][mpnode.core.contracts.FirstStageMode]: how a stage
  time is perturbed, and how a step's first stage was obtained.

This module imports no other module of the package at run time except ``stats`` (a leaf); the annotations name
the others, so any layer can import it without a cycle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from .stats import SolverStats

if TYPE_CHECKING:
    from .callbacks import Callbacks
    from .events import EventLocator
    from .outputs import OutputPlacement, OutputRule
    from .precision import PrecisionPolicy
    from .rk import StagePerturbation, Stages
    from .state import FlatVectorField
    from .tableau import ButcherTableau


R = TypeVar("R", bound="Recorder")


class Nudge(enum.IntEnum):
    """Perturbation of a stage time to the neighbouring float (torchdiffeq's ``perturb``).

    The value times the direction of time gives the way the time moves: ``NEXT`` towards the step's end,
    ``PREV`` towards its start.
    """

    NONE = 0
    NEXT = 1
    PREV = -1


class FirstStageMode(enum.Enum):
    """How a step's first stage ``k_1`` was obtained (one per accepted step in a trajectory).

    * ``AT_NODE``: evaluated at the step's start node;
    * ``AFTER_NODE``: evaluated at the float just after the start node (after a ``jump_t`` mark, or a
      perturbed fixed grid);
    * ``REUSED``: the previous step's last stage of a first-same-as-last method, evaluated at the float just
      before this step's start node: evaluating it again gives it bitwise, so a recomputation does;
    * ``CARRIED``: the previous step's last stage of a method that reuses it without being first-same-as-last:
      it is an input of the step that must be stored.
    """

    AT_NODE = 0
    AFTER_NODE = 1
    REUSED = -1
    CARRIED = 2

    @property
    def nudge(self) -> Nudge:
        """The perturbation of the first stage's time when it is evaluated (``NONE`` for a carried stage)."""
        return Nudge.NONE if self is FirstStageMode.CARRIED else Nudge(self.value)

    @property
    def inherited(self) -> bool:
        """The stage comes from the previous step (reused or carried) rather than a fresh evaluation."""
        return self in (FirstStageMode.REUSED, FirstStageMode.CARRIED)

    @classmethod
    def evaluated(cls, nudge: Nudge) -> FirstStageMode:
        """The mode of a first stage evaluated with ``nudge``."""
        return cls(int(nudge))


@dataclass
class Problem:
    """Everything a solve's forward and backward passes share besides the differentiable inputs.

    Attributes:
        field: the vector field on flat states.
        tableau: the method.
        policy: the dtypes of the solve.
        output_rule: how an output inside a step is read off it.
        callbacks: the field's torchdiffeq callbacks.
        counters: work counted by the pass in progress (committed to the caller's stats when it completes).
        event: the event locator of a solve until an event, else ``None``.
    """

    field: FlatVectorField
    tableau: ButcherTableau
    policy: PrecisionPolicy
    output_rule: OutputRule
    callbacks: Callbacks
    counters: SolverStats = dataclasses.field(default_factory=SolverStats)  # (the attribute ``field`` shadows it)
    event: EventLocator | None = None


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
        user_stats: the caller's ``SolverStats`` (updated when a pass completes), or ``None``.
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


@dataclass
class StepGraph:
    """One step built with autograd on, from leaf inputs, ready for vector-Jacobian products.

    Attributes:
        y: the start state, a leaf ``(D,)`` in the state dtype.
        first: the first stage as an input leaf ``(D,)`` (inherited from the previous
            step), or ``None`` when the step evaluates it.
        t0, t1: the step's nodes as leaves (0-dim, grid dtype) when times are traced.
        h: the step size (host float).
        h_traced: ``t1 - t0`` of the traced nodes (0-dim tensor), or ``None``.
        stages: the stages (with their graph).
        phi: ``sum_i b_i k_i`` (with its graph).
        fsal: the method is first-same-as-last: ``y_{n+1}`` is the last stage's input.
        end_slope: ``f(tau_{n+1}, y_{n+1})`` when the output rule needs it, else ``None``.
    """

    y: torch.Tensor
    first: torch.Tensor | None
    t0: torch.Tensor | None
    t1: torch.Tensor | None
    h: float
    h_traced: torch.Tensor | None
    stages: Stages
    phi: torch.Tensor
    fsal: bool = False
    end_slope: torch.Tensor | None = None

    def leaves(self) -> list[torch.Tensor]:
        return [x for x in (self.y, self.first, self.t0, self.t1) if x is not None]


class Recorder:
    """What a march hands to the adjoint strategy at each accepted step; the base class keeps nothing."""

    @property
    def keeps_graphs(self) -> bool:
        """The march evaluates every step with autograd on (from leaf inputs) and hands the step's graph to
        ``keep`` (the direct strategy)."""
        return False

    @property
    def need_times(self) -> bool:
        """Those graphs must trace the step times (gradients w.r.t. ``t``)."""
        return False

    def record(self, n: int, y: torch.Tensor, first_stage: torch.Tensor | None) -> None:
        """Accepted step ``n`` starts from ``y``; ``first_stage`` is its carried first stage (else ``None``)."""

    def keep(self, n: int, graph: StepGraph) -> None:
        """Accepted step ``n``'s graph (only called while ``keeps_graphs``)."""

    def graph_context(self) -> contextlib.AbstractContextManager:
        """A context entered around each step evaluated with autograd (e.g. to meter saved tensors)."""
        return contextlib.nullcontext()


class ForwardingRecorder(Recorder, Generic[R]):
    """A recorder that hands everything to ``self.inner``; subclasses intercept what they need."""

    inner: R

    @property
    def keeps_graphs(self) -> bool:
        return self.inner.keeps_graphs

    @property
    def need_times(self) -> bool:
        return self.inner.need_times

    def record(self, n: int, y: torch.Tensor, first_stage: torch.Tensor | None) -> None:
        self.inner.record(n, y, first_stage)

    def keep(self, n: int, graph: StepGraph) -> None:
        self.inner.keep(n, graph)

    def graph_context(self) -> contextlib.AbstractContextManager:
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
        first_stage: how each step's first stage was obtained.
        placement: where each output time lies.
        rejected: rejected attempts (adaptive).
        noise_accepted: accepted steps (adaptive) whose error estimate was above the tolerance but within its
            rounding noise (``mpnode.core.tolerance.RoundoffNoise``).
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
    first_stage: list[FirstStageMode]
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
class StoreSetup:
    """What an adjoint strategy needs to size what it keeps for one solve.

    Attributes:
        width: entries of a flat state ``D``.
        dtype: the checkpoint dtype (when ``follow_field`` is set: until the field's first evaluation).
        device: the state's device.
        rows: the number of steps when known before the march (fixed grids), else ``None``.
        carries: steps may carry their first stage (it must be kept with the state).
        need_times: kept graphs must trace the step times.
        params: the differentiated tensors (not counted as held memory).
        follow_field: when set, the checkpoint dtype follows the precision the field turns out to run in: it
            returns that dtype, or ``None`` before the field's first evaluation (a fixed grid records its first
            state before evaluating it; the built-in stores hold such rows in the state's dtype until then).
    """

    width: int
    dtype: torch.dtype
    device: torch.device
    rows: int | None
    carries: bool
    need_times: bool
    params: tuple[torch.Tensor, ...] = ()
    follow_field: Callable[[], torch.dtype | None] | None = None

    def settled_dtype(self) -> torch.dtype | None:
        """The checkpoint dtype if it is known now, else ``None``."""
        return self.dtype if self.follow_field is None else self.follow_field()


#: Reads the tensors a strategy saved for backward (autograd's unpacked copies) into what its backward pass uses.
SavedReader = Callable[[Sequence[torch.Tensor]], Any]


class Kept(Recorder):
    """What an adjoint strategy keeps from one forward pass: the march fills it, then ``finish`` hands it on.

    ``finish`` is called once, after the march.  It returns the tensors to pass through ``save_for_backward``
    (checkpoints: autograd then owns them, applies saved-tensor hooks such as ``save_on_cpu`` to them, and refuses
    a second backward without ``retain_graph``) and a reader that turns autograd's unpacked copies of them into what
    the strategy's backward pass reads.  The reader holds no tensor of those, and nothing is changed by reading, so
    every backward pass (``retain_graph=True``) reads afresh.
    """

    def finish(self) -> tuple[list[torch.Tensor], SavedReader]:
        return [], lambda saved: None
