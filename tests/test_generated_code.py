"""Generated protobuf modules are committed; they must match what the protos generate now."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

from tests.conftest import REPO


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("generate", REPO / "protos" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    fresh = tmp_path / "switchgear" / "v1"
    committed = REPO / "switchgear" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names, "the generator produced nothing"
    assert sorted(p.name for p in committed.iterdir() if p.name != "__init__.py" and p.suffix in {".py", ".pyi"}) == names
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"regenerate with `make protos`: stale {mismatch + errors}"
