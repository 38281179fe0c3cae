"""Quotas shared through a real Redis: exact totals across agents, and graceful degradation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import ConnectionPool, UnixDomainSocketConnection

from switchgear.dataplane.governance import Quota, TenantView
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer, RedisCounters
from switchgear.dataplane.redis_state import RedisHealth, SharedRedis
from tests.servers import redis_server

TENANT = TenantView(id="acme", quota=Quota(requests_per_minute=20))


async def test_two_agents_sharing_redis_admit_exactly_n(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        clients = [aioredis.from_url(server.url) for _ in range(2)]
        try:
            # a fixed clock keeps the whole burst inside one minute window
            agents = [QuotaEnforcer(RedisCounters(SharedRedis(c), LocalCounters(), timeout_s=1.0),
                                    clock=lambda: 1_800_000_005.0) for c in clients]
            results = await asyncio.gather(*(agents[i % 2].admit(TENANT, "chat") for i in range(60)))
            assert sum(r.allowed for r in results) == 20
            per_agent = [sum(results[i].allowed for i in range(j, 60, 2)) for j in (0, 1)]
            assert all(n > 0 for n in per_agent)  # both agents admitted some: the count is shared
        finally:
            for c in clients:
                await c.aclose()


async def test_dead_redis_degrades_to_local_counters_and_a_probe_brings_it_back(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url, socket_timeout=0.2)
        redis = SharedRedis(client, RedisHealth(probe_interval_s=0.0))  # a probe is due at once
        fixed = lambda: 1_800_000_005.0  # noqa: E731 - one minute window for the whole test
        quotas = QuotaEnforcer(RedisCounters(redis, LocalCounters(fixed), timeout_s=0.2), clock=fixed)
        try:
            assert (await quotas.admit(TENANT, "chat")).allowed
            assert not redis.health.degraded
            server.kill()
            results = [await quotas.admit(TENANT, "chat") for _ in range(25)]
            assert sum(r.allowed for r in results) == 20  # the local counters enforce the limit alone
            assert redis.health.degraded
            assert redis.health.failures["quota"] == 1  # then short-circuited, not retried per request
            assert redis.health.fallbacks["quota"] == 25
            assert redis.probing is not None
            await redis.probing  # the dead server does not answer the probe
            assert redis.health.degraded

            server.start()  # same socket, empty data: the shared counter starts again
            assert not (await quotas.admit(TENANT, "chat")).allowed  # answered locally, starts a probe
            await redis.probing
            assert not redis.health.degraded
            assert (await quotas.admit(TENANT, "chat")).allowed  # counted in Redis again
            assert [k async for k in client.scan_iter("sg:q:*")] == [b"sg:q:acme|*|req/60|30000000"]
        finally:
            await redis.aclose()


FULL = TenantView(id="acme", quota=Quota(requests_per_minute=1000, tokens_per_minute=100_000,
                                         budget_per_hour_usd=50.0, budget_per_day_usd=100.0),
                  service_quotas=MappingProxyType({"chat": Quota(requests_per_minute=500, tokens_per_minute=50_000,
                                                                 budget_per_hour_usd=20.0,
                                                                 budget_per_day_usd=40.0)}))


class CountingConnection(UnixDomainSocketConnection):
    """The real client's connection, counting what it sends (one send is one round trip)."""

    sent = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        await super().send_packed_command(command, check_health)


async def test_admission_and_accounting_take_one_round_trip_per_request(tmp_path: Path) -> None:
    """Every window limited on both scopes (14 round trips per request before): each request's
    admission carries the previous request's accounting in one EVALSHA, and nothing else
    reaches Redis until the last call's accounting is flushed."""
    with redis_server(tmp_path) as server:
        pool = ConnectionPool(connection_class=CountingConnection, path=str(server.socket))
        client = aioredis.Redis(connection_pool=pool)
        observer = aioredis.from_url(server.url)
        fixed = lambda: 1_800_000_005.0  # noqa: E731 - one window of each width for the whole test
        counters = RedisCounters(SharedRedis(client), LocalCounters(fixed), timeout_s=1.0, flush_after_s=60.0)
        quotas = QuotaEnforcer(counters, clock=fixed)
        try:
            assert (await quotas.admit(FULL, "chat")).allowed  # connects, loads the script
            await quotas.record(FULL, "chat", tokens=10, cost_usd=0.01)
            await observer.config_resetstat()
            CountingConnection.sent = 0
            for _ in range(20):
                assert (await quotas.admit(FULL, "chat")).allowed
                await quotas.record(FULL, "chat", tokens=10, cost_usd=0.01)
            assert CountingConnection.sent == 20  # one round trip per request, admission and accounting together
            assert (await observer.info("commandstats"))["cmdstat_evalsha"]["calls"] == 20
            await counters.flush()  # the last request's accounting
            assert CountingConnection.sent == 21
            prefix, minute, hour, day = "sg:q:acme|", 30_000_000, 500_000, 20_833
            for scope in ("*", "chat"):
                assert float(await observer.get(f"{prefix}{scope}|req/60|{minute}")) == 21
                assert float(await observer.get(f"{prefix}{scope}|tok/60|{minute}")) == 210
                assert float(await observer.get(f"{prefix}{scope}|usd/3600|{hour}")) == pytest.approx(0.21)
                assert float(await observer.get(f"{prefix}{scope}|usd/86400|{day}")) == pytest.approx(0.21)
                assert 0 < await observer.ttl(f"{prefix}{scope}|usd/86400|{day}") <= 2 * 86400 + 1
        finally:
            await client.aclose()
            await pool.disconnect()
            await observer.aclose()


