"""Fixtures shared by the core tests (the helpers themselves live in ``mpnode.core.testing``)."""

from __future__ import annotations

import functools

import pytest
import torch

from mpnode.core.testing import HeldMemory, MLPField, SyncCount


@pytest.fixture
def mlp_field():
    torch.manual_seed(0)
    return MLPField()


@pytest.fixture
def sync_counter():
    return SyncCount


@pytest.fixture
def saved_bytes():
    return HeldMemory


class NormedField(torch.nn.Module):
    """``f(t, y) = tanh(BatchNorm(Linear(y)))`` on float64 states ``(B, 3)``, weights drawn after
    ``torch.manual_seed(0)``: a field whose forward updates buffers (BatchNorm's running statistics) and whose
    function depends on the module's mode.

    ``dropout``: followed by ``Dropout(0.2)`` and a second ``Linear`` (``drop``, ``out``); ``time_factor``:
    multiplied by ``cos(2 t)``.
    """

    def __init__(self, device: torch.device, *, dropout: bool = False, time_factor: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 3)
        self.bn = torch.nn.BatchNorm1d(3)
        if dropout:
            self.drop = torch.nn.Dropout(0.2)
            self.out = torch.nn.Linear(3, 3)
        self.time_factor = time_factor
        self.to(device, torch.float64)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn(self.lin(y)))
        if hasattr(self, "out"):
            h = self.out(self.drop(h))
        return h * torch.cos(2 * t) if self.time_factor else h


@pytest.fixture
def normed_field(device):
    """``normed_field(dropout=..., time_factor=...)``: a `NormedField` on the test device."""
    return functools.partial(NormedField, device)


class _Decay(torch.nn.Module):
    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -y


@pytest.fixture
def decay_with_method():
    """``decay_with_method(name)``: a module ``f(t, y) = -y`` whose class has a do-nothing method
    ``name(t0, y0, dt)``: a callback, or a misspelled one."""

    def make(name: str) -> torch.nn.Module:
        return type("Decay", (_Decay,), {name: lambda self, t0, y0, dt: None})()

    return make
