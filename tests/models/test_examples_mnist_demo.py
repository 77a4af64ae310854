"""Smoke runs of examples/ode_demo.py, examples/ode_mnist.py and the two demos, as subprocesses."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def run_in_process(script: str, *args: str):
    """``main(args)`` of a script loaded by path (saves an interpreter start for the variant runs)."""
    spec = importlib.util.spec_from_file_location(f"_smoke_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        return module.main(list(args))
    finally:
        del sys.modules[spec.name]


def read_csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def torchvision_or_skip():
    try:
        import torchvision  # noqa: F401
    except Exception as err:
        pytest.skip(f"torchvision not importable ({err!r}); install mpnode-models[mnist]")


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_ode_demo_smoke(precision, device, tmp_path):
    out = run_script("examples/ode_demo.py", "--smoke", "--precision", precision, "--device", device.type,
                     "--out", str(tmp_path))
    rows = read_csv(tmp_path / "log.csv")
    assert [int(r["iter"]) for r in rows] == [3, 6]
    test_losses = [float(r["test_loss"]) for r in rows]
    assert all(math.isfinite(x) and 0 < x < 2.0 for x in test_losses)
    assert float(rows[-1]["train_loss"]) < 1.0
    for name in ("ode_demo.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert "final test loss" in out


@pytest.mark.parametrize("precision", ["float32"])
def test_ode_demo_torchdiffeq_smoke(precision, device, tmp_path):
    run_in_process("examples/ode_demo.py", "--smoke", "--odeint", "torchdiffeq", "--precision", precision,
                   "--device", device.type, "--out", str(tmp_path))
    assert read_csv(tmp_path / "log.csv")[-1]["odeint"] == "torchdiffeq"


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_ode_mnist_smoke(precision, device, tmp_path):
    torchvision_or_skip()
    run_script("examples/ode_mnist.py", "--smoke", "--precision", precision, "--device", device.type,
               "--out", str(tmp_path))
    (row,) = read_csv(tmp_path / "log.csv")
    assert row["precision"] == precision and int(row["train_n"]) == 16 and int(row["test_n"]) == 8
    assert float(row["nfe_forward"]) == 4  # 1 RK4 step x 4 evaluations
    assert float(row["nfe_backward"]) >= 4  # mpnode recomputes each step in backward
    assert 0.0 <= float(row["test_acc"]) <= 1.0 and math.isfinite(float(row["train_loss"]))
    assert float(row["step_held_mib"]) > 0 and int(row["step_host_syncs"]) >= 0  # mpnode.bench profile of one step
    assert (tmp_path / "ode_mnist.png").stat().st_size > 10_000
    assert (tmp_path / "smoke_data" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").stat().st_size == 8 + 8


@pytest.mark.parametrize("precision", ["bfloat16"])
def test_ode_mnist_torchdiffeq_smoke(precision, device, tmp_path):
    torchvision_or_skip()
    run_in_process("examples/ode_mnist.py", "--smoke", "--odeint", "torchdiffeq", "--precision", precision,
                   "--device", device.type, "--out", str(tmp_path))
    (row,) = read_csv(tmp_path / "log.csv")
    assert float(row["nfe_forward"]) == 4 and float(row["nfe_backward"]) == 0  # backprop through the graph


# The demo covers float64/float32/bfloat16/float16 itself; it is placed in the float16 column of the
# test matrix only to keep each column short.
@pytest.mark.parametrize("precision", ["float16"])
def test_demo_taylor_quick(precision, tmp_path):
    run_script("demos/demo_taylor.py", "--quick", "--out", str(tmp_path))
    rows = read_csv(tmp_path / "taylor_slopes.csv")
    assert len(rows) == 12
    by = {(r["kind"], r["precision"]): r for r in rows}
    for kind in ("inputs", "weights", "times"):
        for precision, decades, band in (("float64", 3.0, 0.05), ("float32", 3.0, 0.05),
                                         ("float16", 1.5, 0.3), ("bfloat16", 0.8, 0.3)):
            r = by[(kind, precision)]
            assert abs(float(r["slope"]) - 2) < band, (kind, precision, r)
            assert float(r["decades"]) >= decades, (kind, precision, r)
        assert abs(float(by[(kind, "float64")]["first_difference_slope"]) - 1) < 0.2
        errs = [float(by[(kind, p)]["rel_err_grad_dot_v"]) for p in ("float32", "float16", "bfloat16")]
        assert errs == sorted(errs), (kind, errs)  # gradient error grows as the precision drops
    assert (tmp_path / "taylor.png").stat().st_size > 10_000


# Its quick mode runs bfloat16 autocast only, hence the bfloat16 column of the test matrix.
@pytest.mark.parametrize("precision", ["bfloat16"])
def test_demo_diffeq_autocast_quick(precision, tmp_path):
    run_script("demos/demo_diffeq_autocast.py", "--quick", "--out", str(tmp_path))
    dtypes = {r["quantity"]: r for r in read_csv(tmp_path / "dtypes.csv")}
    assert dtypes["k = func(t, y)"]["torchdiffeq"] == "bfloat16"
    assert dtypes["solution returned"]["mpnode"] == "float32"
    census = read_csv(tmp_path / "census.csv")

    def count(solver, phase, size, dtype):
        return sum(int(r["count"]) for r in census
                   if (r["solver"], r["phase"], r["size"], r["dtype"]) == (solver, phase, size, dtype))

    # torchdiffeq forms the Runge-Kutta combinations in bfloat16; mpnode forms every state-sized sum in float32
    assert count("torchdiffeq", "forward", "state-sized", "bfloat16") > 0
    assert count("mpnode", "forward", "state-sized", "bfloat16") == 0
    assert count("mpnode", "backward", "state-sized", "bfloat16") == 0
    # torchdiffeq accumulates dL/dA over all 32 stage evaluations in bfloat16; mpnode sums per step in float32
    assert count("torchdiffeq", "backward", "weight-sized", "bfloat16") >= 31
    assert count("mpnode", "backward", "weight-sized", "float32") >= 8
    errors = read_csv(tmp_path / "errors.csv")
    td = [float(r["err_dA"]) for r in errors if r["solver"] == "torchdiffeq"]
    mp = [float(r["err_dA"]) for r in errors if r["solver"] == "mpnode"]
    assert td[-1] > 5 * td[0]  # grows with the number of steps
    assert max(mp) < 2 * min(mp) and max(mp) < 1e-2  # stays flat
    assert (tmp_path / "diffeq_autocast.png").stat().st_size > 10_000
