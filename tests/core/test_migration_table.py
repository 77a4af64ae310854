"""The migration table (docs/migration.md, "The table") is honest.

Every row is ``same``, ``different: <reason>`` or ``refused: <reason>``; every row has
a test marked ``@pytest.mark.torchdiffeq_row("<row>")`` in ``tests/``; the test of a
``same`` row lives in a module that calls torchdiffeq; and every marker names a row.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "migration.md"
SECTION = "## The table"
STATUS = re.compile(r"^(same|different: \S.*|refused: \S.*)$")


def table_rows() -> dict[str, str]:
    """``row id -> status`` of the section's table."""
    text = PAGE.read_text()
    assert SECTION in text, f"{PAGE} has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else None
        if cells:
            assert len(cells) == 4, f"a row needs 4 cells (row, torchdiffeq, mpnode, status): {line}"
            row_id = cells[0].strip("`")
            assert row_id not in rows, f"row {row_id!r} appears twice"
            rows[row_id] = cells[3]
    return rows


def marked_tests() -> dict[str, list[tuple[Path, str, bool]]]:
    """``row id -> [(file, test, module calls torchdiffeq)]`` from the markers in the test sources."""
    found: dict[str, list[tuple[Path, str, bool]]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        calls_torchdiffeq = any(
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torchdiffeq"
            for node in ast.walk(tree)
        )
        assigned = {n.targets[0].id: n.value for n in tree.body
                    if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)}
        for test in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")):
            for row_id in _rows_marked_on(test, assigned):
                found.setdefault(row_id, []).append((path, test.name, calls_torchdiffeq))
    return found


def _rows_marked_on(test: ast.FunctionDef, assigned: dict[str, ast.AST]) -> list[str]:
    """Row ids in ``torchdiffeq_row(...)`` calls among the decorators of ``test``.

    Marks on ``pytest.param`` count, also inside a module-level list the decorator names.
    """
    out = []
    scopes = list(test.decorator_list)
    scopes += [assigned[n.id] for d in test.decorator_list for n in ast.walk(d)
               if isinstance(n, ast.Name) and n.id in assigned]
    for decorator in scopes:
        for node in ast.walk(decorator):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "torchdiffeq_row":
                arg = node.args[0]
                if isinstance(arg, ast.Constant):
                    out.append(arg.value)
                elif isinstance(arg, ast.JoinedStr):  # f"method-{m}" over a literal list: expand below
                    out.extend(_expand_fstring(arg, decorator))
    return out


def _expand_fstring(fstring: ast.JoinedStr, decorator: ast.AST) -> list[str]:
    """``f"prefix-{name}"`` inside ``[... for name in <literal list or module constant>]``."""
    prefix = "".join(v.value for v in fstring.values if isinstance(v, ast.Constant))
    for node in ast.walk(decorator):
        if isinstance(node, ast.comprehension):
            values = _literal_strings(node.iter)
            if values:
                return [prefix + v for v in values]
    raise AssertionError(f"cannot expand the marker {ast.unparse(fstring)}: use a literal list in the comprehension")


_MODULE_CONSTANTS: dict[str, list[str]] = {}


def _literal_strings(node: ast.AST) -> list[str] | None:
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return _MODULE_CONSTANTS.get(getattr(node, "id", None))
    return [v for v in value if isinstance(v, str)]


def _load_module_constants() -> None:
    """String-list constants (``FIXED = [...]``) of the test modules, for markers built from them."""
    for path in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    _MODULE_CONSTANTS.setdefault(node.targets[0].id, value)


_load_module_constants()


def test_every_row_has_a_valid_status():
    rows = table_rows()
    assert len(rows) > 40
    bad = {row: status for row, status in rows.items() if not STATUS.match(status)}
    assert not bad, f"rows whose status is not 'same', 'different: reason' or 'refused: reason': {bad}"


def test_every_row_has_a_marked_test_and_same_rows_compare_with_torchdiffeq():
    rows, marks = table_rows(), marked_tests()
    untested = sorted(row for row in rows if row not in marks)
    assert not untested, f"rows without a @pytest.mark.torchdiffeq_row test: {untested}"
    not_compared = sorted(row for row, status in rows.items()
                          if status == "same" and not any(calls for _, _, calls in marks[row]))
    assert not not_compared, f"'same' rows whose tests never call torchdiffeq: {not_compared}"


def test_every_marker_names_a_row():
    rows = table_rows()
    stale = {row: [f"{p.name}::{t}" for p, t, _ in tests] for row, tests in marked_tests().items() if row not in rows}
    assert not stale, f"markers naming rows the migration table does not have: {stale}"


def test_the_marker_is_registered():
    assert "torchdiffeq_row" in (ROOT / "pytest.ini").read_text()


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver"])
def test_refused_methods_are_refused_rows(method):
    assert table_rows()[f"method-{method}"].startswith("refused: ")
