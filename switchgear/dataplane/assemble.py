"""Whole answers read as streams: a category policy's `stream_upstream` (README, "Whole answers
streamed from the upstream").

A whole-answer chat call (Invoke, the HTTP door without `stream`) normally waits for the whole
completion, 1..3 s for a typical one, so silence says nothing about a provider before then. With
`stream_upstream` on for the call's category (llm only), the agent asks the upstream for a stream
instead, tells the observers of the attempt's first token (`events.FirstToken`, as a stream does:
routing statistics then know the attempt is alive), and assembles the chunks into exactly the
`chat.completion` the upstream would have answered with `stream: false`: id, created, model and
the other top-level fields the chunks carry (system_fingerprint, service_tier), choices by index
(role, content, refusal, tool calls merged by index, logprobs, finish_reason) and usage from the
final chunk. The caller cannot tell, except by latency.

Which calls (`streamable`): method "chat.completions" on a target whose protocol is "openai"
(its `stream_options.include_usage` asks for the usage chunk) or "anthropic" (tool calls too: the
adapter streams a tool_use block's input as Anthropic's partial JSON, which may be spaced
differently from the whole answer's re-serialised input, so the assembly re-serialises the
joined arguments the same way and the two answers are equal byte for byte); never a payload
that itself says `stream: true` or `stream_options` (those are the caller's mistakes and are
refused as before). Everything else (embeddings, native "messages",
other protocols) goes the old way.

Bounds and errors are the stream path's: the first token within the stream attempt timeout
(the endpoint's recent times to first token, `AttemptController.first_token_s`), then at most
the stall timeout between two chunks (`gap_timeout`), the whole within the unary attempt
timeout; a chunk that is not a chat chunk, a stream that ends before its end (`[DONE]`,
`message_stop`) or without a finish reason is RETRYABLE (the upstream's fault); the stream
on the wire and the assembled answer are bounded by the service's `max_decoded_bytes`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson

from switchgear.adapters.base import AdapterResponse, ErrorKind, StreamChunk, TokenUsage, UpstreamError, openai_usage
from switchgear.dataplane.events import FirstToken

#: A time limit on one wait, as `asyncio.timeout(seconds)`: raises TimeoutError when it runs out.
Within = Callable[[float], AbstractAsyncContextManager[Any]]
#: Top-level chunk fields that are not the answer's: the chunk's own type, the choices
#: (assembled), and OpenAI's per-chunk padding.
_NOT_COPIED = frozenset({"object", "choices", "usage", "obfuscation"})
#: Delta fields that arrive in pieces (concatenated); others are taken as the last one said.
_TEXT_FIELDS = frozenset({"content", "refusal", "reasoning_content", "reasoning"})


def streamable(protocol: str, method: str, payload: Mapping[str, Any]) -> bool:
    """Whether a whole-answer call on a target of `protocol` can be streamed and assembled
    faithfully (module docstring)."""
    if method != "chat.completions" or payload.get("stream") is True or "stream_options" in payload:
        return False
    return protocol in ("openai", "anthropic")


def tell_first_token(observers: Iterable[Any], event: FirstToken) -> None:
    """To the observers that follow first tokens (routing statistics: events.FirstToken)."""
    for observer in observers:
        first_token = getattr(observer, "first_token", None)
        if first_token is not None:
            first_token(event)


def _malformed(why: str) -> UpstreamError:
    return UpstreamError(ErrorKind.RETRYABLE, f"malformed stream chunk: {why}")


def _extend(into: dict[str, Any], key: str, items: list[Any]) -> None:
    """`items` after `key`'s items so far, in place: a stream of n pieces costs O(n), not O(n^2)
    (a hostile upstream may send its whole `max_decoded_bytes` one character a chunk)."""
    found = into.get(key)
    if isinstance(found, list):
        found.extend(items)
    else:
        into[key] = list(items)


def _compact(arguments: str, *, cut: bool) -> str:
    """Tool call arguments re-serialised (orjson: no spaces); RETRYABLE when they are not JSON,
    unless the answer was `cut` at max_tokens (then as they came)."""
    try:
        return orjson.dumps(orjson.loads(arguments)).decode()
    except orjson.JSONDecodeError:
        if cut:
            return arguments
        raise _malformed("tool call arguments are not JSON") from None


class _Choice:
    """One choice's pieces; text arrives in pieces that are kept as lists and joined once, in
    `whole`."""

    __slots__ = ("finish_reason", "logprobs", "message", "openai", "texts", "tool_calls")

    def __init__(self, openai: bool) -> None:
        self.openai = openai
        self.message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if openai:
            self.message["annotations"] = []
        self.texts: dict[str, list[str]] = {}  # _TEXT_FIELDS' pieces
        self.tool_calls: dict[int, dict[str, Any]] = {}  # function name / arguments as pieces
        self.logprobs: dict[str, Any] | None = None
        self.finish_reason: str | None = None

    def add(self, choice: Mapping[str, Any]) -> None:
        delta = choice.get("delta")
        if delta is not None and not isinstance(delta, dict):
            raise _malformed("choices[].delta is not an object")
        for key, value in (delta or {}).items():
            if key == "tool_calls":
                self._tool_calls(value)
            elif key in _TEXT_FIELDS and isinstance(value, str):
                _extend(self.texts, key, [value])
            elif key == "annotations" and isinstance(value, list):
                _extend(self.message, "annotations", value)
            elif value is not None or key not in self.message:
                self.message[key] = value
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            self.logprobs = self.logprobs or {}
            for key, value in logprobs.items():
                if isinstance(value, list):
                    _extend(self.logprobs, key, value)
                else:
                    self.logprobs[key] = value
        if choice.get("finish_reason") is not None:
            self.finish_reason = str(choice["finish_reason"])

    def _tool_calls(self, calls: Any) -> None:
        if calls is None:
            return
        if not isinstance(calls, list):
            raise _malformed("delta.tool_calls is not a list")
        for call in calls:
            index = call.get("index") if isinstance(call, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1024:
                raise _malformed("delta.tool_calls[].index is not a small integer")
            merged = self.tool_calls.setdefault(index, {"id": "", "type": "function",
                                                        "function": {"name": [], "arguments": []}})
            for key, value in call.items():
                if key == "function" and isinstance(value, dict):
                    for part, text in value.items():
                        if isinstance(text, str):
                            _extend(merged["function"], part, [text])
                elif key not in ("index", "function") and value is not None:
                    merged[key] = value

    def whole(self, index: int) -> dict[str, Any]:
        if self.finish_reason is None:
            raise UpstreamError(ErrorKind.RETRYABLE, f"stream ended without a finish reason for choice {index}")
        message = dict(self.message)
        for key, pieces in self.texts.items():
            message[key] = "".join(pieces)
        if not self.openai and not message["content"]:  # as adapters/anthropic.py maps a message
            message["content"] = None
        if self.tool_calls:
            message["tool_calls"] = [{**call, "function": {part: "".join(pieces) for part, pieces
                                                            in call["function"].items()}}
                                     for call in (self.tool_calls[i] for i in sorted(self.tool_calls))]
            if not self.openai:  # as adapters/anthropic.py writes a whole answer's tool_use input
                for call in message["tool_calls"]:
                    call["function"]["arguments"] = _compact(call["function"].get("arguments", ""),
                                                             cut=self.finish_reason == "length")
        return {"index": index, "message": message, "logprobs": self.logprobs, "finish_reason": self.finish_reason}


class ChatAssembly:
    """`chat.completion.chunk` objects in, the `chat.completion` they spell out. `openai`: the
    answer has OpenAI's own fields (`message.annotations`), which its chunks leave out."""

    def __init__(self, openai: bool) -> None:
        self._openai = openai
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None

    def add(self, data: bytes) -> None:
        """One chunk (JSON bytes); UpstreamError (RETRYABLE) when it is not a chat chunk."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise _malformed("not JSON") from None
        if not isinstance(chunk, dict):
            raise _malformed("not a JSON object")
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise _malformed("choices is not a list")
        for key, value in chunk.items():
            if key not in _NOT_COPIED and (value is not None or key not in self._head):
                self._head[key] = value
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in choices:
            index = choice.get("index", 0) if isinstance(choice, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1024:
                raise _malformed("choices[].index is not a small integer")
            found = self._choices.get(index)
            if found is None:
                found = self._choices[index] = _Choice(self._openai)
            found.add(choice)

    def body(self, usage: TokenUsage) -> bytes:
        """The whole answer; `usage` (the stream's final count) when no chunk carried a usage object."""
        if not self._choices:
            raise UpstreamError(ErrorKind.RETRYABLE, "stream ended without any choice")
        answer: dict[str, Any] = {
            "id": self._head.pop("id", ""),
            "object": "chat.completion",
            "created": self._head.pop("created", 0),
            "model": self._head.pop("model", ""),
            "choices": [self._choices[i].whole(i) for i in sorted(self._choices)],
            "usage": self._usage if self._usage is not None else openai_usage(usage),
        }
        answer.update(self._head)
        return orjson.dumps(answer)


async def read_whole(chunks: AsyncIterator[StreamChunk], assembly: ChatAssembly, *, first_s: float, gap_s: float,
                     clock: Callable[[], float], on_first: Callable[[float], None], endpoint: str,
                     within: Within = asyncio.timeout) -> TokenUsage:
    """Read a stream to its end into `assembly`: its first content chunk within `first_s` of
    now (then `on_first(seconds)`), every later chunk within `gap_s` of the one before. The
    stream's usage (its last item's); UpstreamError (TIMEOUT) on a silence past those bounds.
    The iterator is closed whatever happens. `within(seconds)` bounds each wait (the request
    path passes its shared timer, deadlines.Deadlines.within: no loop timer per chunk)."""
    started = clock()
    first = False
    usage: TokenUsage | None = None
    try:
        while usage is None:
            bound = gap_s if first else first_s - (clock() - started)
            try:
                async with within(max(bound, 0.0)):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError:
                why = f"went silent for {gap_s:.3g} s" if first else "sent no first token within its attempt timeout"
                raise UpstreamError(ErrorKind.TIMEOUT, f"endpoint {endpoint}: stream {why}") from None
            if chunk.usage is not None:
                usage = chunk.usage
                if chunk.usage_chunk:
                    assembly.add(chunk.usage_chunk)
                continue
            if chunk.data:
                assembly.add(chunk.data)
            if chunk.content and not first:
                first = True
                on_first(clock() - started)
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    if usage is None:  # (adapters end every stream with one; a stream without it is cut short)
        raise UpstreamError(ErrorKind.RETRYABLE, f"endpoint {endpoint}: stream ended before its end")
    return usage


async def whole_answer(chunks: AsyncIterator[StreamChunk], *, openai: bool, limit: int, first_s: float, gap_s: float,
                       clock: Callable[[], float], on_first: Callable[[float], None], endpoint: str,
                       within: Within = asyncio.timeout) -> AdapterResponse:
    """The whole answer a stream spells out (`read_whole`'s bounds), at most `limit` bytes as a
    unary answer is (over it: the RETRYABLE protocol error adapters/http1.py gives one)."""
    assembly = ChatAssembly(openai)
    usage = await read_whole(chunks, assembly, first_s=first_s, gap_s=gap_s, clock=clock, on_first=on_first,
                             endpoint=endpoint, within=within)
    body = assembly.body(usage)
    if len(body) > limit:
        raise UpstreamError(ErrorKind.RETRYABLE,
                            f"endpoint {endpoint}: upstream protocol error: decoded answer body over {limit} bytes")
    return AdapterResponse(body, usage)
