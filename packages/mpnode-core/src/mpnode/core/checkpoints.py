"""Storage for the states kept between forward and backward (one row per step)."""

from __future__ import annotations

import torch

#: Rows of the first chunk when the number of steps is not known in advance; chunks double up to ``MAX_CHUNK``.
FIRST_CHUNK = 16
MAX_CHUNK = 1024


class CheckpointStore:
    """Rows of ``width`` values in ``dtype``, stored in chunks so it can grow without copying.

    With ``rows`` known (a fixed grid) there is one chunk of exactly that many
    rows.  Otherwise (adaptive steps) chunks of 16, 32, ... up to 1024 rows are
    added as needed and :meth:`finish` trims the last one, so at most one chunk
    (at most half the data, or 1024 rows) is ever copied.
    """

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device, rows: int | None = None) -> None:
        self.width, self.dtype, self.device = width, dtype, device
        self.chunks: list[torch.Tensor] = []
        self._used = 0  # rows used in the last chunk
        self._fixed = rows is not None
        if rows is not None:
            self.chunks.append(torch.empty((rows, width), dtype=dtype, device=device))

    def __len__(self) -> int:
        return sum(c.shape[0] for c in self.chunks[:-1]) + self._used if self.chunks else 0

    def append(self, row: torch.Tensor) -> None:
        """Store ``row`` (cast to the store's dtype)."""
        if not self.chunks or self._used == self.chunks[-1].shape[0]:
            if self._fixed:
                raise IndexError("CheckpointStore: more rows than the fixed size it was created with")
            size = FIRST_CHUNK if not self.chunks else min(2 * self.chunks[-1].shape[0], MAX_CHUNK)
            self.chunks.append(torch.empty((size, self.width), dtype=self.dtype, device=self.device))
            self._used = 0
        self.chunks[-1][self._used].copy_(row)
        self._used += 1

    def finish(self) -> list[torch.Tensor]:
        """The chunks holding exactly the stored rows (the last one trimmed if needed)."""
        if self.chunks and self._used < self.chunks[-1].shape[0]:
            self.chunks[-1] = self.chunks[-1][: self._used].clone()
        return self.chunks

    @staticmethod
    def row(chunks: list[torch.Tensor], n: int) -> torch.Tensor:
        """Row ``n`` of stored ``chunks`` (as returned by :meth:`finish`)."""
        for chunk in chunks:
            if n < chunk.shape[0]:
                return chunk[n]
            n -= chunk.shape[0]
        raise IndexError("checkpoint row out of range")
