"""Registry, store and snapshot versions: persistence, atomic rejection, restart rules.

Tests taking `store_backend` run on SQLite and on PostgreSQL alike (a new `open()` is a new
connection: a restart, or another replica)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from switchgear.controlplane import codec
from switchgear.controlplane import snapshot as snap
from switchgear.controlplane.model import CategoryPolicy, RegistryState, RetryPolicy, SecretRef, Settings
from switchgear.controlplane.registry import NotFound, Registry
from switchgear.controlplane.store import SqliteStore, Store
from switchgear.controlplane.validate import ValidationError
from tests.conftest import StoreBackend, service


def open_registry(where: Path | StoreBackend) -> tuple[Registry, Store]:
    store = SqliteStore(where) if isinstance(where, Path) else where.open()
    return Registry(store), store


def test_codec_round_trips_the_whole_model() -> None:
    state = RegistryState(
        services=(service("a", api_key=SecretRef(env="K"), fallbacks=("b",), metadata=(("x", "1"),)), service("b")),
        settings=Settings(
            retry_policy=RetryPolicy(max_retries=1, base_delay_s=0.5),
            category_policies=(("llm", CategoryPolicy(strategy="cost_optimized", min_success_rate=0.95)),),
        ),
    )
    assert codec.loads(RegistryState, codec.dumps(state)) == state


def test_content_hash_depends_on_content_only() -> None:
    a = RegistryState(services=(service("a"),))
    assert snap.content_hash(a) == snap.content_hash(RegistryState(services=(service("a"),)))
    assert snap.content_hash(a) != snap.content_hash(RegistryState(services=(service("a", "http://h:1/v1"),)))


def test_every_change_gets_a_higher_version_and_no_change_gets_none(store_backend: StoreBackend) -> None:
    registry, store = open_registry(store_backend)
    v0 = registry.snapshot.version
    v1 = registry.register(service("a"), "t").version
    v2 = registry.register(service("b"), "t").version
    assert snap.version_seq(v0) < snap.version_seq(v1) < snap.version_seq(v2)
    assert registry.register(service("b"), "t").version == v2  # same content: same version
    store.close()


def test_restart_on_the_same_store_keeps_state_and_version(store_backend: StoreBackend) -> None:
    registry, store = open_registry(store_backend)
    registry.register(service("b", api_key=SecretRef(env="OPENAI_API_KEY")), "t")
    registry.register(service("A"), "t")  # loads back first: byte order, as the state keeps them
    before = registry.snapshot
    store.close()
    again, store = open_registry(store_backend)
    assert again.snapshot == before
    store.close()


def test_different_stores_never_give_one_version_to_different_content(tmp_path: Path) -> None:
    one, s1 = open_registry(tmp_path / "one.db")
    two, s2 = open_registry(tmp_path / "two.db")
    v1 = one.register(service("a"), "t").version
    v2 = two.register(service("b"), "t").version
    assert snap.version_seq(v1) == snap.version_seq(v2)
    assert v1 != v2
    s1.close()
    s2.close()


def test_invalid_change_leaves_state_store_and_version_untouched(store_backend: StoreBackend) -> None:
    registry, store = open_registry(store_backend)
    registry.register(service("a"), "t")
    before = registry.snapshot
    seen: list[snap.Snapshot] = []
    registry.subscribe(seen.append)
    with pytest.raises(ValidationError) as info:
        registry.register(service("b", "ftp://nope"), "t")
    assert any("endpoints[0].url" in p.path for p in info.value.problems)
    with pytest.raises(ValidationError):
        registry.register(service("c", fallbacks=("ghost",)), "t")
    assert registry.snapshot == before and seen == []
    assert store.load().state == before.state


def test_deregister(store_backend: StoreBackend) -> None:
    registry, store = open_registry(store_backend)
    registry.register(service("a"), "t")
    registry.register(service("b", fallbacks=("a",)), "t")
    with pytest.raises(NotFound):
        registry.deregister("ghost", "t")
    with pytest.raises(ValidationError):  # "b" falls back to "a"
        registry.deregister("a", "t")
    registry.deregister("b", "t")
    assert [s.name for s in registry.state.services] == ["a"]
    store.close()


def test_replace_reports_the_diff_and_audits(store_backend: StoreBackend) -> None:
    registry, store = open_registry(store_backend)
    registry.register(service("a"), "t")
    registry.register(service("b"), "t")
    new_state = RegistryState(services=(service("b", "http://h:2/v1"), service("c")))
    applied, change = registry.replace(new_state, "op", "file.yaml", config_hash="h1")
    assert (change.added, change.changed, change.removed) == (("c",), ("b",), ("a",))
    assert registry.config_hash == "h1"
    entries = registry.audit()
    assert entries[0].action == "apply_config" and entries[0].version == applied.version
    assert [e.action for e in entries[1:3]] == ["register_service", "register_service"]
    store.close()
    again, store = open_registry(store_backend)
    assert again.config_hash == "h1" and again.state == new_state
    store.close()


def test_store_never_holds_a_secret_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-0123456789")
    registry, store = open_registry(tmp_path / "r.db")
    registry.register(dataclasses.replace(service("a"), api_key=SecretRef(env="OPENAI_API_KEY")), "t")
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("r.db*"))
    assert b"OPENAI_API_KEY" in raw
    assert b"sk-test-not-a-real-key" not in raw


def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,"
        " action TEXT NOT NULL, target TEXT NOT NULL, version TEXT NOT NULL, detail TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
        "INSERT INTO audit (at, actor, action, target, version, detail) VALUES (1, 'op', 'start', '*', '1.a', '');"
    )
    db.commit()
    db.close()
    registry, store = open_registry(path)
    assert [e.action for e in registry.audit()][-1] == "start"  # old rows kept
    registry.register(service("a"), "op")
    assert registry.audit()[0].before == "" and registry.audit()[0].action == "register_service"
    store.close()


def test_service_changes_are_audited_with_before_and_after(store_backend: StoreBackend) -> None:
    import json

    registry, store = open_registry(store_backend)
    registry.register(service("a"), "op")
    registry.register(service("a", "http://h:2/v1"), "op")
    registry.deregister("a", "op")
    removed, updated, added = registry.audit()[:3]
    assert (added.action, added.before) == ("register_service", "")
    assert json.loads(added.after)["endpoints"][0]["url"] == "http://127.0.0.1:9/v1"
    assert updated.action == "update_service"
    assert json.loads(updated.before)["endpoints"][0]["url"] == "http://127.0.0.1:9/v1"
    assert json.loads(updated.after)["endpoints"][0]["url"] == "http://h:2/v1"
    assert (removed.action, removed.after) == ("deregister_service", "") and removed.before
    store.close()
