"""The front door's OpenAI Responses API (POST /v1/responses), driven by the official `openai`
SDK against the door serving live emulators: translation to chat.completions for an
OpenAI-protocol and an Anthropic-protocol target, JSON and streamed (the SDK's stream state
machine parses every event), tools, and refusals in OpenAI's error shape that reach no upstream."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from switchgear.adapters.base import TokenUsage
from switchgear.controlplane.model import SEED_LLM_PRESET
from switchgear.dataplane import access_log
from switchgear.dataplane import http as front_door
from switchgear.dataplane.governance import Governance, Quota, TenantView
from switchgear.dataplane.http_edge import _OPERATIONS
from switchgear.dataplane.responses_door import (
    MAPPED,
    REFUSED_KEYS,
    ChatToEvents,
    Refused,
    chat_request,
    response_from_chat,
)
from switchgear.dataplane.stream import StreamEnd, fallback_chunk
from switchgear.emulators.openai import InstanceSpec, reply_text, start_instances
from tests import test_anthropic_door as anthropic_tests
from tests import test_fallback_presets as presets
from tests.conftest import ControlPlane, service
from tests.test_anthropic_door import KEY, NARROW_KEY, break_upstreams, serving, slow_body
from tests.test_door_obs import add_tenant, scrape, start_agent, total, until_ready
from tests.test_stream import Agent, make_agent

TIGHT_KEY = "sg-k3-tight-secret"  # a tenant allowed one request a minute
PROMPT = "hello responses door"
TOOL: Any = {"type": "function", "name": "lookup", "description": "looks a thing up", "strict": False,
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}
MODELS = [("gpt-mini", "a"), ("claude", "anthropic")]


def _governance() -> Governance:
    """The Anthropic door tests' tenants (acme; narrow: gpt-mini only) and a tight one: one request a minute."""
    base = anthropic_tests.governance()
    return Governance(
        tenants=MappingProxyType({**base.tenants, "tight": TenantView("tight", quota=Quota(requests_per_minute=1))}),
        keys=MappingProxyType({**base.keys, "k3": ("tight", hashlib.sha256(TIGHT_KEY.encode()).digest())}))


@pytest.fixture
async def door() -> AsyncIterator[tuple[str, Agent]]:
    async with serving(_governance()) as running:
        yield running


@pytest.fixture
def sdk(door: tuple[str, Agent]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{door[0]}/v1", api_key=KEY, max_retries=0)


@pytest.mark.parametrize(("model", "instance"), MODELS)
async def test_text_with_either_target_protocol(sdk: openai.AsyncOpenAI, model: str, instance: str) -> None:
    raw = await sdk.responses.with_raw_response.create(model=model, input=PROMPT, instructions="be brief",
                                                       metadata={"run": "r1"}, store=True)
    response = raw.parse()
    assert response.object == "response" and response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == reply_text(instance, PROMPT) and response.output[0].type == "message"
    assert response.model == model and response.instructions == "be brief" and response.metadata == {"run": "r1"}
    assert response.to_dict()["store"] is False  # never pretends to store
    assert raw.headers["x-switchgear-service"] == model and float(raw.headers["x-switchgear-cost-usd"]) > 0
    usage = response.usage
    assert usage is not None and usage.total_tokens == usage.input_tokens + usage.output_tokens > 0
    # the same prompt on the chat route meters the same tokens
    chat = await sdk.chat.completions.create(model=model, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}])
    assert chat.usage is not None
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    bare = await sdk.responses.create(model=model, input=PROMPT)
    assert bare.usage is not None and bare.usage.input_tokens < usage.input_tokens  # instructions went upstream


