"""The dial and adaptive cases on tiny sizes: every new implementation runs, steps, evaluations, floor, plot."""

from __future__ import annotations

import math

import pytest
import torch

from mpnode.bench.experiment import autocast, solver
from mpnode.bench.implementations import Discretization, Impl
from mpnode.bench.plots import plot_all
from mpnode.bench.problems import build
from mpnode.bench.report import dial_targets, render_adaptive, render_dial, render_table
from mpnode.bench.runner import Case, graph_free_forward, run_case

SIZES = (("batch", 8), ("dim", 4), ("width", 8))
ADAPTIVE = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-8}

pytestmark = pytest.mark.filterwarnings("ignore::mpnode.core.MixedPrecisionToleranceWarning")


def _rows(case: Case, device, repeats: int = 1) -> dict:
    return {r.impl: r for r in run_case(case, device, repeats=repeats)}


@pytest.fixture(scope="module")
def dial_rows():
    """One fixed-grid case with every mpnode strategy, torchdiffeq direct/adjoint and the bfloat16 variants."""
    pytest.importorskip("torchdiffeq")
    impls = (Impl("mpnode"), Impl("mpnode-direct"), Impl("mpnode-segmented"), Impl("mpnode-auto", budget=2**30),
             Impl("torchdiffeq"), Impl("torchdiffeq-adjoint"), Impl("mpnode", "bfloat16"),
             Impl("mpnode-direct", "bfloat16"), Impl("mpnode-segmented", "bfloat16"), Impl("torchdiffeq", "bfloat16"),
             Impl("torchdiffeq-nocache", "bfloat16"))
    timed = tuple(not i.is_low_precision for i in impls)
    return _rows(Case("mlp", SIZES, 16, impls, axis="dial", timed=timed), torch.device("cpu"), repeats=2)


def test_every_strategy_runs_and_gives_recompute_gradients(dial_rows):
    for label, row in dial_rows.items():
        assert row.error is None, (label, row.error)
        assert row.accepted_steps == 16 and row.steps == 16 and row.method == "rk4"
    for label in ("mpnode-direct/float32", "mpnode-segmented/float32", "mpnode-auto/float32+budget-1GiB"):
        assert dial_rows[label].grad_vs_mpnode_f32 < 1e-6
        assert dial_rows[label].time_s > 0
    assert dial_rows["mpnode/float32"].grad_rel_err < 1e-5  # against torchdiffeq on the same grid


def test_evaluation_counts_follow_each_strategy(dial_rows):
    n = 16 * 4  # RK4 stages
    assert dial_rows["torchdiffeq/float32"].nfe == n  # backward through the graph: no evaluation
    assert dial_rows["mpnode-direct/float32"].nfe == n  # graphs kept from the forward
    assert dial_rows["mpnode/float32"].nfe == 2 * n  # each step evaluated again in backward
    assert dial_rows["mpnode-segmented/float32"].nfe == 3 * n  # plus one graph-free replay of each segment
    assert dial_rows["torchdiffeq-adjoint/float32"].nfe == 2 * n  # the augmented system, same grid, backward


def test_held_memory_orders_the_strategies(dial_rows):
    held = {k: r.held_bytes for k, r in dial_rows.items()}
    assert held["mpnode-segmented/float32"] < held["mpnode/float32"] < held["mpnode-direct/float32"]
    assert held["mpnode-direct/float32"] > 5 * held["mpnode/float32"]
    assert held["mpnode/bfloat16"] < held["mpnode/float32"]
    # AutoAdjoint's own meter hands every tensor on to the runner's; within budget it keeps what direct keeps
    assert held["mpnode-auto/float32+budget-1GiB"] == held["mpnode-direct/float32"]


def test_the_floor_is_torchdiffeq_direct_plus_one_graph_free_forward(dial_rows):
    td = dial_rows["torchdiffeq/float32"]
    forward_s = td.graph_free_forward_s
    assert forward_s is not None and 0 < forward_s < td.time_s * 5
    for row in dial_rows.values():
        assert row.graph_free_forward_s == forward_s
        if row.time_s is None:
            assert row.time_vs_floor is None
        else:
            assert row.time_vs_floor == pytest.approx(row.time_s / (td.time_s + forward_s))


def test_no_cast_cache_keeps_the_weight_gradient_sums_in_float32(dial_rows):
    cached, uncached = dial_rows["torchdiffeq/bfloat16"], dial_rows["torchdiffeq-nocache/bfloat16"]
    assert uncached.grad_rel_err < cached.grad_rel_err / 2
    assert uncached.held_bytes > cached.held_bytes  # one cast weight copy per evaluation
    assert dial_rows["mpnode-direct/bfloat16"].grad_rel_err < 1e-2


def test_dial_tables_targets_and_plot(dial_rows, tmp_path):
    rows = list(dial_rows.values())
    table = render_dial(rows)
    assert "mpnode-segmented/float32" in table and "time vs floor" in table
    targets = dial_targets(rows)
    assert "direct time" in targets and "segmented held" in targets and "vs the floor" in targets
    assert "vs floor" in render_table(rows) and "nfe" in render_table(rows)
    pytest.importorskip("matplotlib")
    written = plot_all(rows, tmp_path, title="t")
    assert tmp_path / "dial_mlp.png" in written and (tmp_path / "dial_mlp.png").stat().st_size > 1000


