"""The front door's OpenAI Responses API: `POST /v1/responses` (JSON, or SSE when "stream": true).

The request's `model` names a Switchgear llm service, as on the other routes (http.py), and the
call goes through the same pipeline (keys, policy, quotas, cache, routing, failover, metering)
as a "chat.completions" call, which every llm target serves whatever its protocol: the
Responses request is mapped to an OpenAI chat request, and the chat answer (JSON or chunk
stream) back to a Responses `response` object (or its stream events).

Stateless: this door keeps no responses. `previous_response_id`, `conversation`, `prompt`
(stored prompts), `background: true` and item references are refused — the caller sends the
whole input each time (`input += response.output` works: output items are accepted as input).
`store` is accepted (the SDK's default is to send none; OpenAI's default is true) and every
answer says `"store": false`, so nobody believes it was stored.

Request → chat (`chat_request`, pure): `instructions` → a leading system message; `input` (a
string, or message / function_call / function_call_output items) → messages (developer → system,
consecutive function_call items → one assistant message's `tool_calls`, function_call_output →
a `tool` message); input_text / output_text / refusal parts → text, input_image (a URL or data
URL) → an image part of a user message; function `tools` → chat tools, `tool_choice`,
`parallel_tool_calls`; `max_output_tokens` → `max_completion_tokens`; `temperature`, `top_p`,
`user`, `safety_identifier`, `prompt_cache_key` as chat has them; `text.format` (text /
json_object / json_schema) → `response_format`, `text.verbosity` → `verbosity`;
`reasoning.effort` → `reasoning_effort` (a reasoning summary is refused: no reasoning items come
back). `metadata` is echoed, not sent upstream. Anything else — built-in tools (web_search,
file_search, computer use, ...), input_file parts, reasoning or item_reference items, `include`,
`truncation: "auto"`, `top_logprobs`, `max_tool_calls`, a service tier other than auto/default,
and unknown keys — is refused with 400 naming the field, before any upstream call.

Answer: `response` {id "resp_<request id>", status "completed" (or "incomplete" with
incomplete_details.reason max_output_tokens / content_filter for finish reasons length /
content_filter), output: a `message` item (output_text or refusal) and/or `function_call`
items (each with a call id of its own: a missing or repeated upstream id is replaced), usage
from the call's metered usage, and the request's fields echoed}. A stream sends
response.created, response.in_progress, then per output item output_item.added,
(content_part.added, output_text.delta... (refusal.delta... for a refusal), output_text.done,
content_part.done | function_call_arguments.delta..., function_call_arguments.done),
output_item.done, and last
response.completed (or response.incomplete); every event carries a `sequence_number`. A stream
that fails after its first event ends with an `error` event and then `response.failed`.
When the route's fallback chain ends in the task queue, the answer is a response with status
"queued", no output and the queue's answer (task and queue ids) as `switchgear_task` (a stream:
response.created, response.in_progress, response.queued).

Errors are the door's own (OpenAI's) shape `{"error": {"message", "type", "param", "code"}}`.
`GET`/`DELETE /v1/responses/{id}` (and the input_items / cancel routes) answer 404 saying that
this door keeps no responses.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Collection, Mapping
from typing import Any

import orjson
from aiohttp import web

from switchgear.adapters.base import TokenUsage, responses_usage
from switchgear.dataplane import access_log
from switchgear.dataplane.anthropic_door import Hooks, first_choice
from switchgear.dataplane.convert import Call, check_depth
from switchgear.dataplane.governance import Principal
from switchgear.dataplane.http_edge import relay
from switchgear.dataplane.outcome import failed
from switchgear.dataplane.snapshot import AgentSnapshot
from switchgear.dataplane.stream import FallbackChunk, StreamEnd

PATH = "/v1/responses"
#: Top-level keys this door maps (or accepts with the meaning documented above).
MAPPED = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens",
    "temperature", "top_p", "text", "user", "safety_identifier", "prompt_cache_key", "metadata", "stream",
    "stream_options", "store", "reasoning", "include", "truncation", "service_tier",
})
#: Top-level keys of the Responses API this door refuses unless null (or their default), and why.
REFUSED_KEYS: Mapping[str, str] = {
    "previous_response_id": "this door keeps no responses: send the whole conversation in 'input'",
    "conversation": "this door keeps no conversations: send the whole conversation in 'input'",
    "prompt": "this door keeps no stored prompts: send 'instructions' and 'input'",
    "background": "this door does not run responses in the background",
    "top_logprobs": "this door returns no log probabilities",
    "max_tool_calls": "this door serves function tools only, whose calls the caller makes",
}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text")
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: Keys an item may carry besides those it maps: what output items hold when passed back as input.
_MESSAGE_KEYS = frozenset({"type", "role", "content", "id", "status", "phase"})
_CALL_KEYS = frozenset({"type", "call_id", "name", "arguments", "id", "status", "parsed_arguments", "namespace"})
_OUTPUT_KEYS = frozenset({"type", "call_id", "output", "id", "status"})
_PART_KEYS = {"input_text": {"type", "text"}, "output_text": {"type", "text", "annotations", "logprobs", "parsed"},
              "refusal": {"type", "refusal"}, "input_image": {"type", "image_url", "detail", "file_id"}}
_TOOL_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})
_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
_VERBOSITY = ("low", "medium", "high")
MAX_METADATA_KEYS = 16


class Refused(Exception):
    """A bad request: 400 in OpenAI's error shape, naming the field (`param`)."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_value", status: int = 400) -> None:
        super().__init__(message)
        self.param, self.message, self.code, self.status = param, message, code, status

    def response(self) -> web.Response:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json")


