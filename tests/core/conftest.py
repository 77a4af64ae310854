"""Fixtures shared by the core tests (the helpers themselves live in ``mpnode.core.testing``)."""

from __future__ import annotations

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
