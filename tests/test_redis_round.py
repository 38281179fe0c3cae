"""One Redis round trip per request (redis_round.py), against a real redis-server: the quota
admission carries the cache lookup and the previous requests' stores and accounting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from redis.asyncio.connection import ConnectionPool, UnixDomainSocketConnection

from switchgear.dataplane.cache import Entry, MemoryCache
from switchgear.dataplane.cache_shared import ResponseCache, encode
from switchgear.dataplane.governance import Quota, TenantView
from switchgear.dataplane.metrics import RedisMetrics
from switchgear.dataplane.pipeline import Pipeline
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer, RedisCounters
from switchgear.dataplane.redis_round import ROUND_LUA, Lookup, RedisRound, _input, gate
from switchgear.dataplane.redis_state import RedisHealth, RedisUnavailable, SharedRedis, bulk
from tests.servers import redis_server
from tests.test_pipeline import Upstream, bearer, call, snapshot

FIXED = lambda: 1_800_000_005.0  # noqa: E731 - one window of each width for the whole test
LIMITS = {"requests_per_minute": 1000, "tokens_per_minute": 100_000, "budget_per_hour_usd": 50.0,
          "budget_per_day_usd": 100.0}
ENTRY = Entry(body=b'{"ok": true}', service="chat", endpoint="a", input_tokens=1, output_tokens=2, cost_usd=0.1)


class CountingConnection(UnixDomainSocketConnection):
    """The real client's connection, counting what it sends (one send is one round trip)."""

    sent = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        await super().send_packed_command(command, check_health)


def agent(client: Any) -> tuple[Pipeline, RedisCounters, Upstream]:
    """A pipeline as server.py builds one with Redis: the counters and the cache share one round."""
    counters = RedisCounters(SharedRedis(client), LocalCounters(FIXED), timeout_s=1.0, flush_after_s=60.0)
    cache = ResponseCache(MemoryCache(1 << 20), counters.rounds.redis, timeout_s=1.0, rounds=counters.rounds)
    upstream = Upstream()
    return Pipeline(upstream, auth_required=True, quotas=QuotaEnforcer(counters, clock=FIXED), cache=cache), \
        counters, upstream


async def test_a_cache_miss_is_one_round_trip_carrying_the_stores_and_accounting_before_it(tmp_path: Path) -> None:
    """Admission on every window of both scopes, the cache lookup, the previous request's store
    and accounting: one EVALSHA per request. Another agent then hits the stored entries with
    its admission's round trip alone."""
    snap = snapshot(quota=Quota(**LIMITS), service_quotas=MappingProxyType({"chat": Quota(**LIMITS)}))
    with redis_server(tmp_path) as server:
        pool = ConnectionPool(connection_class=CountingConnection, path=str(server.socket))
        one_client, two_client = aioredis.Redis(connection_pool=pool), aioredis.from_url(server.url)
        observer = aioredis.from_url(server.url)
        one, one_counters, one_upstream = agent(one_client)
        two, two_counters, two_upstream = agent(two_client)
        try:
            principal = one.identify(bearer("acme"), snap)
            await one.invoke(call(text="warm-up"), snap, principal)  # connects, loads the script
            await observer.config_resetstat()
            CountingConnection.sent = 0
            for i in range(20):
                assert not (await one.invoke(call(text=f"question {i}"), snap, principal)).cached
            assert CountingConnection.sent == 20  # admission + lookup + the last store and accounting
            stats = await observer.info("commandstats")
            assert stats["cmdstat_evalsha"]["calls"] == 20
            # inside the script (commandstats counts those too): each round's lookup and the store before it
            assert stats["cmdstat_pttl"]["calls"] == 20 and stats["cmdstat_set"]["calls"] == 20
            assert one_counters.rounds.pending == (3 * 2, 1)  # the last call's tokens, hour and day cost; its store
            await one_counters.flush()
            assert CountingConnection.sent == 21 and one_counters.rounds.pending == (0, 0)
            assert len([k async for k in observer.scan_iter("sg:c:*")]) == 21
            assert float(await observer.get("sg:q:acme|chat|tok/60|30000000")) == 21 * 30

            await observer.config_resetstat()
            principal_two = two.identify(bearer("acme"), snap)
            await two.invoke(call(text="warm-up two"), snap, principal_two)
            await two_counters.flush()
            await observer.config_resetstat()
            for i in range(5):
                served = await two.invoke(call(text=f"question {i}"), snap, principal_two)
                assert served.cached and served.result.body == b'{"n": %d}' % (i + 2)
            assert (await observer.info("commandstats"))["cmdstat_evalsha"]["calls"] == 5  # the lookups rode along
            assert len(two_upstream.calls) == 1 and len(one_upstream.calls) == 21
            assert two.cache is not None and two.cache.shared_hits == 5
        finally:
            for c in (one_client, two_client, observer):
                await c.aclose()
            await pool.disconnect()


