"""resource_utilization with real processes: control plane, one agent, one emulator process.

- "elastic" sets no max_concurrency: its utilisation is unknown (GetStats capacity 0) until
  the agent has learned where its latency bends, then in-flight over that learned capacity,
  non-zero under concurrent load. The emulator has no queueing model, so the test makes the
  provider bend itself: fast while calls come one at a time, 15x slower once 8 run at once.
- "capped" sets max_concurrency 4: in-flight over 4 under the same load.
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, common_pb2
from tests.test_end_to_end import wait_until
from tests.test_resilience_e2e import ResilienceCluster, invoke, set_faults

pytestmark = pytest.mark.timeout(60)

CONFIG = """\
external_services:
  monitoring:
    report_interval: 200ms
"""


def llm(name: str, url: str, max_concurrency: int) -> common_pb2.Service:
    return common_pb2.Service(
        name=name, category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", model="gpt-4o-mini",
        endpoints=[common_pb2.Endpoint(id="e0", url=url, weight=1, max_concurrency=max_concurrency)],
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResilienceCluster]:
    c = ResilienceCluster(tmp_path_factory.mktemp("utilization-e2e"))
    try:
        args = ["emulate", "openai", "--instance", "elastic:20", "--instance", "capped:20"]
        line = c.start(Proc.switchgear("emulators", args, c.workdir), ready_prefix="{")
        c.urls = {n: f"http://127.0.0.1:{p}/v1" for n, p in json.loads("{" + line).items()}
        c.start_control_plane()
        c.start_agent_tuned()
        c.admin().ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=CONFIG, source="util.yaml"), timeout=5)
        for name, limit in (("elastic", 0), ("capped", 4)):
            reply = c.admin().RegisterService(admin_pb2.RegisterServiceRequest(
                service=llm(name, c.urls[name], limit)), timeout=5)
        wait_until(lambda: c.acked(str(reply.version)), what="agent to ACK the services")
        yield c
    finally:
        c.stop()


def endpoint_stats(cluster: ResilienceCluster, service: str) -> admin_pb2.EndpointStats:
    reply = cluster.admin().GetStats(admin_pb2.GetStatsRequest(service=service), timeout=5)
    return next(s for s in reply.stats if s.endpoint == "e0")


def agent_utilization(cluster: ResilienceCluster, service: str) -> float:
    """The agent's own switchgear_resource_utilization of the service's e0 (-1: no sample)."""
    text = urllib.request.urlopen(f"http://{cluster.metrics}/metrics", timeout=5).read().decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "switchgear_resource_utilization")
    found = [x.value for x in family.samples if x.labels.get("service") == service and x.labels.get("endpoint") == "e0"]
    return float(found[0]) if found else -1.0


def test_utilization_is_in_flight_over_the_learned_or_configured_capacity(cluster: ResilienceCluster) -> None:
    for _ in range(12):  # one at a time, 20 ms: the unloaded latency
        invoke(cluster, "elastic")
    invoke(cluster, "capped")
    wait_until(lambda: endpoint_stats(cluster, "elastic").request_count >= 12, 5, "the calls to be reported")
    elastic = endpoint_stats(cluster, "elastic")
    assert (elastic.capacity, elastic.resource_utilization) == (0, 0.0)  # unknown, not "idle"
    assert agent_utilization(cluster, "elastic") == -1.0  # the agent's /metrics: no sample
    assert endpoint_stats(cluster, "capped").capacity == 4

    set_faults(cluster.urls["elastic"], latency_ms=300)  # busy: 8 at once take 15x as long
    set_faults(cluster.urls["capped"], latency_ms=300)
    stop = threading.Event()

    def caller(i: int) -> None:
        while not stop.is_set():
            with contextlib.suppress(grpc.RpcError):  # shed by the capped service's queue: load goes on
                invoke(cluster, "elastic" if i % 2 == 0 else "capped", timeout_s=10)

    seen: dict[str, admin_pb2.EndpointStats] = {}

    def busy(service: str) -> bool:
        seen[service] = st = endpoint_stats(cluster, service)
        return st.capacity > 0 and st.in_flight > 0 and st.resource_utilization > 0

    with ThreadPoolExecutor(16) as pool:
        try:
            for i in range(16):
                pool.submit(caller, i)
            wait_until(lambda: busy("elastic"), 10, "a learned capacity and a utilisation for elastic")
            wait_until(lambda: busy("capped"), 5, "a utilisation for capped")
            wait_until(lambda: agent_utilization(cluster, "elastic") > 0, 5, "the agent's own figure")
        finally:
            stop.set()
    elastic, capped = seen["elastic"], seen["capped"]
    # learned where latency bent: a power of two between the unloaded level (1) and the load (8)
    assert elastic.capacity in (2, 4, 8), elastic
    assert elastic.resource_utilization == pytest.approx(elastic.in_flight / elastic.capacity)
    assert capped.capacity == 4 and capped.resource_utilization == pytest.approx(capped.in_flight / 4)
    total = next(s for s in cluster.admin().GetStats(admin_pb2.GetStatsRequest(service="elastic"), timeout=5).stats
                 if not s.endpoint)
    assert total.capacity > 0  # the service: over its endpoint of known capacity
    for n in ("elastic", "capped"):
        set_faults(cluster.urls[n], latency_ms=20)
