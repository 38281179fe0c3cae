"""The agent's response cache: canonical keys, per-category TTLs, a byte-bounded LRU.

Pure (stdlib + orjson): time comes from an injected clock; nothing here does I/O. The async
single-flight that turns a burst of identical misses into one upstream call lives in
`singleflight.py`; a shared (Redis) backend implements the same `CacheBackend` protocol.

What is cached: successful, complete, non-fallback responses only. Never errors, fallbacks or
partial streams — the request path decides that and simply does not call `put` for them.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

#: Which TTL kind of the config's `caching.ttl` applies to each category. Categories without
#: a kind (vector databases, knowledge graphs) are not cached unless a service sets a TTL:
#: their answers change whenever their data does.
TTL_KIND_BY_CATEGORY: Mapping[str, str] = {
    "llm": "llm_responses",
    "document": "document_parsing",
    "embedding": "embeddings",
}


def cache_key(service: str, method: str, payload: Mapping[str, Any], tenant: str = "", shared: bool = False) -> str:
    """SHA-256 hex over the canonical JSON (sorted keys, no whitespace) of what identifies a call.

    The tenant is part of the key unless the service opts into sharing, so one tenant never
    sees another's entry. Two payloads that differ only in key order give the same key.
    """
    scope = "" if shared else tenant
    canonical = orjson.dumps(
        {"tenant": scope, "service": service, "method": method, "payload": payload},
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


def ttl_for(category: str, ttl_by_kind: Mapping[str, float], service_ttl_s: float | None = None) -> float:
    """Seconds to keep a response: the service's own TTL when set, else its category's; 0 = don't."""
    if service_ttl_s is not None:
        return max(0.0, service_ttl_s)
    kind = TTL_KIND_BY_CATEGORY.get(category)
    return float(ttl_by_kind.get(kind, 0.0)) if kind else 0.0


@dataclass(frozen=True)
class Entry:
    """A cached response: the body and what the response needs to say about itself."""

    body: bytes
    service: str
    endpoint: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def size(self) -> int:
        """Bytes charged against the memory bound (body plus a fixed per-entry overhead)."""
        return len(self.body) + 256


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    expirations: int = 0
    bytes: int = 0
    entries: int = 0


class CacheBackend(Protocol):
    def get(self, key: str) -> Entry | None: ...

    def put(self, key: str, entry: Entry, ttl_s: float) -> None: ...


class MemoryCache:
    """LRU bounded by bytes. `get` refreshes recency; expired entries are dropped when met.

    Not thread-safe; used from the agent's event loop. An entry larger than the whole bound
    is not stored (it would evict everything for nothing).
    """

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Entry]] = OrderedDict()
        self.counters = CacheCounters()

    def get(self, key: str) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            self.counters.misses += 1
            return None
        expires_at, entry = found
        if self._clock() >= expires_at:
            self._drop(key)
            self.counters.expirations += 1
            self.counters.misses += 1
            return None
        self._entries.move_to_end(key)
        self.counters.hits += 1
        return entry

    def peek(self, key: str) -> Entry | None:
        """The live entry for `key` without counting a lookup or refreshing its recency."""
        found = self._entries.get(key)
        return found[1] if found is not None and self._clock() < found[0] else None

    def put(self, key: str, entry: Entry, ttl_s: float) -> None:
        if ttl_s <= 0 or entry.size > self._max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + ttl_s, entry)
        self.counters.bytes += entry.size
        self.counters.stores += 1
        while self.counters.bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.counters.evictions += 1
        self.counters.entries = len(self._entries)

    def _drop(self, key: str) -> None:
        _, entry = self._entries.pop(key)
        self.counters.bytes -= entry.size
        self.counters.entries = len(self._entries)
