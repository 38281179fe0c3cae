"""The control plane's registry model: frozen dataclasses, and the one place defaults live.

Everything here is pure data. The YAML loader (the `config` package) and the Admin API both produce
these objects; the store persists them; the snapshot builder turns them into what agents get.
Units are in the field names: `_s` seconds, `_bytes` bytes, costs in USD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType


class Category(str, Enum):
    """The seed's ServiceCategory. Values are the names used in config and snapshots."""

    LLM = "llm"
    DOCUMENT = "document"
    KNOWLEDGE_GRAPH = "knowledge_graph"
    VECTOR_DB = "vector_db"
    EMBEDDING = "embedding"


#: Categories whose name is a route over their services, which agents derive from each snapshot
#: (dataplane/convert.py `category_routes`; wire/checks.py holds the same names): their calls
#: are interchangeable across services. A category route needs at least ROUTE_MIN_SERVICES.
ROUTE_CATEGORIES = (Category.LLM, Category.EMBEDDING)
ROUTE_MIN_SERVICES = 2
#: The one category whose whole-answer calls may be streamed from their upstream (policy key
#: `stream_upstream`: chat completions, dataplane/assemble.py); why any other is refused.
STREAM_UPSTREAM_CATEGORY = Category.LLM.value
STREAM_UPSTREAM_ONLY = ("only llm calls can be streamed from their upstream (chat completions); "
                        "other categories' answers have no first token")

#: Adapter protocols the control plane accepts in a service definition. Whether an agent
#: implements one is the agent's business (it serves what it can and says what it cannot).
PROTOCOLS = frozenset(
    {"openai", "anthropic", "unstructured", "graphrag", "chroma", "pinecone", "http_json"}
)

#: Protocols whose answers never carry token usage (vector databases: their adapters report
#: none), so a token price or a tokens-per-minute limit on them would load and never apply;
#: they are priced with cost_per_request.
TOKENLESS_PROTOCOLS = frozenset({"chroma", "pinecone"})

#: The seed's ExternalServiceSchedulingStrategy values.
STRATEGIES = frozenset(
    {"round_robin", "least_loaded", "weighted", "priority", "cost_optimized", "latency", "intelligent"}
)

#: The other names the seed gives the same strategies: its LoadBalancingStrategy enum
#: (weighted_round_robin, least_connections, least_response_time) and what its
#: `_get_scheduling_strategy` returns (latency_optimized, weighted_round_robin). A config or a
#: registration may use them; they are stored, served and printed as the name they stand for.
STRATEGY_ALIASES = MappingProxyType({
    "weighted_round_robin": "weighted",
    "least_connections": "least_loaded",
    "least_response_time": "latency",
    "latency_optimized": "latency",
})


def canonical_strategy(name: str) -> str:
    """The STRATEGIES name `name` stands for (itself when it is not a seed alias)."""
    return STRATEGY_ALIASES.get(name, name)


BACKOFF_STRATEGIES = frozenset({"exponential", "linear", "fixed"})


@dataclass(frozen=True)
class SecretRef:
    """Where an agent finds a secret: exactly one of `env` (a variable name) or `file` (a path)."""

    env: str = ""
    file: str = ""

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"


@dataclass(frozen=True)
class Pricing:
    """USD prices. Per-direction prices, when non-zero, override `cost_per_1k_tokens`; the
    prompt-cache prices, when non-zero, override the input price for cache reads and writes."""

    cost_per_1k_tokens: float = 0.0
    input_cost_per_1k_tokens: float = 0.0
    output_cost_per_1k_tokens: float = 0.0
    cost_per_request: float = 0.0
    cache_read_input_cost_per_1k_tokens: float = 0.0
    cache_write_input_cost_per_1k_tokens: float = 0.0
    web_search_cost_per_1k_requests: float = 0.0  # per 1,000 searches the provider ran (server tools)


@dataclass(frozen=True)
class EndpointSpec:
    """One instance of a service. `id` is unique within the service."""

    id: str
    url: str
    weight: int = 1
    priority: int = 0
    max_concurrency: int = 0  # 0 = unlimited
    # A route target's own settings (docs/concepts/routes.md): each, when set, overrides the
    # service's field for calls this endpoint serves; ""/None/0/() = as the service.
    protocol: str = ""
    api_key: SecretRef | None = None
    model: str = ""
    pricing: Pricing | None = None  # replaces the service's pricing as a whole
    max_tokens: int = 0
    options_json: str = ""  # a canonical JSON object; replaces the service's options
    rpm_limit: int = 0
    tpm_limit: int = 0
    tags: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs
    provider: str = ""
    source_service: str = ""  # set on a category route's targets: the service they came from
    context_window: int = 0  # tokens; 0 = the service's
    capabilities: tuple[str, ...] = ()  # replaces the service's when non-empty


