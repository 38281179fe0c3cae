"""The scheduling core's inputs: what a request asks for and what a candidate offers.

Pure data, no I/O. A `Candidate` is one (service, endpoint) pair as routing sees it: a narrow,
immutable view (STYLE 4) built once per snapshot, never per request. Live numbers (in-flight,
latency, success rate) are not in it: they live in `stats.LiveStats`, keyed by `Candidate.key`
so that a snapshot swap keeps them for endpoints that persist.

Units: seconds, USD, tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from random import Random
from typing import TYPE_CHECKING, Any

from switchgear.dataplane.snapshot import INFERABLE as INFERABLE  # (defined there: the views read it)
from switchgear.dataplane.snapshot import EndpointView, Pricing, ServiceView
from switchgear.wire.lean import lean

if TYPE_CHECKING:
    from switchgear.dataplane.scheduling.stats import LiveStats

CHARS_PER_TOKEN = 4  # rough English average; the request's size estimate, not billing
DEFAULT_OUTPUT_TOKENS = 256  # when neither the request nor the service bounds the answer
USER_TYPES = ("standard", "premium")


@dataclass(frozen=True)
class Candidate:
    """One endpoint of one service, with what the filters and scorers need to know of it.

    `tier` orders candidates for the priority strategy: (service priority, endpoint priority),
    higher first. `context_window` is in tokens, 0 = unknown (never filtered out).
    `max_concurrency` 0 = unlimited. `max_tokens`: the target's own answer bound (0 = the
    service's), the output estimate of a request that does not ask for one.
    """

    key: str
    service: str
    endpoint: str
    weight: float = 1.0
    tier: tuple[int, int] = (0, 0)
    health: str = "healthy"
    max_concurrency: int = 0
    pricing: Pricing = field(default_factory=Pricing)
    context_window: int = 0
    capabilities: frozenset[str] = frozenset()
    max_tokens: int = 0

    def context_need(self, request: Request) -> int:
        """Tokens of this target's context window the request takes: estimated input + the
        answer bound the payload asked (lowered to this target's max_tokens, as the attempt
        lowers it); an answer bound the payload did not set takes none (a provider refuses a
        prompt plus max_tokens beyond its window, not a default it picks itself)."""
        return context_need(request.input_tokens, 0 if request.output_default else request.output_tokens,
                            self.max_tokens)

    def cost(self, request: Request) -> float:
        """USD this request is expected to cost here: request price + estimated tokens at price
        (the output estimate is this target's max_tokens when the request asked for none)."""
        out = self.max_tokens if self.max_tokens and request.output_default else request.output_tokens
        return self.pricing.cost(request.input_tokens, out)


def context_need(input_tokens: int, asked: int, max_tokens: int) -> int:
    """Tokens of a context window a call takes: its input + the answer bound it asked (0 = none),
    lowered to the target's `max_tokens` (0 = no cap)."""
    return input_tokens + (min(asked, max_tokens) if max_tokens and asked else asked)


def candidate_key(service: str, endpoint: str) -> str:
    """The stats key of an endpoint: stable across snapshots while the names are."""
    return f"{service}/{endpoint}"


def candidates_of(service: ServiceView) -> tuple[Candidate, ...]:
    """The candidates one service offers: its endpoints (a route's targets), each with its own
    price when it has one, else the service's (common.proto Endpoint: unset = as the service)."""
    return tuple(_candidate(service, e) for e in service.endpoints)


def _candidate(service: ServiceView, e: EndpointView) -> Candidate:
    target = service.target(e)  # the effective target: its own fields, else the service's
    return Candidate(
        key=candidate_key(service.name, e.id),
        service=service.name,
        endpoint=e.id,
        weight=float(max(1, e.weight)),
        tier=(service.priority, e.priority),
        health=e.health,
        max_concurrency=e.max_concurrency,
        pricing=target.pricing,
        context_window=target.context_window,
        capabilities=target.capabilities,
        max_tokens=target.max_tokens,
    )


@lean
@dataclass(frozen=True)
class Request:
    """What one call asks of routing.

    `priority` 1..10 (5 default; > 7 is "high" in the seed's rules); `user_type` "standard" or
    "premium"; `input_tokens` / `output_tokens` are estimates (see `estimate_tokens`);
    `stream` makes latency mean time to first token; `tenant` feeds the allow-list hook;
    `output_default`: the payload set no answer bound (output_tokens is the service's default,
    and a target with its own max_tokens is costed at that, `Candidate.cost`).
    """

    category: str = ""
    priority: int = 5
    user_type: str = "standard"
    input_tokens: int = 0
    output_tokens: int = 0
    stream: bool = False
    capabilities: frozenset[str] = frozenset()
    tenant: str = ""
    output_default: bool = False


def _text_chars(value: Any) -> int:
    """Characters of text in a JSON value: strings count, containers are walked, keys are not."""
    if isinstance(value, str):
        return len(value)
    if value is None:  # a key the payload does not have: no ABC isinstance (Mapping) for it
        return 0
    # Plain loops with the common cases first: this walks every request's messages.
    if isinstance(value, (list, tuple)):
        items: Any = value
    elif isinstance(value, dict | Mapping):
        items = value.values()
    else:
        return 0
    n = 0
    for v in items:
        n += len(v) if type(v) is str else _text_chars(v)
    return n


def estimate_tokens(payload: Mapping[str, Any], default_max_tokens: int = 0) -> tuple[int, int]:
    """(input, output) tokens a payload is expected to use.

    input = ceil(characters of every string value under `messages` / `input` / `prompt` / 4)
    (roles and part types count too: a rough per-message overhead);
    output = the payload's `max_completion_tokens` or `max_tokens`, else `default_max_tokens`
    (the service's), else DEFAULT_OUTPUT_TOKENS when the payload looks like a chat/completion,
    else 0. Used for cost and per-token latency, so an estimate is enough.
    """
    get = payload.get
    chars = _text_chars(get("messages")) + _text_chars(get("input")) + _text_chars(get("prompt"))
    input_tokens = -(-chars // CHARS_PER_TOKEN)
    asked = asked_output(payload)
    if asked:
        return input_tokens, asked
    if default_max_tokens > 0:
        return input_tokens, default_max_tokens
    generative = "messages" in payload or "prompt" in payload
    return input_tokens, DEFAULT_OUTPUT_TOKENS if generative else 0


def asked_output(payload: Mapping[str, Any]) -> int:
    """The answer bound the payload sets (`max_completion_tokens` or `max_tokens`), 0 = none."""
    asked = payload.get("max_completion_tokens") or payload.get("max_tokens")
    return asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else 0


IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})  # OpenAI chat, Anthropic, Responses


