"""The front door's Anthropic-compatible `POST /v1/messages` (JSON, or SSE when "stream": true).

The request's `model` names a Switchgear llm service, as on the OpenAI-compatible routes
(http.py), and the call goes through the same pipeline: keys, policy, quotas, cache, routing,
failover, metering. Callers authenticate with `x-api-key: <client key>` (what Anthropic's SDKs
send) or `Authorization: Bearer <client key>`; `anthropic-version` is accepted and not needed;
`anthropic-beta` names reach native targets (`caller_betas`, `with_betas`).
`POST /v1/messages/count_tokens` answers `{"input_tokens": N}` (`count_tokens`).

How the call reaches its upstreams:
- **native**: when the service and every one of its targets speak protocol `anthropic`, the body
  is passed through as method "messages" and the answer (JSON or SSE events) comes back as the
  upstream sent it;
- **translated**: otherwise (OpenAI-protocol targets, or a mix) the Messages request becomes an
  OpenAI chat request (system prompt → a system message, `stop_sequences` → `stop`, text, image,
  tool_use and tool_result blocks, tools and tool_choice, `metadata.user_id` → `user`), is served
  as method "chat.completions" by any target, and the answer is mapped back: a `message` with
  text and tool_use blocks, stop reasons (stop → end_turn, length → max_tokens, tool_calls →
  tool_use, content_filter → refusal) and the call's metered usage; a stream becomes
  message_start, content_block_start/delta/stop per block, message_delta (stop reason, usage)
  and message_stop.

Errors use Anthropic's shape `{"type": "error", "error": {"type", "message"}}` with the status
the OpenAI door would answer (`reshape` rewrites every error this route produces, including
the body guard's 408/413/503): 400 invalid_request_error naming the field, 401
authentication_error, 403 permission_error, 404 not_found_error, 413 request_too_large, 429
rate_limit_error, 503 overloaded_error, 504 timeout_error, other 5xx api_error. A stream that
fails after its first event ends with `event: error`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from switchgear.adapters.anthropic import BETA_NAME, MAX_BETAS, _text, estimated_input_tokens
from switchgear.adapters.base import TokenUsage, anthropic_usage
from switchgear.dataplane import access_log
from switchgear.dataplane.convert import Call, check_depth
from switchgear.dataplane.governance import Principal, Unauthenticated
from switchgear.dataplane.http_edge import relay, target_headers
from switchgear.dataplane.invoke import Result
from switchgear.dataplane.outcome import failed
from switchgear.dataplane.pipeline import CacheMode, Pipeline, Recorded, Served
from switchgear.dataplane.quota import limit_headers
from switchgear.dataplane.snapshot import AgentSnapshot, ServiceView
from switchgear.dataplane.stream import FallbackChunk, StreamEnd, Streamer, StreamItem

PATH = "/v1/messages"
PROTOCOL = "anthropic"

#: Anthropic's error type for each status the door answers with (others: api_error / invalid_request_error).
ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}
#: OpenAI finish_reason → Anthropic stop_reason.
STOP_REASONS: Mapping[str, str] = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
    "content_filter": "refusal",
}
_ROLES = ("user", "assistant")
_PASSED = ("temperature", "top_p")


_NO_USAGE = TokenUsage()

def error_body(status: int, message: str) -> dict[str, Any]:
    type_ = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": type_, "message": message}}


class ApiError(Exception):
    """An answer in Anthropic's error shape (rendered by `reshape`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=orjson.dumps(error_body(self.status, self.message)),
                            content_type="application/json")


