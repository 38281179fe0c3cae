"""Tables of cases for switchgear.controlplane.validate: one row per rule, good and bad."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest

from switchgear.controlplane.model import (
    CacheSettings,
    Category,
    CategoryPolicy,
    CircuitBreakerSettings,
    EndpointSpec,
    Pricing,
    RegistryState,
    ResourceAllocationSettings,
    RetryPolicy,
    SecretRef,
    ServiceDiscoverySettings,
    ServiceSpec,
    Settings,
)
from switchgear.controlplane.validate import (
    Problem,
    ValidationError,
    find_fallback_cycles,
    validate_service,
    validate_settings,
    validate_state,
)

GOOD_ENDPOINT = EndpointSpec(id="e0", url="https://api.example.com/v1", weight=1)
GOOD = ServiceSpec(
    name="gpt-4",
    category=Category.LLM,
    protocol="openai",
    endpoints=(GOOD_ENDPOINT,),
    api_key=SecretRef(env="OPENAI_API_KEY"),
    model="gpt-4",
)


def _service(**changes: Any) -> ServiceSpec:
    return dataclasses.replace(GOOD, **changes)


def _endpoint(**changes: Any) -> ServiceSpec:
    return _service(endpoints=(dataclasses.replace(GOOD_ENDPOINT, **changes),))


def _paths(problems: list[Problem]) -> list[str]:
    return [p.path for p in problems]


# --- Problem and ValidationError ------------------------------------------------------------


@pytest.mark.parametrize(
    ("problem", "text"),
    [
        (Problem("endpoints[0].url", "bad"), "endpoints[0].url: bad"),
        (Problem("a.b", "bad", 7), "a.b (line 7): bad"),
        (Problem("", "bad", 3), "line 3: bad"),
        (Problem("", "bad"), "bad"),
    ],
)
def test_problem_str(problem: Problem, text: str) -> None:
    assert str(problem) == text


def test_validation_error_lists_problems_one_per_line() -> None:
    error = ValidationError([Problem("a", "one"), Problem("b", "two", 2)])
    assert str(error) == "a: one\nb (line 2): two"
    assert [p.path for p in error.problems] == ["a", "b"]
    assert isinstance(error, ValueError)


# --- services -------------------------------------------------------------------------------


def test_good_service_has_no_problems() -> None:
    assert validate_service(GOOD) == []


VALID_SERVICES = [
    _service(name="a"),
    _service(name="A0._:-z"),
    _service(name="x" * 128),
    _service(strategy=""),
    _service(strategy="least_loaded"),
    _service(api_key=None),
    _service(api_key=SecretRef(file="/run/secrets/key")),
    _service(api_key=SecretRef(env="_X1")),
    _service(options_json='{"a": [1, 2]}'),
    _service(metadata=(("a", "1"), ("b", ""))),
    _service(max_tokens=0, timeout_s=0.0, priority=-5),
    _service(pricing=Pricing(0.0, 0.001, 0.002, 0.5)),
    _endpoint(url="http://localhost:8080"),
    _endpoint(url="http://10.0.0.1:8000/base/path"),
    _endpoint(url="https://[::1]:443/"),
    _endpoint(weight=10000, max_concurrency=0, priority=-1),
    _service(endpoints=(GOOD_ENDPOINT, dataclasses.replace(GOOD_ENDPOINT, id="e1"))),
]


@pytest.mark.parametrize("spec", VALID_SERVICES)
def test_valid_services(spec: ServiceSpec) -> None:
    assert validate_service(spec) == []


INVALID_SERVICES: list[tuple[str, ServiceSpec, str, str]] = [
    # (rule, spec, path, message fragment)
    ("name empty", _service(name=""), "name", "1-128 characters"),
    ("name starts with dash", _service(name="-x"), "name", "starting with a letter"),
    ("name too long", _service(name="x" * 129), "name", "1-128"),
    ("name with space", _service(name="a b"), "name", "letters, digits"),
    ("name with slash", _service(name="a/b"), "name", "letters, digits"),
    ("category not enum", _service(category="llm"), "category", "must be one of"),
    ("protocol unknown", _service(protocol="grpc"), "protocol", "unknown protocol; expected one of"),
    ("no endpoints", _service(endpoints=()), "endpoints", "at least one endpoint"),
    (
        "duplicate endpoint ids",
        _service(endpoints=(GOOD_ENDPOINT, GOOD_ENDPOINT)),
        "endpoints[1].id",
        "duplicate endpoint id 'e0'",
    ),
    ("endpoint id pattern", _endpoint(id="bad id"), "endpoints[0].id", "letters, digits"),
    ("url scheme", _endpoint(url="ftp://host/x"), "endpoints[0].url", "http:// or https://"),
    ("url no scheme", _endpoint(url="host:8080"), "endpoints[0].url", "http:// or https://"),
    ("url empty", _endpoint(url=""), "endpoints[0].url", "http:// or https://"),
    ("url no host", _endpoint(url="http:///path"), "endpoints[0].url", "must include a host"),
    (
        "url credentials",
        _endpoint(url="https://user:pw@host"),
        "endpoints[0].url",
        "put secrets in api_key, not the URL",
    ),
    ("url user only", _endpoint(url="https://user@host"), "endpoints[0].url", "put secrets in api_key"),
    ("url query", _endpoint(url="https://host/x?key=1"), "endpoints[0].url", "query string or fragment"),
    ("url fragment", _endpoint(url="https://host/x#frag"), "endpoints[0].url", "query string or fragment"),
    ("url bad port", _endpoint(url="http://host:99999"), "endpoints[0].url", "not a valid URL"),
    ("url spaces", _endpoint(url="http://ho st"), "endpoints[0].url", "without spaces"),
    ("weight zero", _endpoint(weight=0), "endpoints[0].weight", "from 1 to 10000"),
    ("weight too big", _endpoint(weight=10001), "endpoints[0].weight", "from 1 to 10000"),
    ("weight float", _endpoint(weight=1.5), "endpoints[0].weight", "integer"),
    ("weight bool", _endpoint(weight=True), "endpoints[0].weight", "must be a number"),
    ("concurrency negative", _endpoint(max_concurrency=-1), "endpoints[0].max_concurrency", ">= 0"),
    ("max_tokens negative", _service(max_tokens=-1), "max_tokens", ">= 0"),
    ("priority float", _service(priority=1.5), "priority", "integer"),
    (
        "price negative",
        _service(pricing=Pricing(cost_per_1k_tokens=-0.01)),
        "pricing.cost_per_1k_tokens",
        ">= 0",
    ),
    (
        "price nan",
        _service(pricing=Pricing(input_cost_per_1k_tokens=math.nan)),
        "pricing.input_cost_per_1k_tokens",
        "finite",
    ),
    (
        "price inf",
        _service(pricing=Pricing(output_cost_per_1k_tokens=math.inf)),
        "pricing.output_cost_per_1k_tokens",
        "finite",
    ),
    (
        "price per request",
        _service(pricing=Pricing(cost_per_request=-1.0)),
        "pricing.cost_per_request",
        ">= 0",
    ),
    (
        "price string",
        _service(pricing=Pricing(cost_per_request="1")),  # type: ignore[arg-type]  # wrong on purpose
        "pricing.cost_per_request",
        "must be a number",
    ),
    (
        "cache read price negative",
        _service(pricing=Pricing(cache_read_input_cost_per_1k_tokens=-0.1)),
        "pricing.cache_read_input_cost_per_1k_tokens",
        ">= 0",
    ),
    (
        "cache write price inf",
        _service(pricing=Pricing(cache_write_input_cost_per_1k_tokens=math.inf)),
        "pricing.cache_write_input_cost_per_1k_tokens",
        "finite",
    ),
    (
        "search price negative",
        _service(pricing=Pricing(web_search_cost_per_1k_requests=-1.0)),
        "pricing.web_search_cost_per_1k_requests",
        ">= 0",
    ),
    (
        "search price on a protocol that reports no searches",
        _service(pricing=Pricing(web_search_cost_per_1k_requests=10.0)),
        "pricing.web_search_cost_per_1k_requests",
        "report no searches",
    ),
    ("timeout negative", _service(timeout_s=-1.0), "timeout_s", ">= 0"),
    ("timeout inf", _service(timeout_s=math.inf), "timeout_s", "finite"),
    ("strategy unknown", _service(strategy="fastest"), "strategy", "unknown strategy; expected one of"),
    ("options not json", _service(options_json="{"), "options_json", "JSON object"),
    ("options a list", _service(options_json="[1]"), "options_json", "JSON object"),
    ("secret neither", _service(api_key=SecretRef()), "api_key", "exactly one of env or file"),
    ("secret both", _service(api_key=SecretRef(env="A", file="/f")), "api_key", "exactly one of env or file"),
    ("secret env name", _service(api_key=SecretRef(env="1ABC")), "api_key.env", "environment variable name"),
    (
        "secret env dash",
        _service(api_key=SecretRef(env="MY-KEY")),
        "api_key.env",
        "environment variable name",
    ),
    ("metadata empty key", _service(metadata=(("", "x"),)), "metadata[0]", "must not be empty"),
    (
        "metadata duplicate key",
        _service(metadata=(("a", "1"), ("a", "2"))),
        "metadata[1]",
        "duplicate metadata key",
    ),
    ("capability empty", _service(capabilities=("chat", "")), "capabilities[1]", "must not be empty"),
    # a name no request can spell (x-switchgear-require is lower case) would load and never match
    ("capability a request cannot name", _service(capabilities=("chat", "Vision")), "capabilities[1]",
     "capability name requests can name"),
    ("target capability too long", _endpoint(capabilities=("x" * 65,)), "endpoints[0].capabilities[0]",
     "capability name requests can name"),
    # answers that carry no tokens: a token price or a tokens-per-minute limit would never apply
    ("token price on chroma", _service(protocol="chroma", category=Category.VECTOR_DB, api_key=None,
                                       pricing=Pricing(cost_per_1k_tokens=0.01, cost_per_request=0.001)),
     "pricing.cost_per_1k_tokens", "chroma answers carry no token usage"),
    ("target token price on pinecone", _service(protocol="pinecone", category=Category.VECTOR_DB, endpoints=(
        dataclasses.replace(GOOD_ENDPOINT, pricing=Pricing(output_cost_per_1k_tokens=0.2)),)),
     "endpoints[0].pricing.output_cost_per_1k_tokens", "price its calls with cost_per_request"),
    ("pinecone target in an openai service", _service(endpoints=(
        dataclasses.replace(GOOD_ENDPOINT, protocol="pinecone", pricing=Pricing(input_cost_per_1k_tokens=0.2)),)),
     "endpoints[0].pricing.input_cost_per_1k_tokens", "pinecone answers carry no token usage"),
    ("tpm limit on chroma", _service(protocol="chroma", category=Category.VECTOR_DB, api_key=None, endpoints=(
        dataclasses.replace(GOOD_ENDPOINT, tpm_limit=1000),)), "endpoints[0].tpm_limit", "use rpm_limit"),
]


@pytest.mark.parametrize(
    ("rule", "spec", "path", "fragment"), INVALID_SERVICES, ids=[c[0] for c in INVALID_SERVICES]
)
def test_invalid_services(rule: str, spec: ServiceSpec, path: str, fragment: str) -> None:
    problems = validate_service(spec)
    assert _paths(problems) == [path], problems
    assert fragment in problems[0].message


def test_url_messages_never_repeat_the_url() -> None:
    spec = _endpoint(url="https://admin:hunter2@host/x?token=abc")
    text = "\n".join(str(p) for p in validate_service(spec))
    assert "hunter2" not in text and "token=abc" not in text
    assert "put secrets in api_key" in text


def test_every_problem_is_reported_not_just_the_first() -> None:
    spec = _service(name="", protocol="x", endpoints=(), max_tokens=-1)
    assert _paths(validate_service(spec)) == ["name", "protocol", "endpoints", "max_tokens"]


# --- settings -------------------------------------------------------------------------------


def _settings(**changes: Any) -> Settings:
    return dataclasses.replace(Settings(), **changes)


def test_default_settings_are_valid() -> None:
    assert validate_settings(Settings()) == []


VALID_SETTINGS = [
    _settings(retry_policy=RetryPolicy(max_retries=0)),
    _settings(
        retry_policy=RetryPolicy(max_retries=10, backoff_strategy="fixed", base_delay_s=2.0, max_delay_s=2.0)
    ),
    _settings(category_policies=(("llm", CategoryPolicy(strategy="", min_success_rate=1.0)),)),
    _settings(category_policies=(("vector_db", CategoryPolicy(strategy="latency", max_queue_size=0)),)),
    _settings(cache=CacheSettings(enabled=False, ttl_s=())),
]


@pytest.mark.parametrize("settings", VALID_SETTINGS)
def test_valid_settings(settings: Settings) -> None:
    assert validate_settings(settings) == []


SD, RA = ServiceDiscoverySettings, ResourceAllocationSettings
INVALID_SETTINGS: list[tuple[str, Settings, str, str]] = [
    ("default strategy", _settings(default_strategy="random"), "default_strategy", "unknown strategy"),
    ("empty default strategy", _settings(default_strategy=""), "default_strategy", "unknown strategy"),
    (
        "backoff",
        _settings(retry_policy=RetryPolicy(backoff_strategy="jitter")),
        "retry_policy.backoff_strategy",
        "unknown backoff",
    ),
    (
        "base delay negative",
        _settings(retry_policy=RetryPolicy(base_delay_s=-1.0)),
        "retry_policy.base_delay_s",
        ">= 0",
    ),
    (
        "max below base",
        _settings(retry_policy=RetryPolicy(base_delay_s=5.0, max_delay_s=1.0)),
        "retry_policy.max_delay_s",
        ">= base_delay_s",
    ),
    (
        "retries negative",
        _settings(retry_policy=RetryPolicy(max_retries=-1)),
        "retry_policy.max_retries",
        "from 0 to 10",
    ),
    (
        "retries eleven",
        _settings(retry_policy=RetryPolicy(max_retries=11)),
        "retry_policy.max_retries",
        "from 0 to 10",
    ),
    (
        "breaker zero",
        _settings(circuit_breaker=CircuitBreakerSettings(0)),
        "circuit_breaker.failure_threshold",
        ">= 1",
    ),
    ("health timeout", _settings(health_check_timeout_s=0.0), "health_check_timeout_s", "> 0"),
    ("default timeout", _settings(default_timeout_s=-1.0), "default_timeout_s", "> 0"),
    (
        "ttl zero",
        _settings(cache=CacheSettings(ttl_s=(("llm_responses", 0.0),))),
        "cache.ttl_s[llm_responses]",
        "> 0",
    ),
    ("ttl inf", _settings(cache=CacheSettings(ttl_s=(("x", math.inf),))), "cache.ttl_s[x]", "finite"),
    ("ttl kind empty", _settings(cache=CacheSettings(ttl_s=(("", 1.0),))), "cache.ttl_s[]", "non-empty"),
    (
        "discovery ttl",
        _settings(service_discovery=SD(cache_ttl_s=0.0)),
        "service_discovery.cache_ttl_s",
        "> 0",
    ),
    (
        "health interval",
        _settings(service_discovery=SD(health_check_interval_s=-1.0)),
        "service_discovery.health_check_interval_s",
        "> 0",
    ),
    (
        "failover zero",
        _settings(service_discovery=SD(failover_threshold=0)),
        "service_discovery.failover_threshold",
        ">= 1",
    ),
    (
        "cpu zero",
        _settings(resource_allocation=RA(default_cpu=0.0)),
        "resource_allocation.default_cpu",
        "> 0",
    ),
    (
        "memory zero",
        _settings(resource_allocation=RA(default_memory_bytes=0)),
        "resource_allocation.default_memory_bytes",
        ">= 1",
    ),
    (
        "tasks zero",
        _settings(resource_allocation=RA(max_concurrent_tasks=0)),
        "resource_allocation.max_concurrent_tasks",
        ">= 1",
    ),
    (
        "retention zero (there is no keep-forever)",
        _settings(resource_allocation=RA(task_retention_s=0.0)),
        "resource_allocation.task_retention_s",
        "at least 60 s",
    ),
    (
        "tenant tasks negative",
        _settings(resource_allocation=RA(max_tasks_per_tenant=-1)),
        "resource_allocation.max_tasks_per_tenant",
        ">= 0",
    ),
    (
        "tenant blob bytes negative",
        _settings(resource_allocation=RA(max_blob_bytes_per_tenant=-1)),
        "resource_allocation.max_blob_bytes_per_tenant",
        ">= 0",
    ),
    (
        "policy key",
        _settings(category_policies=(("llm_services", CategoryPolicy()),)),
        "category_policies[llm_services]",
        "unknown category",
    ),
    (
        "policy duplicate",
        _settings(category_policies=(("llm", CategoryPolicy()), ("llm", CategoryPolicy()))),
        "category_policies[llm]",
        "duplicate policy",
    ),
    (
        "policy strategy",
        _settings(category_policies=(("llm", CategoryPolicy(strategy="cheap")),)),
        "category_policies[llm].strategy",
        "unknown strategy",
    ),
    (
        "policy rate high",
        _settings(category_policies=(("llm", CategoryPolicy(min_success_rate=1.5)),)),
        "category_policies[llm].min_success_rate",
        "between 0 and 1",
    ),
    (
        "policy rate low",
        _settings(category_policies=(("llm", CategoryPolicy(min_success_rate=-0.1)),)),
        "category_policies[llm].min_success_rate",
        "between 0 and 1",
    ),
    (
        "policy cost",
        _settings(category_policies=(("llm", CategoryPolicy(max_cost_per_request=-1.0)),)),
        "category_policies[llm].max_cost_per_request",
        ">= 0",
    ),
    (
        "policy queue",
        _settings(category_policies=(("document", CategoryPolicy(max_queue_size=-1)),)),
        "category_policies[document].max_queue_size",
        ">= 0",
    ),
    (
        "policy timeout",
        _settings(category_policies=(("document", CategoryPolicy(timeout_s=-1.0)),)),
        "category_policies[document].timeout_s",
        ">= 0",
    ),
]


@pytest.mark.parametrize(
    ("rule", "settings", "path", "fragment"), INVALID_SETTINGS, ids=[c[0] for c in INVALID_SETTINGS]
)
def test_invalid_settings(rule: str, settings: Settings, path: str, fragment: str) -> None:
    problems = validate_settings(settings)
    assert _paths(problems) == [path], problems
    assert fragment in problems[0].message


# --- the whole state ------------------------------------------------------------------------


def _named(name: str, *fallbacks: str) -> ServiceSpec:
    return _service(name=name, fallbacks=fallbacks)


def _state(*services: ServiceSpec, settings: Settings | None = None) -> RegistryState:
    return RegistryState(services=services, settings=settings or Settings())


def test_state_prefixes_service_and_settings_paths() -> None:
    state = _state(_service(name="gpt-4", max_tokens=-1), settings=_settings(default_strategy="x"))
    assert _paths(validate_state(state)) == ["services[gpt-4].max_tokens", "settings.default_strategy"]


def test_state_prefix_keeps_dotted_names_whole() -> None:
    problems = validate_state(_state(_service(name="gpt-3.5-turbo", endpoints=())))
    assert _paths(problems) == ["services[gpt-3.5-turbo].endpoints"]


STATE_CASES: list[tuple[str, Callable[[], RegistryState], list[tuple[str, str]]]] = [
    ("valid chain", lambda: _state(_named("a", "b"), _named("b", "c"), _named("c")), []),
    ("empty state", lambda: _state(), []),
    (
        "duplicate names",
        lambda: _state(_named("a"), _named("a")),
        [("services[a]", "duplicate service name 'a'")],
    ),
    (
        "unknown fallback",
        lambda: _state(_named("a", "ghost")),
        [("services[a].fallbacks[0]", "unknown service 'ghost'")],
    ),
    (
        "fallback to itself",
        lambda: _state(_named("a", "b", "a"), _named("b")),
        [("services[a].fallbacks[1]", "cannot fall back to itself")],
    ),
    (
        "two-service cycle",
        lambda: _state(_named("a", "b"), _named("b", "a")),
        [("services[a].fallbacks", "fallback cycle: a -> b -> a")],
    ),
    (
        "three-service cycle reported once, from its smallest name",
        lambda: _state(_named("c", "a"), _named("a", "b"), _named("b", "c")),
        [("services[a].fallbacks", "fallback cycle: a -> b -> c -> a")],
    ),
    (
        "cycle reached from outside",
        lambda: _state(_named("x", "y"), _named("y", "z"), _named("z", "y")),
        [("services[y].fallbacks", "fallback cycle: y -> z -> y")],
    ),
]


@pytest.mark.parametrize(("case", "make", "expected"), STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_state_rules(case: str, make: Callable[[], RegistryState], expected: list[tuple[str, str]]) -> None:
    problems = validate_state(make())
    assert _paths(problems) == [path for path, _ in expected], problems
    for problem, (_, fragment) in zip(problems, expected, strict=True):
        assert fragment in problem.message


def test_find_fallback_cycles_finds_every_separate_cycle() -> None:
    graph = {"a": ("b",), "b": ("a",), "c": ("d",), "d": ("c",), "e": ("a",)}
    assert sorted(find_fallback_cycles(graph)) == [("a", "b"), ("c", "d")]


def test_validation_is_pure_and_imports_no_io() -> None:
    import ast
    import pathlib

    import switchgear.controlplane.validate as module

    tree = ast.parse(pathlib.Path(module.__file__).read_text(encoding="utf-8"))
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    allowed = {"__future__", "functools", "json", "math", "re", "urllib.parse", "collections.abc", "dataclasses",
               "typing"}
    # the task allocator's override rules (`resources.*` metadata) are pure too: in the pure-core contract
    # and the capability-name rule both planes hold (switchgear.wire.names: a regex, nothing else)
    assert imported - allowed == {"switchgear.controlplane.model", "switchgear.controlplane.tasks.allocator",
                                  "switchgear.wire.names"}


def test_a_tenant_policy_requires_only_capabilities_a_service_can_offer() -> None:
    from switchgear.controlplane.model import Tenant, TenantPolicy
    from switchgear.controlplane.validate import validate_governance

    good = Tenant(id="t", policy=TenantPolicy(required_capabilities=("vision", "json_schema")))
    assert validate_governance([good], []) == []
    bad = Tenant(id="t", policy=TenantPolicy(required_capabilities=("vision", "Vision", "")))
    problems = validate_governance([bad], [])
    assert [p.path for p in problems] == ["tenants[t].policy.required_capabilities[1]",
                                          "tenants[t].policy.required_capabilities[2]"]
    assert all("capability name" in p.message for p in problems)
