"""Pure validation of the registry model: every rule a service or the settings must obey.

Nothing here parses or defaults; it looks at finished `model` objects (from the YAML loader
or the Admin API) and returns `Problem`s. Paths are model paths: relative to a service
("endpoints[1].url"), to the settings ("retry_policy.max_retries"), or — from
`validate_state` — to the whole state ("services[gpt-4].fallbacks[0]", "settings.cache...").

Messages never echo free-form values (URLs, strategy and protocol names): a URL may carry
credentials, and a value may have come from an environment variable the file only names.
Identifiers (service names, endpoint ids, category and metadata keys) are echoed.
"""

from __future__ import annotations

import functools
import json
import math
import re
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from switchgear.controlplane.model import (
    BACKOFF_STRATEGIES,
    MANAGED_BACKENDS,
    PROTOCOLS,
    ROUTE_CATEGORIES,
    ROUTE_MIN_SERVICES,
    STRATEGIES,
    STREAM_UPSTREAM_CATEGORY,
    STREAM_UPSTREAM_ONLY,
    TOKENLESS_PROTOCOLS,
    ApiKey,
    Category,
    CategoryPolicy,
    EndpointSpec,
    ManagedSpec,
    Pricing,
    RegistryState,
    SecretRef,
    ServiceSpec,
    Settings,
    Tenant,
)
from switchgear.controlplane.tasks.allocator import OVERRIDE_KEYS, AllocationError, requirements
from switchgear.wire.names import CAPABILITY_NAME, CAPABILITY_RULE

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_WEIGHT = 10_000
MAX_RETRIES = 10
MAX_TAGS = 32
MAX_TAG_CHARS = 256
#: The longest preset response (characters): an answer, not a document.
MAX_PRESET_CHARS = 16_384


@dataclass(frozen=True)
class Problem:
    """One thing wrong, at a key path (model path here; YAML path once the config loader maps it)."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where = f"{where} (line {self.line})" if where else f"line {self.line}"
        return f"{where}: {self.message}" if where else self.message

    def under(self, prefix: str) -> Problem:
        """The same problem with `prefix` put in front of its path."""
        path = f"{prefix}.{self.path}" if self.path else prefix
        return replace(self, path=path)


class ValidationError(ValueError):
    """A state that breaks rules. `problems` lists them all; str() gives one per line."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --- number checks: each returns a message, or None when the value is fine -----------------

_Check = Callable[[float], str | None]
_T = TypeVar("_T")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _non_negative(value: float) -> str | None:
    """value >= 0 and finite."""
    return None if math.isfinite(value) and value >= 0 else "must be a finite number >= 0"


def _positive(value: float) -> str | None:
    """value > 0 and finite."""
    return None if math.isfinite(value) and value > 0 else "must be a finite number > 0"


def _retention(value: float) -> str | None:
    """At least a minute and finite: retention is how long finished tasks stay readable, and
    there is no "keep forever" (a store any tenant adds to would grow without end)."""
    if math.isfinite(value) and value >= 60:
        return None
    return "must be at least 60 s (there is no 'keep forever': finished tasks would fill the store)"


def _integer_between(low: int, high: int | None = None) -> _Check:
    """An integer in [low, high] (no upper bound when high is None)."""
    wanted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def check(value: float) -> str | None:
        ok = isinstance(value, int) and value >= low and (high is None or value <= high)
        return None if ok else f"must be {wanted}"

    return check


def _fraction(value: float) -> str | None:
    """0 <= value <= 1."""
    return None if 0.0 <= value <= 1.0 else "must be between 0 and 1"


def _any_integer(value: float) -> str | None:
    """Any integer (priorities may be negative)."""
    return None if isinstance(value, int) else "must be an integer"


def _check_numbers(
    subject: _T, rows: Iterable[tuple[str, Callable[[_T], object], _Check]]
) -> Iterator[Problem]:
    """Apply a table of (path, getter, check) rows; a non-number is always a problem."""
    for path, get, check in rows:
        value = get(subject)
        if not _is_number(value):
            yield Problem(path, "must be a number")
            continue
        assert isinstance(value, (int, float))
        message = check(value)
        if message:
            yield Problem(path, message)


# --- services -------------------------------------------------------------------------------

_SERVICE_NUMBERS: tuple[tuple[str, Callable[[ServiceSpec], object], _Check], ...] = (
    ("max_tokens", lambda s: s.max_tokens, _integer_between(0)),
    ("context_window", lambda s: s.context_window, _integer_between(0, 2**32 - 1)),
    ("priority", lambda s: s.priority, _any_integer),
    ("timeout_s", lambda s: s.timeout_s, _non_negative),
    ("pricing.cost_per_1k_tokens", lambda s: s.pricing.cost_per_1k_tokens, _non_negative),
    ("pricing.input_cost_per_1k_tokens", lambda s: s.pricing.input_cost_per_1k_tokens, _non_negative),
    ("pricing.output_cost_per_1k_tokens", lambda s: s.pricing.output_cost_per_1k_tokens, _non_negative),
    ("pricing.cost_per_request", lambda s: s.pricing.cost_per_request, _non_negative),
    ("pricing.cache_read_input_cost_per_1k_tokens", lambda s: s.pricing.cache_read_input_cost_per_1k_tokens,
     _non_negative),
    ("pricing.cache_write_input_cost_per_1k_tokens", lambda s: s.pricing.cache_write_input_cost_per_1k_tokens,
     _non_negative),
    ("pricing.web_search_cost_per_1k_requests", lambda s: s.pricing.web_search_cost_per_1k_requests, _non_negative),
)

