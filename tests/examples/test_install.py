"""The packages install as wheels into a fresh environment, and the README's quick start runs there.

Each package's wheel is built (hatchling, no network: ``--no-build-isolation``) and installed with ``--no-deps``
into a new virtual environment that sees nothing but torch (the site-packages holding torch joins it through a
``.pth`` file, as in noxfile.py). There ``mpnode.core``, ``mpnode.scaler`` and ``mpnode.models`` import from the
installed wheels, mpnode-scaler's entry point is registered, mpnode-bench's files and its ``mpnode-bench`` command
are installed, and the README's quick start prints what the README shows, with mpnode-core alone.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_doc_blocks", Path(__file__).with_name("test_docs_code.py"))
_doc_blocks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_doc_blocks)
assert_same_output, blocks = _doc_blocks.assert_same_output, _doc_blocks.blocks
PACKAGES = ("core", "scaler", "models", "bench")

pytest.importorskip("hatchling", reason="building the wheels needs hatchling (nox's base environment has it)")


def _run(*cmd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_INDEX_URL")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=900, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    """``(python, wheels)``: a new virtual environment with the four wheels installed and torch visible."""
    tmp = tmp_path_factory.mktemp("install")
    dist = tmp / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist,
         *(ROOT / "packages" / f"mpnode-{p}" for p in PACKAGES))
    wheels = sorted(dist.glob("*.whl"))
    env = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", env)
    python = env / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    torch_site = str(Path(torch.__file__).resolve().parents[1])  # holds torch (and pip) in nox's base environment
    Path(site, "zz_torch_only.pth").write_text(f"import site; site.addsitedir({torch_site!r})\n")
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", *wheels)
    return python, env, wheels


def test_each_package_builds_a_wheel(fresh_env):
    _, _, wheels = fresh_env
    names = sorted(re.match(r"(mpnode_\w+?)-", w.name).group(1) for w in wheels)
    assert names == sorted(f"mpnode_{p}" for p in PACKAGES)


def test_the_wheels_import_from_the_fresh_environment(fresh_env):
    python, env, _ = fresh_env
    probe = (
        "import importlib.metadata as md, mpnode.core, mpnode.scaler, mpnode.models;"
        "print(mpnode.core.__file__); print(mpnode.scaler.__file__); print(mpnode.models.__file__);"
        "print([(e.dist.name, e.value) for e in md.entry_points(group='mpnode.adjoint_scaling')]);"
        "print(mpnode.core.__version__ == md.version('mpnode-core'))"
    )
    lines = _run(python, "-c", probe).splitlines()
    for path in lines[:3]:
        assert Path(path).resolve().is_relative_to(env.resolve()), f"{path} is not from the installed wheels"
    assert "('mpnode-scaler', 'mpnode.scaler:default_scaler')" in lines[3] and lines[4] == "True"
    assert (Path(lines[0]).parents[1] / "bench" / "cli.py").is_file()  # mpnode-bench's modules, next to core's
    assert (env / "bin" / "mpnode-bench").is_file()


def test_the_readme_quick_start_runs_with_mpnode_core_alone(fresh_env, tmp_path):
    _python, _env, wheels = fresh_env
    core_only = tmp_path / "core-only"
    _run(sys.executable, "-m", "venv", "--without-pip", core_only)
    site = _run(core_only / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    torch_site = str(Path(torch.__file__).resolve().parents[1])
    Path(site.strip(), "zz_torch_only.pth").write_text(f"import site; site.addsitedir({torch_site!r})\n")
    _run(core_only / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index",
         *(w for w in wheels if w.name.startswith("mpnode_core-")))
    readme = blocks(ROOT / "README.md")
    index = next(i for i, (_, lang, body, _) in enumerate(readme) if lang == "python" and "MLPField" in body)
    script = tmp_path / "quick_start.py"
    script.write_text(readme[index][2])
    assert readme[index + 1][1] == "text", "the README shows the quick start's output right after it"
    assert_same_output(_run(core_only / "bin" / "python", script, cwd=tmp_path), readme[index + 1][2])
