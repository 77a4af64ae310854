"""The ``speed`` suite at smoke size: every row, float64 errors, memory, the machine's low-precision check, targets."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from mpnode.bench import hardware
from mpnode.bench.cli import main
from mpnode.bench.report import SPEED_TARGETS, speed_targets
from mpnode.bench.runner import BenchRow
from mpnode.bench.suites import SPEED_IMPLS, get_suite

pytestmark = pytest.mark.filterwarnings("ignore::mpnode.core.MixedPrecisionToleranceWarning")


def _rows(out) -> list[dict]:
    with (out / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def forced_smoke(tmp_path_factory):
    """The whole smoke suite, every precision timed whatever this machine's kernels (CI has no fast bfloat16)."""
    pytest.importorskip("torchdiffeq")
    out = tmp_path_factory.mktemp("speed")
    code = main(["run", "--suite", "speed", "--smoke", "--force-low-precision", "--repeats", "1", "--out", str(out),
                 "--no-progress"])
    return code, out


def test_smoke_suite_runs_every_row(forced_smoke, capsys):
    code, out = forced_smoke
    assert code == 0
    rows = _rows(out)
    cases = get_suite("speed").cases(smoke=True)
    assert len(rows) == sum(len(c.impls) for c in cases)
    assert {c.problem for c in cases} == {"mlp", "conv", "otflow", "cnf", "demo"}
    assert all(r["error"] == "" for r in rows), [(r["impl"], r["error"]) for r in rows if r["error"]]
    assert all(float(r["time_s"]) > 0 and r["axis"] == "speed" for r in rows)
    for r in rows:
        err = float(r["grad_rel_err"])
        if r["method"] == "rk4":
            assert r["grad_reference"] == "float64 on the same grid"
            bound = {"float32": 1e-5, "bfloat16": 0.1, "float16": 1e-2}[r["precision"]]
            assert err < bound, (r["problem"], r["impl"], err)
        else:  # the adaptive demo case: float32 only, against a tight float64 dopri5 solve
            assert r["precision"] == "float32" and err < 1e-3
    by = {(r["problem"], r["sizes"], r["impl"]): r for r in rows}
    for (problem, sizes, impl), r in by.items():
        if impl.startswith(("mpnode/", "mpnode-segmented/")):  # checkpoints only
            direct = by[(problem, sizes, impl.replace("mpnode", "mpnode-direct", 1).replace("-direct-segmented",
                                                                                                "-direct"))]
            assert int(r["held_bytes"]) < int(direct["held_bytes"]), (problem, impl)


