"""The seed, item by item: the gaps docs/reference/seed-coverage.md found and closed, and the
checks that keep that page honest (every metric it names is exported, every config key it
names is accepted by the loader)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from switchgear.adapters import builtin_adapters
from switchgear.cli_config import describe, strategy_for
from switchgear.controlplane import alerts as al
from switchgear.controlplane.collector import Collector, LoadDelta, WindowStats
from switchgear.controlplane.config import ConfigError, load_config
from switchgear.controlplane.convert import service_from_proto, service_to_proto, snapshot_to_proto
from switchgear.controlplane.metrics import ControlPlaneMetrics
from switchgear.controlplane.model import (
    STRATEGIES,
    STRATEGY_ALIASES,
    TOKENLESS_PROTOCOLS,
    Category,
    EndpointSpec,
    Pricing,
    RegistryState,
    ServiceSpec,
)
from switchgear.controlplane.monitor import Monitor
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.snapshot import build
from switchgear.controlplane.store import SqliteStore
from switchgear.controlplane.validate import validate_service, validate_state
from switchgear.dataplane.convert import snapshot_from_proto
from tests.conftest import service
from tests.test_metrics import families, value

ROOT = Path(__file__).resolve().parent.parent

# --- the seed's other strategy names ---------------------------------------------------------


def _aliased(alias: str) -> str:
    return textwrap.dedent(f"""
        external_services:
          coordination:
            scheduling_policies:
              document_processing:
                strategy: "{alias}"
          communication:
            load_balancing:
              default_strategy: "{alias}"
          services:
            knowledge_graph:
              graphrag:
                endpoint: "http://127.0.0.1:9"
                strategy: "{alias}"
    """)


@pytest.mark.parametrize(("alias", "canonical"), sorted(STRATEGY_ALIASES.items()))
def test_the_seeds_other_strategy_names_load_as_the_strategy_they_stand_for(alias: str, canonical: str) -> None:
    """The seed's LoadBalancingStrategy values and `_get_scheduling_strategy`'s answers
    (weighted_round_robin, least_connections, least_response_time, latency_optimized) are
    accepted wherever a strategy is, and agents run the strategy they stand for."""
    assert canonical in STRATEGIES and alias not in STRATEGIES
    state = load_config(_aliased(alias), env={})
    assert state.settings.default_strategy == canonical
    assert dict(state.settings.category_policies)["document"].strategy == canonical
    graph = state.service("graphrag")
    assert graph is not None and graph.strategy == canonical
    snapshot = build(state, 1)
    agent = snapshot_from_proto(snapshot_to_proto(snapshot), snapshot.version, builtin_adapters())
    assert agent.services["graphrag"].strategy == canonical
    assert strategy_for(graph, agent.settings, 5) == canonical
    assert alias not in describe(state)


@pytest.mark.parametrize(("alias", "canonical"), sorted(STRATEGY_ALIASES.items()))
def test_a_registration_naming_a_seed_alias_is_stored_as_the_strategy(alias: str, canonical: str) -> None:
    spec = ServiceSpec(name="kg", category=Category.KNOWLEDGE_GRAPH, protocol="graphrag",
                       endpoints=(EndpointSpec("e0", "http://127.0.0.1:9"),), strategy=alias)
    back = service_from_proto(service_to_proto(spec))
    assert back.strategy == canonical


def test_a_name_neither_the_project_nor_the_seed_uses_is_still_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_aliased("fastest_please"), env={})
    text = str(caught.value)
    assert "load_balancing.default_strategy" in text and "unknown strategy" in text
    spec = ServiceSpec(name="kg", category=Category.KNOWLEDGE_GRAPH, protocol="graphrag",
                       endpoints=(EndpointSpec("e0", "http://127.0.0.1:9"),), strategy="fastest_please")
    problems = list(validate_state(RegistryState(services=(service_from_proto(service_to_proto(spec)),))))
    assert any(p.path.endswith("strategy") for p in problems)


# --- what the seed's coordinator collects besides the ten metrics -----------------------------


@pytest.mark.parametrize(("condition", "parsed"), [
    ("requests_per_minute > 600", ("requests_per_minute", ">", 600.0)),
    ("cost_per_request > 0.05", ("cost_per_request", ">", 0.05)),
    ("current_load > 0.8", ("resource_utilization", ">", 0.8)),  # the seed's name for utilisation
])
def test_alert_rules_may_name_what_the_seeds_coordinator_collects(
        condition: str, parsed: tuple[str, str, float]) -> None:
    assert al.parse_condition(condition) == parsed
    with pytest.raises(al.RuleError, match="unknown metric 'current_loads'"):
        al.parse_condition("current_loads > 0.8")


def test_requests_per_minute_and_cost_per_request_are_figured_over_the_window() -> None:
    stats = WindowStats(window_s=60.0, issued=30, succeeded=10, errors=(("retryable", 20),), cost_usd=0.5)
    assert stats.figure("requests_per_minute") == 30.0
    assert stats.figure("cost_per_request") == pytest.approx(0.05)  # failed attempts cost nothing
    empty = WindowStats(window_s=60.0)
    assert (empty.figure("requests_per_minute"), empty.figure("cost_per_request")) == (0.0, 0.0)


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_configured_rule_on_cost_per_request_fires_and_both_are_exported(tmp_path: Path) -> None:
    """From the config to the firing alert and /metrics, through the real registry and monitor."""
    state = load_config(textwrap.dedent("""
        external_services:
          monitoring:
            alert_window: 60
            alert_rules:
              dear_calls: {condition: "cost_per_request > 0.05", severity: warning, min_requests: 5}
              busy: {condition: "requests_per_minute > 100", severity: info, min_requests: 0}
    """), env={})
    store = SqliteStore(tmp_path / "r.db")
    try:
        registry = Registry(store)
        registry.register(service("chat", "http://127.0.0.1:9/v1"), "test")
        registry.replace(dataclasses.replace(registry.state, settings=state.settings), "test", "rules.yaml")
        mono, wall = _Clock(1000.0), _Clock(1_700_000_000.0)
        collector = Collector()
        monitor = Monitor(registry, collector, clock=mono, wall=wall, overrides={"health_debounce_s": 0.0})
        collector.record("agent-1", [LoadDelta(service="chat", endpoint="e0", category="llm", issued=20, succeeded=20,
                                               latency_sum_s=2.0, latency_count=20, cost_usd=2.0)], mono.now)
        mono.now += 0.5
        wall.now += 0.5
        monitor.tick()
        assert [a.rule.name for a in monitor.evaluator.firing()] == ["dear_calls"]  # 0.1 USD a call; 20/min
        fams = families(ControlPlaneMetrics(monitor, seq=lambda: 1, agents=lambda: 1, reports=lambda: 1))
        assert value(fams, "switchgear_cost_per_request", endpoint="e0") == pytest.approx(0.1)
        assert value(fams, "switchgear_service_cost_per_request", service="chat") == pytest.approx(0.1)
        assert value(fams, "switchgear_requests_per_minute", endpoint="e0") == pytest.approx(20.0)
    finally:
        store.close()


# --- protocols whose answers carry no tokens ---------------------------------------------------


async def _tokenless_usage(protocol: str) -> tuple[int, int]:
    """The usage one real-shaped answer of `protocol` reports (chroma: a mock of its REST v2
    heartbeat; pinecone: its emulator's describe_index and query)."""
    import httpx
    import orjson

    from switchgear.adapters.base import AdapterRequest, Target
    from switchgear.emulators import pinecone as emu

    adapter = builtin_adapters()[protocol]
    if protocol == "chroma":
        beat = orjson.dumps({"nanosecond heartbeat": 1})
        transport = httpx.MockTransport(lambda r: httpx.Response(200, content=beat))
        async with httpx.AsyncClient(transport=transport) as client:
            answer = await adapter.invoke(client, Target("http://127.0.0.1:9", options=adapter.parse_options({})),
                                          AdapterRequest("heartbeat", {}, 5))
        return answer.usage.input_tokens, answer.usage.output_tokens
    async with await emu.start(api_key="pc-key", dimension=3) as up, httpx.AsyncClient() as client:
        target = Target(up.url, api_key="pc-key", options=adapter.parse_options({"index_name": "knowledge-base"}))
        answer = await adapter.invoke(client, target, AdapterRequest("query", {"vector": [1, 0, 0], "topK": 1}, 5))
        return answer.usage.input_tokens, answer.usage.output_tokens


@pytest.mark.parametrize("protocol", sorted(TOKENLESS_PROTOCOLS))
async def test_the_tokenless_protocols_answers_carry_no_tokens(protocol: str) -> None:
    """Why a token price or a tpm_limit on these is refused: their adapters report no usage."""
    assert await _tokenless_usage(protocol) == (0, 0)
    problems = validate_service(ServiceSpec(
        name="v", category=Category.VECTOR_DB, protocol=protocol, endpoints=(EndpointSpec("e0", "http://127.0.0.1:9"),),
        pricing=Pricing(cost_per_request=0.001)))
    assert problems == []  # a price per call is how they are priced


# --- the coverage page stays honest ------------------------------------------------------------

PAGE = ROOT / "docs" / "reference" / "seed-coverage.md"


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


def _exported_families() -> set[str]:
    """Every family the agent's and the control plane's collectors yield, as the generated
    metrics reference names them (scripts/gen_reference.py, which tests/test_docs.py keeps fresh)."""
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return set(re.findall(r"^\| `(switchgear_\w+)` \|", module.metrics_markdown(), re.M))


def test_every_metric_family_the_page_names_is_exported(page: str) -> None:
    named = {m for m in re.findall(r"\bswitchgear_[a-z_]+", page) if not m.endswith("_")}
    assert len(named) >= 12, named  # the seed's ten and then some: the pattern did not go blind
    assert named <= _exported_families(), named - _exported_families()


def _document(path: str) -> dict[str, Any]:
    """A document that sets the dotted key `path` ("a.b[].c": b is a list of one mapping) to null."""
    root: dict[str, Any] = {}
    node = root
    parts = path.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part.endswith("[]"):
            item: dict[str, Any] = {}
            node[part[:-2]] = [item]
            node = item
        elif last:
            node[part] = None
        else:
            node = node.setdefault(part, {})
    return root


def _unknown_keys(path: str) -> list[str]:
    try:
        load_config(yaml.safe_dump(_document(path)), env={})
    except ConfigError as exc:
        return [str(p) for p in exc.problems if "unknown key" in p.message]
    return []


def test_every_config_key_the_page_names_is_accepted_by_the_loader(page: str) -> None:
    keys = {re.sub(r"<[^>]*>", "x", k) for k in re.findall(r"`(external_services\.[a-z_.\[\]<>]+)`", page)}
    assert len(keys) >= 40, keys  # every key of the seed's file is on the page
    assert {k: _unknown_keys(k) for k in sorted(keys) if _unknown_keys(k)} == {}
    # the check itself can fail: a key the loader does not know is reported
    assert _unknown_keys("external_services.communication.load_balancing.no_such_key")
    assert _unknown_keys("external_services.services.llm_services.openai.models[].no_such_key")


def test_every_module_test_file_and_test_function_the_page_names_exists(page: str) -> None:
    for path in set(re.findall(r"`((?:switchgear|tests|scripts)/[\w/]+\.py)`", page)):
        assert (ROOT / path).is_file(), path
    cited = re.findall(r"`(tests/test_\w+\.py)` \(([^)]*)\)", page)
    assert len(cited) >= 40
    for path, names in cited:
        text = (ROOT / path).read_text(encoding="utf-8")
        for name in re.findall(r"`(test_\w+)`", names):
            assert re.search(rf"^(async )?def {name}\(", text, re.M), f"{path} has no {name}"


def test_every_status_is_one_of_the_three_and_every_missing_row_says_what_is_absent(page: str) -> None:
    rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| ---")
            and not line.startswith("| seed ")]
    assert len(rows) > 100
    for row in rows:
        status = row.rstrip(" |").rsplit(" | ", 1)[1]
        assert status.startswith(("built", "built differently", "missing")), row
        if status.startswith("built differently"):
            assert ":" in status, f"say why it is better: {row}"
        if status.startswith("missing"):
            assert len(status) > 80, f"say precisely what is absent: {row}"


