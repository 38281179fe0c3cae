"""Issue 4's acceptance, end to end: breakers, ejection, Retry-After, retry budget, fallbacks,
load shedding and the document queue, with real processes on loopback.

Control plane, one agent (breakers open 1 s, ejection 1 s, /metrics on) and OpenAI emulators:
one process with the steady instances, and instance `c` alone in a second process so it can be
SIGKILLed and restarted on the same port. Faults are set at run time through
`/_emulator/faults`; upstream attempts are counted at the emulators (`/_emulator/stats`), and
the agent's decisions are read from its /metrics (`switchgear_resilience_decisions_total`).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, gateway_pb2
from tests.test_end_to_end import Cluster, chat, wait_until
from tests.test_tasks_e2e import free_port

pytestmark = pytest.mark.timeout(60)

CONFIG = """\
external_services:
  coordination:
    resource_allocation:  # the seed's values: a deferred document task (4 CPUs, 8 GiB) still queues
      default_cpu: 2.0
      default_memory: "4Gi"
    scheduling_policies:
      llm_services:
        strategy: "round_robin"
        max_queue_size: 4
  communication:
    load_balancing:
      circuit_breaker_threshold: 3
    retry_policy:
      max_retries: 2
  services:
    llm_services:
      local_models:
        - name: "chat"
          model: "gpt-4o-mini"
          timeout: 5
          cost_per_1k_tokens: 0.001
          endpoints:
            - {{id: "a", url: "{a}"}}
            - {{id: "b", url: "{b}"}}
            - {{id: "c", url: "{c}"}}
        - name: "primary"
          model: "gpt-4o-mini"
          cost_per_1k_tokens: 0.002
          fallbacks: ["secondary"]
          metadata:
            preset_response: '{{"preset": true}}'
          endpoints:
            - {{id: "p", url: "{p}"}}
        - name: "secondary"
          model: "gpt-4o-mini"
          cost_per_1k_tokens: 0.002
          endpoints:
            - {{id: "s", url: "{s}"}}
        - name: "local"
          model: "gpt-4o-mini"
          capabilities: ["local"]
          endpoints:
            - {{id: "l", url: "{l}"}}
        - name: "burst"
          model: "gpt-4o-mini"
          cost_per_1k_tokens: 0.001
          endpoints:
            - {{id: "slow", url: "{slow}", max_concurrency: 2}}
    embedding_services:
      local_embedders:
        - name: "embed"
          protocol: "openai"
          model: "text-embedding-3-small"
          endpoint: "http://127.0.0.1:{dead_embed}/v1"
    document_services:
      parsers:
        - name: "parse"
          protocol: "openai"
          model: "doc"
          endpoint: "http://127.0.0.1:{dead_parse}/v1"
"""


class ResilienceCluster(Cluster):
    metrics = ""
    c_port = 0
    c_proc: Proc | None = None

    def start_agent_tuned(self) -> None:
        agent = Proc.switchgear("agent", [
            "agent", "--auth", "none", "--control-plane", self.cp_address, "--listen", "127.0.0.1:0", "--node-id", "agent-1",
            "--metrics-listen", "127.0.0.1:0", "--breaker-open", "1", "--ejection-time", "1",
            "--agent-token-file", f"{self.db}.agent-token",
        ], self.workdir)
        self.agent_address = self.start(agent)
        self.metrics = agent.wait_line("METRICS ", 10).split(" ", 1)[1].strip()

    def start_c(self, port: int = 0) -> None:
        spec = f"c:5:{port}" if port else "c:5"
        self.c_proc = Proc.switchgear(f"emulator-c-{len(self.procs)}", ["emulate", "openai", "--instance", spec],
                                      self.workdir)
        line = self.start(self.c_proc, ready_prefix="{")
        self.c_port = json.loads("{" + line)["c"]
        self.urls["c"] = f"http://127.0.0.1:{self.c_port}/v1"

    def decisions(self, service: str, endpoint: str) -> Counter[str]:
        """The agent's resilience counters of one endpoint ("" = the service), from /metrics."""
        text = urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5).read().decode()
        pattern = re.compile(r'^switchgear_resilience_decisions_total\{(.*)\} ([0-9.e+]+)$', re.M)
        found: Counter[str] = Counter()
        for labels, value in pattern.findall(text):
            got = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if got.get("service") == service and got.get("endpoint") == endpoint:
                found[got["decision"]] = int(float(value))
        return found


def emulator_root(url: str) -> str:
    return url.removesuffix("/v1")


def set_faults(url: str, **faults: Any) -> None:
    body = orjson.dumps({"reset": True, **faults})
    request = urllib.request.Request(f"{emulator_root(url)}/_emulator/faults", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).read()


def emulator_stats(url: str) -> dict[str, Any]:
    """The instance's `/_emulator/stats` (total, by_path, by_outcome, disconnects, streamed)."""
    stats: dict[str, Any] = json.loads(
        urllib.request.urlopen(f"{emulator_root(url)}/_emulator/stats", timeout=5).read())
    return stats


