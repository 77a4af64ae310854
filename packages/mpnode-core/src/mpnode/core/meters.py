"""Meters of what a solve keeps for its backward pass: the bytes autograd saves.

[`HeldMemory`][mpnode.core.meters.HeldMemory] / [`held_memory`][mpnode.core.meters.held_memory] count the storages
that tensors packed through ``torch.autograd.graph.saved_tensors_hooks`` (``ctx.save_for_backward`` included, hence
mpnode's checkpoints) still hold: a storage counts, once however many saved tensors and views refer to it, while
autograd keeps at least one of them.  A graph freed before the measurement (a rejected step's, one the caller drops)
is not counted, and a storage that reuses a freed one's address is counted as itself, so the same computation
gives the same figure on every run.  [`AutoAdjoint`][mpnode.core.strategies.AutoAdjoint] meters its kept graphs with
it during the forward pass; tests, demos and ``mpnode.bench`` use it to measure what a solve holds (re-exported by
[`mpnode.core.testing`][mpnode.core.testing] and [`mpnode.bench.profilers`][mpnode.bench.profilers]).

How: the pack hook returns a small slot object that autograd stores in place of the tensor; the slot lives exactly
as long as autograd's saved tensor, and its finaliser tells the meter when autograd lets go.  Storages are told
apart by identity (a weak reference to each ``untyped_storage()``, whose Python object torch keeps for the storage's
lifetime), not by address.  A meter holds no tensor: a slot keeps a detached alias of the tensor (a saved output
kept as itself would tie the autograd node to itself through the hook, a reference cycle the garbage collector
cannot see, so the graph would never be freed), or what the chained outer hooks packed.

[`available_memory_bytes`][mpnode.core.meters.available_memory_bytes] tells what a new allocation can use (a
fixed grid too large for it is refused before it is built).

Two facts come from private torch APIs; each is asked in one function here
([`outer_saved_tensors_hooks`][mpnode.core.meters.outer_saved_tensors_hooks],
[`in_backward_pass`][mpnode.core.meters.in_backward_pass]), which ``tests/core/test_meters.py`` checks on the installed
torch.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "HeldMemory", "HeldStorage", "held_memory", "outer_saved_tensors_hooks", "in_backward_pass",
    "available_memory_bytes",
]

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


@dataclass(frozen=True)
class HeldStorage:
    """One storage a meter counts: its size in bytes, the dtype of the first tensor that packed it, its device."""

    nbytes: int
    dtype: torch.dtype
    device: torch.device


class _Record:
    """A storage seen by a meter and how many of autograd's saved tensors (slots) refer to it now."""

    __slots__ = ("slots", "storage")

    def __init__(self, storage: HeldStorage) -> None:
        self.storage, self.slots = storage, 0


class _Ledger:
    """The records held now (at least one live slot), their total bytes and the most held at once.

    ``index`` finds the record of a live storage by the identity of its Python object (``id`` -> weak reference,
    record), so a later storage at the same address or ``id`` gets its own; entries of freed storages are dropped
    as the index grows.  Nothing here refers back to the ledger: it is freed with its meter and last slot.
    """

    def __init__(self) -> None:
        self.held: set[_Record] = set()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.index: dict[int, tuple[weakref.ref, _Record]] = {}
        self._prune_at = 64

    def record(self, storage: torch.UntypedStorage, x: torch.Tensor) -> _Record:
        entry = self.index.get(id(storage))
        if entry is not None and entry[0]() is storage:
            return entry[1]
        if len(self.index) >= self._prune_at:
            self.index = {k: e for k, e in self.index.items() if e[0]() is not None}
            self._prune_at = 2 * len(self.index) + 64
        rec = _Record(HeldStorage(storage.nbytes(), x.dtype, x.device))
        self.index[id(storage)] = (weakref.ref(storage), rec)
        return rec

    def acquire(self, rec: _Record) -> None:
        rec.slots += 1
        if rec.slots == 1:
            self.held.add(rec)
            self.live_bytes += rec.storage.nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def release(self, rec: _Record) -> None:
        rec.slots -= 1
        if rec.slots == 0:
            self.held.discard(rec)
            self.live_bytes -= rec.storage.nbytes

    def storages(self) -> tuple[HeldStorage, ...]:
        return tuple(rec.storage for rec in list(self.held))


class _Slot:
    """What autograd stores for one saved tensor while a meter is active: ``packed`` (a detached alias, or the
    outer hooks' packing) and the record it keeps held in ``ledger`` until autograd frees this slot."""

    __slots__ = ("ledger", "packed", "record")

    def __init__(self, packed: Any, ledger: _Ledger, record: _Record | None) -> None:
        self.packed, self.ledger, self.record = packed, ledger, record
        if record is not None:
            ledger.acquire(record)

    def __del__(self) -> None:
        if self.record is not None:
            self.ledger.release(self.record)