@dataclass(frozen=True)
class Hooks:
    """What this route takes from the OpenAI door (http.py), which registers it: the same
    snapshot, model check, call building, answer headers, pipeline and streamer."""

    snapshot: Callable[[web.Request], AgentSnapshot]
    check_model: Callable[[AgentSnapshot, str, str], None]
    make_call: Callable[[web.Request, dict[str, Any], str, str], Call]  # (..., method, the key's tenant)
    result_headers: Callable[[Result], dict[str, str]]
    pipeline: Callable[[web.Request], Pipeline]
    streamer: Callable[[web.Request], Streamer]
    principal: Callable[[web.Request, AgentSnapshot], Principal | None]  # the bearer key's, noted in the access log

    async def invoke(self, request: web.Request, call: Call, snapshot: AgentSnapshot,
                     principal: Principal | None) -> tuple[Served, dict[str, str]]:
        """A unary call through the pipeline (with the caller's `Cache-Control`), noted in the
        access log: what served it, and its answer headers (`x-switchgear-*`, the cache mark)."""
        served = await self.pipeline(request).invoke(call, snapshot, principal,
                                                      CacheMode.parse(request.headers.get("Cache-Control")))
        result = served.result
        access_log.note_answer(result.usage, result.cost_usd, result.endpoint, result.attempts, served.cached)
        headers = self.result_headers(result)
        if served.cached:
            headers["x-switchgear-cache"] = "hit"
        return served, headers

    async def open_stream(self, request: web.Request, call: Call, snapshot: AgentSnapshot,
                          principal: Principal | None, id_header: str) -> Opened | None:
        """A stream through the pipeline up to its first item, and the SSE answer prepared with its
        headers (`id_header`: the request id; the target it committed to; a fallback's source).
        None when the stream ended without an item (the caller answers 502 in its shape)."""
        recorded = Recorded(self.streamer(request).stream)  # its meter names the committed target by the first item
        items = self.pipeline(request).stream(call, snapshot, principal, recorded)
        try:
            first = await anext(items)
        except StopAsyncIteration:
            return None
        headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                   id_header: call.request_id,
                   **target_headers(recorded.meter.committed() if recorded.meter is not None else None)}
        if isinstance(first, FallbackChunk):  # a preset or the task queue answered (its whole answer)
            headers["x-switchgear-fallback"] = first.source
        exchange = access_log.current()
        if exchange is not None and exchange.limits:  # (a whole answer gets them at the edge: http_edge.py)
            headers.update(limit_headers(exchange.limits, request.path.startswith("/v1/messages")))
        response = web.StreamResponse(headers=headers)
        try:
            await response.prepare(request)
        except BaseException:  # the caller left before the answer began: the upstream is released now
            await items.aclose()
            raise
        return Opened(response, first, items)


class Opened(NamedTuple):
    """A stream whose first item is in and whose answer is prepared (`Hooks.open_stream`)."""

    response: web.StreamResponse
    first: StreamItem
    items: AsyncGenerator[StreamItem, None]


_HOOKS = web.AppKey("anthropic_hooks", Hooks)


def _bad(path: str, message: str) -> ApiError:
    return ApiError(400, f"{path}: {message}")


# ---------------------------------------------------------------------------------------
# request checks and Anthropic → OpenAI (pure)


