"""The structure of the packages, checked: docs/architecture.md's module table against mpnode.core, imports going
down the layers, no private names imported across modules, and short functions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "packages" / "mpnode-core" / "src" / "mpnode" / "core"
PACKAGES = sorted((ROOT / "packages").glob("mpnode-*/src/mpnode/*"))
#: The longest function of mpnode.core, in lines from ``def`` to its end without the docstring.  Before the
#: restructure of issue 19 it was 114 (the adaptive march; issue 19 counted 107 at the time it was written).
LONGEST_FUNCTION = 60
ROW = re.compile(r"^\|\s*(\d+)\s+[a-z]+\s*\|\s*`([\w.]+)`\s*\|")


def _layers() -> dict[str, int]:
    """``module -> layer`` from the table of docs/architecture.md."""
    rows = [ROW.match(line) for line in (ROOT / "docs" / "architecture.md").read_text().splitlines()]
    found = [(m.group(2), int(m.group(1))) for m in rows if m]
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), f"modules listed twice: {sorted({n for n in names if names.count(n) > 1})}"
    return dict(found)


def _runtime_imports(path: Path) -> set[str]:
    """The sibling modules ``path`` imports at run time (``from .x import ...``, not under ``TYPE_CHECKING``)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom) and sub.level == 1:
                found |= {sub.module.split(".")[0]} if sub.module else {a.name for a in sub.names}
    return found - {path.stem}


def test_the_architecture_page_lists_every_module_of_the_package_once():
    modules = {p.stem for p in CORE.glob("*.py")}
    listed = set(_layers())
    assert listed == modules, f"missing from docs/architecture.md: {sorted(modules - listed)}; " \
                              f"listed but gone: {sorted(listed - modules)}"


def test_imports_go_down_the_layers_of_the_architecture_page():
    layers = _layers()
    upward = [f"{p.stem} (layer {layers[p.stem]}) imports {dep} (layer {layers[dep]})"
              for p in CORE.glob("*.py") for dep in sorted(_runtime_imports(p)) if layers[dep] > layers[p.stem]]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_no_module_imports_another_modules_private_names(package):
    found = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("mpnode")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(ROOT)}: from "
                                 f"{'.' * node.level}{node.module or ''} import {private}")
    assert not found, "\n".join(found)


def test_functions_of_the_core_package_stay_short():
    lengths = []
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = node.body[0]
                docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str)
                doc_lines = first.end_lineno - first.lineno + 1 if docstring else 0
                lengths.append((node.end_lineno - node.lineno + 1 - doc_lines, f"{path.name}:{node.name}"))
    longest = max(lengths)
    assert longest[0] <= LONGEST_FUNCTION, f"{longest[1]} has {longest[0]} lines (at most {LONGEST_FUNCTION})"
