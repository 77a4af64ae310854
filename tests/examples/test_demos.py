"""Smoke runs of the demos and of the main job (examples/modeleq_demo.py), with their numbers checked."""

from __future__ import annotations

import pytest


# The demo covers float64/float32/bfloat16/float16 itself; it is placed in the float16 column of the
# test matrix only to keep each column short.
@pytest.mark.parametrize("precision", ["float16"])
def test_demo_taylor_smoke(precision, tmp_path, run_script, read_csv):
    run_script("demos/demo_taylor.py", "--smoke", "--out", str(tmp_path))
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


# Its smoke mode runs bfloat16 autocast only, hence the bfloat16 column of the test matrix.
@pytest.mark.parametrize("precision", ["bfloat16"])
def test_demo_diffeq_autocast_smoke(precision, tmp_path, run_script, read_csv):
    run_script("demos/demo_diffeq_autocast.py", "--smoke", "--out", str(tmp_path))
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


# float16 autocast throughout, hence the float16 column of the test matrix.
@pytest.mark.parametrize("precision", ["float16"])
def test_demo_scaler_smoke(precision, tmp_path, run_script, read_csv):
    """The dynamic scaler is the only solver usable in all scenarios."""
    out = run_script("demos/demo_scaler.py", "--smoke", "--device", "cpu", "--out", str(tmp_path))
    assert "float16 dynamic" in out and (tmp_path / "demo_scaler.png").exists()
    rows = read_csv(tmp_path / "demo_scaler.csv")
    dyn = [float(r["rel_err_dA"]) for r in rows if r["solver"] == "mpnode dynamic"]
    unscaled_overflow = [r["status"] for r in rows if r["solver"] == "mpnode unscaled" and r["scenario"] == "overflow"]
    assert len(dyn) == 6 and max(dyn) < 0.05
    assert set(unscaled_overflow) == {"error (overflow)"}


@pytest.mark.parametrize("precision", ["float32"])
def test_modeleq_demo_smoke(precision, tmp_path, run_script, read_csv):
    """The main job at 32 and 256 steps: mpnode's dL/dA stays at the roundoff level, torchdiffeq's grows."""
    out = run_script("examples/modeleq_demo.py", "--smoke", "--device", "cpu", "--out", str(tmp_path))
    assert "Relative error against the float64 matrix exponential" in out
    rows = read_csv(tmp_path / "modeleq.csv")
    assert len(rows) == 2 * 2 * 2 * 3  # precisions x methods x steps x solvers
    rk4 = {(r["precision"], r["steps"], r["solver"]): r for r in rows if r["method"] == "rk4"}
    for p, bound in (("bfloat16", 5e-3), ("float16", 1e-3)):
        ours, cached, nocache = (float(rk4[(p, "256", s)]["err_dA"])
                                 for s in ("mpnode", "torchdiffeq", "torchdiffeq-nocache"))
        assert ours < bound and cached > 5 * ours and nocache < bound  # without the cast cache it is accurate too
        held = {s: int(rk4[(p, "256", s)]["held_bytes"]) for s in ("mpnode", "torchdiffeq", "torchdiffeq-nocache")}
        assert held["mpnode"] < held["torchdiffeq"] < held["torchdiffeq-nocache"]  # ... at a price in memory
    assert (tmp_path / "modeleq.png").stat().st_size > 10_000