def test_adaptive_case_counts_steps_and_evaluations(device):
    pytest.importorskip("torchdiffeq")
    impls = (Impl("mpnode"), Impl("mpnode", "bfloat16"), Impl("torchdiffeq"), Impl("torchdiffeq-adjoint"),
             Impl("mpnode", method="tsit5"), Impl("torchdiffeq", method="tsit5"))
    sizes = (*SIZES, ("gain", 8))
    case = Case("mlp", sizes, 0, impls, axis="adaptive", timed=(True, False, True, True, True, True), **ADAPTIVE)
    rows = _rows(case, device)
    mp, td = rows["mpnode/float32"], rows["torchdiffeq/float32"]
    assert mp.error is None and td.error is None
    assert mp.accepted_steps >= 5 and mp.steps == mp.accepted_steps and mp.method == "dopri5" and mp.rtol == 1e-6
    assert td.accepted_steps == mp.accepted_steps  # the same algorithm, counted by callback_accept_step
    assert rows["torchdiffeq-adjoint/float32"].accepted_steps == mp.accepted_steps
    assert not hasattr(build("mlp", dict(sizes), "cpu").func, "callback_accept_step")
    # dopri5 evaluates 6 new stages per accepted step (first-same-as-last) plus the initial-step selection
    assert td.nfe >= 6 * td.accepted_steps and mp.nfe > td.nfe  # mpnode recomputes in backward
    assert mp.grad_rel_err < 1e-4 and td.grad_rel_err < 1e-4  # against the float64 tight-tolerance solve
    assert rows["mpnode/bfloat16"].grad_rel_err < 5e-2
    assert rows["mpnode/float32+tsit5"].method == "tsit5" and rows["mpnode/float32+tsit5"].error is None
    assert rows["torchdiffeq/float32+tsit5"].error == "unavailable: torchdiffeq has no method 'tsit5'"
    assert mp.time_vs_floor is not None and mp.graph_free_forward_s > 0
    assert "accepted" in render_adaptive(list(rows.values()))


def test_torchode_in_an_adaptive_case(device):
    pytest.importorskip("torchode")
    pytest.importorskip("torchdiffeq")
    impls = (Impl("torchdiffeq"), Impl("torchode"), Impl("torchode", method="tsit5"))
    rows = _rows(Case("mlp", (*SIZES, ("gain", 8)), 0, impls, axis="adaptive", **ADAPTIVE), device)
    for label in ("torchode/float32", "torchode/float32+tsit5"):
        row = rows[label]
        assert row.error is None, row.error
        assert row.accepted_steps >= 5 and row.nfe >= 6 * row.accepted_steps and row.time_s > 0
        assert row.grad_rel_err < 1e-3
    cnf = _rows(Case("cnf", (("batch", 4), ("width", 4)), 0, (Impl("torchode"),), **ADAPTIVE), device)
    assert "scalar time" in cnf["torchode/float32"].error  # reported, not faked
    rk4 = _rows(Case("mlp", SIZES, 4, (Impl("torchode"),)), device)
    assert "no method 'rk4'" in rk4["torchode/float32"].error


def test_torchode_missing_is_reported_cleanly(monkeypatch, device):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchode" else real(name, *a))
    (row,) = run_case(Case("mlp", SIZES, 0, (Impl("torchode"),), **ADAPTIVE), device, repeats=1)
    assert row.error.startswith("unavailable: pip install torchode") and row.time_s is None
    with pytest.raises(ImportError, match="pip install torchode"):
        solver("torchode")


def test_graph_free_forward_builds_no_graph():
    inst = build("mlp", dict(SIZES), "cpu")
    loss = graph_free_forward(inst, Discretization("rk4", 4), torch.device("cpu"))()
    assert loss.grad_fn is None and math.isfinite(float(loss))


def test_autocast_cache_flag():
    with autocast("bfloat16", "cpu", cache=False):
        assert not torch.is_autocast_cache_enabled()
    with autocast("bfloat16", "cpu"):
        assert torch.is_autocast_cache_enabled()
    with Impl("torchdiffeq-nocache", "bfloat16").autocast(torch.device("cpu")):
        assert not torch.is_autocast_cache_enabled()
    with Impl("torchdiffeq", "bfloat16").autocast(torch.device("cpu")):
        assert torch.is_autocast_cache_enabled()


def test_solver_builds_each_strategy():
    from mpnode.core import DirectAdjoint, SegmentedAdjoint

    assert isinstance(solver("mpnode-direct").keywords["adjoint"], DirectAdjoint)
    assert isinstance(solver("mpnode-segmented").keywords["adjoint"], SegmentedAdjoint)
    assert solver("mpnode-auto", budget_bytes=4096).keywords["adjoint"].budget_bytes == 4096
    with pytest.raises(TypeError, match="takes no strategy options"):
        solver("torchdiffeq", checkpoint_dtype=torch.bfloat16)


def test_case_and_discretization_validate():
    with pytest.raises(ValueError, match="needs steps >= 1"):
        Case("mlp", SIZES, 0, (Impl("mpnode"),))
    with pytest.raises(ValueError, match="needs rtol and atol and steps=0"):
        Case("mlp", SIZES, 8, (Impl("mpnode"),), method="dopri5", rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="unknown method"):
        Discretization("rk45", 4)
    with pytest.raises(ValueError, match="one is adaptive"):
        Discretization("rk4", 4).with_method("dopri5")
    with pytest.raises(ValueError, match="unknown"):
        build("mlp", {**dict(SIZES), "depth": 3}, "cpu")
