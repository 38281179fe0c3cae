"""The registry store on both backends (SqliteStore, PgStore): the same behaviour, commit by
commit; and what only PostgreSQL has: NOTIFY at commit, racing migrations, locale-proof order."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import psycopg
import pytest

from switchgear.controlplane import pg
from switchgear.controlplane import snapshot as snap
from switchgear.controlplane.model import ApiKey, RegistryState, RetryPolicy, Settings, Tenant
from switchgear.controlplane.store import REFUSED, Change, StaleVersion, Store
from tests.conftest import StoreBackend, service
from tests.servers import PostgresServer

T = TypeVar("T")

STATE = RegistryState(
    services=(service("a"), service("b", fallbacks=("a",))),
    settings=Settings(retry_policy=RetryPolicy(max_retries=1, base_delay_s=0.5)),
    tenants=(Tenant("t1", display_name="One"), Tenant("t2")),
    keys=(ApiKey("k1", "t1", "00" * 32, description="ci"),),
)


class Clock:
    def __init__(self, now: float = 1.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def commit(store: Store, state: RegistryState, seq: int, **kw: object) -> str:
    """Commit `state` as version `seq`; return its content hash."""
    digest = snap.content_hash(state)
    store.commit(state, seq, digest, snap.format_version(seq, digest), Change("op", "change", "*"), **kw)  # type: ignore[arg-type]
    return digest


def race(n: int, work: Callable[[int], T]) -> list[T | BaseException]:
    """Run `work(0..n-1)` on n threads released together; each result or the exception raised."""
    barrier = threading.Barrier(n)
    results: list[T | BaseException] = [RuntimeError("did not run")] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


# -- both backends


def test_a_fresh_store_is_empty(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    stored = store.load()
    assert (stored.state, stored.seq, stored.content_hash, stored.config_hash, stored.overlay) == (
        RegistryState(), 0, "", "", "")
    assert store.head() == (0, "")
    assert store.audit() == [] and store.load_usage() == {}


def test_every_collection_round_trips_and_only_changed_rows_are_written(store_backend: StoreBackend) -> None:
    clock = Clock(1.0)
    store = store_backend.open(clock)
    digest = commit(store, STATE, 1, config_hash="c1", overlay='{"w": 1}')
    stored = store_backend.open().load()  # another connection sees it whole
    assert (stored.state, stored.seq, stored.content_hash) == (STATE, 1, digest)
    assert (stored.config_hash, stored.overlay) == ("c1", '{"w": 1}')

    clock.now = 2.0
    changed = RegistryState(services=(service("a"), service("b", "http://h:2/v1")), settings=STATE.settings,
                            tenants=(Tenant("t2"),), keys=(*STATE.keys, ApiKey("k2", "t2", "11" * 32)))
    digest = commit(store, changed, 2)
    stored = store_backend.open().load()
    assert (stored.state, stored.seq, stored.content_hash) == (changed, 2, digest)
    assert (stored.config_hash, stored.overlay) == ("c1", '{"w": 1}')  # None keeps both
    assert store.head() == (2, digest)
    assert store_backend.query("SELECT name, updated_at FROM services ORDER BY name") == [("a", 1.0), ("b", 2.0)]
    assert store_backend.query("SELECT name, updated_at FROM api_keys ORDER BY name") == [("k1", 1.0), ("k2", 2.0)]


def test_overlay_is_replaced_or_cleared_only_when_given(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    commit(store, STATE, 1, overlay='{"w": 1}')
    commit(store, STATE, 2, overlay='{"w": 2}')
    assert store.load().overlay == '{"w": 2}'
    commit(store, STATE, 3)
    assert store.load().overlay == '{"w": 2}'
    commit(store, STATE, 4, overlay="")
    assert store.load().overlay == ""


def test_audit_is_newest_first_and_append_audit_changes_no_version(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    digest = commit(store, STATE, 1)
    store.commit(RegistryState(), 2, "h2", "2.h2", Change("op", "deregister_service", "a", before='{"x":1}'))
    store.append_audit("2.h2", Change("monitor", "eject", "a/e0", detail="5 errors", after='{"y":2}'))
    assert store.head() == (2, "h2") and store.load().state == RegistryState()
    entries = store.audit()
    assert [(e.action, e.version) for e in entries] == [
        ("eject", "2.h2"), ("deregister_service", "2.h2"), ("change", snap.format_version(1, digest))]
    assert (entries[0].actor, entries[0].detail, entries[0].before, entries[0].after) == (
        "monitor", "5 errors", "", '{"y":2}')
    assert (entries[1].before, entries[1].after) == ('{"x":1}', "")
    assert entries[0].id > entries[1].id > entries[2].id
    assert [e.action for e in store.audit(limit=1)] == ["eject"]


def test_refused_rows_are_kept_to_the_newest_few_and_never_prune_committed_changes(
        store_backend: StoreBackend) -> None:
    store = store_backend.open()
    commit(store, STATE, 1)
    store.append_audit("1.h", Change("monitor", "eject", "a/e0"))
    for i in range(7):  # a flood: only the newest 3 stay
        store.append_refused("1.h", Change(f"admin@{i}", "anything", f"apply_config c{i}", detail=f"x: bad {i}"), 3)
    entries = store.audit()
    refused = [e for e in entries if e.action == REFUSED]
    assert [(e.actor, e.target, e.detail) for e in refused] == [
        (f"admin@{i}", f"apply_config c{i}", f"x: bad {i}") for i in (6, 5, 4)]
    assert [e.action for e in entries if e.action != REFUSED] == ["eject", "change"]
    assert store.head()[0] == 1  # a refusal is no version


def test_a_commit_based_on_a_stale_version_writes_nothing(store_backend: StoreBackend) -> None:
    mine, theirs = store_backend.open(), store_backend.open()
    digest = commit(theirs, STATE, 1, expected_seq=0)
    with pytest.raises(StaleVersion):
        commit(mine, RegistryState(services=(service("z"),)), 1, expected_seq=0, config_hash="mine", overlay="{}")
    stored = mine.load()
    assert (stored.state, stored.seq, stored.content_hash, stored.config_hash, stored.overlay) == (
        STATE, 1, digest, "", "")
    assert len(mine.audit()) == 1
    commit(mine, RegistryState(), 2, expected_seq=1)  # rebased on what is stored: accepted
    assert theirs.head()[0] == 2


def test_of_racing_commits_on_one_version_exactly_one_lands(store_backend: StoreBackend) -> None:
    stores = [store_backend.open() for _ in range(4)]
    states = [RegistryState(services=(service(f"s{i}"),)) for i in range(4)]
    results = race(4, lambda i: commit(stores[i], states[i], 1, expected_seq=0))
    won = [i for i, r in enumerate(results) if isinstance(r, str)]
    assert len(won) == 1, results
    assert all(isinstance(r, StaleVersion) for i, r in enumerate(results) if i not in won), results
    assert stores[0].load().state == states[won[0]] and len(stores[0].audit()) == 1


def test_a_load_is_one_snapshot_while_another_replica_commits(store_backend: StoreBackend) -> None:
    writer, reader = store_backend.open(), store_backend.open()
    states = [RegistryState(services=(service(f"s{i % 3}"),), tenants=(Tenant(f"t{i}"),)) for i in range(60)]
    done = threading.Event()

    def write() -> None:
        for seq, state in enumerate(states, start=1):
            commit(writer, state, seq)
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    loads = 0
    while not done.is_set() or loads == 0:
        stored = reader.load()
        assert snap.content_hash(stored.state) == stored.content_hash or stored.seq == 0, stored
        loads += 1
    thread.join()
    assert reader.head()[0] == len(states)


def test_usage_rows_are_replaced_per_tenant(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    store.save_usage({"t1": '{"n": 1}', "t2": '{"n": 2}'})
    store.save_usage({"t1": '{"n": 3}'})
    assert store_backend.open().load_usage() == {"t1": '{"n": 3}', "t2": '{"n": 2}'}


# -- PostgreSQL only


def test_notify_is_delivered_at_commit_and_never_on_rollback(pg_dsn: str) -> None:
    with pg.connect(pg_dsn) as conn, pg.connect(pg_dsn) as listener, pg.connect(pg_dsn) as other:
        pg.migrate(conn)
        store = pg.PgStore(conn)
        listener.execute(f"LISTEN {pg.NOTIFY_CHANNEL}")

        def next_payload() -> str:
            (note,) = listener.notifies(timeout=5, stop_after=1)
            assert note.channel == pg.NOTIFY_CHANNEL
            return note.payload

        commit(store, STATE, 1)
        assert next_payload() == "1"
        with conn.transaction():  # the commit inside a longer transaction: nothing until that ends
            commit(store, STATE, 2)
            other.execute(f"NOTIFY {pg.NOTIFY_CHANNEL}, 'marker'")
            assert next_payload() == "marker"
        assert next_payload() == "2"
        with pytest.raises(StaleVersion):
            commit(store, STATE, 7, expected_seq=1)
        commit(store, STATE, 3, expected_seq=2)
        assert next_payload() == "3"  # nothing from the rolled-back 7 before it


def test_replicas_migrating_a_fresh_database_at_once_create_the_schema_once(pg_dsn: str) -> None:
    conns = [pg.connect(pg_dsn) for _ in range(4)]
    try:
        applied = race(4, lambda i: pg.migrate(conns[i]))
        assert sorted(applied) == [0, 0, 0, pg.SCHEMA_VERSION], applied  # type: ignore[type-var]
        assert pg.migrate(conns[0]) == 0
        one = conns[0]
        assert one.execute("SELECT version FROM schema_version").fetchall() == [(pg.SCHEMA_VERSION,)]
        assert one.execute("SELECT value FROM meta WHERE key = 'version_seq'").fetchall() == [("0",)]
        tables = {r[0] for r in one.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert tables == {"schema_version", "meta", "services", "settings", "tenants", "api_keys", "tenant_usage",
                          "audit", "tasks", "task_attempts", "task_blobs", "task_blob_owners", "load_reports", "leader",
                          "replicas", "agents"}
    finally:
        for conn in conns:
            conn.close()


def test_a_schema_newer_than_the_build_is_refused(pg_dsn: str) -> None:
    with pg.connect(pg_dsn) as conn:
        pg.migrate(conn)
        conn.execute("UPDATE schema_version SET version = 99")
        newer = rf"schema 99 is newer than this build understands \({pg.SCHEMA_VERSION}\)"
        with pytest.raises(RuntimeError, match=newer):
            pg.migrate(conn)
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (99,)


def test_names_load_in_byte_order_whatever_the_database_collation(postgres_server: PostgresServer) -> None:
    """A linguistic collation (ICU "en-US": a < B < c < Z) must not reorder the registry: the
    content hash of what is loaded would change, and with it the version."""
    name = "t_icu_order"
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
    try:
        with pg.connect(postgres_server.dsn(name)) as conn:
            linguistic = conn.execute("SELECT x FROM (VALUES ('B'), ('a'), ('Z'), ('c')) v(x) ORDER BY x").fetchall()
            assert [x for (x,) in linguistic] == ["a", "B", "c", "Z"]  # the database really sorts otherwise
            pg.migrate(conn)
            store = pg.PgStore(conn)
            state = RegistryState(services=tuple(service(n) for n in sorted(["B", "a", "Z", "c"])),
                                  tenants=(Tenant("T"), Tenant("s")))
            digest = commit(store, state, 1)
            stored = store.load()
            assert stored.state == state and snap.content_hash(stored.state) == digest
    finally:
        with psycopg.connect(postgres_server.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_the_dsn_password_is_never_logged(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    with_password = pg_dsn.replace("postgres@", "postgres:hunter2-secret@")
    assert pg.describe(with_password) == pg.describe(pg_dsn) == pg_dsn.rsplit("@", 1)[1]
    assert pg.describe("host=db.internal password=hunter2-secret dbname=sg user=x") == "db.internal:5432/sg"
    with caplog.at_level(logging.DEBUG, logger="switchgear"), pg.connect(with_password) as conn:
        pg.migrate(conn)
    assert "127.0.0.1" in caplog.text and "hunter2" not in caplog.text


def test_a_database_at_an_older_schema_is_migrated_forward(pg_dsn: str) -> None:
    conn = pg.connect(pg_dsn)
    try:
        with conn.transaction():  # what a build of schema 1 left behind
            for statement in pg._MIGRATIONS[1]:
                conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = 1")
        assert pg.migrate(conn) == pg.SCHEMA_VERSION - 1
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(pg.SCHEMA_VERSION,)]
        assert conn.execute("SELECT count(*) FROM agents").fetchone() == (0,)
    finally:
        conn.close()
