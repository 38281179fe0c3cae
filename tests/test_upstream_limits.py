"""Per-service caps on upstream answers (ResponseLimits): how a service sets them (options_json
keys every protocol accepts), how they reach its pooled client, and how a refused answer is
classified; streamed answers stay incremental and are capped too. Raw-socket upstreams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from switchgear.adapters import builtin_adapters
from switchgear.adapters.base import (
    DEFAULT_MAX_RESPONSE_BYTES,
    AdapterRequest,
    ErrorKind,
    ResponseLimits,
    Target,
    UpstreamError,
)
from switchgear.adapters.openai import OpenAIAdapter
from switchgear.adapters.transport import pooled_client
from switchgear.dataplane.convert import SnapshotError, snapshot_from_proto
from switchgear.dataplane.upstreams import ClientPool
from switchgear.v1 import common_pb2, discovery_pb2

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def stream_texts(client: object, url: str) -> list[str]:
    request = AdapterRequest("chat.completions", CHAT, 5)
    return [chunk.text async for chunk in OpenAIAdapter().stream(client, Target(url, model="m"), request)]


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handle: Handler) -> str:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"

    yield start
    for server in servers:
        server.close()


def answering(answer: bytes, then: asyncio.Event | None = None, rest: bytes = b"") -> Handler:
    """Reads one request, writes `answer`, then (after `then` is set) `rest`, and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = [int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")]
            await reader.readexactly(length[0] if length else 0)
            writer.write(answer)
            await writer.drain()
            if then is not None:
                await then.wait()
                writer.write(rest)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle


def wire(options_json: str) -> discovery_pb2.Snapshot:
    service = common_pb2.Service(
        name="chat", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", options_json=options_json,
        endpoints=[common_pb2.Endpoint(id="a", url="http://127.0.0.1:9/v1", weight=1)],
    )
    return discovery_pb2.Snapshot(version="1.a", services=[service])


def test_a_service_sets_its_limits_in_options_and_its_adapter_never_sees_them() -> None:
    view = snapshot_from_proto(
        wire('{"max_response_bytes": 1000, "max_decoded_bytes": 5000, "chat_path": "/c"}'), "1.a", builtin_adapters()
    ).services["chat"]
    assert view.limits == ResponseLimits(max_response_bytes=1000, max_decoded_bytes=5000)
    assert dict(view.options.paths)["chat.completions"] == "/c"
    default = snapshot_from_proto(wire("{}"), "1.a", builtin_adapters()).services["chat"].limits
    assert default.max_response_bytes == default.max_decoded_bytes == DEFAULT_MAX_RESPONSE_BYTES == 64 << 20


@pytest.mark.parametrize("value", ["0", "-1", '"16Mi"', "true", "1.5", str(2**30 + 1)])
def test_a_bad_limit_is_refused_naming_the_option(value: str) -> None:
    with pytest.raises(SnapshotError) as info:
        snapshot_from_proto(wire(f'{{"max_decoded_bytes": {value}}}'), "1.a", builtin_adapters())
    assert info.value.path == "services[chat].options_json.max_decoded_bytes"


async def test_the_client_pool_builds_each_services_client_with_its_limits() -> None:
    pool = ClientPool()
    small = ResponseLimits(max_response_bytes=10)
    client = pool.get("chat", "a", "http://127.0.0.1:9/v1", small)
    assert client.limits == small and pool.get("chat", "a", "http://127.0.0.1:9/v1", small) is client
    assert pool.get("chat", "a", "http://127.0.0.1:9/v1").limits == ResponseLimits()  # a new limit: a new client
    await pool.close()


async def test_an_ambiguous_answer_is_a_retryable_upstream_error_not_the_callers(upstream) -> None:  # type: ignore[no-untyped-def]
    url = await upstream(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 20\r\n\r\n{}"))
    async with pooled_client() as client:
        with pytest.raises(UpstreamError) as info:
            await OpenAIAdapter().invoke(client, Target(url, model="m"), AdapterRequest("chat.completions", CHAT, 5))
    assert info.value.kind is ErrorKind.RETRYABLE and info.value.kind.retryable
    assert "upstream protocol error" in info.value.message


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def sse(data: bytes) -> bytes:
    event = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


CHUNK = b'{"choices":[{"index":0,"delta":{"content":"%s"}}]}'


async def test_a_streamed_answer_is_read_as_it_arrives(upstream) -> None:  # type: ignore[no-untyped-def]
    first_seen = asyncio.Event()
    rest = sse(CHUNK % b"two") + sse(b"[DONE]") + b"0\r\n\r\n"
    url = await upstream(answering(SSE_HEAD + sse(CHUNK % b"one"), first_seen, rest))
    async with pooled_client() as client:
        texts = []
        request = AdapterRequest("chat.completions", CHAT, 5)
        async for chunk in OpenAIAdapter().stream(client, Target(url, model="m"), request):
            texts.append(chunk.text)
            if chunk.text == "one":
                first_seen.set()  # the upstream sends the rest only now: the first event was not buffered
    assert "".join(texts) == "onetwo"


async def test_a_streamed_answer_over_the_decoded_cap_is_cut_with_a_protocol_error(upstream) -> None:  # type: ignore[no-untyped-def]
    endless = SSE_HEAD + b"".join(sse(CHUNK % (b"x" * 500)) for _ in range(20))
    url = await upstream(answering(endless, asyncio.Event()))  # stays open, never finishes
    async with pooled_client(limits=ResponseLimits(max_decoded_bytes=4000)) as client:
        with pytest.raises(UpstreamError) as info:
            await stream_texts(client, url)
    assert info.value.kind is ErrorKind.RETRYABLE and "over 4000 bytes" in info.value.message


async def test_a_streamed_answer_with_two_lengths_is_refused(upstream) -> None:  # type: ignore[no-untyped-def]
    url = await upstream(answering(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                   b"Content-Length: 5\r\nContent-Length: 50\r\n\r\ndata: {}\n\n"))
    async with pooled_client() as client:
        with pytest.raises(UpstreamError) as info:
            await stream_texts(client, url)
    assert info.value.kind is ErrorKind.RETRYABLE