@pytest.mark.parametrize(("model", "instance"), MODELS)
async def test_multi_turn_input_list(sdk: openai.AsyncOpenAI, model: str, instance: str) -> None:
    response = await sdk.responses.create(model=model, input=[
        {"role": "developer", "content": "answer kindly"},
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier answer"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": PROMPT}]},
    ])
    assert response.output_text == reply_text(instance, PROMPT)
    short = await sdk.responses.create(model=model, input=PROMPT)
    assert response.usage is not None and short.usage is not None
    assert response.usage.input_tokens > short.usage.input_tokens  # every turn reached the upstream


@pytest.mark.parametrize(("model", "instance"), MODELS)
async def test_tool_call_then_its_output_answered(sdk: openai.AsyncOpenAI, model: str, instance: str) -> None:
    question: list[Any] = [{"role": "user", "content": "please lookup the weather"}]
    first = await sdk.responses.create(model=model, input=question, tools=[TOOL])
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "lookup" and orjson.loads(calls[0].arguments)
    assert calls[0].call_id and calls[0].id and first.status == "completed"
    # the caller runs the tool and sends the whole conversation back (the door keeps no state)
    followup = [*question, *first.output, {"type": "function_call_output", "call_id": calls[0].call_id,
                                           "output": "sunny, 21 degrees"}]
    second = await sdk.responses.create(model=model, input=followup, tools=[TOOL])
    assert second.status == "completed" and second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # the call and its output went upstream
    if instance == "anthropic":  # a tool_result answers the call: the emulator answers with text
        assert second.output_text and second.output[0].type == "message"
    named = await sdk.responses.create(model=model, input="no names here", tools=[TOOL],
                                       tool_choice={"type": "function", "name": "lookup"})
    assert [item.type for item in named.output][-1] == "function_call"


@pytest.mark.parametrize(("model", "instance"), MODELS)
async def test_streamed_text_through_the_sdk(sdk: openai.AsyncOpenAI, model: str, instance: str) -> None:
    async with sdk.responses.stream(model=model, input=PROMPT, instructions="be brief") as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == reply_text(instance, PROMPT) == final.output_text
    unary = await sdk.responses.create(model=model, input=PROMPT, instructions="be brief")
    assert final.usage is not None and unary.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (unary.usage.input_tokens,
                                                                      unary.usage.output_tokens)
    assert final.id == events[0].response.id  # type: ignore[union-attr]


@pytest.mark.parametrize(("model", "instance"), MODELS)
async def test_streamed_tool_call_through_the_sdk(sdk: openai.AsyncOpenAI, model: str, instance: str) -> None:
    request: dict[str, Any] = {"model": model, "input": "please lookup the weather", "tools": [TOOL],
                               "tool_choice": "required"}
    async with sdk.responses.stream(**request) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert kinds[-1] == "response.completed"
    streamed = [item for item in final.output if item.type == "function_call"]
    unary = [item for item in (await sdk.responses.create(**request)).output if item.type == "function_call"]
    assert [(c.name, orjson.loads(c.arguments)) for c in streamed] == [
        (c.name, orjson.loads(c.arguments)) for c in unary]
    assert streamed[0].name == "lookup"


