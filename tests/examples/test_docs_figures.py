"""tools/check_docs.py: the README's size and links, and every sourced figure of README.md and docs/ against its
results file (the docs session of noxfile.py runs the same script)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_docs", ROOT / "tools" / "check_docs.py")
check_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_docs)


def test_readme_and_docs_pass(capsys):
    status = check_docs.main()
    assert status == 0, capsys.readouterr().out


def test_a_figure_not_in_its_results_file_is_reported(tmp_path, monkeypatch):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": [{"impl": "a", "time_s": 0.3281, "held_bytes": 2162688, "ratio": 0.026},
                                            {"impl": "b", "time_s": 0.2231, "held_bytes": 83296512, "ratio": 1.0}]}))
    page = tmp_path / "page.md"
    page.write_text(
        "Run `cmd`, results in results.json:\n\n"
        "<!-- figures: results.json impl=a -->\n"
        "| impl | time | held | vs b |\n|---|---|---|---|\n"
        "| a | 328.1 ms | 2.06 MiB | 1/38.5 |\n"
        "| a | 328.2 ms | 2.07 MiB | 1/38.4 |\n"
        "| a | 223.1 ms | 79.44 MiB | 1.47x |\n"
    )
    monkeypatch.setattr(check_docs, "ROOT", tmp_path)
    problems = check_docs.check_figures(page)
    stale = sorted(p.split("'")[1] for p in problems)
    # 1.47x is 0.3281 / 0.2231, but the filter keeps row a only; 223.1 ms and 79.44 MiB are row b's
    assert stale == sorted(["328.2 ms", "2.07 MiB", "1/38.4", "223.1 ms", "79.44 MiB", "1.47x"]), problems
