"""Smoke run of examples/ddp_train.py under torchrun with two CPU processes (gloo)."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run ...`` in its own process group, killed whole on timeout."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_ddp_train_two_processes(precision, tmp_path):
    import torch.distributed

    if not torch.distributed.is_available() or importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torch.distributed / torchrun is not available in this torch build")
    res = torchrun("--standalone", "--nproc_per_node", "2", str(ROOT / "examples" / "ddp_train.py"), "--smoke",
                   "--device", "cpu", "--precision", precision, "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("final loss") == 1, res.stdout  # rank 0 only
    rows = list(csv.DictReader((tmp_path / "ddp_train.csv").open()))
    assert len(rows) == 2 and {r["world_size"] for r in rows} == {"2"}
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("train_loss", "test_loss"))
    final = float(res.stdout.split("final loss")[1].split()[0])
    assert final == pytest.approx(float(rows[-1]["train_loss"]), rel=1e-5)
    assert (tmp_path / "ddp_train.png").stat().st_size > 10_000  # written by rank 0


def test_ddp_train_single_process(tmp_path):
    """Without torchrun the example trains in one process, without a process group."""
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "ddp_train.py"), "--smoke", "--device", "cpu",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "ddp_train.csv").open()))
    assert len(rows) == 2 and {r["world_size"] for r in rows} == {"1"} and "final loss" in res.stdout
    assert (tmp_path / "ddp_train.png").stat().st_size > 10_000
