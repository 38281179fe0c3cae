"""The agent's OpenAI-compatible HTTP front door, driven by the official `openai` SDK."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from switchgear.dataplane import http as front_door
from switchgear.dataplane.governance import TenantView
from switchgear.dataplane.snapshot import Pricing
from switchgear.emulators import anthropic as anthropic_emu
from switchgear.emulators.common import Running
from switchgear.emulators.openai import EmulatorGroup, Faults, InstanceSpec, start_instances
from tests import test_anthropic_door as anthropic_tests
from tests.test_stream import Agent, make_agent, snapshot, view

VECTORS_KEY = "sg-k4-vectors-secret"  # a tenant allowed embedding services only
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello front door"}]


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[EmulatorGroup, Running]]:
    async with (
        await start_instances([InstanceSpec("a"), InstanceSpec("b")]) as group,
        await anthropic_emu.start() as claude,
    ):
        yield group, claude


@pytest.fixture
async def door(upstreams: tuple[EmulatorGroup, Running]) -> AsyncIterator[tuple[str, Agent]]:
    group, claude = upstreams
    agent = make_agent(
        snapshot(
            view(
                "gpt-mini",
                "openai",
                [group.urls["a"], group.urls["b"]],
                model="gpt-4o-mini",
                pricing=Pricing(cost_per_1k_tokens=1.0),
            ),
            # priced: a free loopback llm would be a local-model fallback for gpt-mini (resilience)
            view("claude", "anthropic", [claude.url], model="claude-3-sonnet", pricing=Pricing(cost_per_1k_tokens=1.0)),
            view("embed", "openai", [group.urls["a"]], category="embedding", model="text-embedding-3-small"),
            view("vectors", "chroma", ["http://127.0.0.1:9"], category="vector_db"),
        )
    )
    runner, address = await front_door.start(agent.holder, agent.invoker, agent.streamer, "127.0.0.1:0")
    try:
        yield f"http://{address}/v1", agent
    finally:
        await runner.cleanup()
        await agent.pool.close()


@pytest.fixture
def sdk(door: tuple[str, Agent]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=door[0], api_key="unused", max_retries=0)


async def test_chat_non_streaming(sdk: openai.AsyncOpenAI, door: tuple[str, Agent]) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-mini", messages=MESSAGES)  # type: ignore[arg-type]
    completion = raw.parse()
    assert completion.choices[0].message.content.startswith("Hello from a")  # type: ignore[union-attr]
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert raw.headers["x-switchgear-endpoint"] == "e0" and float(raw.headers["x-switchgear-cost-usd"]) > 0
    assert len(door[1].recorder.ended) == 1


async def test_chat_streaming_with_usage(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="gpt-mini",
        messages=MESSAGES,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from a")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]


async def test_anthropic_behind_the_openai_api(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(model="claude", messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 3  # type: ignore[union-attr]
    stream = await sdk.chat.completions.create(model="claude", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("Hello from anthropic")


QUERY = {"type": "object", "properties": {"query": {"type": "string"}}}
WEATHER = [{"type": "function", "function": {"name": "weather", "description": "the weather", "parameters": QUERY}}]


async def test_tool_calls_through_an_anthropic_target(sdk: openai.AsyncOpenAI) -> None:
    """The SDK's tool calling, streamed and whole, through a service whose target speaks
    Anthropic: the same call both ways, then the tool's result answered; a bad tool message is
    a 400 naming the field."""
    ask: list[Any] = [{"role": "user", "content": "what is the weather in Oslo"}]
    stream = await sdk.chat.completions.create(model="claude", messages=ask, tools=WEATHER,  # type: ignore[arg-type]
                                               tool_choice="required", stream=True)
    streamed: dict[int, dict[str, str]] = {}
    async for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            got = streamed.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            got["id"] += call.id or ""
            got["name"] += (call.function and call.function.name) or ""
            got["arguments"] += (call.function and call.function.arguments) or ""
    whole = await sdk.chat.completions.create(model="claude", messages=ask, tools=WEATHER,  # type: ignore[arg-type]
                                              tool_choice="required")
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content is None and message.tool_calls
    (call,) = message.tool_calls
    assert call.function.name == "weather" == streamed[0]["name"] and streamed[0]["id"].startswith("toolu_")  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert arguments == json.loads(streamed[0]["arguments"]) == {"query": "what is the weather in Oslo", "call": 0}
    result = {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}
    reply = await sdk.chat.completions.create(model="claude", tools=WEATHER,  # type: ignore[arg-type]
                                              messages=[*ask, message.model_dump(exclude_none=True), result])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content.endswith("You said: sunny, 21 C")  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="claude", messages=[*ask, {"role": "tool", "content": "sunny"}])
    assert "payload.messages[1].tool_call_id" in caught.value.message


async def test_embeddings(sdk: openai.AsyncOpenAI) -> None:
    result = await sdk.embeddings.create(model="embed", input=["one", "two"], dimensions=16)
    assert [len(d.embedding) for d in result.data] == [16, 16]
    assert result.usage.prompt_tokens == 2


async def test_models_lists_llm_and_embedding_services(sdk: openai.AsyncOpenAI) -> None:
    models = await sdk.models.list()
    assert sorted(m.id for m in models.data) == ["claude", "embed", "gpt-mini"]
    assert (await sdk.models.retrieve("embed")).id == "embed"
    with pytest.raises(openai.NotFoundError):
        await sdk.models.retrieve("vectors")


async def test_models_lists_only_the_services_the_callers_key_may_use() -> None:
    """Another tenant's routes stay out of sight: a key limited to some services (or to a
    category) lists only those, and retrieving any other is the unknown model's 404."""
    base = anthropic_tests.governance()
    governance = dataclasses.replace(
        base, tenants=MappingProxyType({**base.tenants, "vectors": TenantView(
            "vectors", allowed_categories=frozenset({"embedding"}))}),
        keys=MappingProxyType({**base.keys, "k4": ("vectors", hashlib.sha256(VECTORS_KEY.encode()).digest())}))
    async with anthropic_tests.serving(governance) as (url, _agent):
        for key, allowed in ((anthropic_tests.KEY, ["claude", "embed", "gpt-mini"]),
                             (anthropic_tests.NARROW_KEY, ["gpt-mini"]), (VECTORS_KEY, ["embed"])):
            sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
            assert sorted(m.id for m in (await sdk.models.list()).data) == allowed
            for name in ("claude", "embed", "gpt-mini"):
                if name in allowed:
                    assert (await sdk.models.retrieve(name)).id == name
                    continue
                with pytest.raises(openai.NotFoundError) as caught:
                    await sdk.models.retrieve(name)
                assert caught.value.code == "model_not_found"  # the unknown model's answer, word for word
                unknown = f"The model `{name}` does not exist or you do not have access to it."
                assert caught.value.message.endswith(unknown)
            with pytest.raises(openai.AuthenticationError):
                await openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sg-k9-nobody", max_retries=0).models.list()


