"""Decision logic stays pure: these modules import no transport, RPC or telemetry library.

STYLE: routing, breakers, scoring, quota arithmetic and snapshot building take a clock and data
and return a decision. This test reads each module's AST, so an import hidden in a function
counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PURE_MODULES = [
    "switchgear/controlplane/model.py",
    "switchgear/controlplane/codec.py",
    "switchgear/controlplane/snapshot.py",
    "switchgear/controlplane/validate.py",
    "switchgear/controlplane/config.py",
    "switchgear/controlplane/agents.py",
    "switchgear/dataplane/snapshot.py",
    "switchgear/dataplane/events.py",
    "switchgear/dataplane/outcome.py",
    "switchgear/dataplane/governance.py",
]
FORBIDDEN = ("grpc", "grpc_health", "grpc_reflection", "httpx", "aiohttp", "opentelemetry", "switchgear.v1", "sqlite3")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def forbidden_in(names: set[str]) -> list[str]:
    return sorted(n for n in names for f in FORBIDDEN if n == f or n.startswith(f + "."))


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_io_library(module: str) -> None:
    assert forbidden_in(imported_modules(REPO / module)) == []


def test_the_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import httpx\n    from switchgear.v1 import common_pb2\n")
    assert forbidden_in(imported_modules(sample)) == ["httpx", "switchgear.v1"]
