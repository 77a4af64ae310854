"""tools/remeasure_held.py: held bytes of a results file measured again, every other field kept."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from mpnode.bench.cli import main

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("remeasure_held", ROOT / "tools" / "remeasure_held.py")
remeasure_held = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(remeasure_held)


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    pytest.importorskip("torchdiffeq")
    out = tmp_path_factory.mktemp("res")
    assert main(["run", "--suite", "smoke", "--problems", "mlp", "--repeats", "1", "--out", str(out),
                 "--no-progress", "--no-plots"]) == 0
    return out / "results.json"


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def test_held_bytes_are_measured_again_and_the_rest_kept(smoke_results):
    measured = _rows(smoke_results)
    data = json.loads(smoke_results.read_text())
    for r in data["rows"]:
        if r["held_bytes"] is not None:
            r["held_bytes"], r["held_vs_torchdiffeq"] = 1, None  # wrong figures, as a faulty meter would have written
    smoke_results.write_text(json.dumps(data))
    assert remeasure_held.main([str(smoke_results)]) == 0
    again = _rows(smoke_results)
    assert again == measured  # held bytes and their ratios back, times and the rest untouched
    assert any(r["held_bytes"] for r in again)
    assert any(r["held_vs_torchdiffeq"] and r["axis"] == "adaptive" and r["steps"] != 0 for r in again)
    meta = json.loads(smoke_results.read_text())["meta"]
    assert "remeasure_held.py" in meta["held_remeasured"]["command"] and meta["growth"]
    with (smoke_results.parent / "results.csv").open() as fh:
        assert [int(r["held_bytes"]) for r in csv.DictReader(fh) if r["held_bytes"]] == \
            [r["held_bytes"] for r in measured if r["held_bytes"] is not None]


def test_a_row_whose_computation_changed_is_refused_or_kept_as_run(smoke_results):
    data = json.loads(smoke_results.read_text())
    row = next(r for r in data["rows"] if r["held_bytes"] is not None)
    row["loss"] += 1.0
    row["held_bytes"] = 1
    smoke_results.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="rerun the suite"):
        remeasure_held.main([str(smoke_results), "--dry"])
    assert remeasure_held.main([str(smoke_results), "--keep-changed"]) == 0
    after = json.loads(smoke_results.read_text())
    assert after["rows"][data["rows"].index(row)]["held_bytes"] == 1  # left as it was
    assert [row["impl"] in k for k in after["meta"]["held_remeasured"]["kept_as_run"]] == [True]