def _bad(param: str, message: str, code: str = "invalid_value") -> Refused:
    return Refused(param, f"Invalid '{param}': {message}", code)


def _type(param: str, expected: str) -> Refused:
    return _bad(param, f"expected {expected}", "invalid_type")


# ---------------------------------------------------------------------------------------
# request checks and Responses → chat (pure)


def parse_request(raw: bytes, max_depth: int) -> dict[str, Any]:
    """The JSON body, an object no deeper than `max_depth` (RequestError naming the field)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Refused(None, f"We could not parse the JSON body of your request: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise Refused(None, "The request body must be a JSON object.", "invalid_json")
    check_depth(body, max_depth, raw=raw)
    return body


def _str(body: Mapping[str, Any], key: str, param: str | None = None) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise _type(param or key, "a string")
    return value


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _type(key, "a number")
    if not low <= value <= high:
        raise _bad(key, f"expected a number from {low:g} to {high:g}, got {value}")
    return value


def _bool(body: Mapping[str, Any], key: str, param: str | None = None) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise _type(param or key, "a boolean")
    return value


def _keys(item: Mapping[str, Any], allowed: frozenset[str] | set[str], param: str) -> None:
    for key in item:
        if key not in allowed:
            raise Refused(f"{param}.{key}", f"Unknown parameter: '{param}.{key}'.", "unknown_parameter")


def _text_of(content: Any, param: str, role: str) -> str | list[dict[str, Any]]:
    """A message's content as chat content: a string, or parts when it holds an image."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _type(param, "a string or an array of content parts")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str) or kind not in _PART_KEYS:
            raise _bad(f"{where}.type", "expected a content part of type input_text, output_text, refusal "
                       "or input_image (input_file and audio parts cannot be sent to this door's upstreams)")
        _keys(part, _PART_KEYS[kind], where)
        if kind in _TEXT_PARTS or kind == "refusal":
            field = "refusal" if kind == "refusal" else "text"
            text = part.get(field)
            if not isinstance(text, str):
                raise _type(f"{where}.{field}", "a string")
            parts.append({"type": "text", "text": text})
            continue
        if role != "user":
            raise _bad(f"{where}.type", "input_image parts may only be sent in user messages")
        url = part.get("image_url")
        if part.get("file_id") is not None or not isinstance(url, str) or not url:
            raise _bad(f"{where}.image_url", "expected an image URL or data URL (file ids need storage this door "
                       "does not have)")
        image: dict[str, Any] = {"url": url}
        detail = part.get("detail")
        if detail is not None:
            if detail not in ("low", "high", "auto"):
                raise _bad(f"{where}.detail", "expected 'low', 'high' or 'auto'")
            image["detail"] = detail
        parts.append({"type": "image_url", "image_url": image})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _message(item: Mapping[str, Any], param: str) -> dict[str, Any]:
    _keys(item, _MESSAGE_KEYS, param)
    role = item.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise _bad(f"{param}.role", "expected one of 'user', 'assistant', 'system', 'developer'")
    if "content" not in item:
        raise Refused(f"{param}.content", f"Missing required parameter: '{param}.content'.",
                      "missing_required_parameter")
    content = _text_of(item["content"], f"{param}.content", role)
    mapped = _ROLES[role]
    if mapped != "user" and not isinstance(content, str):
        raise _bad(f"{param}.content", f"{role} messages take text only")
    return {"role": mapped, "content": content}


