"""The seed's config as written: every key it sets has the effect an agent (or the control plane)
actually applies, and `config validate` prints those same values; its document fallback queues
a task with no flags beyond `make demo`'s."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest

from switchgear.adapters import builtin_adapters
from switchgear.cli_config import backoff_for, describe, strategy_for, timeout_for
from switchgear.controlplane.config import load_config_file
from switchgear.controlplane.convert import snapshot_to_proto
from switchgear.controlplane.model import SEED_LLM_PRESET, RegistryState, ServiceSpec
from switchgear.controlplane.snapshot import build
from switchgear.controlplane.tasks import allocator
from switchgear.dataplane.convert import RequestError, snapshot_from_proto
from switchgear.dataplane.resilience.backoff import BackoffPolicy, policy_for
from switchgear.dataplane.scheduling.model import Bounds
from switchgear.dataplane.scheduling.policy import bounds_for
from switchgear.dataplane.service_rules import check_request
from switchgear.dataplane.snapshot import AgentSnapshot
from switchgear.supervise import Proc
from switchgear.v1 import gateway_pb2, tasks_pb2, tasks_pb2_grpc
from tests.test_end_to_end import Cluster, wait_until
from tests.test_tasks_e2e import free_port

ROOT = Path(__file__).resolve().parent.parent
SEED_CONFIG = ROOT / "config" / "external_services_unified.yaml"
GIB = 1024**3


@pytest.fixture(scope="module")
def seed() -> RegistryState:
    return load_config_file(SEED_CONFIG, env={})


@pytest.fixture(scope="module")
def agent(seed: RegistryState) -> AgentSnapshot:
    """The snapshot an agent runs with: through the wire form, as a real agent receives it."""
    snapshot = build(seed, 1)
    return snapshot_from_proto(snapshot_to_proto(snapshot), snapshot.version, builtin_adapters())


@pytest.fixture(scope="module")
def printed(seed: RegistryState) -> dict[str, str]:
    """`config validate`'s lines: each service's row by name, each settings line by its head."""
    lines = describe(seed).splitlines()
    rows = {line.split()[0]: line for line in lines[1:] if line.startswith("  ") and not line.startswith("   ")}
    return rows


def spec(seed: RegistryState, name: str) -> ServiceSpec:
    found = seed.service(name)
    assert found is not None
    return found


def test_coordination_keys(seed: RegistryState, agent: AgentSnapshot, printed: dict[str, str]) -> None:
    settings = seed.settings
    # service_discovery: the control plane probes every 30 s and ejects after 3 failures
    discovery = settings.service_discovery
    assert (discovery.cache_ttl_s, discovery.health_check_interval_s, discovery.failover_threshold) == (300, 30, 3)
    assert agent.settings.discovery_cache_ttl_s == 300.0  # client.py: how long health verdicts outlive the CP
    assert "discovery: cache ttl 300s (an agent cut off" in printed["discovery:"]
    assert "health check every 30s, failover after 3 failures" in printed["discovery:"]
    # resource_allocation: the per-task request of the categories without a row of their own
    resources = settings.resource_allocation
    assert allocator.requirements("vector_db", {}, resources) == allocator.Resources(2.0, 4 * GIB, 0, 0, 50)
    assert allocator.requirements("document", {}, resources).cpu == 4.0  # the seed's own row
    assert "embedding 2 cpu/4Gi" in printed["resources:"] and "max concurrent tasks 100" in printed["resources:"]
    # scheduling_policies.llm_services: priority 5 -> cost_optimized, 9 -> latency; its bounds
    llm = agent.settings.category_policies["llm"]
    assert (llm.strategy, llm.max_cost_per_request, llm.min_success_rate) == ("cost_optimized", 0.05, 0.95)
    assert bounds_for("llm", agent.settings.category_policies) == Bounds(max_cost_usd=0.05, min_success_rate=0.95)
    for name in ("gpt-4", "gpt-3.5-turbo", "claude-3-sonnet", "llama2-7b"):
        assert (strategy_for(spec(seed, name), agent.settings, 5), strategy_for(spec(seed, name), agent.settings, 9)) \
            == ("cost_optimized", "latency")
        assert "strategy p5=cost_optimized p9=latency" in printed[name]
    # scheduling_policies.document_processing: least_loaded, a queue of 50, 300 s for every call
    document = agent.settings.category_policies["document"]
    assert (document.strategy, document.max_queue_size, document.timeout_s) == ("least_loaded", 50, 300.0)
    assert timeout_for(spec(seed, "unstructured"), agent.settings) == 300.0
    assert "strategy p5=least_loaded p9=least_loaded" in printed["unstructured"]
    assert "timeout=300s" in printed["unstructured"]


def test_communication_keys(seed: RegistryState, agent: AgentSnapshot, printed: dict[str, str]) -> None:
    settings = agent.settings
    # load_balancing: intelligent for the categories without a rule; breakers open after 5
    assert settings.default_strategy == "intelligent" and settings.breaker_failure_threshold == 5
    assert strategy_for(spec(seed, "chroma"), settings, 5) == "intelligent"
    assert "strategy p5=intelligent p9=intelligent" in printed["chroma"]
    assert seed.settings.health_check_timeout_s == 5.0 and "health check timeout 5s" in printed["default"]
    assert "circuit breaker opens after 5 failures" in printed["retry:"]
    # caching: on, the seed's three TTLs
    assert settings.cache_enabled
    assert dict(settings.cache_ttl_s) == {"llm_responses": 3600.0, "document_parsing": 86400.0,
                                         "embeddings": 604800.0}
    assert "cache: on; ttl document_parsing=86400s, embeddings=604800s, llm_responses=3600s" in printed["cache:"]
    # retry_policy: 3 retries, exponential, 1 s .. 30 s — as written, for every category
    for category in ("llm", "document", "vector_db"):
        assert policy_for(category, settings.retry) == BackoffPolicy("exponential", 1.0, 30.0, max_retries=3)
        assert backoff_for(category, settings) == (1.0, 30.0)
    assert "retry: up to 3, exponential backoff 1s..30s" in printed["retry:"]
    # no fallback key: the seed's llm preset answer
    assert dict(settings.preset_responses) == {"llm": SEED_LLM_PRESET}
    assert f'preset llm: "{SEED_LLM_PRESET}"' in printed["fallback:"]


def test_services_keys(seed: RegistryState, agent: AgentSnapshot, printed: dict[str, str]) -> None:
    services = agent.services
    expected = {"gpt-4": (0.03, 4096, 10), "gpt-3.5-turbo": (0.002, 4096, 5), "claude-3-sonnet": (0.015, 4096, 8),
                "llama2-7b": (0.0, 2048, 3)}
    for name, (price, max_tokens, priority) in expected.items():
        view = services[name]
        assert (view.pricing.cost_per_1k_tokens, view.max_tokens, view.priority, view.model) == (
            price, max_tokens, priority, name)
        assert f"priority={priority}" in printed[name] and f"model={name}" in printed[name]
    assert services["llama2-7b"].endpoints[0].url == "http://local-llm:8080"
    assert services["graphrag"].timeout_s == 600.0 and "timeout=600s" in printed["graphrag"]
    assert services["pinecone"].api_key is not None and services["pinecone"].api_key.env == "PINECONE_API_KEY"
    assert services["pinecone"].options.environment == "us-west1-gcp"
    assert services["pinecone"].options.index_name == "knowledge-base"
    assert "index=knowledge-base  environment=us-west1-gcp (the index must be there)" in printed["pinecone"]
    # whose data a call reaches (adapters/_scope.py): the configured scope, whatever a payload names
    assert "scope=pinecone index knowledge-base, namespace ''" in printed["pinecone"]
    assert "scope=chroma tenant default_tenant, database default_database" in printed["chroma"]
    # the limits: enforced before the upstream, printed on the service's row
    parse = services["unstructured"]
    with pytest.raises(RequestError, match="max_file_size is 50MB"):
        check_request(parse, "partition", {"file": {"name": "a.pdf", "content_base64": "A" * 66_666_672}})
    with pytest.raises(RequestError, match="supported_formats"):
        check_request(parse, "partition", {"file": {"name": "a.txt", "content_base64": "AAAA"}})
    assert "max_file_size=50MB  supported_formats=pdf,docx,xlsx,pptx,html" in printed["unstructured"]
    with pytest.raises(RequestError, match="max_documents is 1000"):
        check_request(services["graphrag"], "index", {"documents": [{"id": "x", "text": "t"}] * 1001})
    assert "max_documents=1000" in printed["graphrag"]
    with pytest.raises(RequestError, match="collections"):
        check_request(services["chroma"], "query", {"collection": "other"})
    assert "collections=documents,chunks,embeddings" in printed["chroma"]


# --- the document fallback, end to end ---------------------------------------------------------


@pytest.fixture(scope="module")
def seed_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A control plane on the seed's config and one agent, started with the flags `make demo`
    gives them (plus --no-probes: the seed's upstreams are on the internet, tests stay on
    loopback). The one change to the file: the document service lives on a dead loopback port."""
    workdir = tmp_path_factory.mktemp("seed-config")
    text = SEED_CONFIG.read_text(encoding="utf-8")
    config = workdir / "seed.yaml"
    config.write_text(text.replace("http://unstructured:8000", f"http://127.0.0.1:{free_port()}"), encoding="utf-8")
    cluster = Cluster(workdir)
    try:
        args = ["controlplane", "--admin-auth", "none", "--db", str(cluster.db), "--listen", "127.0.0.1:0",
                "--config", str(config), "--no-probes"]
        cluster.cp = Proc.switchgear("controlplane", args, workdir)
        cluster.cp_address = cluster.start(cluster.cp)
        cluster.start_agent()
        wait_until(lambda: (status := cluster.agent_status()) is not None and bool(status.acked_version),
                   what="the agent to take the seed's snapshot")
        yield cluster
    finally:
        cluster.stop()