def inferred(payload: Mapping[str, Any], names: frozenset[str]) -> frozenset[str]:
    """Which of `names` (a subset of INFERABLE: those the service's targets offer) the payload
    needs: "vision" (an image part in a message's content), "tools" (`tools` or `functions`),
    "json_schema" (`response_format.type` "json_schema"). Exact, and cheap: two key lookups, and
    for "vision" one pass over the messages' content parts (no deeper)."""
    found: set[str] = set()
    if "tools" in names and (payload.get("tools") or payload.get("functions")):
        found.add("tools")
    if "json_schema" in names:
        fmt = payload.get("response_format")
        if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
            found.add("json_schema")
    if "vision" in names and _has_image(payload.get("messages")):
        found.add("vision")
    return frozenset(found)


def _has_image(messages: Any) -> bool:
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") in IMAGE_PARTS:
                    return True
    return False


def user_type_of(user_id: str) -> str:
    """The request's user type by the documented convention: a user id "premium:<id>" (or
    "standard:<id>") names its type; anything else is "standard"."""
    kind, sep, _ = user_id.partition(":")
    return kind if sep and kind in USER_TYPES else "standard"


@dataclass(frozen=True)
class Bounds:
    """A policy's limits on candidates. 0 means no bound. USD, fraction, seconds.

    `overload` / `underload`: the load-shifting thresholds (utilisation fractions, see
    shift.py); 0 = the seed's 0.8 / 0.6.
    """

    max_cost_usd: float = 0.0
    min_success_rate: float = 0.0
    max_latency_s: float = 0.0
    overload: float = 0.0
    underload: float = 0.0


@dataclass
class Context:
    """Everything one pick may read: the request, live stats, the time, randomness, the
    policy's bounds, and `memory` — the picker state of this (group, strategy), which
    survives snapshot swaps (round-robin counters, smooth-WRR current weights)."""

    request: Request
    stats: LiveStats
    now: float
    rng: Random
    bounds: Bounds = Bounds()
    memory: dict[str, Any] = field(default_factory=dict)