def parse_request(raw: bytes, max_depth: int, counting: bool = False) -> dict[str, Any]:
    """The Messages body, checked as Anthropic checks it; ApiError(400) naming the field.
    `counting`: a count_tokens body, which has no max_tokens, stream or stop_sequences."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_depth(body, max_depth, raw=raw)  # RequestError naming the field, before anything looks deeper
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _bad("model", "Field required" if "model" not in body else "Input should be a non-empty string")
    if counting:
        extra = [key for key in ("max_tokens", "stream", "stop_sequences") if key in body]
        if extra:
            raise _bad(extra[0], "Extra inputs are not permitted")
    elif "max_tokens" not in body:
        raise _bad("max_tokens", "Field required")
    max_tokens = body.get("max_tokens", 1)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _bad("max_tokens", "Input should be an integer greater than or equal to 1")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "Field required" if messages is None else "Input should be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _bad(f"messages.{i}.role", "Input should be 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, list):
            for j, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise _bad(f"messages.{i}.content.{j}", "Input should be a content block with a 'type'")
        elif not isinstance(content, str):
            raise _bad(f"messages.{i}.content", "Input should be a string or a list of content blocks")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise _bad("system", "Input should be a string or a list of text blocks")
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise _bad("stop_sequences", "Input should be a list of strings")
    if not isinstance(body.get("stream", False), bool):
        raise _bad("stream", "Input should be a boolean")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _bad("metadata", "Input should be an object")
    return body


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _image_url(block: Mapping[str, Any], path: str) -> str:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        return f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    raise _bad(f"{path}.source", "Input should be a base64 or url image source")


def _chat_turns(i: int, message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI chat messages: tool results first (role "tool"), then the turn."""
    role, content = message["role"], message["content"]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    parts: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind, path = block["type"], f"messages.{i}.content.{j}"
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, path)}})
        elif kind == "tool_use" and role == "assistant":
            tool_calls.append({"id": str(block.get("id", "")), "type": "function", "function": {
                "name": str(block.get("name", "")), "arguments": orjson.dumps(block.get("input", {})).decode()}})
        elif kind == "tool_result" and role == "user":
            results.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                            "content": _text(block.get("content", ""))})
        else:
            raise _bad(f"{path}.type", f"{kind!r} blocks cannot be sent to this model's upstreams")
    turns = results
    if parts or tool_calls:
        text_only = all(p["type"] == "text" for p in parts)
        turn: dict[str, Any] = {"role": role,
                                "content": "".join(p["text"] for p in parts) if text_only else parts}
        if tool_calls:
            turn["tool_calls"] = tool_calls
            turn["content"] = turn["content"] or None
        turns.append(turn)
    return turns


def _tool_choice(choice: Any) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        return {"type": "function", "function": {"name": str(choice.get("name", ""))}}
    return {"auto": "auto", "any": "required", "none": "none"}.get(str(kind), "auto")


def chat_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI chat request for a checked Messages request."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system)})
    for i, message in enumerate(body["messages"]):
        messages.extend(_chat_turns(i, message))
    chat: dict[str, Any] = {"model": body["model"], "messages": messages, "max_tokens": body["max_tokens"]}
    for key in _PASSED:
        if key in body:
            chat[key] = body[key]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    user = _obj(body.get("metadata")).get("user_id")
    if isinstance(user, str) and user:
        chat["user"] = user
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        for i, t in enumerate(tools):  # a server tool (web_search_...) runs at Anthropic, never as a function
            if isinstance(t, dict) and t.get("type", "custom") != "custom":
                raise _bad(f"tools.{i}.type", f"{str(t.get('type'))[:64]!r} is a server tool: this model's "
                           "targets do not all speak Anthropic's protocol, so only custom tools can be served")
        chat["tools"] = [{"type": "function", "function": {
            "name": t.get("name", ""), "description": t.get("description", ""),
            "parameters": t.get("input_schema", {"type": "object"})}} for t in tools if isinstance(t, dict)]
        if "tool_choice" in body:
            chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


# ---------------------------------------------------------------------------------------
# OpenAI → Anthropic answers (pure)


def _message_id(request_id: str) -> str:
    return f"msg_{request_id}"


def message_from_chat(chat: Mapping[str, Any], model: str, request_id: str, usage: TokenUsage) -> dict[str, Any]:
    """An Anthropic `message` for an OpenAI `chat.completion`, with the call's metered usage."""
    choices = chat.get("choices")
    choice = _obj(choices[0]) if isinstance(choices, list) and choices else {}
    reply = _obj(choice.get("message"))
    content: list[dict[str, Any]] = []
    if isinstance(reply.get("content"), str) and reply["content"]:
        content.append({"type": "text", "text": reply["content"]})
    for call in reply.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        function = _obj(call.get("function"))
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = {}
        content.append({"type": "tool_use", "id": str(call.get("id", "")), "name": str(function.get("name", "")),
                        "input": arguments if isinstance(arguments, dict) else {}})
    return {
        "id": _message_id(request_id), "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": STOP_REASONS.get(str(choice.get("finish_reason")), "end_turn"),
        "stop_sequence": None, "usage": anthropic_usage(usage),
    }


