"""OpenAIAdapter against httpx.MockTransport: request shape, usage, failure classification."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
import orjson
import pytest

from switchgear.adapters import builtin_adapters
from switchgear.adapters.base import (
    AdapterRequest,
    AdapterResponse,
    ErrorKind,
    OptionsError,
    Target,
    TokenUsage,
    UpstreamError,
)
from switchgear.adapters.openai import (
    OpenAIAdapter,
    OpenAIOptions,
    endpoint_url,
    parse_go_duration,
)

KEY = "sk-test-SECRET-0123456789abcdef"
NOW = 1_800_000_000.0  # the adapter's fake wall clock, epoch s
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
OK_BODY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that records requests and answers with a fixed response."""

    def __init__(self, response: httpx.Response | Exception) -> None:
        self.response = response
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if isinstance(self.response, Exception):
            raise self.response
        return self.response


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, content=orjson.dumps(body), headers={"content-type": "application/json", **(headers or {})})


def error_body(message: str, code: str | None = None, type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


async def invoke(
    handler: Handler,
    *,
    payload: dict[str, Any] | None = None,
    target: Target | None = None,
    timeout_s: float = 5.0,
    method: str = "chat.completions",
) -> AdapterResponse:
    adapter = OpenAIAdapter(wall_clock=lambda: NOW)
    target = target or Target("https://api.openai.com/v1", model="gpt-4o-mini", api_key=KEY)
    request = AdapterRequest(method, payload if payload is not None else {"messages": MESSAGES}, timeout_s, "req-42")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        return await adapter.invoke(client, target, request)


async def invoke_error(handler: Handler, **kwargs: Any) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        await invoke(handler, **kwargs)
    return caught.value


# ---------------------------------------------------------------------------------------
# request shape


async def test_success_passes_body_through_with_reported_usage() -> None:
    raw = orjson.dumps(OK_BODY)
    recorder = Recorder(httpx.Response(200, content=raw))
    response = await invoke(recorder)
    assert response.body == raw
    assert response.status == 200
    assert response.usage == TokenUsage(input_tokens=12, output_tokens=3, estimated=False)


async def test_request_url_headers_body_and_timeout() -> None:
    recorder = Recorder(json_response(200, OK_BODY))
    options = OpenAIAdapter().parse_options({"organization": "org-1", "headers": {"X-Team": "search"}})
    target = Target("https://api.openai.com/v1", model="gpt-4o", api_key=KEY, options=options)
    await invoke(recorder, target=target, payload={"model": "gpt-3.5-turbo", "messages": MESSAGES}, timeout_s=2.5)
    (sent,) = recorder.requests
    assert sent.method == "POST"
    assert str(sent.url) == "https://api.openai.com/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["x-request-id"] == "req-42"
    assert sent.headers["openai-organization"] == "org-1"
    assert sent.headers["x-team"] == "search"
    assert orjson.loads(sent.content) == {"model": "gpt-4o", "messages": MESSAGES}
    assert sent.extensions["timeout"] == {"connect": 2.5, "read": 2.5, "write": 2.5, "pool": 2.5}


@pytest.mark.parametrize(
    ("target_model", "payload_model", "sent_model"),
    [("gpt-4o", "gpt-3.5-turbo", "gpt-4o"), ("", "gpt-3.5-turbo", "gpt-3.5-turbo"), ("gpt-4o", None, "gpt-4o")],
)
async def test_model_override(target_model: str, payload_model: str | None, sent_model: str) -> None:
    recorder = Recorder(json_response(200, OK_BODY))
    payload: dict[str, Any] = {"messages": MESSAGES}
    if payload_model is not None:
        payload["model"] = payload_model
    before = dict(payload)
    await invoke(recorder, payload=payload, target=Target("http://h/v1", model=target_model))
    assert orjson.loads(recorder.requests[0].content)["model"] == sent_model
    assert payload == before  # the caller's payload is not mutated


async def test_custom_api_key_header_sends_raw_key_and_no_authorization() -> None:
    recorder = Recorder(json_response(200, OK_BODY))
    options = OpenAIAdapter().parse_options({"api_key_header": "api-key"})
    await invoke(recorder, target=Target("https://x.openai.azure.com/openai", api_key=KEY, options=options))
    sent = recorder.requests[0]
    assert sent.headers["api-key"] == KEY
    assert "authorization" not in sent.headers


async def test_no_key_sends_no_authorization() -> None:
    recorder = Recorder(json_response(200, OK_BODY))
    await invoke(recorder, target=Target("http://127.0.0.1:8080"))
    assert "authorization" not in recorder.requests[0].headers


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1/chat/completions"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1/chat/completions"),
        ("https://api.openai.com/v1", "https://api.openai.com/v1/chat/completions"),
        ("https://api.openai.com/v1/", "https://api.openai.com/v1/chat/completions"),
        ("http://ollama:11434/api/openai", "http://ollama:11434/api/openai/chat/completions"),
        ("https://r.azure.com/openai/deployments/d?api-version=2024-06-01", "https://r.azure.com/openai/deployments/d/chat/completions?api-version=2024-06-01"),
    ],
)
def test_base_url_rule(base_url: str, expected: str) -> None:
    assert endpoint_url(base_url, "/chat/completions") == expected


