"""`switchgear agent --burst-order K`: at most K HTTP requests at once between being read and
sending their first upstream attempt; the others wait their turn, first come first served. A
slot is never kept behind anything slow: it goes back when its request's first attempt starts,
when it waits on another request, on every exit (answer, error, disconnect), and `hold_s` after it
was given whatever the request still awaits (a hung Redis, here a real one stopped with SIGSTOP)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import MappingProxyType

import httpx
import pytest
import redis.asyncio as aioredis

from switchgear.dataplane import http as front_door
from switchgear.dataplane.attempts import Resilience
from switchgear.dataplane.burst_order import BUSY_WINDOW_S, BurstOrder, burst_order_arg, step_aside
from switchgear.dataplane.cache import TTL_KIND_BY_CATEGORY, MemoryCache
from switchgear.dataplane.cache_shared import ResponseCache
from switchgear.dataplane.invoke import Invoker
from switchgear.dataplane.pipeline import Pipeline
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer
from switchgear.dataplane.redis_state import RedisHealth, SharedRedis
from switchgear.dataplane.upstreams import SecretResolver
from switchgear.emulators.openai import EmulatorGroup, InstanceSpec, start_instances
from tests.servers import RedisServer, redis_server
from tests.test_stream import ADAPTERS, FirstUntried, make_agent, snapshot, view

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("value", ["-1", "65", "lots", "1.5"])
def test_a_value_out_of_range_is_refused_naming_the_flag(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from switchgear.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["agent", "--control-plane", "127.0.0.1:9", "--burst-order", value])
    assert exited.value.code == 2 and "--burst-order" in capsys.readouterr().err


def test_the_flag_reads_off_and_counts() -> None:
    assert (burst_order_arg("off"), burst_order_arg("OFF"), burst_order_arg("0"), burst_order_arg("2")) == (0, 0, 0, 2)


async def test_waiters_are_served_first_come_first_served_as_slots_are_given_up() -> None:
    order = BurstOrder(2, hold_s=30.0)
    first, second = await order.enter(), await order.enter()
    started: list[int] = []

    async def later(n: int) -> None:
        slot = await order.enter()
        started.append(n)
        order.leave(slot)

    waiting = [asyncio.ensure_future(later(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert started == [] and order.holding == 2 and order.waited == 3
    order.leave(first)
    order.leave(first)  # (again: nothing)
    await asyncio.gather(*waiting)
    assert started == [0, 1, 2] and order.holding == 1
    order.leave(second)
    assert order.holding == 0 and order.taken_back == 0


async def test_a_holder_that_never_gives_up_is_passed_after_the_hold_bound() -> None:
    order = BurstOrder(1, hold_s=0.05)
    await order.enter()  # held and never left: a request stuck before its upstream call
    began = time.monotonic()
    slot = await asyncio.wait_for(order.enter(), 5)
    assert time.monotonic() - began >= 0.04 and order.taken_back == 1
    order.leave(slot)
    assert order.holding == 0


async def test_a_cancelled_waiter_passes_a_slot_it_was_handed_on() -> None:
    order = BurstOrder(1, hold_s=30.0)
    held = await order.enter()
    cancelled = asyncio.ensure_future(order.enter())
    behind = asyncio.ensure_future(order.enter())
    await asyncio.sleep(0)
    order.leave(held)  # handed to `cancelled`, which is cancelled before it runs
    cancelled.cancel()
    slot = await asyncio.wait_for(behind, 5)
    assert order.holding == 1
    order.leave(slot)
    assert order.holding == 0


async def test_the_first_attempt_or_a_wait_on_another_request_gives_the_slot_up() -> None:
    order = BurstOrder(1, hold_s=30.0)
    async with order.slot():
        assert order.holding == 1
        order.attempt_started(None)  # (run in the request's task, as invoke.py does)
        assert order.holding == 0
        async with order.slot():
            step_aside()
            assert order.holding == 0
    assert order.holding == 0
    step_aside()  # outside any request: nothing


async def test_a_busy_loop_lets_every_request_through_and_a_quiet_one_gates_again() -> None:
    order = BurstOrder(1, hold_s=30.0, busy_share=0.01)
    held = await order.enter()  # (the first window starts)
    assert not order.passing
    loop = asyncio.get_running_loop()
    end = loop.time() + BUSY_WINDOW_S
    while loop.time() < end + 0.002:  # the loop's thread busy for a whole window, sampled just after it
        pass  # (by the wall clock: spinning for CPU time overruns the window on a busy machine)
    queued = asyncio.ensure_future(order.enter())
    through = await asyncio.wait_for(order.enter(), 1)  # samples the busy window: both go through
    assert order.passing and (await asyncio.wait_for(queued, 1)) is not None and order.holding == 3
    for slot in (held, through, queued.result()):
        order.leave(slot)
    quiet = BurstOrder(1, hold_s=30.0, busy_share=2.0)  # (no share of a core reaches it: always gated)
    first = await quiet.enter()
    await asyncio.sleep(0.06)
    behind = asyncio.ensure_future(quiet.enter())
    await asyncio.sleep(0)
    assert not quiet.passing and not behind.done()
    quiet.leave(first)
    quiet.leave(await behind)


@pytest.fixture
async def upstream() -> AsyncIterator[EmulatorGroup]:
    async with await start_instances([InstanceSpec("a")]) as group:
        yield group


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as server:
        try:
            yield server
        finally:
            server.resume()  # (a test that failed while it was paused)


@contextlib.asynccontextmanager
async def door_with(group: EmulatorGroup, order: BurstOrder, redis: RedisServer) -> AsyncIterator[str]:
    """The HTTP door's URL, `order` its gate, its response cache in `redis` (a lookup per miss: an
    await between the request's read and its upstream call, held in the slot)."""
    ttls = MappingProxyType({kind: 60.0 for kind in TTL_KIND_BY_CATEGORY.values()})
    snap = snapshot(view("chat", "openai", [group.urls["a"]], model="gpt-4o-mini"))
    snap = dataclasses.replace(snap, settings=dataclasses.replace(snap.settings, cache_enabled=True, cache_ttl_s=ttls))
    agent = make_agent(snap)
    resilience = Resilience()
    resilience.apply(snap)
    invoker = Invoker(ADAPTERS, agent.pool, SecretResolver({}), FirstUntried(resilience.gate.unavailable),  # type: ignore[arg-type]
                      observers=[order], resilience=resilience)
    client = aioredis.from_url(redis.url)
    cache = ResponseCache(MemoryCache(1 << 20), SharedRedis(client, RedisHealth(probe_interval_s=60.0)), timeout_s=8.0)
    pipeline = Pipeline(invoker.invoke, auth_required=False, quotas=QuotaEnforcer(LocalCounters()), cache=cache)
    runner, address = await front_door.start(agent.holder, invoker, agent.streamer, "127.0.0.1:0", pipeline,
                                             order=order)
    try:
        yield f"http://{address}/v1/chat/completions"
    finally:
        await runner.cleanup()
        await agent.pool.close()
        await client.aclose()


