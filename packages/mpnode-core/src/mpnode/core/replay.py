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
import threading
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


class StepTensors:
    """Per-step values of the tensors the field itself modifies in place while it runs (spectral norm's power
    iteration vectors ``u``/``v``, BatchNorm's running statistics, a counter buffer), for a recompute backward to
    set before it evaluates each step again.

    ``candidates``: the buffers of the modules the solve sees (``modules``, and those called during step 0:
    [`see`][mpnode.core.replay.StepTensors.see]).  [`at_step`][mpnode.core.replay.StepTensors.at_step]
    (called when step ``n`` starts, before its evaluations, on a fixed grid) compares them at step 1 with their
    values before the march (kept for step 0) to find the ``mutated`` ones, and from then on keeps a copy of those only
    (their bytes per step: ``row_bytes``).  [`finish`][mpnode.core.replay.StepTensors.finish] refuses a candidate
    first modified after step 1 (its per-step values were not kept).  An adaptive march (``per_step=False``)
    cannot be replayed per step (rejected attempts and reused stages also modify them): there the mutated tensors
    must not change the field's output (BatchNorm's running statistics in training mode), else the solve is
    refused.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], per_step: bool) -> None:
        self.modules = list(modules)
        self.thread = threading.get_ident()  # the hook in see() is global: other threads' modules are ignored
        self.per_step = per_step
        self.candidates: list[torch.Tensor] = []
        self.first: list[torch.Tensor | None] = []  # every candidate's value at step 0 (the mutated ones' after
        # finish)
        self.mutated: list[int] = []  # indices into candidates
        self.values: list[list[torch.Tensor]] = []  # steps 1, 2, ...: the mutated ones' values
        self.refusal: str | None = None  # raised when a step is recomputed (a kept-graph backward needs no replay)
        self.steps = 0  # at_step calls so far
        self._add(module_buffers(self.modules))  # before the march: step 0's values

    def see(self, module: torch.nn.Module, args: object = None) -> None:
        """A module called during step 0 (a forward pre-hook, so before it modifies its buffers): track them."""
        if threading.get_ident() == self.thread and all(module is not m for m in self.modules):
            self.modules.append(module)
            self._add(module_buffers([module]))

    def _add(self, buffers: Iterable[torch.Tensor]) -> None:
        known = {id(x) for x in self.candidates}
        for b in buffers:
            if id(b) not in known:
                known.add(id(b))
                self.candidates.append(b)
                self.first.append(b.detach().clone())

    @property
    def row_bytes(self) -> int:
        return sum(self.candidates[i].nbytes for i in self.mutated) if self.per_step else 0

    def at_step(self, n: int) -> None:
        """Step ``n`` starts (fixed grid) or was accepted (adaptive): find the mutated buffers (at step 1), keep
        their values (fixed grid)."""
        self.steps += 1
        if n == 0 or not self.candidates:
            return
        if n == 1:
            self.mutated = self._changed(range(len(self.candidates)))
            self._refuse([i for i in self.mutated if not self.per_step and not self._neutral(i)])
        if self.per_step and self.mutated:
            self.values.append([self.candidates[i].detach().clone() for i in self.mutated])

    def finish(self) -> None:
        """After the march: refuse a tensor modified after step 1 that is not tracked."""
        if self.first and self.steps <= 1:  # one step: nothing compared yet
            self.mutated = self._changed(range(len(self.candidates)))
            self._refuse([i for i in self.mutated if not self.per_step and not self._neutral(i)])
        elif self.first:
            late = self._changed(i for i in range(len(self.candidates)) if i not in self.mutated)
            self._refuse([i for i in late if self.per_step or not self._neutral(i)])
        # keep step 0's values of the mutated ones only (the others are as the forward left them)
        self.first = [x if i in self.mutated and self.per_step else None for i, x in enumerate(self.first)]

    def restore(self, n: int) -> None:
        """Set the tracked tensors to the values step ``n`` started from (without bumping version counters); raise
        if they cannot be replayed."""
        if self.refusal is not None:
            raise RuntimeError(self.refusal)
        if not self.per_step or not self.mutated:
            return
        if n == 0:
            for x, value in zip(self.candidates, self.first):
                if value is not None:
                    x.data.copy_(value)
            return
        for i, value in zip(self.mutated, self.values[n - 1] if self.mutated else ()):
            self.candidates[i].data.copy_(value)

    def _neutral(self, i: int) -> bool:
        return any(self.candidates[i] is b for b in output_neutral_buffers(self.modules))

    def _changed(self, indices: Iterable[int]) -> list[int]:
        return [i for i in indices if not torch.equal(self.candidates[i], self.first[i])]  # type: ignore[arg-type]

    def _refuse(self, indices: Sequence[int]) -> None:
        if indices and self.refusal is None:
            shapes = ", ".join(str(tuple(self.candidates[i].shape)) for i in indices)
            self.refusal = (
                f"odeint: func modifies {len(indices)} buffer(s) in place as it runs (shapes {shapes}; e.g. spectral "
                "norm's power iteration in training mode) and they change its output, so a recompute backward "
                "would evaluate each step with other values than the forward did "
                + ("(this solve chooses its steps adaptively, and rejected attempts and reused stages modify them "
                   "too, so their per-step values cannot be replayed)" if not self.per_step else
                   "(they were first modified after the first step, so their per-step values were not kept)")
                + ". Use adjoint=DirectAdjoint() (it keeps the forward's graphs), a fixed grid (options="
                "{'step_size': ...} or a fixed method such as method='rk4'), or module.eval() for the solve. "
                "No gradient was written."
            )


def output_neutral_buffers(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    """The buffers a module updates in training mode without reading them for its output: the running statistics
    of batch/instance norms in training mode (their output uses the batch's statistics)."""
    norms = [m for top in modules for m in top.modules()
             if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.training]
    return [b for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


@contextlib.contextmanager
def parametrize_cache_off() -> Iterator[None]:
    """Turn ``torch.nn.utils.parametrize.cached()`` off for a graph-free forward or a recompute backward.

    Inside ``cached()`` the first access of a parametrized weight stores it for the whole region: computed in the
    graph-free forward it would be stored without a graph, so the recomputation (and the caller's own uses of the
    weight in the region) would read it with no gradient to the original parameters.  With caching off each
    evaluation computes the weight from them, as outside ``cached()`` (the caller's cache is left as it was).
    ``_cache_enabled`` is torch's private counter of the nested ``cached()`` regions.
    """
    from torch.nn.utils import parametrize

    enabled = getattr(parametrize, "_cache_enabled", 0)
    parametrize._cache_enabled = 0
    try:
        yield
    finally:
        parametrize._cache_enabled = enabled


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
        tensors: the per-step values of the buffers the field modifies in place, set before each recomputed step.
    """

    def __init__(self, randomness: StepRandomness | None = None, buffers: Sequence[torch.Tensor] = (),
                 modes: Sequence[tuple[torch.nn.Module, bool]] = (), reads: FirstReads | None = None,
                 tensors: StepTensors | None = None) -> None:
        self.randomness = randomness
        self.tensors = tensors
        self.buffers = list(buffers)
        self.modes = list(modes)
        self.reads = reads

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Around a whole backward pass: the forward's module modes are set, ``parametrize.cached()`` is off; the
        caller's generator states, buffers and module modes are restored at exit."""
        saved = [(b, b.detach().clone()) for b in self.buffers]
        generators = self.randomness.generators if self.randomness is not None else None
        outer = generators.capture() if generators is not None else None
        callers = [(m, m.training) for m, _ in self.modes]
        if self.reads is not None:
            self.reads.start_pass()
        try:
            for m, training in self.modes:
                m.training = training  # per module (module.train() would recurse into children)
            with parametrize_cache_off():
                yield
        finally:
            for m, training in callers:
                m.training = training
            if generators is not None and outer is not None:
                generators.restore(outer)
            for b, value in saved:
                b.data.copy_(value)  # .data: the forward's values again, so the version counter is left alone

    def before_step(self, n: int) -> None:
        """Set the generators and the buffers the field modifies to the state forward step ``n`` started from."""
        if self.tensors is not None:
            self.tensors.restore(n)
        if self.randomness is not None:
            self.randomness.generators.restore(self.randomness.state(n))

    def recomputing(self, field: FlatVectorField, n: int) -> contextlib.AbstractContextManager:
        """Around the evaluations that recompute step ``n`` from its start state: the tensors the forward read are
        checked ([`FirstReads`][mpnode.core.guards.FirstReads]: their bindings before the pass's first recomputed
        step, the reads of step 0's first evaluation, which is the forward's first evaluation again)."""
        if self.reads is None:
            return contextlib.nullcontext()
        self.reads.check_bindings()
        return self.reads.watch(field, lambda: self.before_step(0)) if n == 0 else contextlib.nullcontext()