def _leaf_paths(node: Any, prefix: str) -> list[str]:
    if isinstance(node, dict):
        return [p for key, child in node.items() for p in _leaf_paths(child, f"{prefix}.{key}" if prefix else key)]
    if isinstance(node, list) and node and all(isinstance(item, dict) for item in node):
        return sorted({p for item in node for p in _leaf_paths(item, prefix + "[]")})
    return [prefix]


def test_every_key_of_the_seeds_config_has_a_row(page: str) -> None:
    """Each leaf of config/external_services_unified.yaml is on the page: by its whole path, or
    by its name in a row about its siblings ("... `max_tokens`, `priority`)")."""
    seed = yaml.safe_load((ROOT / "config" / "external_services_unified.yaml").read_text(encoding="utf-8"))
    leaves = _leaf_paths(seed, "")
    assert len(leaves) >= 40
    rows = [line for line in page.splitlines() if line.startswith("| `external_services.")]
    for path in leaves:
        parent, _, leaf = path.rpartition(".")
        assert any(f"`{path}`" in row or (f"`{parent}." in row and f"`{leaf}`" in row) for row in rows), path


def test_every_seed_metric_alert_rule_and_strategy_has_a_row(page: str) -> None:
    from switchgear.controlplane.collector import SEED_METRICS
    from switchgear.controlplane.model import MonitoringSettings

    assert all(f"| `{metric}` " in page for metric in SEED_METRICS)
    for rule in MonitoringSettings().alert_rules:
        assert f"| `{rule.name}` | `{rule.condition}`, {rule.severity} | `{rule.action}`" in page, rule.name
    assert all(f"`{name}`" in page for name in (*STRATEGIES, *STRATEGY_ALIASES))
