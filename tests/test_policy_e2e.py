"""A per-category scheduling policy from config takes effect on a running agent.

Real processes (control plane, agent, OpenAI emulator with a 5 ms instance and a 15 ms one:
slower, but within the 4x of its peers past which every strategy takes an endpoint out of rotation).
The config's scheduling_policies.llm_services says round_robin: traffic alternates. An
ApplyConfig that only changes that policy to `latency` produces a new snapshot; the agent
applies it without restarting and, with the latency statistics it gathered meanwhile (kept
across the swap: same service and endpoint names), sends nearly every call to the fast one.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from switchgear.supervise import Proc
from tests.test_end_to_end import Cluster, chat

pytestmark = pytest.mark.timeout(60)

CONFIG = """\
external_services:
  coordination:
    scheduling_policies:
      llm_services:
        strategy: "{strategy}"
  communication:
    retry_policy:
      max_retries: 1
  services:
    llm_services:
      local_models:
        - name: "chat"
          model: "gpt-4o-mini"
          timeout: 5
          endpoints:
            - id: "a"
              url: "{a}"
            - id: "b"
              url: "{b}"
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("policy-e2e"))
    try:
        line = c.start(
            Proc.switchgear("emulators", ["emulate", "openai", "--instance", "a:5", "--instance", "b:15"], c.workdir),
            ready_prefix="{",
        )
        c.urls = {n: f"http://127.0.0.1:{p}/v1" for n, p in json.loads("{" + line).items()}
        c.start_control_plane()
        c.start_agent()
        yield c
    finally:
        c.stop()


def apply(cluster: Cluster, strategy: str) -> str:
    return cluster.apply_config(CONFIG.format(strategy=strategy, a=cluster.urls["a"], b=cluster.urls["b"]),
                                f"policy-{strategy}.yaml")


def spread(cluster: Cluster, n: int, version: str) -> Counter[str]:
    stub = cluster.gateway()
    replies = [chat(stub, "chat", f"question {i}") for i in range(n)]
    assert {r.snapshot_version for r in replies} == {version}
    return Counter(r.endpoint for r in replies)


def test_category_policy_change_applies_to_a_running_agent(cluster: Cluster) -> None:
    first = apply(cluster, "round_robin")
    assert spread(cluster, 10, first) == {"a": 5, "b": 5}

    agent_pid = cluster.procs[-1].pid
    second = apply(cluster, "latency")
    assert second != first
    counts = spread(cluster, 20, second)
    assert counts["a"] >= 18, counts  # a answers in ~5 ms, b in ~15 ms
    assert cluster.procs[-1].pid == agent_pid  # same agent process: no restart

    third = apply(cluster, "round_robin")
    assert spread(cluster, 10, third) == {"a": 5, "b": 5}


def test_config_without_a_policy_still_spreads_equal_prices(cluster: Cluster, tmp_path: Path) -> None:
    """No llm policy: the seed's rule picks cost_optimized; with equal prices it must not pin
    one endpoint (ties are taken in turn)."""
    yaml = CONFIG.replace('    scheduling_policies:\n      llm_services:\n        strategy: "{strategy}"\n', "")
    yaml = yaml.replace("  coordination:\n", "").format(a=cluster.urls["a"], b=cluster.urls["b"])
    version = cluster.apply_config(yaml, "plain.yaml")
    counts = spread(cluster, 10, version)
    assert counts == {"a": 5, "b": 5}
