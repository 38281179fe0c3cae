"""A protocol-faithful Anthropic Messages API emulator with fault injection.

`POST /v1/messages` with Anthropic's headers (`x-api-key`, required `anthropic-version`, each
`anthropic-beta` name well formed and tallied in the instance's `notes`), body validation,
JSON answers and SSE streams framed as Anthropic frames them:

    event: message_start        {"type":"message_start","message":{..., "usage":{"input_tokens":N,...}}}
    event: content_block_start  {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}
    event: ping                 {"type":"ping"}
    event: content_block_delta  {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",...}}
                                (one per token)
    event: content_block_stop   {"type":"content_block_stop","index":0}
    event: message_delta        {"type":"message_delta","delta":{"stop_reason":"end_turn",...},
                                 "usage":{"output_tokens":M}}
    event: message_stop         {"type":"message_stop"}

Tool use (custom tools: `tools` [{name, description, input_schema}], `tool_choice` {type:
auto|any|tool|none, name, disable_parallel_tool_use}) is deterministic, as the OpenAI emulator's:
the answer calls the tool `tool_choice` names, else (unless "none") every tool whose name the
last user message's text mentions, in the order given, and with "any" and none mentioned, the
first; the input echoes the prompt (`{"query": ..., "call": k}`). The answer is then `tool_use`
blocks (after a short text block under "auto", none under "any"/"tool", as Claude is prefilled
then) with `stop_reason: "tool_use"`; streamed, each block opens with `input: {}`, then
`input_json_delta` pieces (the first one empty, as Anthropic's) spell out the input as JSON with
spaces after separators, then `content_block_stop` (an answer that calls tools is never cut by
`max_tokens` or a stop sequence). A user turn that holds only tool results names no tool: it is
answered with text about the results. Requests are checked as Anthropic
checks them, after combining consecutive turns of one role: tool_use blocks only from the
assistant, tool_result blocks only from the user and before any other block, every tool_use id
answered by a tool_result in the next turn and every tool_result answering one of the previous
turn's (400 invalid_request_error naming the field, e.g. `messages.1: tool_use ids were found
without tool_result blocks immediately after: ...`).

Errors are `{"type":"error","error":{"type","message"}}` with Anthropic's statuses: 400
invalid_request_error (incl. "prompt is too long: N tokens > M maximum"), 401
authentication_error, 404 not_found_error, 413 request_too_large, 429 rate_limit_error (with
retry-after and anthropic-ratelimit-* headers), 500 api_error, 529 overloaded_error. A
stream cut by the `stream_cut_after` fault ends with `event: error` (overloaded_error).

Web search (the server tool `{"type": "web_search_20250305", "name": "web_search", "max_uses": N}`,
as Anthropic's): the model searches once for each time the last user message's text says
"search", at most `max_uses` times; each search is a `server_tool_use` block (input
`{"query": ...}`) then a `web_search_tool_result` block of results (their text counted as
SEARCH_RESULT_TOKENS more input tokens a search), before the text answer; `usage.server_tool_use.
web_search_requests` counts them (also on the stream's `message_delta`), as Anthropic bills them.

`POST /v1/messages/count_tokens` takes a Messages body without max_tokens, stream or
stop_sequences (400 "Extra inputs are not permitted") and answers `{"input_tokens": N}`, the
count /v1/messages would report for the same body.

Prompt caching: blocks (system or message content) marked `cache_control: {"type":
"ephemeral", "ttl": "5m"|"1h"}` (at most four) are cache breakpoints. A breakpoint's prefix
(everything up to and including its block) of at least `min_cacheable_tokens` is cached; a
repeat within its TTL reads the longest cached one (`cache_read_input_tokens`), the rest up to
the last breakpoint is written (`cache_creation_input_tokens`), and `input_tokens` counts only
the input after the last breakpoint plus anything too short to cache, as Anthropic reports it.

Replies are deterministic (the OpenAI emulator's `reply_text`); faults and /_emulator routes
as in `emulators.common`. CLI: `switchgear emulate anthropic --port P [--api-key K]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
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
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_TOOL_USE_ID = re.compile(r"[a-zA-Z0-9_-]+")
_TOOL_CHOICES = ("auto", "any", "tool", "none")
_WEB_SEARCH_TYPE = re.compile(r"web_search_[0-9]{8}")
#: The input tokens one search's results add (deterministic, as the rest of the emulator).
SEARCH_RESULT_TOKENS = 40
_NOT_ANSWERED = (
    "{where}: `tool_use` ids were found without `tool_result` blocks immediately after: {ids}. "
    "Each `tool_use` block must have a corresponding `tool_result` block in the next message."
)


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


@dataclass(frozen=True)
class Tools:
    """A request's tools as the answer uses them: names in order, `tool_choice`'s type and name."""

    names: tuple[str, ...] = ()
    choice: str = "auto"
    name: str = ""
    single: bool = False  # disable_parallel_tool_use
    max_searches: int = 0  # with the web_search server tool: its max_uses (else 0: no search tool)


#: A web_search tool without max_uses: searches the answer may run at most.
_SEARCH_CAP = 10


def _web_search_tool(path: str, tool: Mapping[str, Any]) -> int:
    """A web_search server tool checked as Anthropic checks it: its max_uses (or _SEARCH_CAP)."""
    if tool.get("name") != "web_search":
        raise AnthropicError(400, f"{path}.name: Input should be 'web_search'")
    uses = tool.get("max_uses", _SEARCH_CAP)
    if isinstance(uses, bool) or not isinstance(uses, int) or uses < 1:
        raise AnthropicError(400, f"{path}.max_uses: Input should be greater than 0")
    for key in ("allowed_domains", "blocked_domains"):
        if key in tool and not (isinstance(tool[key], list) and all(isinstance(d, str) for d in tool[key])):
            raise AnthropicError(400, f"{path}.{key}: Input should be a valid list of strings")
    if "allowed_domains" in tool and "blocked_domains" in tool:
        raise AnthropicError(400, f"{path}: only one of allowed_domains and blocked_domains may be given")
    return min(uses, _SEARCH_CAP)


def parse_tools(body: Mapping[str, Any]) -> Tools:
    """`tools` and `tool_choice` checked as Anthropic checks custom tools, or AnthropicError."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice is not None:
            raise AnthropicError(400, "tool_choice: tool_choice may only be specified while providing tools")
        return Tools()
    if not isinstance(tools, list):
        raise AnthropicError(400, "tools: Input should be a valid list")
    names: list[str] = []
    searches = 0
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise AnthropicError(400, f"tools.{i}: Input should be a valid dictionary")
        if isinstance(tool.get("type"), str) and _WEB_SEARCH_TYPE.fullmatch(tool["type"]):
            if searches:
                raise AnthropicError(400, "tools: Tool names must be unique.")
            searches = _web_search_tool(f"tools.{i}", tool)
            continue
        if tool.get("type", "custom") != "custom":
            raise AnthropicError(400, f"tools.{i}.type: Input tag {tool['type']!r} found using 'type' does not match "
                                 "any of the expected tags: 'custom'")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str):
            raise AnthropicError(400, f"tools.{i}.name: Field required")
        if not _TOOL_NAME.fullmatch(name):
            raise AnthropicError(400, f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
        if not isinstance(schema, dict):
            raise AnthropicError(400, f"tools.{i}.input_schema: Field required")
        if schema.get("type") != "object":
            raise AnthropicError(400, f"tools.{i}.input_schema.type: Input should be 'object'")
        if not isinstance(tool.get("description", ""), str):
            raise AnthropicError(400, f"tools.{i}.description: Input should be a valid string")
        if name in names:
            raise AnthropicError(400, "tools: Tool names must be unique.")
        names.append(name)
    choice = {"type": "auto"} if choice is None else choice
    if not isinstance(choice, dict):
        raise AnthropicError(400, "tool_choice: Input should be a valid dictionary")
    if choice.get("type") not in _TOOL_CHOICES:
        raise AnthropicError(400, f"tool_choice.type: Input tag {choice.get('type')!r} found using 'type' does not "
                             "match any of the expected tags: 'auto', 'any', 'tool', 'none'")
    single = choice.get("disable_parallel_tool_use", False)
    if not isinstance(single, bool):
        raise AnthropicError(400, "tool_choice.disable_parallel_tool_use: Input should be a valid boolean")
    name = choice.get("name", "")
    if choice["type"] == "tool":
        if not isinstance(name, str) or not name:
            raise AnthropicError(400, "tool_choice.name: Field required")
        if name not in names:
            raise AnthropicError(400, f"tool_choice.name: Tool '{name}' not found in tools")
    return Tools(tuple(names), choice["type"], name if isinstance(name, str) else "", single, searches)


_BLOCK_TYPES = ("text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
                "search_result")
_MEDIA_TYPES = {"image": ("image/jpeg", "image/png", "image/gif", "image/webp"),
                "document": ("application/pdf",)}


def _check_source(path: str, source: Any, media_types: tuple[str, ...]) -> None:
    """An image's or a PDF document's source: base64 data of an accepted media type, or a URL."""
    if not isinstance(source, dict) or source.get("type") not in ("base64", "url"):
        raise AnthropicError(400, f"{path}: Input tag {source.get('type') if isinstance(source, dict) else None!r} "
                             "found using 'type' does not match any of the expected tags: 'base64', 'url'")
    if source["type"] == "url":
        if not isinstance(source.get("url"), str) or not source["url"].startswith(("https://", "http://")):
            raise AnthropicError(400, f"{path}.url.url: Input should be a valid URL")
        return
    if source.get("media_type") not in media_types:
        raise AnthropicError(400, f"{path}.base64.media_type: Input should be "
                             f"{', '.join(repr(t) for t in media_types)}")
    data = source.get("data")
    if not isinstance(data, str) or not data:
        raise AnthropicError(400, f"{path}.base64.data: Field required")
    try:
        base64.b64decode(data, validate=True)
    except binascii.Error:
        raise AnthropicError(400, f"{path}.base64.data: Input should be valid base64") from None


def _check_block(path: str, block: Any, role: str) -> None:
    if not isinstance(block, dict):
        raise AnthropicError(400, f"{path}: Input should be a valid dictionary")
    kind = block.get("type")
    if not isinstance(kind, str):
        raise AnthropicError(400, f"{path}.type: Field required")
    if kind not in _BLOCK_TYPES:
        raise AnthropicError(400, f"{path}: Input tag {kind!r} found using 'type' does not match any of the "
                             f"expected tags: {', '.join(repr(t) for t in _BLOCK_TYPES)}")
    if kind == "text" and not isinstance(block.get("text"), str):
        raise AnthropicError(400, f"{path}.text: Input should be a valid string")
    if kind in ("image", "document"):
        if role != "user" and kind == "image":
            raise AnthropicError(400, f"{path}: image blocks may only appear in user messages")
        _check_source(f"{path}.source", block.get("source"), _MEDIA_TYPES[kind])
    if kind == "tool_use":
        if role != "assistant":
            raise AnthropicError(400, f"{path}: tool_use blocks may only appear in assistant messages")
        if not isinstance(block.get("id"), str) or not _TOOL_USE_ID.fullmatch(block["id"]):
            raise AnthropicError(400, f"{path}.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
        if not isinstance(block.get("name"), str) or not block["name"]:
            raise AnthropicError(400, f"{path}.name: Field required")
        if not isinstance(block.get("input"), dict):
            raise AnthropicError(400, f"{path}.input: Input should be a valid dictionary")
    if kind == "tool_result":
        if role != "user":
            raise AnthropicError(400, f"{path}: tool_result blocks may only appear in user messages")
        if not isinstance(block.get("tool_use_id"), str):
            raise AnthropicError(400, f"{path}.tool_use_id: Field required")
        content = block.get("content", "")
        listed = isinstance(content, list) and all(isinstance(b, dict) for b in content)
        if not isinstance(content, str) and not listed:
            raise AnthropicError(400, f"{path}.content: Input should be a valid string or a list of content blocks")


def check_turns(messages: list[dict[str, Any]]) -> None:
    """Content blocks and tool use pairing, as Anthropic checks them after combining consecutive
    turns of one role: every tool_use id answered by a tool_result in the next turn, which puts
    its tool results first; every tool_result answering one of the previous turn's tool_use ids."""
    turns: list[tuple[str, int, list[tuple[str, dict[str, Any]]]]] = []  # role, first message, (path, block)
    for i, message in enumerate(messages):
        content = message["content"]
        blocks = ([(f"messages.{i}.content", {"type": "text", "text": content})] if isinstance(content, str)
                  else [(f"messages.{i}.content.{j}", b) for j, b in enumerate(content)])
        for path, block in blocks:
            _check_block(path, block, message["role"])
        if turns and turns[-1][0] == message["role"]:
            turns[-1][2].extend(blocks)
        else:
            turns.append((message["role"], i, blocks))
    asked: list[str] = []  # the tool_use ids of the turn before
    for n, (_, first, blocks) in enumerate(turns):
        kinds = [block["type"] for _, block in blocks]
        answered = [block["tool_use_id"] for _, block in blocks if block["type"] == "tool_result"]
        for (path, block), kind in zip(blocks, kinds, strict=True):
            if kind == "tool_result" and block["tool_use_id"] not in asked:
                raise AnthropicError(400, f"{path}: unexpected `tool_use_id` found in `tool_result` blocks: "
                                     f"{block['tool_use_id']}. Each `tool_result` block must have a corresponding "
                                     "`tool_use` block in the previous message.")
        if kinds[: len(answered)] != ["tool_result"] * len(answered):
            raise AnthropicError(400, f"messages.{first}: tool_result blocks must come first in the message's "
                                 "content, before any other block")
        missing = [x for x in asked if x not in answered]
        if missing:
            raise AnthropicError(400, _NOT_ANSWERED.format(where=f"messages.{turns[n - 1][1]}", ids=", ".join(missing)))
        asked = [block["id"] for _, block in blocks if block["type"] == "tool_use"]
    if asked:
        raise AnthropicError(400, _NOT_ANSWERED.format(where=f"messages.{turns[-1][1]}", ids=", ".join(asked)))


def _results_text(content: Any) -> str:
    """The text of the tool results in a user message's content."""
    if not isinstance(content, list):
        return ""
    results = [b.get("content", "") for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
    return " ".join(r if isinstance(r, str) else _text(r) for r in results)


# ---------------------------------------------------------------------------------------
# prompt caching (pure but for the instance's PromptCache)

CACHE_TTLS: Mapping[str, float] = {"5m": 300.0, "1h": 3600.0}
MAX_CACHE_BREAKPOINTS = 4


def min_cacheable_tokens(model: str) -> int:
    """The shortest prefix Anthropic caches: 4096 tokens for Haiku 4.5, 1024 for the others here."""
    return 4096 if "haiku" in model else 1024


def _cache_ttl(path: str, block: Any) -> float | None:
    """A block's cache_control TTL in s; None when it has none; AnthropicError when malformed."""
    if not isinstance(block, dict) or block.get("cache_control") is None:
        return None
    control = block["cache_control"]
    if not isinstance(control, dict) or control.get("type") != "ephemeral":
        raise AnthropicError(400, f"{path}.cache_control.type: Input should be 'ephemeral'")
    ttl = control.get("ttl", "5m")
    if ttl not in CACHE_TTLS:
        raise AnthropicError(400, f"{path}.cache_control.ttl: Input should be '5m' or '1h'")
    return CACHE_TTLS[ttl]


def _block_tokens(block: Any) -> int:
    """A block's share of the prompt tokens `messages` counts (text and tool results)."""
    if not isinstance(block, dict):
        return 0
    if block.get("type") == "text":
        return oa.count_tokens(block.get("text", "") if isinstance(block.get("text"), str) else "")
    return oa.count_tokens(_results_text([block])) if block.get("type") == "tool_result" else 0


def cache_breakpoints(system: Any, turns: list[dict[str, Any]]) -> list[tuple[int, float, bytes]]:
    """(prefix tokens, TTL s, prefix digest) at each block marked with cache_control, in prompt
    order (system, then messages); AnthropicError for a malformed mark or more than four."""
    digest = hashlib.sha256()
    marks: list[tuple[int, float, bytes]] = []
    total = 0
    sections = [("system", system)] + [(f"messages.{i}.content", m["content"]) for i, m in enumerate(turns)]
    for path, content in sections:
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for j, block in enumerate(blocks):
            total += _block_tokens(block)
            # the mark is not content: a prefix marked "1h" is the one marked "5m"
            unmarked = {k: v for k, v in block.items() if k != "cache_control"} if isinstance(block, dict) else block
            digest.update(orjson.dumps(unmarked, option=orjson.OPT_SORT_KEYS) + b"\x1e")
            ttl = _cache_ttl(f"{path}.{j}", block) if isinstance(content, list) else None
            if ttl is not None:
                marks.append((total, ttl, digest.copy().digest()))
    if len(marks) > MAX_CACHE_BREAKPOINTS:
        raise AnthropicError(400, f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be "
                             f"provided. Found {len(marks)}.")
    return marks


def cache_usage(cache: oa.PromptCache, model: str, marks: list[tuple[int, float, bytes]]) -> tuple[int, int]:
    """(cache read, cache write) input tokens: the longest cached breakpoint prefix is read; the
    rest up to the last cacheable breakpoint is written (and every cacheable one kept)."""
    seeded = [(n, ttl, hashlib.sha256(model.encode() + key).digest())
              for n, ttl, key in marks if n >= min_cacheable_tokens(model)]
    if not seeded:
        return 0, 0
    read = cache.hit([(n, key) for n, _, key in seeded])
    for n, ttl, key in seeded:
        cache.keep([(n, key)], ttl)
    return read, max(n for n, _, _ in seeded) - read


def call_names(tools: Tools, asked: str) -> tuple[str, ...]:
    """The tools the answer calls for a last user message whose text is `asked` (module docstring)."""
    if tools.choice == "none" or not tools.names:
        return ()
    if tools.choice == "tool":
        return (tools.name,)
    names = tuple(n for n in tools.names if n in asked) or (tools.names[:1] if tools.choice == "any" else ())
    return names[:1] if tools.single else names


def search_blocks(msg_id: str, asked: str, tools: Tools) -> list[dict[str, Any]]:
    """The server_tool_use and web_search_tool_result blocks of the searches the answer runs."""
    blocks: list[dict[str, Any]] = []
    query, _ = oa.truncate_tokens(asked, 8)
    for k in range(min(asked.lower().count("search"), tools.max_searches)):
        use_id = "srvtoolu_" + hashlib.sha256(f"{msg_id}:search:{k}".encode()).hexdigest()[:24]
        blocks.append({"type": "server_tool_use", "id": use_id, "name": "web_search", "input": {"query": query}})
        blocks.append({"type": "web_search_tool_result", "tool_use_id": use_id, "content": [
            {"type": "web_search_result", "url": f"https://example.com/{k}", "title": f"Result {k}",
             "encrypted_content": base64.b64encode(f"{query}:{k}".encode()).decode(), "page_age": None}]})
    return blocks


def reply_blocks(
    instance: str, msg_id: str, messages: list[dict[str, Any]], max_tokens: int, stops: list[str], tools: Tools
) -> tuple[list[dict[str, Any]], str, str | None]:
    """(content blocks, stop_reason, stop_sequence) of the answer."""
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    asked = _text(last)
    names = call_names(tools, asked)
    if not names:
        text, stop_reason, stop_sequence = answer(instance, asked or _results_text(last), max_tokens, stops)
        searched = search_blocks(msg_id, asked, tools) if tools.max_searches else []
        return [*searched, {"type": "text", "text": text}], stop_reason, stop_sequence
    echo, _ = oa.truncate_tokens(asked, 12)
    blocks: list[dict[str, Any]] = []
    if tools.choice == "auto":  # under "any" and "tool" Claude is prefilled to call at once
        blocks.append({"type": "text", "text": f"I will call {', '.join(names)}."})
    for k, name in enumerate(names):
        call_id = "toolu_" + hashlib.sha256(f"{msg_id}:{k}".encode()).hexdigest()[:24]
        blocks.append({"type": "tool_use", "id": call_id, "name": name, "input": {"query": echo, "call": k}})
    return blocks, "tool_use", None


def _spelled(block: Mapping[str, Any]) -> str:
    """What a block says, as streamed: its text, or its input as JSON the way Anthropic streams it
    (a search's results are input, not output: nothing)."""
    if block["type"] == "web_search_tool_result":
        return ""
    return str(block["text"]) if block["type"] == "text" else json.dumps(block["input"], ensure_ascii=False)


def answer(instance: str, last_user: str, max_tokens: int, stops: list[str]) -> tuple[str, str, str | None]:
    """(text, stop_reason, stop_sequence) of a text answer to `last_user`."""
    text = oa.reply_text(instance, last_user)
    for stop in stops:
        if stop and stop in text:
            return text[: text.index(stop)], "stop_sequence", stop
    cut, truncated = oa.truncate_tokens(text, max_tokens)
    return (cut, "max_tokens", None) if truncated else (text, "end_turn", None)


# ---------------------------------------------------------------------------------------
# handlers


#: A beta name as Anthropic spells them ("interleaved-thinking-2025-05-14").
_BETA_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")


def check_headers(request: web.Request) -> None:
    """`anthropic-version` required; each `anthropic-beta` name well formed (tallied in the
    instance's notes as "beta:<name>"), else 400 naming the values, as the real API answers."""
    if not request.headers.get("anthropic-version"):
        raise AnthropicError(400, "anthropic-version: header is required")
    names = [n.strip() for value in request.headers.getall("anthropic-beta", ()) for n in value.split(",")]
    bad = [n for n in names if not _BETA_NAME.fullmatch(n)]
    if bad:
        raise AnthropicError(400, f"Unexpected value(s) `{', '.join(bad)}` for the `anthropic-beta` header.")
    notes = request.app[common.INSTANCE].notes
    for name in names:
        notes[f"beta:{name}"] += 1


async def checked_body(request: web.Request) -> Any:
    """The request's JSON body after its headers are checked (`check_headers`); AnthropicError."""
    check_headers(request)
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise AnthropicError(400, "There was an error parsing the body of your request") from None


def prompt_tokens_of(system: str, turns: list[dict[str, Any]]) -> int:
    return oa.count_tokens(system) + sum(
        oa.count_tokens(_text(m["content"])) + oa.count_tokens(_results_text(m["content"])) for m in turns)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages/count_tokens: the request's input tokens as /v1/messages would count them
    (`{"input_tokens": N}`); no max_tokens, no answer."""
    instance = request.app[common.INSTANCE]
    try:
        body = await checked_body(request)
        if isinstance(body, dict):
            extra = [key for key in ("max_tokens", "stream", "stop_sequences") if key in body]
            if extra:
                raise AnthropicError(400, f"{extra[0]}: Extra inputs are not permitted")
            body = {**body, "max_tokens": 1}  # (parse_request's other checks are count_tokens' too)
        _, _, turns, system, _, _ = parse_request(body, instance.spec.model_ids)
        parse_tools(body)
        check_turns(turns)
    except AnthropicError as exc:
        return render(exc.status, exc.message, "invalid")
    return common.json_response({"input_tokens": prompt_tokens_of(system, turns)})


async def messages(request: web.Request) -> web.StreamResponse:
    instance = request.app[common.INSTANCE]
    try:
        body = await checked_body(request)
        model, max_tokens, turns, system, stops, stream = parse_request(body, instance.spec.model_ids)
        tools = parse_tools(body)
        check_turns(turns)
        prompt_tokens = prompt_tokens_of(system, turns)
        if prompt_tokens > instance.spec.context_window:
            raise AnthropicError(
                400, f"prompt is too long: {prompt_tokens} tokens > {instance.spec.context_window} maximum"
            )
        marks = cache_breakpoints(body.get("system", ""), turns)
    except AnthropicError as exc:
        return render(exc.status, exc.message, "invalid")
    msg_id = "msg_" + hashlib.sha256(instance.next_id().encode()).hexdigest()[:24]
    blocks, stop_reason, stop_sequence = reply_blocks(instance.spec.name, msg_id, turns, max_tokens, stops, tools)
    read, write = cache_usage(instance.prompt_cache, model, marks)
    searches = sum(b["type"] == "server_tool_use" for b in blocks)
    usage: dict[str, Any] = {  # Anthropic's input_tokens leaves out what was read from or written to the cache
        "input_tokens": prompt_tokens - read - write + searches * SEARCH_RESULT_TOKENS,
        "output_tokens": sum(oa.count_tokens(_spelled(b)) for b in blocks),
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
    }
    if searches:
        usage["server_tool_use"] = {"web_search_requests": searches}
        instance.notes["web_search_requests"] += searches
    head = {"id": msg_id, "type": "message", "role": "assistant", "model": model}
    if stream:
        return await _stream(request, head, blocks, stop_reason, stop_sequence, usage)
    return common.json_response(
        {**head, "content": blocks, "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage},
        headers={"request-id": f"req_{msg_id[4:]}"},
    )


def _event(name: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _block_events(block: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(content_block_start's block, the deltas) of one content block, as Anthropic streams it."""
    if block["type"] == "text":
        return {"type": "text", "text": ""}, [{"type": "text_delta", "text": p} for p in oa.token_pieces(block["text"])]
    if block["type"] == "web_search_tool_result":
        return dict(block), []  # whole in its start event
    arguments = _spelled(block)
    pieces = [""] + [arguments[at : at + 8] for at in range(0, len(arguments), 8)]
    return {**block, "input": {}}, [{"type": "input_json_delta", "partial_json": p} for p in pieces]


async def _stream(
    request: web.Request,
    head: dict[str, Any],
    blocks: list[dict[str, Any]],
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
    start_usage.pop("server_tool_use", None)  # (counted by message_delta, as the searches run)
    await response.write(
        _event(
            "message_start",
            {
                "type": "message_start",
                "message": {**head, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage},
            },
        )
    )
    sent = 0
    for index, block in enumerate(blocks):
        opening, deltas = _block_events(block)
        await response.write(
            _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": opening})
        )
        if not index:
            await response.write(_event("ping", {"type": "ping"}))
        for delta in deltas:
            if faults.stream_cut_after and sent >= faults.stream_cut_after:
                instance.by_outcome["stream_cut"] += 1
                await response.write(_event("error", error_body(529, "Overloaded")))
                await response.write_eof()
                return response
            if faults.token_delay_ms and sent:
                await asyncio.sleep(faults.token_delay_ms / 1000.0)
            sent += 1
            await response.write(
                _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            )
        await response.write(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    await response.write(
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": usage["output_tokens"],
                          **({"server_tool_use": usage["server_tool_use"]} if "server_tool_use" in usage else {})},
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
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
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
