"""Active health checks: what is probed, how often, what counts, and ejection after the
failover threshold, against httpx.MockTransport and the real OpenAI emulator."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import httpx
import pytest

from switchgear.controlplane.collector import Collector
from switchgear.controlplane.convert import snapshot_to_proto
from switchgear.controlplane.monitor import Monitor
from switchgear.controlplane.probes import Prober, outcome, probe_url
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore
from switchgear.emulators.openai import Faults, InstanceSpec, start_instances
from switchgear.v1 import common_pb2
from tests.conftest import service

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_probe_urls_and_outcomes() -> None:
    assert probe_url(service("s", "http://h:1/v1/"), service("s", "http://h:1/v1/").endpoints[0]) == "http://h:1/v1/models"
    chroma = service("v", "http://h:2", protocol="chroma")
    assert probe_url(chroma, chroma.endpoints[0]) == "http://h:2/api/v2/heartbeat"
    other = service("d", "http://h:3/base", protocol="http_json")
    assert probe_url(other, other.endpoints[0]) == "http://h:3/base"
    assert [outcome(s) for s in (200, 401, 403, 404, 429, 500, 503)] == [True, True, True, True, None, False, False]


async def test_at_most_one_probe_per_interval_and_none_with_live_traffic() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        assert "authorization" not in request.headers  # the control plane holds no keys
        return httpx.Response(503)

    clock = Clock()
    live: dict[tuple[str, str], float] = {("chat", "e1"): 995.0}  # e1 served traffic 5 s ago
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        prober = Prober(client, lambda key: live.get(key, -math.inf), clock=clock)
        spec = service("chat", "http://a/v1", "http://b/v1")
        assert await prober.run_due([spec], 30.0, 5.0) == 1  # e0 only
        assert seen == ["http://a/v1/models"] and prober.failures("chat", "e0") == 1
        clock.now += 10
        assert await prober.run_due([spec], 30.0, 5.0) == 0  # inside the interval
        for _ in range(2):
            clock.now += 30
            await prober.run_due([spec], 30.0, 5.0)
        assert prober.failures("chat", "e0") == 3
        assert prober.failures("chat", "e1") == 2  # its live success aged out, then it was probed


async def test_probes_against_the_emulator_eject_after_the_failover_threshold_and_recover(tmp_path: Path) -> None:
    async with await start_instances([InstanceSpec("up"), InstanceSpec("down", faults=Faults(error_rate=1.0))]) as emu:
        store = SqliteStore(tmp_path / "r.db")
        registry = Registry(store)
        registry.register(service("chat", emu.urls["up"], emu.urls["down"]), "test")
        clock = Clock()
        collector = Collector()
        async with httpx.AsyncClient() as client:
            prober = Prober(client, collector.last_success_at, clock=clock)
            monitor = Monitor(registry, collector, prober=prober, clock=clock, overrides={"health_debounce_s": 0.0})
            for _ in range(3):  # failover_threshold (3) consecutive failures, one per interval (30 s)
                await prober.run_due(registry.state.services, 30.0, 5.0)
                clock.now += 30.0
                monitor.tick()
            assert prober.failures("chat", "e1") == 3 and prober.failures("chat", "e0") == 0
            served = {e.id: e.health for e in snapshot_to_proto(registry.snapshot).services[0].endpoints}
            assert served == {"e0": common_pb2.HEALTH_STATE_HEALTHY, "e1": common_pb2.HEALTH_STATE_EJECTED}
            assert any("health checks failed" in e.detail for e in registry.audit(5))
            emu.set_faults("down", Faults())
            await prober.run_due(registry.state.services, 30.0, 5.0)
            monitor.tick()
            served = {e.id: e.health for e in snapshot_to_proto(registry.snapshot).services[0].endpoints}
            assert served["e1"] == common_pb2.HEALTH_STATE_HEALTHY
        assert emu.stats("down")["by_path"] == {"/v1/models": 4}
        store.close()


async def test_a_probe_gives_up_at_the_health_check_timeout_it_is_given() -> None:
    """`load_balancing.health_check_timeout` is each probe's own timeout: an endpoint answering
    in 1 s is down for a 0.2 s timeout ("timeout") and up for a 5 s one."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    async def slow_models(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_get("/v1/models", slow_models)
    clock = Clock()
    async with TestServer(app, host="127.0.0.1") as server, httpx.AsyncClient() as client:
        prober = Prober(client, lambda key: -math.inf, clock=clock)
        spec = service("chat", f"http://127.0.0.1:{server.port}/v1")
        assert await prober.run_due([spec], 30.0, 0.2) == 1
        state = prober.state("chat", "e0")
        assert state is not None and (state.failures, state.last_status) == (1, "timeout")
        clock.now += 30
        assert await prober.run_due([spec], 30.0, 5.0) == 1
        assert (state.failures, state.last_status) == (0, "HTTP 200")