_ENDPOINT_NUMBERS: tuple[tuple[str, Callable[[EndpointSpec], object], _Check], ...] = (
    ("weight", lambda e: e.weight, _integer_between(1, MAX_WEIGHT)),
    ("priority", lambda e: e.priority, _any_integer),
    ("max_concurrency", lambda e: e.max_concurrency, _integer_between(0)),
    ("max_tokens", lambda e: e.max_tokens, _integer_between(0)),
    ("context_window", lambda e: e.context_window, _integer_between(0, 2**32 - 1)),
    ("rpm_limit", lambda e: e.rpm_limit, _integer_between(0, 2**32 - 1)),
    ("tpm_limit", lambda e: e.tpm_limit, _integer_between(0, 2**32 - 1)),
)
_PRICES: tuple[tuple[str, Callable[[Pricing], object], _Check], ...] = (
    ("cost_per_1k_tokens", lambda p: p.cost_per_1k_tokens, _non_negative),
    ("input_cost_per_1k_tokens", lambda p: p.input_cost_per_1k_tokens, _non_negative),
    ("output_cost_per_1k_tokens", lambda p: p.output_cost_per_1k_tokens, _non_negative),
    ("cost_per_request", lambda p: p.cost_per_request, _non_negative),
    ("cache_read_input_cost_per_1k_tokens", lambda p: p.cache_read_input_cost_per_1k_tokens, _non_negative),
    ("cache_write_input_cost_per_1k_tokens", lambda p: p.cache_write_input_cost_per_1k_tokens, _non_negative),
    ("web_search_cost_per_1k_requests", lambda p: p.web_search_cost_per_1k_requests, _non_negative),
)


def _name_problem(name: object) -> str | None:
    """A name starts with a letter or digit, then up to 127 of letters, digits, '.', '_', ':', '-'."""
    if isinstance(name, str) and NAME_RE.match(name):
        return None
    return (
        "must be 1-128 characters of letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
    )


def url_problem(url: object) -> str | None:
    """An endpoint URL is http(s) with a host, and carries no credentials, query or fragment.

    Returns a message that never repeats the URL (it may hold a password).
    """
    if not isinstance(url, str) or not url or any(c.isspace() for c in url):
        return "must be an http:// or https:// URL without spaces"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if "@" in parts.netloc:
        return "must not contain credentials; put secrets in api_key, not the URL"
    if not parts.hostname:
        return "must include a host"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "must not have a query string or fragment"
    return None


def _check_name(spec: ServiceSpec) -> Iterator[Problem]:
    """Service names follow NAME_RE."""
    message = _name_problem(spec.name)
    if message:
        yield Problem("name", message)


def _check_category(spec: ServiceSpec) -> Iterator[Problem]:
    """The category is a Category."""
    if not isinstance(spec.category, Category):
        yield Problem("category", f"must be one of {_listing(c.value for c in Category)}")


def _check_protocol(spec: ServiceSpec) -> Iterator[Problem]:
    """The protocol is one the control plane knows (PROTOCOLS)."""
    if spec.protocol not in PROTOCOLS:
        yield Problem("protocol", f"unknown protocol; expected one of {_listing(PROTOCOLS)}")


def _check_endpoint(endpoint: EndpointSpec) -> Iterator[Problem]:
    """An endpoint has a valid id, a clean http(s) URL, weight 1..10000 and concurrency >= 0."""
    message = _name_problem(endpoint.id)
    if message:
        yield Problem("id", message)
    message = url_problem(endpoint.url)
    if message:
        yield Problem("url", message)
    yield from _check_numbers(endpoint, _ENDPOINT_NUMBERS)
    yield from _check_target(endpoint)


def _check_target(endpoint: EndpointSpec) -> Iterator[Problem]:
    """A route target's own fields: a known protocol, a valid key reference, prices finite and
    >= 0, options a JSON object, tags and provider short names."""
    if endpoint.protocol and endpoint.protocol not in PROTOCOLS:
        yield Problem("protocol", f"unknown protocol; expected one of {_listing(PROTOCOLS)}")
    if endpoint.api_key is not None:
        for problem in secret_problems(endpoint.api_key):
            yield problem.under("api_key")
    if endpoint.pricing is not None:
        for problem in _check_numbers(endpoint.pricing, _PRICES):
            yield problem.under("pricing")
    if endpoint.options_json:
        yield from _json_object_problems(endpoint.options_json)
    if endpoint.provider and _name_problem(endpoint.provider):
        yield Problem("provider", str(_name_problem(endpoint.provider)))
    for key, value in endpoint.tags:
        if _name_problem(key) or len(value) > MAX_TAG_CHARS:
            yield Problem(f"tags[{key[:40]}]",
                          f"tag names follow the name rule; values at most {MAX_TAG_CHARS} characters")
    if len(endpoint.tags) > MAX_TAGS:
        yield Problem("tags", f"at most {MAX_TAGS} tags")