async def test_chat_path_option_is_used() -> None:
    recorder = Recorder(json_response(200, OK_BODY))
    options = OpenAIAdapter().parse_options({"chat_path": "/engines/chat"})
    await invoke(recorder, target=Target("http://h:9000", options=options))
    assert str(recorder.requests[0].url) == "http://h:9000/v1/engines/chat"


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({}, "payload.messages"),
        ({"messages": []}, "payload.messages"),
        ({"messages": "hi"}, "payload.messages"),
        ({"messages": MESSAGES, "stream": True}, "InvokeStream"),
        ({"messages": MESSAGES, "extra": {1, 2}}, "payload"),  # a set is not JSON
    ],
)
async def test_bad_payload_is_refused_before_io(payload: dict[str, Any], needle: str) -> None:
    recorder = Recorder(json_response(200, OK_BODY))
    error = await invoke_error(recorder, payload=payload)
    assert error.kind is ErrorKind.CLIENT
    assert needle in error.message
    assert recorder.requests == []


async def test_unknown_method_and_spent_deadline_are_refused_before_io() -> None:
    recorder = Recorder(json_response(200, OK_BODY))
    assert (await invoke_error(recorder, method="embeddings")).kind is ErrorKind.CLIENT
    assert (await invoke_error(recorder, timeout_s=0.0)).kind is ErrorKind.TIMEOUT
    assert recorder.requests == []


async def test_foreign_options_object_is_a_config_error() -> None:
    recorder = Recorder(json_response(200, OK_BODY))
    error = await invoke_error(recorder, target=Target("http://h", options={"chat_path": "/x"}))
    assert error.kind is ErrorKind.CONFIG


# ---------------------------------------------------------------------------------------
# usage


@pytest.mark.parametrize(
    ("messages", "body", "expected"),
    [
        # 12 + 8 = 20 prompt chars → 5 tokens; 9 completion chars → ceil(9/4) = 3
        ([{"role": "user", "content": "abcdefghijkl"}, {"role": "user", "content": "abcdefgh"}],
         {"choices": [{"message": {"content": "123456789"}}]}, TokenUsage(5, 3, estimated=True)),
        # content parts count their text; a null assistant content counts 0
        ([{"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {}}]},
          {"role": "assistant", "content": None}],
         {"choices": [{"message": {"content": "ab"}}, {"message": {"content": "cd"}}]}, TokenUsage(1, 1, estimated=True)),
        # a malformed usage object is ignored in favour of the estimate
        ([{"role": "user", "content": "abcd"}], {"usage": {"prompt_tokens": "many"}, "choices": []}, TokenUsage(1, 0, estimated=True)),
        # reported usage wins, even when choices are absent
        ([{"role": "user", "content": "abcd"}], {"usage": {"prompt_tokens": 40, "completion_tokens": 0}}, TokenUsage(40, 0)),
    ],
)
async def test_usage_reported_or_estimated(messages: list[Any], body: dict[str, Any], expected: TokenUsage) -> None:
    response = await invoke(Recorder(json_response(200, body)), payload={"messages": messages})
    assert response.usage == expected


@pytest.mark.parametrize("content", [b"<html>oops</html>", b"[1, 2]", b""])
async def test_success_status_with_non_object_body_is_retryable(content: bytes) -> None:
    error = await invoke_error(Recorder(httpx.Response(200, content=content)))
    assert error.kind is ErrorKind.RETRYABLE
    assert error.status == 200
    assert error.body == content


# ---------------------------------------------------------------------------------------
# failures


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (429, error_body("Rate limit reached", "rate_limit_exceeded", "requests"), ErrorKind.RATE_LIMITED),
        (500, error_body("The server had an error", None, "server_error"), ErrorKind.RETRYABLE),
        (502, {"error": {"code": 502, "message": "Bad gateway.", "param": None, "type": "cf_bad_gateway"}}, ErrorKind.RETRYABLE),
        (503, error_body("The server is overloaded", None, "server_error"), ErrorKind.RETRYABLE),
        (504, error_body("Gateway timeout.", None), ErrorKind.RETRYABLE),
        (529, error_body("Overloaded", None, "server_error"), ErrorKind.RETRYABLE),
        (408, error_body("Request timed out.", None), ErrorKind.TIMEOUT),
        (401, error_body("Incorrect API key provided", "invalid_api_key"), ErrorKind.AUTH),
        (403, error_body("Country not supported", "unsupported_country_region_territory"), ErrorKind.AUTH),
        (400, error_body("Too long", "context_length_exceeded"), ErrorKind.CONTEXT_LENGTH),
        (400, {"object": "error", "message": "This model's maximum context length is 4096 tokens.", "code": 400}, ErrorKind.CONTEXT_LENGTH),
        (400, {"error": {"code": 400, "message": "the request exceeds the available context size", "type": "exceed_context_size_error"}}, ErrorKind.CONTEXT_LENGTH),
        (400, error_body("Invalid 'messages[0].role'", "invalid_value"), ErrorKind.CLIENT),
        (404, error_body("The model `x` does not exist", "model_not_found"), ErrorKind.CLIENT),
        (422, {"detail": "unprocessable"}, ErrorKind.CLIENT),
        (302, {}, ErrorKind.CONFIG),
    ],
)
async def test_status_to_kind(status: int, body: dict[str, Any], kind: ErrorKind) -> None:
    raw = orjson.dumps(body)
    error = await invoke_error(Recorder(httpx.Response(status, content=raw)))
    assert error.kind is kind
    assert error.status == status
    assert error.body == raw
    provider_message = body.get("error", body).get("message")
    if provider_message:
        assert provider_message in error.message