@pytest.mark.parametrize("model", ["gpt-mini", "claude"])
async def test_max_output_tokens_makes_an_incomplete_response(sdk: openai.AsyncOpenAI, model: str) -> None:
    response = await sdk.responses.create(model=model, input=PROMPT, max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens" and response.max_output_tokens == 3
    stream = await sdk.responses.create(model=model, input=PROMPT, max_output_tokens=3, stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]


async def test_anonymous_and_wrong_keys_get_401(door: tuple[str, Agent]) -> None:
    for key in ("sg-k1-wrong", "not-a-key"):
        client = openai.AsyncOpenAI(base_url=f"{door[0]}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            await client.responses.create(model="gpt-mini", input="x")
        assert isinstance(info.value.body, dict) and set(info.value.body) == {"message", "type", "param", "code"}
    async with httpx.AsyncClient(base_url=door[0]) as http:
        response = await http.post("/v1/responses", content=b'{"model": "gpt-mini", "input": "x"}')
    assert response.status_code == 401 and "error" in response.json()
    assert len(door[1].recorder.ended) == 0


async def test_unknown_model_is_404_and_an_embedding_service_400(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.responses.create(model="nope", input="x")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as embed:
        await sdk.responses.create(model="embed", input="x")
    assert embed.value.param == "model"


def _body(**fields: Any) -> bytes:
    return orjson.dumps({"model": "gpt-mini", "input": PROMPT, **fields})


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (orjson.dumps({"input": "x"}), 400, "model"),
    (orjson.dumps({"model": "gpt-mini"}), 400, "input"),
    (_body(input=5), 400, "input"),
    (_body(input=[{"role": "robot", "content": "x"}]), 400, "input[0].role"),
    (_body(input=[{"type": "reasoning", "id": "rs_1", "summary": []}]), 400, "input[0].type"),
    (_body(input=[{"type": "item_reference", "id": "msg_1"}]), 400, "input[0].type"),
    (_body(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]), 400,
     "input[0].content[0].type"),
    (_body(temperature="hot"), 400, "temperature"),
    (_body(max_output_tokens=0), 400, "max_output_tokens"),
    (_body(tools=[{"type": "web_search"}]), 400, "tools[0].type"),
    (_body(tools=[{"type": "file_search", "vector_store_ids": ["vs"]}]), 400, "tools[0].type"),
    (_body(tool_choice={"type": "web_search_preview"}), 400, "tool_choice"),
    (_body(previous_response_id="resp_123"), 400, "previous_response_id"),
    (_body(conversation="conv_1"), 400, "conversation"),
    (_body(background=True), 400, "background"),
    (_body(include=["reasoning.encrypted_content"]), 400, "include"),
    (_body(reasoning={"effort": "low", "summary": "auto"}), 400, "reasoning.summary"),
    (_body(frobnicate=1), 400, "frobnicate"),
    (_body(text={"format": {"type": "json_schema", "name": "x"}}), 400, "text.format.schema"),
    (_body(metadata={"a": ["b"]}), 400, "metadata.a"),
    (_body(stream=True, stream_options={"include_obfuscation": "yes"}), 400, "stream_options.include_obfuscation"),
    (_body(stream=True, stream_options={"include_usage": True}), 400, "stream_options.include_usage"),
    (b'{"model": "gpt-mini", "input": "x", "metadata": {"a": ' + b"[" * 100 + b"]" * 100 + b"}}", 400, "metadata"),
    (_body(pad="x" * 300_000), 413, None),
    (orjson.dumps({"model": "gpt-mini", "input": [{"role": "user", "content": "x"}] * 20_000}), 413, None),
])
async def test_bad_bodies_are_refused_naming_the_field_before_any_upstream(
        door: tuple[str, Agent], body: bytes, status: int, param: str | None) -> None:
    base, agent = door
    async with httpx.AsyncClient(base_url=base) as http:
        before = await _emulator_total(http, agent)
        response = await http.post("/v1/responses", content=body, headers={"Authorization": f"Bearer {KEY}"})
        assert await _emulator_total(http, agent) == before
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param), error
        assert param.split("[")[0].split(".")[0] in error["message"]
    assert len(agent.recorder.ended) == 0  # refused before any upstream attempt


async def _emulator_total(http: httpx.AsyncClient, agent: Agent) -> int:
    snap = agent.holder.current
    assert snap is not None
    base = snap.services["gpt-mini"].endpoints[0].url.removesuffix("/v1")
    return int((await http.get(f"{base}/_emulator/stats")).json()["total"])


async def test_a_huge_input_list_within_the_body_limit_is_served(sdk: openai.AsyncOpenAI) -> None:
    turns: list[Any] = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 2000
    response = await sdk.responses.create(model="gpt-mini", input=[*turns, {"role": "user", "content": PROMPT}])
    assert response.output_text == reply_text("a", PROMPT)


