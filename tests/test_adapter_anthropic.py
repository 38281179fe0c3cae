"""The Anthropic adapter against the protocol-faithful emulator: mapping, errors, streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchgear.adapters import base
from switchgear.adapters.anthropic import (
    AnthropicAdapter,
    AnthropicOptions,
    _MessageStream,
    chat_from_message,
    messages_from_chat,
    parse_options,
)
from switchgear.adapters.base import AdapterRequest, ErrorKind, OptionsError, Target, UpstreamError
from switchgear.dataplane.assemble import ChatAssembly
from switchgear.emulators import anthropic as emu
from switchgear.emulators.common import Faults, Running

KEY = "sk-ant-test-key-123456"
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]}


@pytest.fixture
async def upstream() -> AsyncIterator[Running]:
    async with await emu.start(api_key=KEY) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


def target(up: Running, key: str = KEY, **options: object) -> Target:
    return Target(base_url=up.url, model="claude-3-sonnet", api_key=key, options=parse_options(options))


def test_chat_maps_to_messages_with_system_stop_and_max_tokens() -> None:
    body = messages_from_chat({**CHAT, "stop": "END", "max_tokens": 7, "temperature": 0.5}, "claude-x", 1024)
    assert body == {
        "model": "claude-x",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 7,
        "system": "Be brief.",
        "stop_sequences": ["END"],
        "temperature": 0.5,
    }
    assert messages_from_chat(CHAT, "m", 99)["max_tokens"] == 99


async def test_chat_completion_round_trip(upstream: Running, client: httpx.AsyncClient) -> None:
    response = await AnthropicAdapter().invoke(client, target(upstream), AdapterRequest("chat.completions", CHAT, 5))
    body = orjson.loads(response.body)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].startswith("Hello from anthropic")
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == response.usage.input_tokens > 0
    assert not response.usage.estimated


async def test_native_messages_pass_through_and_stop_reasons(upstream: Running, client: httpx.AsyncClient) -> None:
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = await AnthropicAdapter().invoke(client, target(upstream), AdapterRequest("messages", payload, 5))
    body = orjson.loads(response.body)
    assert body["type"] == "message" and body["stop_reason"] == "max_tokens"
    assert response.usage.output_tokens == body["usage"]["output_tokens"] == 2
    chat = await AnthropicAdapter().invoke(
        client, target(upstream), AdapterRequest("chat.completions", {**CHAT, "max_tokens": 2}, 5)
    )
    assert orjson.loads(chat.body)["choices"][0]["finish_reason"] == "length"
    stopped = await AnthropicAdapter().invoke(
        client, target(upstream), AdapterRequest("chat.completions", {**CHAT, "stop": ["digest"]}, 5)
    )
    assert orjson.loads(stopped.body)["choices"][0]["message"]["content"] == "Hello from anthropic: "


@pytest.mark.parametrize(
    ("faults", "kind", "status"),
    [
        (Faults(fail_next=1, error_status=529), ErrorKind.RETRYABLE, 529),
        (Faults(fail_next=1, error_status=500), ErrorKind.RETRYABLE, 500),
        (Faults(rate_limit_rate=1.0, retry_after_s=7), ErrorKind.RATE_LIMITED, 429),
    ],
)
async def test_injected_failures_are_classified(
    upstream: Running, client: httpx.AsyncClient, faults: Faults, kind: ErrorKind, status: int
) -> None:
    upstream.set_faults(faults)
    with pytest.raises(UpstreamError) as caught:
        await AnthropicAdapter().invoke(client, target(upstream), AdapterRequest("chat.completions", CHAT, 5))
    assert caught.value.kind is kind and caught.value.status == status
    if kind is ErrorKind.RATE_LIMITED:
        assert caught.value.retry_after_s == 7
    assert orjson.loads(caught.value.body)["type"] == "error"


async def test_auth_client_context_and_timeout_errors(client: httpx.AsyncClient) -> None:
    async with await emu.start(api_key=KEY, context_window=5) as up:
        adapter = AnthropicAdapter()
        with pytest.raises(UpstreamError) as auth:
            await adapter.invoke(
                client, target(up, key="sk-wrong-key-000"), AdapterRequest("chat.completions", CHAT, 5)
            )
        assert auth.value.kind is ErrorKind.AUTH and "sk-wrong-key-000" not in auth.value.message
        long = {"messages": [{"role": "user", "content": "one two three four five six seven"}]}
        with pytest.raises(UpstreamError) as context:
            await adapter.invoke(client, target(up), AdapterRequest("chat.completions", long, 5))
        assert context.value.kind is ErrorKind.CONTEXT_LENGTH
        with pytest.raises(UpstreamError) as bad_model:
            await adapter.invoke(
                client,
                Target(up.url, "no-such-model", KEY),
                AdapterRequest("messages", {"messages": [{"role": "user", "content": "x"}]}, 5),
            )
        assert bad_model.value.kind is ErrorKind.CLIENT and bad_model.value.status == 404
        with pytest.raises(UpstreamError) as client_error:
            await adapter.invoke(
                client,
                target(up),
                AdapterRequest("chat.completions", {"messages": [{"role": "tool", "content": "x"}]}, 5),
            )
        assert client_error.value.kind is ErrorKind.CLIENT
        up.set_faults(Faults(latency_ms=500))
        with pytest.raises(UpstreamError) as timeout:
            await adapter.invoke(client, target(up), AdapterRequest("chat.completions", CHAT, 0.1))
        assert timeout.value.kind is ErrorKind.TIMEOUT


async def test_connection_refused_is_connect(client: httpx.AsyncClient) -> None:
    with pytest.raises(UpstreamError) as caught:
        await AnthropicAdapter().invoke(
            client,
            Target("http://127.0.0.1:9", "m", KEY),
            AdapterRequest("messages", {"messages": [{"role": "user", "content": "x"}]}, 2),
        )
    assert caught.value.kind is ErrorKind.CONNECT


async def test_stream_chat_as_openai_chunks(upstream: Running, client: httpx.AsyncClient) -> None:
    chunks = [
        c
        async for c in AnthropicAdapter().stream(client, target(upstream), AdapterRequest("chat.completions", CHAT, 5))
    ]
    *body, final = chunks
    parsed = [orjson.loads(c.data) for c in body]
    assert all(p["object"] == "chat.completion.chunk" for p in parsed)
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in parsed)
    assert text.startswith("Hello from anthropic")
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    assert final.usage is not None and final.usage.output_tokens > 0 and not final.usage.estimated
    assert final.finish_reason == "stop"


async def test_stream_native_events_in_order(upstream: Running, client: httpx.AsyncClient) -> None:
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    chunks = [
        c async for c in AnthropicAdapter().stream(client, target(upstream), AdapterRequest("messages", payload, 5))
    ]
    types = [orjson.loads(c.data)["type"] for c in chunks if c.data]
    assert types[:3] == ["message_start", "content_block_start", "ping"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert types.count("content_block_delta") == 3
    assert chunks[-1].usage is not None and chunks[-1].usage.output_tokens == 3 and chunks[-1].finish_reason == "length"


async def test_stream_error_event_mid_stream_is_retryable(upstream: Running, client: httpx.AsyncClient) -> None:
    upstream.set_faults(Faults(stream_cut_after=2))
    seen = []
    with pytest.raises(UpstreamError) as caught:
        async for chunk in AnthropicAdapter().stream(
            client, target(upstream), AdapterRequest("chat.completions", CHAT, 5)
        ):
            seen.append(chunk)
    assert caught.value.kind is ErrorKind.RETRYABLE and "overloaded_error" in caught.value.message
    assert sum(c.content for c in seen) == 2


async def test_stream_failure_before_first_byte(upstream: Running, client: httpx.AsyncClient) -> None:
    upstream.set_faults(Faults(fail_next=1, error_status=529))
    with pytest.raises(UpstreamError) as caught:
        async for _ in AnthropicAdapter().stream(client, target(upstream), AdapterRequest("chat.completions", CHAT, 5)):
            pass
    assert caught.value.kind is ErrorKind.RETRYABLE and caught.value.status == 529


async def test_headers_sent(client: httpx.AsyncClient) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "m",
                "content": [{"type": "text", "text": "ok"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 3, "output_tokens": 1},
            },
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mock:
        t = Target("https://api.anthropic.com", "claude-3-sonnet", KEY, AnthropicOptions(beta="tools-2024"))
        await AnthropicAdapter().invoke(
            mock, t, AdapterRequest("messages", {"messages": [{"role": "user", "content": "x"}]}, 5, "rid")
        )
    request = seen[0]
    assert str(request.url) == "https://api.anthropic.com/v1/messages"
    assert request.headers["x-api-key"] == KEY and request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["anthropic-beta"] == "tools-2024" and "authorization" not in request.headers


def test_options_are_validated() -> None:
    with pytest.raises(OptionsError) as caught:
        parse_options({"verison": "x"})
    assert caught.value.path == "verison"
    with pytest.raises(OptionsError):
        parse_options({"default_max_tokens": 0})


# ---------------------------------------------------------------------------------------
# tool calling on "chat.completions"

TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"the {name} tool",
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}
    for name in ("lookup", "weather")
]
ASK = {"messages": [{"role": "user", "content": "lookup the weather in Oslo"}], "tools": TOOLS}


def test_tools_and_a_tool_conversation_map_to_anthropic_shapes() -> None:
    payload = {
        "messages": [
            {"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": "Calling.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
                {"id": "functions.lookup:2", "type": "function", "function": {"name": "lookup", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "functions.lookup:2", "content": [{"type": "text", "text": "found"}]},
            {"role": "user", "content": "and tomorrow?"},
        ],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "parallel_tool_calls": False,
    }
    body = messages_from_chat(payload, "claude-x", 64)
    assert body["tools"] == [
        {"name": "lookup", "description": "the lookup tool", "input_schema": TOOLS[0]["function"]["parameters"]},
        {"name": "weather", "description": "the weather tool", "input_schema": TOOLS[1]["function"]["parameters"]},
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "weather", "disable_parallel_tool_use": True}
    assert body["messages"] == [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Calling."},
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "functions_lookup_2", "name": "lookup", "input": {}}]},  # another's id
        {"role": "user", "content": [  # one user turn: the results first, then the user's words
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "functions_lookup_2",
             "content": [{"type": "text", "text": "found"}]},
            {"type": "text", "text": "and tomorrow?"}]},
    ]
    choices = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}
    for openai_choice, anthropic_choice in choices.items():
        assert messages_from_chat({**ASK, "tool_choice": openai_choice}, "m", 8)["tool_choice"] == anthropic_choice
    assert "tool_choice" not in messages_from_chat(ASK, "m", 8)
    assert messages_from_chat({**ASK, "parallel_tool_calls": False}, "m", 8)["tool_choice"] == {
        "type": "auto", "disable_parallel_tool_use": True}


def _whole_calls(chat: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": c["function"]["name"], "input": orjson.loads(c["function"]["arguments"])}
            for c in chat["choices"][0]["message"].get("tool_calls", ())]


async def _streamed(client: httpx.AsyncClient, up: Running, payload: dict[str, Any]) -> list[base.StreamChunk]:
    return [c async for c in AnthropicAdapter().stream(client, target(up), AdapterRequest("chat.completions",
                                                                                           payload, 5))]


def _assembled(chunks: list[base.StreamChunk]) -> dict[str, Any]:
    assembly = ChatAssembly(openai=False)
    for chunk in chunks[:-1]:
        assembly.add(chunk.data)
    assert chunks[-1].usage is not None
    return dict(orjson.loads(assembly.body(chunks[-1].usage)))


def _without_ids(chat: dict[str, Any]) -> dict[str, Any]:
    """A copy of a chat completion without what differs between two answers (ids, created)."""
    chat = {k: v for k, v in orjson.loads(orjson.dumps(chat)).items() if k not in ("id", "created")}
    for call in chat["choices"][0]["message"].get("tool_calls", ()):
        assert call.pop("id").startswith("toolu_")
    return chat


async def test_a_tool_round_trip_whole_and_streamed(upstream: Running, client: httpx.AsyncClient) -> None:
    """Tools in, tool calls out (whole and streamed: the chunks assembled are the whole answer);
    then the conversation goes on with the calls and their results, which the emulator pairs
    as Anthropic does, and is answered with text."""
    adapter = AnthropicAdapter()
    whole = orjson.loads((await adapter.invoke(client, target(upstream), AdapterRequest("chat.completions",
                                                                                          ASK, 5))).body)
    message = whole["choices"][0]["message"]
    assert whole["choices"][0]["finish_reason"] == "tool_calls" and message["content"] == "I will call lookup, weather."
    assert _whole_calls(whole) == [{"name": "lookup", "input": {"query": "lookup the weather in Oslo", "call": 0}},
                                   {"name": "weather", "input": {"query": "lookup the weather in Oslo", "call": 1}}]
    chunks = await _streamed(client, upstream, ASK)
    deltas = [orjson.loads(c.data)["choices"][0]["delta"] for c in chunks[:-1]]
    calls = [call for d in deltas for call in d.get("tool_calls", ())]
    assert [c["index"] for c in calls if "id" in c] == [0, 1]  # tool call ordinals: block indexes are 1 and 2
    assert all(c.content for c, d in zip(chunks, deltas, strict=False) if "tool_calls" in d)  # first token
    spelled = "".join(c["function"]["arguments"] for c in calls if c["index"] == 0)
    assert spelled != message["tool_calls"][0]["function"]["arguments"]  # Anthropic's spacing, not orjson's
    assert orjson.loads(spelled) == orjson.loads(message["tool_calls"][0]["function"]["arguments"])
    assert _without_ids(_assembled(chunks)) == _without_ids(whole)  # arguments equal as text: re-serialised
    assert chunks[-1].finish_reason == "tool_calls" and not chunks[-1].usage.estimated  # type: ignore[union-attr]

    results = [{"role": "tool", "tool_call_id": c["id"], "content": f"result {i}"}
               for i, c in enumerate(message["tool_calls"])]
    second = {**ASK, "messages": [*ASK["messages"], message, *results]}
    answer = orjson.loads((await adapter.invoke(client, target(upstream), AdapterRequest("chat.completions",
                                                                                           second, 5))).body)
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["message"]["content"].endswith("You said: result 0 result 1")
    assert "tool_calls" not in answer["choices"][0]["message"]
    streamed = _assembled(await _streamed(client, upstream, second))
    assert streamed["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("choice", "parallel", "called", "text"),
    [
        ({"type": "function", "function": {"name": "weather"}}, True, ["weather"], None),
        ("required", True, ["lookup"], None),
        ("auto", False, ["lookup"], "I will call lookup."),
        ("none", True, [], "Hello from anthropic"),
    ],
)
async def test_tool_choice_is_honoured(upstream: Running, client: httpx.AsyncClient, choice: Any, parallel: bool,
                                       called: list[str], text: str | None) -> None:
    payload = {**ASK, "tool_choice": choice, "parallel_tool_calls": parallel}
    if choice != "auto":
        payload["messages"] = [{"role": "user", "content": "hello"}]
    whole = orjson.loads((await AnthropicAdapter().invoke(client, target(upstream),
                                                          AdapterRequest("chat.completions", payload, 5))).body)
    assert [c["name"] for c in _whole_calls(whole)] == called
    content = whole["choices"][0]["message"]["content"]
    assert content == text if text is None or called else content.startswith(text)
    assert _without_ids(_assembled(await _streamed(client, upstream, payload))) == _without_ids(whole)


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        ({**ASK, "tools": {"name": "lookup"}}, "payload.tools"),
        ({**ASK, "tools": [{"type": "function", "function": {"description": "x"}}]}, "payload.tools[0].function.name"),
        ({**ASK, "tools": [{"type": "code_interpreter"}]}, "payload.tools[0]"),
        ({**ASK, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "payload.tool_choice.function.name"),
        ({**ASK, "tool_choice": "sometimes"}, "payload.tool_choice"),
        ({"messages": ASK["messages"], "tool_choice": "auto"}, "payload.tool_choice"),
        ({**ASK, "parallel_tool_calls": "no"}, "payload.parallel_tool_calls"),
        ({**ASK, "messages": [*ASK["messages"], {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{not json"}}]}]},
         "payload.messages[1].tool_calls[0].function.arguments"),
        ({**ASK, "messages": [*ASK["messages"], {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "[1]"}}]}]},
         "payload.messages[1].tool_calls[0].function.arguments"),
        ({**ASK, "messages": [*ASK["messages"], {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}]},
         "payload.messages[1].tool_calls[0].id"),
        ({**ASK, "messages": [*ASK["messages"], {"role": "assistant", "tool_calls": "lookup"}]},
         "payload.messages[1].tool_calls"),
        ({**ASK, "messages": [*ASK["messages"], {"role": "tool", "content": "sunny"}]},
         "payload.messages[1].tool_call_id"),
    ],
)
async def test_a_bad_tool_request_is_the_caller_s_and_never_sent(
    upstream: Running, client: httpx.AsyncClient, payload: dict[str, Any], path: str
) -> None:
    before = upstream.instance.stats()["total"]
    for call in (AnthropicAdapter().invoke, _collect):
        with pytest.raises(UpstreamError) as caught:
            await call(client, target(upstream), AdapterRequest("chat.completions", payload, 5))
        assert caught.value.kind is ErrorKind.CLIENT and caught.value.message.startswith(f"{path}: ")
    assert upstream.instance.stats()["total"] == before


async def _collect(client: httpx.AsyncClient, t: Target, request: AdapterRequest) -> list[base.StreamChunk]:
    return [c async for c in AnthropicAdapter().stream(client, t, request)]


@pytest.mark.parametrize(
    ("tail", "said"),
    [
        ([{"role": "user", "content": "go on"}], "`tool_use` ids were found without `tool_result` blocks"),
        ([{"role": "tool", "tool_call_id": "call_other", "content": "x"}], "unexpected `tool_use_id`"),
    ],
)
async def test_the_emulator_pairs_tool_results_with_tool_uses(
    upstream: Running, client: httpx.AsyncClient, tail: list[dict[str, Any]], said: str
) -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]
    payload = {**ASK, "messages": [*ASK["messages"], {"role": "assistant", "content": None, "tool_calls": calls},
                                   *tail]}
    with pytest.raises(UpstreamError) as caught:
        await AnthropicAdapter().invoke(client, target(upstream), AdapterRequest("chat.completions", payload, 5))
    assert caught.value.kind is ErrorKind.CLIENT and caught.value.status == 400 and said in caught.value.message


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tools": "lookup"}, "tools:"),
        ({"tools": [{"name": "lookup"}]}, "tools.0.input_schema:"),
        ({"tools": [{"name": "look up", "input_schema": {"type": "object"}}]}, "tools.0.name:"),
        ({"tools": [{"name": "a", "input_schema": {"type": "object"}}] * 2}, "tools:"),
        ({"tool_choice": {"type": "auto"}}, "tool_choice:"),
        ({"tools": [{"name": "a", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "b"}},
         "tool_choice.name:"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "a", "input": {}}]}, {"role": "user", "content": [
                {"type": "text", "text": "first"}, {"type": "tool_result", "tool_use_id": "t1"}]}]}, "messages.2:"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t1", "name": "a", "input": {}}]}]},
         "messages.0.content.0:"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "a", "input": "{}"}]}]}, "messages.1.content.0.input:"),
    ],
)
async def test_the_emulator_refuses_bad_tools_as_anthropic_does(
    upstream: Running, client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    payload = {"messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(UpstreamError) as caught:
        await AnthropicAdapter().invoke(client, target(upstream), AdapterRequest("messages", payload, 5))
    error = orjson.loads(caught.value.body)["error"]
    assert caught.value.status == 400 and error["type"] == "invalid_request_error"
    assert error["message"].startswith(field)


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)


START = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                              "content": [], "usage": {"input_tokens": 3, "output_tokens": 1}}}
END = [{"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}},
       {"type": "message_stop"}]


def _tool_start(index: int, tool_input: Any) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index,
            "content_block": {"type": "tool_use", "id": f"toolu_{index}", "name": "f", "input": tool_input}}


def _json_delta(index: int, piece: Any) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": piece}}


def _stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


async def _mock_stream(body: bytes) -> list[base.StreamChunk]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mock:
        t = Target("https://api.anthropic.com", "m", KEY)
        return [c async for c in AnthropicAdapter().stream(mock, t, AdapterRequest("chat.completions", ASK, 5))]


@pytest.mark.parametrize("tool_input", [{}, {"city": "Oslo"}])
async def test_a_tool_block_without_input_deltas_gives_the_whole_answer_s_arguments(tool_input: dict[str, Any]) -> None:
    chunks = await _mock_stream(_sse(START, _tool_start(0, tool_input), _json_delta(0, ""), _stop(0), *END))
    whole = chat_from_message({"id": "msg_1", "model": "m", "stop_reason": "tool_use", "content": [
        {"type": "tool_use", "id": "toolu_0", "name": "f", "input": tool_input}]}, base.TokenUsage(3, 5), 0)
    assembled = _assembled(chunks)
    assert assembled["choices"] == whole["choices"]
    assert orjson.loads(assembled["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == tool_input


async def test_a_tool_input_cut_at_max_tokens_or_a_server_tool_s_input_is_no_fault() -> None:
    """max_tokens may cut a tool_use input: the call ends "length" with the arguments as they came
    (as OpenAI's truncated ones); a server tool's input deltas are not calls for the caller."""
    cut = [{"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 5}},
           {"type": "message_stop"}]
    server = {"type": "content_block_start", "index": 0,
              "content_block": {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}}
    chunks = await _mock_stream(_sse(START, server, _json_delta(0, '{"query": "x"}'), _stop(0),
                                     _tool_start(1, {}), _json_delta(1, '{"city": "Os'), _stop(1), *cut))
    assert chunks[-1].finish_reason == "length"
    (call,) = _assembled(chunks)["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "f", "arguments": '{"city": "Os'} and call["id"] == "toolu_1"


@pytest.mark.parametrize(
    ("events", "said"),
    [
        ([_tool_start(0, {}), _json_delta(0, '{"a": '), _json_delta(0, "oops}"), _stop(0), *END], "not a JSON object"),
        ([_tool_start(0, {}), _json_delta(0, '"just a string"'), _stop(0), *END], "not a JSON object"),
        ([_tool_start(0, {}), _json_delta(1, "{}"), _stop(0), *END], "not an open tool_use block"),
        ([_tool_start(0, {}), _json_delta(0, 42), _stop(0), *END], "without a partial_json string"),
        ([_tool_start(0, {}), _json_delta(0, "{}"), *END], "still open"),
        ([_tool_start(0, {}), _tool_start(0, {}), *END], "or twice"),
        ([{"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "name": "f"}}, *END],
         "without an index, an id and a name"),
        ([[1, 2]], "not a JSON object"),
    ],
)
async def test_a_malformed_tool_stream_is_the_upstream_s_fault(events: list[Any], said: str) -> None:
    body = _sse(START) + b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    with pytest.raises(UpstreamError) as caught:
        await _mock_stream(body)
    assert caught.value.kind is ErrorKind.RETRYABLE and said in caught.value.message


_EVENT_TYPES = ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                "message_stop", "ping", "error"]
_EVENT_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2) | st.sampled_from([
        *_EVENT_TYPES, "tool_use", "text", "input_json_delta", "text_delta", "max_tokens", "{", "{}", '{"a": 1}']),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from([
        "type", "index", "delta", "content_block", "partial_json", "text", "id", "name", "input", "message",
        "usage", "stop_reason", "output_tokens", "input_tokens", "error"]), inner, max_size=5),
    max_leaves=14,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_EVENT_TYPES), _EVENT_JSON), max_size=8))
def test_any_events_are_read_or_refused_as_the_upstream_s_fault(events: list[tuple[str, Any]]) -> None:
    """Whatever JSON an upstream streams as events, the chat reader yields chunks or raises
    UpstreamError, never anything else; what it yields are chat chunks."""
    state = _MessageStream(as_chat=True, created=0)
    try:
        for name, data in events:
            chunk = state.feed(name, orjson.dumps(data).decode())
            if chunk is not None:
                assert orjson.loads(chunk.data)["object"] == "chat.completion.chunk"
    except UpstreamError:
        pass


async def test_the_official_sdk_reads_the_emulator_s_tool_use() -> None:
    """The `anthropic` SDK against the emulator: tool_use blocks whole and streamed (the SDK joins
    the input_json_delta pieces and parses them), then a tool_result turn answered with text.
    (An emulator without a key: the SDK installed here sends its key as a Bearer token.)"""
    async with await emu.start() as upstream:
        await _sdk_round_trip(anthropic.AsyncAnthropic(base_url=upstream.url, api_key=KEY, max_retries=0))


async def _sdk_round_trip(sdk: anthropic.AsyncAnthropic) -> None:
    tools: Any = [{"name": "weather", "description": "the weather", "input_schema": {"type": "object"}}]
    ask: Any = [{"role": "user", "content": "what is it like in Oslo"}]
    whole = await sdk.messages.create(model="claude-3-sonnet", max_tokens=64, messages=ask, tools=tools,
                                      tool_choice={"type": "tool", "name": "weather"})
    async with sdk.messages.stream(model="claude-3-sonnet", max_tokens=64, messages=ask, tools=tools,
                                   tool_choice={"type": "any"}) as stream:
        streamed = await stream.get_final_message()
    for message in (whole, streamed):
        (use,) = message.content
        assert message.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "weather"
        assert use.input == {"query": "what is it like in Oslo", "call": 0}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": whole.content[0].id,  # type: ignore[union-attr]
                                           "content": "sunny"}]}
    reply = await sdk.messages.create(model="claude-3-sonnet", max_tokens=64, tools=tools,
                                      messages=[*ask, {"role": "assistant", "content": whole.content}, result])
    assert reply.stop_reason == "end_turn" and reply.content[0].text.endswith("You said: sunny")  # type: ignore[union-attr]
    await sdk.close()


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
LOOK = [{"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}}]


def test_image_file_and_refusal_parts_map_to_anthropic_blocks() -> None:
    payload = {"messages": [
        {"role": "user", "content": [*LOOK, {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                                     {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=",
                                                               "filename": "a.pdf"}}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot say."}]},
        {"role": "user", "content": "why?"}]}
    turns = messages_from_chat(payload, "m", 10)["messages"]
    assert turns[0]["content"] == [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
    ]
    assert turns[1]["content"] == [{"type": "text", "text": "I cannot say."}]


@pytest.mark.parametrize(
    ("messages", "path"),
    [
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAA=", "format": "wav"}}]}],
         "payload.messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}]}],
         "payload.messages[0].content[0].file.file_data"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0="}}]}],
         "payload.messages[0].content[0].image_url.url"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}]}],
         "payload.messages[0].content[0].image_url.url"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
         "payload.messages[0].content[0].image_url.url"),
        ([{"role": "user", "content": [{"type": "text", "text": 7}]}], "payload.messages[0].content[0].text"),
        ([{"role": "user", "content": ["hello"]}], "payload.messages[0].content[0]"),
        ([{"role": "system", "content": LOOK}, {"role": "user", "content": "hi"}],
         "payload.messages[0].content[1].type"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": LOOK}],
         "payload.messages[1].content[1].type"),
    ],
)
async def test_a_part_anthropic_cannot_take_is_the_caller_s_and_never_sent(
    upstream: Running, client: httpx.AsyncClient, messages: list[dict[str, Any]], path: str
) -> None:
    before = upstream.instance.stats()["total"]
    for call in (AnthropicAdapter().invoke, _collect):
        with pytest.raises(UpstreamError) as caught:
            await call(client, target(upstream), AdapterRequest("chat.completions", {"messages": messages}, 5))
        assert caught.value.kind is ErrorKind.CLIENT and caught.value.message.startswith(f"{path}: ")
    assert upstream.instance.stats()["total"] == before


async def test_an_image_reaches_the_emulator_which_checks_it_as_anthropic_does(
    upstream: Running, client: httpx.AsyncClient
) -> None:
    payload = {"messages": [{"role": "user", "content": LOOK}]}
    response = await AnthropicAdapter().invoke(client, target(upstream), AdapterRequest("chat.completions", payload, 5))
    assert orjson.loads(response.body)["choices"][0]["finish_reason"] == "stop"
    broken = [LOOK[0], {"type": "image_url", "image_url": {"url": "data:image/png;base64,not*base64"}}]
    with pytest.raises(UpstreamError) as caught:
        await AnthropicAdapter().invoke(client, target(upstream),
                                        AdapterRequest("chat.completions", {"messages": [
                                            {"role": "user", "content": broken}]}, 5))
    error = orjson.loads(caught.value.body)["error"]
    assert caught.value.kind is ErrorKind.CLIENT and caught.value.status == 400
    assert error["message"].startswith("messages.0.content.1.source.base64.data:")


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ({"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": PNG}},
         "messages.0.content.0.source.base64.media_type:"),
        ({"type": "image", "source": {"type": "file", "file_id": "f"}}, "messages.0.content.0.source:"),
        ({"type": "image", "source": {"type": "url", "url": "ftp://x"}}, "messages.0.content.0.source.url.url:"),
        ({"type": "document", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
         "messages.0.content.0.source.base64.media_type:"),
        ({"type": "audio", "data": "AAA="}, "messages.0.content.0:"),
    ],
)
async def test_the_emulator_refuses_bad_media_blocks_as_anthropic_does(
    upstream: Running, client: httpx.AsyncClient, block: dict[str, Any], field: str
) -> None:
    payload = {"messages": [{"role": "user", "content": [block]}]}
    with pytest.raises(UpstreamError) as caught:
        await AnthropicAdapter().invoke(client, target(upstream), AdapterRequest("messages", payload, 5))
    assert caught.value.status == 400 and orjson.loads(caught.value.body)["error"]["message"].startswith(field)


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({"response_format": {"type": "json_object"}}, "payload.response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
         "payload.response_format"),
        ({"n": 2}, "payload.n"),
        ({"logprobs": True}, "payload.logprobs"),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "payload.audio"),
        ({"web_search_options": {}}, "payload.web_search_options"),
    ],
)
async def test_a_parameter_anthropic_cannot_honour_is_the_caller_s_and_never_sent(
    upstream: Running, client: httpx.AsyncClient, extra: dict[str, Any], path: str
) -> None:
    before = upstream.instance.stats()["total"]
    for call in (AnthropicAdapter().invoke, _collect):
        with pytest.raises(UpstreamError) as caught:
            await call(client, target(upstream), AdapterRequest("chat.completions", {**CHAT, **extra}, 5))
        assert caught.value.kind is ErrorKind.CLIENT and caught.value.message.startswith(f"{path}: ")
    assert upstream.instance.stats()["total"] == before
    hints = {"seed": 7, "n": 1, "response_format": {"type": "text"}, "reasoning_effort": "low", "presence_penalty": 0.1}
    body = messages_from_chat({**CHAT, **hints}, "m", 10)
    assert not set(hints) & set(body)
