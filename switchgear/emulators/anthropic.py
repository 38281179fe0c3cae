"""A protocol-faithful Anthropic Messages API emulator with fault injection.

`POST /v1/messages` with Anthropic's headers (`x-api-key`, required `anthropic-version`),
body validation, JSON answers and SSE streams framed as Anthropic frames them:

    event: message_start        {"type":"message_start","message":{..., "usage":{"input_tokens":N,...}}}
    event: content_block_start  {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}
    event: ping                 {"type":"ping"}
    event: content_block_delta  {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",...}}
                                (one per token)
    event: content_block_stop   {"type":"content_block_stop","index":0}
    event: message_delta        {"type":"message_delta","delta":{"stop_reason":"end_turn",...},
                                 "usage":{"output_tokens":M}}
    event: message_stop         {"type":"message_stop"}

Errors are `{"type":"error","error":{"type","message"}}` with Anthropic's statuses: 400
invalid_request_error (incl. "prompt is too long: N tokens > M maximum"), 401
authentication_error, 404 not_found_error, 413 request_too_large, 429 rate_limit_error (with
retry-after and anthropic-ratelimit-* headers), 500 api_error, 529 overloaded_error. A
stream cut by the `stream_cut_after` fault ends with `event: error` (overloaded_error).

Replies are deterministic (the OpenAI emulator's `reply_text`); faults and /_emulator routes
as in `emulators.common`. CLI: `switchgear emulate anthropic --port P [--api-key K]`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from switchgear.emulators import common
from switchgear.emulators import openai as oa

MODELS = ("claude-3-sonnet", "claude-sonnet-4-5", "claude-haiku-4-5")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "api_error",
    529: "overloaded_error",
}
_MESSAGES = {529: "Overloaded", 500: "Internal server error"}


class AnthropicError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def render(status: int, message: str, kind: str) -> web.Response:
    if kind == "server":
        message = _MESSAGES.get(status, message)
    headers = {"request-id": "req_emulator"}
    if status == 429:
        headers.update({"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0"})
        message = "This request would exceed your organization's rate limit. Please try again later."
    return common.json_response(error_body(status, message), status, headers)


def _auth_ok(request: web.Request) -> bool:
    expected = request.app[common.INSTANCE].spec.api_key
    return expected is None or request.headers.get("x-api-key") == expected


# ---------------------------------------------------------------------------------------
# validation (pure)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def parse_request(body: Any, models: tuple[str, ...]) -> tuple[str, int, list[dict[str, Any]], str, list[str], bool]:
    """(model, max_tokens, messages, system text, stop sequences, stream) or AnthropicError."""
    if not isinstance(body, dict):
        raise AnthropicError(400, "Request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise AnthropicError(400, "model: Field required")
    if model not in models:
        raise AnthropicError(404, f"model: {model}")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise AnthropicError(400, "max_tokens: Field required")
    if max_tokens < 1:
        raise AnthropicError(400, "max_tokens: Input should be greater than or equal to 1")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise AnthropicError(400, "messages: Field required")
    if not messages:
        raise AnthropicError(400, "messages: at least one message is required")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise AnthropicError(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if not isinstance(m.get("content"), (str, list)):
            raise AnthropicError(400, f"messages.{i}.content: Field required")
    if messages[0]["role"] != "user":
        raise AnthropicError(400, 'messages: first message must use the "user" role')
    system = body.get("system", "")
    if not isinstance(system, (str, list)):
        raise AnthropicError(400, "system: Input should be a valid string")
    stops = body.get("stop_sequences", [])
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise AnthropicError(400, "stop_sequences: Input should be a valid list of strings")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise AnthropicError(400, "stream: Input should be a valid boolean")
    return model, max_tokens, messages, _text(system), stops, stream


def answer(
    instance: str, messages: list[dict[str, Any]], max_tokens: int, stops: list[str]
) -> tuple[str, str, str | None]:
    """(text, stop_reason, stop_sequence)."""
    last_user = next((_text(m["content"]) for m in reversed(messages) if m["role"] == "user"), "")
    text = oa.reply_text(instance, last_user)
    for stop in stops:
        if stop and stop in text:
            return text[: text.index(stop)], "stop_sequence", stop
    cut, truncated = oa.truncate_tokens(text, max_tokens)
    return (cut, "max_tokens", None) if truncated else (text, "end_turn", None)


# ---------------------------------------------------------------------------------------
# handlers


async def messages(request: web.Request) -> web.StreamResponse:
    instance = request.app[common.INSTANCE]
    try:
        if not request.headers.get("anthropic-version"):
            raise AnthropicError(400, "anthropic-version: header is required")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise AnthropicError(400, "There was an error parsing the body of your request") from None
        model, max_tokens, turns, system, stops, stream = parse_request(body, instance.spec.model_ids)
        prompt_tokens = oa.count_tokens(system) + sum(oa.count_tokens(_text(m["content"])) for m in turns)
        if prompt_tokens > instance.spec.context_window:
            raise AnthropicError(
                400, f"prompt is too long: {prompt_tokens} tokens > {instance.spec.context_window} maximum"
            )
    except AnthropicError as exc:
        return render(exc.status, exc.message, "invalid")
    text, stop_reason, stop_sequence = answer(instance.spec.name, turns, max_tokens, stops)
    msg_id = "msg_" + hashlib.sha256(instance.next_id().encode()).hexdigest()[:24]
    output_tokens = oa.count_tokens(text)
    usage = {
        "input_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    head = {"id": msg_id, "type": "message", "role": "assistant", "model": model}
    if stream:
        return await _stream(request, head, text, stop_reason, stop_sequence, usage)
    return common.json_response(
        {
            **head,
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        },
        headers={"request-id": f"req_{msg_id[4:]}"},
    )


def _event(name: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _stream(
    request: web.Request,
    head: dict[str, Any],
    text: str,
    stop_reason: str,
    stop_sequence: str | None,
    usage: dict[str, Any],
) -> web.StreamResponse:
    instance = request.app[common.INSTANCE]
    faults = instance.faults
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "request-id": f"req_{head['id'][4:]}",
        }
    )
    await response.prepare(request)
    start_usage = {**usage, "output_tokens": 1}
    await response.write(
        _event(
            "message_start",
            {
                "type": "message_start",
                "message": {**head, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage},
            },
        )
    )
    await response.write(
        _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
    )
    await response.write(_event("ping", {"type": "ping"}))
    for sent, piece in enumerate(oa.token_pieces(text)):
        if faults.stream_cut_after and sent >= faults.stream_cut_after:
            instance.by_outcome["stream_cut"] += 1
            await response.write(_event("error", error_body(529, "Overloaded")))
            await response.write_eof()
            return response
        if faults.token_delay_ms and sent:
            await asyncio.sleep(faults.token_delay_ms / 1000.0)
        await response.write(
            _event(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
            )
        )
    await response.write(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    await response.write(
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
    )
    await response.write(_event("message_stop", {"type": "message_stop"}))
    await response.write_eof()
    return response


def build_app(spec: common.InstanceSpec) -> web.Application:
    if spec.model_ids == oa.DEFAULT_MODELS:
        spec = common.InstanceSpec(**{**spec.__dict__, "model_ids": MODELS})
    app = common.new_app(spec, [common.gated(render, _auth_ok)])
    app.router.add_post("/v1/messages", messages)
    return app


async def start(
    name: str = "anthropic",
    *,
    api_key: str | None = None,
    latency_ms: float = 0.0,
    faults: common.Faults | None = None,
    context_window: int = 200_000,
) -> common.Running:
    spec = common.InstanceSpec(
        name=name,
        api_key=api_key,
        latency_ms=latency_ms,
        faults=faults or common.Faults(),
        model_ids=MODELS,
        context_window=context_window,
    )
    return await common.run_app(build_app(spec))


def _build(args: argparse.Namespace) -> web.Application:
    return build_app(
        common.InstanceSpec(name="anthropic", api_key=args.api_key, latency_ms=args.latency_ms, model_ids=MODELS)
    )


main = common.cli("anthropic", _build)
