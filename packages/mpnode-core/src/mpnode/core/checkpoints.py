"""Storage for the states kept between forward and backward (one row per step), and what the checkpointing
strategies keep with it: [`EveryStepCheckpoints`][mpnode.core.checkpoints.EveryStepCheckpoints] (one row per
accepted step, the recompute strategy) and [`SparseCheckpoints`][mpnode.core.checkpoints.SparseCheckpoints] (every
``k``-th, the segmented strategy).

Rows in a dtype with a narrower exponent range than float32 (float16, float8) are
stored *scaled by a power of two*: row ``n`` is kept as ``y_n * 2^-e_n`` with
``e_n = floor(log2 max|y_n|) - (E - 1)``, ``2^E <= `` the dtype's max, so its
largest element lands in ``[2^(E-1), 2^E)`` (float16: ``[2^14, 2^15)``), and
``2^e_n`` is kept as one float32 per row.  The exponent is chosen on the device
(no host synchronisation) and multiplying by a power of two is exact, so a state
of size 1e-8 or 1e5 round-trips with float16's 11-bit precision instead of
flushing to 0 or overflowing to inf.  Elements more than about 2^38 below their
row's largest element still underflow (float16's subnormal floor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .contracts import Kept, SavedReader, StoreSetup

#: Rows of the first chunk when the number of steps is not known in advance; chunks double up to ``MAX_CHUNK``.
FIRST_CHUNK = 16
MAX_CHUNK = 1024
#: Row exponents are clamped to +-this, so ``2^e`` and ``2^-e`` stay normal float32 numbers.
MAX_ROW_EXPONENT = 120


def needs_row_scaling(dtype: torch.dtype) -> bool:
    """Whether rows stored in ``dtype`` need a per-row power-of-two scale (narrower exponent range than float32)."""
    return torch.finfo(dtype).tiny > torch.finfo(torch.float32).tiny


def row_scale(row: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2^e`` (float32, 0-dim, on ``row``'s device) with ``max|row| / 2^e`` in ``[2^top, 2^(top+1))`` of ``dtype``.

    ``frexp`` gives ``max|row| = m 2^k`` with ``m`` in ``[0.5, 1)``, so ``e = k - 1 - top``
    (clamped); a zero row gets any scale (it stays zero), a non-finite one stays non-finite.
    Chosen on the device: no host synchronisation.
    """
    top = math.floor(math.log2(torch.finfo(dtype).max)) - 1
    _, k = torch.frexp(row.detach().abs().amax())
    one = torch.ones((), dtype=torch.float32, device=row.device)
    return torch.ldexp(one, (k - (top + 1)).clamp_(-MAX_ROW_EXPONENT, MAX_ROW_EXPONENT))


