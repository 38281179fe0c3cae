"""The resilience package stays pure: no transport, RPC, telemetry, and (but for the one edge
module) no asyncio. An AST walk, so imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "switchgear/dataplane/resilience"
EDGE_MODULES = {"admission_edge.py"}
FORBIDDEN = ("grpc", "grpc_health", "grpc_reflection", "httpx", "aiohttp", "opentelemetry", "switchgear.v1",
             "sqlite3", "socket", "threading")
FORBIDDEN_OUTSIDE_EDGE = ("asyncio",)


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def hits(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names for f in forbidden if n == f or n.startswith(f + "."))


MODULES = sorted(PACKAGE.glob("*.py"))


def test_the_package_has_modules() -> None:
    assert {p.name for p in MODULES} >= {"breaker.py", "outlier.py", "retry.py", "admission.py", "fallback.py"}


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_no_io_library(module: Path) -> None:
    forbidden = FORBIDDEN if module.name in EDGE_MODULES else FORBIDDEN + FORBIDDEN_OUTSIDE_EDGE
    assert hits(imported(module), forbidden) == []


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


def test_the_check_catches_a_hidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import asyncio\n    from httpx import Client\n")
    assert hits(imported(sample), FORBIDDEN + FORBIDDEN_OUTSIDE_EDGE) == ["asyncio", "httpx"]