def _function_call(item: Mapping[str, Any], param: str) -> dict[str, Any]:
    _keys(item, _CALL_KEYS, param)
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str) or (key != "arguments" and not item[key]):
            raise _type(f"{param}.{key}", "a non-empty string" if key != "arguments" else "a string of JSON")
    return {"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                    "arguments": item["arguments"]}}


def _function_output(item: Mapping[str, Any], param: str) -> dict[str, Any]:
    _keys(item, _OUTPUT_KEYS, param)
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _type(f"{param}.call_id", "a non-empty string")
    output = item.get("output")
    if isinstance(output, list):
        output = _text_of(output, f"{param}.output", "tool")
    if not isinstance(output, str):
        raise _type(f"{param}.output", "a string or an array of text parts")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _messages(value: Any) -> list[dict[str, Any]]:
    """`input` as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _type("input", "a string or a non-empty array of input items")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise _type(param, "an input item object")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            call = _function_call(item, param)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and isinstance(last["content"], (str, type(None))):
                last.setdefault("tool_calls", []).append(call)  # one assistant turn: its text and its calls
                last["content"] = last["content"] or None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(_function_output(item, param))
        else:
            raise _bad(f"{param}.type", f"{kind!r} items cannot be sent to this door (it keeps no state and serves "
                       "message, function_call and function_call_output items)")
    return messages


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _type("tools", "an array of function tools")
    tools = []
    for i, tool in enumerate(value):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _type(param, "a function tool object")
        if tool.get("type") != "function":
            raise _bad(f"{param}.type", f"{tool.get('type')!r} tools are not served by this door: it serves "
                       "function tools only (built-in tools such as web_search, file_search or computer use "
                       "run on OpenAI's side)")
        _keys(tool, _TOOL_KEYS, param)
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise _bad(f"{param}.name", "expected a name of 1 to 64 letters, digits, '_' or '-'")
        function: dict[str, Any] = {"name": name}
        description = _str(tool, "description", f"{param}.description")
        if description is not None:
            function["description"] = description
        parameters = tool.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise _type(f"{param}.parameters", "a JSON Schema object")
            function["parameters"] = parameters
        strict = tool.get("strict")
        if strict is not None:
            if not isinstance(strict, bool):
                raise _type(f"{param}.strict", "a boolean")
            function["strict"] = strict
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any, names: list[str]) -> Any:
    if value in ("auto", "none", "required"):
        if value == "required" and not names:
            raise _bad("tool_choice", "'required' needs function tools in 'tools'")
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        _keys(value, frozenset({"type", "name"}), "tool_choice")
        if value.get("name") not in names:
            raise _bad("tool_choice.name", "expected the name of one of the function tools in 'tools'")
        return {"type": "function", "function": {"name": value["name"]}}
    raise _bad("tool_choice", "expected 'auto', 'none', 'required' or {\"type\": \"function\", \"name\": ...} "
               "(this door serves function tools only)")


def _response_format(text: Any) -> tuple[dict[str, Any] | None, str | None]:
    """`text` → (chat response_format or None, verbosity or None)."""
    if not isinstance(text, dict):
        raise _type("text", "an object")
    _keys(text, frozenset({"format", "verbosity"}), "text")
    verbosity = text.get("verbosity")
    if verbosity is not None and verbosity not in _VERBOSITY:
        raise _bad("text.verbosity", "expected 'low', 'medium' or 'high'")
    fmt = text.get("format")
    if fmt is None:
        return None, verbosity
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        _keys(fmt, frozenset({"type"}), "text.format")
        return {"type": kind}, verbosity
    if kind != "json_schema":
        raise _bad("text.format.type", "expected 'text', 'json_object' or 'json_schema'")
    _keys(fmt, frozenset({"type", "name", "schema", "strict", "description"}), "text.format")
    name, schema = fmt.get("name"), fmt.get("schema")
    if not isinstance(name, str) or not _TOOL_NAME.match(name):
        raise _bad("text.format.name", "expected a name of 1 to 64 letters, digits, '_' or '-'")
    if not isinstance(schema, dict):
        raise _type("text.format.schema", "a JSON Schema object")
    spec: dict[str, Any] = {"name": name, "schema": schema}
    for key, kind_ in (("strict", bool), ("description", str)):
        value = fmt.get(key)
        if value is not None:
            if not isinstance(value, kind_):
                raise _type(f"text.format.{key}", "a boolean" if kind_ is bool else "a string")
            spec[key] = value
    return {"type": "json_schema", "json_schema": spec}, verbosity


def _check_refused(body: Mapping[str, Any]) -> None:
    for key in body:
        if key not in MAPPED and key not in REFUSED_KEYS:
            raise Refused(key, f"Unknown parameter: '{key}'.", "unknown_parameter")
    for key, why in REFUSED_KEYS.items():
        value = body.get(key)
        if value is not None and value is not False and value != 0:
            raise Refused(key, f"'{key}' is not supported by this door: {why}.", "unsupported_parameter")
    if body.get("include"):
        raise Refused("include", "'include' is not supported by this door: it returns no extra output data "
                      "(logprobs, encrypted reasoning, tool sources).", "unsupported_parameter")
    if not isinstance(body.get("include") or [], list):
        raise _type("include", "an array")
    if body.get("truncation") not in (None, "disabled"):
        raise Refused("truncation", "'truncation' must be 'disabled' here: this door does not shorten inputs "
                      "(an input over the model's context fails).", "unsupported_parameter")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise Refused("service_tier", "'service_tier' may be 'auto' or 'default' here.", "unsupported_parameter")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _type("stream_options", "an object")
        _keys(options, frozenset({"include_obfuscation"}), "stream_options")
        _bool(options, "include_obfuscation", "stream_options.include_obfuscation")


def _reasoning(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _type("reasoning", "an object")
    _keys(value, frozenset({"effort", "summary", "generate_summary"}), "reasoning")
    for key in ("summary", "generate_summary"):
        if value.get(key) is not None:
            raise Refused(f"reasoning.{key}", f"'reasoning.{key}' is not supported by this door: its upstreams "
                          "are served as chat completions, which return no reasoning summaries.",
                          "unsupported_parameter")
    effort = value.get("effort")
    if effort is not None and effort not in _EFFORTS:
        raise _bad("reasoning.effort", f"expected one of {', '.join(_EFFORTS)}")
    return effort


def _metadata(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS:
        raise _type("metadata", f"an object of at most {MAX_METADATA_KEYS} string values")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise _bad(f"metadata.{key}", "expected keys of at most 64 characters and string values of at most 512")


def chat_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI chat request for a Responses request body, or Refused naming the field."""
    _check_refused(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Refused("model", "you must provide a model parameter", "missing_required_parameter")
    if body.get("input") is None:
        raise Refused("input", "Missing required parameter: 'input'.", "missing_required_parameter")
    messages = _messages(body["input"])
    instructions = _str(body, "instructions")
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    chat: dict[str, Any] = {"model": model, "messages": messages}
    max_output = body.get("max_output_tokens")
    if max_output is not None:
        if not isinstance(max_output, int) or isinstance(max_output, bool) or max_output < 1:
            raise _bad("max_output_tokens", "expected an integer of at least 1")
        chat["max_completion_tokens"] = max_output
    for key, high in (("temperature", 2.0), ("top_p", 1.0)):
        number = _number(body, key, 0.0, high)
        if number is not None:
            chat[key] = number
    for key in ("user", "safety_identifier", "prompt_cache_key"):
        value = _str(body, key)
        if value:
            chat[key] = value
    names: list[str] = []
    if body.get("tools") is not None:
        tools = _tools(body["tools"])
        names = [t["function"]["name"] for t in tools]
        if tools:
            chat["tools"] = tools
    if body.get("tool_choice") is not None:
        choice = _tool_choice(body["tool_choice"], names)
        if names:
            chat["tool_choice"] = choice
    parallel = _bool(body, "parallel_tool_calls")
    if parallel is not None and names:
        chat["parallel_tool_calls"] = parallel
    if body.get("text") is not None:
        response_format, verbosity = _response_format(body["text"])
        if response_format is not None:
            chat["response_format"] = response_format
        if verbosity is not None:
            chat["verbosity"] = verbosity
    effort = _reasoning(body.get("reasoning"))
    if effort is not None:
        chat["reasoning_effort"] = effort
    _metadata(body.get("metadata"))
    _bool(body, "store")
    if _bool(body, "stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


# ---------------------------------------------------------------------------------------
# chat → Responses answers (pure)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def response_id(request_id: str) -> str:
    return f"resp_{request_id}"


#: chat finish_reason → the Responses incomplete_details.reason (others: completed).
INCOMPLETE: Mapping[str, str] = {"length": "max_output_tokens", "content_filter": "content_filter"}


def skeleton(body: Mapping[str, Any], model: str, request_id: str, created_at: int) -> dict[str, Any]:
    """A response object without output: the request's fields echoed as OpenAI echoes them."""
    text = _obj(body.get("text"))
    reasoning = _obj(body.get("reasoning"))
    return {
        "id": response_id(request_id), "object": "response", "created_at": created_at, "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None, "model": model, "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": None,
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": None},
        "safety_identifier": body.get("safety_identifier"), "service_tier": "default", "store": False,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity", "medium")},
        "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
        "top_logprobs": 0, "top_p": body.get("top_p", 1.0), "truncation": "disabled", "usage": None,
        "user": body.get("user"), "metadata": body.get("metadata") or {},
    }


def _finish(response: dict[str, Any], finish_reason: Any) -> dict[str, Any]:
    reason = INCOMPLETE.get(str(finish_reason))
    response["status"] = "incomplete" if reason else "completed"
    response["incomplete_details"] = {"reason": reason} if reason else None
    return response


def _message_item(request_id: str, parts: list[dict[str, Any]], status: str, k: int = 0) -> dict[str, Any]:
    """The answer's k-th message item (a stream may interleave text and tool calls)."""
    return {"id": f"msg_{request_id}" + (f"_{k}" if k else ""), "type": "message", "status": status,
            "role": "assistant", "content": parts}


#: A streamed message part's kind → (its text field, the name its delta and done events carry).
_PARTS: Mapping[str, tuple[str, str]] = {"text": ("text", "output_text"), "refusal": ("refusal", "refusal")}


def _empty_part(kind: str) -> dict[str, Any]:
    if kind == "refusal":
        return {"type": "refusal", "refusal": ""}
    return {"type": "output_text", "text": "", "annotations": [], "logprobs": []}


def _call_item(request_id: str, k: int, call_id: Any, name: str, arguments: str, status: str,
               taken: Collection[str]) -> dict[str, Any]:
    """The answer's k-th function call; an upstream call id that is missing or already `taken`
    gets one of this answer's own (callers match outputs to calls by it)."""
    if not isinstance(call_id, str) or not call_id or call_id in taken:
        call_id = f"call_{request_id}_{k}"
    return {"id": f"fc_{request_id}_{k}", "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}


def queued(response: dict[str, Any], task: Mapping[str, Any]) -> dict[str, Any]:
    """The response when the task queue took the call instead (its answer names the task):
    status "queued", no output, the task's answer as `switchgear_task`."""
    response.update(status="queued", output=[], switchgear_task=task)
    return response


def response_from_chat(chat: Mapping[str, Any], body: Mapping[str, Any], model: str, request_id: str,
                       usage: TokenUsage, created_at: int) -> dict[str, Any]:
    """A Responses `response` for a `chat.completion`, with the call's metered usage (or,
    for the task queue's answer, which has no choices, a queued response)."""
    if "choices" not in chat and "task_id" in chat:
        return queued(skeleton(body, model, request_id, created_at), chat)
    choices = chat.get("choices")
    choice = _obj(choices[0]) if isinstance(choices, list) and choices else {}
    reply = _obj(choice.get("message"))
    incomplete = str(choice.get("finish_reason")) in INCOMPLETE
    calls = [c for c in reply.get("tool_calls") or () if isinstance(c, dict)]
    parts: list[dict[str, Any]] = []
    content, refusal = reply.get("content"), reply.get("refusal")
    if isinstance(content, str) and (content or not calls):
        parts.append({"type": "output_text", "text": content, "annotations": [], "logprobs": []})
    if isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    output = [_message_item(request_id, parts, "incomplete" if incomplete else "completed")] if parts else []
    for k, call in enumerate(calls):
        function = _obj(call.get("function"))
        output.append(_call_item(request_id, k, call.get("id"), str(function.get("name", "")),
                                 str(function.get("arguments") or ""), "completed",
                                 [item["call_id"] for item in output if item["type"] == "function_call"]))
    response = skeleton(body, model, request_id, created_at)
    response["output"] = output
    response["usage"] = responses_usage(usage)
    return _finish(response, choice.get("finish_reason"))


def sse(data: Mapping[str, Any]) -> bytes:
    return b"event: " + str(data["type"]).encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class ChatToEvents:
    """OpenAI chat chunks in, Responses stream events out (one instance per stream)."""

    def __init__(self, body: Mapping[str, Any], model: str, request_id: str, created_at: int) -> None:
        self.request_id = request_id
        self.response = skeleton(body, model, request_id, created_at)
        self.sequence = 0
        self.items: list[dict[str, Any]] = []  # the output so far, items in their final shape
        self.open: str | None = None  # "text" or "tool:<chat tool call index>"
        self.tools: dict[str, dict[str, Any]] = {}  # chat tool call index → its item
        self.finish_reason: Any = None
        self.task: dict[str, Any] | None = None  # the task queue's answer, when it took the call

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(data)

    def start(self) -> bytes:
        return (self._event("response.created", response=self.response)
                + self._event("response.in_progress", response=self.response))

    def _index(self) -> int:
        return len(self.items) - 1

    def close(self) -> bytes:
        """The open item's closing events."""
        if self.open is None:
            return b""
        item, index, opened = self.items[-1], self._index(), self.open
        self.open = None
        if opened in _PARTS:
            part = item["content"][0]
            item["status"] = "incomplete" if str(self.finish_reason) in INCOMPLETE else "completed"
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            done = ({"text": part["text"], "logprobs": []} if opened == "text" else {"refusal": part["refusal"]})
            return (self._event(f"response.{_PARTS[opened][1]}.done", **where, **done)
                    + self._event("response.content_part.done", **where, part=part)
                    + self._event("response.output_item.done", output_index=index, item=item))
        item["status"] = "completed"
        return (self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            name=item["name"], arguments=item["arguments"])
                + self._event("response.output_item.done", output_index=index, item=item))

    def _open(self, key: str, item: dict[str, Any]) -> bytes:
        out = self.close()
        self.items.append(item)
        self.open = key
        added = {**item, "content": []} if item["type"] == "message" else {**item, "arguments": ""}
        out += self._event("response.output_item.added", output_index=self._index(), item=added)
        if item["type"] == "message":
            out += self._event("response.content_part.added", item_id=item["id"], output_index=self._index(),
                               content_index=0, part=_empty_part(key))
        return out

    def _part_delta(self, kind: str, piece: str) -> bytes:
        """A piece of text ("text") or of a refusal ("refusal"), opening a message item for it."""
        out = b""
        if self.open != kind:
            messages = sum(1 for item in self.items if item["type"] == "message")
            out += self._open(kind, _message_item(self.request_id, [_empty_part(kind)], "in_progress", messages))
        item = self.items[-1]
        item["content"][0][_PARTS[kind][0]] += piece
        extra: dict[str, Any] = {"logprobs": []} if kind == "text" else {}
        return out + self._event(f"response.{_PARTS[kind][1]}.delta", item_id=item["id"],
                                 output_index=self._index(), content_index=0, delta=piece, **extra)

    def feed(self, chunk: bytes) -> bytes:
        choice = first_choice(chunk)
        if choice is None:
            if isinstance(chunk, FallbackChunk):  # the task queue's answer: it names the task
                with contextlib.suppress(orjson.JSONDecodeError):
                    self.task = _obj(orjson.loads(bytes(chunk)))
            return b""
        delta = _obj(choice.get("delta"))
        out = b""
        for kind, key in (("text", "content"), ("refusal", "refusal")):
            piece = delta.get(key)
            if isinstance(piece, str) and piece:
                out += self._part_delta(kind, piece)
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                out += self._tool_delta(call)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        return out

    def _tool_delta(self, call: Mapping[str, Any]) -> bytes:
        key = f"tool:{call.get('index', 0)}"
        function = _obj(call.get("function"))
        arguments = function.get("arguments")
        arguments = arguments if isinstance(arguments, str) else ""
        out = b""
        item = self.tools.get(key)
        if item is None:
            item = _call_item(self.request_id, len(self.tools), call.get("id"), str(function.get("name", "")), "",
                              "in_progress", [other["call_id"] for other in self.tools.values()])
            self.tools[key] = item
            out += self._open(key, item)
        elif self.open != key:  # a late piece of a call already closed: kept in the final response only
            item["arguments"] += arguments
            return out
        if arguments:
            item["arguments"] += arguments
            out += self._event("response.function_call_arguments.delta", item_id=item["id"],
                               output_index=self.items.index(item), delta=arguments)
        return out

    def end(self, end: StreamEnd) -> bytes:
        out = self.close()
        if self.task is not None:
            return out + self._event("response.queued", response=queued(dict(self.response), self.task))
        response = {**self.response, "output": self.items,
                    "usage": responses_usage(end.usage)}
        _finish(response, self.finish_reason)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return out + self._event(kind, response=response)

    def fail(self, code: str, message: str) -> bytes:
        """A failure after the first event: `error`, then `response.failed` with the output so far."""
        if self.open is not None:  # cut short: the item that was going out stays unfinished
            self.items[-1]["status"] = "incomplete"
        response = {**self.response, "status": "failed", "output": self.items,
                    "error": {"code": code, "message": message}}
        return (self._event("error", code=code, message=message, param=None)
                + self._event("response.failed", response=response))


# ---------------------------------------------------------------------------------------
# the route

_HOOKS = web.AppKey("responses_hooks", Hooks)


async def responses(request: web.Request) -> web.StreamResponse:
    hooks = request.app[_HOOKS]
    snapshot = hooks.snapshot(request)
    pipeline = hooks.pipeline(request)
    principal = hooks.principal(request, snapshot)
    try:
        body = parse_request(await request.read(), pipeline.max_json_depth)
        chat = chat_request(body)
    except Refused as exc:
        access_log.note_reason(exc.code)
        return exc.response()
    hooks.check_model(snapshot, body["model"], "llm")
    access_log.note_route(body["model"])
    call = hooks.make_call(request, chat, "chat.completions", principal.tenant.id if principal else "")
    created_at = int(time.time())
    if chat.get("stream") is True:
        return await _stream(request, hooks, call, snapshot, principal, body, created_at)
    served, headers = await hooks.invoke(request, call, snapshot, principal)
    result = served.result
    headers["x-request-id"] = call.request_id
    try:
        answer = orjson.loads(result.body)
    except orjson.JSONDecodeError:
        answer = {}
    response = response_from_chat(_obj(answer), body, body["model"], call.request_id, result.usage,
                                  created_at)
    return web.Response(body=orjson.dumps(response), content_type="application/json", headers=headers)


async def _stream(request: web.Request, hooks: Hooks, call: Call, snapshot: AgentSnapshot,
                  principal: Principal | None, body: Mapping[str, Any], created_at: int) -> web.StreamResponse:
    opened = await hooks.open_stream(request, call, snapshot, principal, "x-request-id")
    if opened is None:
        return Refused(None, "upstream stream ended without an answer", "upstream_error", 502).response()
    response, first, items = opened
    mapper = ChatToEvents(body, call.service, call.request_id, created_at)
    await response.write(mapper.start())
    item = await relay(response, first, items, mapper.feed)
    if item.error is not None:
        refused = failed(item.error, item.attempts, item.service, item.endpoint, interrupted=True)
        await response.write(mapper.fail(refused.code or refused.error_type, refused.message))
    else:
        await response.write(mapper.end(item))
    await response.write_eof()
    return response


async def stored(request: web.Request) -> web.StreamResponse:
    """GET / DELETE /v1/responses/{id}[/...]: this door keeps no responses (after the caller's key is checked)."""
    hooks = request.app[_HOOKS]
    snapshot = hooks.snapshot(request)
    hooks.principal(request, snapshot)
    return Refused(None, f"This door serves POST {PATH} only and keeps no responses (it is stateless): nothing "
                   "can be retrieved, listed, cancelled or deleted; send the whole conversation in 'input' instead.",
                   "not_found", 404).response()


def add_routes(app: web.Application, hooks: Hooks) -> None:
    app[_HOOKS] = hooks
    app.router.add_post(PATH, responses)
    for method in ("GET", "POST", "DELETE"):
        app.router.add_route(method, PATH + "/{tail:.+}", stored)
