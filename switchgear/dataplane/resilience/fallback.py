"""Fallback chain planning: which services (or terminal answers) a failing call tries next. Pure.

`plan` returns the ordered steps for one call:

1. the requested service itself (the invoker fails over across its endpoints);
2. its `fallbacks` in order, depth first through *their* fallbacks (up to
   `max_fallback_depth`), skipping repeats (cycles), unknown names, services this agent
   cannot serve (`unsupported`), another category, a method the service does not serve
   (`serves`), and services with no usable endpoint now (`usable`);
3. the category's own fallback (the seed's `_handle_fallback`):
   - llm: every local model not already planned, by priority (high first) then name;
   - then a preset response, for any category, *only if configured*: the requested
     service's metadata `preset_response` (the exact answer body), else
     `FallbackSettings.preset_responses[category]` (config
     `communication.fallback.preset_responses.<category>`; the llm default is the seed's
     "Service temporarily unavailable. Please try again later."): a text the caller shapes
     as the call's method answers (`Step.shaped`; dataplane/presets.py). A category preset
     answers unavailability only, not a missing secret or a rejected key (`preset_may_answer`);
   - document: QUEUE_FOR_LATER (the call is handed to the task queue, and the answer names
     the task);
4. UNAVAILABLE with the reason, when nothing above is terminal.

A service is a *local model* when its category is llm, it is servable, and either it says so
(capability "local", or metadata `fallback: local`) or it is free and private: every price of
every route target is zero and every endpoint host is loopback, a private/link-local/unique-local IP, `localhost`, a
single-label name (a compose/k8s service such as the seed's `local-llm`) or ends in
`.local`, `.internal`, `.lan` or `.svc`/`.cluster.local`. The explicit tag is preferred;
the second rule makes the seed's `local_models` entry work as written.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import astuple, dataclass, field
from enum import Enum
from types import MappingProxyType
from urllib.parse import urlsplit

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.snapshot import ServiceView

_PRIVATE_SUFFIXES = (".local", ".internal", ".lan", ".svc", ".cluster.local", ".localhost")
_EMPTY: Mapping[str, str] = MappingProxyType({})
_NO_METADATA: Mapping[str, Mapping[str, str]] = MappingProxyType({})


class StepKind(str, Enum):
    SERVICE = "service"
    PRESET = "preset"
    QUEUE_FOR_LATER = "queue_for_later"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Step:
    """One step. `source` says why it is in the plan: requested, fallback, local_model,
    preset, queue_for_later or unavailable. `body` is the preset response text."""

    kind: StepKind
    service: str = ""
    source: str = ""
    body: str = ""
    reason: str = ""
    shaped: bool = False  # PRESET: `body` is a text to shape as the method's answer, not a body

    @property
    def terminal(self) -> bool:
        return self.kind is not StepKind.SERVICE


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (service, why), for logs and traces

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(s.service for s in self.steps if s.kind is StepKind.SERVICE)

    @property
    def fallbacks(self) -> tuple[Step, ...]:
        """The steps after the requested service (which is absent when it was not usable):
        what an invoker walks once the requested service has given up."""
        return tuple(s for s in self.steps if s.source != "requested")


@dataclass(frozen=True)
class FallbackSettings:
    """Where fallbacks are configured. `preset_responses` comes from each snapshot (config
    `communication.fallback.preset_responses`); the rest are the agent's."""

    preset_responses: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    queue_for_later: frozenset[str] = frozenset({"document"})
    local_capability: str = "local"
    max_fallback_depth: int = 3


def should_fall_back(error: ErrorKind | None) -> bool:
    """Whether a call that failed with `error` (None: no endpoint was usable) may move to
    another service. Only CLIENT errors stay: the request itself is wrong everywhere.
    CONTEXT_LENGTH moves on (a fallback may take longer prompts); AUTH and CONFIG are
    faults of this service's setup, not of the request."""
    return error is not ErrorKind.CLIENT


#: Failures a category preset does not answer: the call itself is wrong (CLIENT), or this
#: deployment is (CONFIG: a missing secret; AUTH: a rejected key) — the caller and the operator
#: must see those, not "temporarily unavailable".
_NOT_FOR_PRESETS = frozenset({ErrorKind.CLIENT, ErrorKind.CONFIG, ErrorKind.AUTH})


def preset_may_answer(step: Step, error: ErrorKind | None) -> bool:
    """Whether `step` may answer a call whose chain last failed with `error` (None: no endpoint
    was usable). A category preset (`shaped`) answers only unavailability; a service's own
    metadata preset answers whatever made the call fall back."""
    return not step.shaped or error not in _NOT_FOR_PRESETS


def is_private_host(host: str) -> bool:
    """Loopback, private, link-local or unique-local IP; localhost; a single-label name; or a
    private DNS suffix (see the module docstring)."""
    host = host.lower().rstrip(".")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost" or "." not in host or host.endswith(_PRIVATE_SUFFIXES)
    return ip.is_loopback or ip.is_private or ip.is_link_local


