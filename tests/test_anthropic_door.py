"""The front door's Anthropic-compatible POST /v1/messages, driven by the official `anthropic` SDK
against the door serving live emulators: native pass-through to an Anthropic-protocol service,
translation to an OpenAI-protocol one, JSON and streaming, and Anthropic-shaped refusals."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import re
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from switchgear.adapters.base import TokenUsage
from switchgear.dataplane import http as front_door
from switchgear.dataplane.anthropic_door import (
    ApiError,
    ChatToEvents,
    chat_request,
    is_native,
    message_from_chat,
    parse_request,
)
from switchgear.dataplane.governance import Governance, TenantView
from switchgear.dataplane.http_door import DoorLimits
from switchgear.dataplane.pipeline import Pipeline
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer
from switchgear.dataplane.snapshot import EndpointView, Pricing
from switchgear.dataplane.stream import StreamEnd
from switchgear.emulators import anthropic as anthropic_emu
from switchgear.emulators.openai import InstanceSpec, reply_text, start_instances
from tests.test_stream import Agent, make_agent, snapshot, view

KEY = "sg-k1-door-secret"
NARROW_KEY = "sg-k2-narrow-secret"  # a tenant allowed gpt-mini only
PROMPT = "hello anthropic door"


def governance() -> Governance:
    return Governance(
        tenants=MappingProxyType({"acme": TenantView("acme"),
                                  "narrow": TenantView("narrow", allowed_services=frozenset({"gpt-mini"}))}),
        keys=MappingProxyType({"k1": ("acme", hashlib.sha256(KEY.encode()).digest()),
                               "k2": ("narrow", hashlib.sha256(NARROW_KEY.encode()).digest())}))


@pytest.fixture
async def door() -> AsyncIterator[tuple[str, Agent]]:
    async with serving(governance()) as running:
        yield running


@contextlib.asynccontextmanager
async def serving(governance: Governance) -> AsyncIterator[tuple[str, Agent]]:
    """The door (keys required, local quotas, no cache) in front of an OpenAI emulator
    ("gpt-mini", "embed") and an Anthropic one ("claude"): (base URL, agent)."""
    async with (
        await start_instances([InstanceSpec("a")]) as group,
        await anthropic_emu.start() as claude,
    ):
        snap = snapshot(
            view("claude", "anthropic", [claude.url], model="claude-3-sonnet", pricing=Pricing(cost_per_1k_tokens=1.0)),
            view("gpt-mini", "openai", [group.urls["a"]], model="gpt-4o-mini", pricing=Pricing(cost_per_1k_tokens=1.0)),
            view("embed", "openai", [group.urls["a"]], category="embedding", model="text-embedding-3-small"),
        )
        agent = make_agent(dataclasses.replace(snap, governance=governance))
        pipeline = Pipeline(agent.invoker.invoke, auth_required=True, quotas=QuotaEnforcer(LocalCounters()),
                            cache=None)
        limits = DoorLimits(max_body_bytes=256 * 1024, max_buffered_bytes=1024 * 1024, body_timeout_s=0.5)
        runner, address = await front_door.start(agent.holder, agent.invoker, agent.streamer, "127.0.0.1:0",
                                                 pipeline, limits=limits)
        try:
            yield f"http://{address}", agent
        finally:
            await runner.cleanup()
            await agent.pool.close()


@pytest.fixture
def sdk(door: tuple[str, Agent]) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=door[0], api_key=KEY, max_retries=0)


@pytest.mark.parametrize(("model", "instance"), [("claude", "anthropic"), ("gpt-mini", "a")])
async def test_messages_json_with_either_target_protocol(sdk: anthropic.AsyncAnthropic, model: str,
                                                         instance: str) -> None:
    raw = await sdk.messages.with_raw_response.create(
        model=model, max_tokens=200, system="be brief", messages=[{"role": "user", "content": PROMPT}])
    message = await raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text == reply_text(instance, PROMPT)
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert raw.headers["x-switchgear-service"] == model and float(raw.headers["x-switchgear-cost-usd"]) > 0
    assert _target_headers(raw.headers) == TARGETS[model]
    bare = await sdk.messages.create(model=model, max_tokens=200, messages=[{"role": "user", "content": PROMPT}])
    assert bare.usage.input_tokens < message.usage.input_tokens  # the system prompt reached the upstream


@pytest.mark.parametrize(("model", "instance"), [("claude", "anthropic"), ("gpt-mini", "a")])
async def test_messages_stream_with_either_target_protocol(sdk: anthropic.AsyncAnthropic, model: str,
                                                           instance: str) -> None:
    async with sdk.messages.stream(model=model, max_tokens=200,
                                   messages=[{"role": "user", "content": PROMPT}]) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == reply_text(instance, PROMPT)
    assert final.stop_reason == "end_turn" and final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
    # the stream names the target that served, as the unary answer and the OpenAI door's streams do
    assert _target_headers(stream.response.headers) == TARGETS[model]


#: The route target each service's single endpoint is: (endpoint id, provider, upstream model).
TARGETS = {"claude": ("e0", "anthropic", "claude-3-sonnet"), "gpt-mini": ("e0", "openai", "gpt-4o-mini")}


def _target_headers(headers: httpx.Headers) -> tuple[str | None, ...]:
    return tuple(headers.get(f"x-switchgear-{name}") for name in ("target", "provider", "target-model"))


@pytest.mark.parametrize("model", ["claude", "gpt-mini"])
async def test_max_tokens_stop_reason_survives_translation(sdk: anthropic.AsyncAnthropic, model: str) -> None:
    message = await sdk.messages.create(model=model, max_tokens=3, messages=[{"role": "user", "content": PROMPT}])
    assert message.stop_reason == "max_tokens"
    async with sdk.messages.stream(model=model, max_tokens=3,
                                   messages=[{"role": "user", "content": PROMPT}]) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "max_tokens"


async def test_bearer_authorization_is_accepted_like_x_api_key(door: tuple[str, Agent]) -> None:
    client = anthropic.AsyncAnthropic(base_url=door[0], auth_token=KEY, max_retries=0)
    client.api_key = None
    message = await client.messages.create(model="gpt-mini", max_tokens=50,
                                           messages=[{"role": "user", "content": PROMPT}])
    assert message.content[0].text == reply_text("a", PROMPT)  # type: ignore[union-attr]


async def test_anonymous_and_wrong_keys_get_anthropic_401(door: tuple[str, Agent]) -> None:
    for key in ("sg-k1-wrong", "not-a-key"):
        client = anthropic.AsyncAnthropic(base_url=door[0], api_key=key, max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as info:
            await client.messages.create(model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        assert "x-api-key" in info.value.body["error"]["message"]  # type: ignore[index]
    async with httpx.AsyncClient(base_url=door[0]) as http:
        response = await http.post("/v1/messages", content=b"{}", headers={"anthropic-version": "2023-06-01"})
    assert response.status_code == 401 and response.json()["type"] == "error"


async def test_unknown_model_is_anthropic_404(sdk: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        await sdk.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):  # an embedding service is no chat model
        await sdk.messages.create(model="embed", max_tokens=5, messages=[{"role": "user", "content": "x"}])


async def _post(base: str, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base) as http:
        return await http.post("/v1/messages", content=body, headers={"x-api-key": KEY})


@pytest.mark.parametrize(("body", "status", "field"), [
    (b"{not json", 400, "JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (orjson.dumps({"model": "claude", "messages": [{"role": "user", "content": "x"}]}), 400, "max_tokens"),
    (orjson.dumps({"model": "claude", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}), 400,
     "max_tokens"),
    (orjson.dumps({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}), 400, "model"),
    (orjson.dumps({"model": "claude", "max_tokens": 5, "messages": []}), 400, "messages"),
    (orjson.dumps({"model": "claude", "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}), 400,
     "messages.0.role"),
    (b'{"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "metadata": {"a": '
     + b"[" * 100 + b"]" * 100 + b"}}", 400, "metadata"),
    (b'{"model": "claude", "pad": "' + b"x" * 300_000 + b'"}', 413, "request body over"),
])
async def test_malformed_oversized_and_deep_bodies_get_anthropic_errors(
        door: tuple[str, Agent], body: bytes, status: int, field: str) -> None:
    response = await _post(door[0], body)
    assert response.status_code == status
    answer = response.json()
    assert answer["type"] == "error" and set(answer["error"]) == {"type", "message"}
    assert answer["error"]["type"] == ("request_too_large" if status == 413 else "invalid_request_error")
    assert field in answer["error"]["message"]
    assert len(door[1].recorder.ended) == 0  # refused before any upstream attempt


async def test_block_content_tools_and_results_translate_to_openai() -> None:
    body = parse_request(orjson.dumps({
        "model": "m", "max_tokens": 9, "system": [{"type": "text", "text": "sys"}], "stop_sequences": ["END"],
        "metadata": {"user_id": "u1"}, "tool_choice": {"type": "any"},
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]},
        ]}), 64)
    chat = chat_request(body)
    assert chat["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "42"},
    ]
    assert chat["stop"] == ["END"] and chat["user"] == "u1" and chat["tool_choice"] == "required"
    assert chat["tools"][0]["function"]["parameters"] == {"type": "object"}
    with pytest.raises(ApiError, match=r"messages\.0\.content\.0\.type"):
        chat_request(parse_request(orjson.dumps({"model": "m", "max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "document", "source": {}}]}]}), 64))


def test_a_route_with_an_openai_target_is_translated_not_passed_through() -> None:
    claude = view("claude", "anthropic", ["http://127.0.0.1:9"])
    mixed = dataclasses.replace(claude, name="mixed", endpoints=(
        *claude.endpoints, EndpointView("e1", "http://127.0.0.1:9", protocol="openai")))
    falls = dataclasses.replace(claude, name="falls", fallbacks=("gpt",))
    snap: Any = snapshot(claude, mixed, falls, view("gpt", "openai", ["http://127.0.0.1:9"]))
    assert is_native(snap, claude)
    assert not is_native(snap, mixed) and not is_native(snap, falls)


def _events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in raw.decode().split("\n\n"):
        if frame:
            head, data = frame.split("\n", 1)
            out.append((head.removeprefix("event: "), orjson.loads(data.removeprefix("data: "))))
    return out


def test_openai_tool_calls_become_tool_use_blocks_json_and_streamed() -> None:
    chat = {"choices": [{"finish_reason": "tool_calls", "message": {"role": "assistant", "content": "let me look",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"q":1}'}}]}}]}
    usage = TokenUsage(15, 7, cache_read_input_tokens=6, cache_write_input_tokens=4)
    message = message_from_chat(chat, "m", "r1", usage)
    assert message["content"] == [{"type": "text", "text": "let me look"},
                                  {"type": "tool_use", "id": "c1", "name": "f", "input": {"q": 1}}]
    assert message["stop_reason"] == "tool_use" and message["usage"] == {
        "input_tokens": 5, "cache_read_input_tokens": 6, "cache_creation_input_tokens": 4, "output_tokens": 7}

    mapper = ChatToEvents("m", "r1")
    chunks = [
        {"choices": [{"delta": {"role": "assistant", "content": "hi"}}]},
        {"choices": [{"delta": {"tool_calls": [
            {"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"q":'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}},
    ]
    raw = mapper.start() + b"".join(mapper.feed(orjson.dumps(c)) for c in chunks) + mapper.end(
        StreamEnd("m", "e0", 1, 0.0, 0.0, TokenUsage(9, 7, cache_read_input_tokens=4), 0.0, False, "1"))
    events = _events(raw)
    assert [kind for kind, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop", "content_block_start",
        "content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert events[4][1]["content_block"] == {"type": "tool_use", "id": "c1", "name": "f", "input": {}}
    assert "".join(e["delta"]["partial_json"] for k, e in events if k == "content_block_delta" and e["index"] == 1) \
        == '{"q":1}'
    assert events[8][1]["delta"]["stop_reason"] == "tool_use"
    assert events[8][1]["usage"] == {
        "input_tokens": 5, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 0, "output_tokens": 7}


async def test_another_tenants_service_is_anthropic_403(door: tuple[str, Agent]) -> None:
    client = anthropic.AsyncAnthropic(base_url=door[0], api_key=NARROW_KEY, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        await client.messages.create(model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    allowed = await client.messages.create(model="gpt-mini", max_tokens=50,
                                           messages=[{"role": "user", "content": PROMPT}])
    assert allowed.content[0].text == reply_text("a", PROMPT)  # type: ignore[union-attr]


async def test_a_slow_body_is_anthropic_408(door: tuple[str, Agent]) -> None:
    head, body = await slow_body(door[0], "/v1/messages", b"x-api-key: " + KEY.encode())
    assert head.startswith(b"HTTP/1.1 408") and body["error"]["type"] == "timeout_error"


async def slow_body(base: str, path: str, credential: bytes) -> tuple[bytes, Any]:
    """POSTs a body that never finishes (a credential header line given): the answer's head and JSON body."""
    host, _, port = base.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + credential
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"model\": ")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
        return head, orjson.loads(await reader.readexactly(length))
    finally:
        writer.close()


