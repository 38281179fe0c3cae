"""The Anthropic Messages adapter: protocol "anthropic".

Methods:
- "messages": the caller's body is an Anthropic Messages request, passed through to
  `POST {base}/v1/messages`; the answer is passed through.
- "chat.completions": the caller's body is an OpenAI chat request. It is mapped to a Messages
  request (system/developer messages → `system`, `stop` → `stop_sequences`, `max_tokens` /
  `max_completion_tokens` → `max_tokens`, default `default_max_tokens`), and the answer is
  mapped back to an OpenAI `chat.completion` (stop reasons: end_turn/stop_sequence → stop,
  max_tokens → length, tool_use → tool_calls; usage → prompt/completion tokens).

Content parts on "chat.completions": `text` → text blocks; `image_url` → `image` blocks (a
`data:image/{jpeg,png,gif,webp};base64,` URL → a base64 source, an http(s) URL → a url source;
`detail` has no Anthropic counterpart); `file` with `file_data` (a PDF data URL) → a `document`
block; an assistant's `refusal` part → text. A part's `cache_control` ({"type": "ephemeral",
"ttl": "5m"|"1h"}, as LiteLLM accepts it on OpenAI-format parts) is kept on its block — system
prompts are then sent as blocks — so prompt caching works through the OpenAI shape; the
answer's cache reads and writes are part of its usage (adapters/base.py TokenUsage).
Anything else — other part types, file ids, other media types, images in system or assistant
messages — is refused (CLIENT, naming the part's
field), never dropped. So are parameters that change what the answer must be and that Anthropic
cannot honour: a JSON `response_format`, `n` > 1, `logprobs`, audio, `web_search_options`;
hints with no counterpart (seed, penalties, logit_bias, service_tier, store, reasoning_effort,
verbosity, prediction) are not sent.

Tool calling on "chat.completions": function `tools` → `{name, description, input_schema}`;
`tool_choice` auto/none/required/{function} → `{"type": auto|none|any|tool, name}`, and
`parallel_tool_calls: false` → `disable_parallel_tool_use`; an assistant message's `tool_calls`
→ `tool_use` blocks (input = the parsed arguments, a JSON object; "" counts as {}; ids with
characters Anthropic refuses get "_" for them, on both sides); `role: "tool"` messages →
`tool_result` blocks, consecutive ones (and a user message right after them) in one user turn.
A request that cannot be mapped is the caller's (CLIENT, naming the field). Answers: `tool_use`
blocks → `message.tool_calls` (arguments: the input re-serialised), `content` None when there is
no text.

Both stream (`stream`): native SSE events pass through for "messages"; for
"chat.completions" each text delta becomes an OpenAI `chat.completion.chunk`, and each
`tool_use` block the chunks OpenAI streams a tool call with: its opening `{"index": k, "id",
"type", "function": {"name", "arguments": ""}}` (k counts tool calls, not content blocks), then
each `input_json_delta` as `{"index": k, "function": {"arguments": partial_json}}` ("{}" for a
block that streams no input). A delta for a block that is not open, a message that ends with a
tool block open, or a tool block whose input is not a JSON object (unless `max_tokens` cut it:
finish reason "length", as OpenAI's truncated arguments) is RETRYABLE.

Headers: `x-api-key: <key>`, `anthropic-version` (option `version`, default 2023-06-01) and
optional `anthropic-beta`. Errors are `{"type":"error","error":{"type","message"}}`; 529
`overloaded_error` is RETRYABLE, 429 RATE_LIMITED (Retry-After honoured), 413
request_too_large and "prompt is too long" are CONTEXT_LENGTH.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import httpx
import orjson

from switchgear.adapters import _http
from switchgear.adapters.base import (
    MAX_TOKEN_COUNT,
    MAX_WEB_SEARCHES,
    AdapterRequest,
    AdapterResponse,
    ErrorKind,
    OptionsError,
    StreamChunk,
    Target,
    TokenUsage,
    UpstreamError,
    openai_usage,
    usage_with_parts,
)
from switchgear.adapters.openai import _redact, _text_len, classify_status, transport_error_kind
from switchgear.adapters.sse import sse_events

PROTOCOL = "anthropic"
DEFAULT_VERSION = "2023-06-01"
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}
_KNOWN_OPTIONS = ("version", "beta", "default_max_tokens", "messages_path")
_PASSED_PARAMS = ("temperature", "top_p", "top_k", "metadata")
_TOOL_CHOICES = {"auto": "auto", "none": "none", "required": "any"}
_NOT_IN_TOOL_ID = re.compile(r"[^a-zA-Z0-9_-]")  # Anthropic's tool_use ids match ^[a-zA-Z0-9_-]+$


@dataclass(frozen=True)
class AnthropicOptions:
    version: str = DEFAULT_VERSION
    beta: str = ""
    default_max_tokens: int = 1024
    messages_path: str = "/v1/messages"


def parse_options(options: Mapping[str, Any]) -> AnthropicOptions:
    """Validate a service's options; OptionsError names the key."""
    if not isinstance(options, Mapping):
        raise OptionsError("", f"options for protocol {PROTOCOL} must be a mapping")
    for key in options:
        if key not in _KNOWN_OPTIONS:
            raise OptionsError(str(key), f"unknown option for protocol {PROTOCOL}; known: {', '.join(_KNOWN_OPTIONS)}")
    defaults = AnthropicOptions()
    for key in ("version", "beta", "messages_path"):
        value = options.get(key, getattr(defaults, key))
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            raise OptionsError(key, "must be a single-line string")
    path = options.get("messages_path", defaults.messages_path)
    if not path.startswith("/"):
        raise OptionsError("messages_path", "must start with '/'")
    max_tokens = options.get("default_max_tokens", defaults.default_max_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise OptionsError("default_max_tokens", "must be an integer >= 1")
    return AnthropicOptions(options.get("version", defaults.version), options.get("beta", ""), max_tokens, path)


# ---------------------------------------------------------------------------------------
# OpenAI chat <-> Anthropic messages (pure)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return ""


#: The image types Anthropic accepts in a base64 source.
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.DOTALL)