def hits(url: str) -> int:
    """Chat completions the instance answered. Not its total: the control plane's active health
    probes (GET /v1/models) land on it too, whenever their interval falls due."""
    return int(emulator_stats(url)["by_path"].get("/v1/chat/completions", 0))


def reset_stats(*urls: str) -> None:
    for url in urls:
        urllib.request.urlopen(urllib.request.Request(f"{emulator_root(url)}/_emulator/stats", method="DELETE"),
                               timeout=5).read()


def invoke(cluster: Cluster, service: str, method: str = "chat.completions", *, priority: int = 0,
           timeout_s: float = 10.0, request_id: str = "") -> gateway_pb2.InvokeResponse:
    payload = ({"messages": [{"role": "user", "content": "hi"}]} if method == "chat.completions"
               else {"input": ["hi"]})
    request = gateway_pb2.InvokeRequest(service=service, method=method, payload=orjson.dumps(payload),
                                        priority=priority, request_id=request_id)
    reply: gateway_pb2.InvokeResponse = cluster.gateway().Invoke(request, timeout=timeout_s)
    return reply


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResilienceCluster]:
    c = ResilienceCluster(tmp_path_factory.mktemp("resilience-e2e"))
    try:
        names = ("a", "b", "p", "s", "l")
        args = ["emulate", "openai"] + [x for n in names for x in ("--instance", f"{n}:5")]
        line = c.start(Proc.switchgear("emulators", [*args, "--instance", "slow:800"], c.workdir), ready_prefix="{")
        c.urls = {n: f"http://127.0.0.1:{p}/v1" for n, p in json.loads("{" + line).items()}
        c.start_c()
        c.start_control_plane()
        c.start_agent_tuned()
        yaml = CONFIG.format(**c.urls, dead_embed=free_port(), dead_parse=free_port())
        reply = c.admin().ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=yaml, source="resilience.yaml"), timeout=5)
        wait_until(lambda: c.acked(str(reply.version)), what="agent to ACK the resilience config")
        yield c
    finally:
        c.stop()


def test_killed_instance_is_routed_around_then_readmitted_after_half_open_probes(cluster: ResilienceCluster) -> None:
    stub = cluster.gateway()
    served: list[str] = []
    errors: list[grpc.RpcError] = []
    stop = threading.Event()

    def load() -> None:  # steady, bounded: 4 callers, one call at a time each
        while not stop.is_set():
            try:
                served.append(chat(stub, "chat").endpoint)
            except grpc.RpcError as exc:
                errors.append(exc)

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(load)
        try:
            wait_until(lambda: served.count("c") >= 5, 10, "c to take its share")
            assert cluster.c_proc is not None
            cluster.c_proc.kill()  # SIGKILL mid-run
            killed_at = len(served)
            wait_until(lambda: cluster.decisions("chat", "c")["trips"] >= 1, 10, "c's breaker to trip")
            wait_until(lambda: len(served) >= killed_at + 100, 10, "100 more calls served")
        finally:
            stop.set()
    assert errors == [], errors[:3]  # zero client-visible errors
    down = cluster.decisions("chat", "c")
    # Round robin would have sent c a third of 100+ calls; it got `threshold` (3) attempts, plus
    # at most one more per other caller already sent when the third failure tripped the breaker
    # (4 callers: 3 more), then only half-open probes: every attempt on dead c was a free connect
    # failover.
    assert down["trips"] >= 1 and 1 <= down["failovers"] <= 3 + 3 + down["probes"], down

    cluster.start_c(cluster.c_port)  # back on the same port

    def c_serves_again() -> bool:
        return any(chat(stub, "chat").endpoint == "c" for _ in range(6))

    wait_until(c_serves_again, 15, "traffic to return to c")
    assert cluster.decisions("chat", "c")["probes"] >= 1  # readmitted through a half-open probe
    counts = Counter(chat(stub, "chat").endpoint for _ in range(9))
    assert counts["c"] >= 2, counts  # closed again: c takes its round-robin share

    def trips_reported() -> bool:  # the agent's load reports carry the trip to the control plane
        rows = cluster.admin().GetStats(admin_pb2.GetStatsRequest(service="chat"), timeout=5).stats
        return any(r.endpoint == "c" and r.circuit_breaker_trips >= 1 for r in rows)

    wait_until(trips_reported, 10, "c's breaker trip in the control plane's GetStats")


def test_rate_limited_instance_is_avoided_for_its_retry_after_within_the_budget(cluster: ResilienceCluster) -> None:
    urls = [cluster.urls[n] for n in ("a", "b", "c")]
    wait_until(lambda: Counter(chat(cluster.gateway(), "chat").endpoint for _ in range(6))["c"] >= 1, 15,
               "c to be in rotation")
    set_faults(cluster.urls["b"], rate_limit_rate=1.0, retry_after_s=1)
    reset_stats(*urls)
    stub = cluster.gateway()
    start, calls = time.monotonic(), 0
    try:
        while time.monotonic() - start < 2.5:
            reply = chat(stub, "chat")
            assert reply.endpoint != "b"
            calls += 1
    finally:
        set_faults(cluster.urls["b"])
    elapsed = time.monotonic() - start
    b_hits = hits(cluster.urls["b"])
    attempts = sum(hits(u) for u in urls)
    # b is asked once, then held out for its Retry-After (1 s): one attempt per second at most.
    assert 1 <= b_hits <= 1 + int(elapsed / 1.0) + 1, (b_hits, elapsed)
    assert attempts == calls + b_hits  # every 429 cost exactly one failover, nothing else retried
    assert attempts - calls <= 3 * 10 + 0.2 * calls  # the retry budget (3/s floor over 10 s + 20 %)
    b = cluster.decisions("chat", "b")
    assert b["throttled"] >= b_hits and b["trips"] == 0  # 429 throttles, never trips


