"""Whole answers streamed from the upstream (category policy `stream_upstream`, dataplane/assemble.py).

In-process agents (real adapters, client pool, gRPC server and HTTP door) over the OpenAI and
Anthropic emulators: with the setting on, a whole answer is the one the upstream gives for
`stream: false` (the emulator says it was asked for a stream), the attempt's first token reaches
the routing statistics, a hung endpoint is left at its first-token timeout, and a bad stream is
the upstream's fault while a bad request stays the caller's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import grpc
import httpx
import orjson
import pytest
from aiohttp import web
from hypothesis import example, given, settings
from hypothesis import strategies as st

from switchgear.adapters import builtin_adapters
from switchgear.adapters.base import AdapterRequest, ErrorKind, ResponseLimits, Target, TokenUsage, UpstreamError
from switchgear.cli_config import describe
from switchgear.controlplane.config import ConfigError, load_config
from switchgear.controlplane.convert import settings_to_proto
from switchgear.dataplane import http as front_door
from switchgear.dataplane.assemble import ChatAssembly, read_whole, whole_answer
from switchgear.dataplane.attempts import Resilience
from switchgear.dataplane.convert import Call, settings_from_proto
from switchgear.dataplane.deadlines import Deadlines
from switchgear.dataplane.gateway import GatewayServicer
from switchgear.dataplane.invoke import CallFailed, Invoker
from switchgear.dataplane.scheduling.model import candidate_key
from switchgear.dataplane.scheduling.stats import LiveStats
from switchgear.dataplane.snapshot import (
    AgentSettings,
    AgentSnapshot,
    Holder,
    Pricing,
    RetrySettings,
    SchedulingPolicy,
    ServiceView,
)
from switchgear.dataplane.stream import Streamer
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.emulators.common import Running
from switchgear.emulators.openai import EmulatorGroup, Faults
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc
from switchgear.wire.checks import SnapshotError, check_settings
from tests import test_stream
from tests.test_stream import FirstUntried, Recorder, view

pytestmark = pytest.mark.timeout(30)
emulators, claude = test_stream.emulators, test_stream.claude  # fixtures: OpenAI instances a and b; Anthropic

ADAPTERS = builtin_adapters()
PRICE = Pricing(input_cost_per_1k_tokens=1.0, output_cost_per_1k_tokens=2.0)
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
         for name in ("lookup", "weather")]
REQUESTS = {
    "plain": {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]},
    "two choices cut at 5 tokens": {"messages": [{"role": "user", "content": "say more"}], "n": 2, "max_tokens": 5},
    "two tool calls": {"messages": [{"role": "user", "content": "lookup the weather in Oslo"}], "tools": TOOLS},
}


class Agent:
    """One in-process agent: invoker, streamer, routing statistics, attempt recorder."""

    def __init__(self, *services: ServiceView, stream_upstream: bool, max_retries: int = 2,
                 policy: SchedulingPolicy | None = None) -> None:
        policy = policy or SchedulingPolicy(stream_upstream=stream_upstream)
        self.snapshot = AgentSnapshot("1.test", MappingProxyType({s.name: s for s in services}),
                                      AgentSettings(retry=RetrySettings(max_retries=max_retries),
                                                    category_policies=MappingProxyType({"llm": policy})))
        self.holder, self.pool, self.recorder, self.live = Holder(), ClientPool(), Recorder(), LiveStats()
        self.holder.current = self.snapshot
        resilience = Resilience(stats=self.live)
        resilience.apply(self.snapshot)
        picker = FirstUntried(resilience.gate.unavailable)
        observers = [self.recorder, self.live]
        self.invoker = Invoker(ADAPTERS, self.pool, SecretResolver({}), picker,  # type: ignore[arg-type]
                               observers=observers, resilience=resilience)
        self.streamer = Streamer(ADAPTERS, self.pool, SecretResolver({}), picker.pick, observers=observers,
                                 resilience=resilience)

    async def invoke(self, service: str, payload: dict[str, Any]) -> Any:
        return await self.invoker.invoke(chat_call(service, payload), self.snapshot)


def chat_call(service: str, payload: dict[str, Any], request_id: str = "", timeout_s: float = 0.0) -> Call:
    return Call(request_id=request_id or f"r{time.monotonic_ns()}", category="", service=service,
                method="chat.completions", payload=payload, priority=5, timeout_s=timeout_s, user_id="",
                session_id="")


def comparable(body: bytes) -> dict[str, Any]:
    """A whole answer without what differs between any two answers (id, created, tool call ids)."""
    answer = orjson.loads(body)
    answer.pop("id"), answer.pop("created")
    for choice in answer["choices"]:
        for call in choice["message"].get("tool_calls", ()):
            assert call.pop("id").startswith(("call_", "toolu_"))
    return dict(answer)


async def grpc_door(agent: Agent) -> tuple[gateway_pb2_grpc.GatewayServiceStub, Any]:
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(agent.holder, agent.invoker,
                                                                          agent.streamer), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    async def close() -> None:
        await channel.close()
        await server.stop(None)

    return gateway_pb2_grpc.GatewayServiceStub(channel), close


def streamed(group: EmulatorGroup, name: str = "a") -> int:
    return int(group.stats(name)["streamed"])


async def test_the_whole_answer_is_the_unary_one_on_both_doors(emulators: EmulatorGroup) -> None:
    """Same requests to the same upstream, setting off and on, through gRPC Invoke and the HTTP
    door: equal answers (modulo id/created), usage and cost; only the setting-on calls were
    streams upstream."""
    answers: dict[tuple[str, bool, str], Any] = {}
    for on in (False, True):
        agent = Agent(view("chat", "openai", [emulators.urls["a"]], model="gpt-4o-mini", pricing=PRICE),
                      stream_upstream=on)
        stub, close = await grpc_door(agent)
        runner, address = await front_door.start(agent.holder, agent.invoker, agent.streamer, "127.0.0.1:0")
        try:
            async with httpx.AsyncClient(base_url=f"http://{address}/v1", timeout=10) as http:
                for name, payload in REQUESTS.items():
                    before = streamed(emulators)
                    reply = await stub.Invoke(gateway_pb2.InvokeRequest(
                        service="chat", method="chat.completions", payload=orjson.dumps(payload)), timeout=10)
                    answers[("grpc", on, name)] = (comparable(reply.payload), reply.usage.input_tokens,
                                                   reply.usage.output_tokens, reply.usage.cost_usd)
                    door = await http.post("/chat/completions", json={"model": "chat", **payload})
                    assert door.status_code == 200, door.text
                    cost = float(door.headers["x-switchgear-cost-usd"])
                    answers[("http", on, name)] = (comparable(door.content), cost)
                    assert streamed(emulators) - before == (2 if on else 0), name
        finally:
            await runner.cleanup()
            await close()
            await agent.pool.close()
    for name in REQUESTS:
        assert answers[("grpc", True, name)] == answers[("grpc", False, name)], name
        assert answers[("http", True, name)] == answers[("http", False, name)], name
    tools = answers[("grpc", True, "two tool calls")][0]["choices"][0]
    assert [c["function"]["name"] for c in tools["message"]["tool_calls"]] == ["lookup", "weather"]
    assert orjson.loads(tools["message"]["tool_calls"][1]["function"]["arguments"])["call"] == 1
    assert tools["finish_reason"] == "tool_calls" and tools["message"]["content"] is None
    cut = answers[("grpc", True, "two choices cut at 5 tokens")][0]
    assert [c["finish_reason"] for c in cut["choices"]] == ["length", "length"]
    assert cut["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}


async def test_anthropic_chat_and_tool_calls_are_assembled(claude: Running) -> None:
    """Through an Anthropic target too, tool calls included: the streamed tool_use blocks
    assembled are the answer the upstream gives for `stream: false`."""
    answers = {}
    for on in (False, True):
        agent = Agent(view("claude", "anthropic", [claude.url], model="claude-3-sonnet", pricing=PRICE),
                      stream_upstream=on)
        plain = await agent.invoke("claude", REQUESTS["plain"])
        tools = await agent.invoke("claude", REQUESTS["two tool calls"])
        answers[on] = [(comparable(r.body), r.usage, r.cost_usd) for r in (plain, tools)]
        assert [e.ttft_s is not None for e in agent.recorder.ended] == [on, on]
        await agent.pool.close()
    assert answers[True] == answers[False]
    assert answers[True][0][0]["choices"][0]["message"]["content"].startswith("Hello from anthropic")
    (choice,) = answers[True][1][0]["choices"]
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["lookup", "weather"]
    assert orjson.loads(choice["message"]["tool_calls"][1]["function"]["arguments"])["call"] == 1
    assert choice["finish_reason"] == "tool_calls"


async def test_a_caller_s_bad_tool_request_to_anthropic_counts_nowhere(claude: Running) -> None:
    agent = Agent(view("claude", "anthropic", [claude.url], model="claude-3-sonnet"), stream_upstream=True)
    calls = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{oops"}}]
    for bad in ({"tools": "lookup"}, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": calls}]},
                {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "sunny"}]}):
        with pytest.raises(CallFailed) as caught:
            await agent.invoke("claude", {**REQUESTS["plain"], **bad})
        assert caught.value.error.kind is ErrorKind.CLIENT and caught.value.attempts == 1
    stats = agent.live.get(candidate_key("claude", "e0"))
    assert stats.failing == 0 and stats.completed == 0 and not stats.outstanding and not stats.awaiting_first
    assert agent.invoker.resilience.counters().get(("claude", "e0"), {}).get("trips", 0) == 0
    assert claude.instance.stats()["total"] == 0  # refused before any upstream request
    await agent.pool.close()


async def test_first_tokens_reach_the_routing_statistics(emulators: EmulatorGroup) -> None:
    agent = Agent(view("chat", "openai", [emulators.urls["a"], emulators.urls["b"]], model="gpt-4o-mini"),
                  stream_upstream=True)
    for _ in range(3):
        await agent.invoke("chat", REQUESTS["plain"])
    a = agent.live.get(candidate_key("chat", "e0"))
    assert a.recent_ttft.count == 3 and a.recent.count == 3 and not a.awaiting_first and not a.outstanding
    assert all(e.unary and e.ttft_s is not None and 0 < e.ttft_s <= e.latency_s for e in agent.recorder.ended)
    # An answer still coming has shown it is alive; a hung endpoint's attempt has not.
    emulators.set_faults("a", Faults(token_delay_ms=40))
    emulators.set_faults("b", Faults(hang=True))
    slow = asyncio.create_task(agent.invoke("chat", REQUESTS["plain"]))
    await until(lambda: bool(a.outstanding) and not a.awaiting_first)
    b = agent.live.get(candidate_key("chat", "e1"))
    hung = asyncio.create_task(agent.invoker.invoke(chat_call("chat", REQUESTS["plain"], "hung"),
                                                    onto_b(agent.snapshot)))
    await until(lambda: bool(b.awaiting_first))
    assert not slow.done() and list(b.awaiting_first) == list(b.outstanding)
    assert (await slow).body
    hung.cancel()
    await asyncio.gather(hung, return_exceptions=True)
    await agent.pool.close()


def onto_b(snap: AgentSnapshot) -> AgentSnapshot:
    """The same snapshot with service "chat" served by its second endpoint only."""
    chat = snap.services["chat"]
    only_b = ServiceView(name=chat.name, category=chat.category, protocol=chat.protocol,
                         endpoints=chat.endpoints[1:], model=chat.model, options=chat.options)
    return AgentSnapshot(snap.version, MappingProxyType({"chat": only_b}), snap.settings)


async def until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_a_hung_endpoint_is_left_at_its_first_token_timeout(emulators: EmulatorGroup) -> None:
    """Whole answers of ~1 s and first tokens of ~10 ms learnt: a hung endpoint's attempt ends at
    the first-token bound (0.3 s, the floor) instead of the whole answer's (4 x 1 s, here the
    call's 2 s deadline), and counts as an attempt timeout."""
    agent = Agent(view("chat", "openai", [emulators.urls["a"], emulators.urls["b"]], model="gpt-4o-mini"),
                  stream_upstream=True, policy=SchedulingPolicy(stream_upstream=True, attempt_timeout_floor_s=0.3))
    a = agent.live.get(candidate_key("chat", "e0"))
    for _ in range(40):  # the endpoint's history, as forty answers would leave it
        a.recent.record(1.0)
        a.recent_ttft.record(0.01)
    emulators.set_faults("a", Faults(hang=True))
    started = time.monotonic()
    result = await agent.invoker.invoke(chat_call("chat", REQUESTS["plain"], timeout_s=2.0), agent.snapshot)
    elapsed = time.monotonic() - started
    assert result.endpoint == "e1" and 0.3 <= elapsed < 1.5, elapsed
    first = agent.recorder.ended[0]
    assert first.endpoint == "e0" and first.error is ErrorKind.TIMEOUT and first.ttft_s is None
    assert agent.invoker.resilience.counters()[("chat", "e0")]["attempt_timeouts"] == 1
    await agent.pool.close()


