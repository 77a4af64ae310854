"""Test sessions: each package across the precision matrix, CPU by default, CUDA where present.

All sessions share one environment (``.nox/shared``) so torch is installed once,
not once per session; it is rebuilt when the pinned requirements or any
package's ``pyproject.toml`` change.  ``MPNODE_SYSTEM_PYTHON=1`` uses the
current interpreter instead (machines without a package index, e.g. the GPU box).

    nox                      # CPU matrix: tests-<package>-<precision>
    nox -s demo              # the main job: linear-ODE accuracy demo (table + plot)
    nox -s bench             # the quick benchmark suite
    nox -s gpu               # CUDA tests of every package + the GPU suite
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
ENV = ROOT / ".nox" / "shared"
PACKAGES = ("core", "scaler", "models", "bench")
PRECISIONS = ("float32", "bfloat16", "float16")
# torch 2.14.1 is the release with a matching torchvision (MNIST helpers); both install from the local wheel cache.
TORCH = ("torch==2.14.1", "torchvision==0.29.1")

nox.options.sessions = [f"tests-{p}-{q}" for p in PACKAGES for q in PRECISIONS]
nox.options.default_venv_backend = "none"


def _fingerprint() -> str:
    h = hashlib.sha256(" ".join(TORCH).encode())
    for f in [ROOT / "requirements-test.txt", *sorted(ROOT.glob("packages/*/pyproject.toml"))]:
        h.update(f.read_bytes())
    return h.hexdigest()


def shared_python(session: nox.Session) -> str:
    """Path of the shared environment's interpreter, creating or refreshing it once."""
    if os.environ.get("MPNODE_SYSTEM_PYTHON"):
        return sys.executable
    python = str(ENV / "bin" / "python")
    stamp = ENV / ".installed"
    want = _fingerprint()
    if stamp.exists() and stamp.read_text() == want:
        return python
    session.log(f"building the shared environment {ENV} (once per change of requirements)")
    session.run(sys.executable, "-m", "venv", "--clear", str(ENV), external=True)
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    session.run(*pip, *TORCH, external=True)
    editable = [arg for p in PACKAGES for arg in ("-e", str(ROOT / "packages" / f"mpnode-{p}"))]
    session.run(*pip, "-r", str(ROOT / "requirements-test.txt"), *editable, external=True)
    stamp.write_text(want)
    return python


def _pytest(session: nox.Session, package: str, precision: str, device: str) -> None:
    python = shared_python(session)
    if device == "cuda":
        probe = session.run(python, "-c", "import torch; print(torch.cuda.is_available())", silent=True, external=True)
        if "True" not in str(probe):
            session.skip("CUDA is not available on this machine")
    session.run(
        python, "-m", "pytest", f"tests/{package}", f"--precision={precision}", f"--device={device}",
        *session.posargs, external=True,
    )


def _define_test_session(package: str, precision: str, device: str) -> None:
    suffix = "" if device == "cpu" else f"-{device}"

    def session_fn(session: nox.Session) -> None:
        _pytest(session, package, precision, device)

    session_fn.__doc__ = f"pytest tests/{package} at {precision} on {device}"
    nox.session(name=f"tests-{package}-{precision}{suffix}")(session_fn)


for _package in PACKAGES:
    for _precision in PRECISIONS:
        for _device in ("cpu", "cuda"):
            _define_test_session(_package, _precision, _device)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: the linear-ODE accuracy demo (prints the table, writes a plot)."""
    python = shared_python(session)
    session.run(python, "examples/modeleq_demo.py", *session.posargs, external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """The quick benchmark suite on the CPU: table, CSV/JSON and plots under outputs/bench/quick-cpu."""
    python = shared_python(session)
    session.run(python, "-m", "mpnode.bench", "run", "--suite", "quick", *session.posargs, external=True)


@nox.session
def gpu(session: nox.Session) -> None:
    """CUDA tests of every package + the gpu benchmark suite (benchmarks/gpu_run.sh; results under $OUT)."""
    python = shared_python(session)
    env = {"PYTHON": python, "OUT": os.environ.get("OUT", str(ROOT / "outputs" / "gpu_run"))}
    session.run("bash", str(ROOT / "benchmarks" / "gpu_run.sh"), *session.posargs, env=env, external=True)