def _chat(text: str, model: str = "chat") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4}


async def test_200_concurrent_callers_complete_through_one_slot(upstream: EmulatorGroup, redis: RedisServer) -> None:
    # Each request holds its slot across its cache lookup in Redis; a slot comes back only when
    # its request's attempt starts or the request ends (the hold bound is far away): every caller
    # completing, most of them after waiting their turn, proves both, errors (404) among them.
    order = BurstOrder(1, hold_s=60.0, busy_share=2.0)
    async with door_with(upstream, order, redis) as url, \
            httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=200)) as client:
        bodies = [_chat(f"caller {i}") if i % 4 else _chat("x", model="nobody") for i in range(200)]
        answers = await asyncio.gather(*(client.post(url, json=b) for b in bodies))
    assert [a.status_code for a in answers] == [404 if i % 4 == 0 else 200 for i in range(200)]
    assert order.holding == 0 and order.taken_back == 0 and order.waited > 100


async def _stuck_holder(http: httpx.AsyncClient, url: str, order: BurstOrder, redis: RedisServer
                        ) -> asyncio.Future[httpx.Response]:
    """Redis hung (SIGSTOP) and a request holding the only slot while its lookup waits on it."""
    assert (await http.post(url, json=_chat("kept in memory"))).status_code == 200
    redis.pause()
    stuck = asyncio.ensure_future(http.post(url, json=_chat("looked up in Redis")))
    while order.holding == 0:
        await asyncio.sleep(0.005)
    return stuck


async def test_a_hung_redis_holds_a_slot_no_longer_than_the_hold_bound(
        upstream: EmulatorGroup, redis: RedisServer) -> None:
    order = BurstOrder(1, hold_s=0.1, busy_share=2.0)
    async with door_with(upstream, order, redis) as url, httpx.AsyncClient(timeout=20) as http:
        stuck = await _stuck_holder(http, url, order, redis)
        began = time.monotonic()
        hit = await http.post(url, json=_chat("kept in memory"))  # a memory hit: no Redis needed
        waited = time.monotonic() - began
        assert hit.status_code == 200 and not stuck.done()
        assert 0.05 <= waited < 4.0 and order.taken_back == 1  # passed at the bound, not at Redis's timeout
        redis.resume()
        assert (await stuck).status_code == 200


async def test_a_caller_that_disconnects_gives_its_slot_back(upstream: EmulatorGroup, redis: RedisServer) -> None:
    order = BurstOrder(1, hold_s=60.0, busy_share=2.0)
    async with door_with(upstream, order, redis) as url, httpx.AsyncClient(timeout=20) as http:
        async with httpx.AsyncClient(timeout=20) as leaving:
            stuck = await _stuck_holder(leaving, url, order, redis)
            hit = asyncio.ensure_future(http.post(url, json=_chat("kept in memory")))
            while order.waited == 0:  # queued behind the stuck one
                await asyncio.sleep(0.005)
            stuck.cancel()  # the caller goes away: its connection closes
        answer = await asyncio.wait_for(hit, 5)  # long before the hold bound (60 s) or Redis's timeout
        assert answer.status_code == 200 and order.taken_back == 0 and order.holding == 0