async def read(group: EmulatorGroup, faults: Faults, *, first_s: float = 5.0, gap_s: float = 5.0,
               payload: dict[str, Any] | None = None, limit: int = 1 << 20, shared: bool = False) -> Any:
    """One streamed attempt of the OpenAI adapter against instance "a", read whole; `shared`:
    its waits on one Deadlines timer, inside an outer 10 s block on it (as the request path)."""
    group.set_faults("a", faults)
    pool = ClientPool()
    try:
        request = AdapterRequest("chat.completions", payload or REQUESTS["plain"], 10.0, "r")
        chunks = ADAPTERS["openai"].stream(pool.get("s", "e", group.urls["a"]), Target(group.urls["a"], "gpt-4o-mini"),
                                           request)
        if not shared:
            return await whole_answer(chunks, openai=True, limit=limit, first_s=first_s, gap_s=gap_s,
                                      clock=time.monotonic, on_first=lambda _s: None, endpoint="e")
        deadlines = Deadlines()
        async with deadlines.within(10.0):
            return await whole_answer(chunks, openai=True, limit=limit, first_s=first_s, gap_s=gap_s,
                                      clock=time.monotonic, on_first=lambda _s: None, endpoint="e",
                                      within=deadlines.within)
    finally:
        await pool.close()