async def test_a_tenant_over_its_quota_gets_429_and_others_are_unaffected(door: tuple[str, Agent]) -> None:
    tight = openai.AsyncOpenAI(base_url=f"{door[0]}/v1", api_key=TIGHT_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError):  # a caller's own mistake does not spend its quota
        await tight.responses.create(model="gpt-mini", input="x", tools=[{"type": "web_search"}])
    await tight.responses.create(model="gpt-mini", input=PROMPT)
    with pytest.raises(openai.RateLimitError) as info:
        await tight.responses.create(model="gpt-mini", input=PROMPT)
    assert info.value.status_code == 429 and info.value.type
    acme = openai.AsyncOpenAI(base_url=f"{door[0]}/v1", api_key=KEY, max_retries=0)
    assert (await acme.responses.create(model="gpt-mini", input=PROMPT)).output_text == reply_text("a", PROMPT)


async def test_another_tenants_service_is_403_before_any_upstream(door: tuple[str, Agent]) -> None:
    narrow = openai.AsyncOpenAI(base_url=f"{door[0]}/v1", api_key=NARROW_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as info:
        await narrow.responses.create(model="claude", input=PROMPT)
    assert info.value.status_code == 403 and len(door[1].recorder.ended) == 0
    assert (await narrow.responses.create(model="gpt-mini", input=PROMPT)).output_text == reply_text("a", PROMPT)


async def test_a_slow_body_is_408(door: tuple[str, Agent]) -> None:
    head, body = await slow_body(door[0], "/v1/responses", b"Authorization: Bearer " + KEY.encode())
    assert head.startswith(b"HTTP/1.1 408") and set(body["error"]) == {"message", "type", "param", "code"}


async def test_upstream_failures_keep_the_openai_shape(door: tuple[str, Agent]) -> None:
    base, agent = door
    await break_upstreams(agent)
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        await client.responses.create(model="gpt-mini", input=PROMPT)
    assert info.value.status_code == 503
    stream = await client.responses.create(model="claude", input=PROMPT, stream=True)
    events = [event async for event in stream]  # a stream cut after its first tokens: error, then failed
    assert [event.type for event in events[-2:]] == ["error", "response.failed"]
    assert events[-1].response.status == "failed" and events[-1].response.error is not None  # type: ignore[union-attr]
    assert events[-1].response.output[0].type == "message"  # type: ignore[union-attr]  # what had gone out


async def test_upstream_rate_limits_and_timeouts_are_429_and_504(door: tuple[str, Agent]) -> None:
    base, agent = door
    snap = agent.holder.current
    assert snap is not None
    openai_faults = f"{snap.services['gpt-mini'].endpoints[0].url.removesuffix('/v1')}/_emulator/faults"
    claude_faults = f"{snap.services['claude'].endpoints[0].url.rstrip('/')}/_emulator/faults"
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0,
                                default_headers={"x-switchgear-max-retries": "0"})
    async with httpx.AsyncClient() as http:
        assert (await http.post(openai_faults, json={"rate_limit_rate": 1.0, "retry_after_s": 2})).status_code == 200
        assert (await http.post(claude_faults, json={"hang": True})).status_code == 200
    with pytest.raises(openai.RateLimitError) as limited:
        await client.responses.create(model="gpt-mini", input=PROMPT)
    assert limited.value.response.headers["Retry-After"] == "2"
    with pytest.raises(openai.APIStatusError) as late:
        await client.responses.create(model="claude", input=PROMPT, extra_headers={"x-switchgear-timeout": "0.2"})
    assert late.value.status_code == 504 and isinstance(late.value.body, dict) and late.value.body["message"]


async def test_stored_responses_are_404_saying_the_door_keeps_none(sdk: openai.AsyncOpenAI,
                                                                    door: tuple[str, Agent]) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.responses.retrieve("resp_123")
    assert "keeps no responses" in info.value.message
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.delete("resp_123")
    async with httpx.AsyncClient(base_url=door[0]) as http:  # and only after the caller's key
        assert (await http.get("/v1/responses/resp_123")).status_code == 401


