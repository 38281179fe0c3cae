"""The agent's whole view of the world: one immutable object, swapped in one assignment.

Request handling reads `Holder.current` once per request and never locks; applying a new
snapshot builds a complete new `AgentSnapshot` first and only then replaces the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from switchgear.adapters.base import ResponseLimits, TokenUsage
from switchgear.dataplane.governance import Governance

#: Capabilities a call's payload can show it needs (scheduling/model.py `inferred`), looked for
#: only in calls to a service some of whose targets offer them.
INFERABLE = frozenset({"vision", "tools", "json_schema"})

CATEGORIES = ("llm", "document", "knowledge_graph", "vector_db", "embedding")


@dataclass(frozen=True)
class SecretRef:
    env: str = ""
    file: str = ""

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"


@dataclass(frozen=True)
class Pricing:
    """USD. Per-direction prices, when non-zero, override `cost_per_1k_tokens`; the prompt-cache
    prices, when non-zero, override the input price for cache reads and cache writes."""

    cost_per_1k_tokens: float = 0.0
    input_cost_per_1k_tokens: float = 0.0
    output_cost_per_1k_tokens: float = 0.0
    cost_per_request: float = 0.0
    cache_read_input_cost_per_1k_tokens: float = 0.0
    cache_write_input_cost_per_1k_tokens: float = 0.0
    web_search_cost_per_1k_requests: float = 0.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD for one call with no prompt-cache use: request price plus tokens at the
        per-direction (or flat) price. What routing estimates with."""
        in_price = self.input_cost_per_1k_tokens or self.cost_per_1k_tokens
        out_price = self.output_cost_per_1k_tokens or self.cost_per_1k_tokens
        return self.cost_per_request + (input_tokens * in_price + output_tokens * out_price) / 1000.0

    def charge(self, usage: TokenUsage) -> float:
        """USD for a finished call: request price + uncached input × input price + cache reads ×
        cache-read price + cache writes × cache-write price + output × output price (per 1k
        tokens; an unset cache price is the input price) + web searches × the search price (per
        1k searches). Reasoning tokens are output tokens."""
        in_price = self.input_cost_per_1k_tokens or self.cost_per_1k_tokens
        read_price = self.cache_read_input_cost_per_1k_tokens or in_price
        write_price = self.cache_write_input_cost_per_1k_tokens or in_price
        out_price = self.output_cost_per_1k_tokens or self.cost_per_1k_tokens
        tokens = (usage.uncached_input_tokens * in_price + usage.cache_read_input_tokens * read_price
                  + usage.cache_write_input_tokens * write_price + usage.output_tokens * out_price)
        searches = usage.web_search_requests * self.web_search_cost_per_1k_requests
        return self.cost_per_request + (tokens + searches) / 1000.0


@dataclass(frozen=True)
class EndpointView:
    """What routing sees of one endpoint (STYLE: a narrow view of a backend)."""

    id: str
    url: str
    weight: int = 1
    priority: int = 0
    health: str = "healthy"
    max_concurrency: int = 0
    # A route target's own settings; "" / None / 0 = as the service (common.proto Endpoint).
    protocol: str = ""
    api_key: SecretRef | None = None
    model: str = ""
    pricing: Pricing | None = None
    max_tokens: int = 0
    rpm_limit: int = 0
    tpm_limit: int = 0
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    provider: str = ""
    source_service: str = ""
    context_window: int = 0  # tokens; 0 = the service's
    capabilities: tuple[str, ...] = ()  # () = the service's


@dataclass(frozen=True)
class TargetView:
    """What one attempt on an endpoint uses: the route target's settings with the service's
    filling what it leaves unset (target field > service field). Built once per snapshot
    (dataplane/convert.py), looked up per attempt."""

    protocol: str
    api_key: SecretRef | None
    model: str
    max_tokens: int
    pricing: Pricing
    options: Any
    limits: ResponseLimits
    provider: str = ""
    rpm_limit: int = 0  # per agent, per minute (dataplane/target_limits.py); 0 = none
    tpm_limit: int = 0
    # What a request may require of this target (its own capabilities, else its service's), and its model's
    # context window in tokens (0 = unknown): the scheduler's hard filters read both.
    capabilities: frozenset[str] = frozenset()
    context_window: int = 0