def _refused(path: str, why: str) -> UpstreamError:
    """The caller's mistake in the request at `path`."""
    return UpstreamError(ErrorKind.CLIENT, f"{path}: {why}")


def _source(url: Any, path: str, media_types: tuple[str, ...]) -> dict[str, Any]:
    """An Anthropic content source for a data: URL (base64) or an http(s) URL."""
    if not isinstance(url, str) or not url:
        raise _refused(path, "must be a data: URL or an http(s) URL")
    data = _DATA_URL.fullmatch(url)
    if data is not None:
        if data.group(1) not in media_types:
            raise _refused(path, f"a {data.group(1)!r} data URL cannot be sent to Anthropic (it takes "
                                 f"{', '.join(media_types)})")
        return {"type": "base64", "media_type": data.group(1), "data": data.group(2)}
    if url.startswith(("https://", "http://")):
        return {"type": "url", "url": url}
    raise _refused(path, "must be a base64 data: URL or an http(s) URL")


_CACHE_TTLS = ("5m", "1h")


def _cache_control(part: Mapping[str, Any], path: str) -> dict[str, Any] | None:
    """A part's `cache_control` (LiteLLM's extension of OpenAI parts), checked as Anthropic does."""
    control = part.get("cache_control")
    if control is None:
        return None
    if not isinstance(control, Mapping) or control.get("type") != "ephemeral" or set(control) - {"type", "ttl"}:
        raise _refused(f"{path}.cache_control", 'must be {"type": "ephemeral"} with an optional "ttl"')
    if "ttl" in control and control["ttl"] not in _CACHE_TTLS:
        raise _refused(f"{path}.cache_control.ttl", f"must be one of {', '.join(_CACHE_TTLS)}")
    return dict(control)


def _part(part: Any, path: str) -> dict[str, Any]:
    """One OpenAI content part as an Anthropic content block, with its `cache_control` if any."""
    if not isinstance(part, Mapping):
        raise _refused(path, "must be an object")
    block = _block_of(part, path)
    control = _cache_control(part, path)
    if control is not None:
        block["cache_control"] = control
    return block


def _block_of(part: Mapping[str, Any], path: str) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _refused(f"{path}.text", "must be a string")
        return {"type": "text", "text": part["text"]}
    if kind == "refusal" and isinstance(part.get("refusal"), str):  # an assistant's earlier refusal
        return {"type": "text", "text": part["refusal"]}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, Mapping) else image
        return {"type": "image", "source": _source(url, f"{path}.image_url.url", IMAGE_TYPES)}
    if kind == "file":
        file = part.get("file")
        if not isinstance(file, Mapping) or "file_data" not in file:
            raise _refused(f"{path}.file.file_data", "is required: file ids are the OpenAI account's own")
        return {"type": "document", "source": _source(file["file_data"], f"{path}.file.file_data",
                                                     ("application/pdf",))}
    raise _refused(f"{path}.type", f"{kind!r} parts cannot be sent to Anthropic")


