"""Smoke runs of the flow experiments (examples/cnf8g.py, examples/otflow.py) with both solvers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest


@pytest.fixture
def smoke(run, read_csv):
    """``smoke(script, out, *flags, as_command=False)``: run ``examples/<script> --smoke`` on the CPU; its summary
    row."""

    def go(script: str, out: Path, *flags: str, as_command: bool = False) -> dict:
        run(f"examples/{script}", "--smoke", "--device", "cpu", "--out", str(out), *flags, as_command=as_command)
        (row,) = read_csv(out / "summary.csv")
        return row

    return go


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("solver", ["mpnode", "torchdiffeq"])
def test_cnf8g_smoke(precision, solver, tmp_path, smoke):
    row = smoke("cnf8g.py", tmp_path, "--precision", precision, "--odeint", solver,
                as_command=(precision, solver) == ("float32", "mpnode"))
    assert math.isfinite(float(row["test_nll"])) and int(row["held_bytes"]) > 0
    assert (tmp_path / "cnf8g_density.png").exists() and (tmp_path / "cnf8g.csv").exists()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("data", ["8gaussians", "gmm"])
def test_otflow_smoke(precision, data, tmp_path, smoke):
    row = smoke("otflow.py", tmp_path, "--precision", precision, "--data", data, "--dim", "4",
                as_command=(precision, data) == ("float32", "8gaussians"))
    for key in ("test_nll", "L", "HJB", "mmd"):
        assert math.isfinite(float(row[key]))
    assert (tmp_path / "otflow_samples.png").exists()


@pytest.mark.parametrize("precision", ["float16"])
@pytest.mark.parametrize("script", ["cnf8g.py", "otflow.py"])
def test_flows_smoke_float16(precision, script, tmp_path, smoke):
    """float16 goes through mpnode's adjoint scaler and torch's GradScaler; the smoke run must stay finite."""
    row = smoke(script, tmp_path, "--precision", precision, "--odeint", "mpnode")
    assert row["precision"] == "float16" and math.isfinite(float(row["test_nll"]))
    assert 0 < int(row["held_bytes"])


@pytest.mark.parametrize("solver", ["mpnode", "torchdiffeq"])
@pytest.mark.parametrize("script", ["cnf8g.py", "otflow.py"])
def test_flows_with_an_adaptive_method(script, solver, tmp_path, smoke):
    row = smoke(script, tmp_path, "--method", "dopri5", "--rtol", "1e-3", "--atol", "1e-5", "--odeint", solver)
    assert row["method"] == "dopri5" and math.isfinite(float(row["test_nll"])) and int(row["held_bytes"]) > 0
