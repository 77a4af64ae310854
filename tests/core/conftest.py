"""Fixtures shared by the core tests."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class MLPField(torch.nn.Module):
    """A tanh MLP field ``f(t, y)`` on states ``(B, dim)`` with the time as an extra input."""

    def __init__(self, dim: int = 4, width: int = 16) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(dim + 1, width)
        self.l2 = torch.nn.Linear(width, dim)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(torch.cat([y, t.expand(*y.shape[:-1], 1)], -1))))


class SyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` (every ``.item()`` / ``bool(tensor)``) while active.

    (Core's tests keep their own counter so they need nothing beyond mpnode-core and torch.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


class SavedBytes:
    """Bytes of distinct storages packed for backward while active (``saved_tensors_hooks``)."""

    def __init__(self) -> None:
        self.storages: dict[int, tuple[int, torch.dtype]] = {}

    def _pack(self, x):
        s = x.untyped_storage()
        self.storages[s.data_ptr()] = (s.nbytes(), x.dtype)
        return x

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())


@pytest.fixture
def mlp_field():
    torch.manual_seed(0)
    return MLPField()


@pytest.fixture
def sync_counter():
    return SyncCounter


@pytest.fixture
def saved_bytes():
    return SavedBytes
