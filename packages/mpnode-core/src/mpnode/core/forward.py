"""The forward pass of a strategy that differentiates it later: march, discover, guard.

[`tracked_forward`][mpnode.core.forward.tracked_forward] runs the graph-free march of a solve whose backward pass
will recompute steps, and returns everything such a backward needs besides the
strategy's own storage (its [`Recorder`][mpnode.core.contracts.Recorder]):

* the **gradient targets**: the solve's targets plus (without ``adjoint_params``) the grad-requiring tensors the first
  evaluation of ``func`` turned out to use ([`CapturedTensorProbe`][mpnode.core.parameters.CapturedTensorProbe]: a
  closure's ``c``, a module's context attribute), found on that evaluation itself, so discovery costs no extra
  evaluation;
* a [`Replay`][mpnode.core.replay.Replay]: per-step random states (fixed grids), the
  buffers of the modules the solve can see, restored after the backward pass, and
  those modules' ``training`` flags, set as in the forward for the backward pass;
* a [`VersionRecord`][mpnode.core.guards.VersionRecord] of everything the recomputation reads:
  the targets, the constants, the times and the tensors without gradient that the
  first evaluation read (frozen parameters, buffers, captured constants) and the
  forward did not itself modify.

The march starts from a copy of ``y0``, so a field that writes into its input
(refused at that evaluation) leaves the caller's ``y0`` as it was.

The march runs outside the strategy's autograd Function, so the discovered tensors
can become the Function's inputs; the Function then only saves what was recorded.
The solution is checked ([`check_solution`][mpnode.core.guards.check_solution]) before the
caller commits the solve's counters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from .contracts import ForwardingRecorder, Problem, Recorder, SolveInputs, Trajectory
from .guards import FirstReads, VersionRecord, check_solution
from .march import AdaptiveMarch, March
from .parameters import CapturedTensorProbe
from .precision import PrecisionPolicy
from .replay import (
    RandomStates,
    Replay,
    StepRandomness,
    StepTensors,
    cuda_devices,
    module_buffers,
    module_modes,
    parametrize_cache_off,
)


@dataclass
class TrackedForward:
    """What [`tracked_forward`][mpnode.core.forward.tracked_forward] returns.

    Attributes:
        trajectory: the accepted steps.
        params: the gradient targets: the solve's own, then the discovered ones.
        replay: random states, modified buffers and module modes for the backward pass.
        versions: ``_version`` of the targets, the restricted parameters, the times and
            the tensors without gradient the first evaluation read.
        nfe0: the field's evaluation count before the march (for the counters).
    """

    trajectory: Trajectory
    params: list[torch.Tensor]
    replay: Replay
    versions: VersionRecord
    nfe0: int

    @property
    def needs_grad(self) -> bool:
        return any(x is not None and x.requires_grad for x in self.params)


def tracked_forward(problem: Problem, march: March, inputs: SolveInputs, recorder: Recorder,
                    replay_rng: bool) -> tuple[torch.Tensor, TrackedForward]:
    """March without a graph, recording through ``recorder``; returns the ``(T, D)`` outputs
    (no graph) and the [`TrackedForward`][mpnode.core.forward.TrackedForward]; see the module docstring.

    With ``replay_rng`` the generator states are tracked (per step on fixed grids); a
    stochastic field on an adaptive grid is refused (its draws cannot be replayed
    per step: rejected attempts and first-same-as-last stages consume them) as soon
    as it draws: after the first evaluation, then at every accepted step, so a
    field whose noise collapses the step size is refused at once, not after the
    march.
    """
    adaptive = isinstance(march, AdaptiveMarch)
    randomness = None
    if replay_rng:
        randomness = StepRandomness(RandomStates(cuda_devices([inputs.y0, *inputs.params, *inputs.constants])))
        randomness.start()
        recorder = (_RefuseRandomness if adaptive else _RandomnessRecorder)(recorder, randomness)
    tensors = StepTensors(inputs.modules, not adaptive)
    recorder = _TensorsRecorder(recorder, tensors)
    probe = CapturedTensorProbe()  # also without discovery: the modules called and the tensors read
    first_call = probe
    if randomness is not None:
        first_call = _checked_call(probe, functools.partial(_after_first_call, probe, randomness, adaptive))
    first_evaluation: list = []
    problem.field.next_call_hook = _seeing_modules(first_call, tensors, first_evaluation)
    nfe0 = problem.field.nfe
    forget_cached_casts(problem.policy)
    try:
        with torch.no_grad(), problem.policy.autocast(), parametrize_cache_off():
            outputs, trajectory = march.march(problem, inputs, inputs.y0.detach().clone(), recorder)
    finally:
        problem.field.next_call_hook = None
    check_solution(outputs, problem.policy)
    tensors.finish()
    if randomness is not None and randomness.finish() and adaptive:
        raise RuntimeError(ADAPTIVE_RANDOMNESS_REFUSED)
    params = list(inputs.params)
    if inputs.discover:
        params += probe.new_targets([*params, *inputs.constants, inputs.y0])
    modules = [*inputs.modules, *probe.modules]
    buffers = module_buffers(modules)
    buffers += [x for x in probe.modified if all(x is not b for b in buffers)]
    reads = FirstReads(probe.reads(), modules, first_evaluation[0] if first_evaluation else None)
    replay = Replay(randomness if randomness is not None and randomness.consumed else None, buffers,
                    module_modes(modules), reads, tensors)
    versions = VersionRecord([*params, *inputs.constants, inputs.t, inputs.grid, *probe.unchanged_reads()])
    return outputs, TrackedForward(trajectory, params, replay, versions, nfe0)


#: Why a field that draws random numbers is refused on adaptive steps by the strategies that recompute.
ADAPTIVE_RANDOMNESS_REFUSED = (
    "odeint: func draws random numbers (dropout, torch.randn, ...) and this solve chooses its steps adaptively, so "
    "a recompute backward cannot replay the forward's draws (rejected attempts and reused stages consume them) and "
    "the gradient would belong to other noise. Use adjoint=DirectAdjoint() to backpropagate through the forward's "
    "own draws (as torchdiffeq does; it keeps every step's graph), a fixed grid (options={'step_size': ...} or a "
    "fixed method such as method='rk4'), a deterministic func (module.eval(), or noise drawn once outside func and "
    "captured), or accept gradients of fresh draws with adjoint=RecomputeAdjoint(replay_rng=False). (Noise that is "
    "not small against rtol/atol also makes adaptive steps collapse: prefer a fixed grid for stochastic fields.)"
)


def forget_cached_casts(policy: PrecisionPolicy) -> None:
    """Empty autocast's weight-cast cache when the solve starts inside the caller's autocast region.

    The cache maps a weight to its low-precision copy for the whole region and does not see in-place changes: a
    weight used before the solve and then modified under ``no_grad`` would enter the forward as its stale copy,
    while a recompute backward (its own autocast region) casts the current weight, and the gradient would match
    neither.  Emptying it (a thread-local map) makes the solve cast each weight afresh, once; the caller's ops after
    the solve cast theirs again (one cast and one low-precision copy per weight, where their earlier graph keeps
    the old copy alive).
    """
    if policy.autocast_dtype is not None and torch.is_autocast_enabled(policy.device_type):
        torch.clear_autocast_cache()


def _after_first_call(probe: CapturedTensorProbe, randomness: StepRandomness, adaptive: bool) -> None:
    """After the first evaluation: track the generators it passed as ``generator=``; on adaptive steps refuse a
    draw."""
    randomness.adopt(probe.generators)
    if adaptive:
        _refuse_draws(randomness)


def _refuse_draws(randomness: StepRandomness) -> None:
    """Raise `ADAPTIVE_RANDOMNESS_REFUSED` if a generator moved since the solve started (one state read)."""
    if not RandomStates.same(randomness.generators.capture(), randomness.initial_state()):
        raise RuntimeError(ADAPTIVE_RANDOMNESS_REFUSED)


def _seeing_modules(call, tensors: StepTensors, first: list):
    """A one-shot field hook: ``call``, with every module called shown to ``tensors`` before it runs; appends
    ``(t, y, output)`` to ``first`` (held for [`FirstReads`][mpnode.core.guards.FirstReads]: one state-sized output)."""

    def seeing(func, t, y):
        handle = register_module_forward_pre_hook(tensors.see)
        try:
            out = call(func, t, y)
        finally:
            handle.remove()
        first.append(_detached((t, y, out)))  # values only: a kept graph of this evaluation is not held twice
        return out

    return seeing


def _detached(obj):
    """``obj`` with each tensor in its nested tuples and lists detached (the same storage, no graph)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(x) for x in obj)
    return obj


