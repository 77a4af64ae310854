"""Smoke test of benchmarks/trust_overhead.py at a tiny size: every guard is measured and its own time is seen."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trust_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("trust_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_guard_is_measured_and_its_functions_run(bench):
    med = bench.measure(batch=4, dim=3, width=8, steps=4, rounds=1)
    assert set(med) == set(bench.GUARD_FUNCTIONS) | {"all guards (mlp)"}
    for guard, m in med.items():
        assert all(m[k] > 0 for k in ("fwd_on", "bwd_on", "fwd_off", "bwd_off", "fwd_ratio", "bwd_ratio")), guard
    # the timed functions really ran where each guard works
    assert med["discovery"]["fwd_self"] > 0 and med["untracked check"]["bwd_self"] > 0
    assert med["rng replay (dropout)"]["bwd_self"] > 0 and med["scaled float16 checkpoints"]["fwd_self"] > 0
    assert med["buffer restore (batchnorm)"]["bwd_self"] > 0 and med["version check"]["bwd_self"] > 0
