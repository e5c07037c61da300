"""The standalone scripts in benchmarks/ are run by hand, rarely: every name they import from benchmarks/ or fastft,
at module level or inside a function, must exist (a renamed helper once broke a script only after a 3-minute run).
Imports under a `try` that catches ImportError (a fallback for an older fastft) are left out."""

from __future__ import annotations

import ast
import importlib

import pytest
from conftest import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


def _guarded(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a try statement that catches ImportError."""
    out = set()
    for node in ast.walk(tree):
        catches = isinstance(node, ast.Try) and any(
            "ImportError" in ast.unparse(h.type or ast.Name("")) for h in node.handlers
        )
        if catches:
            out |= {id(n) for part in (node.body, *(h.body for h in node.handlers)) for s in part for n in ast.walk(s)}
    return out


def _exists(module: str, name: str) -> bool:
    if hasattr(importlib.import_module(module), name):
        return True
    try:  # `from package import submodule`
        importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        return False
    return True


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_every_project_name_a_script_imports_exists(path) -> None:
    tree = ast.parse(path.read_text())
    skip, missing = _guarded(tree), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in skip or not node.module:
            continue
        if node.module.split(".")[0] in ("benchmarks", "fastft"):
            missing += [f"{node.module}.{a.name}" for a in node.names if not _exists(node.module, a.name)]
    assert not missing, f"{path.name} imports names that do not exist: {missing}"