async def test_the_agent_labels_logs_and_counts_the_route(
    control_plane: ControlPlane, caplog: pytest.LogCaptureFixture,
) -> None:
    """A real agent on a control plane: /v1/responses is served, its access-log line and request
    metrics name the operation "responses", the route, the tenant and the metered tokens."""
    access_log.reset()
    caplog.set_level(logging.INFO, logger="switchgear.access")
    async with await start_instances([InstanceSpec("a")]) as group:
        control_plane.registry.register(service("chat", group.urls["a"], model="gpt-4o-mini"), "test")
        secret = add_tenant(control_plane, "acme")
        agent = await start_agent([control_plane.address])
        try:
            client = openai.AsyncOpenAI(base_url=f"http://{agent.http}/v1", api_key=secret, max_retries=0)
            async with aiohttp.ClientSession() as session:
                await until_ready(session, f"http://{agent.http}")
            before = scrape(agent.metrics)
            caplog.clear()
            answer = await client.responses.create(model="chat", input=PROMPT)
            async with client.responses.stream(model="chat", input=PROMPT) as stream:
                streamed = await stream.get_final_response()
            after = scrape(agent.metrics)
        finally:
            await agent.close()
            access_log.reset()
    assert answer.output_text == streamed.output_text == reply_text("a", PROMPT)
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "switchgear.access"]
    assert [(line["method"], line["status"], line["route"], line["tenant"]) for line in lines] == [
        ("responses", 200, "chat", "acme")] * 2
    assert answer.usage is not None and lines[0]["input_tokens"] == answer.usage.input_tokens > 0
    assert total(after, "switchgear_requests", door="http", route="chat", tenant="acme") - total(
        before, "switchgear_requests", door="http", route="chat", tenant="acme") == 2


@pytest.fixture
async def dead_door() -> AsyncIterator[str]:
    """An open door (no keys) whose only llm service is down, with the seed's llm preset."""
    agent = make_agent(presets.snapshot_with({"llm": SEED_LLM_PRESET}, presets.dead_chat("gpt-dead")))
    runner, address = await front_door.start(agent.holder, agent.invoker, agent.streamer, "127.0.0.1:0")
    yield f"http://{address}/v1"
    await runner.cleanup()
    await agent.pool.close()


