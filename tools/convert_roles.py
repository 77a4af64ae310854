"""Rewrite Sphinx cross-reference roles in the packages' sources as mkdocstrings cross-references.

``:class:`StepSizeController``` and its kin (``:func:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``, a ``~``
prefix showing the last component only) render raw on the API pages. Each becomes

* ``[`StepSizeController`][mpnode.core.controllers.StepSizeController]`` when the name resolves, in the scope of
  the docstring (or comment) it sits in, to an object the API pages render (public, with a docstring), or
* ``` `StepSizeController` ``` (code, no link) when it names something outside the packages (``torch.autocast``) or
  something the API pages do not show (a private helper, an object without a docstring).

Names are resolved with griffe, the loader mkdocstrings uses, so a link the script writes is one the docs build
resolves; ``mkdocs build --strict`` fails on any that does not.  Idempotent: run it again after merging branches
that added roles.

    python tools/convert_roles.py            # rewrite in place, print a summary and the unlinked names
    python tools/convert_roles.py --check    # exit 1 if any role is left (no rewriting)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "scaler", "models", "bench")
griffe = None  # imported by load()
ROLE = re.compile(r":(?:py:)?(?P<kind>class|func|meth|mod|data|attr|obj|exc):`(?P<target>[^`]+)`")


def load() -> dict:
    """``mpnode.<package>`` loaded by griffe (imported here: ``--check`` needs the standard library only)."""
    global griffe
    import griffe

    paths = [str(ROOT / "packages" / f"mpnode-{p}" / "src") for p in PACKAGES]
    loader = griffe.GriffeLoader(search_paths=paths)
    modules = {p: loader.load(f"mpnode.{p}") for p in PACKAGES}
    loader.resolve_aliases(external=False, implicit=True)
    return modules


def _objects(obj):
    yield obj
    for member in obj.members.values():
        if not member.is_alias and member.parent is obj:
            yield from _objects(member)


def _scopes(module) -> list:
    """``(first line, last line, object)`` of every docstring and definition in a module, innermost last."""
    spans = []
    for obj in _objects(module):
        if obj.lineno is not None and obj.endlineno is not None:
            spans.append((obj.lineno, obj.endlineno, obj))
        elif obj is module:
            spans.append((0, 10**9, obj))
    return sorted(spans, key=lambda s: (s[0], -s[1]))


def _scope_at(spans, line: int):
    best = spans[0][2]
    for first, last, obj in spans:
        if first <= line <= last and (best.lineno or 0) <= first:
            best = obj
    return best


def _target(scope, name: str, modules: dict):
    """The object ``name`` means in ``scope``: a full path, or a name of the scope, its parents or their members."""
    if name.startswith("mpnode."):
        pkg = name.split(".")[1]
        if pkg not in modules:
            return None
        try:
            return modules[pkg][name.split(".", 2)[2]] if name.count(".") >= 2 else modules[pkg]
        except (KeyError, griffe.AliasResolutionError):
            return None
    head, _, rest = name.partition(".")
    obj = scope
    while obj is not None:
        if head in obj.members or obj.name == head:
            found = obj if obj.name == head and head not in obj.members else obj.members[head]
            try:
                found = found.final_target if found.is_alias else found
                return found[rest] if rest else found
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
        obj = obj.parent
    return None


def _final(obj):
    try:
        return obj.final_target if obj.is_alias else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _rendered(obj) -> bool:
    """Whether the API pages show ``obj``: inside the packages, no private component, a docstring of its own."""
    parts = obj.path.split(".")
    if parts[0] != "mpnode" or any(p.startswith("_") for p in parts[2:]):
        return False
    return obj.is_module or bool(obj.docstring)


def convert(text: str, spans, modules, unlinked: list[str], where: str) -> tuple[str, int]:
    lines = text.split("\n")
    count = 0
    for i, line in enumerate(lines):
        def replace(m: re.Match, i: int = i) -> str:  # i: this line's index, bound now
            nonlocal count
            count += 1
            target = m["target"].strip()
            short = target.startswith("~")
            name = target.lstrip("~").lstrip(".")
            shown = name.rsplit(".", 1)[-1] if short else name
            obj = _target(_scope_at(spans, i + 1), name, modules)
            if obj is not None and m["kind"] != "mod" and obj.is_module and obj.name in obj.members:
                obj = _final(obj.members[obj.name])  # `odeint` the function, not the module of that name
            if obj is None or not _rendered(obj):
                unlinked.append(f"{where}:{i + 1}: {m.group()}")
                return f"`{shown}`"
            return f"[`{shown}`][{obj.path}]"

        lines[i] = ROLE.sub(replace, line)
    return "\n".join(lines), count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report roles left; exit 1 if any")
    args = parser.parse_args(argv)
    sources = {p: ROOT / "packages" / f"mpnode-{p}" / "src" for p in PACKAGES}
    files = sorted((p, f) for p, src in sources.items() for f in src.rglob("*.py"))
    if args.check:
        left = [f"{f.relative_to(ROOT)}: {m.group()}" for _, f in files for m in ROLE.finditer(f.read_text())]
        print("\n".join(left) or "no Sphinx roles left")
        return 1 if left else 0
    modules = load()
    total, unlinked = 0, []
    for pkg, f in files:
        text = f.read_text()
        if not ROLE.search(text):
            continue
        dotted = ".".join(f.relative_to(sources[pkg]).with_suffix("").parts).removesuffix(".__init__")
        module = modules[pkg] if dotted == f"mpnode.{pkg}" else modules[pkg][dotted.split(".", 2)[2]]
        new, n = convert(text, _scopes(module), modules, unlinked, str(f.relative_to(ROOT)))
        total += n
        f.write_text(new)
    print(f"convert_roles: {total} roles rewritten, {total - len(unlinked)} as links, {len(unlinked)} as plain code:")
    print("\n".join(f"  {u}" for u in unlinked))
    return 0


if __name__ == "__main__":
    sys.exit(main())