async def test_a_refused_admission_reads_no_entry(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url)
        rounds = RedisRound(SharedRedis(client))
        try:
            await client.set("sg:c:k", encode(ENTRY), px=30_000)
            count = [("sg:q:acme|*|req/60|1", 1.0, 120.0)]
            admitted = Lookup("sg:c:k")
            assert await rounds.run("quota", 1.0, gate((), count), admitted) == 0
            assert admitted.done and admitted.raw == encode(ENTRY) and 0 < admitted.pttl_ms <= 30_000
            refused = Lookup("sg:c:k")
            assert await rounds.run("quota", 1.0, gate((), count), refused) == 1
            assert not refused.done and refused.raw is None
            missing = Lookup("sg:c:other")
            assert await rounds.run("cache", 1.0, lookup=missing) == 0
            assert missing.done and missing.raw is None
        finally:
            await client.aclose()


async def test_the_write_behind_queue_is_bounded_and_counts_what_it_drops(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url)
        rounds = RedisRound(SharedRedis(client), flush_after_s=60.0, max_stores=3, max_store_bytes=250,
                            max_carried_bytes=150)
        try:
            assert all(rounds.store(f"sg:c:{i}", b"x" * 100, 30_000) for i in range(2))
            assert not rounds.store("sg:c:big", b"x" * 100, 30_000)  # 300 bytes > 250: dropped
            assert rounds.store("sg:c:2", b"x" * 10, 30_000)
            assert not rounds.store("sg:c:3", b"x", 30_000)  # a fourth entry: dropped
            assert rounds.stores_dropped == 2 and rounds.pending == (0, 3)
            assert rounds.store("sg:c:2", b"y" * 20, 30_000)  # the same key again replaces its queued value
            assert rounds.pending == (0, 3)
            await rounds.run("cache", 1.0, lookup=Lookup("sg:c:nothing"))  # carries at most 150 bytes: one store
            assert rounds.pending == (0, 2)
            assert await client.get("sg:c:0") == b"x" * 100 and await client.get("sg:c:1") is None
            await rounds.flush()  # the rest, whatever their size
            assert rounds.pending == (0, 0)
            assert await client.get("sg:c:1") == b"x" * 100 and await client.get("sg:c:2") == b"y" * 20
            assert 0 < await client.pttl("sg:c:2") <= 30_000
            assert rounds.stores_dropped == 2
            registry = CollectorRegistry()
            registry.register(RedisMetrics(rounds.redis.health, rounds))
            assert "switchgear_redis_stores_dropped_total 2.0" in generate_latest(registry).decode()
        finally:
            await client.aclose()


async def test_a_failed_round_gives_its_accounting_to_the_local_counters_and_drops_its_stores(
        tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url)
        redis = SharedRedis(client, RedisHealth(probe_interval_s=60.0))
        local = LocalCounters(FIXED)
        counters = RedisCounters(redis, local, timeout_s=0.5, flush_after_s=60.0)
        cache = ResponseCache(MemoryCache(1 << 20), redis, timeout_s=0.5, rounds=counters.rounds)
        try:
            assert await counters.admit([], [("acme|*|req/60|1", 10.0, 120.0)]) == 0  # connected
            counters.record("acme|*|tok/60|1", 42.0, 120.0)
            await cache.put("k", ENTRY, 30.0)
            server.kill()
            lookup = Lookup("sg:c:k")
            assert await counters.admit([("acme|*|tok/60|1", 50.0)], [], lookup) == 0  # answered locally
            assert not lookup.done and redis.health.degraded
            assert local.get_now("acme|*|tok/60|1") == 42.0  # the failed round's accounting, kept
            assert counters.rounds.stores_dropped == 1 and counters.rounds.pending == (0, 0)
            assert await cache.get("k") == ENTRY  # the entry stays in this agent's memory
            await cache.put("k2", ENTRY, 30.0)  # degraded: memory only, not queued
            assert counters.rounds.pending == (0, 0) and redis.health.fallbacks["cache"] == 1
        finally:
            await redis.aclose()


