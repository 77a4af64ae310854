"""Checks of README.md and docs/ that need no torch (run by ``nox -s docs``; also a test in tests/examples).

* README.md is at most ``README_LIMIT`` characters and links every page of ``docs/`` (API pages included);
* every relative link of README.md names a file of the repository;
* measured figures are sourced: a block (a table or a paragraph: the lines up to the next blank line) preceded by
  ``<!-- figures: <file> [<file> ...] [<column>=<value> ...] -->`` cites those results files in the page's visible
  text, and every number in the block (outside code spans, table header rows, dates and times of day) appears in
  one of the files (only in the rows whose columns have those values, when given), in the units and rounding the
  page writes it: ``224.5 ms`` (seconds x 1000), ``72.3 MiB`` / ``384 KiB`` (bytes),
  ``1/38.5`` (the reciprocal of a ratio), ``13 %`` (x 100), ``1.44x`` and ``2.6e-03`` (as is).

    python tools/check_docs.py            # exit status 1 and one line per problem
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 20_000
MARKER = re.compile(r"^\s*<!--\s*figures:\s*(.*?)\s*-->\s*$")
NUMBER = re.compile(
    r"(?<![\w.\-/^])(?P<inv>1/)?(?P<num>\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?)\s?(?P<unit>ms|s|KiB|MiB|GiB|x|×|%)?(?![\w.])"
)
# what a page writes after a number -> how a stored value becomes it
UNITS = {"ms": 1e3, "s": 1.0, "KiB": 2.0**-10, "MiB": 2.0**-20, "GiB": 2.0**-30, "%": 100.0}
SKIP = [re.compile(p) for p in (r"`[^`]*`", r"\d{4}-\d{2}-\d{2}", r"\d{1,2}:\d{2}(?::\d{2})?", r"\]\([^)]*\)",
                                r"<!--.*?-->", r"\b[\w./-]+\.(?:py|json|csv|txt|md|png|sh)\b")]


def stored_values(path: Path, where: dict[str, str] | None = None) -> list[float]:
    """Every number in a results file: JSON leaves, CSV cells, or the numbers of a text file.

    ``where``: only the records (CSV rows, JSON objects in lists) whose fields have these values.
    """
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        return list(_json_numbers(_records(data, where) if where else data))
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if where:
            rows = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
        return [v for row in rows for cell in row.values() for v in _floats(cell or "")]
    return [float(m.replace(",", "")) for m in re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def _records(obj, where: dict[str, str]) -> list:
    """The dicts inside lists of ``obj`` whose fields equal ``where`` (compared as text)."""
    found = []
    if isinstance(obj, dict):
        for v in obj.values():
            found += _records(v, where)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict) and all(str(v.get(k)) == val for k, val in where.items()):
                found.append(v)
            else:
                found += _records(v, where)
    return found


def _json_numbers(obj) -> Iterator[float]:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, str):
        yield from _floats(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _json_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _json_numbers(v)


def _floats(cell: str) -> Iterator[float]:
    try:
        yield float(cell)
    except ValueError:
        return


RATIO_SET = 300  # a ratio "1.29x" / "1/62.1" may also be one of two stored values over the other, in a set this small


def matches(token: re.Match, values: list[float]) -> bool:
    """Whether some stored value, converted to the token's unit, rounds to the token as written.

    A ratio (``1.29x``, ``1/62.1``) may also be the quotient of two stored values when the block's (filtered)
    results hold at most ``RATIO_SET`` numbers: tables compare rows with each other.
    """
    num, unit, inverse = token["num"].replace(",", ""), token["unit"], bool(token["inv"])
    written = float(num)
    if "e" in num:  # same mantissa digits
        digits = len(num.split("e")[0].split(".")[1]) if "." in num.split("e")[0] else 0
        half = 0.5 * 10.0 ** (math.floor(math.log10(abs(written))) - digits) if written else 0.0
    else:
        digits = len(num.split(".")[1]) if "." in num else 0
        half = 0.5 * 10.0**-digits
    scale = UNITS.get(unit, 1.0)  # "x" and plain numbers: as stored
    candidates = list(values)
    if (inverse or unit in ("x", "×")) and len(values) <= RATIO_SET:
        nonzero = [v for v in set(values) if v]
        candidates += [a / b for a in nonzero for b in nonzero]
    for v in candidates:
        if inverse and v == 0:
            continue
        c = 1.0 / v if inverse else v * scale
        if abs(abs(c) - written) <= half * (1 + 1e-9) + 1e-15:
            return True
    return False


def numbers(block: str) -> Iterator[re.Match]:
    """The numbers of a block a reader takes as measured: not in code, dates, links; in a table, not in the header
    row or the first column (the rows' labels)."""
    lines = block.splitlines()
    if len(lines) > 1 and lines[0].strip().startswith("|") and set(lines[1].replace("|", "").strip()) <= set("-: "):
        lines = ["|".join(["", *line.strip().strip("|").split("|")[1:], ""]) for line in lines[2:]]
    text = "\n".join(lines)
    for pattern in SKIP:
        text = pattern.sub(lambda m: " " * len(m.group()), text)
    for m in NUMBER.finditer(text):
        if m["unit"] is None and not m["inv"] and "." not in m["num"] and "e" not in m["num"] and len(m["num"]) < 2:
            continue  # a single digit: a count the prose names (3 runs, 5 rounds)
        yield m


def sourced_blocks(text: str) -> Iterator[tuple[int, list[str], str]]:
    """``(line, files, block)`` for each figures marker of a page."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = MARKER.search(line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        k = j
        while k < len(lines) and lines[k].strip() and not MARKER.search(lines[k]):
            k += 1
        yield i + 1, m.group(1).split(), "\n".join(lines[j:k])  # files and column=value filters


def check_figures(page: Path) -> list[str]:
    text = page.read_text()
    visible = "\n".join(line for line in text.splitlines() if not MARKER.match(line))
    problems = []
    for line, words, block in sourced_blocks(text):
        files = [w for w in words if "=" not in w]
        where = dict(w.split("=", 1) for w in words if "=" in w)
        paths = [ROOT / f for f in files]
        missing = [f for f, p in zip(files, paths) if not p.is_file()]
        if missing:
            problems.append(f"{page.name}:{line}: figures marker names missing files {missing}")
            continue
        uncited = [f for f in files if f not in visible and str(Path(f).parent) not in visible]
        if uncited:
            problems.append(f"{page.name}:{line}: the page does not cite {uncited} where a reader can see it")
        values = [v for p in paths for v in stored_values(p, where)]
        for token in numbers(block):
            if not matches(token, values):
                problems.append(f"{page.name}:{line}: {token.group().strip()!r} is not in {', '.join(files)}")
    return problems


def check_readme() -> list[str]:
    text = (ROOT / "README.md").read_text()
    problems = []
    if len(text) > README_LIMIT:
        problems.append(f"README.md has {len(text)} characters; the limit is {README_LIMIT} (move details to docs/)")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    problems += [f"README.md links to a missing file: {t}" for t in relative if not (ROOT / t).exists()]
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))
    problems += [f"README.md does not link docs page {p}" for p in pages if p not in relative]
    return problems


def main(argv: Iterable[str] = ()) -> int:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    problems = check_readme() + [p for page in pages for p in check_figures(page)]
    for p in problems:
        print(p)
    n_blocks = sum(1 for page in pages for _ in sourced_blocks(page.read_text()))
    print(f"check_docs: README {len((ROOT / 'README.md').read_text())} characters, {n_blocks} sourced blocks, "
          f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