#: Endpoint ids of managed replicas start with this (the container manager owns them).
MANAGED_ENDPOINT_PREFIX = "replica-"
MANAGED_BACKENDS = frozenset({"process", "docker"})


@dataclass(frozen=True)
class ManagedSpec:
    """A model server Switchgear runs itself (`managed:` on a service; docs/container-manager.md).

    `command` is argv; "${PORT}" in it, in `env` values and in `url` is the port the agent
    assigns (or `port` when non-zero), "${HOST}" the agent's --managed-host. `url` is how the
    replica is called ("" = http://${HOST}:${PORT}/v1); readiness is a GET of `readiness_path` on that host ("" = the
    protocol's own health call, `<url>/models`). Utilisation = in-flight calls over
    replicas x `concurrency`; scaling needs `concurrency` when max > min.
    """

    command: tuple[str, ...] = ()  # docker: "" = the image's own command
    backend: str = "process"
    image: str = ""  # docker: an image already present on the agent's host (never pulled)
    volumes: tuple[str, ...] = ()  # docker: "HOST:CONTAINER[:ro]" bind mounts
    env: tuple[tuple[str, str], ...] = ()
    inherit_env: tuple[str, ...] = ()
    port: int = 0
    url: str = ""
    readiness_path: str = ""
    readiness_timeout_s: float = 60.0
    cpu: float = 1.0
    memory_bytes: int = 0
    gpu: float = 0.0
    min_replicas: int = 1
    max_replicas: int = 1
    concurrency: int = 0
    scale_up_utilization: float = 0.8
    scale_down_utilization: float = 0.6
    scale_up_window_s: float = 30.0
    scale_down_window_s: float = 120.0
    restart_backoff_s: float = 1.0
    restart_max_backoff_s: float = 30.0
    max_crashes: int = 5
    crash_window_s: float = 300.0
    stop_grace_s: float = 10.0
    drain_timeout_s: float = 30.0
    log_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class ServiceSpec:
    """A named external service. Tuples keep it immutable and hashable-friendly.

    `metadata` holds descriptive facts as sorted (key, value) pairs; `options_json` is a
    canonical JSON object of adapter options that only the agent's adapter interprets.
    """

    name: str
    category: Category
    protocol: str
    endpoints: tuple[EndpointSpec, ...]
    api_key: SecretRef | None = None
    model: str = ""
    max_tokens: int = 0
    pricing: Pricing = field(default_factory=Pricing)
    capabilities: tuple[str, ...] = ()
    priority: int = 0
    strategy: str = ""  # "" = the category policy's strategy, else the default strategy
    timeout_s: float = 0.0  # 0 = the default timeout
    options_json: str = "{}"
    metadata: tuple[tuple[str, str], ...] = ()
    fallbacks: tuple[str, ...] = ()
    managed: ManagedSpec | None = None  # replicas become endpoints once ready (container manager)
    # The model's context window in tokens (prompt + asked output); 0 = unknown (never filtered).
    context_window: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    """communication.retry_policy. A delay of 0 means "not set": agents then use the call's
    category's interactive default (wire/attempt_policy.py: BACKOFF_DEFAULTS, e.g. llm 0.2..2 s).
    The config refuses an explicit 0, so 0 only ever means the key was left out."""

    max_retries: int = 3
    backoff_strategy: str = "exponential"
    base_delay_s: float = 0.0
    max_delay_s: float = 0.0


@dataclass(frozen=True)
class CircuitBreakerSettings:
    failure_threshold: int = 5


#: The kinds `communication.caching.ttl` may set: the seed's three. Agents apply llm_responses to
#: llm calls, document_parsing to document calls, embeddings to embedding calls
#: (dataplane/cache.py TTL_KIND_BY_CATEGORY; tests keep the two the same). Another name would be
#: stored and never used, so the config loader refuses it (settings come only from a config;
#: validate_state does not check it, so a store written before the rule still loads).
CACHE_TTL_KINDS = ("document_parsing", "embeddings", "llm_responses")


