"""The seed, item by item: the gaps docs/reference/seed-coverage.md found and closed, and the
checks that keep that page honest (every metric it names is exported, every config key it
names is accepted by the loader)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from switchgear.adapters import builtin_adapters
from switchgear.cli_config import describe, strategy_for
from switchgear.controlplane.config import ConfigError, load_config
from switchgear.controlplane.convert import service_from_proto, service_to_proto, snapshot_to_proto
from switchgear.controlplane.model import (
    STRATEGIES,
    STRATEGY_ALIASES,
    Category,
    EndpointSpec,
    RegistryState,
    ServiceSpec,
)
from switchgear.controlplane.snapshot import build
from switchgear.controlplane.validate import validate_state
from switchgear.dataplane.convert import snapshot_from_proto

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
    assert strategy_for(agent.services["graphrag"], agent.settings, 5) == canonical
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