@dataclass(frozen=True)
class ServiceView:
    """One service as the agent serves it. `options` is the adapter's parsed options;
    `unsupported` says why this agent cannot serve it ("" when it can)."""

    name: str
    category: str
    protocol: str
    endpoints: tuple[EndpointView, ...]
    api_key: SecretRef | None = None
    model: str = ""
    max_tokens: int = 0
    pricing: Pricing = field(default_factory=Pricing)
    capabilities: tuple[str, ...] = ()
    priority: int = 0
    strategy: str = ""
    timeout_s: float = 0.0
    options: Any = None
    fallbacks: tuple[str, ...] = ()
    unsupported: str = ""
    # Descriptive facts from the config; also per-service switches such as "cache.ttl" (s)
    # and "cache.shared" ("true": one cache entry for every tenant).
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Caps on an upstream answer, from the options every protocol accepts (max_response_bytes...).
    limits: ResponseLimits = field(default_factory=ResponseLimits)
    # Endpoint id -> its effective target; an endpoint not here is served as the service.
    targets: Mapping[str, TargetView] = field(default_factory=lambda: MappingProxyType({}))
    context_window: int = 0  # tokens; 0 = unknown

    @functools.cached_property
    def offered(self) -> frozenset[str]:
        """Every capability some target offers (a category route's: the union over its members;
        a plain service's: its own). A call requiring one outside it has no candidate at all.
        Worked out once per view (a frozen dataclass without slots may cache in its __dict__)."""
        return frozenset().union(*self.capability_sets)

    @functools.cached_property
    def capability_sets(self) -> frozenset[frozenset[str]]:
        """The distinct capability sets of its targets (few: one per member service of a route):
        a call requiring `need` has a candidate only if `need` is within one of them."""
        if not self.endpoints:
            return frozenset({frozenset(self.capabilities)})
        return frozenset(self.target(e).capabilities for e in self.endpoints)

    @functools.cached_property
    def inferable(self) -> frozenset[str]:
        """The capabilities its targets offer that a call's payload can show it needs ("vision",
        "tools", "json_schema": scheduling/model.py `inferred`); empty for most services, so
        their calls are not looked into."""
        return self.offered & INFERABLE

    @functools.cached_property
    def context_bound(self) -> int:
        """The largest context window of its targets when every target has one (tokens), else 0:
        only then can a call be too long for all of them."""
        windows = [self.target(e).context_window for e in self.endpoints]
        return max(windows) if windows and all(windows) else 0

    def target(self, endpoint: EndpointView) -> TargetView:
        """The effective target of one of this service's endpoints (precomputed per snapshot;
        built here only for a view made without targets, as tests do)."""
        found = self.targets.get(endpoint.id)
        return found if found is not None else self.resolve(endpoint)

    def resolve(self, e: EndpointView, own: tuple[Any, ResponseLimits] | None = None) -> TargetView:
        """Target field > service field, for one endpoint; `own`: the target's own parsed adapter
        options and answer limits, when it sets options (else the service's)."""
        options, limits = own if own is not None else (self.options, self.limits)
        return TargetView(
            protocol=e.protocol or self.protocol,
            api_key=e.api_key if e.api_key is not None else self.api_key,
            model=e.model or self.model,
            max_tokens=e.max_tokens or self.max_tokens,
            pricing=e.pricing if e.pricing is not None else self.pricing,
            options=options, limits=limits, provider=e.provider, rpm_limit=e.rpm_limit, tpm_limit=e.tpm_limit,
            capabilities=frozenset(e.capabilities or self.capabilities),
            context_window=e.context_window or self.context_window,
        )


