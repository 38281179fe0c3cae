"""The documentation: the site builds with no warning, its generated pages are fresh, and every
file it names exists.

- `mkdocs build --strict` (mkdocs-material, in the dev extra) into a temporary directory: a broken
  link between pages, a page missing from the nav or an unknown anchor fails it.
- docs/reference/cli.md and metrics.md are what scripts/gen_reference.py writes from the code now.
- Every relative Markdown link in README.md and docs/ resolves, and every repository path written
  as code (`bench/overhead/README.md`, `tests/test_x.py`, `switchgear/rpc/`) exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# a repository path written as code: starts with a top-level directory of the repository
TOP = "|".join(sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and p.name not in {"node_modules", "build"}))
CODE_PATH = re.compile(rf"`((?:{TOP})/[\w./-]*)`")


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs-material is not installed: `pip install -e '.[dev]'` installs it")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").exists()


def test_generated_reference_is_fresh() -> None:
    run = subprocess.run([sys.executable, "scripts/gen_reference.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stdout + run.stderr


def test_generated_reference_covers_the_code() -> None:
    cli = (ROOT / "docs" / "reference" / "cli.md").read_text()
    for command in ("switchgear agent", "switchgear controlplane", "switchgear tasks list", "switchgear keys issue"):
        assert f"## `{command}`" in cli
    assert "--agent-token-file" in cli
    metrics = (ROOT / "docs" / "reference" / "metrics.md").read_text()
    for family in ("switchgear_requests_total", "switchgear_upstream_attempts_total", "switchgear_tokens_total"):
        assert f"`{family}`" in metrics


def test_relative_links_resolve() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def _ignored_output(path: str) -> bool:
    """A directory a command writes into, git-ignored (e.g. `bench/scheduling/out/`)."""
    probe = path.rstrip("/") + "/probe"
    return subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT, timeout=10).returncode == 0


def test_paths_written_as_code_exist() -> None:
    missing = []
    for page in PAGES:
        for path in CODE_PATH.findall(page.read_text()):
            if any(ch in path for ch in "*<{$") or path.endswith("..."):
                continue  # a pattern or a placeholder, not a file
            if not (ROOT / path.rstrip(".")).exists() and not _ignored_output(path):
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, missing