@pytest.mark.parametrize("shared", [False, True])
async def test_a_stall_after_the_first_token_is_the_stream_path_s_timeout(emulators: EmulatorGroup,
                                                                          shared: bool) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        await read(emulators, Faults(token_delay_ms=2000), gap_s=0.2, shared=shared)
    assert caught.value.kind is ErrorKind.TIMEOUT and "went silent for 0.2 s" in caught.value.message
    assert time.monotonic() - started < 1.5
    await until(lambda: emulators.stats("a")["disconnects"] == 1)  # the upstream saw the attempt end


@pytest.mark.parametrize("shared", [False, True])
async def test_no_first_token_in_time_is_a_timeout(emulators: EmulatorGroup, shared: bool) -> None:
    with pytest.raises(UpstreamError) as caught:
        await read(emulators, Faults(hang=True), first_s=0.2, shared=shared)
    assert caught.value.kind is ErrorKind.TIMEOUT and "no first token" in caught.value.message


async def test_a_truncated_stream_is_retryable(emulators: EmulatorGroup) -> None:
    with pytest.raises(UpstreamError) as caught:
        await read(emulators, Faults(stream_cut_after=3))
    assert caught.value.kind is ErrorKind.RETRYABLE


async def test_an_oversized_stream_is_cut_at_the_service_s_limit(emulators: EmulatorGroup) -> None:
    """The service's max_decoded_bytes bounds the stream on the wire and the assembled answer."""
    chat = dataclasses.replace(view("chat", "openai", [emulators.urls["a"]], model="gpt-4o-mini"),
                               limits=ResponseLimits(max_decoded_bytes=4000))
    agent = Agent(chat, stream_upstream=True, max_retries=0)
    with pytest.raises(CallFailed) as caught:
        await agent.invoke("chat", {**REQUESTS["plain"], "n": 8})
    assert caught.value.error.kind is ErrorKind.RETRYABLE and "over 4000 bytes" in caught.value.error.message
    await agent.pool.close()
    with pytest.raises(UpstreamError) as assembled:  # a stream within bounds spelling out a larger answer
        await read(emulators, Faults(), limit=200)
    assert assembled.value.kind is ErrorKind.RETRYABLE and "over 200 bytes" in assembled.value.message


