"""The unified YAML config loader: the seed file, every error kind (path AND line), secrets."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path
from typing import Any

import grpc
import pytest

from switchgear.cli_config import describe
from switchgear.controlplane import convert
from switchgear.controlplane.config import ConfigError, load_config, load_config_file, parse_size
from switchgear.controlplane.model import (
    Category,
    CategoryPolicy,
    EndpointSpec,
    RegistryState,
    SecretRef,
    ServiceSpec,
)
from switchgear.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import ControlPlane

ROOT = Path(__file__).resolve().parent.parent
SEED_CONFIG = ROOT / "config" / "external_services_unified.yaml"
SEED_DESIGN = Path(__file__).resolve().parents[2] / "shared" / "seed" / "unified-scheduling-design.zh.md"  # beside the checkout


def _yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def _load(text: str, env: dict[str, str] | None = None) -> dict[str, ServiceSpec]:
    state = load_config(_yaml(text), env=env or {})
    return {spec.name: spec for spec in state.services}


def _errors(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(_yaml(text), source="test.yaml", env=env or {})
    return caught.value


# --- the seed file ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed() -> RegistryState:
    return load_config_file(SEED_CONFIG, env={})


#: SHA-256 of the seed's YAML block when it was copied; checked when the design is not beside us.
SEED_YAML_SHA256 = "29eeec3a6dd9f7182b81a4c252c8841582cf6a673a5a49ab3196b6627a60e766"


def test_seed_file_is_the_seed_yaml_verbatim() -> None:
    copied = SEED_CONFIG.read_text(encoding="utf-8")
    if SEED_DESIGN.exists():
        design = SEED_DESIGN.read_text(encoding="utf-8")
        start = design.index("# config/external_services_unified.yaml")
        assert copied == design[start : design.index("```", start)]
    assert hashlib.sha256(copied.encode()).hexdigest() == SEED_YAML_SHA256


def test_seed_loads_with_empty_env_and_every_service(seed: RegistryState) -> None:
    names = [spec.name for spec in seed.services]
    assert names == sorted(
        [
            "gpt-4",
            "gpt-3.5-turbo",
            "claude-3-sonnet",
            "llama2-7b",
            "unstructured",
            "graphrag",
            "chroma",
            "pinecone",
        ]
    )


SEED_SERVICES = [
    # name, category, protocol, url, cost_per_1k, max_tokens, priority, timeout_s, key
    (
        "gpt-4",
        Category.LLM,
        "openai",
        "https://api.openai.com/v1",
        0.03,
        4096,
        10,
        0.0,
        SecretRef(env="OPENAI_API_KEY"),
    ),
    (
        "gpt-3.5-turbo",
        Category.LLM,
        "openai",
        "https://api.openai.com/v1",
        0.002,
        4096,
        5,
        0.0,
        SecretRef(env="OPENAI_API_KEY"),
    ),
    (
        "claude-3-sonnet",
        Category.LLM,
        "anthropic",
        "https://api.anthropic.com",
        0.015,
        4096,
        8,
        0.0,
        SecretRef(env="ANTHROPIC_API_KEY"),
    ),
    ("llama2-7b", Category.LLM, "openai", "http://local-llm:8080", 0.0, 2048, 3, 0.0, None),
    ("unstructured", Category.DOCUMENT, "unstructured", "http://unstructured:8000", 0.0, 0, 0, 300.0, None),
    ("graphrag", Category.KNOWLEDGE_GRAPH, "graphrag", "http://graphrag:8001", 0.0, 0, 0, 600.0, None),
    ("chroma", Category.VECTOR_DB, "chroma", "http://chroma:8000", 0.0, 0, 0, 0.0, None),
    (
        "pinecone",
        Category.VECTOR_DB,
        "pinecone",
        "https://api.pinecone.io",
        0.0,
        0,
        0,
        0.0,
        SecretRef(env="PINECONE_API_KEY"),
    ),
]


@pytest.mark.parametrize(
    ("name", "category", "protocol", "url", "cost", "max_tokens", "priority", "timeout_s", "key"),
    SEED_SERVICES,
    ids=[row[0] for row in SEED_SERVICES],
)
def test_seed_service(
    seed: RegistryState,
    name: str,
    category: Category,
    protocol: str,
    url: str,
    cost: float,
    max_tokens: int,
    priority: int,
    timeout_s: float,
    key: SecretRef | None,
) -> None:
    spec = seed.service(name)
    assert spec is not None
    assert (spec.category, spec.protocol, spec.max_tokens, spec.priority, spec.timeout_s) == (
        category,
        protocol,
        max_tokens,
        priority,
        timeout_s,
    )
    assert [e.url for e in spec.endpoints] == [url]
    assert spec.pricing.cost_per_1k_tokens == cost
    assert spec.api_key == key


def test_seed_model_names_and_descriptive_keys(seed: RegistryState) -> None:
    def svc(name: str) -> ServiceSpec:
        spec = seed.service(name)
        assert spec is not None
        return spec

    assert svc("gpt-4").model == "gpt-4" and svc("llama2-7b").model == "llama2-7b"
    assert dict(svc("unstructured").metadata) == {
        "max_file_size": "50MB",
        "max_file_size_bytes": "50000000",
        "supported_formats": "pdf,docx,xlsx,pptx,html",
    }
    assert dict(svc("graphrag").metadata) == {"max_documents": "1000"}
    assert dict(svc("chroma").metadata) == {"collections": "documents,chunks,embeddings"}
    assert json.loads(svc("pinecone").options_json) == {
        "environment": "us-west1-gcp",
        "index_name": "knowledge-base",
    }
    assert svc("pinecone").options_json == '{"environment":"us-west1-gcp","index_name":"knowledge-base"}'


def test_seed_settings(seed: RegistryState) -> None:
    settings = seed.settings
    policies = dict(settings.category_policies)
    assert policies["llm"] == CategoryPolicy(
        strategy="cost_optimized", max_cost_per_request=0.05, min_success_rate=0.95
    )
    assert policies["document"] == CategoryPolicy(strategy="least_loaded", max_queue_size=50, timeout_s=300.0)
    assert set(policies) == {"llm", "document"}
    assert dict(settings.cache.ttl_s) == {
        "llm_responses": 3600.0,
        "document_parsing": 86400.0,
        "embeddings": 604800.0,
    }
    assert settings.cache.enabled is True
    retry = settings.retry_policy
    assert (retry.max_retries, retry.backoff_strategy, retry.base_delay_s, retry.max_delay_s) == (
        3,
        "exponential",
        1.0,
        30.0,
    )
    assert settings.circuit_breaker.failure_threshold == 5
    assert settings.default_strategy == "intelligent"
    assert settings.health_check_timeout_s == 5.0
    discovery = settings.service_discovery
    assert (discovery.cache_ttl_s, discovery.health_check_interval_s, discovery.failover_threshold) == (
        300.0,
        30.0,
        3,
    )
    resources = settings.resource_allocation
    assert (resources.default_cpu, resources.default_memory_bytes, resources.max_concurrent_tasks) == (
        2.0,
        4 * 1024**3,
        100,
    )


def test_describe_seed(seed: RegistryState) -> None:
    text = describe(seed)
    lines = text.splitlines()
    assert lines[0] == "8 services:"
    gpt4 = next(line for line in lines if line.strip().startswith("gpt-4 "))
    for fragment in (
        "llm",
        "openai",
        "model=gpt-4",
        "$0.03/1k tokens",
        "key=env:OPENAI_API_KEY",
        "https://api.openai.com/v1",
    ):
        assert fragment in gpt4
    assert "key=env:PINECONE_API_KEY" in text
    assert "policy llm: strategy cost_optimized" in text
    assert "embedding 2 cpu/4Gi" in text and "retry: up to 3, exponential" in text


# --- errors: each names the YAML path and the line ----------------------------------------------

#: A service whose metadata sets one key an agent reads ({key}: {value}); the key is on line 9.
_METADATA_CASE = """
        external_services:
          services:
            llm_services:
              local_models:
                - name: tiny
                  endpoint: "http://127.0.0.1:8080/v1"
                  metadata:
                    processing_time_avg: "30s"
                    {key}: {value}
        """


ERROR_CASES: list[tuple[str, str, dict[str, str], str, int, str]] = [
    # (case, yaml, env, path, line, message fragment)
    (
        "unknown service key, with suggestion",
        """
        external_services:
          services:
            llm_services:
              openai:
                models:
                  - name: gpt-4
                    max_tokns: 5
        """,
        {},
        "external_services.services.llm_services.openai.models[0].max_tokns",
        7,
        "unknown key 'max_tokns'; did you mean 'max_tokens'?",
    ),
    (
        "unknown settings key, with suggestion",
        """
        external_services:
          coordination:
            service_discovery:
              cache_tll: 300
        """,
        {},
        "external_services.coordination.service_discovery.cache_tll",
        4,
        "did you mean 'cache_ttl'?",
    ),
    (
        "unknown top section",
        """
        external_services:
          comunication: {}
        """,
        {},
        "external_services.comunication",
        2,
        "did you mean 'communication'?",
    ),
    (
        "unknown service group",
        """
        external_services:
          services:
            llm_service: {}
        """,
        {},
        "external_services.services.llm_service",
        3,
        "did you mean 'llm_services'?",
    ),
    (
        "duration of the wrong type",
        """
        external_services:
          services:
            llm_services:
              local_models:
                - name: llama
                  endpoint: http://llm:8080
                  timeout: abc
        """,
        {},
        "external_services.services.llm_services.local_models[0].timeout",
        7,
        "expected a duration",
    ),
    (
        "integer of the wrong type",
        """
        external_services:
          communication:
            retry_policy:
              max_retries: three
        """,
        {},
        "external_services.communication.retry_policy.max_retries",
        4,
        "expected an integer, got 'three'",
    ),
    (
        "max_retries out of range (a validation rule mapped back to its line)",
        """
        external_services:
          communication:
            retry_policy:
              backoff_strategy: exponential
              max_retries: -1
        """,
        {},
        "external_services.communication.retry_policy.max_retries",
        5,
        "from 0 to 10",
    ),
    (
        "max_delay below base_delay",
        """
        external_services:
          communication:
            retry_policy:
              base_delay: 10
              max_delay: 5
        """,
        {},
        "external_services.communication.retry_policy.max_delay",
        5,
        ">= base_delay_s",
    ),
    (
        "an explicit zero delay (leaving the key out is how to ask for the default)",
        """
        external_services:
          communication:
            retry_policy:
              base_delay: 0
        """,
        {},
        "external_services.communication.retry_policy.base_delay",
        4,
        "leave the key out",
    ),
    (
        "bool of the wrong type",
        """
        external_services:
          communication:
            caching:
              enabled: maybe
        """,
        {},
        "external_services.communication.caching.enabled",
        4,
        "expected true or false",
    ),
    (
        "size of the wrong type",
        """
        external_services:
          coordination:
            resource_allocation:
              default_memory: lots
        """,
        {},
        "external_services.coordination.resource_allocation.default_memory",
        4,
        "expected a size",
    ),
    (
        "bad url scheme",
        """
        external_services:
          services:
            llm_services:
              local_models:
                - name: llama
                  endpoint: ftp://llm:8080
        """,
        {},
        "external_services.services.llm_services.local_models[0].endpoint",
        6,
        "http:// or https://",
    ),
    (
        "credentials in a url",
        """
        external_services:
          services:
            vector_databases:
              chroma:
                endpoint: http://admin:pw@chroma:8000
        """,
        {},
        "external_services.services.vector_databases.chroma.endpoint",
        5,
        "put secrets in api_key, not the URL",
    ),
    (
        "endpoint weight out of range in a list",
        """
        external_services:
          services:
            vector_databases:
              chroma:
                endpoints:
                  - url: http://a:8000
                  - url: http://b:8000
                    weight: 0
        """,
        {},
        "external_services.services.vector_databases.chroma.endpoints[1].weight",
        8,
        "from 1 to 10000",
    ),
    (
        "literal api key",
        """
        external_services:
          services:
            llm_services:
              openai:
                api_key: sk-live-abcdef
                models: [gpt-4]
        """,
        {},
        "external_services.services.llm_services.openai.api_key",
        5,
        "literal secrets are not allowed; use ${VAR} or file:PATH",
    ),
    (
        "missing env var in a used service",
        """
        external_services:
          services:
            llm_services:
              local_models:
                - name: llama
                  endpoint: ${LLAMA_URL}
        """,
        {},
        "external_services.services.llm_services.local_models[0].endpoint",
        6,
        "environment variable LLAMA_URL is not set",
    ),
    (
        "missing env var in settings",
        """
        external_services:
          communication:
            load_balancing:
              default_strategy: ${STRATEGY}
        """,
        {},
        "external_services.communication.load_balancing.default_strategy",
        4,
        "environment variable STRATEGY is not set",
    ),
    (
        "duplicate service names",
        """
        external_services:
          services:
            llm_services:
              openai:
                models:
                  - name: gpt-4
              local_models:
                - name: gpt-4
                  endpoint: http://llm:8080
        """,
        {},
        "external_services.services.llm_services.local_models[0].name",
        8,
        "duplicate service name 'gpt-4'; first defined at "
        "external_services.services.llm_services.openai.models[0].name (line 6)",
    ),
    (
        "fallback to an unknown service",
        """
        external_services:
          services:
            llm_services:
              openai:
                models:
                  - name: gpt-4
                    fallbacks:
                      - gpt-3.5-turbo
                      - gpt-5
                  - name: gpt-3.5-turbo
        """,
        {},
        "external_services.services.llm_services.openai.models[0].fallbacks[1]",
        9,
        "unknown service 'gpt-5'",
    ),
    (
        "fallback cycle",
        """
        external_services:
          services:
            llm_services:
              openai:
                models:
                  - name: a
                    fallbacks: [b]
                  - name: b
                    fallbacks: [a]
        """,
        {},
        "external_services.services.llm_services.openai.models[0].fallbacks",
        7,
        "fallback cycle: a -> b -> a",
    ),
    (
        "unknown strategy on a service",
        """
        external_services:
          services:
            llm_services:
              openai:
                models:
                  - name: gpt-4
                    strategy: fastest
        """,
        {},
        "external_services.services.llm_services.openai.models[0].strategy",
        7,
        "unknown strategy; expected one of",
    ),
    (
        "unknown policy strategy",
        """
        external_services:
          coordination:
            scheduling_policies:
              llm_services:
                strategy: cheapest
        """,
        {},
        "external_services.coordination.scheduling_policies.llm_services.strategy",
        5,
        "unknown strategy",
    ),
    *[
        (f"metadata {key}: {value} would load and do nothing", _METADATA_CASE.format(key=key, value=value), {},
         f"external_services.services.llm_services.local_models[0].metadata.{key}", 9, fragment)
        for key, value, fragment in [
            ("cache.ttl", '"1h"', "metadata 'cache.ttl' must be a number of seconds >= 0"),
            ("cache.shared", '"yes"', "metadata 'cache.shared' must be true or false"),
            ("fallback", '"locally"', "metadata 'fallback' must be 'local'"),
            ("resources.gpus", "2", "unknown resources key 'resources.gpus'"),
            ("resources.cpu", '"lots"', "metadata 'resources.cpu' must be a finite number >= 0"),
            ("max_file_size", '"1MB"', "metadata 'max_file_size' is not enforced from metadata"),
        ]
    ],
    (
        "a cache ttl kind no category uses",  # it would be stored and never applied
        """
        external_services:
          communication:
            caching:
              ttl:
                llm_response: 60
        """,
        {},
        "external_services.communication.caching.ttl.llm_response",
        5,
        "unknown key 'llm_response'; did you mean 'llm_responses'?",
    ),
    (
        "no endpoint for a service without a default URL",
        """
        external_services:
          services:
            knowledge_graph:
              graphrag:
                timeout: 600
        """,
        {},
        "external_services.services.knowledge_graph.graphrag",
        4,
        "at least one endpoint is required",
    ),
    (
        "provider that is not built in and has no protocol",
        """
        external_services:
          services:
            llm_services:
              opnai:
                models: [gpt-4]
        """,
        {},
        "external_services.services.llm_services.opnai",
        4,
        "unknown provider 'opnai'; did you mean 'openai'?",
    ),
    (
        "model entry without a name",
        """
        external_services:
          services:
            llm_services:
              openai:
                models:
                  - max_tokens: 5
        """,
        {},
        "external_services.services.llm_services.openai.models[0]",
        6,
        "missing required key 'name'",
    ),
    (
        "endpoint and endpoints both",
        """
        external_services:
          services:
            vector_databases:
              chroma:
                endpoint: http://a:1
                endpoints: [http://b:1]
        """,
        {},
        "external_services.services.vector_databases.chroma.endpoints",
        6,
        "set endpoint or endpoints, not both",
    ),
    (
        "options that are not a mapping",
        """
        external_services:
          services:
            llm_services:
              openai:
                options: [1, 2]
                models: [gpt-4]
        """,
        {},
        "external_services.services.llm_services.openai.options",
        5,
        "expected a mapping of options",
    ),
    (
        "duplicate YAML key",
        """
        external_services:
          communication:
            default_timeout: 5
            default_timeout: 6
        """,
        {},
        "external_services.communication.default_timeout",
        4,
        "duplicate key 'default_timeout' (first at line 3)",
    ),
    (
        "unknown policy group",
        """
        external_services:
          coordination:
            scheduling_policies:
              documents: {}
        """,
        {},
        "external_services.coordination.scheduling_policies.documents",
        4,
        "unknown key 'documents'",
    ),
    (
        "negative cache-read price",
        """
        external_services:
          services:
            llm_services:
              anthropic:
                models:
                  - name: claude
                    cache_read_input_cost_per_1k_tokens: -0.1
        """,
        {"ANTHROPIC_API_KEY": "k"},
        "external_services.services.llm_services.anthropic.models[0].cache_read_input_cost_per_1k_tokens",
        7,
        "must be a finite number >= 0",
    ),
    (
        "non-numeric cache-write price on a target",
        """
        external_services:
          services:
            llm_services:
              anthropic:
                models:
                  - name: claude
                    endpoints:
                      - url: https://api.anthropic.com
                        cache_write_input_cost_per_1k_tokens: cheap
        """,
        {"ANTHROPIC_API_KEY": "k"},
        "external_services.services.llm_services.anthropic.models[0].endpoints[0].cache_write_input_cost_per_1k_tokens",
        9,
        "expected a number",
    ),
    (
        "malformed reference",
        """
        external_services:
          communication:
            load_balancing:
              default_strategy: "${1BAD}"
        """,
        {},
        "external_services.communication.load_balancing.default_strategy",
        4,
        "invalid reference ${1BAD}",
    ),
]


@pytest.mark.parametrize(
    ("case", "text", "env", "path", "line", "fragment"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES]
)
def test_error_names_path_and_line(
    case: str, text: str, env: dict[str, str], path: str, line: int, fragment: str
) -> None:
    error = _errors(text, env)
    matching = [p for p in error.problems if p.path == path and p.line == line]
    assert matching, f"no problem at {path} line {line}: {error}"
    assert any(fragment in p.message for p in matching), str(error)
    assert f"test.yaml: {path} (line {line}): " in str(error)


def test_only_the_expected_problem_is_reported_for_a_bad_endpoint_variable() -> None:
    # An unreadable endpoint must not also produce "at least one endpoint is required".
    text = next(case[1] for case in ERROR_CASES if case[0] == "missing env var in a used service")
    error = _errors(text)
    assert len(error.problems) == 1, str(error)


def test_a_provider_level_problem_is_reported_once_not_per_model() -> None:
    error = _errors(
        """
        external_services:
          services:
            llm_services:
              openai:
                timeout: soon
                models: [a, b, c]
        """
    )
    assert [(p.path, p.line) for p in error.problems] == [
        ("external_services.services.llm_services.openai.timeout", 5)
    ]


def test_all_problems_are_collected() -> None:
    error = _errors(
        """
        external_services:
          coordination:
            service_discovery:
              failover_threshold: x
          communication:
            retry_policy:
              max_retries: 99
          services:
            llm_services:
              openai:
                models:
                  - name: gpt-4
                    priority: high
                    max_tokens: -5
        """
    )
    assert [p.line for p in error.problems] == [4, 7, 13, 14]
    assert len(str(error).splitlines()) == 4


STRUCTURE_CASES = [
    ("empty document", "", None, "empty"),
    ("comments only", "# nothing\n", None, "empty"),
    ("list at top level", "- a\n- b\n", 1, "top level must be a mapping"),
    ("scalar at top level", "hello\n", 1, "top level must be a mapping"),
    ("missing external_services", "services: {}\n", 1, "missing required key 'external_services'"),
    ("external_services not a mapping", "external_services: 3\n", 1, "expected a mapping"),
    ("syntax error: unclosed flow", "external_services:\n  services: [1\n", 3, "YAML syntax error"),
    ("syntax error: bad indentation", "external_services:\n  a: 1\n b: 2\n", 3, "YAML syntax error"),
    ("syntax error: tab", "external_services:\n\tservices: {}\n", 2, "YAML syntax error"),
    ("unknown tag", "external_services: !thing x\n", 1, "cannot read this value"),
    ("recursive alias", "external_services: &a\n  services: *a\n", None, "alias"),
]


@pytest.mark.parametrize(
    ("case", "text", "line", "fragment"), STRUCTURE_CASES, ids=[c[0] for c in STRUCTURE_CASES]
)
def test_document_structure_errors(case: str, text: str, line: int | None, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(text, env={})
    problems = caught.value.problems
    assert any(fragment in p.message for p in problems), str(caught.value)
    if line is not None:
        assert line in [p.line for p in problems], str(caught.value)
    assert str(caught.value).startswith("<config>: ")


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_file(tmp_path / "nope.yaml", env={})
    assert "cannot read the file" in str(caught.value)


# --- environment variables and secrets ---------------------------------------------------------

DISABLED = """
    external_services:
      services:
        llm_services:
          local_models:
            - name: llama
              enabled: {enabled}
              endpoint: ${{LLAMA_URL}}
            - name: other
              endpoint: http://other:8080
"""


def test_missing_variable_in_a_disabled_service_is_no_error_and_it_is_not_registered() -> None:
    services = _load(DISABLED.format(enabled="false"))
    assert list(services) == ["other"]


def test_missing_variable_in_an_enabled_service_is_an_error() -> None:
    error = _errors(DISABLED.format(enabled="true"))
    assert [(p.path, p.line) for p in error.problems] == [
        ("external_services.services.llm_services.local_models[0].endpoint", 7)
    ]


def test_a_disabled_service_still_reports_typos() -> None:
    error = _errors(
        """
        external_services:
          services:
            llm_services:
              openai:
                enabled: false
                models:
                  - name: gpt-4
                    max_tokns: 1
        """
    )
    assert [(p.path, p.line) for p in error.problems] == [
        ("external_services.services.llm_services.openai.models[0].max_tokns", 8)
    ]


def test_provider_level_enabled_false_disables_all_its_models() -> None:
    services = _load(
        """
        external_services:
          services:
            llm_services:
              openai:
                enabled: false
                models: [gpt-4, gpt-4o]
              anthropic:
                models: [claude]
        """
    )
    assert list(services) == ["claude"]


INTERPOLATION_CASES = [
    ("set", "${URL}", {"URL": "http://a:1"}, "http://a:1"),
    ("default used when unset", "${URL:-http://d:2}", {}, "http://d:2"),
    ("default used when empty", "${URL:-http://d:2}", {"URL": ""}, "http://d:2"),
    ("default ignored when set", "${URL:-http://d:2}", {"URL": "http://a:1"}, "http://a:1"),
    ("inside text", "http://${HOST}:${PORT:-80}/v1", {"HOST": "h"}, "http://h:80/v1"),
]


@pytest.mark.parametrize(
    ("case", "written", "env", "url"), INTERPOLATION_CASES, ids=[c[0] for c in INTERPOLATION_CASES]
)
def test_interpolation(case: str, written: str, env: dict[str, str], url: str) -> None:
    services = _load(
        f"""
        external_services:
          services:
            vector_databases:
              chroma:
                endpoint: "{written}"
        """,
        env,
    )
    assert services["chroma"].endpoints[0].url == url


def test_load_config_never_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_URL", "http://from-os-environ:1")
    error = _errors(DISABLED.format(enabled="true"), env={})
    assert "LLAMA_URL is not set" in str(error)


API_KEY_CASES = [
    ("env reference", "${MY_KEY}", SecretRef(env="MY_KEY")),
    ("file reference", "file:/run/secrets/openai", SecretRef(file="/run/secrets/openai")),
    ("null means no key", "null", None),
]


@pytest.mark.parametrize(("case", "written", "expected"), API_KEY_CASES, ids=[c[0] for c in API_KEY_CASES])
def test_api_key_forms(case: str, written: str, expected: SecretRef | None) -> None:
    services = _load(
        f"""
        external_services:
          services:
            llm_services:
              openai:
                models:
                  - name: gpt-4
                    api_key: {written}
        """,
        {"MY_KEY": "sk-should-never-be-read"},
    )
    assert services["gpt-4"].api_key == expected


SECRET = "sk-TOP-SECRET-value-42"


def test_secret_values_never_reach_describe() -> None:
    env = {"OPENAI_API_KEY": SECRET, "ANTHROPIC_API_KEY": SECRET, "PINECONE_API_KEY": SECRET}
    state = load_config_file(SEED_CONFIG, env=env)
    text = describe(state)
    assert SECRET not in text and SECRET not in repr(state)
    assert "env:OPENAI_API_KEY" in text


@pytest.mark.parametrize(
    "field",
    ["max_tokens", "timeout", "priority", "strategy", "cost_per_1k_tokens"],
)
def test_secret_values_never_reach_errors(field: str) -> None:
    # The env value lands in a field that rejects it; the message quotes what the file says.
    error = _errors(
        f"""
        external_services:
          services:
            llm_services:
              openai:
                api_key: ${{OPENAI_API_KEY}}
                models:
                  - name: gpt-4
                    {field}: ${{OPENAI_API_KEY}}
        """,
        {"OPENAI_API_KEY": SECRET},
    )
    assert SECRET not in str(error) and SECRET not in repr(error.problems)
    assert [p.line for p in error.problems] == [8]


def test_literal_secret_is_not_echoed() -> None:
    error = _errors(
        """
        external_services:
          services:
            vector_databases:
              pinecone:
                api_key: pc-literal-secret-123
        """
    )
    assert "pc-literal-secret-123" not in str(error)
    assert "literal secrets are not allowed" in str(error)


def test_credentials_in_a_url_are_not_echoed() -> None:
    error = _errors(
        """
        external_services:
          services:
            vector_databases:
              chroma:
                endpoint: http://admin:hunter2@chroma:8000
        """
    )
    assert "hunter2" not in str(error)


# --- shapes, inheritance and value forms ---------------------------------------------------------

DURATIONS = [
    (300, 300.0),
    (1.5, 1.5),
    ('"300ms"', 0.3),
    ('"5s"', 5.0),
    ('"2m"', 120.0),
    ('"1h"', 3600.0),
    ('"${T}"', 7.0),
]


@pytest.mark.parametrize(("written", "seconds"), DURATIONS)
def test_durations(written: object, seconds: float) -> None:
    services = _load(
        f"""
        external_services:
          services:
            knowledge_graph:
              graphrag:
                endpoint: http://g:1
                timeout: {written}
        """,
        {"T": "7"},
    )
    assert services["graphrag"].timeout_s == pytest.approx(seconds)


SIZES = [
    ("4Gi", 4 * 1024**3),
    ("512Mi", 512 * 1024**2),
    ("2G", 2 * 10**9),
    ("50MB", 50 * 10**6),
    ("1024", 1024),
    ("1.5Ki", 1536),
]


@pytest.mark.parametrize(("text", "size"), SIZES)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "4 Gigs", "-1", "4gi"])
def test_parse_size_rejects(text: str) -> None:
    assert parse_size(text) is None


@pytest.mark.parametrize(
    ("written", "size"), [('"512Mi"', 512 * 1024**2), ("1000000", 1000000), ('"2G"', 2 * 10**9)]
)
def test_default_memory_forms(written: str, size: int) -> None:
    state = load_config(
        _yaml(
            f"""
            external_services:
              coordination:
                resource_allocation:
                  default_memory: {written}
            """
        ),
        env={},
    )
    assert state.settings.resource_allocation.default_memory_bytes == size


def test_the_task_store_settings_are_read_and_described() -> None:
    state = load_config(_yaml(
        """
        external_services:
          coordination:
            resource_allocation:
              task_retention: 3d
              max_tasks_per_tenant: 50
              max_blobs_per_tenant: 0
              max_blob_bytes_per_tenant: 2Gi
              max_finished_tasks_per_tenant: 500
        """), env={})
    resources = state.settings.resource_allocation
    assert (resources.task_retention_s, resources.max_tasks_per_tenant, resources.max_blobs_per_tenant,
            resources.max_blob_bytes_per_tenant, resources.max_finished_tasks_per_tenant) == (
        3 * 86400.0, 50, 0, 2 * 1024**3, 500)
    line = next(x for x in describe(state).splitlines() if "task store:" in x)
    assert "deleted 3 days after they finish" in line and "beyond its newest 500 deleted sooner" in line
    assert "per tenant: 50 unfinished tasks, blobs not limited, 2Gi of blobs" in line
    defaults = next(x for x in describe(load_config(_yaml("external_services: {}"), env={})).splitlines()
                    if "task store:" in x)
    assert "7 days" in defaults and "10000 unfinished tasks, 10000 blobs, 1Gi of blobs" in defaults


def test_a_task_retention_of_zero_is_refused_naming_the_key_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_yaml(
            """
            external_services:
              coordination:
                resource_allocation:
                  task_retention: 0
            """), env={})
    text = str(info.value)
    assert "resource_allocation.task_retention" in text and "line 4" in text and "keep forever" in text


def test_provider_keys_are_inherited_and_models_override() -> None:
    services = _load(
        """
        external_services:
          services:
            llm_services:
              openai:
                endpoint: https://gateway.example.com/v1
                api_key: ${GATEWAY_KEY}
                timeout: 20
                options: {organization: org-1, beta: true}
                models:
                  - name: gpt-4
                    model: gpt-4-0613
                    options: {beta: false}
                  - name: gpt-4o
                    timeout: 5s
                    api_key: file:/keys/openai
                    endpoints:
                      - {id: east, url: "https://east.example.com/v1",
                         weight: 3, priority: 1, max_concurrency: 8}
                      - https://west.example.com/v1
        """
    )
    gpt4, gpt4o = services["gpt-4"], services["gpt-4o"]
    assert gpt4.endpoints == (EndpointSpec("default", "https://gateway.example.com/v1"),)
    assert gpt4.api_key == SecretRef(env="GATEWAY_KEY")
    assert gpt4.timeout_s == 20.0 and gpt4.model == "gpt-4-0613"
    assert gpt4.options_json == '{"beta":false,"organization":"org-1"}'
    assert gpt4o.endpoints == (
        EndpointSpec("east", "https://east.example.com/v1", weight=3, priority=1, max_concurrency=8),
        EndpointSpec("e1", "https://west.example.com/v1"),
    )
    assert gpt4o.api_key == SecretRef(file="/keys/openai")
    assert gpt4o.timeout_s == 5.0 and gpt4o.model == "gpt-4o"
    assert gpt4o.options_json == '{"beta":true,"organization":"org-1"}'


def test_full_model_entry() -> None:
    services = _load(
        """
        external_services:
          services:
            llm_services:
              anthropic:
                models:
                  - name: claude-3-5-sonnet
                    input_cost_per_1k_tokens: 0.003
                    output_cost_per_1k_tokens: 1.5e-2
                    cost_per_request: 0
                    max_tokens: 8192
                    priority: 9
                    capabilities: [chat, vision]
                    strategy: latency
                    metadata: {tier: "gold", regions: [us, eu], beta: true}
                    fallbacks: [claude-3-haiku]
                  - name: claude-3-haiku
        """
    )
    spec = services["claude-3-5-sonnet"]
    assert spec.pricing.input_cost_per_1k_tokens == 0.003 and spec.pricing.output_cost_per_1k_tokens == 0.015
    assert (spec.max_tokens, spec.priority, spec.strategy) == (8192, 9, "latency")
    assert spec.capabilities == ("chat", "vision")
    assert spec.metadata == (("beta", "true"), ("regions", "us,eu"), ("tier", "gold"))
    assert spec.fallbacks == ("claude-3-haiku",)
    assert spec.api_key == SecretRef(env="ANTHROPIC_API_KEY")


def test_custom_providers_embedding_and_renaming() -> None:
    services = _load(
        """
        external_services:
          services:
            llm_services:
              vllm:
                protocol: openai
                endpoint: http://vllm:8000/v1
                model: meta-llama/Llama-3-8B-Instruct
              azure:
                protocol: openai
                api_key: ${AZURE_KEY}
                endpoint: https://my.openai.azure.com/openai
                models: [gpt-4-azure]
            embedding_services:
              openai:
                models:
                  - name: text-embedding-3-small
                    cost_per_1k_tokens: 0.00002
            document_services:
              unstructured:
                name: unstructured-gpu
                endpoint: http://unstructured-gpu:8000
        """
    )
    assert list(services) == ["gpt-4-azure", "text-embedding-3-small", "unstructured-gpu", "vllm"]
    assert services["vllm"].protocol == "openai" and services["vllm"].api_key is None
    assert services["vllm"].model == "meta-llama/Llama-3-8B-Instruct"
    assert services["gpt-4-azure"].api_key == SecretRef(env="AZURE_KEY")
    embedding = services["text-embedding-3-small"]
    assert embedding.category is Category.EMBEDDING and embedding.pricing.cost_per_1k_tokens == 0.00002
    assert embedding.endpoints[0].url == "https://api.openai.com/v1"
    assert services["unstructured-gpu"].protocol == "unstructured"
    assert services["unstructured-gpu"].category is Category.DOCUMENT


def test_settings_merge_and_optional_keys() -> None:
    state = load_config(
        _yaml(
            """
            external_services:
              coordination:
                scheduling_policies:
                  vector_databases: {strategy: least_loaded}
                  embedding_services: {strategy: round_robin, timeout: 2m}
                  knowledge_graph: {max_queue_size: 4}
              communication:
                default_timeout: 45
                caching:
                  enabled: false
                  ttl: {llm_responses: 10m, embeddings: 60}
            """
        ),
        env={},
    )
    settings = state.settings
    assert settings.default_timeout_s == 45.0
    assert settings.cache.enabled is False
    assert dict(settings.cache.ttl_s) == {
        "document_parsing": 86400.0,
        "embeddings": 60.0,
        "llm_responses": 600.0,
    }
    policies = dict(settings.category_policies)
    assert list(policies) == ["embedding", "knowledge_graph", "vector_db"]
    assert policies["embedding"] == CategoryPolicy(strategy="round_robin", timeout_s=120.0)
    assert policies["knowledge_graph"].max_queue_size == 4


def test_yaml_merge_keys_share_provider_settings() -> None:
    services = _load(
        """
        external_services:
          services:
            llm_services:
              local_models:
                - &local
                  name: a
                  endpoint: http://llm:8080
                  max_tokens: 2048
                - <<: *local
                  name: b
                  max_tokens: 4096
        """
    )
    assert {name: s.max_tokens for name, s in services.items()} == {"a": 2048, "b": 4096}
    assert services["b"].endpoints[0].url == "http://llm:8080"


def test_merged_keys_may_be_overridden_but_written_keys_may_not_repeat() -> None:
    error = _errors(
        """
        external_services:
          services:
            llm_services:
              local_models:
                - &local {name: a, endpoint: "http://llm:8080"}
                - <<: *local
                  name: b
                  name: c
        """
    )
    assert [(p.line, p.message) for p in error.problems] == [(8, "duplicate key 'name' (first at line 7)")]


def test_unknown_top_level_key() -> None:
    error = _errors("x-shared: 1\nexternal_services: {}\n")
    assert [(p.path, p.line) for p in error.problems] == [("x-shared", 1)]


def test_empty_sections_are_allowed_and_default() -> None:
    state = load_config("external_services:\n  coordination:\n  communication:\n  services:\n", env={})
    assert state.services == ()
    assert state.settings.retry_policy.max_retries == 3


def test_config_error_is_a_value_error_with_source_prefix() -> None:
    error = _errors("external_services:\n  nope: 1\n")
    assert isinstance(error, ValueError)
    assert str(error).startswith("test.yaml: external_services.nope (line 2): unknown key 'nope'")
    assert len(str(error).splitlines()) == 1


# --- validation once per ApplyConfig ---------------------------------------------------------

ONE_SERVICE = ("external_services: {services: {llm_services: {local_models: "
               "[{name: local, protocol: openai, endpoint: 'http://127.0.0.1:9/v1'}]}}}")


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[RegistryState]:
    """Every validate_state call, from the loader and from the registry."""
    import switchgear.controlplane.config as config_module
    import switchgear.controlplane.registry as registry_module
    from switchgear.controlplane.validate import validate_state

    seen: list[RegistryState] = []

    def counting(state: RegistryState) -> list[Any]:
        seen.append(state)
        return validate_state(state)

    monkeypatch.setattr(config_module, "validate_state", counting)
    monkeypatch.setattr(registry_module, "validate_state", counting)
    return seen


async def test_apply_config_validates_the_state_once(control_plane: ControlPlane,
                                                     validations: list[RegistryState]) -> None:
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        reply = await admin.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=ONE_SERVICE, source="once.yaml"))
        assert list(reply.added) == ["local"] and len(validations) == 1
        # Other changes, which no loader has validated, are still validated by the registry.
        service = convert.service_to_proto(control_plane.registry.state.services[0])
        service.name = "other"
        await admin.RegisterService(admin_pb2.RegisterServiceRequest(service=service))
    assert len(validations) == 2 and [s.name for s in validations[1].services] == ["local", "other"]


def test_cache_prices_load_and_are_described_as_charged() -> None:
    state = load_config(_yaml("""
        external_services:
          services:
            llm_services:
              anthropic:
                models:
                  - name: claude
                    input_cost_per_1k_tokens: 0.003
                    output_cost_per_1k_tokens: 0.015
                    cache_read_input_cost_per_1k_tokens: 0.0003
                  - name: haiku
                    cost_per_1k_tokens: 0.001
        """), env={"ANTHROPIC_API_KEY": "k"})
    claude = next(s for s in state.services if s.name == "claude").pricing
    assert (claude.cache_read_input_cost_per_1k_tokens, claude.cache_write_input_cost_per_1k_tokens) == (0.0003, 0.0)
    lines = describe(state).splitlines()
    shown = {name: next(line for line in lines if line.strip().startswith(f"{name} ")) for name in ("claude", "haiku")}
    assert "cache read $0.0003 / write input price per 1k tokens" in shown["claude"]
    assert "$0.001/1k tokens, cache reads/writes at the input price" in shown["haiku"]


def test_metadata_an_agent_reads_loads_when_its_value_is_one_it_takes() -> None:
    metadata = {"processing_time_avg": '"30s"', "cache.ttl": "3600", "cache.shared": '"True"', "fallback": "local",
                "resources.memory": "8Gi", "resources.gpu": "0.5", "max_documents": "10"}
    text = _METADATA_CASE.format(key="metadata_version", value="1").replace(
        '                    processing_time_avg: "30s"\n',
        "".join(f"                    {key}: {value}\n" for key, value in metadata.items()))
    services = _load(text)
    assert dict(services["tiny"].metadata)["processing_time_avg"] == "30s"  # descriptive facts stay free
    assert dict(services["tiny"].metadata)["cache.ttl"] == "3600"
