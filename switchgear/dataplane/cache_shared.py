"""The response cache as the request path uses it: this agent's LRU, optionally backed by Redis.

Two tiers: the in-memory LRU answers first; on a miss, Redis (shared by every agent) is asked
and a hit there fills the local tier. Stores go to both (to Redis written behind, with the next
round of redis_round.py). Every Redis call is bounded by a short timeout; a slow or dead Redis
counts as a miss (counted and logged by redis_state.py), never as an error.
"""

from __future__ import annotations

import orjson

from switchgear.dataplane.cache import Entry, MemoryCache
from switchgear.dataplane.redis_round import Lookup, RedisRound
from switchgear.dataplane.redis_state import RedisUnavailable, SharedRedis


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
    """What the agent's request path calls. `redis` is the agent's SharedRedis or None; `rounds`
    the RedisRound it shares with the quota counters (one is made when not given).

    Stores are written behind: `put` fills this agent's memory at once and queues the Redis copy
    on the next round (redis_round.py: bounded, a store that does not fit is dropped and counted).
    A lookup can ride on the quota admission's round (`carried_lookup`, then `get(key, carried)`).

    While Redis is degraded (redis_state.py) the cache is this agent's memory alone: lookups
    miss there, stores stay local, and nothing stored meanwhile is copied to Redis later.
    """

    def __init__(self, local: MemoryCache, redis: SharedRedis | None = None, *, prefix: str = "sg:c:",
                 timeout_s: float = 0.05, rounds: RedisRound | None = None) -> None:
        self.local = local
        self._redis = redis
        self._prefix = prefix
        self._timeout_s = timeout_s
        self.rounds = rounds if rounds is not None or redis is None else RedisRound(redis)
        self.shared_hits = 0

    def carried_lookup(self, key: str) -> Lookup | None:
        """A Redis read of `key` for the quota admission to carry, or None when there is nothing
        to ask Redis (no Redis, degraded, or the entry is in this agent's memory)."""
        if self._redis is None or self._redis.health.degraded or self.local.peek(key) is not None:
            return None
        return Lookup(self._prefix + key)

    async def get(self, key: str, carried: Lookup | None = None) -> Entry | None:
        """The entry for `key`: this agent's memory, else Redis — the answer `carried` already
        holds when an admission's round made the read, else a round of its own."""
        entry = self.local.get(key)
        if entry is not None or self.rounds is None:
            return entry
        if carried is None or not carried.done:
            carried = Lookup(self._prefix + key)
            try:
                await self.rounds.run("cache", self._timeout_s, lookup=carried)
            except RedisUnavailable:  # any Redis trouble is a miss, never an error
                return None
        if not carried.raw:
            return None
        entry = decode(carried.raw)
        self.shared_hits += 1
        self.local.counters.misses -= 1  # the local miss turned into a (shared) hit
        self.local.counters.hits += 1
        if carried.pttl_ms > 0:
            self.local.put(key, entry, carried.pttl_ms / 1000.0)
        return entry

    async def put(self, key: str, entry: Entry, ttl_s: float) -> None:
        """Into this agent's memory now; into Redis with the next round (written behind)."""
        self.keep(key, entry, ttl_s)

    def keep(self, key: str, entry: Entry, ttl_s: float) -> None:
        """`put`, as a plain call (what a request's work after its answer runs: afterward.py)."""
        self.local.put(key, entry, ttl_s)
        if self.rounds is None or ttl_s <= 0:
            return
        if self.rounds.redis.skipped("cache"):
            return
        self.rounds.store(self._prefix + key, encode(entry), max(1, int(ttl_s * 1000)))

    async def flush(self) -> None:
        """Send the stores written behind now."""
        if self.rounds is not None:
            await self.rounds.flush()