async def test_a_finished_calls_cost_reaches_other_agents_without_another_request(tmp_path: Path) -> None:
    """Accounting waits for the next admission only `flush_after_s`: another agent then refuses
    on the budget this agent's last call spent, although this agent made no further request."""
    tenant = TenantView(id="acme", quota=Quota(budget_per_hour_usd=0.10))
    with redis_server(tmp_path) as server:
        clients = [aioredis.from_url(server.url) for _ in range(2)]
        fixed = lambda: 1_800_000_005.0  # noqa: E731
        first, second = (RedisCounters(SharedRedis(c), LocalCounters(fixed), timeout_s=1.0, flush_after_s=0.02)
                         for c in clients)
        agents = [QuotaEnforcer(first, clock=fixed), QuotaEnforcer(second, clock=fixed)]
        try:
            assert (await agents[0].admit(tenant, "chat")).allowed
            await agents[0].record(tenant, "chat", tokens=100, cost_usd=0.25)  # crosses the budget
            assert (await agents[0].admit(tenant, "chat")).reason == "budget of $0.1 per hour spent"  # its own: at once
            await agents[0].record(tenant, "chat", tokens=0, cost_usd=0.01)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while first.flushing is None:  # the timer starts the flush
                assert loop.time() < deadline, "no flush started"
                await asyncio.sleep(0.01)
            await first.flushing
            refused = await agents[1].admit(tenant, "chat")
            assert not refused.allowed and refused.reason == "budget of $0.1 per hour spent"
            assert float(await clients[1].get("sg:q:acme|*|usd/3600|500000")) == pytest.approx(0.26)
        finally:
            for c in clients:
                await c.aclose()


async def test_accounting_pending_when_redis_dies_is_kept_by_the_local_counters(tmp_path: Path) -> None:
    tenant = TenantView(id="acme", quota=Quota(tokens_per_minute=100))
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url, socket_timeout=0.2)
        fixed = lambda: 1_800_000_005.0  # noqa: E731
        local = LocalCounters(fixed)
        counters = RedisCounters(SharedRedis(client, RedisHealth(probe_interval_s=60.0)), local, timeout_s=0.2,
                                 flush_after_s=60.0)
        quotas = QuotaEnforcer(counters, clock=fixed)
        try:
            assert (await quotas.admit(tenant, "chat")).allowed
            await quotas.record(tenant, "chat", tokens=100, cost_usd=0.0)  # pending, not yet in Redis
            server.kill()
            refused = await quotas.admit(tenant, "chat")  # the script fails: local counters answer, pending included
            assert refused.reason == "100 tokens per minute used"
            await quotas.record(tenant, "chat", tokens=5, cost_usd=0.0)  # degraded: counted locally at once
            assert await local.get("acme|*|tok/60|30000000") == 105
        finally:
            await client.aclose()


async def test_an_agent_stopping_sends_its_pending_accounting(tmp_path: Path) -> None:
    tenant = TenantView(id="acme", quota=Quota(tokens_per_minute=1000))
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url)
        fixed = lambda: 1_800_000_005.0  # noqa: E731
        quotas = QuotaEnforcer(RedisCounters(SharedRedis(client), LocalCounters(fixed), timeout_s=1.0,
                                             flush_after_s=60.0), clock=fixed)
        try:
            assert (await quotas.admit(tenant, "chat")).allowed
            await quotas.record(tenant, "chat", tokens=42, cost_usd=0.0)
            assert await client.get("sg:q:acme|*|tok/60|30000000") is None  # queued for the next admission
            await quotas.aclose()
            assert float(await client.get("sg:q:acme|*|tok/60|30000000")) == 42
        finally:
            await client.aclose()
