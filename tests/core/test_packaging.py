"""mpnode-core installs with torch as its only dependency, under the PEP 420 namespace."""

from __future__ import annotations

import importlib.metadata

import mpnode
import mpnode.core


def test_core_depends_on_torch_only():
    requires = importlib.metadata.requires("mpnode-core") or []
    runtime = [r for r in requires if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].strip() for r in runtime] == ["torch"]


def test_namespace_package_spans_the_components():
    assert not hasattr(mpnode, "__file__") or mpnode.__file__ is None  # PEP 420: no mpnode/__init__.py
    paths = [str(p) for p in mpnode.__path__]
    assert any("mpnode-core" in p for p in paths)
    assert mpnode.core.__version__ == importlib.metadata.version("mpnode-core")
