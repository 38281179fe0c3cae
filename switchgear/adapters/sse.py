"""Server-sent events framing for streamed upstream answers (OpenAI's and Anthropic's streams).

Its own module because openai.py needs it and _http.py imports openai.py's classifiers, so it
cannot live in _http.py without an import cycle."""

from __future__ import annotations

from collections.abc import AsyncIterator


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) per SSE event from a line iterator (WHATWG framing: `event:`/`data:`
    fields, multi-line data joined by newlines, a blank line ends an event, `:` comments
    ignored). An event with no `event:` field is named "message"."""
    event, data = "", list[str]()
    async for line in lines:
        if not line:
            if data:
                yield event or "message", "\n".join(data)
            event, data = "", list[str]()
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if data:
        yield event or "message", "\n".join(data)
