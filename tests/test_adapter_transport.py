"""Adapters over the agent's pooled clients (FastClient: http1.py for buffered calls, aiohttp
for streams): same results, same failure classes as over httpx's own transport."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from aiohttp import web

from switchgear.adapters.base import AdapterRequest, ErrorKind, Target, UpstreamError
from switchgear.adapters.openai import OpenAIAdapter
from switchgear.adapters.transport import pooled_client
from switchgear.emulators.common import Running, run_app
from switchgear.emulators.openai import EmulatorGroup, Faults, InstanceSpec, start_instances

CHAT = {"messages": [{"role": "user", "content": "over aiohttp"}]}


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorGroup]:
    async with await start_instances([InstanceSpec("a")]) as group:
        yield group


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with pooled_client() as c:
        yield c


def target(group: EmulatorGroup) -> Target:
    return Target(group.urls["a"], model="gpt-4o-mini", api_key="sk-transport-test")


async def test_json_and_stream(emulator: EmulatorGroup, client: httpx.AsyncClient) -> None:
    adapter = OpenAIAdapter()
    for _ in range(3):  # connections are reused
        response = await adapter.invoke(client, target(emulator), AdapterRequest("chat.completions", CHAT, 5))
        assert orjson.loads(response.body)["choices"][0]["message"]["content"].startswith("Hello from a")
    chunks = [c async for c in adapter.stream(client, target(emulator), AdapterRequest("chat.completions", CHAT, 5))]
    assert "".join(c.text for c in chunks).startswith("Hello from a") and chunks[-1].usage is not None


@pytest.mark.parametrize(
    ("faults", "timeout_s", "kind"),
    [
        (Faults(drop=True), 5.0, ErrorKind.RETRYABLE),
        (Faults(latency_ms=500), 0.1, ErrorKind.TIMEOUT),
        (Faults(fail_next=1, error_status=502), 5.0, ErrorKind.RETRYABLE),
        (Faults(rate_limit_rate=1.0, retry_after_s=2), 5.0, ErrorKind.RATE_LIMITED),
    ],
)
async def test_failures_keep_their_class(
    emulator: EmulatorGroup, client: httpx.AsyncClient, faults: Faults, timeout_s: float, kind: ErrorKind
) -> None:
    emulator.set_faults("a", faults)
    with pytest.raises(UpstreamError) as caught:
        await OpenAIAdapter().invoke(client, target(emulator), AdapterRequest("chat.completions", CHAT, timeout_s))
    assert caught.value.kind is kind


async def test_mid_stream_cut_is_retryable(emulator: EmulatorGroup, client: httpx.AsyncClient) -> None:
    emulator.set_faults("a", Faults(stream_cut_after=2))
    with pytest.raises(UpstreamError) as caught:
        async for _ in OpenAIAdapter().stream(client, target(emulator), AdapterRequest("chat.completions", CHAT, 5)):
            pass
    assert caught.value.kind is ErrorKind.RETRYABLE


async def test_refused_and_bad_scheme(client: httpx.AsyncClient) -> None:
    with pytest.raises(UpstreamError) as refused:
        await OpenAIAdapter().invoke(
            client, Target("http://127.0.0.1:9/v1"), AdapterRequest("chat.completions", CHAT, 5)
        )
    assert refused.value.kind is ErrorKind.CONNECT
    with pytest.raises(UpstreamError) as scheme:
        await OpenAIAdapter().invoke(
            client, Target("ftp://127.0.0.1:9/v1"), AdapterRequest("chat.completions", CHAT, 5)
        )
    assert scheme.value.kind is ErrorKind.CONFIG


async def test_compressed_body_is_decoded_once_and_headers_pass() -> None:
    seen: dict[str, str] = {}

    async def handler(request: web.Request) -> web.Response:
        seen.update({k.lower(): v for k, v in request.headers.items()})
        body = gzip.compress(orjson.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}))
        return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    running: Running = await run_app(app)
    async with running, pooled_client() as client:
        response = await OpenAIAdapter().invoke(
            client, Target(running.url, api_key="sk-k"), AdapterRequest("chat.completions", CHAT, 5, "rid-1")
        )
    assert response.usage.output_tokens == 2
    assert seen["authorization"] == "Bearer sk-k" and seen["x-request-id"] == "rid-1"


async def test_multipart_and_query_params_through_the_fast_client() -> None:
    from switchgear.adapters.unstructured import UnstructuredAdapter
    from switchgear.emulators import unstructured as unstructured_emu

    async with await unstructured_emu.start(api_key="u-key") as up, pooled_client() as client:
        response = await UnstructuredAdapter().invoke(
            client,
            Target(up.url, api_key="u-key"),
            AdapterRequest(
                "partition", {"text": "Title Here\n\nSome narrative text here.", "languages": ["eng", "deu"]}, 5
            ),
        )
        elements = orjson.loads(response.body)
        assert [e["type"] for e in elements] == ["Title", "NarrativeText"]
        assert elements[0]["metadata"]["languages"] == ["eng", "deu"]