def _content(content: Any, path: str, text_only: bool = False) -> Any:
    """OpenAI content (string or parts) as Anthropic content (string or blocks); `text_only` for
    the turns that take text alone (system prompts, assistant turns)."""
    if isinstance(content, list):
        blocks = [_part(p, f"{path}[{j}]") for j, p in enumerate(content)]
        if text_only:
            for j, block in enumerate(blocks):
                if block["type"] != "text":
                    raise _refused(f"{path}[{j}].type", "only text parts are allowed in this message")
        return blocks
    return content if isinstance(content, str) else ""


def _blocks(content: Any, path: str, text_only: bool = False) -> list[Any]:
    """OpenAI content as a list of Anthropic blocks, empty texts left out."""
    mapped = _content(content, path, text_only)
    blocks = [{"type": "text", "text": mapped}] if isinstance(mapped, str) else mapped
    return [b for b in blocks if b["type"] != "text" or b["text"]]


def _tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI function tools as Anthropic tools."""
    if not isinstance(tools, list) or not tools:
        raise _refused("payload.tools", "must be a non-empty list of function tools")
    mapped = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or tool.get("type") != "function":
            raise _refused(f"payload.tools[{i}]", 'must be {"type": "function", "function": {"name": ...}}')
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise _refused(f"payload.tools[{i}].function.name", "must be a non-empty string")
        schema = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(schema, Mapping):
            raise _refused(f"payload.tools[{i}].function.parameters", "must be a JSON Schema object")
        one: dict[str, Any] = {"name": name}
        description = function.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise _refused(f"payload.tools[{i}].function.description", "must be a string")
            one["description"] = description
        one["input_schema"] = schema
        mapped.append(one)
    return mapped


def _tool_choice(choice: Any, names: list[str], parallel: Any) -> dict[str, Any] | None:
    """OpenAI `tool_choice` / `parallel_tool_calls` as Anthropic's `tool_choice` (None: unsaid)."""
    if parallel is not None and not isinstance(parallel, bool):
        raise _refused("payload.parallel_tool_calls", "must be a boolean")
    function = choice.get("function") if isinstance(choice, Mapping) and choice.get("type") == "function" else None
    mapped: dict[str, Any]
    if choice is None:
        if parallel is not False:
            return None
        mapped = {"type": "auto"}
    elif isinstance(choice, str) and choice in _TOOL_CHOICES:
        mapped = {"type": _TOOL_CHOICES[choice]}
    elif isinstance(function, Mapping):
        name = function.get("name")
        if not isinstance(name, str) or name not in names:
            raise _refused("payload.tool_choice.function.name", f"{name!r} is not the name of one of payload.tools")
        mapped = {"type": "tool", "name": name}
    else:
        raise _refused("payload.tool_choice", 'must be "none", "auto", "required" or '
                       '{"type": "function", "function": {"name": ...}}')
    if parallel is False and mapped["type"] != "none":
        mapped["disable_parallel_tool_use"] = True
    return mapped


