"""The agent's upstream client: `FastClient`, the subset of `httpx.AsyncClient` adapters use.

Why: profiling the agent under load (py-spy, bench/overhead) showed over half of its CPU in
httpx/httpcore's connection-pool bookkeeping (per request, every pooled connection is asked
`has_expired` through anyio's attribute lookups). Adapters keep their interface — they are
still handed an httpx-shaped client (STYLE: inject the transport; tests use
`httpx.MockTransport`) — only the pool's clients are FastClients: buffered calls go through
http1.py, streamed answers through an aiohttp session. (An httpx transport over aiohttp came
first; nothing used it once FastClient took both paths, and it was removed.)

Contract kept from httpx: per-request timeouts (connect, read); failures become httpx's
exceptions (ConnectError, ConnectTimeout, ReadTimeout, RemoteProtocolError, ReadError,
UnsupportedProtocol), so adapters classify them unchanged. Streamed responses are read as the
caller iterates, and closing the response releases the connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx

from switchgear.adapters.base import ResponseLimits
from switchgear.adapters.http1 import Http1Pool, Reply, UpstreamProtocolError

_DROPPED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


class _Body(httpx.AsyncByteStream):
    """A streamed answer's body as it arrives; at most `max_bytes` (decoded) in all, so an
    upstream that never stops (or a gzip bomb) is cut with a protocol error, not buffered."""

    def __init__(
        self, response: aiohttp.ClientResponse, request: httpx.Request | None, max_bytes: int | None = None
    ) -> None:
        self._response = response
        self._request = request
        self._max_bytes = max_bytes

    async def __aiter__(self) -> AsyncIterator[bytes]:
        left = self._max_bytes
        try:
            async for chunk in self._response.content.iter_any():
                if left is not None:
                    left -= len(chunk)
                    if left < 0:
                        self._response.close()  # never back in the pool: the answer was not read to its end
                        raise UpstreamProtocolError(f"streamed answer over {self._max_bytes} bytes")
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "read timed out", request=self._request) from None
        except aiohttp.ClientPayloadError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=self._request) from None
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc), request=self._request) from None

    async def aclose(self) -> None:
        self._response.release()


class FastClient:
    """The subset of `httpx.AsyncClient` the adapters use (`request`, `post`, `stream`,
    `aclose`): buffered calls (`request`, `post`) answer a `Reply` sent on http1.Http1Pool,
    streams an `httpx.Response` read from aiohttp.

    Why not an httpx transport over aiohttp: with one, httpx's client layer (request building, cookie
    extraction, redirect and auth plumbing, body re-streaming) was still about a quarter of
    the agent's CPU per call in bench/overhead; and aiohttp's own client then still cost about
    0.15 ms per call more than http1.py (bench/overhead/README.md). Bodies are decompressed
    here, so answers carry no Content-Encoding. Multipart `files`/`data`, `params` and `json`
    are encoded by httpx's own request model, so their wire format is httpx's.
    """

    def __init__(self, max_connections: int = 100, limits: ResponseLimits | None = None) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self.limits = limits or ResponseLimits()
        self._http1 = Http1Pool(max_connections, limits=self.limits)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=30.0, ttl_dns_cache=60
            )
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, trust_env=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    @staticmethod
    def _encode(
        method: str, url: str, content: Any, headers: Any, encode: dict[str, Any]
    ) -> tuple[str, bytes, Any, httpx.Request | None]:
        """(url, body, headers, httpx request if one was built)."""
        encode = {k: v for k, v in encode.items() if v is not None}
        if encode or not isinstance(content, bytes | None):  # multipart, form, params, json, text
            request = httpx.Request(method, url, content=content, headers=headers, **encode)
            wire_headers = [(k, v) for k, v in request.headers.multi_items() if k not in _DROPPED_HEADERS]
            return str(request.url), request.read(), wire_headers, request
        return url, content or b"", headers, None  # the hot path: bytes in, no httpx request model

    async def _send(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Any = None,
        timeout: Any = None,
        **encode: Any,
    ) -> tuple[aiohttp.ClientResponse, httpx.Request | None]:
        url, body, wire_headers, request = self._encode(method, url, content, headers, encode)
        if not url.startswith(("http://", "https://")):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme in {url!r}", request=request)
        client_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=getattr(timeout, "connect", None), sock_read=getattr(timeout, "read", None)
        )
        try:
            response = await self._get_session().request(
                method, url, headers=wire_headers, data=body or None, timeout=client_timeout, allow_redirects=False
            )
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from None
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from None
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from None
        except aiohttp.InvalidURL as exc:
            raise httpx.InvalidURL(str(exc)) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
            raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from None
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from None
        return response, request

    @staticmethod
    def _headers(response: aiohttp.ClientResponse) -> list[tuple[str, str]]:
        return [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in response.raw_headers
            if k.lower() not in (b"content-encoding", b"content-length", b"transfer-encoding")
        ]

    async def request(
        self, method: str, url: str, *, content: Any = None, headers: Any = None, timeout: Any = None, **encode: Any
    ) -> Reply:
        url, body, wire_headers, _ = self._encode(method, url, content, headers, encode)
        return await self._http1.request(
            method, url, wire_headers, body, getattr(timeout, "connect", None), getattr(timeout, "read", None)
        )

    async def post(self, url: str, **kwargs: Any) -> Reply:
        return await self.request("POST", url, **kwargs)

    def stream(self, method: str, url: str, **kwargs: Any) -> Any:
        return _Streaming(self, method, url, kwargs)

    async def aclose(self) -> None:
        await self._http1.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> FastClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Streaming:
    """`async with client.stream(...) as response`: the body is read as it is iterated."""

    def __init__(self, client: FastClient, method: str, url: str, kwargs: dict[str, Any]) -> None:
        self._client, self._method, self._url, self._kwargs = client, method, url, kwargs
        self._response: httpx.Response | None = None

    async def __aenter__(self) -> httpx.Response:
        raw, request = await self._client._send(self._method, self._url, **self._kwargs)
        body = _Body(raw, request, self._client.limits.max_decoded_bytes)
        self._response = httpx.Response(raw.status, headers=FastClient._headers(raw), stream=body, request=request)
        return self._response

    async def __aexit__(self, *exc_info: object) -> None:
        if self._response is not None:
            await self._response.aclose()


def pooled_client(max_connections: int = 100, limits: ResponseLimits | None = None) -> Any:
    """The agent's per-endpoint client: a FastClient (the httpx.AsyncClient subset adapters use),
    its answers bounded by the service's `limits`."""
    return FastClient(max_connections, limits)