def test_seed_config_as_written_queues_the_document_fallback(seed_cluster: Cluster) -> None:
    pdf = base64.b64encode(b"%PDF-1.4 not really").decode()
    request = gateway_pb2.InvokeRequest(
        request_id="seed-doc-1", service="unstructured", method="partition",
        payload=orjson.dumps({"file": {"name": "report.pdf", "content_base64": pdf}}))
    reply = seed_cluster.gateway().Invoke(request, timeout=20)
    assert reply.fallback and reply.fallback_source == "task_queue"
    body = orjson.loads(reply.payload)
    assert body["processed"] is False and body["queue_id"] == "queue_seed-doc-1" and body["task_id"]
    tasks = tasks_pb2_grpc.TasksServiceStub(grpc.insecure_channel(seed_cluster.cp_address))
    task = tasks.GetTask(tasks_pb2.GetTaskRequest(id=body["task_id"]), timeout=5).task
    assert task.state == tasks_pb2.TASK_STATE_QUEUED  # queued for later, not failed for resources
    assert task.service == "unstructured"


def test_seed_config_refuses_a_format_it_does_not_list_before_queueing(seed_cluster: Cluster) -> None:
    request = gateway_pb2.InvokeRequest(
        request_id="seed-doc-2", service="unstructured", method="partition",
        payload=orjson.dumps({"file": {"name": "notes.txt", "content_base64": "AAAA"}}))
    with pytest.raises(grpc.RpcError) as caught:
        seed_cluster.gateway().Invoke(request, timeout=20)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "payload.file.name" in (caught.value.details() or "")  # type: ignore[attr-defined]


def test_config_validate_prints_the_seeds_effective_values(seed: RegistryState) -> None:
    """The command prints `describe`'s summary, the one the tests above read."""
    out = subprocess.run([sys.executable, "-m", "switchgear", "config", "validate", str(SEED_CONFIG)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert describe(seed) in out