def _check_endpoints(spec: ServiceSpec) -> Iterator[Problem]:
    """At least one endpoint (a managed service gets its replicas'); ids unique; each valid."""
    if not spec.endpoints and spec.managed is None:
        yield Problem("endpoints", "at least one endpoint is required")
    seen: set[str] = set()
    for index, endpoint in enumerate(spec.endpoints):
        if endpoint.id in seen:
            yield Problem(f"endpoints[{index}].id", f"duplicate endpoint id {endpoint.id!r}")
        seen.add(endpoint.id)
        for problem in _check_endpoint(endpoint):
            yield problem.under(f"endpoints[{index}]")


def _check_service_numbers(spec: ServiceSpec) -> Iterator[Problem]:
    """max_tokens >= 0; prices and timeout_s finite and >= 0; priority an integer."""
    yield from _check_numbers(spec, _SERVICE_NUMBERS)


_TOKEN_PRICES = ("cost_per_1k_tokens", "input_cost_per_1k_tokens", "output_cost_per_1k_tokens")


def _token_price_problems(protocol: str, pricing: Pricing | None, path: str) -> Iterator[Problem]:
    if protocol in TOKENLESS_PROTOCOLS and pricing is not None:
        for name in _TOKEN_PRICES:
            value = getattr(pricing, name)
            if _is_number(value) and value > 0:
                yield Problem(f"{path}{name}", f"{protocol} answers carry no token usage, so a token price never "
                              "costs anything: price its calls with cost_per_request")


#: The protocols whose answers report searches the provider ran (usage.server_tool_use).
SEARCH_REPORTING_PROTOCOLS = frozenset({"anthropic"})


def _search_price_problem(protocols: set[str], pricing: Pricing | None, path: str) -> Iterator[Problem]:
    value = pricing.web_search_cost_per_1k_requests if pricing is not None else 0
    if _is_number(value) and value > 0 and not protocols & SEARCH_REPORTING_PROTOCOLS:
        yield Problem(f"{path}web_search_cost_per_1k_requests",
                      f"{'/'.join(sorted(protocols))} answers report no searches, so a search price never costs "
                      "anything (only anthropic answers count them); price a search model's calls with "
                      "cost_per_request")


def _check_tokenless(spec: ServiceSpec) -> Iterator[Problem]:
    """Token prices and tokens-per-minute limits only where answers carry tokens (TOKENLESS_PROTOCOLS);
    a search price only where answers count searches (SEARCH_REPORTING_PROTOCOLS)."""
    yield from _token_price_problems(spec.protocol, spec.pricing, "pricing.")
    served = {endpoint.protocol or spec.protocol for endpoint in spec.endpoints} or {spec.protocol}
    yield from _search_price_problem(served, spec.pricing, "pricing.")
    for index, endpoint in enumerate(spec.endpoints):
        protocol = endpoint.protocol or spec.protocol
        yield from _token_price_problems(protocol, endpoint.pricing, f"endpoints[{index}].pricing.")
        yield from _search_price_problem({protocol}, endpoint.pricing, f"endpoints[{index}].pricing.")
        if protocol in TOKENLESS_PROTOCOLS and endpoint.tpm_limit:
            yield Problem(f"endpoints[{index}].tpm_limit", f"{protocol} answers carry no token usage, so a tokens "
                          "per minute limit never applies: use rpm_limit")


def _check_strategy(spec: ServiceSpec) -> Iterator[Problem]:
    """strategy is "" (use the category's) or one of STRATEGIES."""
    if spec.strategy and spec.strategy not in STRATEGIES:
        yield Problem("strategy", _unknown_strategy(spec.strategy))


def _check_options(spec: ServiceSpec) -> Iterator[Problem]:
    """options_json is a JSON object."""
    yield from _json_object_problems(spec.options_json)


def _json_object_problems(text: str) -> Iterator[Problem]:
    try:
        options = json.loads(text)
    except (TypeError, ValueError):
        yield Problem("options_json", "must be a JSON object")
        return
    if not isinstance(options, dict):
        yield Problem("options_json", "must be a JSON object")


def secret_problems(ref: SecretRef) -> Iterator[Problem]:
    """A SecretRef sets exactly one of env or file; env is a valid variable name."""
    if bool(ref.env) == bool(ref.file):
        yield Problem("", "set exactly one of env or file")
    elif ref.env and not ENV_NAME_RE.match(ref.env):
        yield Problem("env", "must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")


def _check_api_key(spec: ServiceSpec) -> Iterator[Problem]:
    """The api_key, when set, is a valid SecretRef."""
    if spec.api_key is not None:
        for problem in secret_problems(spec.api_key):
            yield problem.under("api_key")