async def test_kept_connections_closed_by_a_restarted_redis_are_retried_once_on_a_new_one(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url)
        redis = SharedRedis(client)
        try:
            assert await redis.execute("PING") in (True, b"PONG", "PONG")
            server.kill()
            server.start()  # same socket: the kept connection is closed by the old server
            assert await redis.execute("SET", "k", "v") in (True, b"OK", "OK")
            assert await redis.execute("GET", "k") == b"v"
            with pytest.raises(Exception, match="unknown command"):  # an error reply keeps the connection
                await redis.execute("NOSUCHCOMMAND")
            assert await redis.execute("GET", "k") == b"v"
        finally:
            await redis.aclose()


async def test_a_dead_redis_raises_unavailable_within_the_callers_timeout(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url)
        rounds = RedisRound(SharedRedis(client, RedisHealth(probe_interval_s=60.0)))
        try:
            server.pause()  # accepts, never answers: only the caller's timeout ends the call
            with pytest.raises(RedisUnavailable):
                await rounds.run("cache", 0.2, lookup=Lookup("sg:c:k"))
        finally:
            server.resume()
            await rounds.redis.aclose()


async def test_the_admission_plan_follows_the_minute_and_a_new_tenant_view() -> None:
    now = [1_800_000_005.0]
    local = LocalCounters(lambda: now[0])
    quotas = QuotaEnforcer(local, clock=lambda: now[0])
    tenant = TenantView(id="acme", quota=Quota(requests_per_minute=2))
    assert [(await quotas.admit(tenant, "chat")).allowed for _ in range(3)] == [True, True, False]
    now[0] += 60  # the next minute: a new window, counted from zero
    assert (await quotas.admit(tenant, "chat")).allowed
    raised = TenantView(id="acme", quota=Quota(requests_per_minute=5))  # a new snapshot's view
    assert [(await quotas.admit(raised, "chat")).allowed for _ in range(5)] == [True] * 4 + [False]
    assert local.get_now("acme|*|req/60|30000001") == 6  # (a refused request stays counted)


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_the_write_behind_bound_must_be_a_positive_number_of_bytes(value: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from switchgear.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["agent", "--control-plane", "127.0.0.1:9", "--redis-write-behind-bytes", value])
    assert exited.value.code == 2 and "--redis-write-behind-bytes" in capsys.readouterr().err


async def test_the_write_behind_bound_reaches_the_agents_round(tmp_path: Path) -> None:
    from switchgear.dataplane.server import Options, _pipeline

    with redis_server(tmp_path) as server:
        options = Options(control_planes=[], redis_url=server.url, redis_write_behind_bytes=100)
        pipeline, redis = _pipeline(options, Upstream(), lambda service, hit: None)
        assert redis is not None and pipeline.cache is not None and pipeline.cache.rounds is not None
        try:
            rounds = pipeline.cache.rounds
            assert rounds.store("sg:c:a", b"x" * 100, 1000) and not rounds.store("sg:c:b", b"x", 1000)
            assert rounds.stores_dropped == 1
        finally:
            await redis.aclose()


async def test_connections_kept_between_commands_are_bounded(tmp_path: Path) -> None:
    """A burst of concurrent commands opens one connection each; only `max_idle` stay open."""
    import asyncio

    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url)
        observer = aioredis.from_url(server.url)
        redis = SharedRedis(client, max_idle=4)
        try:
            assert await asyncio.gather(*(redis.execute("GET", f"k{i}") for i in range(20))) == [None] * 20
            deadline = asyncio.get_running_loop().time() + 5.0
            while (await observer.info("clients"))["connected_clients"] > 4 + 1:  # the kept ones, the observer
                assert asyncio.get_running_loop().time() < deadline, "surplus connections were not closed"
                await asyncio.sleep(0.02)
        finally:
            await redis.aclose()
            await observer.aclose()


async def test_a_counter_the_round_both_adds_to_and_checks_is_sent_once_and_added_before_the_check(
        tmp_path: Path) -> None:
    """A finished call's tokens go to the same window the next admission checks: the round names
    that key once, applies the addition first, then checks (and refuses past the limit)."""
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url)
        rounds = RedisRound(SharedRedis(client), flush_after_s=60.0)
        admission = gate([("sg:q:t|*|tok/60|1", 10.0)], [("sg:q:t|*|req/60|1", 100.0, 60.0)])
        rounds.add("sg:q:t|*|tok/60|1", 4.0, 60.0)
        rounds.add("sg:q:t|other|tok/60|1", 2.0, 60.0)
        rounds.store("sg:c:entry", b"value", 60_000)
        keys, _ = _input(rounds._additions, rounds._stores, admission, Lookup("sg:c:wanted"))
        assert len(keys) == len(set(keys)) == 5  # the checked counter once, not twice
        lookup = Lookup("sg:c:entry")
        assert await rounds.run("quota", 1.0, admission, lookup) == 0
        assert float(await client.get("sg:q:t|*|tok/60|1")) == 4.0
        assert float(await client.get("sg:q:t|other|tok/60|1")) == 2.0
        assert lookup.done and lookup.raw == b"value"  # the store ran before the lookup
        rounds.add("sg:q:t|*|tok/60|1", 7.0, 60.0)  # 11 >= 10: this round's own addition refuses it
        assert await rounds.run("quota", 1.0, admission) == 1
        assert float(await client.get("sg:q:t|*|tok/60|1")) == 11.0
        assert float(await client.get("sg:q:t|*|req/60|1")) == 1.0  # the refused one was not counted
        await rounds.aclose()
        await client.aclose()