async def test_error_with_html_body_keeps_body_and_quotes_it() -> None:
    raw = b"<html><body>502 Bad Gateway</body></html>"
    error = await invoke_error(Recorder(httpx.Response(502, content=raw)))
    assert (error.kind, error.body) == (ErrorKind.RETRYABLE, raw)
    assert "502 Bad Gateway" in error.message


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.ConnectTimeout("connect timed out"), ErrorKind.TIMEOUT),
        (httpx.ReadTimeout("read timed out"), ErrorKind.TIMEOUT),
        (httpx.WriteTimeout("write timed out"), ErrorKind.TIMEOUT),
        (httpx.PoolTimeout("no connection free"), ErrorKind.TIMEOUT),
        (httpx.ConnectError("[Errno 111] Connection refused"), ErrorKind.CONNECT),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), ErrorKind.RETRYABLE),
        (httpx.ReadError("connection reset by peer"), ErrorKind.RETRYABLE),
        (httpx.WriteError("broken pipe"), ErrorKind.RETRYABLE),
        (httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'."), ErrorKind.CONFIG),
    ],
)
async def test_transport_error_to_kind(exc: Exception, kind: ErrorKind) -> None:
    error = await invoke_error(Recorder(exc))
    assert error.kind is kind
    assert error.status is None
    assert type(exc).__name__ in error.message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True)}, 30.0),
        ({"retry-after": format_datetime(datetime.fromtimestamp(NOW - 30, UTC), usegmt=True)}, 0.0),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"x-ratelimit-reset-requests": "1s"}, 1.0),
        ({"x-ratelimit-reset-requests": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-requests": "20ms"}, 0.02),
        ({"retry-after": "soon", "x-ratelimit-reset-requests": "2s"}, 2.0),
        ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "3s", "x-ratelimit-reset-requests": "1s"}, 3.0),
        ({"x-ratelimit-reset-tokens": "4s"}, 4.0),
        ({}, None),
        ({"retry-after": "soon"}, None),
    ],
)
async def test_retry_after_forms(headers: dict[str, str], expected: float | None) -> None:
    body = error_body("Rate limit reached", "rate_limit_exceeded", "requests")
    error = await invoke_error(Recorder(json_response(429, body, headers)))
    assert error.kind is ErrorKind.RATE_LIMITED
    assert error.retry_after_s == (pytest.approx(expected) if expected is not None else None)


