"""Running the example and demo scripts from the tests: as subprocesses, or in-process by path.

A command-line run pays a fresh interpreter (about 4 s of CPU importing torch); each script runs
that way once in the test matrix, its other variants in-process.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_script(script: str, *args: str, timeout: float = 600) -> str:
    """``python <script> <args>`` from the repository root; returns stdout, fails the test on a non-zero exit."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _load_script(script: str):
    """A script loaded by path as a module (its ``main`` not run), registered in ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(f"_smoke_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _run_in_process(script: str, *args: str):
    """``main(args)`` of a script loaded by path (saves an interpreter start for the variant runs)."""
    module = _load_script(script)
    try:
        return module.main(list(args))
    finally:
        del sys.modules[module.__name__]


def _run(script: str, *args: str, as_command: bool) -> str:
    """The script's stdout, from a subprocess (``as_command``) or from ``main(args)`` in this process."""
    if as_command:
        return _run_script(script, *args)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _run_in_process(script, *args)
    return out.getvalue()


def _read_csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _as_fixture(function, scope: str = "function"):
    """A fixture, named like ``function`` without its leading underscore, that hands the test ``function``."""
    return pytest.fixture(scope=scope, name=function.__name__.lstrip("_"))(lambda: function)


run_script = _as_fixture(_run_script)
load_script = _as_fixture(_load_script, scope="session")
run_in_process = _as_fixture(_run_in_process)
run = _as_fixture(_run)  # run(script, *args, as_command=...)
read_csv = _as_fixture(_read_csv, scope="session")
