"""Issue 15's hang, with real processes: a route over a cheap and a dear emulated provider,
`cost_optimized`, and the llm policy's `stream_upstream` on. The cheap provider starts taking
new calls and never answering them; the agent learned its time to first token from the whole
answers it streamed upstream, so it reads the missing first tokens as silence and holds new
calls back from it (filters.not_silent), letting through at most one probe a second. The calls
the hung provider swallowed before that fail over at once (dataplane/abandon.py), the probes at
their first-token attempt timeout: every call succeeds.

Control plane, one agent, one emulator process with instances `cheap` and `dear`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, common_pb2, gateway_pb2
from tests.test_end_to_end import wait_until
from tests.test_resilience_e2e import ResilienceCluster, emulator_stats, invoke, set_faults

pytestmark = pytest.mark.timeout(120)

CONFIG = """\
external_services:
  coordination:
    scheduling_policies:
      llm_services: {strategy: cost_optimized, stream_upstream: true}
"""

PRICES = {"cheap": 0.001, "dear": 0.03}  # USD per 1k tokens
PACE_S = 0.1  # one call every 100 ms, as the simulation's ten a second
ANSWER = {"latency_ms": 40, "jitter_ms": 20, "token_delay_ms": 40}  # first token 40..60 ms, whole answer ~1 s


def route(urls: dict[str, str]) -> common_pb2.Service:
    return common_pb2.Service(
        name="gpt", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", model="gpt-4o-mini",
        pricing=common_pb2.Pricing(cost_per_1k_tokens=0.05),
        endpoints=[common_pb2.Endpoint(id=n, url=urls[n], weight=1, provider=f"provider-{n}",
                                       pricing=common_pb2.Pricing(cost_per_1k_tokens=p))
                   for n, p in PRICES.items()],
    )


def hung(url: str) -> int:
    """Calls the instance took and never answered."""
    return int(emulator_stats(url)["by_outcome"].get("hang", 0))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResilienceCluster]:
    c = ResilienceCluster(tmp_path_factory.mktemp("silence-e2e"))
    try:
        args = ["emulate", "openai", "--instance", "cheap:40", "--instance", "dear:40"]
        line = c.start(Proc.switchgear("emulators", args, c.workdir), ready_prefix="{")
        c.urls = {n: f"http://127.0.0.1:{p}/v1" for n, p in json.loads("{" + line).items()}
        c.start_control_plane()
        c.start_agent_tuned()
        c.admin().ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=CONFIG, source="silence.yaml"), timeout=5)
        reply = c.admin().RegisterService(admin_pb2.RegisterServiceRequest(service=route(c.urls)), timeout=5)
        wait_until(lambda: c.acked(str(reply.version)), what="agent to ACK the route")
        yield c
    finally:
        c.stop()


def paced(cluster: ResilienceCluster, pool: ThreadPoolExecutor, seconds: float,
          on_tick: list[tuple[float, int]] | None = None) -> list[Future[gateway_pb2.InvokeResponse]]:
    """A call every PACE_S for `seconds` (each may take up to 20 s: a swallowed probe waits for its
    first-token attempt timeout); with `on_tick`, (time, cheap's hung count) at every call."""
    calls: list[Future[gateway_pb2.InvokeResponse]] = []
    start = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        calls.append(pool.submit(invoke, cluster, "gpt", timeout_s=20))
        if on_tick is not None:
            on_tick.append((now, hung(cluster.urls["cheap"])))
        time.sleep(max(0.0, start + len(calls) * PACE_S - time.monotonic()))
    return calls


def test_a_provider_that_swallows_calls_is_left_within_seconds_and_every_call_is_served(
    cluster: ResilienceCluster,
) -> None:
    for url in cluster.urls.values():
        set_faults(url, **ANSWER)
    with ThreadPoolExecutor(64) as pool:
        # Warm-up: cost_optimized sends every call to the cheapest; the agent learns its time to
        # first token (the detector judges an endpoint only after 32 first tokens).
        warm = [f.result() for f in paced(cluster, pool, 5.0)]
        assert {r.endpoint for r in warm} == {"cheap"}
        assert emulator_stats(cluster.urls["cheap"])["streamed"] == len(warm)  # streamed upstream, all of them

        set_faults(cluster.urls["cheap"], **ANSWER, hang=True)
        faulted = time.monotonic()
        ticks: list[tuple[float, int]] = []
        during = paced(cluster, pool, 8.0, ticks)
        replies = [f.result() for f in during]

    # Every call succeeded: the swallowed ones at dear.
    assert all(r.endpoint in PRICES for r in replies)
    # The calls it swallowed before it was judged silent failed over at the judgement (~1 s), well
    # under the 5 s first-token floor they used to wait out; only the probes (at most one a second,
    # each let through to see it answer again) keep that timeout.
    failed_over = [r.latency.ToTimedelta().total_seconds() for r in replies if r.attempts > 1]
    assert failed_over and failed_over[0] < 3.0, failed_over
    assert sum(s >= 3.0 for s in failed_over) <= 8 + 1, failed_over
    swallowed = hung(cluster.urls["cheap"])
    assert swallowed >= 1  # it did take calls after the fault
    assert sum(r.endpoint == "dear" for r in replies) >= len(replies) - 2
    # Held back: after the first few seconds, cheap gets at most a probe a second. (Timing is
    # the benchmark's to measure — bench/scheduling — here only that it moves off at all, with
    # room for a loaded machine: the last 4 s of the 8 see at most 4 + 1 calls swallowed.)
    late = [n for t, n in ticks if t - faulted >= 4.0]
    assert late and late[-1] - late[0] <= 5, ticks
    # ...and all the calls sent while it hung number ~80: it swallowed far fewer.
    assert swallowed <= len(replies) // 3, (swallowed, len(replies))
    # An operator sees it: a decision counter, and one warning line when it went silent (not
    # one per held call), naming service and endpoint but not where the endpoint lives.
    assert cluster.decisions("gpt", "cheap")["silences"] >= 1
    assert cluster.decisions("gpt", "dear")["silences"] == 0
    agent = next(p for p in cluster.procs if p.name == "agent")
    lines = [line for line in agent.log_path.read_text(encoding="utf-8").splitlines() if ": silent (" in line]
    assert lines and len(lines) <= cluster.decisions("gpt", "cheap")["silences"], lines
    assert "service gpt endpoint cheap" in lines[0] and "127.0.0.1" not in lines[0]
