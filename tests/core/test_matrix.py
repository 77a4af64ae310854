"""The differential test matrix: method x strategy x precision x feature, each cell against one float64 reference.

A cell solves one small problem with one method (every tableau of ``TABLEAUX``), one
adjoint strategy, in one precision, with one feature switched on, and checks:

1. **the reference**: outputs and gradients equal plain float64 autograd through the same
   accepted steps (:func:`reference_solution`: a Runge-Kutta loop written out in this file
   on the nodes the cell's solve accepted, its outputs read off the step's interpolant as
   torchdiffeq does; it shares only the tableau's coefficients with the code under test,
   and those are checked against the order conditions in ``test_tableau.py``);
2. **the other strategies**: the same cell with ``RecomputeAdjoint`` took the same steps
   (exactly), and returned outputs and gradients within :data:`TOLERANCES`;
3. **the feature's own promise** (callbacks called as documented, a second backward giving
   the same numbers, the event on the event surface, ...);
4. **invariants a user relies on**: module state (buffers, ``training``, generator
   states) after forward and after backward equals torchdiffeq's after its forward (for
   features with state); in float16 a loss scale does not change the gradients; repeated
   calls do not grow live memory (the ``repeated_calls`` feature).

Everything is data: the axes are lists of entries (:data:`METHODS`, :data:`STRATEGIES`,
:data:`PRECISIONS`, :data:`FEATURES`) and one generic runner (:func:`check_cell`) runs
any cell.  A new method, strategy or feature joins the matrix by adding one entry.

Slices.  By default (CI) only a covering subset runs: per precision column, every pair of
values of two axes appears in at least one cell (:func:`covering_cells`, greedy and
deterministic).  ``--matrix=full`` runs the full product.  The precision axis is the
suite's precision column (``--precision``; the float64 cells run in the float32 column).  Known failures are listed in
:data:`KNOWN_FAILURES` and marked ``xfail(strict=True)``: once fixed they fail as XPASS,
and their entry must go.  See docs/tests.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import pytest
import torch

from mpnode.core import (
    TABLEAUX,
    AdjointScaling,
    AdjointStrategy,
    AutoAdjoint,
    DirectAdjoint,
    PIController,
    RecomputeAdjoint,
    ScalingPass,
    SegmentedAdjoint,
    SolverStats,
    odeint,
    odeint_adjoint,
)

torchdiffeq = pytest.importorskip("torchdiffeq")

# a warning in a cell is a finding: the matrix's tolerances and options are chosen to cause none, except the
# documented one that an adaptive step under autocast was accepted within the field's rounding noise
pytestmark = [pytest.mark.matrix, pytest.mark.filterwarnings("error"),
              pytest.mark.filterwarnings("ignore::mpnode.core.MixedPrecisionToleranceWarning")]
F64 = torch.float64
SEED = 1234  # the global generator's seed before every solve (dropout draws the same masks in every run)


# ====================================================================== the axes


@dataclass(frozen=True)
class Method:
    """A tableau of ``TABLEAUX``.

    Attributes:
        name: its name in ``TABLEAUX`` (and in torchdiffeq when ``in_torchdiffeq``).
        min_rtol: adaptive methods: the least rtol used (low orders would take a hundred
            steps at float64's tolerance; with it every method takes about 4-30 steps).
        in_torchdiffeq: torchdiffeq has the same method under the same name (module-state peer).
        tol_factor: the method amplifies roundoff: every tolerance of :data:`TOLERANCES` times this.
    """

    name: str
    min_rtol: float = 0.0
    in_torchdiffeq: bool = True
    tol_factor: float = 1.0

    @property
    def adaptive(self) -> bool:
        return TABLEAUX[self.name].is_adaptive


METHODS = [
    Method("euler"), Method("midpoint"), Method("heun2"), Method("ralston", in_torchdiffeq=False),
    Method("heun3"), Method("ssprk3", in_torchdiffeq=False), Method("rk4"), Method("rk4_classic", in_torchdiffeq=False),
    Method("dopri5"), Method("bosh3", min_rtol=1e-4), Method("fehlberg2", min_rtol=3e-5),
    Method("adaptive_heun", min_rtol=3e-3), Method("dopri8"),
    # weights b up to 3.3 and dense-output polynomials with coefficients up to 47 (dopri5: 0.65 and 12): roundoff is
    # amplified 2-10x more than by the other methods (measured in every precision, float64 included)
    Method("tsit5", in_torchdiffeq=False, tol_factor=3.0),
]


@dataclass(frozen=True)
class Strategy:
    """An adjoint strategy.

    Attributes:
        make: ``make(**options) -> AdjointStrategy``; ``options`` are the case's (``scaling``,
            ``checkpoint_dtype``: the strategies' common arguments).
        reports: the values of ``SolverStats.last_adjoint`` it may report.
    """

    name: str
    make: Callable[..., AdjointStrategy]
    reports: frozenset[str]


STRATEGIES = [
    Strategy("direct", DirectAdjoint, frozenset({"direct"})),
    Strategy("recompute", RecomputeAdjoint, frozenset({"recompute"})),
    # two checkpoints for 4-30 steps: backward recomputes real segments
    Strategy("segmented", lambda **o: SegmentedAdjoint(checkpoints=2, **o), frozenset({"segmented"})),
    # a budget of one byte: auto starts direct and falls back at the first step, through recompute to segmented
    Strategy("auto", lambda **o: AutoAdjoint(budget_bytes=1, **o), frozenset({"segmented"})),
]
#: the strategy every cell is compared with
PARTNER = "recompute"


@dataclass(frozen=True)
class Precision:
    """A column of the precision matrix.

    Attributes:
        state: dtype of ``y0``, the parameters, the outputs.
        autocast: the autocast dtype of the vector field, or ``None``.
        rtol, atol: tolerances of adaptive solves (a method's ``min_rtol`` and ``min_rtol / 10`` if
            larger): at or above the mixed-precision floor (the autocast dtype's unit roundoff, times
            RMS(y0) for atol), so no tolerance warning is issued.
        column: the suite's precision column (``--precision``) the cells run in.
    """

    name: str
    state: torch.dtype
    autocast: torch.dtype | None
    rtol: float
    atol: float
    column: str

    def context(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


PRECISIONS = [
    Precision("float64", F64, None, 1e-8, 1e-9, column="float32"),  # tests/conftest.py: COLUMN_OF
    Precision("float32", torch.float32, None, 1e-6, 1e-7, column="float32"),
    Precision("bfloat16", torch.float32, torch.bfloat16, 1e-2, 1e-2, column="bfloat16"),
    Precision("float16", torch.float32, torch.float16, 2e-3, 2e-3, column="float16"),
]


@dataclass(frozen=True)
class Tolerance:
    """Largest relative error (2-norm over each tensor) allowed in a cell.

    Attributes:
        reference: outputs and gradients against the float64 reference on the same steps.
        strategies: outputs and gradients against the recompute strategy's (on the same steps).
        state: float buffers (BatchNorm statistics) against torchdiffeq's.
    """

    reference: float
    strategies: float
    state: float


#: One table; set at 3-10x the largest error measured over the full product (docs/tests.md), for these reasons:
#: float64: the same operations in another order: roundoff (1.1e-16 per operation) over about 1e3 operations
#:   (measured 5.8e-15 against the reference, 1.5e-15 between strategies); float buffers are compared with a
#:   looser bound because an adaptive step size depends on the error estimate, a difference of nearly equal sums
#:   whose roundoff moves the next step by about 1e-8 relative (measured 8e-8 for dopri8 against torchdiffeq).
#: float32: unit roundoff 6e-8 amplified by the steps and the problem's condition (measured 1.7e-6 / 2.5e-7).
#: bfloat16 / float16: every field evaluation rounds to 2^-8 / 2^-11 (unit roundoff 3.9e-3 / 4.9e-4); a
#:   gradient sums a few dozen such evaluations, and the recompute strategy linearises each step at a checkpoint
#:   rounded to the autocast dtype, so strategies differ at that level too (measured 0.030 / 0.0032 against the
#:   reference, 0.026 / 0.0032 between strategies, under the tolerance floor the adaptive policy had then; with the
#:   rounding-noise acceptance test a bfloat16 dopri5 solve of the (2, 2, 3) state takes 3 steps and its input
#:   bias's gradient, a sum of terms of both signs, is off by 0.065-0.09 under every strategy, so the bfloat16
#:   reference bound is 0.15).
#: A method's or a feature's ``tol_factor`` widens a row for an ill-conditioned combination (tsit5, BatchNorm,
#: the event solve's t[0] gradient; see METHODS and FEATURES); the measured values above are divided by it.
TOLERANCES = {
    "float64": Tolerance(reference=3e-14, strategies=5e-15, state=1e-6),
    "float32": Tolerance(reference=5e-6, strategies=2e-6, state=1e-5),
    "bfloat16": Tolerance(reference=1.5e-1, strategies=8e-2, state=5e-2),
    "float16": Tolerance(reference=1.5e-2, strategies=1.5e-2, state=1e-2),
}


@dataclass(frozen=True)
class Spec:
    """What a feature builds a case for: the cell's method and precision, and the dtype to build in.

    ``dtype`` is the tensors' dtype, ``round_to`` the dtype their values are rounded to first:
    the cell builds in its state dtype, the reference in float64 from the same rounded values.
    """

    method: Method
    precision: Precision
    dtype: torch.dtype
    round_to: torch.dtype
    device: torch.device


class Values:
    """Deterministic values of a case: the same sequence for the cell and its reference."""

    def __init__(self, spec: Spec, seed: int = 0) -> None:
        self.spec = spec
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
        x = torch.randn(*shape, generator=self.gen, dtype=F64) * scale
        x = x.to(self.spec.round_to).to(self.spec.dtype).to(self.spec.device)
        return x.requires_grad_(grad)


@dataclass
class Case:
    """One solve: what ``odeint`` gets, what is differentiated, how the reference reads its outputs.

    Attributes:
        func: the vector field (a module or a closure).
        y0: a tensor ``(B, D)`` or a tuple of tensors, in the spec's dtype.
        t: output times (1-D, the spec's dtype).
        inputs: the tensors differentiated (``y0``'s parts, parameters, captured tensors, ``t``).
        kwargs: the other ``odeint`` arguments (method, rtol, atol, event_fn); ``options`` apart.
        options: ``odeint``'s options (``stats`` is added by the runner).
        modules: modules whose state (buffers, ``training``) is compared with torchdiffeq's.
        adjoint: keyword arguments of the strategy (``scaling``, ``checkpoint_dtype``).
        solver: the entry point (``odeint`` or ``odeint_adjoint``, called with ``adjoint=``).
        interp: how outputs are read off a step: ``"linear"``/``"cubic"`` (fixed grids) or ``"dense"``.
        nodes: where the reference's nodes come from: ``"t"`` (a fixed grid on the output times),
            ``"grid"`` (the solve's grid, constants: ``t`` must not require grad) or ``"shifted"``
            (``t[0]`` plus the accepted steps: adaptive steps, events).
        loss_rows: the output times the loss reads.
        fresh_at: times after which the next step's first stage is evaluated afresh instead of reused
            (``jump_t``).
    """

    func: Callable
    y0: torch.Tensor | tuple[torch.Tensor, ...]
    t: torch.Tensor
    inputs: list[torch.Tensor]
    kwargs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    modules: list[torch.nn.Module] = field(default_factory=list)
    adjoint: dict[str, Any] = field(default_factory=dict)
    solver: Callable = odeint
    interp: str = "linear"
    nodes: str = "t"
    loss_rows: slice = field(default_factory=lambda: slice(None))
    fresh_at: tuple[float, ...] = ()

    @property
    def event_fn(self) -> Callable | None:
        return self.kwargs.get("event_fn")


def loss_of(out: torch.Tensor | tuple[torch.Tensor, ...], round_to: torch.dtype,
            rows: slice = slice(None)) -> torch.Tensor:
    """A fixed random linear functional of the outputs at times ``rows`` (all: every output gets a gradient)."""
    parts = out if isinstance(out, tuple) else (out,)
    total = 0
    for i, part in enumerate(parts):
        w = torch.randn(part.shape, generator=torch.Generator().manual_seed(100 + i), dtype=F64)
        total = total + (part[rows] * w[rows].to(round_to).to(part.device, part.dtype)).sum()
    return total


# ---------------------------------------------------------------------- the fields


class Field(torch.nn.Module):
    """``f(t, y) = W_out g(tanh(W_in [y, t] + b_in)) + b_out`` on states ``(B, dim)``; ``g`` is ``middle``."""

    def __init__(self, values: Values, dim: int = 3, width: int = 8, middle: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(dim + 1, width)
        self.out = torch.nn.Linear(width, dim)
        self.middle = middle if middle is not None else torch.nn.Identity()
        with torch.no_grad():
            for layer, gain in ((self.inp, 1.5), (self.out, 1.0)):
                fan_in = layer.weight.shape[1]
                layer.weight = torch.nn.Parameter(values.randn(*layer.weight.shape, scale=gain / math.sqrt(fan_in)))
                layer.bias = torch.nn.Parameter(values.randn(*layer.bias.shape, scale=0.2))
        self.to(values.spec.device, values.spec.dtype)  # the middle layer's parameters and buffers

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([y, t.to(y.dtype).expand(*y.shape[:-1], 1)], dim=-1)
        return self.out(self.middle(torch.tanh(self.inp(h))))


class TupleField(torch.nn.Module):
    """A tuple state ``(x (B, dim), s (B,))``: ``x' = field(t, x)``, ``s' = -s mean(tanh(x)^2)``."""

    def __init__(self, field: Field) -> None:
        super().__init__()
        self.field = field

    def forward(self, t, y):
        x, s = y
        return self.field(t, x), -s * torch.tanh(x).pow(2).mean(-1)


class RecordingField(Field):
    """A field that records torchdiffeq's callbacks as ``(name, t0, dt)`` (the accept/reject ones on adaptive steps
    only)."""

    def __init__(self, values: Values, adaptive: bool) -> None:
        super().__init__(values)
        self.calls: list[tuple[str, float, float]] = []
        names = ["callback_step", "callback_step_adjoint", "callback_accept_step_adjoint"]
        if adaptive:
            names += ["callback_accept_step", "callback_reject_step"]
        for name in names:
            setattr(self, name, self._recorder(name))

    def _recorder(self, name: str):
        def record(t0, y0, dt):
            self.calls.append((name, float(t0), float(dt)))
        return record


# ---------------------------------------------------------------------- features


def base_case(spec: Spec, func: Callable | None = None, dim: int = 3, batch: int = 4) -> Case:
    """The plain problem: :class:`Field` from ``y0 (4, 3)``; fixed grids: the 4 steps between outputs at
    ``0, 0.25, ..., 1``; adaptive methods: outputs at ``0, 2/3, 4/3, 2``."""
    values = Values(spec)
    func = func(values) if func is not None else Field(values, dim)
    y0 = values.randn(batch, dim)
    method = spec.method
    kwargs: dict[str, Any] = {"method": method.name}
    if method.adaptive:
        kwargs.update(rtol=max(spec.precision.rtol, method.min_rtol),
                      atol=max(spec.precision.atol, method.min_rtol / 10))
    t = torch.linspace(0, 2, 4) if method.adaptive else torch.linspace(0, 1, 5)
    t = t.to(spec.device, spec.dtype)
    params = list(func.parameters()) if isinstance(func, torch.nn.Module) else []
    modules = [func] if isinstance(func, torch.nn.Module) else []
    return Case(func, y0, t, [y0, *params], kwargs, modules=modules, interp="dense" if method.adaptive else "linear",
                nodes="shifted" if method.adaptive else "t")


def tuple_state(spec: Spec) -> Case:
    case = base_case(spec, lambda v: TupleField(Field(v)))
    s0 = Values(spec, seed=1).randn(case.y0.shape[0])
    case.y0 = (case.y0, s0)
    case.inputs.insert(1, s0)
    return case


def closure(spec: Spec) -> Case:
    """A function (no module) capturing four tensors: found on the first evaluation, differentiated."""
    captured: list[torch.Tensor] = []

    def build(values: Values):
        w_in, b_in = values.randn(8, 4, scale=0.75), values.randn(8, scale=0.2)
        w_out, b_out = values.randn(3, 8, scale=0.35), values.randn(3, scale=0.2)
        captured.extend([w_in, b_in, w_out, b_out])

        def func(t, y):
            h = torch.cat([y, t.to(y.dtype).expand(*y.shape[:-1], 1)], dim=-1)
            return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(h, w_in, b_in)), w_out, b_out)

        return func

    case = base_case(spec, build)
    case.inputs += captured
    return case


def with_middle(middle: Callable[[], torch.nn.Module]) -> Callable[[Spec], Case]:
    return lambda spec: base_case(spec, lambda v: Field(v, middle=middle()))


def spectral_norm_layer() -> torch.nn.Module:
    """``spectral_norm(Linear(8, 8))``, the same weights and power-iteration vectors at every build."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(8, 8))


def events(spec: Spec, direction: float = 1.0) -> Case:
    """Until ``g = 0.6 - direction t - 0.1 mean(y) = 0`` (about t = 0.6 direction), ``t = [0, 2 direction]``;
    fixed grids step by 0.2."""
    case = base_case(spec)
    case.t = torch.tensor([0.0, 2.0 * direction], dtype=spec.dtype, device=spec.device)
    case.kwargs["event_fn"] = lambda t, y: 0.6 - direction * t - 0.1 * y.mean()
    case.nodes = "shifted"
    if not spec.method.adaptive:
        case.options["step_size"] = 0.2
    return case


def callbacks(spec: Spec) -> Case:
    return base_case(spec, lambda v: RecordingField(v, spec.method.adaptive))


def interp_cubic(spec: Spec) -> Case:
    """Fixed grid of 0.3 (nodes 0, 0.3, 0.6, 0.9, 1) read at 0, 0.25, ..., 1 by cubic Hermite interpolation."""
    case = base_case(spec)
    case.options.update(step_size=0.3, interp="cubic")
    case.interp, case.nodes = "cubic", "grid"
    return case


def on_a_grid(**options: Any) -> Callable[[Spec], Case]:
    """A fixed grid of its own (``step_size`` or ``grid_constructor``), outputs interpolated linearly."""
    def build(spec: Spec) -> Case:
        case = base_case(spec)
        case.options.update(options)
        case.nodes = "grid"
        return case
    return build


def seven_nodes(func, y0, t):
    return torch.linspace(float(t[0]), float(t[-1]), 7, dtype=t.dtype, device=t.device)


def interior_loss(spec: Spec) -> Case:
    """The loss reads the outputs strictly inside the interval: the adjoint at the end is zero."""
    case = base_case(spec)
    case.loss_rows = slice(1, -1)
    return case


def y0_is_data(spec: Spec) -> Case:
    case = base_case(spec)
    case.y0.requires_grad_(False)
    case.inputs = case.inputs[1:]
    return case


def frozen_parameter(spec: Spec) -> Case:
    """The input layer's weight does not require grad (a frozen layer): a constant, found as such."""
    case = base_case(spec)
    case.func.inp.weight.requires_grad_(False)
    case.inputs = [x for x in case.inputs if x is not case.func.inp.weight]
    return case


def noncontiguous_y0(spec: Spec) -> Case:
    """``y0`` a transposed view of a leaf: gradients reach the leaf through the view."""
    case = base_case(spec)
    leaf = Values(spec, seed=2).randn(3, 4)
    case.y0 = leaf.t()
    case.inputs[0] = leaf
    return case


def t_in_float64(spec: Spec) -> Case:
    """Output times in float64 for a float32 state (the grid's dtype is ``t``'s)."""
    case = base_case(spec)
    case.t = case.t.to(F64)
    return case


def state_3d(spec: Spec) -> Case:
    """A state ``(2, 2, 3)``: the field acts on the last dimension."""
    case = base_case(spec)
    y0 = Values(spec, seed=3).randn(2, 2, 3)
    case.y0, case.inputs[0] = y0, y0
    return case


def bound_method(spec: Spec) -> Case:
    """``func`` is a module's bound method: the module's parameters are found through it."""
    case = base_case(spec)
    case.func = case.func.forward
    return case


def _differentiate_t(case: Case) -> Case:
    """``case`` differentiated w.r.t. its times ``t`` too."""
    case.t.requires_grad_(True)
    case.inputs.append(case.t)
    return case


def events_t0_grad(spec: Spec) -> Case:
    """An event solve differentiated w.r.t. ``t[0]`` too (the event time itself is a constant of ``odeint``)."""
    return _differentiate_t(events(spec))


def per_element_tolerance(spec: Spec) -> Case:
    """``atol`` a tensor shaped like ``y0`` (one tolerance per element)."""
    case = base_case(spec)
    scale = torch.linspace(1.0, 3.0, case.y0.numel(), dtype=F64).reshape(case.y0.shape)
    case.kwargs["atol"] = (case.kwargs["atol"] * scale).to(spec.device, spec.dtype)
    return case


def scaler(spec: Spec) -> Case:
    case = base_case(spec)
    case.adjoint["scaling"] = MaxNormScaling()
    return case


def t_requires_grad(spec: Spec) -> Case:
    return _differentiate_t(base_case(spec))


def reverse_time(spec: Spec) -> Case:
    case = base_case(spec)
    case.t = case.t.flip(0)
    return case


def with_options(**options: Any) -> Callable[[Spec], Case]:
    def build(spec: Spec) -> Case:
        case = base_case(spec)
        case.options.update(options)
        return case
    return build


def step_and_jump_t(spec: Spec) -> Case:
    """A step ends on 0.5 (``step_t``) and on 1.1 (``jump_t``: the next first stage is evaluated afresh)."""
    case = with_options(step_t=[0.5], jump_t=[1.1])(spec)
    case.fresh_at = (1.1,)
    return case


def checkpoints_in_state_dtype(spec: Spec) -> Case:
    case = base_case(spec)
    case.adjoint["checkpoint_dtype"] = spec.precision.state
    return case


def through_odeint_adjoint(spec: Spec) -> Case:
    case = base_case(spec)
    case.solver = odeint_adjoint
    return case


def adjoint_params_subset(spec: Spec) -> Case:
    """Only the output layer trains: the input layer's parameters are constants of the solve."""
    case = base_case(spec)
    listed = (case.func.out.weight, case.func.out.bias)
    case.kwargs["adjoint_params"] = listed
    case.inputs = [case.y0, *listed]
    return case


class MaxNormScaling(AdjointScaling):
    """A test scaling policy: ``S = 2^(10 - floor(log2 max|lambda|))`` per step (1 while ``lambda = 0``), on the
    device, never rejecting a block."""

    def begin(self, lam: torch.Tensor, n_steps: int) -> ScalingPass:
        return _MaxNormPass()


class _MaxNormPass(ScalingPass):
    def scale(self, lam: torch.Tensor) -> torch.Tensor:
        top = lam.detach().abs().max().float()
        exponent = (10 - torch.floor(torch.log2(top.clamp_min(2.0**-60)))).clamp(-60, 60)
        return torch.where(top > 0, torch.exp2(exponent), torch.ones_like(top))


Check = Callable[["Cell", "Run", Case], list[str]]


@dataclass(frozen=True)
class Feature:
    """One thing switched on in a solve.

    Attributes:
        build: ``build(spec) -> Case``.
        applies: ``applies(method, precision)``: the cells the feature has (default: all).
        stateful: the field has state (buffers, generator draws): compared with torchdiffeq's.
        check: extra checks of the feature's promise: ``check(cell, run, case) -> problems``.
        retain: backward twice through the same graph (``retain_graph=True`` first).
        loss_scale: in float16, check that a loss scale does not change the gradients.
        memory: meter live memory over repeated calls.
        tol_factor: the field is ill-conditioned: every tolerance of :data:`TOLERANCES` times this.
    """

    name: str
    build: Callable[[Spec], Case]
    applies: Callable[[Method, Precision], bool] = lambda m, p: True
    stateful: bool = False
    check: Check | None = None
    retain: bool = False
    loss_scale: bool = False
    memory: bool = False
    tol_factor: float = 1.0


def fixed_grids(method: Method, precision: Precision) -> bool:
    return not method.adaptive


def adaptive_steps(method: Method, precision: Precision) -> bool:
    return method.adaptive


def under_autocast(method: Method, precision: Precision) -> bool:
    return precision.autocast is not None


def _callbacks_as_documented(cell: Cell, run: Run, case: Case) -> list[str]:
    """``callback_step`` before every attempt, accept/reject per attempt, ``callback_step_adjoint`` per backward
    step."""
    grid, stats = run.stats.last_grid, run.stats
    calls = run.callbacks
    starts = [(t0, abs(t1 - t0)) for t0, t1 in itertools.pairwise(grid)]
    by_name = {name: [(t0, dt) for n, t0, dt in calls if n == name] for name, _, _ in calls}
    problems = []

    def same(name, got, want):
        if len(got) != len(want) or any(abs(a - c) > 1e-12 or abs(b - d) > 1e-12 for (a, b), (c, d) in zip(got, want)):
            problems.append(f"{name}: called with {got}, expected {want}")

    if cell.method.adaptive:
        same("callback_accept_step", by_name.get("callback_accept_step", []), starts)
        if len(by_name.get("callback_reject_step", [])) != stats.rejected_steps:
            problems.append(f"callback_reject_step: {len(by_name.get('callback_reject_step', []))} calls, "
                            f"{stats.rejected_steps} rejected steps")
        if len(by_name.get("callback_step", [])) != stats.steps + stats.rejected_steps:
            problems.append(f"callback_step: {len(by_name.get('callback_step', []))} calls for "
                            f"{stats.steps + stats.rejected_steps} attempts")
    else:
        same("callback_step", by_name.get("callback_step", []), starts)
    same("callback_step_adjoint", by_name.get("callback_step_adjoint", []), starts[::-1])
    same("callback_accept_step_adjoint", by_name.get("callback_accept_step_adjoint", []), starts[::-1])
    return problems


def _second_backward_equal(cell: Cell, run: Run, case: Case) -> list[str]:
    if run.second_grads is None:
        return ["no second backward ran"]
    return [f"second backward: input {i} differs from the first (max diff {float((a - b).abs().max()):.3g})"
            for i, (a, b) in enumerate(zip(run.second_grads, run.grads)) if not torch.equal(a, b)]


def _event_on_surface(cell: Cell, run: Run, case: Case) -> list[str]:
    """The returned state at the event time lies on the event surface, inside the last accepted step."""
    problems = []
    y_e = run.out[0][-1]
    g = float(case.event_fn(torch.tensor(run.event_t, dtype=y_e.dtype, device=y_e.device), y_e))
    bound = 1e3 * torch.finfo(y_e.dtype).eps
    if abs(g) > bound:
        problems.append(f"event_fn at the returned event = {g:.3g} (> {bound:.3g})")
    grid = run.stats.last_grid
    if not min(grid[-2], grid[-1]) <= run.event_t <= max(grid[-2], grid[-1]) or run.event_t == grid[-2]:
        problems.append(f"event time {run.event_t} outside the last step [{grid[-2]}, {grid[-1]}]")
    return problems


FEATURES = [
    Feature("plain", base_case),
    Feature("tuple_state", tuple_state),
    Feature("closure", closure),
    Feature("dropout", with_middle(lambda: torch.nn.Dropout(0.25)), applies=fixed_grids, stateful=True),
    # BatchNorm divides by the standard deviation of 4 samples and its gradient subtracts their mean: the field's
    # roundoff is amplified (measured up to 6x the other features' errors in bfloat16, float16 and float32)
    Feature("batchnorm", with_middle(lambda: torch.nn.BatchNorm1d(8)), stateful=True, tol_factor=4.0),
    # spectral norm in training mode: a power iteration updates buffers that feed the output at every evaluation
    # (replayed per step on fixed grids; refused on adaptive ones by the recomputing strategies)
    Feature("spectral_norm", with_middle(spectral_norm_layer), applies=fixed_grids, stateful=True),
    Feature("events", events, check=_event_on_surface),
    Feature("callbacks", callbacks, check=_callbacks_as_documented),
    Feature("interp_cubic", interp_cubic, applies=fixed_grids),
    Feature("scaler", scaler, loss_scale=True),
    Feature("t_requires_grad", t_requires_grad),
    Feature("retain_graph_twice", base_case, retain=True, check=_second_backward_equal),
    Feature("reverse_time", reverse_time),
    Feature("repeated_calls", base_case, memory=True),
    Feature("perturb", with_options(perturb=True), applies=fixed_grids),
    Feature("pi_controller", with_options(controller=PIController()), applies=adaptive_steps),
    Feature("step_and_jump_t", step_and_jump_t, applies=adaptive_steps),
    Feature("checkpoints_in_state_dtype", checkpoints_in_state_dtype, applies=under_autocast),
    Feature("odeint_adjoint", through_odeint_adjoint),
    Feature("adjoint_params_subset", adjoint_params_subset),
    Feature("step_size_linear", on_a_grid(step_size=0.3), applies=fixed_grids),
    Feature("grid_constructor", on_a_grid(grid_constructor=seven_nodes), applies=fixed_grids),
    Feature("events_reverse_time", lambda spec: events(spec, -1.0), check=_event_on_surface),
    Feature("interior_loss", interior_loss),
    Feature("y0_is_data", y0_is_data),
    Feature("frozen_parameter", frozen_parameter),
    Feature("noncontiguous_y0", noncontiguous_y0),
    Feature("t_in_float64", t_in_float64, applies=lambda m, p: p.state == torch.float32),
    Feature("per_element_tolerance", per_element_tolerance, applies=adaptive_steps),
    Feature("max_step", with_options(max_step=0.15), applies=adaptive_steps),
    Feature("state_3d", state_3d),
    Feature("bound_method", bound_method),
    # dL/dt0 at a fixed event time is a small difference of per-step terms of order 1 (|dL/dt0| = 0.04 for
    # fehlberg2): its relative error reaches 30x the field's roundoff (measured 0.13 in bfloat16)
    Feature("events_t0_grad", events_t0_grad, check=_event_on_surface, tol_factor=3.0),
]


# ====================================================================== cells and slices


@dataclass(frozen=True)
class Cell:
    method: Method
    strategy: Strategy
    precision: Precision
    feature: Feature

    @property
    def id(self) -> str:
        return f"{self.precision.name}-{self.method.name}-{self.strategy.name}-{self.feature.name}"

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.method.name, self.strategy.name, self.precision.name, self.feature.name)


def full_product(column: str) -> list[Cell]:
    """Every valid cell of the precisions that run in ``column``."""
    return [Cell(m, s, p, f) for p in PRECISIONS if p.column == column
            for m in METHODS for s in STRATEGIES for f in FEATURES if f.applies(m, p)]


def _pairs(cell: Cell) -> set[tuple[str, str, str]]:
    values = dict(zip(("method", "strategy", "precision", "feature"), cell.key))
    axes = sorted(values)
    return {(a, b, values[a], values[b]) for i, a in enumerate(axes) for b in axes[i + 1:]}


@cache
def covering_cells(column: str) -> tuple[Cell, ...]:
    """A deterministic subset of the column's product in which every valid pair of values of two axes appears
    (greedy: repeatedly the first cell that covers the most pairs not yet covered)."""
    candidates = full_product(column)
    pairs = [_pairs(c) for c in candidates]
    holders: dict[tuple, list[int]] = {}
    for i, ps in enumerate(pairs):
        for pair in ps:
            holders.setdefault(pair, []).append(i)
    gain = [len(ps) for ps in pairs]  # pairs of each candidate not yet covered
    chosen = []
    while max(gain) > 0:
        best = gain.index(max(gain))
        chosen.append(candidates[best])
        for pair in pairs[best]:
            for i in holders.pop(pair, ()):
                gain[i] -= 1
    return tuple(chosen)


COLUMNS = sorted({p.column for p in PRECISIONS})


# ---------------------------------------------------------------------- known failures


@dataclass(frozen=True)
class KnownFailure:
    """Cells that fail on today's code, with the issue item they belong to.

    Attributes:
        reason: the issue item and what goes wrong.
        where: axis -> the names that fail (every axis given must match), or
        ids: the failing cells by id, where the set depends on roundoff.
        raises: the exception the cell fails with (an ``AssertionError``: a check found a difference).
    """

    reason: str
    where: dict[str, frozenset[str]] = field(default_factory=dict)
    ids: frozenset[str] = frozenset()
    raises: type[BaseException] = AssertionError

    def matches(self, cell: Cell) -> bool:
        if self.ids:
            return cell.id in self.ids
        names = dict(zip(("method", "strategy", "precision", "feature"), cell.key))
        return all(names[axis] in allowed for axis, allowed in self.where.items())


def _names(*names: str) -> frozenset[str]:
    return frozenset(names)


def _ids(precision: str, *cells: str) -> set[str]:
    """``"method-strategy-feature"`` cells of one precision as ids; ``*`` features: both time-gradient features."""
    out = set()
    for cell in cells:
        head, feature = cell.rsplit("-", 1)
        for f in (("t_requires_grad", "events_t0_grad") if feature == "*" else (feature,)):
            out.add(f"{precision}-{head}-{f}")
    return out


ADAPTIVE = _names(*(m.name for m in METHODS if m.adaptive))
ADAPTIVE_IN_TORCHDIFFEQ = _names(*(m.name for m in METHODS if m.adaptive and m.in_torchdiffeq))

#: Determined with ``--matrix=full`` on the CPU (docs/tests.md); remove an entry when its fix lands (XPASS).
KNOWN_FAILURES: list[KnownFailure] = []  # items 4, 5, 7, 9, 10 and 11 of issue 15 were listed here until fixed


def _marks(cell: Cell) -> list:
    found = [k for k in KNOWN_FAILURES if k.matches(cell)]
    if not found:
        return []
    raises = tuple(dict.fromkeys(k.raises for k in found))
    return [pytest.mark.xfail(strict=True, raises=raises, reason="; ".join(k.reason for k in found))]


def pytest_generate_tests(metafunc):
    if "cell" not in metafunc.fixturenames:
        return
    full = metafunc.config.getoption("--matrix") == "full"
    selected = metafunc.config.getoption("--precision")
    columns = COLUMNS if selected == "all" else [selected]
    cells = [c for column in columns for c in (full_product(column) if full else covering_cells(column))]
    metafunc.parametrize(
        ("precision", "cell"), [pytest.param(c.precision.name, c, id=c.id, marks=_marks(c)) for c in cells]
    )


# ====================================================================== the runner


@dataclass
class Run:
    """What one solve of a cell gave.

    Attributes:
        out: the outputs' parts (detached).
        grads: d loss / d ``case.inputs``.
        stats: the solve's counters (``last_grid``: the accepted nodes).
        event_t: the event time (events feature), else ``None``.
        state_forward / state_backward: module state after the forward / after backward.
        callbacks: the recorded callback calls (callbacks feature).
        second_grads: the gradients of a second backward (retain_graph feature).
    """

    out: tuple[torch.Tensor, ...]
    grads: tuple[torch.Tensor, ...]
    stats: SolverStats
    event_t: float | None
    state_forward: dict[str, Any]
    state_backward: dict[str, Any]
    callbacks: list = field(default_factory=list)
    second_grads: tuple[torch.Tensor, ...] | None = None


def build(cell: Cell, device: torch.device, dtype: torch.dtype | None = None) -> Case:
    p = cell.precision
    return cell.feature.build(Spec(cell.method, p, dtype or p.state, p.state, device))


def module_state(case: Case) -> dict[str, Any]:
    """``training`` of every submodule, every buffer (copied) and the global generator state."""
    state: dict[str, Any] = {"rng": torch.get_rng_state()}
    for i, module in enumerate(case.modules):
        for name, sub in module.named_modules():
            state[f"{i}.{name}.training"] = sub.training
        for name, buf in module.named_buffers():
            state[f"{i}.{name}"] = buf.detach().clone()
    return state


def _as_parts(x) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def solve(cell: Cell, device: torch.device, case: Case | None = None, loss_scale: float = 1.0) -> Run:
    """Run the cell's solve and backward (``case``: reuse one, as a training loop reuses its model)."""
    case = case or build(cell, device)
    stats = SolverStats()
    strategy = cell.strategy.make(**case.adjoint)
    torch.manual_seed(SEED)
    with cell.precision.context(device):
        result = case.solver(case.func, case.y0, case.t, adjoint=strategy,
                             options={**case.options, "stats": stats}, **case.kwargs)
    event_t, out = (float(result[0]), result[1]) if case.event_fn is not None else (None, result)
    state_forward = module_state(case)
    loss = loss_of(out, cell.precision.state, case.loss_rows) * loss_scale
    grads = torch.autograd.grad(loss, case.inputs, retain_graph=cell.feature.retain)
    second = torch.autograd.grad(loss, case.inputs) if cell.feature.retain else None
    calls = list(getattr(case.func, "calls", []))
    return Run(tuple(p.detach() for p in _as_parts(out)), grads, stats, event_t, state_forward, module_state(case),
               calls, second)


_RUNS: dict[tuple, Run] = {}


def cached_solve(cell: Cell, device: torch.device) -> Run:
    """A cell's run, computed once per session (the partner of several cells)."""
    key = (*cell.key, str(device))
    if key not in _RUNS:
        _RUNS[key] = solve(cell, device)
    return _RUNS[key]


# ---------------------------------------------------------------------- the reference


def reference_solution(tableau, func: Callable, y0: tuple[torch.Tensor, ...], nodes: Sequence[torch.Tensor],
                       out_times: Sequence[torch.Tensor], interp: str, reuse_last_stage: bool,
                       fresh_at: Sequence[float] = ()) -> list:
    """The discrete solution on the given accepted ``nodes``, written plainly for autograd.

    ``y0`` a tuple of tensors, ``func(t, y_tuple) -> tuple``.  Each step evaluates its stages at
    ``t0 + c_i h`` (``t1`` when ``c_i = 1``); with ``reuse_last_stage`` a step's first stage is the
    previous step's last (torchdiffeq's adaptive rule) unless the step starts at a time in
    ``fresh_at``.  Output ``j >= 1`` is read off the first step whose end reaches it: linear
    interpolation (an output on a node is the node's state), the cubic Hermite polynomial through
    both ends and their slopes, or the tableau's dense output.
    Returns the outputs as a list (one tuple per time).
    """

    def combine(y, h, weights, ks):
        return tuple(
            y_p + h * sum((w * k[p] for w, k in zip(weights, ks) if w != 0.0), torch.zeros_like(y_p))
            for p, y_p in enumerate(y)
        )

    direction = 1.0 if float(nodes[-1].detach()) > float(nodes[0].detach()) else -1.0
    outs, j, y, first = [y0], 1, y0, None
    for t0, t1 in itertools.pairwise(nodes):
        h = t1 - t0
        ks = [first if first is not None else func(t0, y)]
        for i in range(1, tableau.stages):
            ks.append(func(t1 if tableau.c[i] == 1.0 else t0 + tableau.c[i] * h, combine(y, h, tableau.a[i], ks)))
        y1 = combine(y, h, tableau.b, ks)
        end_slope = None
        while j < len(out_times) and direction * float((out_times[j] - t1).detach()) <= 0:
            x = (out_times[j] - t0) / h
            if interp == "linear":
                on_node = float(out_times[j].detach()) == float(t1.detach())
                outs.append(y1 if on_node else tuple(a + x * (b - a) for a, b in zip(y, y1)))
            elif interp == "cubic":
                end_slope = end_slope if end_slope is not None else func(t1, y1)
                h00, h10 = 2 * x**3 - 3 * x**2 + 1, x**3 - 2 * x**2 + x
                h01, h11 = -2 * x**3 + 3 * x**2, x**3 - x**2
                outs.append(tuple(h00 * a + h10 * h * fa + h01 * b + h11 * h * fb
                                  for a, fa, b, fb in zip(y, ks[0], y1, end_slope)))
            else:
                weights = [sum(c * x ** (m + 1) for m, c in enumerate(row)) for row in tableau.dense]
                outs.append(combine(y, h, weights, ks))
            j += 1
        first = ks[-1] if reuse_last_stage and float(t1.detach()) not in fresh_at else None
        y = y1
    return outs


def reference(cell: Cell, run: Run, device: torch.device) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Outputs (parts, stacked) and gradients of float64 autograd through the steps ``run`` accepted."""
    case = build(cell, device, F64)
    tableau = TABLEAUX[cell.method.name]
    grid = run.stats.last_grid
    t = case.t
    if case.nodes == "shifted":  # the accepted nodes move with t[0]
        nodes = [t[0] + (g - grid[0]) for g in grid]
    elif case.nodes == "grid":
        assert not t.requires_grad, "a step_size grid's nodes are taken as constants"
        nodes = [torch.tensor(g, dtype=F64, device=device) for g in grid]
    else:
        nodes = list(t)
    out_times = list(t) if case.event_fn is None else [t[0], torch.tensor(run.event_t, dtype=F64, device=device)]
    parts = isinstance(case.y0, tuple)
    y0 = case.y0 if parts else (case.y0,)

    def func(tt, y):
        return _as_parts(case.func(tt, y if parts else y[0]))

    torch.manual_seed(SEED)
    rows = reference_solution(tableau, func, y0, nodes, out_times, case.interp,
                              cell.method.adaptive and tableau.reuse_last_stage, case.fresh_at)
    out = tuple(torch.stack([row[p] for row in rows]) for p in range(len(y0)))
    loss = loss_of(out if parts else out[0], cell.precision.state, case.loss_rows)
    return tuple(o.detach() for o in out), torch.autograd.grad(loss, case.inputs)


# ---------------------------------------------------------------------- checks


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _compare(what: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], tol: float) -> list[str]:
    problems = []
    if len(got) != len(want):
        return [f"{what}: {len(got)} tensors, expected {len(want)}"]
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape:
            problems.append(f"{what}[{i}]: shape {tuple(a.shape)}, expected {tuple(b.shape)}")
        elif not rel(a, b) <= tol:
            problems.append(f"{what}[{i}]: relative error {rel(a, b):.3g} > {tol:g}")
    return problems


def tolerance(cell: Cell) -> Tolerance:
    row, factor = TOLERANCES[cell.precision.name], cell.feature.tol_factor * cell.method.tol_factor
    return Tolerance(row.reference * factor, row.strategies * factor, row.state * factor)


def check_reference(cell: Cell, run: Run, device: torch.device) -> list[str]:
    tol = tolerance(cell).reference
    ref_out, ref_grads = reference(cell, run, device)
    return _compare("outputs vs reference", run.out, ref_out, tol) + _compare(
        "gradients vs reference", run.grads, ref_grads, tol)


def check_partner(cell: Cell, run: Run, device: torch.device) -> list[str]:
    """Same steps, bit-identical outputs, gradients within tolerance of the recompute strategy's."""
    if cell.strategy.name == PARTNER:
        return []
    partner = cached_solve(replace(cell, strategy=next(s for s in STRATEGIES if s.name == PARTNER)), device)
    mine, theirs = run.stats.last_grid, partner.stats.last_grid
    if mine != theirs:
        n = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        return [(f"accepted steps differ from {PARTNER}'s from node {n} on: {len(mine) - 1} "
                 f"steps vs {len(theirs) - 1}, "
                 f"node {n}: {mine[n] if n < len(mine) else None!r} vs {theirs[n] if n < len(theirs) else None!r}")]
    tol = tolerance(cell).strategies
    return _compare(f"outputs vs {PARTNER}", run.out, partner.out, tol) + _compare(
        f"gradients vs {PARTNER}", run.grads, partner.grads, tol)



def check_strategy_used(cell: Cell, run: Run) -> list[str]:
    used = run.stats.last_adjoint
    return [] if used in cell.strategy.reports else [f"last_adjoint = {used!r}, expected one of "
                                                     f"{sorted(cell.strategy.reports)}"]


def peer_applies(cell: Cell) -> bool:
    """torchdiffeq takes the same steps: it has the method, and the grid is fixed or the arithmetic float64."""
    return cell.method.in_torchdiffeq and (not cell.method.adaptive or cell.precision.name == "float64")


def check_module_state(cell: Cell, run: Run, device: torch.device) -> list[str]:
    """Buffers, ``training`` and the generator after forward and after backward equal torchdiffeq's after its
    forward."""
    case = build(cell, device)
    torch.manual_seed(SEED)
    with cell.precision.context(device):
        torchdiffeq.odeint(case.func, case.y0, case.t, options=case.options or None, **case.kwargs)
    want = module_state(case)
    tol = tolerance(cell).state
    problems = []
    for when, got in (("after forward", run.state_forward), ("after backward", run.state_backward)):
        for key, value in want.items():
            problem = _state_difference(got.get(key), value, tol)
            if problem:
                problems.append(f"{when}: {key} differs from torchdiffeq's: {problem}")
    return problems


def _state_difference(mine: Any, theirs: Any, tol: float) -> str | None:
    """Flags and generator states must be equal, integer buffers too, float buffers within ``tol``."""
    if isinstance(theirs, bool) or mine is None:
        return None if mine == theirs else f"{mine!r} vs {theirs!r}"
    if theirs.dtype == torch.uint8:  # a generator state
        return None if torch.equal(mine, theirs) else "another generator state"
    if not theirs.dtype.is_floating_point:
        return None if torch.equal(mine, theirs) else f"{mine.tolist()} vs {theirs.tolist()}"
    return None if rel(mine, theirs) <= tol else f"relative difference {rel(mine, theirs):.3g} > {tol:g}"


#: A power-of-two loss scale meets power-of-two adjoint scales: the float16 arithmetic sees the same significands
#: and the gradients scale exactly (measured: 0 on fixed grids); two float16 roundoffs are allowed.
LOSS_SCALE_TOL = 1e-3


def check_loss_scale(cell: Cell, run: Run, device: torch.device) -> list[str]:
    """float16: a loss scaled by 2^-20 gives the gradients times 2^-20 (the adjoint scaling must absorb it)."""
    scale = 2.0**-20
    scaled = solve(cell, device, loss_scale=scale)
    return _compare("gradients / loss scale 2^-20", [g / scale for g in scaled.grads], run.grads, LOSS_SCALE_TOL)


try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
except OSError:  # no C library by that name (Windows): the CPU meter is unavailable
    _LIBC = None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def live_bytes(device: torch.device) -> int | None:
    """Bytes allocated and not freed (CUDA: the caching allocator's; CPU: glibc's heap, None without glibc)."""
    gc.collect()
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    if not hasattr(_LIBC, "mallinfo2"):
        return None
    _LIBC.mallinfo2.restype = _MallInfo2
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


#: a leak is growth at every call; single calls may grow by a few hundred bytes (Python's own caches)
LEAK_BYTES_PER_CALL = 1024


def check_memory(cell: Cell, device: torch.device) -> list[str]:
    """Three more calls on the same model (after one warm-up): live memory must not grow at most of them."""
    case = build(cell, device)
    solve(cell, device, case)
    gc.collect()
    gc.freeze()  # older objects leave the collector's view: each collection below scans only the calls' objects
    try:
        growth, before = [], live_bytes(device)
        if before is None:
            return []
        for _ in range(3):
            solve(cell, device, case)
            after = live_bytes(device)
            growth.append(after - before)
            before = after
    finally:
        gc.unfreeze()
    typical = sorted(growth)[len(growth) // 2]
    return [] if typical <= LEAK_BYTES_PER_CALL else [f"live memory grows by {growth} bytes per call"]


def check_cell(cell: Cell, device: torch.device) -> list[str]:
    """Every check of one cell; returns the problems found (empty: the cell passes)."""
    run = cached_solve(cell, device)
    problems = check_strategy_used(cell, run) + check_reference(cell, run, device) + check_partner(cell, run, device)
    if cell.feature.check is not None:
        problems += cell.feature.check(cell, run, build(cell, device))
    if cell.feature.stateful and peer_applies(cell):
        problems += check_module_state(cell, run, device)
    if cell.feature.loss_scale and cell.precision.name == "float16":
        problems += check_loss_scale(cell, run, device)
    if cell.feature.memory:
        problems += check_memory(cell, device)
    return problems


# ====================================================================== the tests


def test_cell(precision, cell: Cell, device):
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the cells seed the generator
        problems = check_cell(cell, device)
    assert not problems, f"{cell.id}:\n  " + "\n  ".join(problems)


def test_every_tableau_is_a_method_entry():
    assert sorted(m.name for m in METHODS) == sorted(TABLEAUX)


@pytest.mark.parametrize("column", COLUMNS)
def test_the_fast_slice_covers_every_pair(column):
    wanted = set().union(*(_pairs(c) for c in full_product(column)))
    got = set().union(*(_pairs(c) for c in covering_cells(column)))
    assert got == wanted
    assert len(covering_cells(column)) < len(full_product(column)) / 3
