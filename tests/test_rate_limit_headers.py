"""A tenant's requests and tokens per minute limits told to the caller as rate-limit headers:
what an admission reads (local counters and a real Redis agree), the tightest of the tenant's
and the service's limits, the header shapes (OpenAI's on every route, Anthropic's on its own),
on answers, streams and refusals of the HTTP door and as gRPC trailers — and never for a
tenant without such limits, nor before a caller is known."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from switchgear.dataplane import http as front_door
from switchgear.dataplane.door_metrics import DoorMetrics, Edge
from switchgear.dataplane.gateway import GatewayServicer
from switchgear.dataplane.governance import Governance, Quota, TenantView
from switchgear.dataplane.http_edge import observe
from switchgear.dataplane.pipeline import Pipeline
from switchgear.dataplane.quota import Limit, LocalCounters, QuotaEnforcer, RedisCounters, limit_headers
from switchgear.dataplane.redis_state import SharedRedis
from switchgear.emulators.openai import InstanceSpec, start_instances
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc
from tests.servers import redis_server
from tests.test_stream import make_agent, snapshot, view

NOW = 1_800_000_015.0  # 15 s into a minute: its window resets in 45 s
LIMITED = TenantView(id="acme", quota=Quota(requests_per_minute=3, tokens_per_minute=1000),
                     service_quotas=MappingProxyType({"tight": Quota(requests_per_minute=2)}))
FREE = TenantView(id="free")
KEYS = {"acme": "sg-k1-acme-ratelimit-secret", "free": "sg-k2-free-ratelimit-secret"}


def _remaining(limits: tuple[Limit, ...]) -> dict[str, tuple[int, int]]:
    return {limit.what: (limit.limit, limit.remaining) for limit in limits}


async def _admissions(quotas: QuotaEnforcer) -> list[Any]:
    seen = [await quotas.admit(LIMITED, "chat")]
    quotas.note(LIMITED, "chat", 600, 0.0)
    if isinstance(quotas._counters, RedisCounters):
        await quotas._counters.flush()
    seen += [await quotas.admit(LIMITED, "chat") for _ in range(3)]
    seen += [await quotas.admit(LIMITED, "tight") for _ in range(1)]
    return seen


def _check(admissions: list[Any]) -> None:
    first, second, third, refused, other = admissions
    assert first.allowed and _remaining(first.limits) == {"tokens": (1000, 1000), "requests": (3, 2)}
    assert second.allowed and _remaining(second.limits) == {"tokens": (1000, 400), "requests": (3, 1)}
    assert third.allowed and _remaining(third.limits) == {"tokens": (1000, 400), "requests": (3, 0)}
    assert not refused.allowed and _remaining(refused.limits) == {"tokens": (1000, 400), "requests": (3, 0)}
    assert all(limit.reset_s == 45.0 for limit in first.limits)
    # another service: the tenant's minute is spent, so its refusal says none remain
    assert not other.allowed and _remaining(other.limits)["requests"][1] == 0


async def test_an_admission_reads_the_tightest_limits_locally() -> None:
    _check(await _admissions(QuotaEnforcer(LocalCounters(clock=lambda: NOW), clock=lambda: NOW)))


async def test_a_redis_admission_reads_the_same_as_a_local_one(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url)
        try:
            counters = RedisCounters(SharedRedis(client), LocalCounters(clock=lambda: NOW), timeout_s=1.0)
            _check(await _admissions(QuotaEnforcer(counters, clock=lambda: NOW)))
        finally:
            await client.aclose()


async def test_the_per_service_limit_is_told_when_it_is_the_tighter() -> None:
    quotas = QuotaEnforcer(LocalCounters(clock=lambda: NOW), clock=lambda: NOW)
    first = await quotas.admit(LIMITED, "tight")
    assert _remaining(first.limits)["requests"] == (2, 1)  # the service's 2, not the tenant's 3
    assert (await quotas.admit(FREE, "chat")).limits == ()  # no limit: nothing to tell
    budget_only = TenantView(id="b", quota=Quota(budget_per_hour_usd=1.0))
    assert (await quotas.admit(budget_only, "chat")).limits == ()


def test_header_shapes() -> None:
    limits = (Limit("requests", 3, 1, 44.2), Limit("tokens", 1000, 400, 0.3))
    headers = dict(limit_headers(limits))
    assert headers == {
        "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "45s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "400", "x-ratelimit-reset-tokens": "1s"}
    anthropic = dict(limit_headers(limits, anthropic=True))
    assert anthropic["anthropic-ratelimit-requests-remaining"] == "1"
    reset = datetime.fromisoformat(anthropic["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00"))
    assert reset.tzinfo == UTC and 40 <= (reset - datetime.now(UTC)).total_seconds() <= 46


# ---------------------------------------------------------------------------------------
# the doors


@contextlib.asynccontextmanager
async def doors() -> AsyncIterator[tuple[str, gateway_pb2_grpc.GatewayServiceStub]]:
    """Both doors, keys required, edges on (as an agent runs them), over one OpenAI emulator
    serving "chat" and "tight" (every answer's usage counted against the tenant)."""
    keys = {f"k{i}": (tenant, hashlib.sha256(secret.encode()).digest())
            for i, (tenant, secret) in enumerate(KEYS.items(), 1)}
    governance = Governance(tenants=MappingProxyType({"acme": LIMITED, "free": FREE}), keys=MappingProxyType(keys))
    async with await start_instances([InstanceSpec("a", model_ids=("gpt-4o-mini",))]) as group:
        url = group.urls["a"]
        snap = snapshot(view("chat", "openai", [url], model="gpt-4o-mini"),
                        view("tight", "openai", [url], model="gpt-4o-mini"))
        agent = make_agent(dataclasses.replace(snap, governance=governance))
        pipeline = Pipeline(agent.invoker.invoke, auth_required=True, quotas=QuotaEnforcer(LocalCounters()),
                            cache=None)
        edge = Edge(DoorMetrics(), agent.holder)
        runner, address = await front_door.start(agent.holder, agent.invoker, agent.streamer, "127.0.0.1:0",
                                                 pipeline, observe=observe(edge, None))
        from switchgear.dataplane.tracing import GatewayInterceptor
        server = grpc.aio.server(interceptors=[GatewayInterceptor(None, None, edge)])
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            GatewayServicer(agent.holder, agent.invoker, agent.streamer, pipeline), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield f"http://{address}", gateway_pb2_grpc.GatewayServiceStub(channel)
        finally:
            await channel.close()
            await server.stop(None)
            await runner.cleanup()
            await agent.pool.close()


def _chat(model: str = "chat", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def _told(headers: Any, prefix: str = "x-ratelimit-") -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(prefix)}


async def test_the_http_door_tells_each_answer_stream_and_refusal() -> None:
    async with doors() as (url, _), httpx.AsyncClient(base_url=url) as client:
        acme = {"Authorization": f"Bearer {KEYS['acme']}"}
        first = await client.post("/v1/chat/completions", headers=acme, json=_chat())
        assert first.status_code == 200
        told = _told(first.headers)
        assert (told["x-ratelimit-limit-requests"], told["x-ratelimit-remaining-requests"]) == ("3", "2")
        assert told["x-ratelimit-limit-tokens"] == "1000"
        assert re.fullmatch(r"[0-9]+s", told["x-ratelimit-reset-requests"])
        async with client.stream("POST", "/v1/chat/completions", headers=acme, json=_chat(stream=True)) as stream:
            assert stream.status_code == 200 and _told(stream.headers)["x-ratelimit-remaining-requests"] == "1"
            assert int(_told(stream.headers)["x-ratelimit-remaining-tokens"]) < 1000  # the first answer's tokens
            await stream.aread()
        messages = await client.post("/v1/messages", headers={"x-api-key": KEYS["acme"]},
                                     json={"model": "chat", "max_tokens": 20,
                                           "messages": [{"role": "user", "content": "hi"}]})
        assert messages.status_code == 200
        assert _told(messages.headers, "anthropic-ratelimit-")["anthropic-ratelimit-requests-remaining"] == "0"
        refused = await client.post("/v1/chat/completions", headers=acme, json=_chat())
        assert refused.status_code == 429 and "retry-after" in refused.headers
        assert _told(refused.headers)["x-ratelimit-remaining-requests"] == "0"
        assert refused.json()["error"]["message"]  # the door's own error shape still

        free = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS['free']}"},
                                 json=_chat())
        assert free.status_code == 200 and _told(free.headers) == {}  # no limits: none told
        anonymous = await client.post("/v1/chat/completions", json=_chat())
        forged = await client.post("/v1/chat/completions", headers={"Authorization": "Bearer sg-k1-forged"},
                                   json=_chat())
        for answer in (anonymous, forged):  # no caller known: nothing about anyone's limits
            assert answer.status_code == 401 and _told(answer.headers) == {}


