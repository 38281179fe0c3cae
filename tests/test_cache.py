"""Response cache: canonical keys, TTL rules, the byte-bounded LRU, and single-flight."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from switchgear.dataplane.cache import Entry, MemoryCache, cache_key, ttl_for
from switchgear.dataplane.singleflight import SingleFlight


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def entry(body: bytes = b"{}") -> Entry:
    return Entry(body=body, service="s", endpoint="e")


def test_key_is_canonical_and_scoped() -> None:
    a = cache_key("s", "m", {"x": 1, "y": [1, 2]}, tenant="t1")
    assert a == cache_key("s", "m", {"y": [1, 2], "x": 1}, tenant="t1")  # key order does not matter
    assert a != cache_key("s", "m", {"x": 1, "y": [2, 1]}, tenant="t1")
    assert a != cache_key("s", "m", {"x": 1, "y": [1, 2]}, tenant="t2")  # tenants never share ...
    shared = cache_key("s", "m", {"x": 1}, tenant="t1", shared=True)
    assert shared == cache_key("s", "m", {"x": 1}, tenant="t2", shared=True)  # ... unless opted in
    assert a != cache_key("s2", "m", {"x": 1, "y": [1, 2]}, tenant="t1")
    assert len(a) == 64


@pytest.mark.parametrize(
    ("category", "service_ttl", "expected"),
    [("llm", None, 3600.0), ("document", None, 86400.0), ("embedding", None, 604800.0),
     ("vector_db", None, 0.0), ("knowledge_graph", None, 0.0), ("llm", 5.0, 5.0), ("vector_db", 30.0, 30.0),
     ("llm", -1.0, 0.0)],
)
def test_ttl_follows_the_seed_per_category(category: str, service_ttl: float | None, expected: float) -> None:
    seed = {"llm_responses": 3600.0, "document_parsing": 86400.0, "embeddings": 604800.0}
    assert ttl_for(category, seed, service_ttl) == expected


def test_entries_expire() -> None:
    clock = Clock()
    cache = MemoryCache(10_000, clock)
    cache.put("k", entry(), ttl_s=10)
    clock.now = 9.9
    assert cache.get("k") is not None
    clock.now = 10.0
    assert cache.get("k") is None
    assert cache.counters.expirations == 1 and cache.counters.bytes == 0


def test_lru_evicts_least_recently_used_within_the_byte_bound() -> None:
    cache = MemoryCache(3 * entry(b"x" * 100).size, Clock())
    for key in "abc":
        cache.put(key, entry(b"x" * 100), ttl_s=60)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", entry(b"x" * 100), ttl_s=60)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.counters.evictions == 1


def test_zero_ttl_and_oversized_entries_are_not_stored() -> None:
    cache = MemoryCache(1000, Clock())
    cache.put("k", entry(), ttl_s=0)
    cache.put("big", entry(b"x" * 5000), ttl_s=60)
    assert cache.counters.stores == 0 and cache.get("big") is None


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 2000)), max_size=200))
def test_memory_bound_always_holds(puts: list[tuple[int, int]]) -> None:
    bound = 8000
    cache = MemoryCache(bound, Clock())
    for key, size in puts:
        cache.put(str(key), entry(b"x" * size), ttl_s=60)
        assert cache.counters.bytes <= bound
        assert cache.counters.entries == len(cache._entries)


async def test_single_flight_makes_one_call_for_a_burst() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def upstream() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    tasks = [asyncio.ensure_future(flight.do("k", upstream)) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert [r for r, _ in results] == [42] * 50
    assert sum(shared for _, shared in results) == 49


async def test_single_flight_shares_errors_and_forgets_the_key() -> None:
    flight: SingleFlight[int] = SingleFlight()

    async def failing() -> int:
        await asyncio.sleep(0)
        raise RuntimeError("upstream down")

    results = await asyncio.gather(flight.do("k", failing), flight.do("k", failing), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)

    async def ok() -> int:
        return 1

    assert await flight.do("k", ok) == (1, False)  # not stuck on the failed flight


async def test_waiters_take_over_when_the_leader_is_cancelled() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started = asyncio.Event()

    async def slow() -> int:
        started.set()
        await asyncio.sleep(3600)
        return 0

    async def quick() -> int:
        return 7

    leader = asyncio.ensure_future(flight.do("k", slow))
    await started.wait()
    waiter = asyncio.ensure_future(flight.do("k", quick))
    await asyncio.sleep(0)
    leader.cancel()
    assert await waiter == (7, False)


def test_the_config_takes_exactly_the_ttl_kinds_agents_apply() -> None:
    """communication.caching.ttl refuses any other kind (it would be stored and never used)."""
    from switchgear.controlplane.model import CACHE_TTL_KINDS
    from switchgear.dataplane.cache import TTL_KIND_BY_CATEGORY

    assert set(CACHE_TTL_KINDS) == set(TTL_KIND_BY_CATEGORY.values())