@pytest.fixture
async def bad_upstream() -> AsyncIterator[str]:
    """An OpenAI-shaped upstream whose stream says `/v1/<case>`: a chunk that is not a chat
    chunk, or a complete stream with no finish reason."""
    cases = {
        "malformed": [b'{"id":"x","choices":[{"index":0,"delta":{"content":"hi"}}]}', b'{"id":"x","choices":"no"}'],
        "unfinished": [b'{"id":"x","choices":[{"index":0,"delta":{"content":"hi"}}]}'],
    }

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for data in cases[request.match_info["case"]]:
            await response.write(b"data: " + data + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/{case}/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.parametrize(("case", "said"), [("malformed", "choices is not a list"),
                                            ("unfinished", "without a finish reason")])
async def test_a_bad_stream_is_the_upstream_s_fault(bad_upstream: str, case: str, said: str) -> None:
    agent = Agent(view("chat", "openai", [f"{bad_upstream}/{case}"], model="m"), stream_upstream=True, max_retries=0)
    with pytest.raises(CallFailed) as caught:
        await agent.invoke("chat", REQUESTS["plain"])
    assert caught.value.error.kind is ErrorKind.RETRYABLE and said in caught.value.error.message
    stats = agent.live.get(candidate_key("chat", "e0"))
    assert stats.failing == 1 and stats.completed == 0  # counted against the endpoint
    await agent.pool.close()


async def test_a_caller_s_bad_request_counts_nowhere(emulators: EmulatorGroup) -> None:
    agent = Agent(view("chat", "openai", [emulators.urls["a"]], model="gpt-4o-mini"), stream_upstream=True)
    with pytest.raises(CallFailed) as caught:
        await agent.invoke("chat", {"messages": [{"role": "wizard", "content": "hi"}]})
    assert caught.value.error.kind is ErrorKind.CLIENT and caught.value.error.status == 400
    stats = agent.live.get(candidate_key("chat", "e0"))
    assert stats.failing == 0 and stats.completed == 0 and not stats.outstanding and not stats.awaiting_first
    assert agent.invoker.resilience.counters().get(("chat", "e0"), {}).get("trips", 0) == 0
    for bad in ({"stream": True}, {"stream_options": {"include_usage": True}}):  # the caller's, as before
        with pytest.raises(CallFailed):
            await agent.invoke("chat", {**REQUESTS["plain"], **bad})
    assert streamed(emulators) == 0
    await agent.pool.close()


def test_a_stream_of_one_character_pieces_assembles_in_one_pass() -> None:
    """An upstream may spend its whole byte bound on one-character deltas: 200,000 of them (text,
    tool-call arguments, logprobs). Joining each piece onto the text so far would copy ~20 GB
    here and run for minutes; the pieces are kept and joined once."""
    n = 200_000
    assembly = ChatAssembly(openai=True)
    text = orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": "x"},
                                                 "logprobs": {"content": [{"token": "x", "logprob": 0}]}}]})
    call = orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": "y"}}]}}]})
    for i in range(n):
        assembly.add(text if i % 2 else call)
    assembly.add(orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    (choice,) = orjson.loads(assembly.body(TokenUsage()))["choices"]
    assert choice["message"]["content"] == "x" * (n // 2)
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "", "arguments": "y" * (n // 2)}
    assert len(choice["logprobs"]["content"]) == n // 2


def test_the_assembly_merges_pieces_by_index() -> None:
    assembly = ChatAssembly(openai=True)
    chunks: list[dict[str, Any]] = [
        {"id": "c", "created": 1, "model": "m", "system_fingerprint": "fp", "choices": [
            {"index": 1, "delta": {"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}},
            {"index": 0, "delta": {"role": "assistant", "content": "He"},
             "logprobs": {"content": [{"token": "He", "logprob": -0.1}]}}]},
        {"id": "c", "choices": [{"index": 1,
                                 "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}},
                                {"index": 0, "delta": {"content": "llo"},
                                 "logprobs": {"content": [{"token": "llo", "logprob": -0.2}]}}]},
        {"id": "c", "choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]},
                                 "finish_reason": "tool_calls"},
                                {"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    ]
    for chunk in chunks:
        assembly.add(orjson.dumps(chunk))
    whole = orjson.loads(assembly.body(TokenUsage()))
    assert whole == {
        "id": "c", "object": "chat.completion", "created": 1, "model": "m", "system_fingerprint": "fp",
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        "choices": [
            {"index": 0, "finish_reason": "stop",
             "logprobs": {"content": [{"token": "He", "logprob": -0.1}, {"token": "llo", "logprob": -0.2}]},
             "message": {"role": "assistant", "content": "Hello", "refusal": None, "annotations": []}},
            {"index": 1, "finish_reason": "tool_calls", "logprobs": None,
             "message": {"role": "assistant", "content": None, "refusal": None, "annotations": [],
                         "tool_calls": [{"id": "call_1", "type": "function",
                                         "function": {"name": "f", "arguments": '{"a":1}'}}]}},
        ],
    }
    for bad in (b"[1]", b'{"choices":[{"index":true}]}', b'{"choices":[{"index":0,"delta":{"tool_calls":[{}]}}]}'):
        with pytest.raises(UpstreamError) as caught:
            ChatAssembly(openai=True).add(bad)
        assert caught.value.kind is ErrorKind.RETRYABLE


def test_anthropic_tool_arguments_are_re_serialised_as_the_whole_answer_s() -> None:
    """The Anthropic adapter streams a tool_use input as Anthropic spells it (spaced); its whole
    answer re-serialises the input with orjson: the assembly does the same, or refuses arguments
    that are not JSON as the upstream's fault."""
    def chunks(*pieces: str) -> list[bytes]:
        opening = {"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": ""}}
        calls = [[opening]] + [[{"index": 0, "function": {"arguments": p}}] for p in pieces]
        return [orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": c}}]}) for c in calls] + [
            orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})]

    assembly = ChatAssembly(openai=False)
    for chunk in chunks('{"city": "Oslo", ', '"days": [1, 2.50]}'):
        assembly.add(chunk)
    (choice,) = orjson.loads(assembly.body(TokenUsage()))["choices"]
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"city":"Oslo","days":[1,2.5]}'
    assert choice["message"]["content"] is None
    assembly = ChatAssembly(openai=False)
    for chunk in chunks('{"city": '):
        assembly.add(chunk)
    with pytest.raises(UpstreamError) as caught:
        assembly.body(TokenUsage())
    assert caught.value.kind is ErrorKind.RETRYABLE and "not JSON" in caught.value.message


async def test_read_whole_closes_the_stream_it_was_given() -> None:
    closed = asyncio.Event()

    async def chunks() -> AsyncIterator[Any]:
        try:
            await asyncio.sleep(10)
            yield None
        finally:
            closed.set()

    stream = chunks()
    with pytest.raises(UpstreamError):
        await read_whole(stream, ChatAssembly(openai=True), first_s=0.05, gap_s=1.0, clock=time.monotonic,
                         on_first=lambda _s: None, endpoint="e")
    assert closed.is_set()


LLM_CONFIG = """\
external_services:
  coordination:
    scheduling_policies:
      {group}:
        stream_upstream: true
  services:
    llm_services:
      cloud_providers:
        - name: "chat"
          protocol: "openai"
          model: "gpt-4o-mini"
          endpoints:
            - {{id: "a", url: "http://127.0.0.1:9/v1"}}
"""


def test_the_setting_travels_to_the_agent_and_validate_prints_it() -> None:
    state = load_config(LLM_CONFIG.format(group="llm_services"), env={})
    agent = settings_from_proto(settings_to_proto(state.settings))
    assert agent.category_policies["llm"].stream_upstream is True
    assert "whole-answer chat calls streamed from the upstream" in describe(state)
    off = load_config(LLM_CONFIG.replace("stream_upstream: true", "strategy: cost_optimized")
                      .format(group="llm_services"), env={})
    assert settings_from_proto(settings_to_proto(off.settings)).category_policies["llm"].stream_upstream is False
    assert "streamed from the upstream" not in describe(off)


def test_the_setting_is_refused_where_it_cannot_take_effect() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(LLM_CONFIG.format(group="embedding_services"), env={})
    assert "stream_upstream" in str(caught.value) and "only llm calls" in str(caught.value)
    with pytest.raises(ConfigError) as typed:
        load_config(LLM_CONFIG.format(group="llm_services").replace("true", '"yes"'), env={})
    assert "stream_upstream" in str(typed.value)
    wire = settings_to_proto(load_config(LLM_CONFIG.format(group="llm_services"), env={}).settings)
    wire.category_policies["embedding"].stream_upstream = True  # an agent refuses it too
    with pytest.raises(SnapshotError) as refused:
        check_settings(wire)
    assert "category_policies[embedding].stream_upstream" in str(refused.value)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                         st.sampled_from(["index", "delta", "content", "tool_calls", "function", "arguments",
                                          "logprobs", "finish_reason", "choices", "usage", "id", "role"]),
                         inner, max_size=4),
                     max_leaves=12)


def _delta(**delta: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": "stop"}]}


@settings(max_examples=500, deadline=None)
@given(st.lists(_JSON, max_size=4), st.booleans())
@example([_delta(tool_calls=[{"index": 0, "function": "x"}]),
          _delta(tool_calls=[{"index": 0, "function": {"name": "a"}}])], True)
@example([_delta(content=1), _delta(content="a")], True)
@example([_delta(annotations=5), _delta(annotations=[1])], True)
@example([{"choices": [{"index": 0, "logprobs": {"content": 1}}]},
          {"choices": [{"index": 0, "logprobs": {"content": [1]}}]}], True)
@example([_delta(tool_calls=[{"index": 0, "function": {"arguments": "{"}}])], False)
def test_any_json_chunks_are_assembled_or_refused_as_the_upstream_s_fault(chunks: list[Any], openai: bool) -> None:
    """Whatever JSON an upstream streams, the assembly answers or raises UpstreamError (RETRYABLE),
    never anything else (an OpenAI upstream's chunks, or the Anthropic adapter's, whose tool
    call arguments are re-serialised)."""
    assembly = ChatAssembly(openai=openai)
    try:
        for chunk in chunks:
            assembly.add(orjson.dumps(chunk))
        orjson.loads(assembly.body(TokenUsage(1, 2)))
    except UpstreamError as exc:
        assert exc.kind is ErrorKind.RETRYABLE
