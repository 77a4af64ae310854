"""The training examples teach: each imports only what a user installs for it.

Allowed at module level: the standard library, torch, matplotlib and the mpnode packages a user
installs (``mpnode.core``, ``mpnode.models``, ``mpnode.scaler``) -- not the bench harness, not tqdm.
torchdiffeq (the comparison solver behind ``--odeint torchdiffeq``) only inside a function, guarded by
``except ImportError``, so the example runs without it.  The measurement scripts
(``modeleq_demo.py``, ``adaptive_precision.py``) may use the harness of mpnode-bench.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEASUREMENT_SCRIPTS = {"modeleq_demo.py", "adaptive_precision.py"}
TRAINING_EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name not in MEASUREMENT_SCRIPTS)
ALLOWED_TOP = {"torch", "matplotlib", "mpnode.core", "mpnode.models", "mpnode.scaler"}
OPTIONAL = {"torchdiffeq"}


def _imports(tree: ast.AST):
    """``(module name, node, guarded)`` of every import; ``guarded``: inside a ``try`` catching ImportError."""
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def guarded(node: ast.AST) -> bool:
        while node in parents:
            node, child = parents[node], node
            if isinstance(node, ast.Try) and child in node.body:
                names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
                if names & {"ImportError", "ModuleNotFoundError"}:
                    return True
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node, guarded(node)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            yield node.module, node, guarded(node)


def _allowed(module: str) -> bool:
    top = module.split(".")[0]
    return top in sys.stdlib_module_names or any(module == a or module.startswith(a + ".") for a in ALLOWED_TOP)


def test_the_examples_are_found():
    assert {"ode_demo.py", "ode_mnist.py", "cnf8g.py", "otflow.py", "bouncing_ball.py", "ddp_train.py"} <= set(
        TRAINING_EXAMPLES)


@pytest.mark.parametrize("script", TRAINING_EXAMPLES)
def test_example_imports_only_what_a_user_installs(script):
    tree = ast.parse((ROOT / "examples" / script).read_text())
    for module, node, guarded in _imports(tree):
        where = f"{script}:{node.lineno} imports {module}"
        if module.split(".")[0] in OPTIONAL:
            assert guarded, f"{where} without an `except ImportError` that names the install command"
        else:
            assert _allowed(module), f"{where}: an example imports only torch, matplotlib and mpnode-core/models/scaler"


@pytest.mark.parametrize("script", TRAINING_EXAMPLES)
def test_example_shows_its_training_loop(script):
    """The optimizer step is in the file itself (not in a harness)."""
    text = (ROOT / "examples" / script).read_text()
    assert ".backward()" in text and ".step(" in text and "torch.optim." in text
