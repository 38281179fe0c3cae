"""The OpenAI adapter's embeddings and streaming, against the OpenAI emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from switchgear.adapters.base import AdapterRequest, ErrorKind, Target, UpstreamError
from switchgear.adapters.openai import OpenAIAdapter, endpoint_url, parse_options
from switchgear.emulators.openai import EmulatorGroup, Faults, InstanceSpec, start_instances

CHAT = {"messages": [{"role": "user", "content": "stream me"}]}


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorGroup]:
    async with await start_instances([InstanceSpec("a")]) as group:
        yield group


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


async def test_embeddings_with_usage(emulator: EmulatorGroup, client: httpx.AsyncClient) -> None:
    t = Target(emulator.urls["a"], model="text-embedding-3-small", options=parse_options({}))
    response = await OpenAIAdapter().invoke(
        client, t, AdapterRequest("embeddings", {"input": ["a b c", "d"], "dimensions": 8}, 5)
    )
    body = orjson.loads(response.body)
    assert len(body["data"]) == 2 and len(body["data"][0]["embedding"]) == 8
    assert response.usage.input_tokens == body["usage"]["prompt_tokens"] == 4 and response.usage.output_tokens == 0
    with pytest.raises(UpstreamError) as caught:
        await OpenAIAdapter().invoke(client, t, AdapterRequest("embeddings", {"input": []}, 5))
    assert caught.value.kind is ErrorKind.CLIENT


async def test_embeddings_usage_is_estimated_when_absent() -> None:
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"data": []}))
    ) as mock:
        response = await OpenAIAdapter().invoke(
            mock, Target("http://x/v1"), AdapterRequest("embeddings", {"input": "12345678"}, 5)
        )
    assert response.usage.estimated and response.usage.input_tokens == 2


async def test_stream_chunks_pass_through_with_usage(emulator: EmulatorGroup, client: httpx.AsyncClient) -> None:
    t = Target(emulator.urls["a"], model="gpt-4o-mini")
    chunks = [c async for c in OpenAIAdapter().stream(client, t, AdapterRequest("chat.completions", CHAT, 5))]
    *body, final = chunks
    parsed = [orjson.loads(c.data) for c in body]
    assert all(p["object"] == "chat.completion.chunk" and p["choices"] for p in parsed)  # usage-only chunk held back
    assert not body[0].content and body[1].content
    text = "".join(c.text for c in body)
    assert text.startswith("Hello from a")
    assert final.usage is not None and not final.usage.estimated and final.usage.output_tokens > 0
    assert final.finish_reason == "stop"


async def test_stream_cut_mid_way_is_retryable(emulator: EmulatorGroup, client: httpx.AsyncClient) -> None:
    emulator.set_faults("a", Faults(stream_cut_after=3))
    seen = []
    with pytest.raises(UpstreamError) as caught:
        async for chunk in OpenAIAdapter().stream(
            client, Target(emulator.urls["a"], model="gpt-4o-mini"), AdapterRequest("chat.completions", CHAT, 5)
        ):
            seen.append(chunk)
    assert caught.value.kind is ErrorKind.RETRYABLE
    assert sum(c.content for c in seen) == 3


@pytest.mark.parametrize(
    ("faults", "kind"),
    [
        (Faults(fail_next=1, error_status=503), ErrorKind.RETRYABLE),
        (Faults(rate_limit_rate=1.0, retry_after_s=2), ErrorKind.RATE_LIMITED),
    ],
)
async def test_stream_failure_before_first_byte(
    emulator: EmulatorGroup, client: httpx.AsyncClient, faults: Faults, kind: ErrorKind
) -> None:
    emulator.set_faults("a", faults)
    with pytest.raises(UpstreamError) as caught:
        async for _ in OpenAIAdapter().stream(
            client, Target(emulator.urls["a"], model="gpt-4o-mini"), AdapterRequest("chat.completions", CHAT, 5)
        ):
            pass
    assert caught.value.kind is kind


async def test_stream_without_usage_is_estimated() -> None:
    sse = (
        b'data: {"choices":[{"index":0,"delta":{"content":"abcdefgh"},"finish_reason":null}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )

    def handler(request: httpx.Request) -> httpx.Response:
        assert orjson.loads(request.content)["stream_options"] == {"include_usage": True}
        return httpx.Response(200, content=sse, headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mock:
        chunks = [
            c
            async for c in OpenAIAdapter().stream(
                mock, Target("http://llama:8080"), AdapterRequest("chat.completions", CHAT, 5)
            )
        ]
    assert chunks[-1].usage is not None and chunks[-1].usage.estimated and chunks[-1].usage.output_tokens == 2


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("http://vllm:8000/v1", "http://vllm:8000/v1/embeddings"),
        ("http://llamacpp:8080", "http://llamacpp:8080/v1/embeddings"),
        ("http://ollama:11434/v1", "http://ollama:11434/v1/embeddings"),
    ],
)
def test_local_servers_urls(base: str, url: str) -> None:
    assert endpoint_url(base, "/embeddings") == url


async def test_stream_usage_can_be_turned_off_for_servers_that_refuse_it() -> None:
    sse = b'data: {"choices":[{"index":0,"delta":{"content":"abcd"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'

    def handler(request: httpx.Request) -> httpx.Response:
        assert "stream_options" not in orjson.loads(request.content)
        return httpx.Response(200, content=sse, headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mock:
        t = Target("http://ollama:11434/v1", options=parse_options({"stream_usage": False}))
        chunks = [c async for c in OpenAIAdapter().stream(mock, t, AdapterRequest("chat.completions", CHAT, 5))]
    assert chunks[-1].usage is not None and chunks[-1].usage.estimated
