"""The control plane's registry model: frozen dataclasses, and the one place defaults live.

Everything here is pure data. The YAML loader (`config.py`) and the Admin API both produce
these objects; the store persists them; the snapshot builder turns them into what agents get.
Units are in the field names: `_s` seconds, `_bytes` bytes, costs in USD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Category(str, Enum):
    """The seed's ServiceCategory. Values are the names used in config and snapshots."""

    LLM = "llm"
    DOCUMENT = "document"
    KNOWLEDGE_GRAPH = "knowledge_graph"
    VECTOR_DB = "vector_db"
    EMBEDDING = "embedding"


#: Adapter protocols the control plane accepts in a service definition. Whether an agent
#: implements one is the agent's business (it serves what it can and says what it cannot).
PROTOCOLS = frozenset(
    {"openai", "anthropic", "unstructured", "graphrag", "chroma", "pinecone", "http_json"}
)

#: The seed's ExternalServiceSchedulingStrategy values.
STRATEGIES = frozenset(
    {"round_robin", "least_loaded", "weighted", "priority", "cost_optimized", "latency", "intelligent"}
)

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
    """USD prices. Per-direction prices, when non-zero, override `cost_per_1k_tokens`."""

    cost_per_1k_tokens: float = 0.0
    input_cost_per_1k_tokens: float = 0.0
    output_cost_per_1k_tokens: float = 0.0
    cost_per_request: float = 0.0


@dataclass(frozen=True)
class EndpointSpec:
    """One instance of a service. `id` is unique within the service."""

    id: str
    url: str
    weight: int = 1
    priority: int = 0
    max_concurrency: int = 0  # 0 = unlimited


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


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    backoff_strategy: str = "exponential"
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0


@dataclass(frozen=True)
class CircuitBreakerSettings:
    failure_threshold: int = 5


@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = True
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


@dataclass(frozen=True)
class ServiceDiscoverySettings:
    cache_ttl_s: float = 300.0
    health_check_interval_s: float = 30.0
    failover_threshold: int = 3


@dataclass(frozen=True)
class ResourceAllocationSettings:
    default_cpu: float = 2.0
    default_memory_bytes: int = 4 * 1024**3
    max_concurrent_tasks: int = 100


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


@dataclass(frozen=True)
class RegistryState:
    """The whole registry: services sorted by name, and settings."""

    services: tuple[ServiceSpec, ...] = ()
    settings: Settings = field(default_factory=Settings)

    def service(self, name: str) -> ServiceSpec | None:
        for spec in self.services:
            if spec.name == name:
                return spec
        return None
