"""The response cache as the request path uses it: this agent's LRU, optionally backed by Redis.

Two tiers: the in-memory LRU answers first; on a miss, Redis (shared by every agent) is asked
and a hit there fills the local tier. Stores go to both. Every Redis call is bounded by a short
timeout; a slow or dead Redis counts as a miss (counted and logged by redis_state.py), never as
an error.
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson

from switchgear.dataplane.cache import Entry, MemoryCache
from switchgear.dataplane.redis_state import LuaScript, RedisUnavailable, SharedRedis


def encode(entry: Entry) -> bytes:
    """A header line of JSON, a newline, then the body bytes untouched."""
    header = orjson.dumps({
        "service": entry.service, "endpoint": entry.endpoint, "in": entry.input_tokens,
        "out": entry.output_tokens, "cost": entry.cost_usd,
    })
    return header + b"\n" + entry.body


def decode(raw: bytes) -> Entry:
    header, _, body = raw.partition(b"\n")
    fields = orjson.loads(header)
    return Entry(body=body, service=fields["service"], endpoint=fields["endpoint"], input_tokens=fields["in"],
                 output_tokens=fields["out"], cost_usd=fields["cost"])


class ResponseCache:
    """What the agent's request path calls. `redis` is the agent's SharedRedis or None.

    While Redis is degraded (redis_state.py) the cache is this agent's memory alone: lookups
    miss there, stores stay local, and nothing stored meanwhile is copied to Redis later.
    """

    def __init__(self, local: MemoryCache, redis: SharedRedis | None = None, *, prefix: str = "sg:c:",
                 timeout_s: float = 0.05) -> None:
        self.local = local
        self._redis = redis
        self._prefix = prefix
        self._timeout_s = timeout_s
        self.shared_hits = 0

    async def get(self, key: str) -> Entry | None:
        entry = self.local.get(key)
        if entry is not None or self._redis is None:
            return entry
        client = self._redis.client
        try:
            found = await self._redis.call("cache", lambda: _fetch(client, self._prefix + key), self._timeout_s)
        except RedisUnavailable:  # any Redis trouble is a miss, never an error
            return None
        if found is None:
            return None
        entry, remaining_ms = found
        self.shared_hits += 1
        self.local.counters.misses -= 1  # the local miss turned into a (shared) hit
        self.local.counters.hits += 1
        if remaining_ms and remaining_ms > 0:
            self.local.put(key, entry, remaining_ms / 1000.0)
        return entry

    async def put(self, key: str, entry: Entry, ttl_s: float) -> None:
        self.local.put(key, entry, ttl_s)
        if self._redis is None or ttl_s <= 0:
            return
        client = self._redis.client
        with contextlib.suppress(RedisUnavailable):
            await self._redis.call("cache", lambda: client.set(self._prefix + key, encode(entry),
                                                                px=int(ttl_s * 1000)), self._timeout_s)


#: The entry and its remaining TTL in ms, in one command (a pipeline object per lookup cost more).
_FETCH = LuaScript("return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}")


async def _fetch(client: Any, key: str) -> tuple[Entry, int] | None:
    """The entry and its remaining TTL in ms, in one round trip (one timeout covers both)."""
    raw, remaining_ms = await _FETCH.run(client, [key], [])
    return None if not raw else (decode(raw), int(remaining_ms))