async def test_a_preset_fallback_answers_as_a_response(dead_door: str) -> None:
    client = openai.AsyncOpenAI(base_url=dead_door, api_key="unused", max_retries=0)
    raw = await client.responses.with_raw_response.create(model="gpt-dead", input=PROMPT)
    assert raw.headers["x-switchgear-fallback"] == "preset_response"
    assert raw.parse().output_text == SEED_LLM_PRESET and raw.parse().status == "completed"
    async with client.responses.stream(model="gpt-dead", input=PROMPT) as stream:
        final = await stream.get_final_response()
    assert final.output_text == SEED_LLM_PRESET
    # the preset's chunk is a FallbackChunk (a bytes subclass): the Anthropic door's stream reads it too
    async with httpx.AsyncClient() as http:
        answer = await http.post(f"{dead_door.removesuffix('/v1')}/v1/messages", json={
            "model": "gpt-dead", "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert SEED_LLM_PRESET in "".join(e["delta"]["text"] for k, e in anthropic_tests._events(answer.content)
                                      if k == "content_block_delta")


def test_a_task_queue_answer_is_a_queued_response() -> None:
    task = {"processed": False, "fallback": True, "task_id": "t-1", "queue_id": "queue_r1"}
    body = {"model": "m", "input": "x"}
    answer = response_from_chat(task, body, "m", "r1", TokenUsage(), 0)
    assert (answer["status"], answer["output"], answer["switchgear_task"]) == ("queued", [], task)
    mapper = ChatToEvents(body, "m", "r1", 0)
    raw = mapper.start() + mapper.feed(fallback_chunk(orjson.dumps(task), "task_queue")) + mapper.end(
        StreamEnd("m", "", 0, 0.0, 0.0, TokenUsage(), 0.0, True, "1"))
    events = _frames(raw)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.queued"]
    assert events[-1]["response"]["switchgear_task"] == task


def test_a_full_request_maps_to_chat() -> None:
    chat = chat_request({
        "model": "m", "instructions": "sys", "max_output_tokens": 50, "temperature": 0.5, "top_p": 0.9,
        "user": "u1", "parallel_tool_calls": False, "tools": [TOOL], "tool_choice": "required",
        "reasoning": {"effort": "low"}, "metadata": {"k": "v"}, "store": True, "stream": True,
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}},
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "look "},
                                         {"type": "input_image", "image_url": "data:image/png;base64,AA"}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "calling", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "lookup", "arguments": '{"query":"b"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        ]})
    assert chat["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "look "},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
        {"role": "assistant", "content": "calling", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": '{"query":"b"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "lookup", "description": "looks a thing up", "parameters": TOOL["parameters"], "strict": False}}]
    assert (chat["tool_choice"], chat["parallel_tool_calls"], chat["max_completion_tokens"]) == ("required", False, 50)
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "out", "schema": {"type": "object"}, "strict": True}}
    assert chat["reasoning_effort"] == "low" and chat["user"] == "u1" and "metadata" not in chat
    assert chat["stream_options"] == {"include_usage": True}
    assert set(REFUSED_KEYS).isdisjoint(MAPPED) and _OPERATIONS["/v1/responses"] == "responses"


def _calls(*call: dict[str, Any]) -> dict[str, Any]:
    """A chat chunk carrying tool call deltas."""
    return {"choices": [{"delta": {"tool_calls": list(call)}}]}


def _frames(raw: bytes) -> list[dict[str, Any]]:
    """The data of each SSE event in `raw`."""
    return [orjson.loads(frame.split(b"\ndata: ", 1)[1]) for frame in raw.split(b"\n\n") if frame]


def test_chat_chunks_become_response_events_in_order() -> None:
    mapper = ChatToEvents({"model": "m", "input": "x"}, "m", "r1", 0)
    chunks = [
        {"choices": [{"delta": {"role": "assistant", "content": "hi"}}]},
        _calls({"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}),
        _calls({"index": 0, "function": {"arguments": '{"q":'}}),
        _calls({"index": 1, "id": "c2", "function": {"name": "g", "arguments": "{}"}}),
        _calls({"index": 0, "function": {"arguments": "1}"}}),  # a late piece of a closed call: kept
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}},
    ]
    raw = mapper.start() + b"".join(mapper.feed(orjson.dumps(c)) for c in chunks) + mapper.end(
        StreamEnd("m", "e0", 1, 0.0, 0.0, TokenUsage(5, 7), 0.0, False, "1"))
    events = _frames(raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][1]["arguments"] == '{"q":1}' and final["status"] == "completed"
    assert final["usage"]["input_tokens"] == 5 and final["usage"]["total_tokens"] == 12


