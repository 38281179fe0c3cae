"""Start-up config rules of the control plane, and the `switchgear` command's edges."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from switchgear.cli import main
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.server import StartupError, apply_startup_config
from switchgear.controlplane.store import SqliteStore
from tests.conftest import REPO, service

GOOD = """\
external_services:
  services:
    llm_services:
      local_models:
        - name: "local-a"
          endpoint: "http://127.0.0.1:8080"
"""
BAD = GOOD.replace('"http://127.0.0.1:8080"', '"nowhere"')


def test_config_is_applied_once_and_admin_changes_survive_a_restart(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(GOOD)
    store = SqliteStore(tmp_path / "r.db")
    registry = Registry(store)
    apply_startup_config(registry, str(config), {})
    assert [s.name for s in registry.state.services] == ["local-a"]
    registry.register(service("added-by-admin"), "op")
    store.close()

    store = SqliteStore(tmp_path / "r.db")
    restarted = Registry(store)
    apply_startup_config(restarted, str(config), {})  # same file: the stored registry wins
    assert [s.name for s in restarted.state.services] == ["added-by-admin", "local-a"]

    config.write_text(GOOD.replace("local-a", "local-b"))  # edited file: applied whole
    apply_startup_config(restarted, str(config), {})
    assert [s.name for s in restarted.state.services] == ["local-b"]
    store.close()


def test_invalid_config_never_replaces_a_stored_registry(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "r.db")
    registry = Registry(store)
    registry.register(service("kept"), "op")
    before = registry.snapshot
    config = tmp_path / "bad.yaml"
    config.write_text(BAD)
    apply_startup_config(registry, str(config), {})
    assert registry.snapshot == before
    store.close()


def test_invalid_config_with_an_empty_store_refuses_to_start(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "r.db")
    config = tmp_path / "bad.yaml"
    config.write_text(BAD)
    with pytest.raises(StartupError) as info:
        apply_startup_config(Registry(store), str(config), {})
    assert "local_models[0].endpoint" in str(info.value) and "line 6" in str(info.value)
    store.close()


def test_config_validate_accepts_the_seed_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(REPO / "config" / "external_services_unified.yaml")]) == 0
    out = capsys.readouterr().out
    assert "valid; it would register 8 service(s)" in out
    assert "env:PINECONE_API_KEY" in out


def test_config_validate_names_key_and_line_of_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    assert main(["config", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "local_models[0].endpoint" in err and "line 6" in err


def test_config_validate_of_a_missing_file_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(tmp_path / "absent.yaml")]) == 1
    assert "absent.yaml" in capsys.readouterr().err


def test_help_lists_the_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "switchgear", "--help"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    for command in ("controlplane", "agent", "config", "admin", "invoke", "emulate", "demo"):
        assert command in out


def test_the_same_file_in_another_environment_is_applied_again(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(GOOD.replace('"http://127.0.0.1:8080"', '"http://127.0.0.1:${UPSTREAM_PORT}"'))
    store = SqliteStore(tmp_path / "r.db")
    registry = Registry(store)
    apply_startup_config(registry, str(config), {"UPSTREAM_PORT": "8080"})
    first = registry.snapshot.version
    apply_startup_config(registry, str(config), {"UPSTREAM_PORT": "8080"})  # nothing new
    assert registry.snapshot.version == first
    apply_startup_config(registry, str(config), {"UPSTREAM_PORT": "9090"})  # the upstream moved
    (spec,) = registry.state.services
    assert spec.endpoints[0].url.startswith("http://127.0.0.1:9090") and registry.snapshot.version != first
    store.close()


@pytest.mark.parametrize(("flags", "message"), [
    (["--serve-tls-cert", "agent.pem"], "needs --serve-tls-key"),
    (["--serve-tls-key", "agent.key"], "needs --serve-tls-cert"),
    (["--serve-tls-client-ca", "ca.pem"], "--serve-tls-client-ca needs --serve-tls-cert and --serve-tls-key"),
    (["--serve-tls-cert", "absent.pem", "--serve-tls-key", "absent.key"], "--serve-tls-cert/--serve-tls-key"),
])
def test_agent_refuses_half_or_unreadable_serving_tls(tmp_path: Path, flags: list[str], message: str) -> None:
    """Checked before the agent starts anything: no port is opened with TLS half configured."""
    with pytest.raises(SystemExit) as exited:
        main(["agent", "--control-plane", "127.0.0.1:9", "--listen", "127.0.0.1:0",
              *[str(tmp_path / f) if f.endswith((".pem", ".key")) else f for f in flags]])
    assert message in str(exited.value)
