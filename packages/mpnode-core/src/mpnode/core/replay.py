"""Making a recomputed step see what the forward step saw, and leave no trace.

A recompute backward evaluates ``func`` again.  Three things would differ from the
forward pass without care (see docs/guarantees.md):

* **random numbers** (dropout, ``torch.randn_like`` inside ``func``): the
  recomputation would draw fresh ones, and the gradient would belong to another
  trajectory.  [`StepRandomness`][mpnode.core.replay.StepRandomness] captures the random-number generators' states
  (the CPU generator and the generator of every CUDA device, once CUDA is in use, and every ``torch.Generator``
  the field's first evaluation passes as ``generator=``)
  at the start of every step of the forward, *only once the field has
  consumed randomness* (until then each step starts from the solve's initial
  state, which is all that is kept), and [`Replay`][mpnode.core.replay.Replay] sets them again before
  each recomputed step, like ``torch.utils.checkpoint`` does;
* **module buffers** (BatchNorm's running statistics and ``num_batches_tracked``): the recomputation would update them a
  second time.  [`Replay`][mpnode.core.replay.Replay] copies the buffers of every module the solve can see (see
  [`mpnode.core.parameters.reachable_modules`][mpnode.core.parameters.reachable_modules] and the modules the first
  evaluation called) when backward starts, and writes them back when it ends, without bumping their version counters
  (the values are the forward's again).  (Version counters cannot tell: ``batch_norm`` updates its running statistics
  without bumping them.)
* **module modes** (``model.eval()`` / ``.train()`` between forward and backward):
  the recomputation would evaluate another function (BatchNorm on running
  statistics instead of batch statistics, dropout off).  [`Replay`][mpnode.core.replay.Replay] records
  the ``training`` flag of every seen module and submodule after the forward, sets
  those flags for the backward pass and gives the caller's flags back when it ends
  (also when it raises).

Both are generic over adjoint strategies: a strategy that recomputes steps wraps its backward in
[`Replay.session`][mpnode.core.replay.Replay.session] and calls
[`Replay.before_step`][mpnode.core.replay.Replay.before_step].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch

from .guards import FirstReads
from .state import FlatVectorField

#: the CPU generator's state, the tracked CUDA devices' and the tracked user generators'
RngState = tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]


def cuda_devices(tensors: Iterable[torch.Tensor | None]) -> tuple[int, ...]:
    """The CUDA devices whose generators a solve tracks: every device once CUDA is initialised
    (a field may draw on any of them), else those of ``tensors`` (sorted, unique).

    CUDA is never initialised here for a CPU-only solve.
    """
    devices = {x.device.index or 0 for x in tensors if x is not None and x.device.type == "cuda"}
    if torch.cuda.is_initialized():
        devices |= set(range(torch.cuda.device_count()))
    return tuple(sorted(devices))


class RandomStates:
    """Reads and writes the CPU generator's, some CUDA generators' and some user ``torch.Generator`` objects'
    states (``user`` grows when a march finds one:
    [`StepRandomness.adopt`][mpnode.core.replay.StepRandomness.adopt])."""

    def __init__(self, devices: Sequence[int], user: Sequence[torch.Generator] = ()) -> None:
        self.devices = tuple(devices)
        self.user = list(user)

    def capture(self) -> RngState:
        return (torch.get_rng_state(), tuple(torch.cuda.get_rng_state(d) for d in self.devices),
                tuple(g.get_state() for g in self.user))

    def restore(self, state: RngState) -> None:
        cpu, cuda, user = state
        torch.set_rng_state(cpu)
        for d, s in zip(self.devices, cuda):
            torch.cuda.set_rng_state(s, d)
        for g, s in zip(self.user, user):
            g.set_state(s)

    @staticmethod
    def same(a: RngState, b: RngState) -> bool:
        return torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip((*a[1], *a[2]), (*b[1], *b[2])))


class StepRandomness:
    """The generator state at the start of every forward step, stored only after the field consumed randomness.

    Call `start` before the march, `at_step` when step ``n`` starts
    (before its evaluations) and [`finish`][mpnode.core.replay.StepRandomness.finish] after it.  Steps before the first
    consumption share the initial state; from the first step that starts from a
    different state on, one state per step is stored (CPU: 5056 bytes, CUDA: 16
    bytes per device).
    """

    def __init__(self, generators: RandomStates) -> None:
        self.generators = generators
        self.initial: RngState | None = None
        self.first_changed: int | None = None  # first step whose start state differs from the initial one
        self.states: list[RngState] = []
        self.consumed = False

    def start(self) -> None:
        self.initial = self.generators.capture()

    def initial_state(self) -> RngState:
        """The generator state the solve started from (between ``start`` and a ``finish`` that found no draw)."""
        assert self.initial is not None, "start() runs before the march"
        return self.initial

    def at_step(self, n: int) -> None:
        state = self.generators.capture()
        if self.first_changed is None:
            if RandomStates.same(state, self.initial_state()):
                return
            self.first_changed = n
        self.states.append(state)

    def adopt(self, found: Sequence[tuple[torch.Generator, torch.Tensor]]) -> None:
        """Track user generators first seen during the march (by the probe of the field's first evaluation), each
        from its state before its first draw: the state it had at every step start captured so far (nothing of
        the solve drew from it before)."""
        new = [(g, state) for g, state in found if all(g is not h for h in self.generators.user)]
        if not new:
            return
        self.generators.user += [g for g, _ in new]
        extra = tuple(state for _, state in new)
        self.initial = (*self.initial_state()[:2], self.initial_state()[2] + extra)
        self.states = [(cpu, cuda, user + extra) for cpu, cuda, user in self.states]

    def finish(self) -> bool:
        """Whether the field consumed randomness during the forward (compares the final state)."""
        self.consumed = self.first_changed is not None or not RandomStates.same(self.generators.capture(),
                                                                                self.initial_state())
        if not self.consumed:
            self.initial = None
        return self.consumed

    def state(self, n: int) -> RngState:
        """The generator state step ``n`` started from."""
        if self.first_changed is None or n < self.first_changed:
            return self.initial_state()
        return self.states[n - self.first_changed]


def module_buffers(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    """The buffers of ``modules`` and their submodules, each once."""
    return list({id(b): b for m in modules for b in m.buffers()}.values())


def module_modes(modules: Iterable[torch.nn.Module]) -> list[tuple[torch.nn.Module, bool]]:
    """``(module, module.training)`` of ``modules`` and all their submodules, each once."""
    return list({id(s): (s, s.training) for m in modules for s in m.modules()}.values())


class Replay:
    """What a recompute backward restores: per-step random states and modified buffers; and what it checks: the
    tensors the forward's first evaluation read.

    Args:
        randomness: the forward's per-step generator states, or ``None`` when the
            field consumed no randomness (or replay was turned off).
        buffers: tensors a recomputation may modify in place (module buffers);
            their values at the start of backward are restored when it ends.
        modes: ``(module, training)`` as the forward ran each module; set for the
            backward pass, the caller's flags given back when it ends.
        reads: the tensors the forward's first evaluation read, checked around recomputed steps
            ([`recomputing`][mpnode.core.replay.Replay.recomputing]).
    """

    def __init__(self, randomness: StepRandomness | None = None, buffers: Sequence[torch.Tensor] = (),
                 modes: Sequence[tuple[torch.nn.Module, bool]] = (), reads: FirstReads | None = None) -> None:
        self.randomness = randomness
        self.buffers = list(buffers)
        self.modes = list(modes)
        self.reads = reads

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Around a whole backward pass: the forward's module modes are set; the caller's generator states, buffers
        and module modes are restored at exit."""
        saved = [(b, b.detach().clone()) for b in self.buffers]
        generators = self.randomness.generators if self.randomness is not None else None
        outer = generators.capture() if generators is not None else None
        callers = [(m, m.training) for m, _ in self.modes]
        if self.reads is not None:
            self.reads.start_pass()
        try:
            for m, training in self.modes:
                m.training = training  # per module (module.train() would recurse into children)
            yield
        finally:
            for m, training in callers:
                m.training = training
            if generators is not None and outer is not None:
                generators.restore(outer)
            for b, value in saved:
                b.data.copy_(value)  # .data: the forward's values again, so the version counter is left alone

    def before_step(self, n: int) -> None:
        """Set the generators to the state forward step ``n`` started from (no-op without randomness)."""
        if self.randomness is not None:
            self.randomness.generators.restore(self.randomness.state(n))

    def recomputing(self, field: FlatVectorField, n: int) -> contextlib.AbstractContextManager:
        """Around the evaluations that recompute step ``n`` from its start state: the tensors the forward read are
        checked ([`FirstReads`][mpnode.core.guards.FirstReads]: their bindings before the pass's first recomputed
        step, the reads of step 0's first evaluation, which is the forward's first evaluation again)."""
        if self.reads is None:
            return contextlib.nullcontext()
        self.reads.check_bindings()
        return self.reads.watch(field) if n == 0 else contextlib.nullcontext()