async def test_retry_after_ignored_on_server_errors() -> None:
    error = await invoke_error(Recorder(json_response(503, error_body("busy"), {"retry-after": "5"})))
    assert (error.kind, error.retry_after_s) == (ErrorKind.RETRYABLE, None)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5s", 0.5), ("150us", 0.00015),
     ("", None), ("5", None), ("1x", None), ("s", None), ("1s junk", None)],
)
def test_parse_go_duration(text: str, seconds: float | None) -> None:
    assert parse_go_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


# ---------------------------------------------------------------------------------------
# the key never leaks


@pytest.mark.parametrize(
    "answer",
    [
        json_response(401, error_body(f"Incorrect API key provided: {KEY}.", "invalid_api_key")),
        json_response(500, error_body(f"internal: header was Bearer {KEY}", None, "server_error")),
        httpx.Response(502, content=f"<html>{KEY}</html>".encode()),
        json_response(429, error_body(f"limit for {KEY}", "rate_limit_exceeded")),
        httpx.ConnectError(f"could not connect with {KEY}"),
        httpx.ReadTimeout(f"timed out {KEY}"),
    ],
    ids=["401-echo", "500-echo", "502-html", "429-echo", "connect", "timeout"],
)
async def test_api_key_never_in_error(answer: httpx.Response | Exception) -> None:
    error = await invoke_error(Recorder(answer))
    for text in (str(error), repr(error), error.message, error.body.decode("utf-8", "replace")):
        assert KEY not in text
    assert "[redacted]" in error.message + error.body.decode("utf-8", "replace")


def test_adapter_and_options_repr_hold_no_key() -> None:
    options = OpenAIAdapter().parse_options({"api_key_header": "api-key"})
    assert KEY not in repr(OpenAIAdapter()) + repr(options)


# ---------------------------------------------------------------------------------------
# options


def test_options_defaults_and_values() -> None:
    adapter = OpenAIAdapter()
    assert adapter.parse_options({}) == OpenAIOptions()
    parsed = adapter.parse_options(
        {"chat_path": "/c", "headers": {"B": "2", "A": "1"}, "organization": "org-9", "api_key_header": "api-key"}
    )
    assert parsed.path("chat.completions") == "/c"
    assert parsed.headers == (("A", "1"), ("B", "2"))
    assert (parsed.organization, parsed.api_key_header) == ("org-9", "api-key")
    assert hash(parsed) == hash(adapter.parse_options({"headers": {"A": "1", "B": "2"}, "chat_path": "/c", "organization": "org-9", "api_key_header": "api-key"}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.organization = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "path", "needle"),
    [
        ({"chat_pth": "/x"}, "chat_pth", "unknown option for protocol openai; known: api_key_header, chat_path"),
        ({"chat_path": 5}, "chat_path", "starting with '/'"),
        ({"chat_path": "chat/completions"}, "chat_path", "starting with '/'"),
        ({"headers": ["X-A: 1"]}, "headers", "mapping"),
        ({"headers": {"X-A": 1}}, "headers.X-A", "string"),
        ({"headers": {"X-A": "a\r\nb"}}, "headers.X-A", "single-line"),
        ({"headers": {"bad name": "1"}}, "headers.bad name", "header name"),
        ({"headers": {"authorization": "Bearer x"}}, "headers.authorization", "api key reference"),
        ({"headers": {"API-Key": "x"}, "api_key_header": "api-key"}, "headers.API-Key", "api key reference"),
        ({"organization": 7}, "organization", "string"),
        ({"organization": ""}, "organization", "string"),
        ({"api_key_header": "x y"}, "api_key_header", "header name"),
        ({"api_key_header": None}, "api_key_header", "header name"),
    ],
)
def test_options_errors_name_the_key(options: dict[str, Any], path: str, needle: str) -> None:
    with pytest.raises(OptionsError) as caught:
        OpenAIAdapter().parse_options(options)
    assert caught.value.path == path
    assert needle in caught.value.message
    assert str(caught.value).startswith(f"{path}: ")


ALL_PROTOCOLS = {"openai", "anthropic", "unstructured", "graphrag", "chroma", "pinecone", "http_json"}


def test_builtin_adapters_is_fresh_and_complete() -> None:
    first, second = builtin_adapters(), builtin_adapters()
    assert set(first) == ALL_PROTOCOLS
    assert isinstance(first["openai"], OpenAIAdapter)
    assert all(adapter.protocol == name for name, adapter in first.items())
    assert first["openai"].methods == frozenset({"chat.completions", "embeddings"})
    first.clear()
    assert set(second) == ALL_PROTOCOLS and set(builtin_adapters()) == ALL_PROTOCOLS
