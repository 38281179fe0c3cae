"""A preset response, shaped as the call's method answers. Pure.

The config's `communication.fallback.preset_responses.<category>` is a text (the seed's llm
default: "Service temporarily unavailable. Please try again later."). A client of the
OpenAI-shaped door must get an answer it can parse, so the agent wraps the text:

- `chat.completions`: an OpenAI chat completion (one assistant message, finish_reason "stop",
  zero usage); streamed, one `chat.completion.chunk` carrying the whole text.
- `messages` (Anthropic's native shape): an Anthropic message with one text block.
- any other method: the seed's own `_llm_fallback` answer,
  `{"response": text, "fallback": true, "source": "preset_response"}`.

Each answer is marked as a fallback by the doors as well (InvokeResponse.fallback,
`x-switchgear-fallback`), so a client can tell it from a model's words. A service's metadata
`preset_response` is an exact body and is not shaped.
"""

from __future__ import annotations

from typing import Any

import orjson


def preset_body(method: str, text: str, model: str, request_id: str, created: int) -> bytes:
    """The unary answer carrying `text` (module docstring)."""
    if method == "chat.completions":
        return orjson.dumps({
            "id": f"preset-{request_id}", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        })
    if method == "messages":
        return orjson.dumps({
            "id": f"preset-{request_id}", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        })
    return orjson.dumps(_seed_answer(text))


def preset_chunk(method: str, text: str, model: str, request_id: str, created: int) -> bytes:
    """The one stream chunk carrying `text`: an OpenAI chunk for chat.completions, else the
    unary answer (a stream of one item)."""
    if method == "chat.completions":
        return orjson.dumps({
            "id": f"preset-{request_id}", "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        })
    return preset_body(method, text, model, request_id, created)


def _seed_answer(text: str) -> dict[str, Any]:
    return {"response": text, "fallback": True, "source": "preset_response"}