async def break_upstreams(agent: Agent) -> None:
    """The OpenAI emulator fails its next 10 requests; the Anthropic one cuts its streams after 2 events."""
    snap = agent.holder.current
    assert snap is not None
    async with httpx.AsyncClient() as http:
        claude_url = snap.services["claude"].endpoints[0].url.rstrip("/")
        openai_url = snap.services["gpt-mini"].endpoints[0].url.removesuffix("/v1")
        assert (await http.post(f"{openai_url}/_emulator/faults", json={"fail_next": 10})).status_code == 200
        assert (await http.post(f"{claude_url}/_emulator/faults", json={"stream_cut_after": 2})).status_code == 200


async def test_upstream_failures_are_anthropic_shaped(door: tuple[str, Agent]) -> None:
    base, agent = door
    await break_upstreams(agent)
    client = anthropic.AsyncAnthropic(base_url=base, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as info:
        await client.messages.create(model="gpt-mini", max_tokens=50, messages=[{"role": "user", "content": PROMPT}])
    assert info.value.status_code == 503 and info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    with pytest.raises(anthropic.APIStatusError) as cut:  # a stream cut after its first tokens ends with an error event
        async with client.messages.stream(model="claude", max_tokens=200,
                                          messages=[{"role": "user", "content": PROMPT}]) as stream:
            async for _ in stream.text_stream:
                pass
    assert "error" in str(cut.value).lower()