async def test_unknown_model_is_404_in_openai_shape(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.chat.completions.create(model="gpt-9", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found" and caught.value.param == "model"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat/completions", b"{not json", None),
        ("/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        ("/chat/completions", b'{"model": "gpt-mini"}', "messages"),
        ("/chat/completions", b'{"model": "gpt-mini", "messages": ["x"]}', "messages[0]"),
        (
            "/chat/completions",
            b'{"model": "gpt-mini", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            "stream",
        ),
        ("/embeddings", b'{"model": "embed"}', "input"),
        ("/chat/completions", b'{"model": "embed", "messages": [{"role": "user", "content": "x"}]}', "model"),
    ],
)
async def test_malformed_input_is_400_naming_the_field(
    door: tuple[str, Agent], path: str, body: bytes, param: str | None
) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(door[0] + path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error"


async def test_failover_and_upstream_failure_mapping(
    sdk: openai.AsyncOpenAI, upstreams: tuple[EmulatorGroup, Running], door: tuple[str, Agent]
) -> None:
    group, _ = upstreams
    group.set_faults("a", Faults(fail_next=1, error_status=503))
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert raw.headers["x-switchgear-endpoint"] == "e1" and raw.headers["x-switchgear-attempts"] == "2"
    for name in ("a", "b"):
        group.set_faults(name, Faults(rate_limit_rate=1.0, retry_after_s=2))
    with pytest.raises(openai.RateLimitError) as limited:
        await sdk.chat.completions.create(model="gpt-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert limited.value.response.headers["retry-after"] == "2"
    for name in ("a", "b"):
        group.set_faults(name, Faults(error_rate=1.0, error_status=500))
    with pytest.raises(openai.InternalServerError) as unavailable:
        await sdk.chat.completions.create(model="gpt-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert unavailable.value.status_code == 503
    with pytest.raises(openai.InternalServerError) as streamed:
        await sdk.chat.completions.create(model="gpt-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert streamed.value.status_code == 503  # before the first token: a plain HTTP error


async def test_stream_failing_after_first_token_ends_with_an_error_event(
    sdk: openai.AsyncOpenAI, upstreams: tuple[EmulatorGroup, Running]
) -> None:
    upstreams[0].set_faults("a", Faults(stream_cut_after=2))
    stream = await sdk.chat.completions.create(model="gpt-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    received: list[Any] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            received.append(chunk)
    assert "no failover possible" in caught.value.message
    assert sum(1 for c in received if c.choices and c.choices[0].delta.content) == 2
    assert upstreams[0].stats("b")["total"] == 0


async def test_no_snapshot_is_503() -> None:
    agent = make_agent(snapshot())
    agent.holder.current = None
    app = front_door.build_app(agent.holder, agent.invoker, agent.streamer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/v1/models")
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
    finally:
        await runner.cleanup()