def _tool_use(path: str, call: Any) -> dict[str, Any]:
    """One of an assistant message's OpenAI `tool_calls` as an Anthropic `tool_use` block."""
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or call.get("type", "function") != "function":
        raise _refused(path, 'must be {"id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}')
    call_id, name, arguments = call.get("id"), function.get("name"), function.get("arguments", "")
    if not isinstance(call_id, str) or not call_id:
        raise _refused(f"{path}.id", "must be a non-empty string")
    if not isinstance(name, str) or not name:
        raise _refused(f"{path}.function.name", "must be a non-empty string")
    if not isinstance(arguments, str):
        raise _refused(f"{path}.function.arguments", "must be a string of JSON")
    try:
        parsed = orjson.loads(arguments) if arguments.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise _refused(f"{path}.function.arguments", f"is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise _refused(f"{path}.function.arguments", "must be a JSON object")
    return {"type": "tool_use", "id": _tool_id(call_id), "name": name, "input": parsed}


def _tool_id(call_id: str) -> str:
    """A tool call id as Anthropic accepts one: another provider's ids (`functions.f:0`) with
    each other character as "_", the same on the tool_use and on the tool_result."""
    return _NOT_IN_TOOL_ID.sub("_", call_id)


def _turns(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system text blocks, Anthropic turns) of OpenAI chat messages."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    results: list[Any] | None = None  # the content of the user turn that tool messages are adding to
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise _refused(f"payload.messages[{i}]", "must be an object with a role")
        role, content = message["role"], message.get("content")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _refused(f"payload.messages[{i}].tool_call_id", "must be the id of the tool call it answers")
            block = {"type": "tool_result", "tool_use_id": _tool_id(call_id),
                     "content": _content(content, f"payload.messages[{i}].content")}
            if results is None:
                results = [block]
                turns.append({"role": "user", "content": results})
            else:
                results.append(block)
            continue
        if role == "user" and results is not None:  # Anthropic wants tool results first in a user turn
            results.extend(_blocks(content, f"payload.messages[{i}].content"))
        elif role in ("system", "developer"):
            system.extend(_blocks(content, f"payload.messages[{i}].content", text_only=True))
        elif role == "user" or (role == "assistant" and not message.get("tool_calls")):
            turns.append({"role": role, "content": _content(content, f"payload.messages[{i}].content",
                                                            text_only=role == "assistant")})
        elif role == "assistant":
            calls = message["tool_calls"]
            if not isinstance(calls, list):
                raise _refused(f"payload.messages[{i}].tool_calls", "must be a list")
            uses = [_tool_use(f"payload.messages[{i}].tool_calls[{j}]", call) for j, call in enumerate(calls)]
            turns.append({"role": role, "content": _blocks(content, f"payload.messages[{i}].content", True) + uses})
        else:
            raise _refused(f"payload.messages[{i}].role", f"{role!r} cannot be mapped to Anthropic")
        results = None
    return system, turns


def _unmapped(payload: Mapping[str, Any]) -> None:
    """CLIENT for the chat parameters that change what an answer must be and that Anthropic cannot
    honour; the hints it has no counterpart for (seed, penalties, logit_bias, service_tier, store,
    reasoning_effort, verbosity, prediction) change no answer's shape and are not sent."""
    fmt = payload.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise _refused("payload.response_format", "Anthropic targets cannot be held to a JSON format; ask for "
                                                  "JSON in the prompt or route this call to an OpenAI target")
    if payload.get("n") not in (None, 1):
        raise _refused("payload.n", "Anthropic targets answer one choice a call")
    if payload.get("logprobs") or payload.get("top_logprobs"):
        raise _refused("payload.logprobs", "Anthropic targets give no log probabilities")
    modalities = payload.get("modalities")
    if payload.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        raise _refused("payload.audio", "Anthropic targets answer in text only")
    if payload.get("web_search_options") is not None:
        raise _refused("payload.web_search_options", "Anthropic targets take no OpenAI web search")


def messages_from_chat(payload: Mapping[str, Any], model: str, default_max_tokens: int) -> dict[str, Any]:
    """An Anthropic Messages body for an OpenAI chat body (raises CLIENT on a bad one)."""
    _unmapped(payload)
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UpstreamError(ErrorKind.CLIENT, "payload.messages: must be a non-empty list of messages")
    system, turns = _turns(messages)
    body: dict[str, Any] = {"model": model or payload.get("model", ""), "messages": turns}
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens") or default_max_tokens
    body["max_tokens"] = max_tokens
    if any("cache_control" in block for block in system):
        body["system"] = system  # blocks: a cache breakpoint is on one of them
    elif system:
        body["system"] = "\n\n".join(block["text"] for block in system)
    stop = payload.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    for key in _PASSED_PARAMS:
        if key in payload:
            body[key] = payload[key]
    if payload.get("tools") is not None:
        body["tools"] = _tools(payload["tools"])
        choice = _tool_choice(payload.get("tool_choice"), [t["name"] for t in body["tools"]],
                              payload.get("parallel_tool_calls"))
        if choice is not None:
            body["tool_choice"] = choice
    elif payload.get("tool_choice") is not None:
        raise _refused("payload.tool_choice", "is only allowed with payload.tools")
    if payload.get("user"):
        body["metadata"] = {"user_id": payload["user"]}
    return body


_CACHE_KEYS = ("cache_read_input_tokens", "cache_creation_input_tokens")


def usage_of(usage: Any) -> TokenUsage | None:
    """Anthropic usage → TokenUsage. Anthropic's `input_tokens` excludes the prompt-cache parts
    (`cache_read_input_tokens`, `cache_creation_input_tokens`); TokenUsage's input is all of
    it, with the cache parts as subsets. `server_tool_use.web_search_requests`: the searches its
    web_search server tool ran (billed per search). None when a count is missing or not a count."""
    if not isinstance(usage, Mapping) or "input_tokens" not in usage:
        return None
    uncached, read, write = (_http.count(usage.get(k, 0)) for k in ("input_tokens", *_CACHE_KEYS))
    output = _http.count(usage.get("output_tokens", 0))
    if uncached is None or read is None or write is None or output is None:
        return None
    return _total_usage(uncached, read, write, output, web_searches(usage))


def web_searches(usage: Mapping[str, Any]) -> Any:
    """The raw `server_tool_use.web_search_requests` of a usage object (0 when absent);
    usage_with_parts believes it only when it is a count."""
    tools = usage.get("server_tool_use")
    return tools.get("web_search_requests", 0) if isinstance(tools, Mapping) else 0


def _total_usage(uncached: int, read: int, write: int, output: int, searches: Any = 0) -> TokenUsage:
    total = min(uncached + read + write, MAX_TOKEN_COUNT)
    return usage_with_parts(total, output, cache_read=read, cache_write=write, web_searches=searches)


def chat_from_message(message: Mapping[str, Any], usage: TokenUsage, created: int) -> dict[str, Any]:
    """An OpenAI `chat.completion` object for an Anthropic message."""
    content = message.get("content")
    blocks: list[Any] = content if isinstance(content, list) else []
    text = "".join(b.get("text", "") for b in blocks if isinstance(b, Mapping) and b.get("type") == "text")
    tool_calls = [
        {
            "id": b.get("id", ""),
            "type": "function",
            "function": {"name": b.get("name", ""), "arguments": orjson.dumps(_dict(b.get("input"))).decode()},
        }
        for b in blocks
        if isinstance(b, Mapping) and b.get("type") == "tool_use"
    ]
    reply: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    return {
        "id": f"chatcmpl-{message.get('id', '')}",
        "object": "chat.completion",
        "created": created,
        "model": message.get("model", ""),
        "choices": [
            {
                "index": 0,
                "message": reply,
                "logprobs": None,
                "finish_reason": STOP_REASONS.get(str(message.get("stop_reason")), "stop"),
            }
        ],
        "usage": openai_usage(usage),
    }


def parse_error(body: bytes) -> tuple[str, str]:
    """(error.type, error.message) of `{"type":"error","error":{...}}`, else the generic shapes."""
    return _http.generic_error(body)


def classify(status: int, code: str, message: str) -> ErrorKind:
    """OpenAI's table plus Anthropic's words: 413 and "prompt is too long" → CONTEXT_LENGTH;
    529 overloaded → RETRYABLE; `rate_limit_error` → RATE_LIMITED whatever the status."""
    if status == 413 or (status == 400 and "prompt is too long" in message.lower()):
        return ErrorKind.CONTEXT_LENGTH
    if code == "rate_limit_error":
        return ErrorKind.RATE_LIMITED
    if code == "overloaded_error":
        return ErrorKind.RETRYABLE
    return classify_status(status, code, message)


def _estimate_prompt_chars(body: Mapping[str, Any]) -> int:
    messages = body.get("messages")
    turns: list[Any] = messages if isinstance(messages, list) else []
    chars = sum(_text_len(m.get("content")) for m in turns if isinstance(m, Mapping))
    system = body.get("system")
    return chars + (_text_len(system) if system is not None else 0)


def estimated_input_tokens(body: Mapping[str, Any]) -> int:
    """A Messages body's input tokens by the agent's estimate (4 characters a token over the
    system prompt, the messages and the tool definitions), for a target that cannot count them."""
    tools = body.get("tools")
    chars = _estimate_prompt_chars(body) + (len(orjson.dumps(tools)) if isinstance(tools, list) else 0)
    return _http.estimated(chars, 0).input_tokens


#: An `anthropic-beta` value: Anthropic's beta names are lowercase words, digits and hyphens
#: ("interleaved-thinking-2025-05-14"); at most this many a call, each at most 64 characters.
BETA_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
MAX_BETAS = 16


def caller_betas(value: Any) -> tuple[str, ...]:
    """The betas a native call asks for in `payload.anthropic_beta` (a list of names, as Bedrock
    takes them; the Anthropic door puts its caller's `anthropic-beta` header there): sent in the
    `anthropic-beta` header after the service's own option `beta`. UpstreamError(CLIENT) naming
    the field for anything but a short list of well-formed names."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_BETAS:
        raise UpstreamError(ErrorKind.CLIENT, f"payload.anthropic_beta: must be a list of at most {MAX_BETAS} names")
    for i, name in enumerate(value):
        if not isinstance(name, str) or not BETA_NAME.fullmatch(name):
            raise UpstreamError(ErrorKind.CLIENT, f"payload.anthropic_beta[{i}]: not a beta name "
                                                  "(lowercase letters, digits, '.' and '-', at most 64)")
    return tuple(value)


# ---------------------------------------------------------------------------------------
# the adapter


class AnthropicAdapter:
    """Adapter for Anthropic's Messages API. Stateless; safe to share across tasks."""

    protocol: ClassVar[str] = PROTOCOL
    methods: ClassVar[frozenset[str]] = frozenset({"messages", "chat.completions", "count_tokens"})
    stream_methods: ClassVar[frozenset[str]] = frozenset({"messages", "chat.completions"})
    #: Answered in one try per endpoint outside the routing statistics (invoke.py `Invoker.once`):
    #: a token count is a cheap read whose latency says nothing about the service's messages.
    direct_methods: ClassVar[frozenset[str]] = frozenset({"count_tokens"})

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock

    @staticmethod
    def idempotent(method: str, payload: Mapping[str, Any]) -> bool:
        """A message (native or as a chat completion) only reads: it may be hedged."""
        return method in AnthropicAdapter.methods

    def parse_options(self, options: Mapping[str, Any]) -> AnthropicOptions:
        return parse_options(options)

    def _prepare(
        self, target: Target, request: AdapterRequest, stream: bool
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        if request.method not in self.methods:
            raise UpstreamError(ErrorKind.CLIENT, f"method {request.method!r} is not served by protocol {PROTOCOL}")
        options = target.options if isinstance(target.options, AnthropicOptions) else AnthropicOptions()
        betas: tuple[str, ...] = ()
        if request.method == "chat.completions":
            body = messages_from_chat(request.payload, target.model, options.default_max_tokens)
        else:
            body = dict(request.payload)
            betas = caller_betas(body.pop("anthropic_beta", None))
            if target.model:
                body["model"] = target.model
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                raise UpstreamError(ErrorKind.CLIENT, "payload.messages: must be a non-empty list of messages")
            if request.method == "messages":
                body.setdefault("max_tokens", options.default_max_tokens)
        body.pop("stream", None)
        if stream:
            body["stream"] = True
        _http.check_time(request.timeout_s)
        headers = {**request.headers, "content-type": "application/json", "anthropic-version": options.version}
        beta = ",".join(dict.fromkeys((*(b.strip() for b in options.beta.split(",") if b.strip()), *betas)))
        if beta:
            headers["anthropic-beta"] = beta
        if request.request_id:
            headers["x-request-id"] = request.request_id
        if target.api_key:
            headers["x-api-key"] = target.api_key
        base = target.base_url.rstrip("/")  # "https://api.anthropic.com" or ".../v1" both work
        path = options.messages_path + ("/count_tokens" if request.method == "count_tokens" else "")
        url = base + (path.removeprefix("/v1") if base.endswith("/v1") else path)
        return url, headers, body

    async def invoke(self, client: Any, target: Target, request: AdapterRequest) -> AdapterResponse:
        """One POST /v1/messages; raise UpstreamError on failure."""
        url, headers, body = self._prepare(target, request, stream=False)
        response = await _http.send(
            client,
            "POST",
            url,
            secret=target.api_key,
            timeout_s=request.timeout_s,
            headers=headers,
            content=_http.dumps(body),
        )
        if not 200 <= response.status_code < 300:
            raise _http.response_failure(
                "POST",
                url,
                response,
                secret=target.api_key,
                now=self._wall_clock(),
                parse=parse_error,
                classify=classify,
            )
        message = _http.json_body(response)
        if not isinstance(message, dict):
            raise UpstreamError(
                ErrorKind.RETRYABLE, "upstream answer is not a JSON object", status=response.status_code
            )
        if request.method == "count_tokens":  # {"input_tokens": N}: a count, not a call's usage
            count = message.get("input_tokens")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise UpstreamError(ErrorKind.RETRYABLE, "count_tokens answer without a whole input_tokens",
                                    status=response.status_code)
            return AdapterResponse(response.content, TokenUsage(), response.status_code)
        usage = usage_of(message.get("usage"))
        if usage is None:
            out_chars = sum(_text_len([b]) for b in message.get("content") or () if isinstance(b, Mapping))
            usage = _http.estimated(_estimate_prompt_chars(body), out_chars)
        if request.method == "messages":
            return AdapterResponse(response.content, usage, response.status_code)
        chat = chat_from_message(message, usage, int(self._wall_clock()))
        return AdapterResponse(orjson.dumps(chat), usage, response.status_code)

    async def stream(self, client: Any, target: Target, request: AdapterRequest) -> AsyncIterator[StreamChunk]:
        """One streamed attempt; see the module docstring for the two chunk shapes."""
        url, headers, body = self._prepare(target, request, stream=True)
        headers["accept"] = "text/event-stream"
        state = _MessageStream(request.method == "chat.completions", int(self._wall_clock()))
        try:
            async with client.stream(
                "POST", url, content=_http.dumps(body), headers=headers, timeout=httpx.Timeout(request.timeout_s)
            ) as response:
                if not 200 <= response.status_code < 300:
                    await response.aread()
                    raise _http.response_failure(
                        "POST",
                        url,
                        response,
                        secret=target.api_key,
                        now=self._wall_clock(),
                        parse=parse_error,
                        classify=classify,
                    )
                async for event, data in sse_events(response.aiter_lines()):
                    chunk = state.feed(event, data)
                    if chunk is not None:
                        yield chunk
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            text = f"POST {url}: {type(exc).__name__}: {exc}".rstrip(": ")
            raise UpstreamError(transport_error_kind(exc), _redact(text, target.api_key)) from None
        if not state.stopped:
            raise UpstreamError(ErrorKind.RETRYABLE, f"POST {url}: stream ended before message_stop")
        usage = state.usage() or _http.estimated(_estimate_prompt_chars(body), state.chars)
        yield StreamChunk(usage=usage, finish_reason=state.finish_reason)


class _MessageStream:
    """Reads Anthropic's SSE events; yields native events or OpenAI chunks (`as_chat`)."""

    def __init__(self, as_chat: bool, created: int) -> None:
        self.as_chat = as_chat
        self.created = created
        self.id = ""
        self.model = ""
        self.input_tokens: int | None = None  # Anthropic's: without the cache parts
        self.cache_tokens = [0, 0]  # cache reads, cache writes
        self.output_tokens: int | None = None
        self.searches: Any = 0  # server_tool_use.web_search_requests, cumulative like output_tokens
        self.ran = 0  # web searches whose results streamed so far (an error result is not billed)
        self.finish_reason: str | None = None
        self.stopped = False
        self.chars = 0
        self.tool_calls = 0  # tool_use blocks opened so far: the next one's OpenAI index
        # open tool_use blocks by content-block index: (tool call index, input pieces, start input)
        self.open_tools: dict[int, tuple[int, list[str], Any]] = {}
        self.other_blocks: set[int] = set()  # the indexes of the other blocks (text, server tools, ...)
        self.unparsed: int | None = None  # the first tool_use block whose input is not a JSON object

    def usage(self) -> TokenUsage | None:
        if self.input_tokens is None or self.output_tokens is None:
            return None
        return _total_usage(self.input_tokens, self.cache_tokens[0], self.cache_tokens[1], self.output_tokens,
                            self.searches)

    def _note_input(self, usage: Mapping[str, Any]) -> None:
        """Input counts from message_start, or message_delta's cumulative ones when it has them."""
        if _http.count(usage.get("input_tokens")) is not None:
            self.input_tokens = usage["input_tokens"]
        for i, key in enumerate(_CACHE_KEYS):
            if _http.count(usage.get(key)) is not None:
                self.cache_tokens[i] = usage[key]

    def feed(self, event: str, data: str) -> StreamChunk | None:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamError(ErrorKind.RETRYABLE, f"stream event is not JSON: {data[:120]!r}") from None
        if not isinstance(obj, dict):
            raise _bad_event(f"not a JSON object: {data[:120]!r}")
        kind = obj.get("type", event)
        if kind == "error":
            err = _dict(obj.get("error"))
            code, message = str(err.get("type", "")), str(err.get("message", ""))
            error_kind = classify(529 if code == "overloaded_error" else 500, code, message)
            raise UpstreamError(error_kind, f"error event in stream: [{code}] {message}", body=data.encode())
        ran = self.ran
        text, content = self._track(kind, obj)
        if not self.as_chat:
            return StreamChunk(data=data.encode(), text=text, content=content, searches=self.ran)
        chunk = self._chat_chunk(kind, obj, text)
        if self.ran == ran:
            return chunk
        return replace(chunk, searches=self.ran) if chunk is not None else StreamChunk(searches=self.ran)

    def _track(self, kind: str, obj: dict[str, Any]) -> tuple[str, bool]:
        if kind == "message_start":
            message = _dict(obj.get("message"))
            self.id, self.model = str(message.get("id", "")), str(message.get("model", ""))
            usage = _dict(message.get("usage"))
            self._note_input(usage)
            self.output_tokens = _http.count(usage.get("output_tokens"))
            self.searches = web_searches(usage)
        elif kind == "content_block_delta":
            delta = _dict(obj.get("delta"))
            text = delta.get("text") if delta.get("type") == "text_delta" else ""
            text = text if isinstance(text, str) else ""
            piece = delta.get("partial_json")
            self.chars += len(text) + (len(piece) if isinstance(piece, str) else 0)
            return text, bool(text) or delta.get("type") == "input_json_delta"
        elif kind == "content_block_start":
            block = _dict(obj.get("content_block"))
            if block.get("type") == "web_search_tool_result" and isinstance(block.get("content"), list):
                # (an error's content is an object: Anthropic bills no search then; a count above
                # MAX_WEB_SEARCHES is not believed, as a reported one is not)
                self.ran = min(self.ran + 1, MAX_WEB_SEARCHES)
            return "", block.get("type") == "tool_use"
        elif kind == "message_delta":
            delta = _dict(obj.get("delta"))
            if delta.get("stop_reason"):
                self.finish_reason = STOP_REASONS.get(str(delta["stop_reason"]), "stop")
            usage = _dict(obj.get("usage"))
            if _http.count(usage.get("output_tokens")) is not None:
                self.output_tokens = usage["output_tokens"]
            if usage.get("input_tokens"):  # (a 0 here is "not counted again", not "none")
                self._note_input(usage)
            if "server_tool_use" in usage:
                self.searches = web_searches(usage)
        elif kind == "message_stop":
            self.stopped = True
        return "", False

    def _chat_chunk(self, kind: str, obj: dict[str, Any], text: str) -> StreamChunk | None:
        finish = None
        if kind == "message_start":
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
        elif text:
            delta = {"content": text}
        elif kind in ("content_block_start", "content_block_delta", "content_block_stop"):
            call = self._tool_call(kind, obj)
            if call is None:
                return None  # a text block's start or stop, an empty input piece
            delta = {"tool_calls": [call]}
        elif kind in ("message_delta", "message_stop") and self.open_tools:
            raise _bad_event(f"the message ended with tool_use block {min(self.open_tools)} still open")
        elif kind in ("message_delta", "message_stop") and self.unparsed is not None and self.finish_reason != "length":
            raise _bad_event(f"tool_use block {self.unparsed}'s input is not a JSON object")  # (max_tokens may cut it)
        elif kind == "message_delta" and self.finish_reason:
            delta, finish = {}, self.finish_reason
        else:
            return None  # ping, message_stop: nothing to say in OpenAI's shape
        chunk = {
            "id": f"chatcmpl-{self.id}",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return StreamChunk(data=orjson.dumps(chunk), text=text, content=bool(text) or "tool_calls" in delta)

    def _tool_call(self, kind: str, obj: dict[str, Any]) -> dict[str, Any] | None:
        """The OpenAI tool call delta for a content block event (None: nothing to say)."""
        index = obj.get("index")
        index = index if isinstance(index, int) and not isinstance(index, bool) else None
        found = self.open_tools.get(index) if index is not None else None
        if kind == "content_block_start":
            block = obj.get("content_block")
            if not isinstance(block, dict) or block.get("type") != "tool_use":
                if index is not None:
                    self.other_blocks.add(index)
                return None
            call_id, name = block.get("id"), block.get("name")
            if index is None or found is not None or not isinstance(call_id, str) or not isinstance(name, str):
                raise _bad_event(f"tool_use block {index} opened without an index, an id and a name, or twice")
            self.open_tools[index] = (self.tool_calls, [], block.get("input"))
            self.tool_calls += 1
            return {"index": self.tool_calls - 1, "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": ""}}
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if not isinstance(delta, dict) or delta.get("type") != "input_json_delta":
                return None
            piece = delta.get("partial_json")
            if found is None and index in self.other_blocks:
                return None  # a server tool's input (web search, ...): not a call for the caller to make
            if found is None or not isinstance(piece, str):
                raise _bad_event(f"input_json_delta for block {index}, which is not an open tool_use block, "
                                 "or without a partial_json string")
            if not piece:
                return None
            found[1].append(piece)
            return {"index": found[0], "function": {"arguments": piece}}
        if found is None or index is None:  # the end of a text block
            return None
        del self.open_tools[index]
        ordinal, pieces, start = found
        if not pieces:  # the block streamed no input: its arguments are the start's input, as a whole answer's
            start = start if isinstance(start, dict) else {}
            return {"index": ordinal, "function": {"arguments": orjson.dumps(start).decode()}}
        try:
            parsed = orjson.loads("".join(pieces))
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict) and self.unparsed is None:
            self.unparsed = index  # the upstream's fault unless max_tokens cut it (message_delta says)
        return None


def _dict(value: Any) -> dict[str, Any]:
    """`value` when it is a JSON object, else an empty one (an event's optional parts)."""
    return value if isinstance(value, dict) else {}


def _bad_event(why: str) -> UpstreamError:
    return UpstreamError(ErrorKind.RETRYABLE, f"malformed stream event: {why}")
