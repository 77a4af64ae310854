"""Storage for the states kept between forward and backward (one row per step).

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
from dataclasses import dataclass

import torch

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
    """``(row / 2^e, 2^e)`` in ``row``'s dtype for a narrow-range ``dtype``, else ``(row, None)``: what to cast and store."""
    if not needs_row_scaling(dtype):
        return row, None
    scale = row_scale(row, dtype)
    return row / scale.to(row.dtype), scale


def encode_row(row: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``row`` as stored in ``dtype``: ``(row / 2^e in dtype, 2^e)`` for a narrow-range dtype, else ``(row in dtype, None)``."""
    scaled, scale = _prescaled(row, dtype)
    return scaled.to(dtype, copy=True), scale


def decode_row(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The row an :func:`encode_row` result stands for (float32 when it was scaled)."""
    return stored if scale is None else stored.float() * scale


@dataclass
class StoredRows:
    """The rows a :class:`CheckpointStore` kept: ``chunks`` ``(rows_i, width)`` and, when scaled, ``scales`` ``(rows_i,)`` float32."""

    chunks: list[torch.Tensor]
    scales: list[torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Everything to pass to ``ctx.save_for_backward`` (rebuild with :meth:`from_saved`)."""
        return [*self.chunks, *(self.scales or [])]

    @classmethod
    def from_saved(cls, saved: tuple[torch.Tensor, ...] | list[torch.Tensor], n_chunks: int, scaled: bool) -> "StoredRows":
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

    With ``rows`` known (a fixed grid) there is one chunk of exactly that many
    rows.  Otherwise (adaptive steps) chunks of 16, 32, ... up to 1024 rows are
    added as needed and :meth:`finish` trims the last one, so at most one chunk
    (at most half the data, or 1024 rows) is ever copied.  Rows in float16/float8
    are scaled by a power of two each (see the module docstring): 4 more bytes per row.
    """

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device, rows: int | None = None) -> None:
        self.width, self.dtype, self.device = width, dtype, device
        self.scaled = needs_row_scaling(dtype)
        self.chunks: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []
        self._used = 0  # rows used in the last chunk
        self._fixed = rows is not None
        if rows is not None:
            self._add_chunk(rows)

    def _add_chunk(self, size: int) -> None:
        self.chunks.append(torch.empty((size, self.width), dtype=self.dtype, device=self.device))
        if self.scaled:
            self.scales.append(torch.empty((size,), dtype=torch.float32, device=self.device))
        self._used = 0

    def __len__(self) -> int:
        return sum(c.shape[0] for c in self.chunks[:-1]) + self._used if self.chunks else 0

    def append(self, row: torch.Tensor) -> None:
        """Store ``row`` (cast to the store's dtype; scaled first when the store is scaled)."""
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
        if self.chunks and self._used < self.chunks[-1].shape[0]:
            self.chunks[-1] = self.chunks[-1][: self._used].clone()
            if self.scaled:
                self.scales[-1] = self.scales[-1][: self._used].clone()
        return StoredRows(self.chunks, self.scales if self.scaled else None)
