"""Shared test options: the precision matrix and the device.

``--precision`` selects one column of the matrix: tests parametrised over
``precision`` keep only that value, precision-independent tests run in the
``float32`` column (and so do tests parametrised with ``precision="float64"``).
``--device`` is ``cpu`` or ``cuda``.  ``--matrix=full`` runs the full product of
the differential test matrix instead of its covering slice.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

PRECISIONS = ("float32", "bfloat16", "float16")
#: precisions that are not a column of their own run in this column (float64: no autocast, like float32)
COLUMN_OF = {"float64": "float32"}
LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def pytest_configure(config):
    # The tests' tensors are small: one intra-op thread avoids OpenMP spin-waiting, which made small ops 10-50x
    # slower whenever the 2-core machine had other work (measured: a float64 dopri5 solve took 46 s vs 1 s).
    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--precision", choices=(*PRECISIONS, "all"), default="all", help="precision column to run")
    parser.addoption("--device", default="cpu", help="torch device type for the tests (cpu or cuda)")
    parser.addoption("--matrix", choices=("fast", "full"), default="fast",
                     help="differential test matrix (tests/core/test_matrix.py): its covering slice or the full "
                          "product")


def pytest_collection_modifyitems(config, items):
    selected = config.getoption("--precision")
    if selected == "all":
        return
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        precision = params.params.get("precision", "float32") if params else "float32"
        (keep if COLUMN_OF.get(precision, precision) == selected else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


@pytest.fixture
def device(request) -> torch.device:
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device(name)


@pytest.fixture
def amp(device):
    """``amp(precision)``: the autocast context of a precision column on the test device."""

    def make(precision: str):
        if precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=LOW[precision])

    return make
