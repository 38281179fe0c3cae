"""Redis degraded mode: the state machine on a fake clock, then a real agent under load while
its real Redis is killed (SIGKILL) or hung (SIGSTOP), and brought back.

Acceptance (the issue): requests keep succeeding while Redis is gone (cache misses, local
counters), /metrics shows the degraded mode, and when Redis is back shared mode resumes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from switchgear.admin_client import admin_channel
from switchgear.dataplane.redis_state import RedisHealth, RedisUnavailable, SharedRedis
from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2_grpc, governance_pb2, governance_pb2_grpc
from tests.servers import RedisServer
from tests.test_end_to_end import wait_until
from tests.test_governance_e2e import CONFIG, request

pytestmark = pytest.mark.timeout(90)


# -- the state machine, on a fake clock -------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_failure_degrades_once_and_a_probe_per_interval_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "switchgear.dataplane.redis")
    clock = Clock()
    health = RedisHealth(probe_interval_s=0.5, clock=clock)
    started = health.started()
    assert started is not None and not health.degraded and not health.probe_due()

    health.failed("quota", TimeoutError(), started)
    health.failed("cache", ConnectionError(), started)  # a second call of the same outage
    assert health.degraded and health.started() is None  # calls now skip Redis
    assert health.failures == {"quota": 1, "cache": 1}
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # one line per outage

    assert not health.probe_due()
    clock.now += 0.5
    assert health.probe_due() and not health.probe_due()  # one probe per interval, not one per call
    clock.now += 0.3
    health.probe_failed()  # a slow probe restarts the interval when it ends
    clock.now += 0.4
    assert not health.probe_due()
    clock.now += 0.1
    assert health.probe_due()
    health.recovered()
    assert not health.degraded and health.started() == clock.now
    assert caplog.records[-1].levelname == "INFO"
    assert "redis reachable again; shared quotas and cache resume" in caplog.records[-1].getMessage()

    health.failed("quota", TimeoutError(), started)  # issued before the recovery: old news
    assert not health.degraded and health.failures["quota"] == 2
    health.recovered()  # not degraded: nothing to log
    assert len(caplog.records) == 2


class FakeClient:
    """Just enough of redis.asyncio for SharedRedis: its probe (INFO cluster) answers or raises
    on demand."""

    def __init__(self) -> None:
        self.up = False
        self.probes = 0
        self.closed = False

    async def info(self, section: str) -> dict[str, int]:
        assert section == "cluster"
        self.probes += 1
        if not self.up:
            raise ConnectionError("refused")
        return {"cluster_enabled": 0}

    async def aclose(self) -> None:
        self.closed = True


async def test_shared_redis_short_circuits_while_degraded_and_probes_in_the_background() -> None:
    clock, client = Clock(), FakeClient()
    shared = SharedRedis(client, RedisHealth(probe_interval_s=0.5, clock=clock))
    calls = 0

    async def op(fail: bool) -> str:
        nonlocal calls
        calls += 1
        if fail:
            raise ConnectionError("refused")
        return "ok"

    assert await shared.call("quota", lambda: op(False), 1.0) == "ok"
    with pytest.raises(RedisUnavailable):
        await shared.call("quota", lambda: op(True), 1.0)
    for _ in range(5):  # degraded: answered locally at once, Redis not called, no probe due yet
        with pytest.raises(RedisUnavailable):
            await shared.call("cache", lambda: op(False), 1.0)
    assert calls == 2 and shared.probing is None
    assert shared.health.fallbacks == {"quota": 1, "cache": 5}

    clock.now += 0.5
    with pytest.raises(RedisUnavailable):
        await shared.call("quota", lambda: op(False), 1.0)  # starts a probe, still answered locally
    assert shared.probing is not None
    await shared.probing
    assert client.probes == 1 and shared.health.degraded

    client.up = True
    clock.now += 0.5
    with pytest.raises(RedisUnavailable):
        await shared.call("quota", lambda: op(False), 1.0)
    await shared.probing
    assert not shared.health.degraded
    assert await shared.call("quota", lambda: op(False), 1.0) == "ok" and calls == 3
    await shared.aclose()
    assert client.closed


async def test_a_hung_call_costs_one_timeout_then_nothing() -> None:
    shared = SharedRedis(FakeClient(), RedisHealth(probe_interval_s=60.0))
    hung: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    start = time.perf_counter()
    with pytest.raises(RedisUnavailable):
        await shared.call("quota", lambda: hung, 0.05)
    with pytest.raises(RedisUnavailable):
        await shared.call("quota", lambda: hung, 0.05)
    assert time.perf_counter() - start < 1.0 and shared.health.failures["quota"] == 1


# -- a real agent, a real Redis, under load ----------------------------------------------------

CLIENTS = 4
QUOTA_TIMEOUT_S = 0.5  # server.py: the quota counters' per-call bound, the largest of the two


class Stack:
    """Upstream emulator, control plane and one agent with --redis and --metrics-listen."""

    def __init__(self, workdir: Path, redis_server: RedisServer) -> None:
        self.workdir = workdir
        self.redis = redis_server
        self.procs: list[Proc] = []

    def up(self) -> None:
        ports = json.loads("{" + self.start(
            Proc.switchgear("emulator", ["emulate", "openai", "--instance", "u:0"], self.workdir), ready_prefix="{"))
        db = self.workdir / "r.db"
        self.cp = self.start(Proc.switchgear(
            "cp", ["controlplane", "--db", str(db), "--listen", "127.0.0.1:0", "--admin-auth", "token", "--no-probes"],
            self.workdir))
        self.token = Path(f"{db}.admin-token").read_text().strip()
        self.agent = Proc.switchgear("agent", [
            "agent", "--control-plane", self.cp, "--listen", "127.0.0.1:0", "--node-id", "agent-r",
            "--auth", "api_key", "--redis", self.redis.url, "--metrics-listen", "127.0.0.1:0",
            "--agent-token-file", f"{db}.agent-token"], self.workdir)
        self.address = self.start(self.agent)
        metrics = self.agent.wait_line("METRICS ", 10).removeprefix("METRICS ").strip()
        self.metrics_url = f"http://{metrics}/metrics"
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel(self.cp, self.token))
        applied = admin.ApplyConfig(admin_pb2.ApplyConfigRequest(
            yaml=CONFIG.format(url=f"http://127.0.0.1:{ports['u']}/v1"), source="test.yaml"), timeout=10)
        self.converge(applied.version)
        gov = governance_pb2_grpc.GovernanceServiceStub(admin_channel(self.cp, self.token))
        policy = governance_pb2.TenantPolicy(requests_per_minute=1_000_000, tokens_per_minute=1_000_000_000)
        gov.CreateTenant(governance_pb2.CreateTenantRequest(
            tenant=governance_pb2.Tenant(id="loaded", policy=policy)), timeout=5)
        issued = gov.IssueKey(governance_pb2.IssueKeyRequest(tenant="loaded"), timeout=5)
        self.converge(issued.version)
        self.key = str(issued.secret)

    def start(self, proc: Proc, **kw: Any) -> str:
        self.procs.append(proc)
        return proc.start(**kw)

    def converge(self, version: str) -> None:
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel(self.cp, self.token))

        def acked() -> bool:
            agents = admin.ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).agents
            return any(a.node.id == "agent-r" and a.acked_version == version for a in agents)

        wait_until(acked, 15, f"the agent to ACK {version}")

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.metrics_url, timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        raise KeyError(name)

    def log_count(self, text: str) -> int:
        return self.agent.log_path.read_text(encoding="utf-8").count(text)

    def keys(self, pattern: str) -> list[bytes]:
        with redis.Redis(unix_socket_path=str(self.redis.socket), socket_timeout=2) as client:
            return list(client.scan_iter(pattern))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("redis-degraded")
    server = RedisServer(workdir)
    server.start()
    s = Stack(workdir, server)
    try:
        s.up()
        yield s
    finally:
        s.stop()
        server.stop()


class Load:
    """`total` requests from CLIENTS concurrent clients; `at(n, action)` runs `action` once the
    n-th request has completed. Texts repeat (memory hits) and are new (lookups in Redis)."""

    def __init__(self, stack: Stack, tag: str, total: int) -> None:
        self.stack, self.tag, self.total = stack, tag, total
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._actions: dict[int, Callable[[], None]] = {}

    def at(self, completed: int, action: Callable[[], None]) -> None:
        self._actions[completed] = action

    async def run(self) -> None:
        auth = (("authorization", f"Bearer {self.stack.key}"),)
        async with grpc.aio.insecure_channel(self.stack.address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            issued = iter(range(self.total))

            async def client() -> None:
                for i in issued:
                    start = time.perf_counter()
                    try:
                        await stub.Invoke(request(f"{self.tag} {i % 250}"), metadata=auth, timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        self.errors.append(f"{exc.code().name}: {exc.details()}")
                    self.latencies.append(time.perf_counter() - start)
                    action = self._actions.pop(len(self.latencies), None)
                    if action is not None:
                        action()

            await asyncio.gather(*(client() for _ in range(CLIENTS)))


async def eventually(stack: Stack, check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll `check` with one request per round: probes are started by traffic, not by a timer."""
    deadline = time.monotonic() + timeout_s
    n = 0
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        n += 1
        await Load(stack, f"poll {what} {n}", 1).run()
        await asyncio.sleep(0.05)