@dataclass(frozen=True)
class CacheSettings:
    # Off unless a config turns it on (the seed's does): answers of services registered
    # without a config are never served from a cache the operator did not ask for.
    enabled: bool = False
    # Sorted (kind, ttl seconds) pairs; the seed's three kinds by default.
    ttl_s: tuple[tuple[str, float], ...] = (
        ("document_parsing", 86400.0),
        ("embeddings", 604800.0),
        ("llm_responses", 3600.0),
    )


@dataclass(frozen=True)
class CategoryPolicy:
    """The seed's scheduling_policies entry. Zero means "no bound" for every numeric field."""

    strategy: str = ""
    max_cost_per_request: float = 0.0
    min_success_rate: float = 0.0
    max_queue_size: int = 0
    timeout_s: float = 0.0
    # Adaptive attempt timeouts and hedging (dataplane/resilience/timeouts.py, hedging.py):
    # 0 = the category's built-in default; hedge_min_priority 11 = never hedge.
    attempt_timeout_floor_s: float = 0.0
    attempt_timeout_ceiling_s: float = 0.0
    attempt_timeout_factor: float = 0.0
    hedge_min_priority: int = 0
    # Load shifting (dataplane/scheduling/shift.py): fractions of capacity; 0 = 0.8 / 0.6.
    overload_threshold: float = 0.0
    underload_threshold: float = 0.0
    # Whole-answer LLM calls streamed from the upstream and assembled (dataplane/assemble.py), so
    # a hung provider is told by its missing first token; llm only, off by default.
    stream_upstream: bool = False


@dataclass(frozen=True)
class ServiceDiscoverySettings:
    cache_ttl_s: float = 300.0
    health_check_interval_s: float = 30.0
    failover_threshold: int = 3


@dataclass(frozen=True)
class ResourceAllocationSettings:
    """coordination.resource_allocation. `default_cpu` / `default_memory_bytes` are the per-task
    request of a task whose category has no row of its own in the seed's requirements table
    (knowledge_graph, vector_db, embedding; tasks/allocator.py) — not an agent's capacity.
    Defaults: the seed's `else` row, 1 CPU and 2 GiB.

    What the task store may hold (tasks/store.py, enforced by tasks/scheduler.py):
    `task_retention_s` — a final task (succeeded, failed, cancelled, dead-lettered) and its
    attempt rows are deleted this long after it finished, and an uploaded blob this long after
    its last upload unless an unfinished task names it; never 0 (that store would only grow).
    Per tenant (a tenant's key submitting or uploading, or a call of the tenant deferred to the
    queue; operators are not limited), 0 = no limit: `max_tasks_per_tenant` unfinished tasks
    (queued, leased, running), `max_blobs_per_tenant` blobs and `max_blob_bytes_per_tenant`
    bytes of blobs (a blob two tenants uploaded counts for each); and `max_finished_tasks_per_tenant`
    finished tasks kept within the retention (the purge deletes a tenant's oldest beyond it: a
    tenant cancelling and resubmitting would otherwise fill the store within the retention)."""

    default_cpu: float = 1.0
    default_memory_bytes: int = 2 * 1024**3
    max_concurrent_tasks: int = 100
    task_retention_s: float = 7 * 86400.0
    max_tasks_per_tenant: int = 10_000
    max_blobs_per_tenant: int = 10_000
    max_blob_bytes_per_tenant: int = 1024**3
    max_finished_tasks_per_tenant: int = 100_000


@dataclass(frozen=True)
class AlertRuleSpec:
    """One alert rule (the seed's ALERT_RULES entry); alerts.py gives it meaning."""

    name: str
    condition: str  # "<metric> <op> <number>", e.g. "error_rate > 0.05"
    severity: str = "warning"
    action: str = ""
    for_s: float = 0.0  # the condition must hold this long before firing
    clear_for_s: float = 30.0  # and be clear (with hysteresis) this long before recovering
    hysteresis: float = 0.2
    min_requests: int = 10  # fewer attempts in the window: no evidence either way


@dataclass(frozen=True)
class MonitoringSettings:
    """external_services.monitoring: load reports, health scoring windows, alert rules."""

    report_interval_s: float = 2.0
    health_window_s: float = 30.0
    alert_window_s: float = 60.0
    health_debounce_s: float = 1.0  # at most one health-driven snapshot version per this
    breaker_threshold: int = 2  # failure_threshold while enable_circuit_breaker is active
    alert_rules: tuple[AlertRuleSpec, ...] = (
        AlertRuleSpec("high_error_rate", "error_rate > 0.05", "warning", "enable_circuit_breaker"),
        AlertRuleSpec("high_response_time", "avg_response_time > 10000", "warning", "switch_to_faster_service"),
        AlertRuleSpec("high_cost", "cost_per_hour > 100", "critical", "switch_to_cheaper_service"),
        AlertRuleSpec("service_unavailable", "success_rate < 0.9", "critical", "enable_failover"),
    )