def _checked_call(probe, check):
    """A one-shot field hook: the evaluation (through ``probe`` when discovering), then ``check()``."""

    def call(func, t, y):
        out = func(t, y) if probe is None else probe(func, t, y)
        check()
        return out

    return call


class _RefuseRandomness(ForwardingRecorder[Recorder]):
    """Adaptive steps: passes each accepted step on to ``inner`` after checking that no random number was drawn."""

    def __init__(self, inner: Recorder, randomness: StepRandomness) -> None:
        self.inner, self.randomness = inner, randomness

    def record(self, n, y, first_stage):
        _refuse_draws(self.randomness)
        self.inner.record(n, y, first_stage)


class _RandomnessRecorder(ForwardingRecorder[Recorder]):
    """Passes each step on to ``inner`` after logging the generator state the step starts from.

    Logged at ``record``, which a fixed grid calls before evaluating the step.
    """

    def __init__(self, inner: Recorder, randomness: StepRandomness) -> None:
        self.inner, self.randomness = inner, randomness

    def record(self, n, y, first_stage):
        self.randomness.at_step(n)
        self.inner.record(n, y, first_stage)


class _TensorsRecorder(ForwardingRecorder[Recorder]):
    """Passes each step on to ``inner`` after keeping the values of the buffers the field modifies in place
    ([`StepTensors`][mpnode.core.replay.StepTensors]); their bytes per step count against an AutoAdjoint budget."""

    def __init__(self, inner: Recorder, tensors: StepTensors) -> None:
        self.inner, self.tensors = inner, tensors

    def record(self, n, y, first_stage):
        self.tensors.at_step(n)
        if n == 1 and self.tensors.row_bytes:
            count = getattr(self.inner, "count_row_bytes", None)
            if count is not None:
                count(self.tensors.row_bytes)
        self.inner.record(n, y, first_stage)
