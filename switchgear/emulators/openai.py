"""A protocol-faithful OpenAI API emulator with fault injection, for tests and demos.

Each *instance* is one aiohttp app on its own port serving `POST /v1/chat/completions`
(JSON or SSE), `GET /v1/models`, `GET /v1/models/{model}` and `POST /v1/embeddings` with
OpenAI's shapes, status codes, error bodies and rate-limit headers. Output is deterministic:
replies and embeddings are derived from hashes of the input, token counts from `count_tokens`.

Faults (see `Faults`) apply to every `/v1/...` request, in this order: latency (+ jitter) →
drop → hang → API-key check → fail_next → rate limit (token bucket, then rate) → error_rate.
They are set per instance at start (`InstanceSpec.faults`) or at run time:

    GET  /_emulator/faults   → the current faults (fail_next counts down as it fires)
    POST /_emulator/faults   → merge a JSON object into them ({"reset": true} first restores
                               the start-up faults); reseeds the random source, refills the bucket
    GET  /_emulator/stats    → {"total", "by_path", "by_outcome", "disconnects", "streamed"}; DELETE
                               zeroes it ("streamed": chat requests answered as streams)

`disconnects` counts /v1 requests whose client went away before the answer was complete
(a cancelled attempt, a hedge that lost: what the caller's side closing looks like upstream).
`refuse_s` (set at run time) stops listening for that many seconds: new connections are
refused and requests on open ones are dropped, then the instance listens again on its port.

Tool calls: a chat request with `tools` is answered with calls of the functions its last user
message names (or `tool_choice` names; "required": the first), arguments echoing the prompt,
streamed as OpenAI streams them (id, type and name first, then the arguments in pieces). A
conversation whose latest turn is tool results names no tool: under "auto" it is answered with
text, so an agent loop ends.

Usage details: a prompt of 1024 tokens or more whose prefix this instance saw within 5 minutes
reports `prompt_tokens_details.cached_tokens` (the longest seen prefix, in steps of 128 tokens,
as OpenAI's automatic prompt caching does); reasoning models (o1/o3/o4/gpt-5 names) report
`completion_tokens_details.reasoning_tokens` by `reasoning_effort` (REASONING_TOKENS, default
medium), counted inside `completion_tokens`; other models refuse `reasoning_effort` with 400.

CLI: `switchgear emulate openai --instance NAME:LATENCY_MS[:PORT] ... [--api-key K]
[--ready-file PATH]` (see `main`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import math
import os
import random
import re
import signal
import struct
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "text-embedding-3-large")
ERROR_STATUSES = (500, 502, 503, 504, 529)
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MODEL_CREATED = 1_700_000_000  # epoch s reported as every model's `created`
# Prompt caching as OpenAI documents it: prompts of 1024 tokens or more are cached; a hit is
# the longest cached prefix, in steps of 128 tokens; entries live 5 to 10 minutes unused.
CACHE_MIN_TOKENS, CACHE_STEP_TOKENS, CACHE_TTL_S = 1024, 128, 300.0
CACHE_MAX_PREFIXES = 4096  # the emulator's own bound on remembered prefixes (oldest go first)
# Reasoning tokens per `reasoning_effort` (deterministic; reasoning models default to medium).
REASONING_TOKENS: Mapping[str, int] = MappingProxyType(
    {"none": 0, "minimal": 16, "low": 64, "medium": 192, "high": 512, "xhigh": 1024})
REASONING_MODEL_PREFIXES = ("o1", "o3", "o4", "gpt-5")
_TOKEN = re.compile(r"\w+|[^\w\s]")


# ---------------------------------------------------------------------------------------
# deterministic text, tokens and vectors (pure)


def count_tokens(text: str) -> int:
    """Tokens in `text`: each run of word characters and each punctuation mark is one token."""
    return sum(1 for _ in _TOKEN.finditer(text))


def token_pieces(text: str) -> list[str]:
    """`text` cut before each token (leading whitespace kept), so "".join(pieces) == text."""
    pieces, start = [], 0
    for match in _TOKEN.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text) and pieces:
        pieces[-1] += text[start:]
    return pieces


def truncate_tokens(text: str, limit: int) -> tuple[str, bool]:
    """The first `limit` tokens of `text` and whether anything was cut."""
    pieces = token_pieces(text)
    return "".join(pieces[:limit]).rstrip(), len(pieces) > limit


def content_text(content: Any) -> str:
    """The text of a message content: a string, or the "text" of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def reply_text(instance: str, prompt: str, index: int = 0) -> str:
    """The deterministic reply of `instance` to a last user message `prompt`.

    Names the instance and the first 8 hex digits of sha256(prompt), then echoes up to 12
    tokens of the prompt, so tests can tell instances and prompts apart.
    """
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    echo, _ = truncate_tokens(prompt, 12)
    choice = f" (choice {index})" if index else ""
    return f"Hello from {instance}{choice}: digest {digest}. You said: {echo}".rstrip()