async def test_a_redis_cluster_node_is_refused_at_start_and_by_every_probe(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real redis-server in cluster mode (one node, no slots served): the agent's check at
    start says why in one error line and keeps to local counters; a probe never recovers it."""
    import subprocess

    from tests.servers import free_port

    port = free_port()
    # (the cluster bus port defaults to port + 10,000, which a free port above 55,535 overflows)
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--cluster-enabled", "yes", "--dir", str(tmp_path),
                               "--cluster-port", str(free_port()),
                               "--cluster-config-file", str(tmp_path / "nodes.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                await client.ping()
                break
            except Exception:
                assert server.poll() is None, "redis-server (cluster mode) exited at start"
                assert time.monotonic() < deadline, "redis-server (cluster mode) did not answer"
                await asyncio.sleep(0.02)
        health = RedisHealth(probe_interval_s=0.0)
        redis = SharedRedis(client, health, probe_timeout_s=10.0)  # (a busy machine: no timeout here)
        with caplog.at_level("ERROR", logger="switchgear.dataplane.redis"):
            await redis.check()
            assert health.degraded and redis.cluster_refused
            with pytest.raises(RedisUnavailable):
                await redis.call("quota", client.ping, 1.0)
            assert redis.probing is not None
            await redis.probing
            assert health.degraded, "a probe answered by a cluster node must not leave degraded mode"
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "Redis Cluster node" in errors[0] and f"127.0.0.1:{port}" in errors[0]
    finally:
        await client.aclose()
        server.terminate()
        server.wait(timeout=10)


async def test_a_standalone_redis_passes_the_check_at_start(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url)
        try:
            redis = SharedRedis(client, RedisHealth())
            await redis.check()
            assert not redis.health.degraded and not redis.cluster_refused
        finally:
            await client.aclose()


@settings(max_examples=200, deadline=None)
@given(checks=st.lists(st.tuples(st.text(min_size=1), st.floats(0, 1e12)), max_size=4),
       counts=st.lists(st.tuples(st.text(min_size=1), st.floats(0, 1e12), st.integers(1, 86_400)), max_size=4),
       additions=st.dictionaries(st.text(min_size=1), st.tuples(st.floats(-1e9, 1e9), st.integers(1, 86_400)),
                                 max_size=4),
       stores=st.dictionaries(st.text(min_size=1), st.tuples(st.binary(max_size=7000), st.integers(1, 10**9)),
                              max_size=3),
       lookup=st.none() | st.text(min_size=1))
def test_a_round_is_packed_as_the_client_packs_the_same_command(
        checks: list[tuple[str, float]], counts: list[tuple[str, float, int]],
        additions: dict[str, tuple[float, int]], stores: dict[str, tuple[bytes, int]], lookup: str | None) -> None:
    """The round's EVALSHA, packed by the agent (admission keys packed once per plan), is byte for
    byte what redis-py's pack_command sends for the same arguments: any text in keys (non-ASCII,
    CR LF), any bytes in stored values, large values."""
    from redis.asyncio.connection import Connection

    from switchgear.dataplane.redis_round import _command
    from switchgear.dataplane.redis_state import LuaScript, packed

    admission = gate(checks, [(key, limit, float(ttl)) for key, limit, ttl in counts])
    adds = {key: (amount, float(ttl)) for key, (amount, ttl) in additions.items()}
    wanted = None if lookup is None else Lookup(lookup)
    script = LuaScript(ROUND_LUA)
    count, body = _command(adds, stores, admission, wanted)
    keys, args = _input(adds, stores, admission, wanted)
    expected = b"".join(Connection().pack_command("EVALSHA", script.sha, len(keys), *keys, *args))
    assert packed(count + 2, bulk(b"EVALSHA") + bulk(script.sha.encode()) + body) == expected