def test_interleaved_text_tool_calls_and_refusals_satisfy_the_sdks_stream_state() -> None:
    """Orders the emulators do not stream (text, a call, text again, a refusal) through the SDK's
    own stream accumulator, which checks item identities, indexes and completion."""
    mapper = ChatToEvents({"model": "m", "input": "x"}, "m", "r1", 0)
    chunks = [
        {"choices": [{"delta": {"content": "hi"}}]},
        _calls({"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}),
        {"choices": [{"delta": {"content": "more"}}]},
        {"choices": [{"delta": {"refusal": "no"}}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
    ]
    raw = mapper.start() + b"".join(mapper.feed(orjson.dumps(c)) for c in chunks) + mapper.end(
        StreamEnd("m", "e0", 1, 0.0, 0.0, TokenUsage(3, 4), 0.0, False, "1"))
    state: Any = ResponseStreamState(input_tools=openai.omit, text_format=openai.omit)
    for data in _frames(raw):
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=data))
    final = state._completed_response
    assert [(item.type, item.id) for item in final.output] == [
        ("message", "msg_r1"), ("function_call", "fc_r1_0"), ("message", "msg_r1_1"), ("message", "msg_r1_2")]
    assert final.output_text == "himore" and final.output[3].content[0].refusal == "no"


_CHUNK = st.one_of(
    st.builds(lambda text: {"choices": [{"delta": {"content": text}}]}, st.text(max_size=3)),
    st.builds(lambda text: {"choices": [{"delta": {"refusal": text}}]}, st.text(max_size=3)),
    st.builds(lambda k, args: _calls({"index": k, "id": f"c{k}", "function": {"name": f"f{k}", "arguments": args}}),
              st.integers(0, 2), st.text(max_size=3)),
    st.builds(lambda k, args: _calls({"index": k, "function": {"arguments": args}}), st.integers(0, 2),
              st.text(max_size=3)),
    st.builds(lambda reason: {"choices": [{"delta": {}, "finish_reason": reason}]},
              st.sampled_from(["stop", "length", "tool_calls", "content_filter"])),
    st.just({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_CHUNK, max_size=12))
def test_any_chunk_sequence_streams_events_the_sdk_accepts(chunks: list[dict[str, Any]]) -> None:
    mapper = ChatToEvents({"model": "m", "input": "x"}, "m", "r1", 0)
    raw = mapper.start() + b"".join(mapper.feed(orjson.dumps(c)) for c in chunks) + mapper.end(
        StreamEnd("m", "e0", 1, 0.0, 0.0, TokenUsage(1, 2), 0.0, False, "1"))
    state: Any = ResponseStreamState(input_tools=openai.omit, text_format=openai.omit)
    events = _frames(raw)
    for data in events:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=data))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert events[-1]["type"] == ("response.completed" if final["status"] == "completed" else "response.incomplete")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "".join(part.get("text", "") for item in final["output"] if item["type"] == "message"
                   for part in item["content"]) == text
    if final["status"] == "completed":
        assert state._completed_response.output_text == text


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4), max_leaves=20)
_KEYS = sorted(MAPPED | set(REFUSED_KEYS))
_ITEM = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning"]) | _JSON,
    "role": st.sampled_from(["user", "assistant", "system", "developer"]) | _JSON,
    "content": st.text(max_size=4) | st.lists(st.fixed_dictionaries({
        "type": st.sampled_from(["input_text", "output_text", "input_image", "refusal"]) | _JSON},
        optional={"text": _JSON, "image_url": _JSON, "refusal": _JSON, "detail": _JSON}), max_size=3) | _JSON,
    "call_id": _JSON, "name": _JSON, "arguments": _JSON, "output": _JSON})
_BODY = st.fixed_dictionaries(
    {"model": st.just("m") | _JSON, "input": st.text(max_size=4) | st.lists(_ITEM, max_size=4) | _JSON},
    optional={key: _JSON for key in _KEYS if key not in ("model", "input")}) | _JSON


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_BODY)
def test_any_json_is_mapped_or_refused_naming_a_field(body: Any) -> None:
    if not isinstance(body, dict):
        body = {"model": "m", "input": body}
    try:
        chat = chat_request(body)
    except Refused as exc:
        assert exc.status == 400 and isinstance(exc.param, str)
        assert exc.param in body or exc.param.split("[")[0].split(".")[0] in body or exc.param in ("model", "input")
    else:
        assert chat["model"] == body["model"] and chat["messages"]
        orjson.dumps(chat)
