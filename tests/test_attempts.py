"""The per-call attempt controller in-process: one controller for unary and streamed calls
(breakers, deadline-bounded Retry-After), the task-queue fallback, and shedding at both doors."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from types import MappingProxyType
from typing import Any

import grpc
import orjson
import pytest

from switchgear.dataplane.attempts import Resilience
from switchgear.dataplane.convert import Call, call_from_proto
from switchgear.dataplane.invoke import CallFailed, Invoker
from switchgear.dataplane.snapshot import (
    AgentSettings,
    AgentSnapshot,
    EndpointView,
    Holder,
    RetrySettings,
    SchedulingPolicy,
)
from switchgear.dataplane.stream import StreamEnd, Streamer
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.emulators.openai import EmulatorGroup, Faults
from switchgear.v1 import gateway_pb2
from tests import test_stream
from tests.test_stream import ADAPTERS, CHAT, Agent, FirstUntried, Recorder, stream_request, view
from tests.test_stream import snapshot as make_snapshot

emulators = test_stream.emulators  # the same fixtures: two OpenAI emulator instances, a gRPC server
stub_for = test_stream.stub_for

pytestmark = pytest.mark.timeout(30)


def agent_for(snap: AgentSnapshot, defer: Any = None) -> Agent:
    holder, pool, recorder = Holder(), ClientPool(), Recorder()
    holder.current = snap
    secrets = SecretResolver({})
    resilience = Resilience()
    resilience.apply(snap)  # as the agent does for every applied snapshot
    picker = FirstUntried(resilience.gate.unavailable)
    invoker = Invoker(ADAPTERS, pool, secrets, picker, observers=[recorder], resilience=resilience,  # type: ignore[arg-type]
                      defer=defer)
    streamer = Streamer(ADAPTERS, pool, secrets, picker.pick, observers=[recorder], resilience=resilience)
    return Agent(holder, invoker, streamer, recorder, pool)


def call(service: str, method: str = "chat.completions", timeout_s: float = 0.0, request_id: str = "r1") -> Call:
    return dataclasses.replace(call_from_proto(stream_request(service, CHAT, method).request), timeout_s=timeout_s,
                               request_id=request_id)


async def test_streams_go_through_the_same_breakers(emulators: EmulatorGroup) -> None:
    emulators.set_faults("a", Faults(error_rate=1.0, error_status=503))
    snap = dataclasses.replace(
        make_snapshot(view("chat", "openai", [emulators.urls["a"], emulators.urls["b"]], model="gpt-4o-mini")),
        settings=AgentSettings(retry=RetrySettings(max_retries=2), breaker_failure_threshold=2))
    agent = agent_for(snap)
    for _ in range(4):
        items = [i async for i in agent.streamer.stream(call("chat"), snap)]
        end = items[-1]
        assert isinstance(end, StreamEnd) and end.endpoint == "e1" and end.error is None
    assert emulators.stats("a")["total"] == 2  # the breaker opened after 2 failures: a is no longer tried
    counters = agent.invoker.resilience.counters()
    assert counters[("chat", "e0")]["trips"] == 1 and counters[("chat", "e0")]["failovers"] == 2
    assert agent.streamer.resilience is agent.invoker.resilience
    await agent.pool.close()


async def test_retry_after_past_the_deadline_is_not_waited_for(emulators: EmulatorGroup) -> None:
    emulators.set_faults("a", Faults(rate_limit_rate=1.0, retry_after_s=5))
    snap = make_snapshot(view("chat", "openai", [emulators.urls["a"]], model="gpt-4o-mini"))
    agent = agent_for(snap)
    start = time.monotonic()
    with pytest.raises(CallFailed) as info:
        await agent.invoker.invoke(call("chat", timeout_s=1.0), snap)
    assert time.monotonic() - start < 0.5  # gives up at once: waiting 5 s would overrun the 1 s deadline
    assert info.value.error.kind.value == "rate_limited" and info.value.error.retry_after_s == 5
    assert "retry_after_past_deadline" in info.value.error.message or "5.000 s" in info.value.error.message
    await agent.pool.close()


@dataclasses.dataclass
class FakeDeferred:
    task_id: str

    def fallback_body(self) -> dict[str, Any]:
        return {"processed": False, "fallback": True, "task_id": self.task_id, "queue_id": "queue_r1"}


def document_snapshot(url: str) -> AgentSnapshot:
    return make_snapshot(view("parse", "openai", [url], category="document", model="gpt-4o-mini"), max_retries=0)


async def test_document_fallback_defers_to_the_task_queue() -> None:
    deferred: list[tuple[str, str]] = []

    async def defer(c: Call, reason: str) -> FakeDeferred:
        deferred.append((c.request_id, reason))
        return FakeDeferred("t-1")

    snap = document_snapshot("http://127.0.0.1:9/v1")
    agent = agent_for(snap, defer)
    result = await agent.invoker.invoke(call("parse"), snap)
    assert (result.fallback, result.fallback_source, result.service, result.endpoint) == (True, "task_queue",
                                                                                          "parse", "")
    assert orjson.loads(result.body)["task_id"] == "t-1"
    assert deferred[0][0] == "r1" and deferred[0][1].startswith("connect: ")
    assert agent.invoker.resilience.counters()[("parse", "")]["fallbacks"] == 1
    with pytest.raises(CallFailed) as info:  # a task's own call is never deferred again
        await agent.invoker.invoke(call("parse", request_id="sgtask:t-1-1"), snap)
    assert info.value.error.kind.value == "connect" and len(deferred) == 1
    await agent.pool.close()


async def test_document_fallback_without_a_task_queue_or_when_it_fails_is_unavailable() -> None:
    async def broken(c: Call, reason: str) -> FakeDeferred:
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   "control plane down")

    snap = document_snapshot("http://127.0.0.1:9/v1")
    for defer, words in ((None, "no task queue is configured"), (broken, "control plane down")):
        agent = agent_for(snap, defer)
        with pytest.raises(CallFailed) as info:
            await agent.invoker.invoke(call("parse"), snap)
        assert info.value.error.kind.value == "connect" and words in info.value.error.message
        await agent.pool.close()


async def test_a_deferral_refused_for_the_tenants_task_quota_is_a_429_to_that_tenant() -> None:
    """The control plane holds a tenant at its unfinished tasks (RESOURCE_EXHAUSTED): the caller
    hears its own quota (429 with Retry-After), not an outage (503)."""
    from switchgear.dataplane.http import render
    from switchgear.dataplane.outcome import refusal
    from switchgear.dataplane.quota import QuotaExceeded

    details = "tenant 'acme' has 5 unfinished tasks (resource_allocation.max_tasks_per_tenant = 5)"

    async def full(c: Call, reason: str) -> FakeDeferred:
        raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details)

    snap = document_snapshot("http://127.0.0.1:9/v1")
    agent = agent_for(snap, full)
    with pytest.raises(QuotaExceeded) as info:
        await agent.invoker.invoke(call("parse"), snap)
    answer = render(refusal(info.value))
    assert (answer.status, answer.headers["Retry-After"]) == (429, "5")
    assert details in answer.message and "not queued for later" in answer.message
    await agent.pool.close()


async def test_shed_calls_are_resource_exhausted_with_retry_after(emulators: EmulatorGroup, stub_for: Any) -> None:
    emulators.set_faults("a", Faults(latency_ms=400))
    service = view("chat", "openai", [emulators.urls["a"]], model="gpt-4o-mini")
    service = dataclasses.replace(service, endpoints=(EndpointView("e0", emulators.urls["a"], max_concurrency=1),))
    snap = dataclasses.replace(make_snapshot(service), settings=AgentSettings(
        category_policies=MappingProxyType({"llm": SchedulingPolicy(max_queue_size=1)})))
    agent = agent_for(snap)
    stub = await stub_for(agent)
    request = gateway_pb2.InvokeRequest(service="chat", method="chat.completions", payload=orjson.dumps(CHAT))
    results = await asyncio.gather(*(stub.Invoke(request, timeout=5)
                                     for _ in range(3)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(errors) == 1 and errors[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(errors[0].trailing_metadata() or ())
    assert int(trailers["retry-after"]) >= 1 and trailers["switchgear-shed"] == "queue_full"
    assert agent.invoker.resilience.counters()[("chat", "e0")]["sheds"] == 1
    await agent.pool.close()


def test_http_front_door_maps_a_shed_to_429_with_retry_after() -> None:
    from switchgear.dataplane.http import render
    from switchgear.dataplane.outcome import refusal
    from switchgear.dataplane.resilience.admission import Rejection, ShedReason
    from switchgear.dataplane.resilience.admission_edge import Shed

    full = render(refusal(Shed(Rejection(1, "chat", "e0", 1, ShedReason.QUEUE_FULL, 0.3))))
    assert (full.status, full.headers["Retry-After"], full.code) == (429, "1", "overloaded")
    late = render(refusal(Shed(Rejection(2, "chat", "e0", 1, ShedReason.DEADLINE, 2.5))))
    assert (late.status, late.headers["Retry-After"]) == (504, "3")


async def test_availability_is_consulted_once_per_pick_through_the_routers_gate(emulators: EmulatorGroup) -> None:
    """The Router is built with the gate; the controller takes its breaker ticket without
    asking again (issue: resilience consulted on both sides of the router)."""
    from switchgear.dataplane.resilience.breaker import CircuitBreaker
    from switchgear.dataplane.router import Router

    emulators.set_faults("a", Faults(error_rate=1.0, error_status=503))
    snap = dataclasses.replace(
        make_snapshot(view("chat", "openai", [emulators.urls["a"], emulators.urls["b"]], model="gpt-4o-mini")),
        settings=AgentSettings(retry=RetrySettings(max_retries=2), breaker_failure_threshold=1))
    holder, pool, recorder = Holder(), ClientPool(), Recorder()
    holder.current = snap
    resilience = Resilience()
    resilience.apply(snap)
    consulted: list[str] = []
    gate_unavailable = resilience.gate.unavailable

    def unavailable(key: str) -> bool:
        consulted.append(key)
        return gate_unavailable(key)

    router = Router(unavailable=unavailable, holder=holder)
    invoker = Invoker(ADAPTERS, pool, SecretResolver({}), router, observers=[recorder], resilience=resilience)
    asked_again: list[float] = []
    original = CircuitBreaker.would_allow

    def would_allow(self: CircuitBreaker, now: float) -> bool:
        asked_again.append(now)
        return original(self, now)

    CircuitBreaker.would_allow = would_allow  # type: ignore[method-assign]
    try:
        for i in range(3):
            result = await invoker.invoke(call("chat", request_id=f"r{i}"), snap)
            assert result.endpoint == "e1"
    finally:
        CircuitBreaker.would_allow = original  # type: ignore[method-assign]
    # e0 failed once and its breaker opened: from then on the gate (inside the pick) refuses it
    # and the controller never hands out a ticket for it or asks its breaker a second time.
    assert emulators.stats("a")["total"] == 1
    assert asked_again == []
    assert consulted.count("chat/e1") >= 3 and set(consulted) <= {"chat/e0", "chat/e1"}
    await pool.close()


async def test_a_new_snapshot_s_retry_policy_applies_to_the_same_service_view(emulators: EmulatorGroup) -> None:
    """A service's endpoint ids and backoff policy are kept per view and retry settings: the
    same view under a snapshot with other retry settings gets those on its next call."""
    emulators.set_faults("a", Faults(error_rate=1.0, error_status=503))
    base = make_snapshot(view("chat", "openai", [emulators.urls["a"]], model="gpt-4o-mini"))

    def retrying(n: int) -> AgentSnapshot:
        return dataclasses.replace(base, settings=AgentSettings(
            retry=RetrySettings(n, "fixed", 0.01, 0.01), breaker_failure_threshold=100))

    agent = agent_for(retrying(2))
    sent = []
    for snap in (retrying(2), retrying(0), retrying(1)):
        before = emulators.stats("a")["total"]
        with pytest.raises(CallFailed):
            await agent.invoker.invoke(call("chat", timeout_s=5.0), snap)
        sent.append(emulators.stats("a")["total"] - before)
    assert sent == [3, 1, 2]
    await agent.pool.close()
