"""The runner's measurements on a small MLP: memory held, host syncs, accuracy, ratios, fits."""

from __future__ import annotations

import math

import pytest

from mpnode.bench.implementations import Impl, parse_impl
from mpnode.bench.report import growth_with_steps, linear_fit
from mpnode.bench.runner import BenchRow, Case, run_case

B, D, W, N = 16, 4, 16, 32
SIZES = (("batch", B), ("dim", D), ("width", W))
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_mpnode_holds_one_checkpoint_per_step_and_is_accurate(precision, device):
    pytest.importorskip("torchdiffeq")
    impls = (Impl("mpnode", precision), Impl("torchdiffeq", "float32"))
    timed = (precision == "float32", True)
    rows = {r.impl: r for r in run_case(Case("mlp", SIZES, N, impls, timed=timed), device, repeats=1)}
    mp = rows[impls[0].label]
    td = rows["torchdiffeq/float32"]
    assert mp.error is None and td.error is None
    ckpt = N * B * D * ITEMSIZE[precision]
    grid = 2 * 4 + (N + 1) * 4  # t and the step grid, float32
    loss_saved = (N + 1) * B * D * 4  # the solution tensor the loss reads (saved by pow)
    assert ckpt <= mp.held_bytes <= ckpt + grid + loss_saved + 64
    assert td.held_bytes > 10 * mp.held_bytes
    assert mp.held_vs_torchdiffeq == pytest.approx(mp.held_bytes / td.held_bytes)
    tol = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 5e-3}[precision]
    assert mp.grad_rel_err < tol
    if precision == "float16":  # dynamic scaler: about one host sync per block of K = 16 steps
        assert mp.syncs_backward <= N // 16 + 4
    else:
        assert mp.syncs_backward == 0
    if precision == "float32":
        assert mp.time_s > 0 and mp.time_repeats == 1
        assert mp.time_vs_torchdiffeq == pytest.approx(mp.time_s / td.time_s)
    else:
        assert mp.time_s is None  # low precision is not timed on request


def test_adjoint_holds_almost_nothing_but_syncs(device):
    pytest.importorskip("torchdiffeq")
    impls = (Impl("torchdiffeq-adjoint"), Impl("torchdiffeq"))
    rows = {r.impl: r for r in run_case(Case("mlp", SIZES, 8, impls), device, repeats=1)}
    adj = rows["torchdiffeq-adjoint/float32"]
    assert adj.held_vs_torchdiffeq < 0.2
    assert adj.grad_rel_err < 1e-4


def test_failures_become_rows(device, monkeypatch):
    impl = Impl("mpnode")
    monkeypatch.setattr(Impl, "forward_fn", lambda self, *a: (_ for _ in ()).throw(FloatingPointError("boom")))
    (row,) = run_case(Case("mlp", SIZES, 4, (impl,)), device, repeats=1)
    assert row.error == "FloatingPointError: boom" and row.time_s is None


def test_impl_labels_round_trip():
    for label in ("mpnode/float32", "mpnode/float32+ckpt-bfloat16", "mpnode/float16+scaler",
                  "torchdiffeq-adjoint/float32", "torchdiffeq/bfloat16",
                  "mpnode-direct/bfloat16", "mpnode-segmented/float32+ckpt-bfloat16", "mpnode-segmented/float16+scaler",
                  "mpnode-auto/float32+budget-8MiB", "mpnode-auto/bfloat16+budget-1000", "torchdiffeq-nocache/bfloat16",
                  "torchode/float32", "torchode/float32+tsit5", "mpnode/float32+tsit5"):
        assert parse_impl(label).label == label
    assert parse_impl("mpnode-auto/float32+budget-2KiB").budget == 2048
    assert parse_impl("torchode/float32+tsit5").method == "tsit5"
    with pytest.raises(ValueError, match="choose one of"):
        Impl("scipy")
    with pytest.raises(ValueError, match="store checkpoints"):
        Impl("torchdiffeq", "float32", "bfloat16")
    with pytest.raises(ValueError, match="store checkpoints"):
        Impl("mpnode-direct", "float32", "bfloat16")
    with pytest.raises(ValueError, match="needs budget"):
        Impl("mpnode-auto")
    with pytest.raises(ValueError, match="needs budget"):
        Impl("mpnode", budget=10)
    with pytest.raises(ValueError, match="unknown method"):
        Impl("mpnode", method="rk45")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_impl("mpnode/float32+fast")
    with pytest.raises(ValueError, match="cannot parse the budget"):
        parse_impl("mpnode-auto/float32+budget-8MB")


def test_linear_fit_and_growth():
    f = linear_fit([16, 32, 64], [1.0 + 0.5 * x for x in (16, 32, 64)])
    assert f.slope == pytest.approx(0.5) and f.intercept == pytest.approx(1.0) and f.r2 == pytest.approx(1.0)
    rows = [BenchRow(suite="", problem="mlp", axis="steps", sizes="b", steps=n, impl="x", solver="mpnode",
                     precision="float32", device="cpu", time_s=0.1 * n, held_bytes=100 * n + 7) for n in (4, 8, 16)]
    (g,) = growth_with_steps(rows)
    assert g["held_slope_bytes"] == pytest.approx(100) and g["time_slope_s"] == pytest.approx(0.1)
    assert math.isclose(g["held_r2"], 1.0)


def test_rows_round_trip_through_json(tmp_path):
    from mpnode.bench.report import read_results_json, write_results_json

    row = BenchRow(suite="s", problem="mlp", axis="base", sizes="batch=2", steps=4, impl="mpnode/float32",
                   solver="mpnode", precision="float32", device="cpu", time_s=0.5, error=None)
    write_results_json([row], {"suite": "s"}, tmp_path / "r.json")
    meta, (back,) = read_results_json(tmp_path / "r.json")
    assert back == row and meta == {"suite": "s"}


def test_gradient_error_is_measured_when_a_parameter_is_unused(device):
    """OT-Flow's potential has a bias that no gradient depends on: torchdiffeq leaves its .grad None, mpnode zero."""
    pytest.importorskip("torchdiffeq")
    sizes = (("batch", 4), ("d", 2), ("width", 4))
    impls = (Impl("mpnode"), Impl("torchdiffeq"))
    rows = {r.impl: r for r in run_case(Case("otflow", sizes, 4, impls, timed=(False, False)), device, repeats=1)}
    assert rows["mpnode/float32"].grad_rel_err < 1e-5
