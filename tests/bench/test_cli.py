"""The command line in smoke form: files, table, plots; suite listing and dry runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from mpnode.bench.cli import main
from mpnode.bench.suites import SUITES, get_suite


def test_smoke_run_writes_table_csv_json_and_plots(tmp_path, capsys):
    pytest.importorskip("torchdiffeq")
    out = tmp_path / "res"
    assert main(["run", "--suite", "smoke", "--problems", "mlp", "--repeats", "1", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mpnode/float32" in printed and "torchdiffeq/float32" in printed
    assert "growth with steps" in printed and "ms/step" in printed
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    n_expected = sum(len(c.impls) for c in get_suite("smoke").cases() if c.problem == "mlp")
    assert len(rows) == n_expected
    # every row ran, except torchode where it is not installed (then it says how to install it)
    assert all(r["error"] == "" or (r["solver"] == "torchode" and "pip install torchode" in r["error"]) for r in rows)
    mp = next(r for r in rows if r["impl"] == "mpnode/float32" and r["axis"] == "base")
    assert 0 < float(mp["held_vs_torchdiffeq"]) < 0.2 and int(mp["syncs_backward"]) == 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["torch"] == torch.__version__ and meta["suite"] == "smoke" and meta["growth"]
    assert len(meta["load_average_start"]) == 3 and len(meta["load_average_end"]) == 3
    pytest.importorskip("matplotlib")
    assert (out / "steps_mlp.png").stat().st_size > 1000
    assert (out / "ratios_mlp_batch.png").stat().st_size > 1000
    assert (out / "dial_mlp.png").stat().st_size > 1000
    for section in ("the time/memory dial", "dial targets", "adaptive steps", "vs floor"):
        assert section in printed


def test_plot_command_rerenders(tmp_path, capsys):
    pytest.importorskip("torchdiffeq")
    out = tmp_path / "r"
    main(["run", "--suite", "smoke", "--problems", "cnf", "--repeats", "1", "--out", str(out), "--no-progress",
          "--no-plots"])
    capsys.readouterr()
    assert main(["plot", str(out / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert "cnf" in capsys.readouterr().out
    assert (tmp_path / "again" / "results.csv").exists()


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_dry_run_lists_every_case(suite, capsys):
    assert main(["run", "--suite", suite, "--dry"]) == 0
    text = capsys.readouterr().out
    assert f"{len(get_suite(suite).cases())} cases" in text


def test_quick_suite_shape():
    quick = get_suite("quick")
    problems = {c.problem for c in quick.cases()}
    assert problems == {"mlp", "otflow", "conv", "cnf"}
    precisions = {i.precision for c in quick.cases() for i in c.impls}
    assert precisions == {"float32", "bfloat16"}
    assert {c.axis for c in quick.cases()} == {"base", "steps", "batch", "width", "adaptive"}
    adaptive = [c for c in quick.cases() if c.axis == "adaptive"]
    assert {c.problem for c in adaptive} == {"mlp", "cnf"} and {c.method for c in adaptive} == {"dopri5"}
    labels = {i.label for c in adaptive for i in c.impls}
    assert {"torchdiffeq-adjoint/float32", "torchode/float32", "torchode/float32+tsit5", "mpnode/bfloat16"} <= labels


def test_dial_suites_shape():
    dial = get_suite("dial").cases()
    assert {(c.problem, c.steps) for c in dial} == {("mlp", 16), ("mlp", 64), ("mlp", 256),
                                                    ("conv", 4), ("conv", 8), ("conv", 32)}
    for c in dial:
        labels = {i.label: t for i, t in zip(c.impls, c.timed_flags)}
        for solver in ("mpnode", "mpnode-direct", "mpnode-segmented"):
            assert labels[f"{solver}/float32"] and not labels[f"{solver}/bfloat16"]
        assert labels["torchdiffeq/float32"] and labels["torchdiffeq-adjoint/float32"]
        assert not labels["torchdiffeq/bfloat16"] and not labels["torchdiffeq-nocache/bfloat16"]
    (long,) = get_suite("dial-long").cases()
    assert long.steps == 4096 and {i.label for i in long.impls} == {"mpnode/float32", "mpnode-segmented/float32"}
    gpu = {i.label for c in get_suite("gpu").cases() if c.axis == "dial" for i in c.impls}
    assert {"mpnode-direct/bfloat16", "mpnode-segmented/float32", "torchdiffeq-nocache/bfloat16"} <= gpu


def test_gpu_suite_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(SystemExit, match="--suite quick"):
        main(["run", "--suite", "gpu"])


def test_module_entry_point_lists_suites():
    done = subprocess.run([sys.executable, "-m", "mpnode.bench", "list"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "quick" in done.stdout and "core-mlp" in done.stdout and "gpu" in done.stdout


def test_run_without_suite_says_it_runs_the_default(capsys):
    assert main(["run", "--dry"]) == 0
    err = capsys.readouterr().err
    assert "no --suite given, running the default suite 'quick'" in err and "mpnode-bench list" in err


def test_plain_tables_wrap_to_the_width_repeating_the_key_columns():
    from mpnode.bench.experiment import plain_table

    header = ["impl", *(f"column{i}" for i in range(8))]
    rows = [["mpnode", *(f"{i}.00x" for i in range(8))], ["torchdiffeq", *("-" * 1 for _ in range(8))]]
    text = plain_table("title", header, rows, width=40, key=["impl"])
    assert max(len(line) for line in text.splitlines()) <= 40
    blocks = text.split("\n\n")
    assert len(blocks) >= 3 and all(b.splitlines()[-4].startswith("impl ") for b in blocks)  # the key in each block
    for i in range(8):
        assert text.count(f"column{i}") == 1
    wide = plain_table("title", header, rows, key=["impl"])
    assert len(wide.splitlines()) == 5  # fits: one block
