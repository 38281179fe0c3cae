"""The resilience package keeps no module-level mutable state (STYLE 11). Which libraries its
modules may import is an import-linter contract in pyproject.toml, checked by `make lint`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "switchgear/dataplane/resilience"
MODULES = sorted(PACKAGE.glob("*.py"))


def test_the_package_has_modules() -> None:
    assert {p.name for p in MODULES} >= {"breaker.py", "outlier.py", "retry.py", "admission.py", "fallback.py"}



MUTABLE_NODES = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
MUTABLE_CALLS = {"dict", "list", "set", "deque", "defaultdict", "Counter", "OrderedDict"}


def module_level_mutables(source: str) -> list[str]:
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = node.value
            called = value.func.id if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) else ""
            if isinstance(value, MUTABLE_NODES) or called in MUTABLE_CALLS:
                found.append(ast.unparse(node)[:60])
    return found


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_no_module_level_mutable_state(module: Path) -> None:
    """STYLE 11: no module-level mutable globals; tables are MappingProxyType or frozenset."""
    assert module_level_mutables(module.read_text(encoding="utf-8")) == []


def test_the_mutable_check_catches_a_table() -> None:
    source = "A = {1: 2}\nB = frozenset()\nC: list[int] = []\n"
    assert module_level_mutables(source) == ["A = {1: 2}", "C: list[int] = []"]