async def written_behind(check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Poll `check` without traffic: the cache stores reach Redis written behind, with the next
    round or the flush 50 ms after the last request."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def wait_shared(stack: Stack) -> None:
    await eventually(stack, lambda: stack.metric("switchgear_redis_degraded") == 0.0, "shared mode")


async def test_redis_killed_mid_load_then_restarted(stack: Stack) -> None:
    await wait_shared(stack)
    warned, recovered = stack.log_count("redis unavailable"), stack.log_count("redis reachable again")
    load = Load(stack, "kill", 300)
    load.at(100, stack.redis.kill)
    await load.run()
    assert load.errors == [] and len(load.latencies) == 300  # cache misses and local counters, no failures
    assert stack.metric("switchgear_redis_degraded") == 1.0
    # the first failure, of a quota or a cache call, degrades both: later calls skip Redis
    assert stack.metric("switchgear_redis_failures_total", use="quota") + stack.metric(
        "switchgear_redis_failures_total", use="cache") >= 1
    assert stack.metric("switchgear_redis_fallbacks_total", use="quota") >= 100  # the requests after the kill
    assert stack.metric("switchgear_redis_fallbacks_total", use="cache") >= 1
    assert stack.log_count("redis unavailable") == warned + 1

    stack.redis.start()  # same socket, empty data
    await wait_shared(stack)
    assert stack.log_count("redis reachable again; shared quotas and cache resume") == recovered + 1
    await Load(stack, "after restart", 5).run()
    assert stack.keys("sg:q:loaded|*")  # quota counters shared again
    await written_behind(lambda: bool(stack.keys("sg:c:*")), "cache stores in Redis")  # and the cache


async def test_redis_hung_mid_load_bounds_latency_then_resumes(stack: Stack) -> None:
    await wait_shared(stack)
    cached_before = len(stack.keys("sg:c:*"))
    warned, recovered = stack.log_count("redis unavailable"), stack.log_count("redis reachable again")
    load = Load(stack, "stop", 300)
    load.at(100, stack.redis.pause)
    try:
        await load.run()
        assert load.errors == []
        # No request waits on Redis for more than one timeout (plus a generous margin for a
        # loaded machine), and only those in flight while the hang was being noticed wait at all.
        assert max(load.latencies) < QUOTA_TIMEOUT_S + 2.0
        assert sum(latency > 0.4 for latency in load.latencies[100:]) <= 2 * CLIENTS
        assert statistics.median(load.latencies[100:]) < 0.25
        assert stack.metric("switchgear_redis_degraded") == 1.0
    finally:
        stack.redis.resume()
    await wait_shared(stack)
    assert (stack.log_count("redis unavailable"), stack.log_count("redis reachable again")) == (warned + 1,
                                                                                              recovered + 1)
    await Load(stack, "after resume", 5).run()
    await written_behind(lambda: len(stack.keys("sg:c:*")) > cached_before, "stores in Redis again")
