"""The two-tier response cache against a real Redis: sharing between agents, and degradation."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from switchgear.dataplane.cache import Entry, MemoryCache
from switchgear.dataplane.cache_shared import ResponseCache, decode, encode
from switchgear.dataplane.redis_state import RedisHealth, SharedRedis
from tests.servers import redis_server

ENTRY = Entry(body=b'{"ok": true}\n\x00binary', service="chat", endpoint="a", input_tokens=3, output_tokens=5,
              cost_usd=0.001)


def test_encoding_round_trips_any_body() -> None:
    assert decode(encode(ENTRY)) == ENTRY


async def test_an_entry_stored_by_one_agent_is_a_hit_on_another(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        one_client, two_client = aioredis.from_url(server.url), aioredis.from_url(server.url)
        one = ResponseCache(MemoryCache(1 << 20), SharedRedis(one_client), timeout_s=1.0)
        two = ResponseCache(MemoryCache(1 << 20), SharedRedis(two_client), timeout_s=1.0)
        try:
            assert await two.get("k") is None
            await one.put("k", ENTRY, ttl_s=30)  # written behind: in Redis with one's next round
            assert await two.get("k") is None
            await one.flush()
            assert await two.get("k") == ENTRY
            assert two.shared_hits == 1 and two.local.counters.hits == 1 and two.local.counters.misses == 2
            assert await two.get("k") == ENTRY and two.shared_hits == 1  # now served locally
            ttl_ms = await two_client.pttl("sg:c:k")
            assert 0 < ttl_ms <= 30_000
        finally:
            await one_client.aclose()
            await two_client.aclose()


async def test_dead_redis_is_a_miss_not_an_error_until_a_probe_finds_it_back(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url, socket_timeout=0.2)
        redis = SharedRedis(client, RedisHealth(probe_interval_s=0.0))  # a probe is due at once
        cache = ResponseCache(MemoryCache(1 << 20), redis, timeout_s=0.2)
        try:
            server.kill()
            assert await cache.get("k") is None
            await cache.put("k", ENTRY, ttl_s=30)  # still stored locally
            assert await cache.get("k") == ENTRY
            assert redis.health.degraded
            assert redis.health.failures["cache"] == 1 and redis.health.fallbacks["cache"] == 2
            assert redis.probing is not None
            await redis.probing

            server.start()  # same socket, empty data
            assert await cache.get("other") is None  # answered locally, starts a probe
            await redis.probing
            assert not redis.health.degraded
            await cache.put("k2", ENTRY, ttl_s=30)
            await cache.flush()
            assert await client.get("sg:c:k2") == encode(ENTRY)  # stores reach Redis again
            assert await client.get("sg:c:k") is None  # what was stored while degraded is not copied
        finally:
            await redis.aclose()