def test_all_instances_failing_follow_the_fallback_chain_in_order(cluster: ResilienceCluster) -> None:
    p, s, l_ = cluster.urls["p"], cluster.urls["s"], cluster.urls["l"]
    reset_stats(p, s, l_)
    set_faults(p, error_rate=1.0, error_status=500)
    set_faults(s, error_rate=1.0, error_status=500)
    try:
        reply = invoke(cluster, "primary")
        assert (reply.fallback, reply.fallback_source, reply.service, reply.endpoint) == (True, "local_model",
                                                                                          "local", "l")
        assert orjson.loads(reply.payload)["object"] == "chat.completion"
        assert (hits(p), hits(s), hits(l_)) == (3, 3, 1)  # primary, then secondary, then the local model
        assert reply.attempts == 7

        set_faults(l_, error_rate=1.0, error_status=500)  # the local model fails too: the preset answers
        reply = invoke(cluster, "primary")
        assert (reply.fallback, reply.fallback_source, reply.service, reply.endpoint) == (True, "preset_response",
                                                                                          "primary", "")
        assert orjson.loads(reply.payload) == {"preset": True}
        assert cluster.decisions("primary", "")["fallbacks"] >= 4
    finally:
        for url in (p, s, l_):
            set_faults(url)

    # No fallback configured (an embedding service, dead): a clear UNAVAILABLE, quickly.
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        invoke(cluster, "embed", "embeddings", timeout_s=10)
    elapsed = time.monotonic() - start
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "connect" in (info.value.details() or "")
    assert elapsed < 2.0, elapsed  # three attempts with 0.1 s-scale backoff, far from the 10 s deadline


def test_burst_of_twice_capacity_serves_high_priority_and_sheds_low(cluster: ResilienceCluster) -> None:
    """`slow` answers in 800 ms with max_concurrency 2; the llm queue holds 4: capacity 6.
    Twelve calls at once: 4 at priority 9 and 8 at priority 1, each with a 5 s deadline."""
    stub = cluster.gateway()
    payload = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})
    outcomes: list[tuple[int, grpc.StatusCode, float, dict[str, str]]] = []
    lock = threading.Lock()

    def one(priority: int) -> None:
        request = gateway_pb2.InvokeRequest(service="burst", method="chat.completions", payload=payload,
                                            priority=priority)
        start = time.monotonic()
        try:
            stub.Invoke(request, timeout=5)
            code, trailers = grpc.StatusCode.OK, {}
        except grpc.RpcError as exc:
            code, trailers = exc.code(), dict(exc.trailing_metadata() or ())
        with lock:
            outcomes.append((priority, code, time.monotonic() - start, trailers))

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(one, [1, 9, 1, 1, 9, 1, 1, 9, 1, 1, 9, 1]))
    high = [o for o in outcomes if o[0] == 9]
    low = [o for o in outcomes if o[0] == 1]
    assert all(code == grpc.StatusCode.OK for _, code, _, _ in high), high
    shed = [o for o in low if o[1] != grpc.StatusCode.OK]
    # 2 slots + 4 queued are served; the rest (6, fewer only if a slot frees before all arrive) is shed.
    assert len(shed) >= 4 and all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for _, code, _, _ in shed), outcomes
    assert all(int(t["retry-after"]) >= 1 and t["switchgear-shed"] == "queue_full" for _, _, _, t in shed)
    assert all(elapsed < 5.0 for _, _, elapsed, _ in outcomes)  # nobody waited past the deadline
    assert max(elapsed for _, _, elapsed, _ in shed) < 1.0  # shed at once, not after waiting
    assert cluster.decisions("burst", "slow")["sheds"] >= len(shed)


def test_document_request_to_a_dead_service_returns_the_task_id(cluster: ResilienceCluster) -> None:
    reply = invoke(cluster, "parse", request_id="doc-resilience-1", timeout_s=15)
    assert reply.fallback and reply.fallback_source == "task_queue" and reply.service == "parse"
    body = orjson.loads(reply.payload)
    assert body["processed"] is False and body["fallback"] is True
    assert body["task_id"] and body["queue_id"] == "queue_doc-resilience-1"
    again = invoke(cluster, "parse", request_id="doc-resilience-1", timeout_s=15)
    assert orjson.loads(again.payload)["task_id"] == body["task_id"]  # idempotent on the request id


def test_resilience_flags_are_documented(tmp_path: Path) -> None:
    page = (Path(__file__).parent.parent / "docs" / "concepts" / "resilience.md").read_text()
    assert "## Resilience" in page and "--breaker-open" in page