def embedding_vector(model: str, text: str, dims: int) -> list[float]:
    """A unit vector of `dims` floats from shake256(model, text).

    Shorter vectors are prefixes of longer ones, renormalised, as with text-embedding-3's
    `dimensions`.
    """
    raw = hashlib.shake_256(f"{model}\0{text}".encode()).digest(4 * dims)
    values = [u / 2**31 - 1.0 for u in struct.unpack(f"<{dims}I", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def go_duration(seconds: float) -> str:
    """`seconds` as OpenAI's x-ratelimit-reset-* value: "20ms", "1s", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    secs_text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{secs_text}" if minutes else secs_text


# ---------------------------------------------------------------------------------------
# OpenAI errors


class ApiError(Exception):
    """An OpenAI-style error answer: HTTP status and the fields of its `{"error": {...}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_SERVER_ERRORS: Mapping[int, tuple[str, str, int | None]] = MappingProxyType({
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    502: ("Bad gateway.", "cf_bad_gateway", 502),
    503: ("The server is overloaded or not ready yet.", "server_error", None),
    504: ("Gateway timeout.", "cf_gateway_timeout", 504),
    529: ("The engine is currently overloaded, please try again later.", "server_error", None),
})


def server_error(status: int) -> ApiError:
    """The body OpenAI (or its Cloudflare edge) sends with a 5xx `status`."""
    message, type_, code = _SERVER_ERRORS[status]
    return ApiError(status, message, type_=type_, code=code)


def rate_limit_error(model: str, limit: int, retry_after_s: float) -> ApiError:
    """OpenAI's 429 `rate_limit_exceeded`, with a Retry-After in whole seconds (≥ 1)."""
    message = (
        f"Rate limit reached for {model or 'requests'} in organization org-emulator on requests per min (RPM): "
        f"Limit {limit}, Used {limit}, Requested 1. Please try again in {go_duration(retry_after_s)}. "
        "Visit https://platform.openai.com/account/rate-limits to learn more."
    )
    headers = {"retry-after": str(max(1, math.ceil(retry_after_s)))}
    return ApiError(429, message, type_="requests", code="rate_limit_exceeded", headers=headers)


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string", list: "an array", dict: "an object"}
    return "null" if value is None else names.get(type(value), "an unknown type")


def invalid_type(param: str, expected: str, value: Any) -> ApiError:
    message = f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead."
    return ApiError(400, message, param=param, code="invalid_type")


def missing(param: str) -> ApiError:
    return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def model_not_found(model: str) -> ApiError:
    message = f"The model `{model}` does not exist or you do not have access to it."
    return ApiError(404, message, code="model_not_found")


# ---------------------------------------------------------------------------------------
# request validation (pure)


@dataclass(frozen=True)
class ChatCall:
    """A validated chat request: the texts that count as prompt and how to answer."""

    model: str
    prompt_texts: tuple[str, ...]
    last_user: str
    max_tokens: int | None
    n: int
    stream: bool
    include_usage: bool
    tools: tuple[str, ...] = ()  # the function names the answer calls (see `_tool_names`)
    reasoning_tokens: int = 0  # what the model "thought" before answering (reasoning models)


def is_reasoning_model(model: str) -> bool:
    return model.startswith(REASONING_MODEL_PREFIXES)


def _check_reasoning(body: Mapping[str, Any], model: str) -> int:
    """Reasoning tokens for this call; 400 for an effort a non-reasoning model cannot take."""
    effort = body.get("reasoning_effort")
    if effort is None:
        return REASONING_TOKENS["medium"] if is_reasoning_model(model) else 0
    if not is_reasoning_model(model):
        raise ApiError(400, "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
                       param="reasoning_effort", code="unsupported_parameter")
    if effort not in REASONING_TOKENS:
        allowed = ", ".join(f"'{e}'" for e in REASONING_TOKENS)
        raise ApiError(400, f"Invalid value: '{effort}'. Supported values are: {allowed}.",
                       param="reasoning_effort", code="invalid_value")
    return REASONING_TOKENS[str(effort)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_model(body: Mapping[str, Any], models: Sequence[str]) -> str:
    if "model" not in body:
        raise missing("model")
    model = body["model"]
    if not isinstance(model, str):
        raise invalid_type("model", "a string", model)
    if model not in models:
        raise model_not_found(model)
    return model


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise invalid_type("messages", "an array of objects", messages)
    if not messages:
        message = "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead."
        raise ApiError(400, message, param="messages", code="empty_array")
    for i, item in enumerate(messages):
        _check_message(f"messages[{i}]", item)
    return messages


def _check_message(param: str, item: Any) -> None:
    if not isinstance(item, dict):
        raise invalid_type(param, "an object", item)
    if "role" not in item:
        raise missing(f"{param}.role")
    if item["role"] not in ROLES:
        supported = ", ".join(f"'{r}'" for r in ROLES)
        raise ApiError(400, f"Invalid value: '{item['role']}'. Supported values are: {supported}.", param=f"{param}.role", code="invalid_value")
    content = item.get("content")
    if content is None and item["role"] != "assistant":
        raise missing(f"{param}.content")
    if content is not None and not isinstance(content, (str, list)):
        raise invalid_type(f"{param}.content", "one of a string or array of objects", content)


def _check_int(body: Mapping[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid_type(key, "an integer", value)
    if value < minimum:
        message = f"Invalid '{key}': integer below minimum value. Expected a value >= {minimum}, but got {value} instead."
        raise ApiError(400, message, param=key, code="integer_below_min_value")
    return int(value)


def _check_stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise invalid_type("stream", "a boolean", stream)
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options")
    if not isinstance(options, dict):
        raise invalid_type("stream_options", "an object", options)
    return True, options.get("include_usage") is True


def parse_chat(body: Any, models: Sequence[str]) -> ChatCall:
    """Validate a chat.completions body as OpenAI does; raise ApiError (400/404) naming `param`."""
    if not isinstance(body, dict):
        raise invalid_type("body", "an object", body)
    model = _check_model(body, models)
    if "messages" not in body:
        raise missing("messages")
    messages = _check_messages(body["messages"])
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)):
        raise invalid_type("temperature", "a decimal", temperature)
    max_tokens = _check_int(body, "max_completion_tokens", 1) or _check_int(body, "max_tokens", 1)
    stream, include_usage = _check_stream(body)
    texts = tuple(content_text(m.get("content")) for m in messages)
    users = [t for m, t in zip(messages, texts, strict=True) if m["role"] == "user"]
    n = _check_int(body, "n", 1) or 1
    last_user = users[-1] if users else ""
    asked = "" if messages[-1]["role"] == "tool" else last_user  # tool results ask for no tool by name
    return ChatCall(model, texts, last_user, max_tokens, n, stream, include_usage, _tool_names(body, asked),
                    _check_reasoning(body, model))


def _tool_names(body: Mapping[str, Any], last_user: str) -> tuple[str, ...]:
    """The functions the answer calls, deterministically: with `tool_choice` naming one, that
    one; else (unless "none") every tool whose name the last user message mentions, in the
    order given, and with "required" and none mentioned, the first. Validates `tools`."""
    tools = body.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise invalid_type("tools", "an array of objects", tools)
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function" or not isinstance(function.get("name"), str):
            raise invalid_type(f"tools[{i}]", "a function tool object with a name", tool)
        names.append(function["name"])
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        named = (choice.get("function") or {}).get("name")
        return (named,) if isinstance(named, str) and named in names else ()
    if choice == "none" or not names:
        return ()
    mentioned = tuple(n for n in names if n in last_user)
    return mentioned or ((names[0],) if choice == "required" else ())


def parse_embeddings(body: Any, models: Sequence[str]) -> tuple[str, list[str], int | None, str]:
    """Validate an embeddings body: (model, input texts, dimensions or None, encoding_format)."""
    if not isinstance(body, dict):
        raise invalid_type("body", "an object", body)
    model = _check_model(body, models)
    if "input" not in body:
        raise missing("input")
    texts = _embedding_inputs(body["input"])
    dims = _check_int(body, "dimensions", 1)
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        message = f"Invalid value: '{encoding}'. Supported values are: 'float' and 'base64'."
        raise ApiError(400, message, param="encoding_format", code="invalid_value")
    return model, texts, dims, str(encoding)


def _embedding_inputs(value: Any) -> list[str]:
    """Inputs as texts: a string, strings, token ids, or lists of token ids (joined by spaces)."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_int(v) for v in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.", param="input")
    texts = []
    for item in value:
        if isinstance(item, list) and item and all(_is_int(v) for v in item):
            texts.append(" ".join(map(str, item)))
        elif isinstance(item, str) and item:
            texts.append(item)
        else:
            raise ApiError(400, "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.", param="input")
    return texts


# ---------------------------------------------------------------------------------------
# faults and per-instance state


@dataclass(frozen=True)
class Faults:
    """Fault injection for one instance. Times in ms, rates in [0, 1], rps in requests/s.

    - latency_ms + uniform(0, jitter_ms): delay before every answer (TTFB for streams).
    - drop: close the TCP connection without an HTTP response. hang: never answer.
    - fail_next: the next N requests answer `error_status` (counts down; deterministic).
    - rate_limit_rps > 0: a token bucket of `rate_limit_burst` (0 → max(1, rps)) refilled at
      rps; an empty bucket answers 429 with Retry-After = time to the next token.
    - rate_limit_rate, error_rate: chance of a 429 (Retry-After = retry_after_s) or of an
      `error_status` answer, drawn from random.Random(seed).
    - stream_cut_after > 0: a streamed answer breaks after that many content chunks (the
      OpenAI emulator drops the connection; the Anthropic one sends an `error` event).
    - token_delay_ms: pause between streamed chunks.
    - refuse_s > 0 (one-shot, set at run time on an instance started by `start_instances`): the
      instance refuses connections for that many seconds, then serves again (reads back 0).
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    drop: bool = False
    hang: bool = False
    fail_next: int = 0
    error_status: int = 503
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    rate_limit_rps: float = 0.0
    rate_limit_burst: float = 0.0
    retry_after_s: float = 1.0
    seed: int = 0
    stream_cut_after: int = 0
    token_delay_ms: float = 0.0
    refuse_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def merged(self, changes: Mapping[str, Any]) -> Faults:
        """A copy with `changes` applied; raise ValueError("key: why") on a bad key or value."""
        known = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"{key}: unknown fault; known: {', '.join(known)}")
            values[key] = _fault_value(key, known[key].default, value)
        result = dataclasses.replace(self, **values)
        result.check()
        return result

    def check(self) -> None:
        """Raise ValueError naming the first field out of range."""
        for name in ("latency_ms", "jitter_ms", "fail_next", "rate_limit_rps", "rate_limit_burst", "retry_after_s",
                     "stream_cut_after", "token_delay_ms", "refuse_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        for name in ("error_rate", "rate_limit_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be within [0, 1]")
        if self.error_status not in ERROR_STATUSES:
            raise ValueError(f"error_status: must be one of {ERROR_STATUSES}")


def _fault_value(key: str, default: Any, value: Any) -> Any:
    """`value` converted to the type of the field's default, or ValueError naming `key`."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = _is_int(value)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise ValueError(f"{key}: expected {type(default).__name__}, got {_type_name(value)}")
    return float(value) if isinstance(default, float) else value


@dataclass(frozen=True)
class InstanceSpec:
    """One emulated endpoint. `latency_ms`, when non-zero, overrides `faults.latency_ms`.

    `context_window` (tokens) bounds prompt_tokens + max_tokens like a model's context.
    """

    name: str
    port: int = 0
    latency_ms: float = 0.0
    api_key: str | None = None
    model_ids: tuple[str, ...] = DEFAULT_MODELS
    faults: Faults = field(default_factory=Faults)
    context_window: int = 128_000

    def initial_faults(self) -> Faults:
        faults = dataclasses.replace(self.faults, latency_ms=self.latency_ms) if self.latency_ms else self.faults
        faults.check()
        return faults


class _Instance:
    """Mutable state of one running instance: faults, random source, bucket, counters.

    Only touched from the event loop thread. `clock` is monotonic seconds.
    """

    def __init__(self, spec: InstanceSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.clock = clock
        self.closing = asyncio.Event()
        self.by_path: Counter[str] = Counter()
        self.by_outcome: Counter[str] = Counter()
        self.serial = 0
        self.disconnects = 0
        self.streamed = 0  # chat requests answered as a stream (`stream: true`)
        self.notes: Counter[str] = Counter()  # what a protocol's handlers tally (Anthropic: "beta:<name>")
        self.prompt_cache = PromptCache(clock)
        self.refusing = False
        self.site: web.TCPSite | None = None  # set by start_instances: what refuse_s stops
        self._refusal: asyncio.Task[None] | None = None
        self.set_faults(spec.initial_faults())

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults; reseed the random source and refill the bucket. A `refuse_s`
        starts a refusal (and reads back 0)."""
        if faults.refuse_s:
            if self.site is None:
                raise ValueError("refuse_s: this instance was not started by start_instances")
            if self._refusal is None or self._refusal.done():
                self._refusal = asyncio.ensure_future(self._refuse(faults.refuse_s))
            faults = dataclasses.replace(faults, refuse_s=0.0)
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.tokens = self.capacity()
        self.refilled_at = self.clock()

    async def _refuse(self, seconds: float) -> None:
        """Stop listening for `seconds` (connections refused), then listen on the same port again."""
        site = self.site
        assert site is not None
        host, port = site._host, site._port  # aiohttp keeps them only there
        runner = site._runner
        await site.stop()
        self.refusing = True
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), seconds)
        finally:
            self.refusing = False
        if not self.closing.is_set():
            self.site = web.TCPSite(runner, host, port)
            await self.site.start()

    def capacity(self) -> float:
        return self.faults.rate_limit_burst or max(1.0, self.faults.rate_limit_rps)

    def stats(self) -> dict[str, Any]:
        return {"total": sum(self.by_path.values()), "by_path": dict(self.by_path), "by_outcome": dict(self.by_outcome),
                "disconnects": self.disconnects, "streamed": self.streamed, "notes": dict(self.notes)}

    def next_id(self) -> str:
        """A deterministic 32-hex id, unique per request of this instance."""
        self.serial += 1
        return hashlib.sha256(f"{self.spec.name}:{self.serial}".encode()).hexdigest()[:32]

    def delay_s(self) -> float:
        faults = self.faults
        jitter = self.rng.uniform(0.0, faults.jitter_ms) if faults.jitter_ms else 0.0
        return (faults.latency_ms + jitter) / 1000.0

    def injected_error(self, model: str) -> ApiError | None:
        """The error this request must answer, by fail_next → bucket → rate → error_rate."""
        faults = self.faults
        if faults.fail_next > 0:
            self.faults = dataclasses.replace(faults, fail_next=faults.fail_next - 1)
            return server_error(faults.error_status)
        wait_s = self._take_token()
        if wait_s is not None:
            return rate_limit_error(model, math.ceil(self.capacity()), wait_s)
        if faults.rate_limit_rate and self.rng.random() < faults.rate_limit_rate:
            return rate_limit_error(model, 60, faults.retry_after_s)
        if faults.error_rate and self.rng.random() < faults.error_rate:
            return server_error(faults.error_status)
        return None

    def _take_token(self) -> float | None:
        """Take one bucket token; None when taken (or no bucket), else seconds to the next one."""
        rps = self.faults.rate_limit_rps
        if not rps:
            return None
        now = self.clock()
        self.tokens = min(self.capacity(), self.tokens + (now - self.refilled_at) * rps)
        self.refilled_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / rps

    def ratelimit_headers(self) -> dict[str, str]:
        """x-ratelimit-* headers: the bucket's state, or a roomy nominal limit without one."""
        if not self.faults.rate_limit_rps:
            limit, remaining, reset_s = 10_000, 9_999, 0.006
        else:
            limit, remaining = math.ceil(self.capacity()), math.floor(self.tokens)
            reset_s = (self.capacity() - self.tokens) / self.faults.rate_limit_rps
        return {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": go_duration(reset_s),
            "x-ratelimit-limit-tokens": "10000000",
            "x-ratelimit-remaining-tokens": "9999000",
            "x-ratelimit-reset-tokens": "6ms",
        }


# ---------------------------------------------------------------------------------------
# HTTP edge

_INSTANCE = web.AppKey("instance", _Instance)
_STARTED = web.RequestKey("started", float)  # instance.clock() at arrival, s
_REQUEST_ID = web.RequestKey("request_id", str)
_SERVER_CLOSED = web.RequestKey("server_closed", bool)  # the emulator itself cut the connection


def _error_response(error: ApiError) -> web.Response:
    return web.Response(
        status=error.status, body=orjson.dumps(error.body()), content_type="application/json", headers=error.headers
    )


def _json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def _openai_headers(request: web.Request) -> dict[str, str]:
    """The headers OpenAI puts on every API answer (ids, processing time, rate limits)."""
    instance = request.app[_INSTANCE]
    elapsed_ms = (instance.clock() - request[_STARTED]) * 1000.0
    return {
        "x-request-id": f"req_{request[_REQUEST_ID]}",
        "openai-processing-ms": str(round(elapsed_ms)),
        "openai-version": "2020-10-01",
        "openai-organization": "org-emulator",
        **instance.ratelimit_headers(),
    }


def _auth_error(instance: _Instance, header: str | None) -> ApiError | None:
    """401 unless the instance has no key or `Authorization: Bearer <key>` matches it."""
    expected = instance.spec.api_key
    if expected is None:
        return None
    if not header or not header.startswith("Bearer "):
        message = "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        return ApiError(401, message)
    given = header[len("Bearer ") :]
    if given == expected:
        return None
    masked = f"{given[:3]}***{given[-4:]}" if len(given) > 8 else "***"
    message = f"Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys."
    return ApiError(401, message, code="invalid_api_key")


async def _abandon(request: web.Request) -> web.StreamResponse:
    """Close the connection without answering; the handler is then cancelled."""
    request[_SERVER_CLOSED] = True
    if request.transport is not None:
        request.transport.close()
    await asyncio.Event().wait()  # connection_lost cancels us (handler_cancellation=True)
    raise AssertionError("unreachable")


async def _faulty(request: web.Request, instance: _Instance, model: str) -> web.StreamResponse | None:
    """Apply the faults in order; a response (or no response at all) that replaces the answer."""
    delay = instance.delay_s()
    if delay:
        await asyncio.sleep(delay)
    faults = instance.faults
    if faults.drop:
        instance.by_outcome["drop"] += 1
        return await _abandon(request)
    if faults.hang:
        instance.by_outcome["hang"] += 1
        await instance.closing.wait()
        return await _abandon(request)
    error = _auth_error(instance, request.headers.get("Authorization")) or instance.injected_error(model)
    return None if error is None else _error_response(error)


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    names = {401: "unauthorized", 429: "rate_limited"}
    return names.get(status, "error" if status >= 500 else "invalid_request")


@web.middleware
async def _api_middleware(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Count, inject faults and add OpenAI's headers around every /v1 request."""
    if not request.path.startswith("/v1/"):
        return await handler(request)  # type: ignore[no-any-return]
    instance = request.app[_INSTANCE]
    request[_STARTED] = instance.clock()
    request[_REQUEST_ID] = instance.next_id()
    resource = request.match_info.route.resource
    instance.by_path[resource.canonical if resource is not None else "unmatched"] += 1
    try:
        if instance.refusing:  # "down": requests on connections opened before are dropped too
            return await _abandon(request)
        model = await _peek_model(request)
        response = await _faulty(request, instance, model)
        if response is None:
            response = await _call(handler, request)
    except asyncio.CancelledError:
        if not request.get(_SERVER_CLOSED):
            instance.disconnects += 1  # the client went away before the answer was complete
        raise
    instance.by_outcome[_outcome(response.status)] += 1
    if not response.prepared:  # streams set these themselves before their first byte
        response.headers.update(_openai_headers(request))
    return response


async def _call(handler: Callable[[web.Request], Any], request: web.Request) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except ApiError as error:
        return _error_response(error)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return _error_response(ApiError(404, f"Invalid URL ({request.method} {request.path})"))


async def _peek_model(request: web.Request) -> str:
    """The body's model for error messages ("" when there is none); also buffers the body."""
    try:
        body = orjson.loads(await request.read()) if request.can_read_body else None
    except orjson.JSONDecodeError:
        return ""
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else ""


async def _json_body(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        message = "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
        raise ApiError(400, message) from None


def _usage(prompt_tokens: int, completion_tokens: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `completion_tokens` includes `reasoning`, `prompt_tokens` `cached`."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens + reasoning,
        "total_tokens": prompt_tokens + completion_tokens + reasoning,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0},
    }


class PromptCache:
    """Which prompt prefixes an instance has cached (digests, each with its expiry time).

    `openai` answers OpenAI's automatic caching: the cached tokens of a prompt are its longest
    remembered prefix of CACHE_MIN_TOKENS + k × CACHE_STEP_TOKENS tokens (0 below that), and
    all its prefixes are remembered. The Anthropic emulator uses `hit` and `keep` with its own
    breakpoints. At most CACHE_MAX_PREFIXES are kept (the oldest go). Deterministic for a clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.expires: OrderedDict[bytes, float] = OrderedDict()

    def hit(self, prefixes: Sequence[tuple[int, bytes]]) -> int:
        """The longest (length, digest) prefix cached and not expired; 0 for none."""
        now = self.clock()
        return max((n for n, key in prefixes if self.expires.get(key, -math.inf) >= now), default=0)

    def keep(self, prefixes: Sequence[tuple[int, bytes]], ttl_s: float) -> None:
        """Remember (or refresh) these prefixes for `ttl_s`."""
        until = self.clock() + ttl_s
        for _, key in prefixes:
            self.expires[key] = max(until, self.expires.get(key, until))
            self.expires.move_to_end(key)
        while len(self.expires) > CACHE_MAX_PREFIXES:
            self.expires.popitem(last=False)

    def openai(self, model: str, texts: Sequence[str]) -> int:
        tokens = [m.group() for t in texts for m in _TOKEN.finditer(t)]
        digest = hashlib.sha256(model.encode())
        prefixes: list[tuple[int, bytes]] = []
        for length in range(CACHE_STEP_TOKENS, len(tokens) + 1, CACHE_STEP_TOKENS):
            digest.update("\x1f".join(tokens[length - CACHE_STEP_TOKENS:length]).encode() + b"\x1e")
            if length >= CACHE_MIN_TOKENS:
                prefixes.append((length, digest.copy().digest()))
        cached = self.hit(prefixes)
        self.keep(prefixes, CACHE_TTL_S)
        return cached


def _tool_calls(request_id: str, call: ChatCall) -> list[dict[str, Any]]:
    """The answer's tool calls (OpenAI's shape): arguments echo the last user message."""
    echo, _ = truncate_tokens(call.last_user, 12)
    return [
        {"id": f"call_{hashlib.sha256(f'{request_id}:{i}'.encode()).hexdigest()[:24]}", "type": "function",
         "function": {"name": name, "arguments": orjson.dumps({"query": echo, "call": i}).decode()}}
        for i, name in enumerate(call.tools)
    ]


def _answers(instance: _Instance, call: ChatCall) -> list[tuple[str, str]]:
    """(content, finish_reason) per choice; "length" when max_tokens cut the reply; ("",
    "tool_calls") when the answer calls tools (`ChatCall.tools`)."""
    if call.tools:
        return [("", "tool_calls")] * call.n
    answers = []
    for index in range(call.n):
        text = reply_text(instance.spec.name, call.last_user, index)
        if call.max_tokens is not None:
            text, cut = truncate_tokens(text, call.max_tokens)
            answers.append((text, "length" if cut else "stop"))
        else:
            answers.append((text, "stop"))
    return answers


async def _chat(request: web.Request) -> web.StreamResponse:
    instance = request.app[_INSTANCE]
    call = parse_chat(await _json_body(request), instance.spec.model_ids)
    prompt_tokens = sum(count_tokens(t) for t in call.prompt_texts)
    if prompt_tokens + (call.max_tokens or 0) > instance.spec.context_window:
        message = (
            f"This model's maximum context length is {instance.spec.context_window} tokens. However, you requested "
            f"{prompt_tokens + (call.max_tokens or 0)} tokens ({prompt_tokens} in the messages, {call.max_tokens or 0} in the completion). "
            "Please reduce the length of the messages or completion."
        )
        raise ApiError(400, message, param="messages", code="context_length_exceeded")
    answers = _answers(instance, call)
    tool_calls = _tool_calls(request[_REQUEST_ID], call)
    completion_tokens = sum(count_tokens(text) for text, _ in answers) + call.n * sum(
        count_tokens(t["function"]["arguments"]) for t in tool_calls)
    cached = instance.prompt_cache.openai(call.model, call.prompt_texts)
    usage = _usage(prompt_tokens, completion_tokens, cached, call.reasoning_tokens * call.n)
    head = {"id": f"chatcmpl-{request[_REQUEST_ID][:24]}", "created": int(time.time()), "model": call.model}
    if call.stream:
        instance.streamed += 1
        deltas = chunk_deltas(answers, tool_calls)
        return await _stream_chat(request, head, call, deltas, usage)
    choices: list[dict[str, Any]] = [
        {
            "index": i,
            "message": {"role": "assistant", "content": None if tool_calls else text, "refusal": None,
                        "annotations": [], **({"tool_calls": tool_calls} if tool_calls else {})},
            "logprobs": None,
            "finish_reason": finish,
        }
        for i, (text, finish) in enumerate(answers)
    ]
    return _json_response(
        {
            **head,
            "object": "chat.completion",
            "choices": choices,
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": "fp_emulator",
        }
    )


def chunk_deltas(answers: Sequence[tuple[str, str]],
                 tool_calls: Sequence[dict[str, Any]] = ()) -> list[tuple[int, dict[str, Any], str | None]]:
    """(choice index, delta, finish_reason) per chunk: role first, one per token, then finish.
    Tool calls as OpenAI streams them: each call's id, type and name with empty arguments
    (the first in the role chunk), then its arguments in pieces of up to 8 characters."""
    deltas: list[tuple[int, dict[str, Any], str | None]] = []
    for i, (text, finish) in enumerate(answers):
        if not tool_calls:
            deltas.append((i, {"role": "assistant", "content": "", "refusal": None}, None))
            deltas.extend((i, {"content": piece}, None) for piece in token_pieces(text))
        for k, tool in enumerate(tool_calls):
            opening = {"index": k, "id": tool["id"], "type": "function",
                       "function": {"name": tool["function"]["name"], "arguments": ""}}
            role = {"role": "assistant", "content": None, "refusal": None} if k == 0 else {}
            deltas.append((i, {**role, "tool_calls": [opening]}, None))
            arguments = tool["function"]["arguments"]
            deltas.extend((i, {"tool_calls": [{"index": k, "function": {"arguments": arguments[at:at + 8]}}]}, None)
                          for at in range(0, len(arguments), 8))
        deltas.append((i, {}, finish))
    return deltas


def _is_content(delta: Mapping[str, Any]) -> bool:
    return bool(delta.get("content") or delta.get("tool_calls"))


async def _stream_chat(
    request: web.Request, head: dict[str, Any], call: ChatCall,
    deltas: list[tuple[int, dict[str, Any], str | None]], usage: dict[str, Any]
) -> web.StreamResponse:
    """Send the answers as OpenAI's SSE: one `data: {chunk}\\n\\n` per delta, then [DONE]."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
    response.headers.update(_openai_headers(request))
    await response.prepare(request)
    base = {**head, "object": "chat.completion.chunk", "service_tier": "default", "system_fingerprint": "fp_emulator"}
    extra = {"usage": None} if call.include_usage else {}
    faults = request.app[_INSTANCE].faults
    sent = 0
    for index, delta, finish in deltas:
        if faults.stream_cut_after and sent >= faults.stream_cut_after:
            request.app[_INSTANCE].by_outcome["stream_cut"] += 1
            return await _abandon(request)
        if faults.token_delay_ms and sent:
            await asyncio.sleep(faults.token_delay_ms / 1000.0)
        sent += 1 if _is_content(delta) else 0
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        await response.write(b"data: " + orjson.dumps({**base, "choices": [choice], **extra}) + b"\n\n")
    if call.include_usage:
        await response.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _default_dimensions(model: str) -> int:
    return 3072 if "large" in model else 1536


async def _embeddings(request: web.Request) -> web.StreamResponse:
    instance = request.app[_INSTANCE]
    model, texts, dims, encoding = parse_embeddings(await _json_body(request), instance.spec.model_ids)
    size = dims or _default_dimensions(model)
    data = []
    for i, text in enumerate(texts):
        vector = embedding_vector(model, text, size)
        encoded: Any = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode() if encoding == "base64" else vector
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = sum(count_tokens(t) for t in texts)
    return _json_response({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": MODEL_CREATED, "owned_by": "system"}


async def _models(request: web.Request) -> web.StreamResponse:
    models = request.app[_INSTANCE].spec.model_ids
    return _json_response({"object": "list", "data": [_model_object(m) for m in models]})


async def _model(request: web.Request) -> web.StreamResponse:
    model = request.match_info["model"]
    if model not in request.app[_INSTANCE].spec.model_ids:
        raise model_not_found(model)
    return _json_response(_model_object(model))


async def _get_faults(request: web.Request) -> web.StreamResponse:
    return _json_response(request.app[_INSTANCE].faults.to_json())


async def _post_faults(request: web.Request) -> web.StreamResponse:
    """Merge a JSON object into the faults; 400 naming the key when it is refused."""
    instance = request.app[_INSTANCE]
    try:
        changes = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        changes = None
    try:
        if not isinstance(changes, dict):
            raise ValueError("body: expected a JSON object")
        reset = changes.pop("reset", False)
        base = instance.spec.initial_faults() if reset is True else instance.faults
        instance.set_faults(base.merged(changes))
    except ValueError as exc:
        param, _, _ = str(exc).partition(":")
        return _json_response({"error": {"message": str(exc), "type": "invalid_request_error", "param": param}}, status=400)
    return _json_response(instance.faults.to_json())


async def _get_stats(request: web.Request) -> web.StreamResponse:
    return _json_response(request.app[_INSTANCE].stats())


async def _delete_stats(request: web.Request) -> web.StreamResponse:
    instance = request.app[_INSTANCE]
    instance.by_path.clear()
    instance.by_outcome.clear()
    instance.disconnects = 0
    instance.streamed = 0
    instance.notes.clear()
    return _json_response(instance.stats())


def build_app(spec: InstanceSpec) -> web.Application:
    """The aiohttp app of one instance (its state lives in the app, nowhere else)."""
    app = web.Application(middlewares=[_api_middleware])
    app[_INSTANCE] = _Instance(spec)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model}", _model)
    app.router.add_get("/_emulator/faults", _get_faults)
    app.router.add_post("/_emulator/faults", _post_faults)
    app.router.add_get("/_emulator/stats", _get_stats)
    app.router.add_delete("/_emulator/stats", _delete_stats)
    return app


# ---------------------------------------------------------------------------------------
# runner


@dataclass
class EmulatorGroup:
    """Running instances. `ports` maps name → bound port; `urls` name → base URL ending in /v1."""

    host: str
    ports: dict[str, int]
    _runners: dict[str, web.AppRunner]

    @property
    def urls(self) -> dict[str, str]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return {name: f"http://{host}:{port}/v1" for name, port in self.ports.items()}

    def faults(self, name: str) -> Faults:
        return self._instance(name).faults

    def set_faults(self, name: str, faults: Faults) -> None:
        """Replace an instance's faults in-process (same effect as POST /_emulator/faults)."""
        faults.check()
        self._instance(name).set_faults(faults)

    def stats(self, name: str) -> dict[str, Any]:
        return self._instance(name).stats()

    def _instance(self, name: str) -> _Instance:
        return self._runners[name].app[_INSTANCE]

    async def close(self) -> None:
        """Stop every instance; hanging requests are cut off without an answer."""
        for runner in self._runners.values():
            runner.app[_INSTANCE].closing.set()
        await asyncio.gather(*(runner.cleanup() for runner in self._runners.values()))

    async def __aenter__(self) -> EmulatorGroup:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_instances(specs: Sequence[InstanceSpec], host: str = "127.0.0.1") -> EmulatorGroup:
    """Start one app per spec and return once every one is listening (port 0 → ephemeral)."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"instance names must be non-empty and unique: {names}")
    group = EmulatorGroup(host, {}, {})
    try:
        for spec in specs:
            runner = web.AppRunner(build_app(spec), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            group._runners[spec.name] = runner
            site = web.TCPSite(runner, host, spec.port)
            await site.start()
            group.ports[spec.name] = int(runner.addresses[0][1])
            site._port = group.ports[spec.name]  # refuse_s listens again on this port
            runner.app[_INSTANCE].site = site
    except BaseException:
        await group.close()
        raise
    return group


# ---------------------------------------------------------------------------------------
# CLI


def parse_instance(text: str) -> InstanceSpec:
    """"NAME:LATENCY_MS[:PORT]" → InstanceSpec; ValueError on a malformed value."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise ValueError(f"{text!r}: expected NAME:LATENCY_MS[:PORT]")
    latency = float(parts[1])
    port = int(parts[2]) if len(parts) == 3 else 0
    if latency < 0 or not 0 <= port < 65536:
        raise ValueError(f"{text!r}: latency must be >= 0 and port within 0..65535")
    return InstanceSpec(name=parts[0], port=port, latency_ms=latency)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchgear emulate openai", description="Run OpenAI API emulator instances.")
    parser.add_argument("--instance", action="append", required=True, metavar="NAME:LATENCY_MS[:PORT]")
    parser.add_argument("--api-key", default=None, help="require this Bearer key on /v1 requests")
    parser.add_argument("--model", action="append", default=None, help="model id to serve (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ready-file", default=None, help="also write the ready JSON line here")
    return parser


def _write_ready(path: str, line: bytes) -> None:
    """Write atomically, so a watcher never reads half a line."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(line)
    os.replace(tmp, path)


async def _serve(specs: list[InstanceSpec], host: str, ready_file: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    group = await start_instances(specs, host)
    try:
        line = orjson.dumps(group.ports) + b"\n"
        if ready_file:  # first, so whoever reads stdout finds the file too
            _write_ready(ready_file, line)
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        await stop.wait()
    finally:
        await group.close()


def run_loop(main: Any) -> None:
    """asyncio.run on uvloop when installed (a faster upstream for benchmarks), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    """Run emulator instances until SIGTERM/SIGINT; print {"name": port, ...} once listening."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        specs = [parse_instance(text) for text in args.instance]
    except ValueError as exc:
        parser.error(str(exc))
    extra: dict[str, Any] = {"api_key": args.api_key}
    if args.model:
        extra["model_ids"] = tuple(args.model)
    specs = [dataclasses.replace(spec, **extra) for spec in specs]
    try:
        run_loop(_serve(specs, args.host, args.ready_file))
    except (OSError, ValueError) as exc:
        print(f"switchgear emulate openai: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