#: The seed's answer when every LLM service failed (`_llm_fallback`'s "preset_response").
SEED_LLM_PRESET = "Service temporarily unavailable. Please try again later."


@dataclass(frozen=True)
class FallbackConfig:
    """communication.fallback. `preset_responses`: sorted (category, text) pairs — the answer
    a call of that category gets when its whole fallback chain failed, as the seed's
    `_handle_fallback` does; the agent shapes the text as the call's method answers (a chat
    completion for chat.completions). "" = no preset for that category. A service's metadata
    `preset_response` (an exact body) comes first."""

    preset_responses: tuple[tuple[str, str], ...] = (("llm", SEED_LLM_PRESET),)


@dataclass(frozen=True)
class Settings:
    """Everything in the config besides the services."""

    default_strategy: str = "intelligent"
    health_check_timeout_s: float = 5.0
    default_timeout_s: float = 30.0
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    circuit_breaker: CircuitBreakerSettings = field(default_factory=CircuitBreakerSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    # Sorted (category value, policy) pairs.
    category_policies: tuple[tuple[str, CategoryPolicy], ...] = ()
    service_discovery: ServiceDiscoverySettings = field(default_factory=ServiceDiscoverySettings)
    resource_allocation: ResourceAllocationSettings = field(
        default_factory=ResourceAllocationSettings
    )
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)


class UserType(str, Enum):
    """The seed's user types: premium requests weigh performance over cost when scored."""

    STANDARD = "standard"
    PREMIUM = "premium"


@dataclass(frozen=True)
class ServiceQuota:
    """A tenant's limits on one service. Zero means "no limit" for every field."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    budget_per_hour_usd: float = 0.0
    budget_per_day_usd: float = 0.0


@dataclass(frozen=True)
class TenantPolicy:
    """What a tenant may do. Zero or empty means "no restriction" for every field."""

    allowed_services: tuple[str, ...] = ()
    allowed_categories: tuple[Category, ...] = ()
    required_capabilities: tuple[str, ...] = ()
    max_cost_per_request: float = 0.0
    min_success_rate: float = 0.0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    budget_per_hour_usd: float = 0.0
    budget_per_day_usd: float = 0.0
    priority_cap: int = 0  # 1..10; 0 = no cap
    max_in_flight: int = 0  # calls in flight per agent; 0 = no cap
    # The task store's per-tenant quotas over resource_allocation's; 0 = that default.
    max_unfinished_tasks: int = 0
    max_blobs: int = 0
    max_blob_bytes: int = 0
    # Sorted (service name, quota) pairs.
    services: tuple[tuple[str, ServiceQuota], ...] = ()


@dataclass(frozen=True)
class Tenant:
    id: str
    display_name: str = ""
    user_type: UserType = UserType.STANDARD
    policy: TenantPolicy = field(default_factory=TenantPolicy)
    created_at: float = 0.0  # wall-clock seconds


@dataclass(frozen=True)
class ApiKey:
    """A client key as stored: its public id and the SHA-256 of the whole key, never the key."""

    id: str
    tenant: str
    sha256: str  # hex
    description: str = ""
    created_at: float = 0.0
    revoked_at: float = 0.0  # 0 = live

    @property
    def live(self) -> bool:
        return self.revoked_at == 0.0


@dataclass(frozen=True)
class RegistryState:
    """The whole registry: services sorted by name, settings, tenants and their keys (sorted by id)."""

    services: tuple[ServiceSpec, ...] = ()
    settings: Settings = field(default_factory=Settings)
    tenants: tuple[Tenant, ...] = ()
    keys: tuple[ApiKey, ...] = ()

    def service(self, name: str) -> ServiceSpec | None:
        for spec in self.services:
            if spec.name == name:
                return spec
        return None

    def tenant(self, tenant_id: str) -> Tenant | None:
        for tenant in self.tenants:
            if tenant.id == tenant_id:
                return tenant
        return None

    def key(self, key_id: str) -> ApiKey | None:
        for key in self.keys:
            if key.id == key_id:
                return key
        return None
