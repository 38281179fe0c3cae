"""Attempts waiting on a first token from an endpoint judged silent fail over at once
(dataplane/abandon.py), on Invoke (a whole answer streamed upstream) and InvokeStream.

In-process agents over the OpenAI emulator (tests/test_stream_upstream.py's): endpoint e0 takes
calls and never answers them (fault `hang`), e1 answers. The judgement is what filters.not_silent
tells the routing statistics at a pick (`LiveStats.judged_silent(key, True)`); the first-token
attempt timeout is the llm floor, 5 s, so an attempt that ends well before it was abandoned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine
from types import MappingProxyType
from typing import Any

import pytest

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.abandon import QUIET_S
from switchgear.dataplane.invoke import CallFailed
from switchgear.dataplane.scheduling.model import candidate_key
from switchgear.dataplane.scheduling.stats import EndpointStats
from switchgear.dataplane.snapshot import AgentSnapshot, SchedulingPolicy
from switchgear.dataplane.stream import StreamEnd
from switchgear.emulators.openai import EmulatorGroup, Faults
from tests import test_stream
from tests.test_stream import view
from tests.test_stream_upstream import REQUESTS, Agent, chat_call, until

pytestmark = pytest.mark.timeout(30)
emulators = test_stream.emulators  # fixture: OpenAI instances a and b

E0 = candidate_key("chat", "e0")
PLAIN: dict[str, Any] = REQUESTS["plain"]  # type: ignore[assignment]
Door = Callable[[Agent, AgentSnapshot, str], Coroutine[Any, Any, str]]  # one call; the endpoint that served it


async def by_invoke(agent: Agent, snapshot: AgentSnapshot, request_id: str) -> str:
    result = await agent.invoker.invoke(chat_call("chat", PLAIN, request_id, timeout_s=20), snapshot)
    assert result.body
    return result.endpoint


async def by_stream(agent: Agent, snapshot: AgentSnapshot, request_id: str) -> str:
    items = [i async for i in agent.streamer.stream(chat_call("chat", PLAIN, request_id, timeout_s=20),
                                                   snapshot)]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.error is None and any(isinstance(i, bytes) for i in items)
    return end.endpoint


DOORS: dict[str, Door] = {"invoke": by_invoke, "stream": by_stream}


def hung_agent(emulators: EmulatorGroup, floor_s: float = 5.0) -> tuple[Agent, EndpointStats]:
    """e0 hangs; its history (forty ~10 ms first tokens) makes its first-token timeout the floor."""
    agent = Agent(view("chat", "openai", [emulators.urls["a"], emulators.urls["b"]], model="gpt-4o-mini"),
                  stream_upstream=True, policy=SchedulingPolicy(stream_upstream=True, attempt_timeout_floor_s=floor_s))
    a = agent.live.get(E0)
    for _ in range(40):
        a.recent.record(1.0)
        a.recent_ttft.record(0.01)
    emulators.set_faults("a", Faults(hang=True))
    return agent, a


@pytest.mark.parametrize("door", list(DOORS))
async def test_a_swallowed_attempt_fails_over_at_the_judgement(emulators: EmulatorGroup, door: str) -> None:
    agent, a = hung_agent(emulators)
    call = asyncio.create_task(DOORS[door](agent, agent.snapshot, "swallowed"))
    await until(lambda: bool(a.awaiting_first))
    await asyncio.sleep(0.2)  # it waits: no first token, and nothing ends it yet
    assert not call.done()
    judged = time.monotonic()
    agent.live.judged_silent(E0, True)
    assert await call == "e1"
    assert time.monotonic() - judged < 1.0
    first = agent.recorder.ended[0]
    assert first.endpoint == "e0" and first.error is ErrorKind.TIMEOUT and not first.cancelled
    assert agent.invoker.resilience.counters()[("chat", "e0")]["attempt_timeouts"] == 1
    assert not a.awaiting_first and not a.outstanding and agent.invoker.resilience.waits.count == 0
    await agent.pool.close()


@pytest.mark.parametrize("door", list(DOORS))
async def test_the_abandoned_attempt_s_error_says_why_without_the_address(emulators: EmulatorGroup,
                                                                          door: str) -> None:
    agent, a = hung_agent(emulators)
    chat = agent.snapshot.services["chat"]
    only_a = AgentSnapshot(agent.snapshot.version,
                           MappingProxyType({"chat": dataclasses.replace(chat, endpoints=chat.endpoints[:1])}),
                           agent.snapshot.settings)
    call = asyncio.create_task(DOORS[door](agent, only_a, "alone"))
    await until(lambda: bool(a.awaiting_first))
    agent.live.judged_silent(E0, True)
    with pytest.raises(CallFailed) as failed:
        await call
    message = str(failed.value)
    assert "endpoint e0: judged silent, no first token in" in message, message
    assert "127.0.0.1" not in message and emulators.urls["a"] not in message
    await agent.pool.close()


@pytest.mark.parametrize("door", list(DOORS))
async def test_a_probe_keeps_its_own_first_token_timeout(emulators: EmulatorGroup, door: str) -> None:
    """An attempt sent while its endpoint is judged silent is the probe: a judgement that begins
    again while it waits does not cut it short; it ends at its first-token timeout (0.6 s here)."""
    agent, a = hung_agent(emulators, floor_s=0.6)
    agent.live.judged_silent(E0, True)
    started = time.monotonic()
    probe = asyncio.create_task(DOORS[door](agent, agent.snapshot, "probe"))
    await until(lambda: bool(a.awaiting_first))
    agent.live.judged_silent(E0, False)
    agent.live.judged_silent(E0, True)
    assert await probe == "e1"
    assert time.monotonic() - started >= 0.6
    first = agent.recorder.ended[0]
    assert first.endpoint == "e0" and first.error is ErrorKind.TIMEOUT and first.latency_s >= 0.6
    await agent.pool.close()


@pytest.mark.parametrize("judged_first", [False, True])
@pytest.mark.parametrize("door", list(DOORS))
async def test_a_caller_s_cancel_still_counts_nowhere(emulators: EmulatorGroup, door: str,
                                                      judged_first: bool) -> None:
    """The caller goes away in the same instant the endpoint is judged silent (either order):
    the call is cancelled, not failed over, and the attempt is no outcome of the endpoint."""
    agent, a = hung_agent(emulators)
    call = asyncio.create_task(DOORS[door](agent, agent.snapshot, "gone"))
    await until(lambda: bool(a.awaiting_first))
    if judged_first:
        agent.live.judged_silent(E0, True)
    call.cancel()
    if not judged_first:
        agent.live.judged_silent(E0, True)
    with pytest.raises(asyncio.CancelledError):
        await call
    ended: list[Any] = agent.recorder.ended
    assert len(ended) == 1 and ended[0].cancelled and ended[0].error is None
    assert agent.invoker.resilience.counters().get(("chat", "e0"), {}).get("attempt_timeouts", 0) == 0
    assert a.window.counts(time.monotonic()) == (0, 0) and a.failing == 0
    assert emulators.stats("b")["total"] == 0  # never failed over
    await agent.pool.close()


async def test_an_endpoint_that_still_answers_is_a_queue_and_keeps_its_waiting_attempts(
    emulators: EmulatorGroup,
) -> None:
    """Judged silent while it completed an answer less than QUIET_S ago (slots taken by long
    answers: a queue), its waiting attempt is left alone; at a later pick that finds it silent
    and quiet, the attempt fails over."""
    agent, a = hung_agent(emulators)
    call = asyncio.create_task(by_invoke(agent, agent.snapshot, "queued"))
    await until(lambda: bool(a.awaiting_first))
    a.last_sample_at = agent.live.clock()  # it just answered another call
    agent.live.judged_silent(E0, True)
    await asyncio.sleep(0.3)
    assert not call.done() and agent.invoker.resilience.waits.waiting_on(E0)
    a.last_sample_at = agent.live.clock() - QUIET_S  # and nothing since
    judged = time.monotonic()
    agent.live.judged_silent(E0, True)  # the next pick that finds it silent
    assert await call == "e1"
    assert time.monotonic() - judged < 1.0
    await agent.pool.close()
