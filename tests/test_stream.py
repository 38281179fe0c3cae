"""Gateway.InvokeStream in-process: chunks, usage and cost, TTFT, failover only before the first token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import grpc
import orjson
import pytest

from switchgear.adapters import builtin_adapters
from switchgear.dataplane.attempts import Resilience
from switchgear.dataplane.convert import call_from_proto
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.gateway import GatewayServicer
from switchgear.dataplane.invoke import Invoker
from switchgear.dataplane.snapshot import (
    AgentSettings,
    AgentSnapshot,
    EndpointView,
    Holder,
    Pricing,
    RetrySettings,
    ServiceView,
)
from switchgear.dataplane.stream import Streamer
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.emulators import anthropic as anthropic_emu
from switchgear.emulators.common import Running
from switchgear.emulators.openai import EmulatorGroup, Faults, InstanceSpec, start_instances
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc

ADAPTERS = builtin_adapters()


class FirstUntried:
    """A deterministic pick: endpoints in order, skipping those tried and those the gate it
    was given refuses (the Router's contract: availability is consulted in the pick)."""

    def __init__(self, unavailable: Callable[[str], bool] = lambda _key: False) -> None:
        self.unavailable = unavailable

    def pick(self, service: ServiceView, exclude: Collection[str] = (), **_: Any) -> EndpointView | None:
        return next((e for e in service.endpoints
                     if e.id not in exclude and not self.unavailable(f"{service.name}/{e.id}")), None)


@dataclass
class Recorder:
    started: list[AttemptStart] = field(default_factory=list)
    ended: list[AttemptEnd] = field(default_factory=list)

    def attempt_started(self, event: AttemptStart) -> None:
        self.started.append(event)

    def attempt_ended(self, event: AttemptEnd) -> None:
        self.ended.append(event)


def view(
    name: str,
    protocol: str,
    urls: Sequence[str],
    *,
    category: str = "llm",
    model: str = "",
    pricing: Pricing | None = None,
    options: dict[str, Any] | None = None,
) -> ServiceView:
    return ServiceView(
        name=name,
        category=category,
        protocol=protocol,
        endpoints=tuple(EndpointView(id=f"e{i}", url=u) for i, u in enumerate(urls)),
        model=model,
        pricing=pricing or Pricing(),
        options=ADAPTERS[protocol].parse_options(options or {}),
    )


def snapshot(*services: ServiceView, max_retries: int = 2) -> AgentSnapshot:
    return AgentSnapshot(
        "1.test",
        MappingProxyType({s.name: s for s in services}),
        AgentSettings(retry=RetrySettings(max_retries=max_retries)),
    )


@dataclass
class Agent:
    holder: Holder
    invoker: Invoker
    streamer: Streamer
    recorder: Recorder
    pool: ClientPool


def make_agent(snap: AgentSnapshot, env: dict[str, str] | None = None) -> Agent:
    holder, pool, recorder = Holder(), ClientPool(), Recorder()
    holder.current = snap
    secrets = SecretResolver(env or {})
    resilience = Resilience()
    resilience.apply(snap)  # as the agent does for every applied snapshot
    picker = FirstUntried(resilience.gate.unavailable)
    invoker = Invoker(ADAPTERS, pool, secrets, picker, observers=[recorder], resilience=resilience)  # type: ignore[arg-type]
    streamer = Streamer(ADAPTERS, pool, secrets, picker.pick, observers=[recorder], resilience=resilience)
    return Agent(holder, invoker, streamer, recorder, pool)


@pytest.fixture
async def emulators() -> AsyncIterator[EmulatorGroup]:
    async with await start_instances([InstanceSpec("a"), InstanceSpec("b")]) as group:
        yield group


@pytest.fixture
async def claude() -> AsyncIterator[Running]:
    async with await anthropic_emu.start() as running:
        yield running


@pytest.fixture
async def stub_for() -> AsyncIterator[Any]:
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def make(agent: Agent) -> gateway_pb2_grpc.GatewayServiceStub:
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            GatewayServicer(agent.holder, agent.invoker, agent.streamer), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return gateway_pb2_grpc.GatewayServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(None)


def stream_request(
    service: str, payload: dict[str, Any], method: str = "chat.completions"
) -> gateway_pb2.InvokeStreamRequest:
    return gateway_pb2.InvokeStreamRequest(
        request=gateway_pb2.InvokeRequest(
            request_id="r1", service=service, method=method, payload=orjson.dumps(payload)
        )
    )


CHAT = {"messages": [{"role": "user", "content": "tell me"}]}


async def collect(call: Any) -> tuple[list[bytes], gateway_pb2.InvokeStreamEnd | None]:
    chunks: list[bytes] = []
    end = None
    async for message in call:
        if message.WhichOneof("event") == "chunk":
            chunks.append(message.chunk)
        else:
            end = message.end
    return chunks, end


async def test_openai_stream_chunks_then_end_with_usage_cost_and_ttft(emulators: EmulatorGroup, stub_for: Any) -> None:
    price = Pricing(input_cost_per_1k_tokens=1.0, output_cost_per_1k_tokens=2.0)
    agent = make_agent(snapshot(view("chat", "openai", [emulators.urls["a"]], model="gpt-4o-mini", pricing=price)))
    stub = await stub_for(agent)
    chunks, end = await collect(stub.InvokeStream(stream_request("chat", CHAT)))
    text = "".join(orjson.loads(c)["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.startswith("Hello from a")
    assert end is not None and end.endpoint == "e0" and end.attempts == 1 and not end.failover
    assert end.usage.output_tokens > 0 and not end.usage.estimated and end.finish_reason == "stop"
    assert end.usage.cost_usd == pytest.approx((end.usage.input_tokens * 1.0 + end.usage.output_tokens * 2.0) / 1000)
    assert end.ttft.ToNanoseconds() > 0 and end.error_kind == ""
    [ended] = agent.recorder.ended
    assert (
        ended.ttft_s is not None and ended.ttft_s > 0 and ended.error is None and ended.cost_usd == end.usage.cost_usd
    )
    [started] = agent.recorder.started
    assert started.streamed  # a stream reports its first token: routing may judge its silence
    await agent.pool.close()


async def test_failure_before_first_token_fails_over(emulators: EmulatorGroup, stub_for: Any) -> None:
    emulators.set_faults("a", Faults(fail_next=1, error_status=503))
    agent = make_agent(
        snapshot(view("chat", "openai", [emulators.urls["a"], emulators.urls["b"]], model="gpt-4o-mini"))
    )
    chunks, end = await collect((await stub_for(agent)).InvokeStream(stream_request("chat", CHAT)))
    assert end is not None and end.endpoint == "e1" and end.attempts == 2 and end.failover
    text = "".join(orjson.loads(c)["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.startswith("Hello from b") and "from a" not in text
    assert [e.error.value if e.error else None for e in agent.recorder.ended] == ["retryable", None]
    await agent.pool.close()


async def test_failure_after_first_token_ends_the_stream_without_failover(
    emulators: EmulatorGroup, stub_for: Any
) -> None:
    emulators.set_faults("a", Faults(stream_cut_after=2))
    agent = make_agent(
        snapshot(view("chat", "openai", [emulators.urls["a"], emulators.urls["b"]], model="gpt-4o-mini"))
    )
    call = (await stub_for(agent)).InvokeStream(stream_request("chat", CHAT))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(call)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no failover possible" in (caught.value.details() or "")
    trailers = dict(caught.value.trailing_metadata() or ())
    assert trailers["switchgear-stream-interrupted"] == "after-first-token"
    assert emulators.stats("b")["total"] == 0
    # the same through the Streamer directly: its last item is the StreamEnd naming the error
    agent2 = make_agent(agent.holder.current)  # type: ignore[arg-type]
    items = [
        i
        async for i in agent2.streamer.stream(
            call_from_proto(stream_request("chat", CHAT).request), agent.holder.current
        )
    ]  # type: ignore[arg-type]
    end = items[-1]
    assert end.error is not None and end.error.kind.value == "retryable" and end.endpoint == "e0"  # type: ignore[union-attr]
    assert sum(1 for i in items if isinstance(i, bytes)) >= 2
    # charged for what was forwarded, as a stream the caller cuts: the prompt and the text sent, estimated
    usage = end.usage  # type: ignore[union-attr]
    assert usage.estimated and usage.input_tokens >= 1 and usage.output_tokens >= 1
    await agent.pool.close()
    await agent2.pool.close()


async def test_all_endpoints_failing_before_first_token_is_a_status(emulators: EmulatorGroup, stub_for: Any) -> None:
    # Retry-After 60 s is past the 30 s deadline: no waiting, the call ends after one try each.
    emulators.set_faults("a", Faults(rate_limit_rate=1.0, retry_after_s=60))
    emulators.set_faults("b", Faults(rate_limit_rate=1.0, retry_after_s=60))
    agent = make_agent(
        snapshot(view("chat", "openai", [emulators.urls["a"], emulators.urls["b"]], model="gpt-4o-mini"))
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect((await stub_for(agent)).InvokeStream(stream_request("chat", CHAT)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(caught.value.trailing_metadata() or ())["switchgear-attempts"] == "2"
    await agent.pool.close()


async def test_anthropic_stream_as_chat_and_native(claude: Running, stub_for: Any) -> None:
    agent = make_agent(snapshot(view("claude", "anthropic", [claude.url], model="claude-3-sonnet")))
    stub = await stub_for(agent)
    chunks, end = await collect(stub.InvokeStream(stream_request("claude", {**CHAT, "max_tokens": 4})))
    assert all(orjson.loads(c)["object"] == "chat.completion.chunk" for c in chunks)
    assert end is not None and end.usage.output_tokens == 4 and end.finish_reason == "length"
    native, end2 = await collect(
        stub.InvokeStream(stream_request("claude", {**CHAT, "max_tokens": 4}, method="messages"))
    )
    assert orjson.loads(native[0])["type"] == "message_start" and orjson.loads(native[-1])["type"] == "message_stop"
    assert end2 is not None and end2.ttft.ToNanoseconds() > 0
    await agent.pool.close()


async def test_refusals(emulators: EmulatorGroup, stub_for: Any) -> None:
    agent = make_agent(
        snapshot(
            view("chat", "openai", [emulators.urls["a"]]),
            view("vec", "chroma", ["http://127.0.0.1:9"], category="vector_db"),
        )
    )
    stub = await stub_for(agent)
    for request, code in [
        (stream_request("nope", CHAT), grpc.StatusCode.NOT_FOUND),
        (stream_request("chat", {"input": "x"}, method="embeddings"), grpc.StatusCode.INVALID_ARGUMENT),
        (stream_request("vec", {}, method="query"), grpc.StatusCode.INVALID_ARGUMENT),
        (stream_request("chat", {"messages": []}), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(stub.InvokeStream(request))
        assert caught.value.code() == code, request
    await agent.pool.close()


async def test_cli_invoke_stream_prints_chunks_then_the_end(
    emulators: EmulatorGroup, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from switchgear import cli

    agent = make_agent(snapshot(view("chat", "openai", [emulators.urls["a"]], model="gpt-4o-mini")))
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
        GatewayServicer(agent.holder, agent.invoker, agent.streamer), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        argv = [
            "invoke",
            "--agent",
            f"127.0.0.1:{port}",
            "--service",
            "chat",
            "--stream",
            "--payload",
            orjson.dumps(CHAT).decode(),
        ]
        code = await asyncio.to_thread(cli.main, argv)
    finally:
        await server.stop(None)
        await agent.pool.close()
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0].startswith('{"id":"chatcmpl-') and '"endpoint": "e0"' in out


async def test_a_stream_its_caller_abandons_is_metered_and_its_attempt_ends(emulators: EmulatorGroup) -> None:
    """Cut after the first chunk: the meter holds the prompt and what was forwarded, and the
    observers see the attempt end (no error, estimated usage), so nothing stays in flight."""
    from switchgear.dataplane.convert import Call
    from switchgear.dataplane.reporter import LoadAccumulator
    from switchgear.dataplane.stream import Meter

    emulators.set_faults("a", Faults(token_delay_ms=50))
    agent = make_agent(snapshot(view("chat", "openai", [emulators.urls["a"]], model="gpt-4o-mini",
                                     pricing=Pricing(cost_per_1k_tokens=1.0))))
    accumulator = LoadAccumulator()
    agent.streamer._observers = [agent.recorder, accumulator]
    prompt = "x" * 401
    call = Call(request_id="r", category="", service="chat", method="chat.completions",
                payload={"messages": [{"role": "user", "content": prompt}]}, priority=5, timeout_s=0, user_id="",
                session_id="")
    meter = Meter()
    items = agent.streamer.stream(call, agent.holder.current, meter)  # type: ignore[arg-type]
    first = await anext(items)
    assert isinstance(first, bytes)
    await items.aclose()
    usage, cost = meter.charge()
    assert meter.end is None and usage.estimated and usage.input_tokens == 101 and usage.output_tokens >= 1
    assert cost == pytest.approx((usage.input_tokens + usage.output_tokens) / 1000)
    (ended,) = agent.recorder.ended
    assert ended.error is None and ended.usage == usage
    (load,) = accumulator.drain()
    assert (load.in_flight, load.input_tokens) == (0, 101)
    await agent.pool.close()