def test_smoke_suite_records_the_machine_and_renders(forced_smoke):
    _, out = forced_smoke
    meta = json.loads((out / "results.json").read_text())["meta"]
    hw = meta["hardware"]
    assert hw["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(hw["matmul_s"]) == {"float32", "bfloat16", "float16"} and min(hw["matmul_s"].values()) > 0
    assert meta["forced_low_precision"] and meta["smoke"] and meta["torch_threads"] == 1
    assert len(meta["load_average_start"]) == 3 and len(meta["load_average_end"]) == 3
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("machine: cpu") and "load average" in summary
    assert "speed targets (cpu" in summary and "float16 (mpnode default strategy" in summary
    assert "vs own fp32" in summary and "grad err vs f64" in summary
    pytest.importorskip("matplotlib")
    assert (out / "speed.png").stat().st_size > 1000


def test_low_precision_without_fast_kernels_is_skipped_with_the_reason(tmp_path, monkeypatch):
    pytest.importorskip("torchdiffeq")
    slow_bf16 = hardware.LowPrecisionSpeed("cpu", "test CPU", "AVX2", [], (256, 512, 512),
                                           {"float32": 1e-3, "bfloat16": 4e-3, "float16": 0.5e-3})
    monkeypatch.setattr(hardware, "measure", lambda device: slow_bf16)
    out = tmp_path / "gated"
    assert main(["run", "--suite", "speed", "--smoke", "--problems", "mlp", "--repeats", "1", "--out", str(out),
                 "--no-progress", "--no-plots"]) == 0
    rows = _rows(out)
    bf16 = [r for r in rows if r["precision"] == "bfloat16"]
    assert bf16 and all(r["error"].startswith("skipped: no fast bfloat16 kernels here") and r["time_s"] == ""
                        for r in bf16)
    assert all(r["error"] == "" and float(r["time_s"]) > 0 for r in rows if r["precision"] != "bfloat16")
    summary = (out / "summary.txt").read_text()
    assert "bfloat16: skipped: no fast bfloat16 kernels on this CPU (test CPU, AVX2)" in summary
    assert "0.25x float32's speed" in summary and "--force-low-precision" in summary
    assert "\nfloat16: skipped" not in summary


def test_fast_means_a_measured_matmul_speedup():
    speed = hardware.LowPrecisionSpeed("cpu", "x", "AVX512", [], (1, 1, 1),
                                       {"float32": 3e-3, "bfloat16": 1e-3, "float16": 2.8e-3})
    assert speed.is_fast("float32") and speed.is_fast("bfloat16") and not speed.is_fast("float16")
    assert speed.skip_reason("bfloat16") is None and speed.row_note("bfloat16") is None
    assert "1.07x float32's speed" in speed.skip_reason("float16")
    assert not hardware.LowPrecisionSpeed("cpu", "x", "AVX512").is_fast("bfloat16")  # not measured: not fast


def test_measure_reads_this_cpu():
    speed = hardware.measure("cpu", precisions=("float32", "bfloat16"))
    assert speed.capability == torch.backends.cpu.get_cpu_capability() and speed.threads == torch.get_num_threads()
    assert speed.matmul_s["float32"] > 0 and speed.speedup("bfloat16") > 0
    assert "matmul" in speed.describe() and speed.capability in speed.describe()


def _row(problem, impl, time_s, sizes="width=512", peak=None, error=None):
    solver, precision = impl.split("+")[0].split("/")
    return BenchRow("speed", problem, "speed", sizes, 8, impl, solver, precision, "cpu", time_s=time_s,
                    peak_bytes=peak, error=error)


def test_speed_targets_report_each_ratio():
    rows = [_row("mlp", "torchdiffeq/float32", 1.0), _row("mlp", "torchdiffeq-nocache/bfloat16", 0.5),
            _row("mlp", "mpnode-direct/bfloat16", 0.4), _row("mlp", "mpnode/bfloat16", 0.6),
            _row("mlp", "mpnode/float16+scaler", None, error="skipped: no fast float16 kernels here (x)")]
    text = speed_targets(rows, "cpu")
    assert "mpnode-direct/bfloat16 / torchdiffeq-nocache/bfloat16: 0.80x (<= 0.9" in text and "): met" in text
    assert "mpnode/bfloat16 / torchdiffeq/float32: 0.60x (<= 0.45" in text and "MISSED" in text
    assert "mpnode/bfloat16 / mpnode-direct/bfloat16: 1.50x (<= 1.35" in text
    assert "mlp: skipped: no fast float16 kernels here" in text
    assert all(t.numerator in {i.label for i in SPEED_IMPLS} | {"mpnode/float32", "mpnode-direct/float32"}
               for t in SPEED_TARGETS)


def test_gpu_targets_compare_each_strategy_with_its_own_float32():
    gib = 2**30
    rows = [_row("conv", "mpnode-direct/float32", 1.0, "c=1", 4 * gib),
            _row("conv", "mpnode-direct/bfloat16", 0.4, "c=1", 1.5 * gib),
            _row("conv", "mpnode-direct/float16+scaler", 0.6, "c=1", 2.5 * gib)]
    text = speed_targets(rows, "cuda")
    assert "mpnode-direct/bfloat16: speed-up 2.50x vs own float32 (>= 2): met; CUDA peak 0.38x" in text
    assert "mpnode-direct/float16+scaler: speed-up 1.67x vs own float32 (>= 2): MISSED; CUDA peak 0.62x" in text


def test_smoke_flag_needs_a_suite_with_a_smoke_variant():
    with pytest.raises(ValueError, match=r"no --smoke variant.*speed"):
        main(["run", "--suite", "quick", "--smoke", "--dry"])


def test_a_cut_run_rerenders_with_its_machine(forced_smoke, tmp_path):
    """gpu_run.sh renders results.partial.jsonl when a time limit cuts a suite: the machine line must survive."""
    _, out = forced_smoke
    data = json.loads((out / "results.json").read_text())
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "results.partial.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data["rows"][:12]))
    (cut / "meta.partial.json").write_text(json.dumps({k: v for k, v in data["meta"].items() if k != "growth"}))
    assert main(["plot", str(cut / "results.partial.jsonl")]) == 0
    summary = (cut / "summary.txt").read_text()
    assert summary.startswith("machine: cpu") and "speed targets" in summary
    assert json.loads((cut / "results.json").read_text())["meta"]["partial"] is True


def test_precisions_flag_keeps_those_rows(capsys):
    assert main(["run", "--suite", "speed", "--smoke", "--problems", "mlp", "--precisions", "float32,bfloat16",
                 "--dry"]) == 0
    text = capsys.readouterr().out
    assert "mpnode/bfloat16" in text and "torchdiffeq-nocache/bfloat16" in text and "float16+scaler" not in text
    assert main(["run", "--suite", "speed", "--sizes", "width=512", "--dry"]) == 0
    text = capsys.readouterr().out
    assert "1 cases" in text and "width=512" in text
    with pytest.raises(SystemExit, match="unknown precisions"):
        main(["run", "--suite", "speed", "--precisions", "fp8", "--dry"])
