"""The scheduling core stays pure: no module in switchgear/dataplane/scheduling/ imports a
transport, RPC, telemetry library or generated protobuf code (STYLE 1). Reads each module's
AST, so an import hidden inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "switchgear" / "dataplane" / "scheduling"
FORBIDDEN = ("grpc", "grpc_health", "grpc_reflection", "httpx", "aiohttp", "opentelemetry", "switchgear.v1",
             "google.protobuf")


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            if node.module == "switchgear":
                names.update(f"switchgear.{alias.name}" for alias in node.names)
    return names


def forbidden(names: set[str]) -> list[str]:
    return sorted(n for n in names for f in FORBIDDEN if n == f or n.startswith(f + "."))


MODULES = sorted(PACKAGE.glob("*.py"))


def test_the_package_has_modules() -> None:
    assert {p.name for p in MODULES} >= {"filters.py", "scorers.py", "pickers.py", "strategies.py", "stats.py"}


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_scheduling_module_imports_nothing_impure(module: Path) -> None:
    assert forbidden(imports(module)) == []


def test_the_check_catches_hidden_and_aliased_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import httpx\n    from switchgear import v1\n    import grpc.aio as g\n")
    assert forbidden(imports(sample)) == ["grpc.aio", "httpx", "switchgear.v1"]