@dataclass(frozen=True)
class RetrySettings:
    """The config's retry_policy; a delay of 0 is "not set" (the category's default applies:
    resilience/backoff.py::policy_for)."""

    max_retries: int = 3
    backoff_strategy: str = "exponential"
    base_delay_s: float = 0.0
    max_delay_s: float = 0.0


@dataclass(frozen=True)
class SchedulingPolicy:
    """One category's entry of the config's scheduling_policies. 0 means no bound; USD, s."""

    strategy: str = ""
    max_cost_per_request: float = 0.0
    min_success_rate: float = 0.0
    max_queue_size: int = 0
    timeout_s: float = 0.0
    # Adaptive attempt timeouts and hedging (resilience/timeouts.py, hedging.py); 0 = the
    # category's built-in default. hedge_min_priority 11 turns hedging off.
    attempt_timeout_floor_s: float = 0.0
    attempt_timeout_ceiling_s: float = 0.0
    attempt_timeout_factor: float = 0.0
    hedge_min_priority: int = 0
    # Load shifting (scheduling/shift.py): a target above `overload_threshold` utilisation sheds
    # its share to targets below `underload_threshold`; 0 = the seed's 0.8 / 0.6.
    overload_threshold: float = 0.0
    underload_threshold: float = 0.0
    # Whole-answer chat calls streamed from the upstream and assembled (dataplane/assemble.py):
    # the first token tells a live provider from a hung one long before the whole answer would.
    stream_upstream: bool = False


@dataclass(frozen=True)
class AgentSettings:
    default_strategy: str = "intelligent"
    default_timeout_s: float = 30.0
    retry: RetrySettings = field(default_factory=RetrySettings)
    breaker_failure_threshold: int = 5
    # Keyed by category ("llm", "document", ...); see dataplane/scheduling/policy.py.
    category_policies: Mapping[str, SchedulingPolicy] = field(default_factory=lambda: MappingProxyType({}))
    cache_enabled: bool = False
    # TTL kind ("llm_responses", "document_parsing", "embeddings", ...) -> seconds.
    cache_ttl_s: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    # Category -> the preset answer's text when a call's whole fallback chain failed
    # (communication.fallback.preset_responses; resilience/fallback.py, dataplane/presets.py).
    preset_responses: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # service_discovery.cache_ttl: how long health verdicts outlive the control plane (client.py).
    discovery_cache_ttl_s: float = 0.0


@dataclass(frozen=True)
class AgentSnapshot:
    version: str
    services: Mapping[str, ServiceView] = field(default_factory=lambda: MappingProxyType({}))
    settings: AgentSettings = field(default_factory=AgentSettings)
    governance: Governance = field(default_factory=Governance)


#: Health verdicts only a live control plane can keep true (an operator's "draining" stays).
HEALTH_VERDICTS = frozenset({"degraded", "ejected"})
#: Appended to the version of a snapshot whose health verdicts expired: the agent holds what no
#: control plane sent, so on reconnecting it asks for the current snapshot whatever its version.
EXPIRED_SUFFIX = "~health-expired"


def without_health_verdicts(snapshot: AgentSnapshot) -> AgentSnapshot:
    """`snapshot` with every degraded or ejected endpoint healthy again (the cache_ttl rule)."""
    def fresh(service: ServiceView) -> ServiceView:
        if not any(e.health in HEALTH_VERDICTS for e in service.endpoints):
            return service
        endpoints = tuple(replace(e, health="healthy") if e.health in HEALTH_VERDICTS else e
                          for e in service.endpoints)
        return replace(service, endpoints=endpoints)

    services = MappingProxyType({name: fresh(s) for name, s in snapshot.services.items()})
    version = snapshot.version if snapshot.version.endswith(EXPIRED_SUFFIX) else snapshot.version + EXPIRED_SUFFIX
    return replace(snapshot, version=version, services=services)


class Holder:
    """The reference to the current snapshot. `current` is None until the first one applies."""

    def __init__(self) -> None:
        self.current: AgentSnapshot | None = None

    @property
    def version(self) -> str:
        return self.current.version if self.current else ""
