"""Every code block of README.md and docs/ works as written, with the setup its page states.

* ``python`` blocks run, each in a fresh interpreter in a scratch folder (CPU, one thread), with the
  packages of this environment.  A block a page shows only as a fragment of a larger program is preceded by
  ``<!-- test-setup: <file> -->``: ``tests/examples/doc_setups/<file>`` runs first (the definitions the page's
  prose names, e.g. a model and a data set).  A ``text`` block right after a python block is its expected output:
  the printed lines must match, numbers to the digits shown (a last-digit difference is allowed, the README says
  so), words exactly.
* ``bash`` blocks and the unlabelled command blocks are checked, not run (they take minutes to hours): every
  ``python <script>`` names an existing script whose ``--help`` lists each ``--flag`` the command passes,
  ``mpnode-bench run --suite <s>`` names a suite, ``nox -s <s>`` a session of noxfile.py, and every
  ``./packages/...`` path exists, with the extras its ``pyproject.toml`` declares.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SETUPS = Path(__file__).parent / "doc_setups"
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```", re.S | re.M)
SETUP = re.compile(r"<!--\s*test-setup:\s*(\S+)\s*-->\s*$")


def blocks(page: Path) -> list[tuple[int, str, str, str | None]]:
    """``(line, language, body, setup)`` of each fenced block of ``page``."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").splitlines()
        setup = SETUP.search(before[-1]) if before else None
        out.append((text.count("\n", 0, m.start()) + 1, m["lang"], m["body"], setup.group(1) if setup else None))
    return out


def _python_blocks():
    for page in PAGES:
        found = blocks(page)
        for i, (line, lang, body, setup) in enumerate(found):
            if lang == "python":
                expected = found[i + 1][2] if i + 1 < len(found) and found[i + 1][1] == "text" else None
                yield pytest.param(body, setup, expected, id=f"{page.relative_to(ROOT)}:{line}")


def _command_lines():
    for page in PAGES:
        for line, lang, body, _ in blocks(page):
            if lang in ("bash", "sh", ""):
                joined = re.sub(r"\\\n\s*", " ", body)
                for k, cmd in enumerate(joined.splitlines()):
                    cmd = cmd.split(" #", 1)[0].strip()
                    if cmd and not cmd.startswith("#"):
                        yield pytest.param(cmd, id=f"{page.relative_to(ROOT)}:{line}+{k}")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS",)}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    return env


@pytest.mark.parametrize("body, setup, expected", list(_python_blocks()))
def test_python_block_runs(body, setup, expected, tmp_path):
    script = (SETUPS / setup).read_text() + "\n" if setup else ""
    path = tmp_path / "block.py"
    path.write_text(script + body)
    done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=900)  # in a scratch folder: a block may write files (a checkpoint, outputs/)
    assert done.returncode == 0, f"the block failed:\n{body}\n--- stderr ---\n{done.stderr[-3000:]}"
    if expected is not None:
        assert_same_output(done.stdout, expected)


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def assert_same_output(got: str, expected: str) -> None:
    """Lines match; words exactly, numbers to the digits shown, allowing one unit of the last digit."""
    got_lines, want_lines = got.strip().splitlines(), expected.strip().splitlines()
    assert len(got_lines) == len(want_lines), f"printed\n{got}\nexpected\n{expected}"
    for g, w in zip(got_lines, want_lines):
        assert NUMBER.sub("#", g).split() == NUMBER.sub("#", w).split(), f"printed {g!r}, the page shows {w!r}"
        for a, b in zip(NUMBER.findall(g), NUMBER.findall(w)):
            mantissa = b.split("e")[0]
            ulp = 10.0 ** -(len(mantissa.split(".")[1]) if "." in mantissa else 0)
            ulp *= 10.0 ** int(b.split("e")[1]) if "e" in b else 1.0
            assert abs(float(a) - float(b)) <= ulp * 1.0001, f"printed {g!r}, the page shows {w!r}"


# ------------------------------------------------------------------ command lines


@functools.cache
def _help(script: str) -> str:
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{script} --help failed:\n{done.stderr[-2000:]}"
    return done.stdout


@functools.cache
def _nox_sessions() -> set[str]:
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    names = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)
             and any("session" in ast.unparse(d) for d in f.decorator_list)}
    names |= {f"tests-{s}-{q}" for s in ("core", "scaler", "models", "bench", "examples")
              for q in ("float32", "bfloat16", "float16")}
    return names


def _suites() -> set[str]:
    from mpnode.bench.suites import SUITES

    return set(SUITES)


def _extras(package: str) -> set[str]:
    project = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())["project"]
    return set(project.get("optional-dependencies", {}))


@pytest.mark.parametrize("command", list(_command_lines()))
def test_command_line_names_what_exists(command):
    words = shlex.split(command.replace("$", "_"))
    for i, w in enumerate(words):
        if w in ("python", "python3") and i + 1 < len(words) and words[i + 1].endswith(".py"):
            script = words[i + 1]
            assert (ROOT / script).is_file(), f"{script} does not exist"
            flags = [f.split("=")[0] for f in words[i + 2:] if f.startswith("--") and f != "--"]
            if "--" in words[i + 2:]:  # flags after `--` belong to the script the first one runs
                flags = [f.split("=")[0] for f in words[i + 2: i + 2 + words[i + 2:].index("--")] if f.startswith("--")]
            help_text = _help(script)
            unknown = [f for f in flags if f not in help_text]
            assert not unknown, f"{script} does not take {unknown}"
        if (w == "--suite" and words[0] in ("mpnode-bench",)) or (w == "--suite" and "mpnode.bench" in words):
            assert words[i + 1] in _suites(), f"no suite {words[i + 1]!r}"
        if w == "-s" and i > 0 and words[i - 1] == "nox":
            assert words[i + 1] in _nox_sessions(), f"no nox session {words[i + 1]!r}"
        m = re.match(r"\.?/?packages/(mpnode-\w+)(?:\[(\w+)\])?$", w)
        if m:
            assert (ROOT / "packages" / m[1] / "pyproject.toml").is_file(), f"no package {m[1]}"
            assert m[2] is None or m[2] in _extras(m[1]), f"{m[1]} has no extra [{m[2]}]"
