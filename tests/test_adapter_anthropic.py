"""The Anthropic adapter against the protocol-faithful emulator: mapping, errors, streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from switchgear.adapters.anthropic import AnthropicAdapter, AnthropicOptions, messages_from_chat, parse_options
from switchgear.adapters.base import AdapterRequest, ErrorKind, OptionsError, Target, UpstreamError
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
