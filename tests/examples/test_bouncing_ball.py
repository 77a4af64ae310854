"""Smoke run of examples/bouncing_ball.py: it trains, logs a CSV, draws the figure and prints progress."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("precision, method", [("float32", "dopri5"), ("bfloat16", "dopri5"), ("float32", "rk4")])
def test_bouncing_ball_smoke(precision, method, tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "bouncing_ball.py"), "--smoke", "--precision", precision,
         "--method", method, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "observed bounce times" in res.stdout and res.stdout.count("iter ") == 3 and "final: e = " in res.stdout
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("loss", "restitution", "error", "seconds"))
    assert float(rows[-1]["restitution"]) > float(rows[0]["restitution"]) > 0.5  # e rises from 0.5 towards 0.8
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert (tmp_path / "bouncing_ball.png").stat().st_size > 10_000