def is_local_model(service: ServiceView, metadata: Mapping[str, str] = _EMPTY, capability: str = "local") -> bool:
    """The local-model rule of the module docstring."""
    if service.category != "llm" or service.unsupported or any(e.source_service for e in service.endpoints):
        return False  # (a category route gathers services: it is never a local model itself)
    if capability in service.capabilities or metadata.get("fallback") == "local":
        return True
    prices = [x for p in {service.target(e).pricing for e in service.endpoints} for x in astuple(p)]
    private = all(is_private_host(urlsplit(e.url).hostname or "") for e in service.endpoints)
    return not any(prices) and bool(service.endpoints) and private


class _Planner:
    def __init__(self, services: Mapping[str, ServiceView], settings: FallbackSettings, category: str,
                 serves: Callable[[ServiceView], bool], usable: Callable[[str], bool],
                 metadata: Mapping[str, Mapping[str, str]]) -> None:
        self.services, self.settings, self.category = services, settings, category
        self.serves, self.usable, self.metadata = serves, usable, metadata
        self.steps: list[Step] = []
        self.skipped: list[tuple[str, str]] = []
        self.seen: set[str] = set()

    def why_not(self, name: str) -> str:
        """"" when `name` can be tried now, else why not."""
        svc = self.services.get(name)
        if svc is None:
            return "unknown service"
        if svc.unsupported:
            return svc.unsupported
        if svc.category != self.category:
            return f"category {svc.category}, not {self.category}"
        if not self.serves(svc):
            return "does not serve this method"
        if not self.usable(name):
            return "no usable endpoint"
        return ""

    def consider(self, name: str, source: str) -> None:
        if name in self.seen:
            self.skipped.append((name, "already planned (cycle or repeat)"))
            return
        self.seen.add(name)
        why = self.why_not(name)
        if why:
            self.skipped.append((name, why))
        else:
            self.steps.append(Step(StepKind.SERVICE, name, source))

    def follow(self, name: str, depth: int) -> None:
        svc = self.services.get(name)
        if svc is None or depth > self.settings.max_fallback_depth:
            return
        for fallback in svc.fallbacks:
            fresh = fallback not in self.seen
            self.consider(fallback, "fallback")
            if fresh:
                self.follow(fallback, depth + 1)


def plan(
    requested: str,
    services: Mapping[str, ServiceView],
    settings: FallbackSettings = FallbackSettings(),
    *,
    serves: Callable[[ServiceView], bool] = lambda _s: True,
    usable: Callable[[str], bool] = lambda _n: True,
    metadata: Mapping[str, Mapping[str, str]] = _NO_METADATA,
) -> Plan:
    """The ordered fallback plan for a call to `requested` (see the module docstring).

    `serves(service)` says whether a service can serve the call's method (the invoker passes
    `lambda s: method in adapters[s.protocol].methods`); `usable(name)` whether the service
    has an endpoint that is not blocked now; `metadata` maps service names to their metadata.
    """
    svc = services.get(requested)
    if svc is None:
        return Plan((Step(StepKind.UNAVAILABLE, source="unavailable", reason=f"unknown service {requested!r}"),))
    p = _Planner(services, settings, svc.category, serves, usable, metadata)
    p.consider(requested, "requested")
    p.follow(requested, 1)
    if svc.category == "llm":
        for local in _local_models(services, settings, metadata):
            if local not in p.seen:
                p.consider(local, "local_model")
    p.steps.append(_terminal(svc, settings, metadata.get(requested, _EMPTY), p.skipped))
    return Plan(tuple(p.steps), tuple(p.skipped))


def _local_models(services: Mapping[str, ServiceView], settings: FallbackSettings,
                  metadata: Mapping[str, Mapping[str, str]]) -> list[str]:
    local = [s for s in services.values()
             if is_local_model(s, metadata.get(s.name, _EMPTY), settings.local_capability)]
    return [s.name for s in sorted(local, key=lambda s: (-s.priority, s.name))]


def _terminal(svc: ServiceView, settings: FallbackSettings, metadata: Mapping[str, str],
              skipped: list[tuple[str, str]]) -> Step:
    preset = metadata.get("preset_response")
    if preset:
        return Step(StepKind.PRESET, source="preset", body=preset, reason="the service's preset response")
    text = settings.preset_responses.get(svc.category)
    if text:
        return Step(StepKind.PRESET, source="preset", body=text, reason=f"the {svc.category} preset response",
                    shaped=True)
    if svc.category in settings.queue_for_later:
        return Step(StepKind.QUEUE_FOR_LATER, source="queue_for_later", reason=f"{svc.category} calls can be queued")
    why = "; ".join(f"{name}: {reason}" for name, reason in skipped)
    return Step(StepKind.UNAVAILABLE, source="unavailable",
                reason=f"no service left for {svc.name!r}" + (f" ({why})" if why else ""))