async def test_the_grpc_door_tells_them_as_trailers() -> None:
    async with doors() as (_, stub):
        metadata = (("authorization", f"Bearer {KEYS['acme']}"),)
        payload = b'{"messages": [{"role": "user", "content": "hi"}]}'
        streamed = stub.InvokeStream(gateway_pb2.InvokeStreamRequest(request=gateway_pb2.InvokeRequest(
            service="chat", method="chat.completions", payload=payload)), metadata=metadata, timeout=10)
        async for _ in streamed:
            pass
        trailers = dict(await streamed.trailing_metadata() or ())
        assert (trailers["x-ratelimit-limit-requests"], trailers["x-ratelimit-remaining-requests"]) == ("3", "2")
        request = gateway_pb2.InvokeRequest(service="tight", method="chat.completions", payload=payload)
        call = stub.Invoke(request, metadata=metadata, timeout=10)
        await call
        trailers = dict(await call.trailing_metadata() or ())
        # one left of both the tenant's 3 and the service's 2: the smaller limit is the one told
        assert (trailers["x-ratelimit-limit-requests"], trailers["x-ratelimit-remaining-requests"]) == ("2", "1")
        await stub.Invoke(request, metadata=metadata, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Invoke(request, metadata=metadata, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(refused.value.trailing_metadata() or ())
        assert trailers["x-ratelimit-remaining-requests"] == "0" and "retry-after" in trailers
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.Invoke(request, timeout=10)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not [k for k, _ in anonymous.value.trailing_metadata() or () if k.startswith("x-ratelimit")]


@pytest.mark.parametrize("odd", [b"nan", b"inf", b"-inf", b"-500", b"1e400", b"7.5", b"0x10", b" 12 "])
async def test_an_odd_counter_in_redis_still_gives_well_formed_limits(tmp_path: Path, odd: bytes) -> None:
    """A counter another writer left odd (Lua's tonumber takes "nan", "-inf" and "0x10", which
    Python's float and int do not) is no 500 for every limited tenant: each limit stays an
    integer from 0 to its limit."""
    with redis_server(tmp_path) as server:
        client = aioredis.from_url(server.url)
        try:
            counters = RedisCounters(SharedRedis(client), LocalCounters(clock=lambda: NOW), timeout_s=1.0)
            quotas = QuotaEnforcer(counters, clock=lambda: NOW)
            await quotas.admit(LIMITED, "chat")
            quotas.note(LIMITED, "chat", 10, 0.0)
            await counters.flush()
            # the tokens counter is read (a check); the requests counter is added to (a count)
            keys = [k async for k in client.scan_iter("*acme|*|tok/*")]
            assert keys
            for key in keys:
                await client.set(key, odd)
            admission = await quotas.admit(LIMITED, "chat")
            assert admission.limits, admission
            for limit in admission.limits:
                assert isinstance(limit.remaining, int) and 0 <= limit.remaining <= limit.limit, admission
            for name, value in limit_headers(admission.limits, anthropic=True):
                assert re.fullmatch(r"[0-9]+s?|[0-9T:-]+Z", value), (name, value)
        finally:
            await client.aclose()