def event(kind: str, data: Mapping[str, Any] | bytes) -> bytes:
    payload = data if isinstance(data, bytes) else orjson.dumps({"type": kind, **data})
    return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"


def first_choice(chunk: bytes) -> dict[str, Any] | None:
    """A chat chunk's first choice; None for anything else (e.g. the usage-only chunk: the
    stream's end carries the metered usage, which is what the answer reports)."""
    try:  # orjson takes no bytes subclass: a FallbackChunk (a preset's whole answer) is copied
        obj = orjson.loads(chunk if type(chunk) is bytes else bytes(chunk))
    except orjson.JSONDecodeError:
        return None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    return choices[0]


class ChatToEvents:
    """OpenAI chat chunks in, Anthropic stream events out (one instance per stream)."""

    def __init__(self, model: str, request_id: str) -> None:
        self.model, self.request_id = model, request_id
        self.index = -1  # the open content block's index; -1 before the first
        self.open: str | None = None  # "text" or the OpenAI tool call index ("tool:N")
        self.stop_reason = "end_turn"

    def start(self) -> bytes:
        return event("message_start", {"message": {
            "id": _message_id(self.request_id), "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": anthropic_usage(_NO_USAGE)}})

    def _block(self, key: str, block: dict[str, Any]) -> bytes:
        out = self.close()
        self.index += 1
        self.open = key
        return out + event("content_block_start", {"index": self.index, "content_block": block})

    def close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return event("content_block_stop", {"index": self.index})

    def feed(self, chunk: bytes) -> bytes:
        choice = first_choice(chunk)
        if choice is None:
            return b""
        delta = _obj(choice.get("delta"))
        out = b""
        text = delta.get("content")
        if isinstance(text, str) and text:
            if self.open != "text":
                out += self._block("text", {"type": "text", "text": ""})
            out += event("content_block_delta", {"index": self.index, "delta": {"type": "text_delta", "text": text}})
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            key = f"tool:{call.get('index', 0)}"
            function = _obj(call.get("function"))
            if self.open != key:
                out += self._block(key, {"type": "tool_use", "id": str(call.get("id", "")),
                                         "name": str(function.get("name", "")), "input": {}})
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                out += event("content_block_delta", {"index": self.index, "delta": {
                    "type": "input_json_delta", "partial_json": arguments}})
        if choice.get("finish_reason"):
            self.stop_reason = STOP_REASONS.get(str(choice["finish_reason"]), "end_turn")
        return out

    def end(self, end: StreamEnd) -> bytes:
        return self.close() + event("message_delta", {
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
            "usage": anthropic_usage(end.usage),
        }) + event("message_stop", {})


def native_event(chunk: bytes) -> bytes:
    """An upstream Anthropic event's data, framed again with its event name; a fallback's whole
    answer (a FallbackChunk: a preset, or a service's exact preset body) as the events a stream
    of that message would have been."""
    if isinstance(chunk, FallbackChunk):
        return message_events(bytes(chunk))
    try:
        kind = orjson.loads(chunk).get("type")
    except (orjson.JSONDecodeError, AttributeError):
        kind = None
    return event(kind if isinstance(kind, str) and kind.isidentifier() else "message", chunk)


