"""The response cache as the request path uses it: this agent's LRU, optionally backed by Redis.

Two tiers: the in-memory LRU answers first; on a miss, Redis (shared by every agent) is asked
and a hit there fills the local tier. Stores go to both. Every Redis call is bounded by a short
timeout; a slow or dead Redis counts as a miss (and is counted and logged), never as an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from switchgear.dataplane.cache import Entry, MemoryCache

log = logging.getLogger("switchgear.dataplane.cache")


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
    """What the agent's request path calls. `redis` is a redis.asyncio client or None."""

    def __init__(self, local: MemoryCache, redis: Any = None, *, prefix: str = "sg:c:", timeout_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.local = local
        self._redis = redis
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._clock = clock
        self.shared_hits = 0
        self.degraded = 0
        self._last_log = float("-inf")

    async def get(self, key: str) -> Entry | None:
        entry = self.local.get(key)
        if entry is not None or self._redis is None:
            return entry
        try:
            raw = await asyncio.wait_for(self._redis.get(self._prefix + key), self._timeout_s)
            if raw is None:
                return None
            remaining = await asyncio.wait_for(self._redis.pttl(self._prefix + key), self._timeout_s)
        except Exception as exc:  # any Redis trouble is a miss, never an error
            self._degrade(exc)
            return None
        found = decode(raw)
        self.shared_hits += 1
        self.local.counters.misses -= 1  # the local miss turned into a (shared) hit
        self.local.counters.hits += 1
        if remaining and remaining > 0:
            self.local.put(key, found, remaining / 1000.0)
        return found

    async def put(self, key: str, entry: Entry, ttl_s: float) -> None:
        self.local.put(key, entry, ttl_s)
        if self._redis is None or ttl_s <= 0:
            return
        try:
            await asyncio.wait_for(self._redis.set(self._prefix + key, encode(entry), px=int(ttl_s * 1000)),
                                   self._timeout_s)
        except Exception as exc:
            self._degrade(exc)

    def _degrade(self, exc: Exception) -> None:
        self.degraded += 1
        now = self._clock()
        if now - self._last_log >= 60.0:
            self._last_log = now
            log.warning("redis unavailable for the response cache (%s); using this agent's cache only",
                        type(exc).__name__)
