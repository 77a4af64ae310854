"""The ODE-Net MNIST recipe: learning-rate decay, end-of-run evaluations, and the multi-seed runner."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ode_mnist(load_script):
    return load_script("examples/ode_mnist.py")


@pytest.fixture(scope="module")
def seeds(load_script):
    return load_script("benchmarks/mnist_seeds.py")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_factor_decays_from_one_to_the_final_ratio(ode_mnist, schedule):
    f = ode_mnist.lr_factor(schedule, 0.01, 101)
    values = [f(k) for k in range(101)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.01)
    assert all(a > b for a, b in itertools.pairwise(values))  # strictly decreasing
    midpoint = 0.505  # both schedules pass (1 + r) / 2 halfway
    assert values[50] == pytest.approx(midpoint)
    if schedule == "cosine":
        assert values[90] < 0.04  # flat tail: the last tenth of the run is below 4 % of the initial rate
    else:
        assert values[90] == pytest.approx(1 - 0.99 * 0.9)


def test_lr_factor_constant_and_errors(ode_mnist):
    assert [ode_mnist.lr_factor("constant", 0.01, 10)(k) for k in (0, 9)] == [1.0, 1.0]
    assert ode_mnist.lr_factor("cosine", 0.01, 1)(0) == 1.0  # one step: nothing to decay
    with pytest.raises(ValueError, match="final-lr-ratio"):
        ode_mnist.lr_factor("cosine", 1.5, 10)
    with pytest.raises(ValueError, match="constant, cosine or linear"):
        ode_mnist.lr_factor("step", 0.01, 10)


def test_final_eval_steps(ode_mnist):
    assert ode_mnist.final_eval_steps(100, 1, 1) == [100]
    assert ode_mnist.final_eval_steps(100, 3, 5) == [90, 95, 100]
    assert ode_mnist.final_eval_steps(3, 3, 1) == [1, 2, 3]
    with pytest.raises(ValueError, match="only 3 optimizer steps"):
        ode_mnist.final_eval_steps(3, 4, 1)
    with pytest.raises(ValueError, match="must be >= 1"):
        ode_mnist.final_eval_steps(3, 0, 1)
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        ode_mnist.final_eval_steps(0, 1, 1)


def test_run_decays_the_rate_and_evaluates_the_last_steps(tmp_path, read_csv):
    """2 epochs of 4 steps (16 generated examples, batch 4): the lr of steps 1..8 follows the linear schedule."""
    pytest.importorskip("torchvision", reason="install mpnode-models[mnist]")
    from mpnode.models.mnist import write_idx_mnist

    data = write_idx_mnist(tmp_path / "data", n_train=16, n_test=8)
    proc = subprocess.run([sys.executable, str(ROOT / "examples/ode_mnist.py"), "--data-root", str(data),
                           "--width", "8", "--steps", "1", "--batch-size", "4", "--epochs", "2",
                           "--lr-schedule", "linear", "--lr", "0.003", "--final-lr-ratio", "0.1",
                           "--final-evals", "3", "--final-eval-gap", "2", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_csv(tmp_path / "out" / "log.csv")
    final = read_csv(tmp_path / "out" / "final.csv")
    lr_of_step = [0.003 * (1 - 0.9 * k / 7) for k in range(8)]  # linear from 3e-3 to 3e-4 over 8 steps
    assert [float(r["lr"]) for r in log] == pytest.approx([lr_of_step[3], lr_of_step[7]])
    assert [int(r["step"]) for r in final] == [4, 6, 8]
    assert [float(r["lr"]) for r in final] == pytest.approx([lr_of_step[3], lr_of_step[5], lr_of_step[7]])
    assert final[0]["test_acc"] == log[0]["test_acc"]  # step 4 ends epoch 1: same weights, same accuracy
    assert final[-1]["test_acc"] == log[-1]["test_acc"]  # the last evaluation is the final model's
    assert "over the last 3 evaluations (steps 4..8)" in proc.stdout


def test_too_many_final_evals_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples/ode_mnist.py"), "--smoke", "--final-evals", "5",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "only 2 optimizer steps: lower one of them" in proc.stderr


def test_summarize_statistics(seeds):
    runs = [dict(config=c, seed=s, final_test_acc=a, last_min=a - w, last_max=a, train_s_per_epoch=t,
                 test_s_per_eval=1.0, step_held_mib=h, max_rss_mib=900, cpu_s=10.0)
            for c, h, t, rows in (("float32/mpnode", 61.2, 10.0, ((1, 0.90, 0.01), (0, 0.92, 0.0), (2, 0.97, 0.02))),
                                  ("bfloat16/mpnode", 32.6, 6.0, ((0, 0.80, 0.05),)))
            for s, a, w in rows]
    f32, bf16 = seeds.summarize(runs)
    assert f32["seeds"] == "0 1 2" and f32["per_seed"] == "0.9200 0.9000 0.9700"
    assert f32["acc_mean"] == pytest.approx(0.93) and f32["acc_std"] == pytest.approx(math.sqrt(0.0013), abs=1e-4)
    assert (f32["acc_min"], f32["acc_max"], f32["within_run_range_max"]) == (0.90, 0.97, 0.02)
    assert (f32["cpu_s_total"], f32["cpu_s_per_run"]) == (30.0, 10)
    assert bf16["n"] == 1 and bf16["acc_std"] == ""
    table = seeds.markdown([f32, bf16])
    assert "| float32/mpnode | 0.9300 ± 0.0361 [0.9000, 0.9700] | 0.9200 0.9000 0.9700 | 0.0200 | 10.0 | 10 |" in table
    assert "| bfloat16/mpnode | 0.8000 [0.8000, 0.8000] |" in table


def test_seed_runner_runs_resumes_and_summarizes(seeds, tmp_path, read_csv):
    results, work = tmp_path / "results", tmp_path / "work"
    argv = ["--results", str(results), "--work", str(work), "--seeds", "0", "1", "--configs", "bfloat16/torchdiffeq",
            "--", "--smoke", "--final-evals", "2"]
    (row,) = seeds.main(argv)
    assert row["config"] == "bfloat16/torchdiffeq" and row["n"] == 2
    runs = read_csv(results / "runs.csv")
    assert [(r["seed"], r["n_last"], r["train_n"]) for r in runs] == [("0", "2", "16"), ("1", "2", "16")]
    assert all(float(r["cpu_s"]) > 0 and float(r["max_rss_mib"]) > 50 for r in runs)
    assert "--seed 1" in runs[1]["command"] and "--odeint torchdiffeq" in runs[1]["command"]
    assert len(read_csv(results / "bfloat16_torchdiffeq_seed1_final.csv")) == 2
    assert "| bfloat16/torchdiffeq |" in (results / "summary.md").read_text()
    seeds.main(argv)  # resumes: nothing left to run
    assert len(read_csv(results / "runs.csv")) == 2


def test_seed_runner_rejects_flags_it_sets(seeds, tmp_path):
    with pytest.raises(SystemExit):
        seeds.main(["--results", str(tmp_path), "--", "--seed", "3"])
