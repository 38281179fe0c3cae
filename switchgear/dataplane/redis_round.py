"""One Redis round trip per request for the quota counters and the shared response cache together.

A cache-miss request used to make three Redis calls one after another: the quota admission, the
cache lookup and, after the upstream answered, the cache store. Each costs a wake-up of the agent
and of Redis, and the client library's own Python (~40-50 us a call). Here they are one script
call (ROUND_LUA, EVALSHA) that, atomically:

1. applies what is pending: finished calls' token and cost additions (quota accounting) and the
   cache stores written behind, both queued by earlier requests;
2. reads the token and budget windows and counts the request (the quota admission, exact across
   agents as before: the whole round is one script);
3. when admitted and asked to, reads one cache entry and its remaining TTL (the lookup).

Pending work rides on the next round, or is sent `flush_after_s` later when no round comes first
(an idle agent still publishes its accounting and stores promptly).

The stores are bounded: at most `max_stores` entries and `max_store_bytes` bytes wait at a
time, and one round carries at most `max_carried_bytes` of them (the rest wait for the next
round or the flush) so that a request never carries a large backlog on its own answer's path. A
store that does not fit is dropped and counted (`stores_dropped`): the entry is still in this
agent's memory tier, and other agents miss it and fetch it themselves, as before it was stored.
A round that fails drops the stores it carried (also counted) and hands its accounting to the
`fallback` counters (quota.py explains why they are not replayed). A round cancelled by its
caller (a caller gone while its admission was in flight) is taken as applied: it is cancelled
while awaiting the reply, after the script was sent, which Redis then runs whole.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from switchgear.dataplane.redis_state import LuaScript, RedisUnavailable, SharedRedis, bulk

Check = tuple[str, float]  # (key, limit): refuse when the counter already holds >= limit
Count = tuple[str, float, float]  # (key, limit, ttl s): add 1, refuse when the new total is > limit

# KEYS: the admission's checks and counts, then the other keys the round names once each (an
# addition to a counter the admission also reads names it by the admission's key: each key is
# sent once). ARGV[1] is every number, space-separated (one argument: the client's encoding costs
# ~0.5 us an argument): how many additions, stores, checks, counts and lookups; the limit per
# check and (limit, ttl s) per count; then (key index, amount, ttl s) per addition, (key index,
# ttl ms) per store and the lookup's key index. ARGV[2..] are the stores' values.
# Returns {refused, entry or false, its pttl, value...}: refused is 0 when admitted, else the
# 1-based index of the refusing check or count (CounterStore.admit); the lookup is made only when
# admitted; then each check's counter as read and each count's new total, in order, up to the
# refusing one (what rate-limit headers report).
ROUND_LUA = """
local n = {}
for word in string.gmatch(ARGV[1], '%S+') do n[#n + 1] = word end
local np, ns, nc, nk, nl = tonumber(n[1]), tonumber(n[2]), tonumber(n[3]), tonumber(n[4]), tonumber(n[5])
local g = 6
local a = g + nc + 2 * nk
for i = 1, np do
  local key = KEYS[tonumber(n[a])]
  redis.call('INCRBYFLOAT', key, n[a + 1])
  redis.call('EXPIRE', key, n[a + 2], 'NX')
  a = a + 3
end
for i = 1, ns do
  redis.call('SET', KEYS[tonumber(n[a])], ARGV[1 + i], 'PX', n[a + 1])
  a = a + 2
end
local out = {0, false, 0}
for i = 1, nc do
  local value = redis.call('GET', KEYS[i]) or '0'
  out[3 + i] = value
  if tonumber(value) >= tonumber(n[g]) then out[1] = i return out end
  g = g + 1
end
for i = 1, nk do
  local key = KEYS[nc + i]
  local total = redis.call('INCRBYFLOAT', key, 1)
  out[3 + nc + i] = total
  redis.call('EXPIRE', key, n[g + 1], 'NX')
  if tonumber(total) > tonumber(n[g]) then out[1] = nc + i return out end
  g = g + 2
end
if nl > 0 then
  local key = KEYS[tonumber(n[a])]
  out[2] = redis.call('GET', key)
  out[3] = redis.call('PTTL', key)
end
return out
"""


@dataclass(frozen=True, slots=True)
class Gate:
    """An admission's checks and counts as ROUND_LUA takes them (built once, used per request)."""

    keys: tuple[str, ...]
    numbers: str  # " limit ... limit ttl ...": the checks' limits, then each count's limit and ttl
    checks: int
    counts: int
    index: Mapping[str, int]  # key -> its 1-based place in `keys` (a round names each key once)
    packed: bytes  # `keys` as the command sends them (redis_state.bulk each), packed once


def gate(checks: Sequence[Check], counts: Sequence[Count]) -> Gate:
    words = [repr(float(limit)) for _, limit in checks]
    for _, limit, ttl_s in counts:
        words += (repr(float(limit)), str(int(ttl_s) + 1))
    keys = (*(key for key, _ in checks), *(key for key, _, _ in counts))
    index: dict[str, int] = {}
    for place, key in enumerate(keys, 1):
        index.setdefault(key, place)
    return Gate(keys, "".join(" " + w for w in words), len(checks), len(counts), MappingProxyType(index),
                b"".join(bulk(key.encode()) for key in keys))


NO_GATE = Gate((), "", 0, 0, MappingProxyType({}), b"")


@dataclass(slots=True)
class Lookup:
    """A cache read that rides on a quota admission's round: `done` once Redis answered it (an
    entry's encoded bytes in `raw`, or None for a miss, and its remaining TTL in ms)."""

    key: str  # the Redis key, prefix included
    done: bool = False
    raw: bytes | None = None
    pttl_ms: int = 0


class RedisRound:
    """The agent's one script call to Redis and the work that waits to ride on it."""

    def __init__(self, redis: SharedRedis, *, flush_after_s: float = 0.05, flush_timeout_s: float = 0.5,
                 max_stores: int = 256, max_store_bytes: int = 4 << 20, max_carried_bytes: int = 64 << 10,
                 on_lost_addition: Callable[[str, float, float], None] | None = None) -> None:
        self.redis = redis
        self._flush_after_s = flush_after_s
        self._flush_timeout_s = flush_timeout_s
        self._max_stores = max_stores
        self._max_store_bytes = max_store_bytes
        self._max_carried_bytes = max_carried_bytes
        self.on_lost_addition = on_lost_addition  # a failed round's accounting goes here (quota's local counters)
        self._script = LuaScript(ROUND_LUA)
        self._additions: dict[str, tuple[float, float]] = {}  # key -> (amount, ttl s), not yet in Redis
        self._stores: dict[str, tuple[bytes, int]] = {}  # key -> (value, ttl ms), oldest first
        self._store_bytes = 0
        self.stores_dropped = 0  # queue full, or lost with a failed round
        self._flush_timer: asyncio.TimerHandle | None = None
        self.flushing: asyncio.Task[None] | None = None  # the timer's flush in flight (tests await it)

    # --- what rides on the next round ----------------------------------------------------------

    def add(self, key: str, amount: float, ttl_s: float) -> None:
        """Queue `amount` for the counter `key` (created with `ttl_s`)."""
        queued = self._additions.get(key)
        self._additions[key] = (amount + queued[0] if queued else amount, ttl_s)
        self._arm()

    def store(self, key: str, value: bytes, ttl_ms: int) -> bool:
        """Queue a cache store; False (and counted) when the queue is full and it was dropped."""
        old = self._stores.get(key)
        entries, size = len(self._stores), self._store_bytes + len(value)
        if old is not None:  # replaced: its place and bytes are the new value's
            entries, size = entries - 1, size - len(old[0])
        if entries >= self._max_stores or size > self._max_store_bytes:
            self.stores_dropped += 1
            return False
        if old is not None:
            del self._stores[key]  # (the new value queues last, as the newest)
        self._stores[key] = (value, ttl_ms)
        self._store_bytes = size
        self._arm()
        return True

    @property
    def pending(self) -> tuple[int, int]:
        """(additions, stores) waiting for a round."""
        return len(self._additions), len(self._stores)

    # --- rounds ------------------------------------------------------------------------------

    async def run(self, use: str, timeout_s: float, admission: Gate = NO_GATE, lookup: Lookup | None = None,
                  seen: list[float] | None = None) -> int:
        """One script call: what is pending, then the `admission`'s checks and counts, then
        `lookup` (filled in when admitted). Returns 0 when admitted, else the refusing entry's
        1-based index; `seen` (when given) gets each entry's counter as read, up to that one.
        Raises RedisUnavailable (what it carried is then handed over or dropped, see the module)."""
        additions = self._take_additions()
        stores = self._take_stores(self._max_carried_bytes)
        if self._additions or self._stores:
            self._arm()  # stores left over for the next round
        count, body = _command(additions, stores, admission, lookup)
        redis, script = self.redis, self._script
        try:
            refused, raw, pttl_ms, *values = await redis.call(use, lambda: script.run_packed(redis, count, body),
                                                              timeout_s)
        except RedisUnavailable:
            self._lost(additions, stores)
            raise
        if seen is not None:
            seen.extend(map(_number, values))
        if lookup is not None and not refused:
            lookup.done, lookup.raw, lookup.pttl_ms = True, raw or None, int(pttl_ms or 0)
        return int(refused)

    async def flush(self) -> None:
        """Send everything pending now (one round per `max_store_bytes` of stores at most)."""
        while self._additions or self._stores:
            try:
                await self._flush_once()
            except RedisUnavailable:
                return

    async def _flush_once(self) -> None:
        additions, stores = self._take_additions(), self._take_stores(self._max_store_bytes)
        count, body = _command(additions, stores, NO_GATE, None)
        redis, script = self.redis, self._script
        use = "quota" if additions else "cache"
        try:
            await redis.call(use, lambda: script.run_packed(redis, count, body), self._flush_timeout_s)
        except RedisUnavailable:
            self._lost(additions, stores)
            raise

    async def aclose(self) -> None:
        """Send what is pending (the agent is stopping)."""
        if self.flushing is not None:
            await asyncio.gather(self.flushing, return_exceptions=True)
        await self.flush()

    def _arm(self) -> None:
        if self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(self._flush_after_s, self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_timer = None
        if (self._additions or self._stores) and (self.flushing is None or self.flushing.done()):
            self.flushing = asyncio.ensure_future(self.flush())

    def _take_additions(self) -> dict[str, tuple[float, float]]:
        additions, self._additions = self._additions, {}
        # (The timer is cancelled, not left to fire and find nothing due: firing between calls,
        # it would wake an agent that otherwise sleeps until the next call.)
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        return additions

    def _take_stores(self, budget: int) -> dict[str, tuple[bytes, int]]:
        """The oldest stores up to `budget` bytes (at least one when any wait)."""
        if not self._stores:
            return {}
        if self._store_bytes <= budget:
            stores, self._stores, self._store_bytes = self._stores, {}, 0
            return stores
        taken: dict[str, tuple[bytes, int]] = {}
        size = 0
        for key, (value, ttl_ms) in self._stores.items():
            if taken and size + len(value) > budget:
                break
            taken[key] = (value, ttl_ms)
            size += len(value)
        for key in taken:
            del self._stores[key]
        self._store_bytes -= size
        return taken

    def _lost(self, additions: dict[str, tuple[float, float]], stores: dict[str, tuple[bytes, int]]) -> None:
        self.stores_dropped += len(stores)
        if self.on_lost_addition is not None:
            for key, (amount, ttl_s) in additions.items():
                self.on_lost_addition(key, amount, ttl_s)


def _input(additions: dict[str, tuple[float, float]], stores: dict[str, tuple[bytes, int]], admission: Gate,
           lookup: Lookup | None) -> tuple[list[str], list[str | bytes]]:
    """ROUND_LUA's KEYS and ARGV."""
    keys = [*admission.keys]
    index = admission.index
    words = [f"{len(additions)} {len(stores)} {admission.checks} {admission.counts} {0 if lookup is None else 1}",
             admission.numbers]
    for key, (amount, ttl_s) in additions.items():
        place = index.get(key)
        if place is None:
            keys.append(key)
            place = len(keys)
        words.append(f" {place} {amount!r} {int(ttl_s) + 1}")
    for key, (_, ttl_ms) in stores.items():
        keys.append(key)
        words.append(f" {len(keys)} {ttl_ms}")
    if lookup is not None:
        keys.append(lookup.key)
        words.append(f" {len(keys)}")
    return keys, ["".join(words), *(value for value, _ in stores.values())]


def _command(additions: dict[str, tuple[float, float]], stores: dict[str, tuple[bytes, int]], admission: Gate,
             lookup: Lookup | None) -> tuple[int, bytes]:
    """ROUND_LUA's numkeys, KEYS and ARGV packed for EVALSHA (LuaScript.run_packed): how many
    bulk strings, and them. The admission's keys come packed (Gate.packed)."""
    keys, args = _input(additions, stores, admission, lookup)
    extra = keys[len(admission.keys):]
    body = b"".join((bulk(str(len(keys)).encode()), admission.packed, *(bulk(key.encode()) for key in extra),
                     *(bulk(arg.encode() if isinstance(arg, str) else arg) for arg in args)))
    return 1 + len(keys) + len(args), body


def _number(value: object) -> float:
    """A counter's value as the script read it (a bulk string: float() takes bytes), NaN when
    Python cannot read it as Lua's tonumber did ("0x10"; another writer's value): no exception."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
