"""Quotas shared through a real Redis: exact totals across agents, and graceful degradation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis

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