def message_events(body: bytes) -> bytes:
    """A whole Anthropic `message` as its stream: message_start (content empty), each text block
    as content_block_start / one text_delta / content_block_stop, message_delta (stop reason,
    output tokens), message_stop. A body that is not such a message (a service's exact preset
    answer may be anything) is one text block holding it."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        message = None
    if not isinstance(message, dict) or message.get("type") != "message" or not isinstance(
            message.get("content"), list):
        message = {"id": "msg_fallback", "type": "message", "role": "assistant", "model": "",
                   "content": [{"type": "text", "text": body.decode("utf-8", "replace")}],
                   "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
    usage = _obj(message.get("usage"))
    out = event("message_start", {"message": {**message, "content": [], "stop_reason": None,
                                              "usage": {"input_tokens": usage.get("input_tokens", 0),
                                                        "output_tokens": 0}}})
    texts = [b for b in message["content"] if isinstance(b, dict) and isinstance(b.get("text"), str)]
    for index, block in enumerate(texts):
        out += event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
        out += event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": block["text"]}})
        out += event("content_block_stop", {"index": index})
    out += event("message_delta", {"delta": {"stop_reason": message.get("stop_reason") or "end_turn",
                                             "stop_sequence": message.get("stop_sequence")},
                                   "usage": {"output_tokens": usage.get("output_tokens", 0)}})
    return out + event("message_stop", {})


# ---------------------------------------------------------------------------------------
# the route


def is_native(snapshot: AgentSnapshot, service: ServiceView) -> bool:
    """Whether every upstream the call may reach speaks Anthropic's protocol (then the body passes
    through); fallbacks to other services count too."""
    seen: set[str] = set()
    todo = [service.name]
    while todo:
        name = todo.pop()
        current = snapshot.services.get(name)
        if name in seen or current is None:
            continue
        seen.add(name)
        if current.protocol != PROTOCOL or any(e.protocol not in ("", PROTOCOL) for e in current.endpoints):
            return False
        todo.extend(current.fallbacks)
    return True


def _authorization(request: web.Request) -> str | None:
    """`Authorization`, else Anthropic's `x-api-key` as the same bearer credential."""
    key = request.headers.get("x-api-key")
    return request.headers.get("Authorization") or (f"Bearer {key}" if key else None)


def _caller(request: web.Request) -> tuple[Hooks, AgentSnapshot, Pipeline, Principal | None]:
    """This route's hooks, the snapshot, the pipeline and the caller (`x-api-key` or bearer)."""
    hooks = request.app[_HOOKS]
    snapshot = hooks.snapshot(request)
    pipeline = hooks.pipeline(request)
    try:
        principal = pipeline.identify(_authorization(request), snapshot)
    except Unauthenticated as exc:
        raise ApiError(401, f"{exc} (this door also takes 'x-api-key: <key>')") from None
    if principal is not None:
        access_log.note_tenant(principal.tenant.id)
    return hooks, snapshot, pipeline, principal


async def messages(request: web.Request) -> web.StreamResponse:
    hooks, snapshot, pipeline, principal = _caller(request)
    body = parse_request(await request.read(), pipeline.max_json_depth)
    betas = caller_betas(request)
    hooks.check_model(snapshot, body["model"], "llm")
    access_log.note_route(body["model"])
    native = is_native(snapshot, snapshot.services[body["model"]])
    payload = with_betas(body, betas) if native else chat_request(body)
    call = hooks.make_call(request, payload, "messages" if native else "chat.completions",
                           principal.tenant.id if principal else "")
    user = _obj(body.get("metadata")).get("user_id")
    call = dataclasses.replace(call, user_id=user if isinstance(user, str) else "")
    if body.get("stream") is True:
        return await _stream(request, hooks, call, snapshot, principal, native)
    served, headers = await hooks.invoke(request, call, snapshot, principal)
    result = served.result
    headers["request-id"] = call.request_id
    if native:
        return web.Response(body=result.body, content_type="application/json", headers=headers)
    try:
        chat = orjson.loads(result.body)
    except orjson.JSONDecodeError:
        chat = {}
    answer = message_from_chat(chat if isinstance(chat, dict) else {}, body["model"], call.request_id,
                               result.usage)
    return web.Response(body=orjson.dumps(answer), content_type="application/json", headers=headers)


async def _stream(request: web.Request, hooks: Hooks, call: Call, snapshot: AgentSnapshot, principal: Any,
                  native: bool) -> web.StreamResponse:
    opened = await hooks.open_stream(request, call, snapshot, principal, "request-id")
    if opened is None:
        raise ApiError(502, "upstream stream ended without an answer")
    response, first, items = opened
    mapper = None if native else ChatToEvents(call.service, call.request_id)
    if mapper is not None:
        await response.write(mapper.start())
    item = await relay(response, first, items, native_event if mapper is None else mapper.feed)
    if item.error is not None:
        refused = failed(item.error, item.attempts, item.service, item.endpoint, interrupted=True)
        await response.write(event("error", {"error": error_body(refused.http_status, refused.message)["error"]}))
    elif mapper is not None:
        await response.write(mapper.end(item))
    await response.write_eof()
    return response


