"""Issue 21's acceptance with real processes: a hung target costs no caller more than its attempt
timeout plus one healthy attempt; a hedge's loser is cancelled upstream (the emulator sees the
client go away) and is charged nowhere.

Control plane, one agent (/metrics on) and one emulator process with instances a and b. Faults
are set at run time through `/_emulator/faults`; the agent's decisions are read from /metrics,
the control plane's per-endpoint usage from GetStats (the agents' load reports).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import orjson
import pytest

from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, gateway_pb2
from tests.test_end_to_end import wait_until
from tests.test_resilience_e2e import ResilienceCluster, emulator_stats, set_faults

pytestmark = pytest.mark.timeout(60)

FLOOR_S = 0.5  # the llm policy's attempt_timeout_floor below

CONFIG = """\
external_services:
  coordination:
    scheduling_policies:
      llm_services:
        strategy: "round_robin"
        attempt_timeout_floor: {floor}
        hedge_min_priority: 8
  communication:
    retry_policy:
      max_retries: 2
  services:
    llm_services:
      local_models:
"""


def config(floor: float, urls: dict[str, str], hedge_min_priority: int = 8) -> str:
    """Two services over the same two instances: "chat" (endpoints a, b) and "hedged" (ha, hb)."""
    text = CONFIG.format(floor=floor).replace("hedge_min_priority: 8", f"hedge_min_priority: {hedge_min_priority}")
    for name, prefix in (("chat", ""), ("hedged", "h")):
        endpoints = "".join(f'\n            - {{id: "{prefix}{n}", url: "{urls[n]}"}}' for n in ("a", "b"))
        # strategy round_robin on the service itself: it outranks the seed's "priority > 7 ->
        # latency" rule, so priority-9 calls keep taking round-robin turns (hedges are the subject)
        text += (f'        - name: "{name}"\n          model: "gpt-4o-mini"\n          timeout: 9\n'
                 f'          strategy: "round_robin"\n'
                 f"          cost_per_1k_tokens: 0.001\n          endpoints:{endpoints}\n")
    return text


def call(cluster: ResilienceCluster, service: str, priority: int = 0) -> tuple[gateway_pb2.InvokeResponse, float]:
    payload = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})
    start = time.monotonic()
    reply = cluster.gateway().Invoke(gateway_pb2.InvokeRequest(service=service, method="chat.completions",
                                                               payload=payload, priority=priority), timeout=10)
    return reply, time.monotonic() - start


def disconnects(url: str) -> int:
    return int(emulator_stats(url)["disconnects"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResilienceCluster]:
    c = ResilienceCluster(tmp_path_factory.mktemp("tail-e2e"))
    try:
        args = ["emulate", "openai", "--instance", "a:15", "--instance", "b:15"]
        line = c.start(Proc.switchgear("emulators", args, c.workdir), ready_prefix="{")
        c.urls = {n: f"http://127.0.0.1:{p}/v1" for n, p in json.loads("{" + line).items()}
        c.start_control_plane()
        c.start_agent_tuned()
        yaml = config(FLOOR_S, c.urls)
        reply = c.admin().ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=yaml, source="tail.yaml"), timeout=5)
        wait_until(lambda: c.acked(str(reply.version)), what="agent to ACK the config")
        for service in ("chat", "hedged"):  # warm: 20+ answers per endpoint before anything adapts
            for _ in range(44):
                call(c, service)
        yield c
    finally:
        c.stop()


def test_a_hung_target_costs_at_most_its_attempt_timeout_plus_one_healthy_attempt(cluster: ResilienceCluster) -> None:
    a, b = cluster.urls["a"], cluster.urls["b"]
    _, healthy = call(cluster, "chat")
    before = disconnects(a)
    set_faults(a, hang=True, latency_ms=15)
    try:
        timings = [call(cluster, "chat") for _ in range(12)]
    finally:
        set_faults(a, latency_ms=15)
    served = [reply.endpoint for reply, _ in timings]
    worst = max(elapsed for _, elapsed in timings)
    assert set(served) == {"b"}, served  # every call answered, by b
    # The call that met the hang waited its attempt timeout (the 0.5 s floor: a's p99 is ~20 ms),
    # then one healthy attempt; nobody waited out the 9 s deadline.
    assert FLOOR_S <= worst < FLOOR_S + healthy + 0.5, (worst, healthy)
    stuck = [elapsed for _, elapsed in timings if elapsed >= FLOOR_S]
    assert 1 <= len(stuck) <= 2, timings  # then a was judged slow (stalled) and left out
    assert cluster.decisions("chat", "a")["attempt_timeouts"] >= 1
    wait_until(lambda: disconnects(a) > before, 5, "the emulator to see the abandoned attempt's connection close")
    assert b != a


def test_a_hedge_s_loser_is_cancelled_upstream_and_charged_nowhere(cluster: ResilienceCluster) -> None:
    a = cluster.urls["a"]
    # ha in full rotation first: a test before this one may have left it judged slow (then
    # probed, and ramped back over its slow start).
    wait_until(lambda: [call(cluster, "hedged")[0].endpoint for _ in range(4)].count("ha") == 2, 20,
               "ha to take its round-robin turns again")
    plain, _ = call(cluster, "hedged")  # an answer's usage and cost, unhedged
    set_faults(a, latency_ms=1500)  # a answers, but 100x slower than its p95
    before = disconnects(a)
    try:
        replies = []
        for _ in range(4):  # round robin: two of these start on ha
            reply, elapsed = call(cluster, "hedged", priority=9)
            replies.append(reply)
            assert elapsed < 0.75, elapsed  # ~p95 (20 ms) + hb's answer, never a's 1.5 s
    finally:
        set_faults(a, latency_ms=15)
    assert {r.endpoint for r in replies} == {"hb"}
    hedged = [r for r in replies if r.attempts == 2]
    assert hedged, [r.attempts for r in replies]
    wait_until(lambda: disconnects(a) >= before + len(hedged), 5, "the emulator to see each loser's cancel")
    for r in replies:  # one answer's usage and cost each: the loser is not charged
        assert (r.usage.input_tokens, r.usage.output_tokens) == (plain.usage.input_tokens, plain.usage.output_tokens)
        assert r.usage.cost_usd == pytest.approx(plain.usage.cost_usd)
    assert cluster.decisions("hedged", "ha")["hedges"] >= len(hedged)
    assert cluster.decisions("hedged", "hb")["hedge_wins"] >= len(hedged)

    def reported() -> admin_pb2.EndpointStats | None:
        rows = cluster.admin().GetStats(admin_pb2.GetStatsRequest(service="hedged"), timeout=5).stats
        return next((r for r in rows if r.endpoint == "ha"), None)

    wait_until(lambda: (row := reported()) is not None and row.request_count >= 22, 10, "ha's load report")
    row = reported()
    assert row is not None and row.error_rate == 0.0  # a lost race is no failure of ha


def test_a_non_idempotent_or_low_priority_call_is_not_hedged(cluster: ResilienceCluster) -> None:
    a = cluster.urls["a"]
    set_faults(a, latency_ms=300)
    try:
        replies = [call(cluster, "hedged", priority=5)[0] for _ in range(2)]
    finally:
        set_faults(a, latency_ms=15)
    assert all(r.attempts == 1 for r in replies)  # priority 5 < the policy's hedge_min_priority 8


def test_an_out_of_range_policy_setting_is_refused_with_its_key_path(cluster: ResilienceCluster) -> None:
    """`config validate` refuses a bad setting with the key path, before any agent sees it."""
    bad = config(FLOOR_S, cluster.urls, hedge_min_priority=12)
    with pytest.raises(grpc.RpcError) as info:
        cluster.admin().ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=bad, source="bad.yaml"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hedge_min_priority" in (info.value.details() or "")
