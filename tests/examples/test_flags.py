"""Every example and demo takes the same test flag: ``--smoke``, with ``--quick`` as its alias."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(f"{p.parent.name}/{p.name}" for folder in ("examples", "demos") for p in (ROOT / folder).glob("*.py"))


def test_the_scripts_are_found():
    assert len(SCRIPTS) >= 8 and "demos/demo_taylor.py" in SCRIPTS and "examples/ode_mnist.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_takes_smoke_and_quick(script, run_in_process):
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit) as done:
        run_in_process(script, "--help")
    assert done.value.code == 0
    assert "--smoke, --quick" in text.getvalue(), text.getvalue()