class HeldMemory:
    """Storages autograd holds for backward, packed while this meter is active (``with HeldMemory() as m:``).

    Every tensor autograd saves passes a ``saved_tensors_hooks`` pack hook.  A storage counts while at least one
    saved tensor packed through this meter refers to it, once however many do (views of one buffer count once).
    Storages are told apart by identity, not by address.  Nothing is copied or retained (see the module docstring).

    While the meter is active, [`bytes`][mpnode.core.meters.HeldMemory.bytes] is what is held *now*; after the
    ``with`` block it is what was held when the block ended (the forward's figure, also read after ``backward()``
    has freed the graph).  A meter can be entered again: it goes on counting what it packed before.

    Args:
        exclude: tensors whose storages are not counted (e.g. the parameters every solver shares); the meter keeps
            weak references to their storages only.
        chain: pass every tensor on to the hooks active when the meter is entered (they would otherwise be
            bypassed: hooks do not nest).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), chain: bool = False) -> None:
        self.chain = chain
        self._excluded = {id(s): weakref.ref(s) for s in map(_storage, exclude) if s is not None}
        self._forward = _Ledger()  # packs made outside backward passes: held for backward
        self._recompute = _Ledger()  # packs made inside backward passes (e.g. a recomputed step): transient
        self._at_exit: tuple[HeldStorage, ...] | None = None
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    @property
    def storages(self) -> tuple[HeldStorage, ...]:
        """The storages held for backward: now while active, else when the ``with`` block ended."""
        return self._forward.storages() if self._at_exit is None else self._at_exit

    @property
    def bytes(self) -> int:
        """Total bytes of the distinct storages held for backward (see the class docstring for *when*)."""
        return self._forward.live_bytes if self._at_exit is None else sum(s.nbytes for s in self._at_exit)

    @property
    def peak_bytes(self) -> int:
        """The most bytes held for backward at once since the meter was created (a region that runs the backward
        pass too: what the forward held before backward freed it)."""
        return self._forward.peak_bytes

    @property
    def recompute_bytes(self) -> int:
        """The most bytes held at once by tensors packed *inside* backward passes (for instance a recompute-based
        adjoint rebuilding one step): transient, not part of [`bytes`][mpnode.core.meters.HeldMemory.bytes]."""
        return self._recompute.peak_bytes

    def bytes_by_dtype(self) -> dict[torch.dtype, int]:
        """[`bytes`][mpnode.core.meters.HeldMemory.bytes] split by the dtype of the tensor that first packed each
        storage."""
        out: dict[torch.dtype, int] = {}
        for s in self.storages:
            out[s.dtype] = out.get(s.dtype, 0) + s.nbytes
        return out

    def __enter__(self) -> HeldMemory:
        outer = outer_saved_tensors_hooks() if self.chain else None
        self._at_exit = None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(*_hooks(self, outer))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        hooks, self._hooks = self._hooks, None  # no meter <-> hooks reference cycle outlives the region
        assert hooks is not None, "exit follows enter"
        hooks.__exit__(*exc)
        self._at_exit = self._forward.storages()

    def slot(self, x: torch.Tensor, packed: Any) -> _Slot:
        """What the pack hook returns for ``x``: ``packed`` and the record of ``x``'s storage (in the recompute
        ledger inside a backward pass), none for what is not counted: excluded storages, empty ones, non-strided
        tensors and tensor subclasses without a storage."""
        ledger = self._recompute if in_backward_pass() else self._forward
        s = _storage(x)
        if s is None or s.nbytes() == 0:
            return _Slot(packed, ledger, None)
        excluded = self._excluded.get(id(s))
        if excluded is not None and excluded() is s:
            return _Slot(packed, ledger, None)
        return _Slot(packed, ledger, ledger.record(s, x))

    def __repr__(self) -> str:
        return f"HeldMemory(bytes={self.bytes}, peak_bytes={self.peak_bytes}, recompute_bytes={self.recompute_bytes})"


def _storage(x: Any) -> torch.UntypedStorage | None:
    if not isinstance(x, torch.Tensor) or x.layout != torch.strided:
        return None
    try:
        return x.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return None


def _hooks(meter: HeldMemory, outer: Hooks | None) -> Hooks:
    """The meter's pack/unpack pair: a slot holding the record and a detached alias (or ``outer``'s packing)."""

    def pack(x: torch.Tensor) -> _Slot:
        return meter.slot(x, x.detach() if outer is None else outer[0](x))

    if outer is None:
        return pack, _unpack
    outer_unpack = outer[1]
    return pack, lambda slot: outer_unpack(slot.packed)


def _unpack(slot: _Slot) -> torch.Tensor:
    return slot.packed


def held_memory(exclude: Iterable[torch.Tensor] = (), chain: bool = False) -> HeldMemory:
    """A [`HeldMemory`][mpnode.core.meters.HeldMemory] meter for ``with held_memory(exclude=model.parameters()) as m:``.

    ``exclude``: tensors whose storages are not counted (pass the parameters to
    leave out the weights every solver shares).  ``chain``: pass every tensor on to
    the saved-tensor hooks active when the meter is entered (they would otherwise be
    bypassed: hooks do not nest).
    """
    return HeldMemory(exclude, chain)


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