def _prescaled(row: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(row / 2^e, 2^e)`` in ``row``'s dtype for a narrow-range ``dtype``, else ``(row, None)``: what to cast and
    store."""
    if not needs_row_scaling(dtype):
        return row, None
    scale = row_scale(row, dtype)
    return row / scale.to(row.dtype), scale


#: A row as stored: the tensor in the storage dtype and, for narrow-range dtypes, its power-of-two scale.
Encoded = tuple[torch.Tensor, torch.Tensor | None]


def encode_row(row: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``row`` as stored in ``dtype``: ``(row / 2^e in dtype, 2^e)`` for a narrow-range dtype, else ``(row in dtype,
    None)``."""
    scaled, scale = _prescaled(row, dtype)
    return scaled.to(dtype, copy=True), scale


def decode_row(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The row an [`encode_row`][mpnode.core.checkpoints.encode_row] result stands for (float32 when it was scaled)."""
    return stored if scale is None else stored.float() * scale


@dataclass
class StoredRows:
    """The rows a [`CheckpointStore`][mpnode.core.checkpoints.CheckpointStore] kept: ``chunks`` ``(rows_i, width)``
    and, when scaled, ``scales`` ``(rows_i,)`` float32."""

    chunks: list[torch.Tensor]
    scales: list[torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Everything to pass to ``ctx.save_for_backward`` (rebuild with `from_saved`)."""
        return [*self.chunks, *(self.scales or [])]

    @classmethod
    def from_saved(cls, saved: Sequence[torch.Tensor], n_chunks: int, scaled: bool) -> StoredRows:
        chunks = list(saved[:n_chunks])
        return cls(chunks, list(saved[n_chunks: 2 * n_chunks]) if scaled else None)

    def __len__(self) -> int:
        return sum(c.shape[0] for c in self.chunks)

    def row(self, n: int) -> torch.Tensor:
        """Row ``n``: the stored tensor, or (scaled rows) the row multiplied back, in float32."""
        for i, chunk in enumerate(self.chunks):
            if n < chunk.shape[0]:
                return decode_row(chunk[n], None if self.scales is None else self.scales[i][n])
            n -= chunk.shape[0]
        raise IndexError("checkpoint row out of range")


class CheckpointStore:
    """Rows of ``width`` values in ``dtype``, stored in chunks so it can grow without copying.

    With ``rows`` known (a fixed grid) there is one chunk of exactly that many rows.  Otherwise (adaptive steps) chunks
    of 16, 32, ... up to 1024 rows are added as needed and [`finish`][mpnode.core.checkpoints.CheckpointStore.finish]
    trims the last one, so at most one chunk (at most half the data, or 1024 rows) is ever copied.  Rows in
    float16/float8 are scaled by a power of two each (see the module docstring): 4 more bytes per row.

    With ``follow`` (``StoreSetup.follow_field``) the dtype is the one it returns once it returns one (after the
    field's first evaluation); rows appended before that are held as given and stored then (or at ``finish``, in
    ``dtype``).
    """

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device, rows: int | None = None,
                 follow: Callable[[], torch.dtype | None] | None = None) -> None:
        self.width, self.device = width, device
        self.chunks: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []
        self._used = 0  # rows used in the last chunk
        self._rows, self._fixed = rows, rows is not None
        self._follow = follow
        self._pending: list[torch.Tensor] = []  # rows appended before the dtype was known
        self._use(dtype)

    def _use(self, dtype: torch.dtype) -> None:
        self.dtype, self.scaled = dtype, needs_row_scaling(dtype)
        if self._rows is not None and self._follow is None:
            self._add_chunk(self._rows)

    def _settle(self, dtype: torch.dtype) -> None:
        """Fix the dtype and store the rows held until now."""
        self._follow = None
        self._use(dtype)
        pending, self._pending = self._pending, []
        for row in pending:
            self.append(row)

    def _add_chunk(self, size: int) -> None:
        self.chunks.append(torch.empty((size, self.width), dtype=self.dtype, device=self.device))
        if self.scaled:
            self.scales.append(torch.empty((size,), dtype=torch.float32, device=self.device))
        self._used = 0

    def __len__(self) -> int:
        return (sum(c.shape[0] for c in self.chunks[:-1]) + self._used if self.chunks else 0) + len(self._pending)

    def append(self, row: torch.Tensor) -> None:
        """Store ``row`` (cast to the store's dtype; scaled first when the store is scaled)."""
        if self._follow is not None:
            dtype = self._follow()
            if dtype is None:
                self._pending.append(row.detach().clone())
                return
            self._settle(dtype)
        if not self.chunks or self._used == self.chunks[-1].shape[0]:
            if self._fixed:
                raise IndexError("CheckpointStore: more rows than the fixed size it was created with")
            self._add_chunk(FIRST_CHUNK if not self.chunks else min(2 * self.chunks[-1].shape[0], MAX_CHUNK))
        row, scale = _prescaled(row, self.dtype)
        if scale is not None:
            self.scales[-1][self._used] = scale
        self.chunks[-1][self._used].copy_(row)
        self._used += 1

    def finish(self) -> StoredRows:
        """The rows stored (the last chunk trimmed if needed)."""
        if self._follow is not None:
            self._settle(self._follow() or self.dtype)
        if self.chunks and self._used < self.chunks[-1].shape[0]:
            self.chunks[-1] = self.chunks[-1][: self._used].clone()
            if self.scaled:
                self.scales[-1] = self.scales[-1][: self._used].clone()
        return StoredRows(self.chunks, self.scales if self.scaled else None)


# -- what the checkpointing strategies keep ---------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRows:
    """Every accepted step's start state and the carried first stages, as the backward pass reads them."""

    states: StoredRows
    first_stages: StoredRows
    first_row: dict[int, int]  # carried step -> its row in first_stages

    def state(self, n: int) -> torch.Tensor:
        return self.states.row(n)

    def first_stage(self, n: int) -> torch.Tensor | None:
        """Step ``n``'s carried first stage, ``None`` when the step evaluates its own."""
        return self.first_stages.row(self.first_row[n]) if n in self.first_row else None


class EveryStepCheckpoints(Kept):
    """Keeps every accepted step's start state (and carried first stage) in the checkpoint dtype."""

    def __init__(self, setup: StoreSetup) -> None:
        follow = setup.follow_field
        self.states = CheckpointStore(setup.width, setup.dtype, setup.device, setup.rows, follow)
        self.first_stages = CheckpointStore(setup.width, setup.dtype, setup.device, None, follow) \
            if setup.carries else None
        self.first_row: dict[int, int] = {}

    def __len__(self) -> int:
        """Rows kept (states and carried first stages)."""
        return len(self.states) + (len(self.first_stages) if self.first_stages is not None else 0)

    def record(self, n: int, y: torch.Tensor, first_stage: torch.Tensor | None) -> None:
        self.states.append(y)
        if first_stage is not None:
            assert self.first_stages is not None, "a carried first stage needs a store made with carries=True"
            self.first_row[n] = len(self.first_stages)
            self.first_stages.append(first_stage)

    def rows(self) -> CheckpointRows:
        """What was kept so far (the last chunks trimmed)."""
        firsts = self.first_stages.finish() if self.first_stages is not None else StoredRows([])
        return CheckpointRows(self.states.finish(), firsts, dict(self.first_row))

    def finish(self) -> tuple[list[torch.Tensor], SavedReader]:
        rows = self.rows()
        n_states, states_scaled = len(rows.states.chunks), rows.states.scales is not None
        n_firsts, firsts_scaled = len(rows.first_stages.chunks), rows.first_stages.scales is not None
        first_row = rows.first_row

        def read(saved: Sequence[torch.Tensor]) -> CheckpointRows:
            states = StoredRows.from_saved(saved, n_states, states_scaled)
            firsts = StoredRows.from_saved(saved[len(states.tensors()):], n_firsts, firsts_scaled)
            return CheckpointRows(states, firsts, first_row)

        return [*rows.states.tensors(), *rows.first_stages.tensors()], read


@dataclass(frozen=True)
class SparseRows:
    """The start states (and carried first stages) of steps ``0, k, 2k, ...``, as the backward pass reads them."""

    kept: dict[int, tuple[torch.Tensor, torch.Tensor | None]]

    def segment(self, n: int, n_steps: int) -> tuple[int, int]:
        """``(start, stop)``: the kept step at or before ``n`` and the next kept one (or ``n_steps``)."""
        start = max(m for m in self.kept if m <= n)
        later = [m for m in self.kept if m > start]
        return start, min(later) if later else n_steps


class SparseCheckpoints(Kept):
    """Keeps the start state (and carried first stage) of steps ``0, k, 2k, ...``, at most ``budget`` of them;
    ``k`` doubles (dropping every other checkpoint) when the count of an adaptive march would exceed it."""

    def __init__(self, setup: StoreSetup, budget: int) -> None:
        self.setup = setup
        self.dtype: torch.dtype | None = setup.settled_dtype()  # None: rows are held as given until it is known
        self.budget = budget
        self.every = max(1, -(-setup.rows // budget)) if setup.rows else 1
        self.kept: dict[int, tuple[Encoded, Encoded | None]] = {}  # step -> its state and carried first stage

    def _encode(self, row: torch.Tensor) -> Encoded:
        return (row.detach().clone(), None) if self.dtype is None else encode_row(row, self.dtype)

    def _settle(self, dtype: torch.dtype) -> None:
        """Fix the dtype and encode the rows held until now."""
        self.dtype = dtype
        for m, (state, first) in self.kept.items():
            self.kept[m] = (encode_row(state[0], dtype), None if first is None else encode_row(first[0], dtype))

    def record(self, n: int, y: torch.Tensor, first_stage: torch.Tensor | None) -> None:
        if self.dtype is None and (dtype := self.setup.settled_dtype()) is not None:
            self._settle(dtype)
        if n % self.every:
            return
        first = None if first_stage is None else self._encode(first_stage)
        self.kept[n] = (self._encode(y), first)
        while len(self.kept) > self.budget:  # adaptive steps: thin to every other checkpoint
            self.every *= 2
            self.kept = {m: v for m, v in self.kept.items() if m % self.every == 0}

    def finish(self) -> tuple[list[torch.Tensor], SavedReader]:
        """Per kept step its encoded row (and its scale for narrow-range dtypes), then the same for a carried
        first stage."""
        if self.dtype is None:
            self._settle(self.setup.settled_dtype() or self.setup.dtype)
        index = sorted(self.kept)
        has_first = [self.kept[m][1] is not None for m in index]
        out: list[torch.Tensor] = []
        for m in index:
            state, first = self.kept[m]
            for stored, scale in [state] + ([first] if first is not None else []):
                out += [stored] if scale is None else [stored, scale]
        scaled = len(out) > len(index) + sum(has_first)

        def read(saved: Sequence[torch.Tensor]) -> SparseRows:
            items = iter(saved)

            def row() -> torch.Tensor:
                stored = next(items)
                return decode_row(stored, next(items) if scaled else None)

            return SparseRows({m: (row(), row() if first else None) for m, first in zip(index, has_first)})

        return out, read