def _anthropic_error(response: web.StreamResponse) -> web.StreamResponse:
    """An OpenAI-shaped error answer as Anthropic's, same status and headers."""
    if not isinstance(response, web.Response) or response.status < 400 or not isinstance(response.body, bytes):
        return response
    try:
        error = orjson.loads(response.body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return response
    if not isinstance(error, dict):
        return response
    response.body = orjson.dumps(error_body(response.status, str(error.get("message", ""))))
    return response


@web.middleware
async def reshape(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Outermost middleware: this route's errors, wherever made (body guard, refusals), in Anthropic's shape."""
    if request.path != PATH and not request.path.startswith(PATH + "/"):
        return await handler(request)
    try:
        return _anthropic_error(await handler(request))
    except ApiError as exc:
        return exc.response()


def caller_betas(request: web.Request) -> list[str]:
    """The caller's `anthropic-beta` names (comma-separated, in one header or several), checked
    as the Anthropic adapter sends them (adapters/anthropic.py `caller_betas`); 400 naming the
    header otherwise."""
    names = [name.strip() for value in request.headers.getall("anthropic-beta", ()) for name in value.split(",")]
    names = [name for name in names if name]
    if len(names) > MAX_BETAS:
        raise _bad("anthropic-beta", f"at most {MAX_BETAS} beta names")
    for name in names:
        if not BETA_NAME.fullmatch(name):
            raise _bad("anthropic-beta", f"Unexpected value `{name[:64]}` (beta names are lowercase letters, "
                                         "digits, '.' and '-', at most 64)")
    return list(dict.fromkeys(names))


def with_betas(body: dict[str, Any], betas: list[str]) -> dict[str, Any]:
    """A native call's payload: the caller's betas ride in `anthropic_beta` (as Bedrock takes
    them), which the adapter sends as the `anthropic-beta` header. A translated call drops them:
    no other protocol has them."""
    return {**body, "anthropic_beta": betas} if betas else body


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages/count_tokens: `{"input_tokens": N}` for a Messages body. Counted by the
    upstream when every target of the model speaks Anthropic's protocol (method "count_tokens",
    one try per endpoint outside the routing statistics: `Invoker.once`), else estimated here
    (4 characters a token, answered with `x-switchgear-estimated: true`) after the same key and
    tenant checks; it costs nothing either way, and an upstream count is one request of the
    tenant's quota."""
    hooks, snapshot, pipeline, principal = _caller(request)
    body = parse_request(await request.read(), pipeline.max_json_depth, counting=True)
    betas = caller_betas(request)
    hooks.check_model(snapshot, body["model"], "llm")
    access_log.note_route(body["model"])
    tenant = principal.tenant.id if principal else ""
    if not is_native(snapshot, snapshot.services[body["model"]]):
        pipeline.govern(hooks.make_call(request, body, "count_tokens", tenant), snapshot, principal)  # who may ask
        count = {"input_tokens": estimated_input_tokens(body)}
        return web.Response(body=orjson.dumps(count), content_type="application/json",
                            headers={"x-switchgear-estimated": "true"})
    call = hooks.make_call(request, with_betas(body, betas), "count_tokens", tenant)
    served, headers = await hooks.invoke(request, call, snapshot, principal)
    headers["request-id"] = call.request_id
    return web.Response(body=served.result.body, content_type="application/json", headers=headers)


def add_routes(app: web.Application, hooks: Hooks) -> None:
    app[_HOOKS] = hooks
    app.router.add_post(PATH, messages)
    app.router.add_post(PATH + "/count_tokens", count_tokens)
