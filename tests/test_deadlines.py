"""Time limits on one shared timer (dataplane/deadlines.py): every deadline kept without a timer
armed and dropped per call; and the write-behind flush's delay (redis_round.py) after a round."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from switchgear.dataplane.deadlines import Deadlines
from switchgear.dataplane.redis_round import RedisRound
from switchgear.dataplane.redis_state import SharedRedis
from tests.servers import redis_server


async def test_a_block_past_its_deadline_raises_timeout_error_and_one_within_it_does_not() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadlines.within(0.05):
            await asyncio.Event().wait()
    assert 0.05 <= loop.time() - started < 1.0
    async with deadlines.within(5.0) as block:
        await asyncio.sleep(0)
    assert not block.expired and deadlines.running == 0


async def test_a_later_block_with_an_earlier_deadline_is_not_held_up_by_the_armed_timer() -> None:
    """The timer armed for a 30 s block must not delay a 0.05 s block entered after it."""
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    long_entered = asyncio.Event()

    async def long() -> str:
        async with deadlines.within(30.0):
            long_entered.set()
            await asyncio.sleep(0.3)
        return "done"

    task = asyncio.ensure_future(long())
    await long_entered.wait()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadlines.within(0.05):
            await asyncio.Event().wait()
    assert loop.time() - started < 0.25  # well before the long block's own end
    assert await task == "done"  # the long block was not cut short
    assert deadlines.running == 0


async def test_many_blocks_share_the_timer_and_each_expires_on_its_own_deadline() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def waits(timeout_s: float) -> float:
        try:
            async with deadlines.within(timeout_s):
                await asyncio.Event().wait()
        except TimeoutError:
            return loop.time() - started
        raise AssertionError("no timeout")

    ended = await asyncio.gather(*(waits(t) for t in (0.2, 0.05, 0.1)))
    assert ended[1] < ended[2] < ended[0]
    assert [e >= t for e, t in zip(ended, (0.2, 0.05, 0.1), strict=True)] == [True, True, True]


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    deadlines = Deadlines()
    entered = asyncio.Event()

    async def blocked() -> None:
        async with deadlines.within(30.0):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(blocked())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadlines.running == 0


async def test_a_cancellation_arriving_with_the_deadline_is_not_swallowed() -> None:
    """Cancelled from outside while its deadline expires: the caller's cancellation wins (as
    asyncio.timeout: a timeout is raised only when the deadline was the only canceller)."""
    deadlines = Deadlines()
    entered = asyncio.Event()

    async def blocked() -> None:
        async with deadlines.within(0.05):
            entered.set()
            try:
                await asyncio.Event().wait()
            finally:
                asyncio.current_task().cancel()  # type: ignore[union-attr]  # another canceller
                await asyncio.sleep(0)

    task = asyncio.ensure_future(blocked())
    await entered.wait()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_write_behind_work_queued_after_a_round_is_still_flushed_after_the_delay(tmp_path: Path) -> None:
    """Work queued after a round took the earlier work is flushed its own delay after it was
    queued (not at the earlier work's time), without another round."""
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url)
        rounds = RedisRound(SharedRedis(client), flush_after_s=0.2)
        loop = asyncio.get_running_loop()
        rounds.add("sg:q:first", 1.0, 60)
        await rounds.run("quota", 1.0)  # takes "first"
        await asyncio.sleep(0.1)
        queued = loop.time()
        rounds.add("sg:q:second", 2.0, 60)
        while rounds.pending != (0, 0):
            assert loop.time() - queued < 2.0, "never flushed"
            await asyncio.sleep(0.01)
        flushed = loop.time() - queued
        assert flushed >= 0.19  # not at the first timer's time (0.1 s after "second" was queued)
        assert rounds.flushing is not None
        await rounds.flushing
        assert float(await client.get("sg:q:second")) == 2.0
        await rounds.aclose()
        await client.aclose()
