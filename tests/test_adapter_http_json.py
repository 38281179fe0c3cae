"""The generic HTTP JSON adapter, against a small aiohttp server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from aiohttp import web

from switchgear.adapters.base import AdapterRequest, ErrorKind, OptionsError, Target, UpstreamError
from switchgear.adapters.http_json import HttpJsonAdapter, parse_options
from switchgear.emulators.common import Running, run_app


async def echo(request: web.Request) -> web.Response:
    if "sleep" in request.query:
        await asyncio.sleep(float(request.query["sleep"]))
    status = int(request.query.get("status", "200"))
    headers = {"Retry-After": "2"} if status == 429 else {}
    body = {
        "method": request.method,
        "path": request.path,
        "query": dict(request.query),
        "auth": request.headers.get("Authorization"),
        "x": request.headers.get("X-Extra"),
        "json": orjson.loads(await request.read()) if request.can_read_body else None,
        "usage": {"input_tokens": 5, "output_tokens": 2},
    }
    return web.json_response(
        body if status < 400 else {"error": {"message": "nope", "type": "bad"}}, status=status, headers=headers
    )


@pytest.fixture
async def upstream() -> AsyncIterator[Running]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    async with await run_app(app) as running:
        yield running


async def test_request_passes_method_path_query_body_and_reads_usage(upstream: Running) -> None:
    t = Target(upstream.url, api_key="k-1", options=parse_options({"headers": {"X-Extra": "1"}}))
    async with httpx.AsyncClient() as client:
        response = await HttpJsonAdapter().invoke(
            client,
            t,
            AdapterRequest(
                "request", {"method": "PUT", "path": "/things/1", "query": {"a": 1}, "json": {"v": True}}, 5
            ),
        )
    body = orjson.loads(response.body)
    assert body["method"] == "PUT" and body["path"] == "/things/1" and body["query"] == {"a": "1"}
    assert body["json"] == {"v": True} and body["auth"] == "Bearer k-1" and body["x"] == "1"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (5, 2)


@pytest.mark.parametrize(
    ("status", "kind"),
    [(429, ErrorKind.RATE_LIMITED), (503, ErrorKind.RETRYABLE), (401, ErrorKind.AUTH), (404, ErrorKind.CLIENT)],
)
async def test_errors(upstream: Running, status: int, kind: ErrorKind) -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(UpstreamError) as caught:
            await HttpJsonAdapter().invoke(
                client,
                Target(upstream.url),
                AdapterRequest("request", {"method": "GET", "path": "/x", "query": {"status": status}}, 5),
            )
    assert caught.value.kind is kind and caught.value.status == status
    if kind is ErrorKind.RATE_LIMITED:
        assert caught.value.retry_after_s == 2


async def test_refusals() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(UpstreamError) as verb:
            await HttpJsonAdapter().invoke(
                client,
                Target("http://127.0.0.1:9", options=parse_options({"allowed_methods": ["GET"]})),
                AdapterRequest("request", {"method": "POST", "path": "/"}, 5),
            )
        assert verb.value.kind is ErrorKind.CLIENT
        with pytest.raises(UpstreamError) as refused:
            await HttpJsonAdapter().invoke(
                client, Target("http://127.0.0.1:9"), AdapterRequest("request", {"path": "/"}, 5)
            )
        assert refused.value.kind is ErrorKind.CONNECT
    with pytest.raises(OptionsError):
        parse_options({"allowed_methods": ["TRACE"]})


async def test_timeout(upstream: Running) -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(UpstreamError) as caught:
            await HttpJsonAdapter().invoke(
                client, Target(upstream.url), AdapterRequest("request", {"method": "GET", "query": {"sleep": 0.5}}, 0.1)
            )
    assert caught.value.kind is ErrorKind.TIMEOUT
