"""Meters of what a solve keeps for its backward pass: the bytes autograd saves.

[`HeldMemory`][mpnode.core.meters.HeldMemory] / [`held_memory`][mpnode.core.meters.held_memory] count the distinct
storages packed through ``torch.autograd.graph.saved_tensors_hooks`` (``ctx.save_for_backward`` included, hence mpnode's
checkpoints).  [`AutoAdjoint`][mpnode.core.strategies.AutoAdjoint] meters its kept graphs with it during the forward
pass; tests, demos and ``mpnode.bench`` use it to measure what a solve holds (re-exported by
[`mpnode.core.testing`][mpnode.core.testing] and [`mpnode.bench.profilers`][mpnode.bench.profilers]).

A meter holds no tensor: its pack hook returns a detached alias of the tensor (a
saved output returned as itself would tie the autograd node to itself through
the hook, a reference cycle the garbage collector cannot see, so the graph would
never be freed), and it records storages by ``(device, data_ptr)`` only.

[`available_memory_bytes`][mpnode.core.meters.available_memory_bytes] tells what a new allocation can use (a
fixed grid too large for it is refused before it is built).

Two facts come from private torch APIs; each is asked in one function here
([`outer_saved_tensors_hooks`][mpnode.core.meters.outer_saved_tensors_hooks],
[`in_backward_pass`][mpnode.core.meters.in_backward_pass]), which ``tests/core/test_meters.py`` checks on the installed
torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["HeldMemory", "held_memory", "outer_saved_tensors_hooks", "in_backward_pass", "available_memory_bytes"]

StorageKey = tuple[str, int]  # (device, data_ptr) of an untyped storage
Hooks = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]


def outer_saved_tensors_hooks() -> Hooks | None:
    """The ``(pack, unpack)`` saved-tensor hooks active now (e.g. the caller's ``save_on_cpu``), or ``None``.

    Hooks do not nest, so a meter passes every tensor on to these (private API;
    where it is missing the meter cannot chain and returns ``None``).
    """
    query = getattr(getattr(torch._C, "_autograd", None), "_top_saved_tensors_default_hooks", None)
    return None if query is None else query(False)


def in_backward_pass() -> bool:
    """Whether autograd's engine is running a backward pass now (private API; ``False`` where it is missing)."""
    query = getattr(torch._C, "_current_graph_task_id", None)
    return query is not None and query() != -1


@dataclass
class HeldMemory:
    """Storages autograd saves for backward while this meter is active (``with HeldMemory() as m:``).

    Every tensor autograd saves passes a ``saved_tensors_hooks`` pack hook;
    storages are deduplicated by ``(device, data_ptr)``, so views of one buffer
    count once.  Nothing is copied or retained (see the module docstring).

    Attributes:
        storages: ``(device, data_ptr) -> (nbytes, dtype)`` of each distinct storage
            packed outside a backward pass (what the forward keeps for backward).
        recompute_storages: the same for packs made *inside* a backward pass (for
            instance a recompute-based adjoint rebuilding one step); these are
            transient and not counted in [`bytes`][mpnode.core.meters.HeldMemory.bytes].
        excluded: keys of storages not to count (e.g. the parameters).
        chain: pass every tensor on to the hooks active when the meter is entered.
    """

    storages: dict[StorageKey, tuple[int, torch.dtype]] = field(default_factory=dict)
    recompute_storages: dict[StorageKey, tuple[int, torch.dtype]] = field(default_factory=dict)
    excluded: set[StorageKey] = field(default_factory=set)
    chain: bool = False
    _hooks: torch.autograd.graph.saved_tensors_hooks | None = field(default=None, init=False, repr=False)

    @property
    def bytes(self) -> int:
        """Total bytes of the distinct storages held for backward."""
        return sum(n for n, _ in self.storages.values())

    @property
    def recompute_bytes(self) -> int:
        """Total bytes of distinct storages packed during backward passes (transient)."""
        return sum(n for n, _ in self.recompute_storages.values())

    def bytes_by_dtype(self) -> dict[torch.dtype, int]:
        """[`bytes`][mpnode.core.meters.HeldMemory.bytes] split by the dtype of the tensor that packed each storage."""
        out: dict[torch.dtype, int] = {}
        for n, dt in self.storages.values():
            out[dt] = out.get(dt, 0) + n
        return out

    def __enter__(self) -> HeldMemory:
        outer = outer_saved_tensors_hooks() if self.chain else None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(*_hooks(self, outer))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        hooks, self._hooks = self._hooks, None  # no meter <-> hooks reference cycle outlives the region
        assert hooks is not None, "exit follows enter"
        hooks.__exit__(*exc)

    def count(self, x: torch.Tensor) -> None:
        """Record ``x``'s storage (as `storages`, or `recompute_storages` inside a backward pass)."""
        if not isinstance(x, torch.Tensor) or x.layout != torch.strided:
            return
        try:
            s = x.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            return
        key = (str(x.device), s.data_ptr())
        if key in self.excluded or s.nbytes() == 0:
            return
        target = self.recompute_storages if in_backward_pass() else self.storages
        previous = target.get(key, (0, x.dtype))[0]
        target[key] = (max(previous, s.nbytes()), x.dtype)


def _hooks(meter: HeldMemory, outer: Hooks | None) -> Hooks:
    """The meter's pack/unpack pair: count, then hand on to ``outer`` (or keep a detached alias)."""

    def pack(x: torch.Tensor) -> Any:
        meter.count(x)
        return x.detach() if outer is None else outer[0](x)

    return pack, (_identity if outer is None else outer[1])


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def held_memory(exclude: Iterable[torch.Tensor] = (), chain: bool = False) -> HeldMemory:
    """A [`HeldMemory`][mpnode.core.meters.HeldMemory] meter for ``with held_memory(exclude=model.parameters()) as m:``.

    ``exclude``: tensors whose storages are not counted (pass the parameters to
    leave out the weights every solver shares).  ``chain``: pass every tensor on to
    the saved-tensor hooks active when the meter is entered (they would otherwise be
    bypassed: hooks do not nest).
    """
    return HeldMemory(excluded={(str(t.device), t.untyped_storage().data_ptr()) for t in exclude}, chain=chain)


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on ``device`` can use: free CUDA memory plus PyTorch's reusable cache on a GPU,
    ``MemAvailable`` of ``/proc/meminfo`` on a Linux host, else the physical memory; ``None`` if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
