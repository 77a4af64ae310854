"""Profilers usable from any training script: time, memory held for backward, peak memory, host syncs.

Four pieces, each usable alone, and [`profile`][mpnode.bench.profilers.profile] combining them::

    from mpnode.bench import profile
    with profile("cuda") as rec:
        loss = model(x)
        loss.backward()
    print(rec.time_s, rec.peak_bytes, rec.held_bytes, rec.host_syncs)

* [`time_fn`][mpnode.bench.profilers.time_fn]: warm-up, then ``repeats`` timed calls; CUDA events on a GPU,
  ``time.perf_counter`` elsewhere; returns a [`Timing`][mpnode.bench.profilers.Timing] (median, min, max,
  interquartile spread, every sample).
* [`held_memory`][mpnode.core.meters.held_memory]: bytes of the distinct storages that tensors saved for backward
  through ``torch.autograd.graph.saved_tensors_hooks`` (this includes
  ``ctx.save_for_backward``, hence mpnode's checkpoints) still hold, i.e. the memory a
  forward pass keeps alive for its backward pass;
* [`count_host_syncs`][mpnode.core.testing.count_host_syncs]: calls of ``aten._local_scalar_dense`` (every
  ``.item()``, ``bool(tensor)``, ``float(tensor)``) seen by a ``TorchDispatchMode``.
* [`peak_memory`][mpnode.bench.profilers.peak_memory]: CUDA ``max_memory_allocated`` over a region (reset at entry).

The held-memory meter lives in [`mpnode.core.meters`][mpnode.core.meters] (``AutoAdjoint`` uses it)
and the host-sync meter in [`mpnode.core.testing`][mpnode.core.testing] (so core's tests can use them
with torch alone); both are re-exported here.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from mpnode.core.meters import HeldMemory, held_memory
from mpnode.core.testing import SyncCount, count_host_syncs

__all__ = [
    "Timing",
    "time_fn",
    "HeldMemory",
    "held_memory",
    "SyncCount",
    "count_host_syncs",
    "PeakMemory",
    "peak_memory",
    "ProfileRecord",
    "profile",
    "synchronize",
]


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def synchronize(device: torch.device | str) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# --------------------------------------------------------------------------- time


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls, in seconds.

    Attributes:
        samples: every timed call's duration (warm-up calls excluded).
        median_s, min_s, max_s: statistics of ``samples``.
        spread_s: interquartile range of ``samples`` (0 for fewer than 2 samples).
    """

    samples: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples)

    @property
    def min_s(self) -> float:
        return min(self.samples)

    @property
    def max_s(self) -> float:
        return max(self.samples)

    @property
    def spread_s(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[2] - q[0]


class Stopwatch:
    """One timed interval: CUDA events on a GPU, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def __enter__(self) -> Stopwatch:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.elapsed_s = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.elapsed_s = time.perf_counter() - self._t0


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 1,
    repeats: int = 5,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    ``setup()`` (untimed) runs before every call, e.g. to zero gradients.  On a
    CUDA device the interval is measured with CUDA events after a
    synchronisation, so queued kernels are included and nothing else is.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_fn needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    dev = _as_device(device)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        synchronize(dev)
        with Stopwatch(dev) as sw:
            fn()
        samples.append(sw.elapsed_s)
    return Timing(tuple(samples))


# ------------------------------------------------------------------- peak memory


@dataclass
class PeakMemory:
    """CUDA memory over a region; all fields ``None`` off CUDA.

    Attributes:
        peak_bytes: ``torch.cuda.max_memory_allocated`` during the region (reset at entry).
        start_bytes: ``torch.cuda.memory_allocated`` at entry, so
            ``peak_bytes - start_bytes`` is what the region added at its peak.
    """

    peak_bytes: int | None = None
    start_bytes: int | None = None


@contextlib.contextmanager
def peak_memory(device: torch.device | str) -> Iterator[PeakMemory]:
    """Peak CUDA memory allocated in a region (``None`` fields on other devices)."""
    dev = _as_device(device)
    rec = PeakMemory()
    if dev.type != "cuda":
        yield rec
        return
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    rec.start_bytes = torch.cuda.memory_allocated(dev)
    try:
        yield rec
    finally:
        torch.cuda.synchronize(dev)
        rec.peak_bytes = torch.cuda.max_memory_allocated(dev)


# ---------------------------------------------------------------------- profile


@dataclass
class ProfileRecord:
    """What [`profile`][mpnode.bench.profilers.profile] measured; filled in when the ``with`` block exits.

    Attributes:
        time_s: wall time of the region in seconds (device-synchronised on CUDA).
        peak_bytes: CUDA peak allocated bytes in the region (reset at entry); ``None`` off CUDA.
        start_bytes: CUDA allocated bytes at entry; ``None`` off CUDA.
        held_bytes: the most bytes held for backward at once in the region
            ([`peak_bytes`][mpnode.core.meters.HeldMemory.peak_bytes]): with the backward pass inside the region,
            what the forward held before backward freed it.
        recompute_bytes: the most bytes held at once by tensors saved inside backward passes.
        host_syncs: ``aten._local_scalar_dense`` calls, or ``None`` when ``sync_count=False``.
        held: the full [`HeldMemory`][mpnode.core.meters.HeldMemory] (its per-storage detail is what was still held
            when the region ended).
    """

    time_s: float | None = None
    peak_bytes: int | None = None
    start_bytes: int | None = None
    held_bytes: int | None = None
    recompute_bytes: int | None = None
    host_syncs: int | None = None
    held: HeldMemory | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "time_s": self.time_s,
            "peak_bytes": self.peak_bytes,
            "held_bytes": self.held_bytes,
            "recompute_bytes": self.recompute_bytes,
            "host_syncs": self.host_syncs,
        }


@contextlib.contextmanager
def profile(
    device: torch.device | str, sync_count: bool = True, exclude: Iterable[torch.Tensor] = ()
) -> Iterator[ProfileRecord]:
    """Measure a region: time, CUDA peak memory, memory held for backward, host syncs.

    ``with profile(dev) as rec: loss = model(x); loss.backward()`` then read
    ``rec.time_s``, ``rec.peak_bytes``, ``rec.held_bytes``, ``rec.host_syncs``.
    ``sync_count=True`` routes every op through a Python dispatch mode, which
    slows the region: use ``sync_count=False`` (or [`time_fn`][mpnode.bench.profilers.time_fn]) for timings.
    ``exclude``: tensors (e.g. parameters) whose storages ``held_bytes`` ignores.
    """
    dev = _as_device(device)
    rec = ProfileRecord()
    with contextlib.ExitStack() as stack:
        peak = stack.enter_context(peak_memory(dev))
        held = stack.enter_context(held_memory(exclude))
        syncs = stack.enter_context(count_host_syncs()) if sync_count else None
        synchronize(dev)
        sw = stack.enter_context(Stopwatch(dev))
        yield rec
    # ExitStack closed the stopwatch first (LIFO), then the counter, hooks and the peak meter.
    rec.time_s = sw.elapsed_s
    rec.peak_bytes, rec.start_bytes = peak.peak_bytes, peak.start_bytes
    rec.held, rec.held_bytes, rec.recompute_bytes = held, held.peak_bytes, held.recompute_bytes
    rec.host_syncs = None if syncs is None else syncs.count