def _check_metadata(spec: ServiceSpec) -> Iterator[Problem]:
    """Metadata keys are non-empty and unique."""
    seen: set[str] = set()
    for index, (key, _value) in enumerate(spec.metadata):
        if not key:
            yield Problem(f"metadata[{index}]", "metadata keys must not be empty")
        elif key in seen:
            yield Problem(f"metadata[{index}]", f"duplicate metadata key {key!r}")
        seen.add(key)


def _number_at_least_0(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value >= 0


#: Metadata keys agents or the control plane read, and what their value must be. Any other key is
#: a descriptive fact (the seed's `processing_time_avg`); one of these with a value its reader
#: would skip is refused, so a setting never loads and then does nothing.
_READ_METADATA: Mapping[str, tuple[Callable[[str], bool], str]] = {
    "cache.ttl": (_number_at_least_0, "must be a number of seconds >= 0 (the service's cache TTL)"),
    "cache.shared": (lambda v: v.lower() in ("true", "false"), "must be true or false"),
    "fallback": (lambda v: v == "local", "must be 'local' (the only value agents read: a local-model fallback)"),
    "max_documents": (str.isdigit, "must be a whole number (the most documents one call may carry)"),
    "max_file_size_bytes": (str.isdigit, "must be a whole number of bytes"),
}


def _check_read_metadata(spec: ServiceSpec) -> Iterator[Problem]:
    """Metadata that has an effect has a value its reader takes: the keys above, the task
    allocator's `resources.*` overrides (one of OVERRIDE_KEYS, a number or, for memory, a size)
    and `max_file_size`, which agents enforce through `max_file_size_bytes` (the loader writes
    both from a document service's own `max_file_size` key)."""
    metadata = dict(spec.metadata)
    for index, (key, value) in enumerate(spec.metadata):
        rule = _READ_METADATA.get(key)
        if rule is not None and not rule[0](value):
            yield Problem(f"metadata[{index}]", f"metadata {key!r} {rule[1]}")
        elif key.startswith("resources."):
            yield from _resource_override(index, key, value, spec.category.value)
        elif key == "max_file_size" and "max_file_size_bytes" not in metadata:
            yield Problem(f"metadata[{index}]", "metadata 'max_file_size' is not enforced from metadata: set it as "
                          "the service's own max_file_size key (it becomes max_file_size_bytes too)")


def _resource_override(index: int, key: str, value: str, category: str) -> Iterator[Problem]:
    if key not in OVERRIDE_KEYS:
        yield Problem(f"metadata[{index}]",
                      f"unknown resources key {key!r}; expected one of {_listing(OVERRIDE_KEYS)}")
        return
    try:
        requirements(category, {key: value})
    except AllocationError:
        what = "a size such as 8Gi or 512Mi" if key == "resources.memory" else "a finite number >= 0"
        yield Problem(f"metadata[{index}]", f"metadata {key!r} must be {what}")


def _check_capabilities(spec: ServiceSpec) -> Iterator[Problem]:
    """Capabilities (a service's, a route target's) are names a request can spell (CAPABILITY_NAME)."""
    yield from _capability_problems(spec.capabilities, "")
    for index, endpoint in enumerate(spec.endpoints):
        yield from _capability_problems(endpoint.capabilities, f"endpoints[{index}].")


def _capability_problems(capabilities: tuple[str, ...], prefix: str) -> Iterator[Problem]:
    for index, capability in enumerate(capabilities):
        if not capability:
            yield Problem(f"{prefix}capabilities[{index}]", "must not be empty")
        elif not isinstance(capability, str) or not CAPABILITY_NAME.fullmatch(capability):
            # a name no request can spell would load and never match (a store written before
            # this rule still loads: the registry refuses only problems a change brings)
            yield Problem(f"{prefix}capabilities[{index}]", f"must be a capability name requests can name, "
                          f"{CAPABILITY_RULE}")


# --- managed model servers (the container manager) -------------------------------------------

#: Bounds on what one managed spec may ask for (a typo must not start 10,000 processes).
MAX_REPLICAS = 64
MAX_COMMAND_ARGS = 256
MAX_ENV = 256
MAX_LOG_BYTES = 1024**3
#: Protocols whose own health call is known (GET <url>/models for OpenAI-compatible servers).
HEALTH_PATHS = {"openai": "/models"}


def _numbers(spec: ManagedSpec) -> Iterator[tuple[str, float, float, float]]:
    """(path, value, low, high) for every bounded number of a spec."""
    yield "port", spec.port, 0, 65535
    yield "readiness.timeout", spec.readiness_timeout_s, 0.01, 86400
    yield "resources.cpu", spec.cpu, 0, 1024
    yield "resources.memory", spec.memory_bytes, 0, 2**50
    yield "resources.gpu", spec.gpu, 0, 64
    yield "replicas.min", spec.min_replicas, 0, MAX_REPLICAS
    yield "replicas.max", spec.max_replicas, 1, MAX_REPLICAS
    yield "concurrency", spec.concurrency, 0, 1_000_000
    yield "scaling.scale_up_utilization", spec.scale_up_utilization, 0.01, 10
    yield "scaling.scale_down_utilization", spec.scale_down_utilization, 0, 10
    yield "scaling.scale_up_window", spec.scale_up_window_s, 0.01, 86400
    yield "scaling.scale_down_window", spec.scale_down_window_s, 0.01, 86400
    yield "restart.backoff", spec.restart_backoff_s, 0.01, 3600
    yield "restart.max_backoff", spec.restart_max_backoff_s, 0.01, 3600
    yield "restart.max_crashes", spec.max_crashes, 1, 1000
    yield "restart.crash_window", spec.crash_window_s, 0.01, 86400
    yield "stop_grace", spec.stop_grace_s, 0.01, 3600
    yield "drain_timeout", spec.drain_timeout_s, 0, 3600
    yield "log_bytes", spec.log_bytes, 1024, MAX_LOG_BYTES


def managed_problems(spec: ManagedSpec, protocol: str) -> list[tuple[str, str]]:
    """(path under `managed`, message) for everything wrong with `spec`."""
    out = [(path, f"must be between {low:g} and {high:g}, got {value:g}")
           for path, value, low, high in _numbers(spec) if not (math.isfinite(value) and low <= value <= high)]
    if spec.backend not in MANAGED_BACKENDS:
        runs = ", ".join(sorted(MANAGED_BACKENDS))
        out.append(("backend", f"unknown backend {spec.backend!r}; this build runs: {runs}"))
    out.extend(_backend_problems(spec))
    if len(spec.command) > MAX_COMMAND_ARGS or len(spec.env) + len(spec.inherit_env) > MAX_ENV:
        out.append(("command", f"at most {MAX_COMMAND_ARGS} arguments and {MAX_ENV} environment entries"))
    out.extend(_ordering_problems(spec, protocol))
    return out


def _backend_problems(spec: ManagedSpec) -> Iterator[tuple[str, str]]:
    if spec.backend == "docker":
        if not spec.image:
            yield "image", "the docker backend needs an image (already present on the agents' hosts)"
        for index, volume in enumerate(spec.volumes):
            parts = volume.split(":")
            if not (2 <= len(parts) <= 3 and all(p.startswith("/") for p in parts[:2])
                    and (len(parts) == 2 or parts[2] in ("ro", "rw"))):
                yield f"volumes[{index}]", "expected HOST:CONTAINER or HOST:CONTAINER:ro with absolute paths"
        return
    if not spec.command or not spec.command[0]:
        yield "command", "a command to run is required (a list: program, then its arguments)"
    for key, value in (("image", spec.image), ("volumes", spec.volumes)):
        if value:
            yield key, f"{key} needs backend: docker"


def _ordering_problems(spec: ManagedSpec, protocol: str) -> Iterator[tuple[str, str]]:
    if spec.min_replicas > spec.max_replicas:
        yield "replicas.min", f"min ({spec.min_replicas}) exceeds max ({spec.max_replicas})"
    if spec.max_replicas > spec.min_replicas and spec.concurrency <= 0:
        yield "concurrency", "scaling between min and max replicas needs concurrency (calls one replica serves)"
    if spec.scale_down_utilization >= spec.scale_up_utilization:
        yield "scaling.scale_down_utilization", "must be below scale_up_utilization"
    if spec.restart_max_backoff_s < spec.restart_backoff_s:
        yield "restart.max_backoff", "must be at least restart.backoff"
    if not spec.readiness_path and protocol not in HEALTH_PATHS:
        yield "readiness.path", f"required: protocol {protocol!r} has no health call Switchgear knows"
    if spec.readiness_path and not spec.readiness_path.startswith("/"):
        yield "readiness.path", "must start with '/'"
    if spec.url and not spec.url.startswith(("http://", "https://")):
        yield "url", "must be an http:// or https:// URL (it may use ${PORT})"


def _check_managed(spec: ServiceSpec) -> Iterator[Problem]:
    """The `managed:` block (containers.managed_problems), for the protocols that have a health call."""
    if spec.managed is None:
        return
    for path, message in managed_problems(spec.managed, spec.protocol):
        yield Problem(f"managed.{path}", message)


_SERVICE_RULES: tuple[Callable[[ServiceSpec], Iterator[Problem]], ...] = (
    _check_name,
    _check_category,
    _check_protocol,
    _check_endpoints,
    _check_service_numbers,
    _check_tokenless,
    _check_strategy,
    _check_options,
    _check_api_key,
    _check_metadata,
    _check_read_metadata,
    _check_capabilities,
    _check_managed,
)


def validate_service(spec: ServiceSpec) -> list[Problem]:
    """Every per-service rule; paths are relative to the service."""
    return [problem for rule in _SERVICE_RULES for problem in rule(spec)]


# --- settings -------------------------------------------------------------------------------

_SETTINGS_NUMBERS: tuple[tuple[str, Callable[[Settings], object], _Check], ...] = (
    ("health_check_timeout_s", lambda s: s.health_check_timeout_s, _positive),
    ("default_timeout_s", lambda s: s.default_timeout_s, _positive),
    ("retry_policy.max_retries", lambda s: s.retry_policy.max_retries, _integer_between(0, MAX_RETRIES)),
    # 0 = not set: the call's category's default delay (wire/attempt_policy.py::backoff_delays)
    ("retry_policy.base_delay_s", lambda s: s.retry_policy.base_delay_s, _non_negative),
    ("retry_policy.max_delay_s", lambda s: s.retry_policy.max_delay_s, _non_negative),
    ("circuit_breaker.failure_threshold", lambda s: s.circuit_breaker.failure_threshold, _integer_between(1)),
    ("service_discovery.cache_ttl_s", lambda s: s.service_discovery.cache_ttl_s, _positive),
    (
        "service_discovery.health_check_interval_s",
        lambda s: s.service_discovery.health_check_interval_s,
        _positive,
    ),
    (
        "service_discovery.failover_threshold",
        lambda s: s.service_discovery.failover_threshold,
        _integer_between(1),
    ),
    ("resource_allocation.default_cpu", lambda s: s.resource_allocation.default_cpu, _positive),
    (
        "resource_allocation.default_memory_bytes",
        lambda s: s.resource_allocation.default_memory_bytes,
        _integer_between(1),
    ),
    (
        "resource_allocation.max_concurrent_tasks",
        lambda s: s.resource_allocation.max_concurrent_tasks,
        _integer_between(1),
    ),
    # Never 0 = "keep forever": one tenant's finished tasks would grow the store without end.
    ("resource_allocation.task_retention_s", lambda s: s.resource_allocation.task_retention_s, _retention),
    # 0 = no limit per tenant (the operator's choice; the default limits).
    ("resource_allocation.max_tasks_per_tenant", lambda s: s.resource_allocation.max_tasks_per_tenant,
     _integer_between(0)),
    ("resource_allocation.max_blobs_per_tenant", lambda s: s.resource_allocation.max_blobs_per_tenant,
     _integer_between(0)),
    ("resource_allocation.max_blob_bytes_per_tenant", lambda s: s.resource_allocation.max_blob_bytes_per_tenant,
     _integer_between(0)),
    ("resource_allocation.max_finished_tasks_per_tenant",
     lambda s: s.resource_allocation.max_finished_tasks_per_tenant, _integer_between(0)),
)


def _check_settings_numbers(settings: Settings) -> Iterator[Problem]:
    """Timeouts, delays, TTLs and resources > 0; max_retries 0..10; thresholds >= 1."""
    yield from _check_numbers(settings, _SETTINGS_NUMBERS)


def _check_settings_names(settings: Settings) -> Iterator[Problem]:
    """default_strategy is in STRATEGIES; backoff_strategy in BACKOFF_STRATEGIES."""
    if settings.default_strategy not in STRATEGIES:
        yield Problem("default_strategy", _unknown_strategy(settings.default_strategy))
    backoff = settings.retry_policy.backoff_strategy
    if backoff not in BACKOFF_STRATEGIES:
        yield Problem(
            "retry_policy.backoff_strategy",
            f"unknown backoff strategy; expected one of {_listing(BACKOFF_STRATEGIES)}",
        )


def _check_delays(settings: Settings) -> Iterator[Problem]:
    """max_delay_s >= base_delay_s, when both are set."""
    retry = settings.retry_policy
    comparable = _is_number(retry.base_delay_s) and _is_number(retry.max_delay_s)
    if comparable and 0 < retry.max_delay_s < retry.base_delay_s:
        yield Problem("retry_policy.max_delay_s", "must be >= base_delay_s")


def _check_cache(settings: Settings) -> Iterator[Problem]:
    """Cache TTL kinds are non-empty and unique; each TTL > 0."""
    seen: set[str] = set()
    for kind, ttl in settings.cache.ttl_s:
        path = f"cache.ttl_s[{kind}]"
        if not kind or kind in seen:
            yield Problem(path, "cache kinds must be non-empty and unique")
        seen.add(kind)
        message = _positive(ttl) if _is_number(ttl) else "must be a number"
        if message:
            yield Problem(path, message)


def _factor(value: float) -> str | None:
    """0 (the default) or at least 1: an attempt timeout below the endpoint's own p99 would
    abandon its normal answers."""
    return None if value == 0 or value >= 1 else "must be 0 (the default) or at least 1"


_POLICY_NUMBERS: tuple[tuple[str, Callable[[CategoryPolicy], object], _Check], ...] = (
    ("max_cost_per_request", lambda p: p.max_cost_per_request, _non_negative),
    ("min_success_rate", lambda p: p.min_success_rate, _fraction),
    ("max_queue_size", lambda p: p.max_queue_size, _integer_between(0)),
    ("timeout_s", lambda p: p.timeout_s, _non_negative),
    ("attempt_timeout_floor_s", lambda p: p.attempt_timeout_floor_s, _non_negative),
    ("attempt_timeout_ceiling_s", lambda p: p.attempt_timeout_ceiling_s, _non_negative),
    ("attempt_timeout_factor", lambda p: p.attempt_timeout_factor, _factor),
    ("hedge_min_priority", lambda p: p.hedge_min_priority, _integer_between(0, 11)),
    ("overload_threshold", lambda p: p.overload_threshold, _fraction),
    ("underload_threshold", lambda p: p.underload_threshold, _fraction),
)



def _check_policies(settings: Settings) -> Iterator[Problem]:
    """Policy keys are unique Category values; strategy "" or in STRATEGIES; bounds >= 0; rate in [0, 1]."""
    categories = {c.value for c in Category}
    seen: set[str] = set()
    for key, policy in settings.category_policies:
        path = f"category_policies[{key}]"
        if key not in categories:
            yield Problem(path, f"unknown category {key!r}; expected one of {_listing(categories)}")
        elif key in seen:
            yield Problem(path, f"duplicate policy for category {key!r}")
        seen.add(key)
        if policy.strategy and policy.strategy not in STRATEGIES:
            yield Problem(f"{path}.strategy", _unknown_strategy(policy.strategy))
        for problem in _check_numbers(policy, _POLICY_NUMBERS):
            yield problem.under(path)
        floor, ceiling = policy.attempt_timeout_floor_s, policy.attempt_timeout_ceiling_s
        if _is_number(floor) and _is_number(ceiling) and floor > 0 and 0 < ceiling < floor:
            yield Problem(f"{path}.attempt_timeout_ceiling_s", "must not be below attempt_timeout_floor_s")
        yield from _check_shift(policy, path)
        if policy.stream_upstream and key != STREAM_UPSTREAM_CATEGORY:
            yield Problem(f"{path}.stream_upstream", STREAM_UPSTREAM_ONLY)


def _check_shift(policy: CategoryPolicy, path: str) -> Iterator[Problem]:
    """The load-shifting thresholds in effect (0 = the seed's 0.8 / 0.6): underload < overload,
    or a target would shed to targets as loaded as itself."""
    high, low = policy.overload_threshold, policy.underload_threshold
    if _is_number(high) and _is_number(low) and (high or low) and not (low or 0.6) < (high or 0.8):
        yield Problem(f"{path}.underload_threshold",
                      f"must be below overload_threshold (in effect {low or 0.6:g} vs {high or 0.8:g})")


def _check_presets(settings: Settings) -> Iterator[Problem]:
    """Preset responses: one per known category, at most MAX_PRESET_CHARS characters."""
    categories = {c.value for c in Category}
    seen: set[str] = set()
    for category, text in settings.fallback.preset_responses:
        path = f"fallback.preset_responses[{category}]"
        if category not in categories or category in seen:
            yield Problem(path, f"expected one preset per category, of {_listing(categories)}")
        elif len(text) > MAX_PRESET_CHARS:
            yield Problem(path, f"at most {MAX_PRESET_CHARS} characters, got {len(text)}")
        seen.add(category)


_SETTINGS_RULES: tuple[Callable[[Settings], Iterator[Problem]], ...] = (
    _check_settings_numbers,
    _check_settings_names,
    _check_delays,
    _check_cache,
    _check_policies,
    _check_presets,
)


def validate_settings(settings: Settings) -> list[Problem]:
    """Every settings rule; paths are relative to the settings."""
    return [problem for rule in _SETTINGS_RULES for problem in rule(settings)]


# --- the whole state --------------------------------------------------------------------------


def _check_duplicates(services: tuple[ServiceSpec, ...]) -> Iterator[Problem]:
    """Service names are unique."""
    first: dict[str, int] = {}
    for index, spec in enumerate(services):
        if spec.name in first:
            yield Problem(
                f"services[{spec.name}]",
                f"duplicate service name {spec.name!r} (services #{first[spec.name]} and #{index})",
            )
        first.setdefault(spec.name, index)


def _check_fallback_names(services: tuple[ServiceSpec, ...]) -> Iterator[Problem]:
    """Each fallback names another known service."""
    known = {spec.name for spec in services}
    for spec in services:
        for index, target in enumerate(spec.fallbacks):
            path = f"services[{spec.name}].fallbacks[{index}]"
            if target == spec.name:
                yield Problem(path, "a service cannot fall back to itself")
            elif target not in known:
                yield Problem(path, f"unknown service {target!r}")


def _fallback_graph(services: tuple[ServiceSpec, ...]) -> dict[str, tuple[str, ...]]:
    known = {spec.name for spec in services}
    return {spec.name: tuple(t for t in spec.fallbacks if t in known and t != spec.name) for spec in services}


def _canonical_cycle(cycle: list[str]) -> tuple[str, ...]:
    """Rotate a cycle so it starts at its smallest name, so each cycle is reported once."""
    start = cycle.index(min(cycle))
    return tuple(cycle[start:] + cycle[:start])


def find_fallback_cycles(graph: Mapping[str, tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Cycles in the fallback graph, by depth-first search; at least one per cyclic component."""
    done: set[str] = set()
    found: dict[tuple[str, ...], None] = {}

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            found.setdefault(_canonical_cycle(stack[stack.index(name) :]))
            return
        if name in done:
            return
        stack.append(name)
        for target in graph.get(name, ()):
            visit(target, stack)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return list(found)


def _check_fallback_cycles(services: tuple[ServiceSpec, ...]) -> Iterator[Problem]:
    """Following fallbacks never comes back to where it started."""
    for cycle in find_fallback_cycles(_fallback_graph(services)):
        chain = " -> ".join((*cycle, cycle[0]))
        yield Problem(f"services[{cycle[0]}].fallbacks", f"fallback cycle: {chain}")


def _check_route_clash(services: tuple[ServiceSpec, ...]) -> Iterator[Problem]:
    """No service takes the name of a category route (routes.py): `llm` means the category."""
    for category in ROUTE_CATEGORIES:
        members = [s for s in services if s.category == category and s.name != category.value]
        clash = next((s for s in services if s.name == category.value), None)
        if clash is not None and len(members) >= ROUTE_MIN_SERVICES:
            yield Problem(f"services[{clash.name}].name",
                          f"clashes with the category route {category.value!r} over the {len(members)} "
                          f"{category.value} services; rename the service")


def _service_problems(spec: ServiceSpec) -> tuple[Problem, ...]:
    """validate_service, memoised per (immutable, hashable) spec: a change to one service of
    10,000 re-checks that one (bench/controlplane)."""
    try:
        return _cached_service_problems(spec)
    except TypeError:  # an unhashable spec: check it every time
        return tuple(validate_service(spec))


@functools.lru_cache(maxsize=32768)
def _cached_service_problems(spec: ServiceSpec) -> tuple[Problem, ...]:
    return tuple(validate_service(spec))


def validate_state(state: RegistryState) -> list[Problem]:
    """Every service and settings rule, plus the rules across services.

    Service problems are prefixed "services[<name>]."; settings problems "settings.".
    """
    problems: list[Problem] = []
    for spec in state.services:
        problems.extend(p.under(f"services[{spec.name}]") for p in _service_problems(spec))
    problems.extend(p.under("settings") for p in validate_settings(state.settings))
    for rule in (_check_duplicates, _check_fallback_names, _check_fallback_cycles, _check_route_clash):
        problems.extend(rule(state.services))
    problems.extend(validate_governance(state.tenants, state.keys))
    return problems


TENANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
KEY_ID_RE = re.compile(r"^[0-9a-f]{8,32}$")


def _check_tenant(tenant: Tenant) -> Iterator[Problem]:
    if not TENANT_ID_RE.match(tenant.id):
        yield Problem("id", "must be lower-case letters, digits and dashes (at most 63)")
    policy = tenant.policy
    numbers = {
        "policy.max_cost_per_request": policy.max_cost_per_request,
        "policy.requests_per_minute": policy.requests_per_minute,
        "policy.tokens_per_minute": policy.tokens_per_minute,
        "policy.max_in_flight": policy.max_in_flight,
        "policy.max_unfinished_tasks": policy.max_unfinished_tasks,
        "policy.max_blobs": policy.max_blobs,
        "policy.max_blob_bytes": policy.max_blob_bytes,
        "policy.budget_per_hour_usd": policy.budget_per_hour_usd,
        "policy.budget_per_day_usd": policy.budget_per_day_usd,
    }
    for name, quota in policy.services:
        numbers.update({
            f"policy.services[{name}].requests_per_minute": quota.requests_per_minute,
            f"policy.services[{name}].tokens_per_minute": quota.tokens_per_minute,
            f"policy.services[{name}].budget_per_hour_usd": quota.budget_per_hour_usd,
            f"policy.services[{name}].budget_per_day_usd": quota.budget_per_day_usd,
        })
    for path, value in numbers.items():
        if not math.isfinite(value) or value < 0:
            yield Problem(path, "must be a finite number >= 0")
    if not 0.0 <= policy.min_success_rate <= 1.0:
        yield Problem("policy.min_success_rate", "must be within 0..1")
    if not 0 <= policy.priority_cap <= 10:
        yield Problem("policy.priority_cap", "must be within 0..10 (0 = no cap)")
    for index, name in enumerate(policy.required_capabilities):  # one no target can offer refuses everything
        if not isinstance(name, str) or not CAPABILITY_NAME.fullmatch(name):
            yield Problem(f"policy.required_capabilities[{index}]",
                          f"must be a capability name services can offer, {CAPABILITY_RULE}")


def validate_governance(tenants: Iterable[Tenant], keys: Iterable[ApiKey]) -> list[Problem]:
    """Tenant ids and policies; keys unique and owned by an existing tenant."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for tenant in tenants:
        if tenant.id in seen:
            problems.append(Problem(f"tenants[{tenant.id}].id", "duplicate tenant id"))
        seen.add(tenant.id)
        problems.extend(p.under(f"tenants[{tenant.id}]") for p in _check_tenant(tenant))
    key_ids: set[str] = set()
    for key in keys:
        path = f"keys[{key.id}]"
        if not KEY_ID_RE.match(key.id) or key.id in key_ids:
            problems.append(Problem(f"{path}.id", "must be unique lower-case hex"))
        key_ids.add(key.id)
        if key.tenant not in seen:
            problems.append(Problem(f"{path}.tenant", f"no tenant {key.tenant!r}"))
        if len(key.sha256) != 64:
            problems.append(Problem(f"{path}.sha256", "must be a SHA-256 hex digest"))
    return problems


def _unknown_strategy(value: str) -> str:
    return f"unknown strategy; expected one of {_listing(STRATEGIES)}"


def _listing(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))
