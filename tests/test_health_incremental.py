"""The health tick's shortcut for quiet services (no data in the window, nothing the clock
changes) gives exactly what full scoring gives: verdicts, the scorer's memory, and the overlay
the monitor publishes, over random sequences of reports, time steps, probe failures, drains,
ejections, parameter changes and registry changes."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from switchgear.controlplane import health as hl
from switchgear.controlplane.collector import Collector, LoadDelta
from switchgear.controlplane.model import EndpointSpec, RegistryState, ServiceSpec
from switchgear.controlplane.monitor import Monitor
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.snapshot import EndpointOverride
from switchgear.controlplane.store import SqliteStore
from tests.conftest import service
from tests.test_health_probes import Clock

pytestmark = pytest.mark.timeout(60)

WINDOW_S = 10.0
# short blackout and ejections, so that they start, run out and settle within a run
PARAMS = hl.HealthParams(blackout_s=2.0, base_ejection_s=5.0, max_ejection_s=20.0)
STEPS = (0.3, 1.0, 1.0, 2.0, 3.0, 6.0, 11.0, 31.0)


def report(rng: random.Random, collector: Collector, keys: Sequence[tuple[str, str]], now: float) -> None:
    """A report from one of two agents on a few of `keys`: counts, errors, latency, in flight."""
    deltas = []
    for s, e in rng.sample(list(keys), k=min(len(keys), rng.choice((1, 1, 2, 4)))):
        n = rng.choice((1, 5, 12, 30))
        failed = round(n * rng.choice((0.0, 0.0, 0.1, 0.5, 0.9, 1.0)))
        ok = n - failed
        latency = rng.choice((0.01, 0.05, 0.1, 0.4))
        deltas.append(LoadDelta(service=s, endpoint=e, category="llm", issued=n, succeeded=ok,
                                failed=(("timeout", failed),) if failed else (),
                                latency_sum_s=latency * n, latency_count=n,
                                success_latency_sum_s=latency * ok, success_latency_count=ok,
                                in_flight=rng.choice((0, 0, 3))))
    collector.record(rng.choice(("a1", "a2")), deltas, now)


class FullScorer(hl.HealthScorer):
    """Scores every service every time: the reference the shortcut must match."""

    def evaluate(self, now: float, endpoints: Sequence[hl.EndpointInput], sample: hl.SampleFn,
                 first_seen: Callable[[str, str], float],
                 active: Callable[[str], bool] | None = None) -> dict[tuple[str, str], hl.Verdict]:
        return super().evaluate(now, endpoints, sample, first_seen)


@pytest.mark.parametrize("seed", range(4))
def test_quiet_services_keep_exactly_the_verdicts_full_scoring_gives(seed: int) -> None:
    rng = random.Random(seed)
    collector = Collector()
    full, quick = FullScorer(PARAMS), hl.HealthScorer(PARAMS)
    inputs: dict[tuple[str, str], hl.EndpointInput] = {}
    for i in range(10):
        for j in range(rng.choice((1, 2, 3))):
            inputs[(f"s{i}", f"e{j}")] = hl.EndpointInput(f"s{i}", f"e{j}")
    now, kept, ejected, previous = 1000.0, 0, 0, dict[tuple[str, str], hl.Verdict]()
    for step in range(400):
        op = rng.random()
        if op < 0.4:
            now += rng.choice(STEPS)
        elif op < 0.65:
            report(rng, collector, [k for k in inputs if int(k[0][1:]) % 3 == step % 3], now)  # some stay quiet
        elif op < 0.8:  # an endpoint's inputs change (or are rebuilt equal)
            key = rng.choice(sorted(inputs))
            inputs[key] = dataclasses.replace(inputs[key], **rng.choice((
                {"probe_failures": rng.choice((0, 0, 1, 2, 3))}, {"draining": rng.random() < 0.5},
                {"weight": rng.choice((1, 2, 5))}, {"max_concurrency": rng.choice((0, 4))}, {})))
        elif op < 0.88:  # registry changes: endpoints and services come and go
            s, e = f"s{rng.randrange(12)}", f"e{rng.randrange(3)}"
            if (s, e) in inputs:
                del inputs[(s, e)]
            else:
                inputs[(s, e)] = hl.EndpointInput(s, e)
        else:  # parameters change (min_requests 0 turns the shortcut off)
            params = dataclasses.replace(full.params, **rng.choice((
                {"failover_threshold": rng.choice((2, 3))}, {"min_requests": rng.choice((0, 10))},
                {"blackout_s": rng.choice((0.0, 2.0))})))
            full.params, quick.params = params, params
        got = evaluate_both(full, quick, collector, [inputs[k] for k in sorted(inputs)], now)
        kept += sum(1 for k, v in got.items() if previous.get(k) is v)
        ejected += sum(1 for v in got.values() if v.state == hl.EJECTED and v.reason.startswith("error rate"))
        previous = got
    assert kept > 500  # the shortcut was taken (a kept verdict is the very same object)
    assert ejected > 0  # and error-rate ejections started (and ran out: the clock moves on)


def spec(name: str, weights: Sequence[int]) -> ServiceSpec:
    base = service(name, *[f"http://127.0.0.1:9/{name}/{i}" for i in range(len(weights))])
    return dataclasses.replace(base, endpoints=tuple(
        EndpointSpec(id=e.id, url=e.url, weight=w) for e, w in zip(base.endpoints, weights, strict=True)))


def overrides(state: RegistryState, verdicts: dict[tuple[str, str], hl.Verdict],
              top: int) -> tuple[tuple[str, EndpointOverride], ...]:
    """The overlay's endpoint overrides as the monitor defines them, computed the long way."""
    out = []
    for s in state.services:
        mine = [verdicts.get((s.name, e.id)) for e in s.endpoints]
        if any(v is not None and (v.state != hl.HEALTHY or v.bucket != top) for v in mine):
            out += [(f"{s.name}/{e.id}", EndpointOverride(v.weight, v.state) if v else
                     EndpointOverride(e.weight * top, hl.HEALTHY)) for e, v in zip(s.endpoints, mine, strict=True)]
    return tuple(sorted(out))


def test_the_monitor_publishes_the_same_overlays_with_the_shortcut(tmp_path: Path) -> None:
    rng = random.Random(7)
    clock = Clock()
    collector = Collector()
    registries = [Registry(SqliteStore(tmp_path / f"{i}.db")) for i in range(2)]
    names = [f"s{i}" for i in range(8)]
    for registry in registries:
        registry.replace(RegistryState(services=tuple(spec(n, [1, 2]) for n in names)), "test", "test")
    settings = {"health_debounce_s": 0.0, "health_window_s": WINDOW_S}
    quick, full = (Monitor(r, collector, params=PARAMS, clock=clock, overrides=settings) for r in registries)
    full._scorer = FullScorer(PARAMS)
    for step in range(150):
        op = rng.random()
        if op < 0.45:
            clock.now += rng.choice(STEPS)
        elif op < 0.8:
            keys = [(s.name, e.id) for s in registries[0].state.services for e in s.endpoints]
            report(rng, collector, [k for k in keys if k[0] in names[:4]], clock.now)
        else:  # a service registered, re-weighted or removed, on both registries alike
            name = rng.choice(names)
            if registries[0].state.service(name) and rng.random() < 0.4:
                for registry in registries:
                    registry.deregister(name, "test")
            else:
                new = spec(name, [rng.choice((1, 3)) for _ in range(rng.choice((1, 2, 3)))])
                for registry in registries:
                    registry.register(new, "test")
        quick.tick()
        full.tick()
        state = registries[0].state
        assert quick._verdicts == full._verdicts, f"step {step}"
        assert registries[0].snapshot.overlay == registries[1].snapshot.overlay, f"step {step}"
        assert registries[0].snapshot.overlay.endpoints == overrides(state, quick._verdicts, PARAMS.weight_buckets)
        assert quick._inputs(state) == [hl.EndpointInput(s.name, e.id, e.weight, e.max_concurrency)
                                        for s in state.services for e in s.endpoints]
    assert quick.versions_published == full.versions_published > 0



def test_without_a_minimum_of_requests_a_quiet_service_is_scored_in_full() -> None:
    """min_requests 0 makes an endpoint without data usable once its blackout settles, which
    the clock alone decides: then its in-flight gauge (fresh for longer than the window) weighs
    it down, which only scoring sees (so there is no shortcut)."""
    params = dataclasses.replace(PARAMS, min_requests=0, blackout_s=2 * WINDOW_S)
    collector = Collector()
    full, quick = FullScorer(params), hl.HealthScorer(params)
    endpoints = [hl.EndpointInput("s", "e0", max_concurrency=4), hl.EndpointInput("s", "e1", max_concurrency=4)]
    now = 1000.0
    collector.record("a1", [LoadDelta(service="s", endpoint="e0", issued=1, succeeded=1, in_flight=3),
                            LoadDelta(service="s", endpoint="e1", issued=1, succeeded=1)], now)
    buckets = []
    for _ in range(25):  # the data expires after 10 s, the blackout ends after 20
        now += 1.0
        buckets.append(evaluate_both(full, quick, collector, endpoints, now)[("s", "e0")].bucket)
    assert buckets[0] == buckets[15] == PARAMS.weight_buckets > buckets[-1]


def evaluate_both(full: hl.HealthScorer, quick: hl.HealthScorer, collector: Collector,
                  endpoints: list[hl.EndpointInput], now: float) -> dict[tuple[str, str], hl.Verdict]:
    """Both scorers' verdicts, asserted equal (and their memories); the shortcut's returned."""
    def sample(s: str, e: str, since: float) -> hl.Sample:
        return hl.Sample(*collector.sample((s, e), WINDOW_S, now, since))

    def first(s: str, e: str) -> float:
        return collector.first_data_at((s, e))

    expected = full.evaluate(now, endpoints, sample, first)
    got = quick.evaluate(now, endpoints, sample, first, collector.active_services(WINDOW_S, now).__contains__)
    assert got == expected
    assert quick._memory == full._memory
    return got


def test_gauges_summed_once_per_tick_match_each_agents_latest_report() -> None:
    """The collector sums every key's gauges in one pass (kept until a report, a departure or
    another `now`): the sums are each fresh agent's latest figures, whatever came between."""
    rng = random.Random(3)
    collector = Collector(gauge_ttl_s=5.0)
    latest: dict[str, tuple[float, dict[tuple[str, str], tuple[int, int]]]] = {}  # agent -> (at, gauges)
    keys = [(f"s{i}", "e0") for i in range(6)]
    now = 1000.0
    for _ in range(300):
        op = rng.random()
        if op < 0.3:
            now += rng.choice((0.5, 1.0, 2.0, 6.0))
        elif op < 0.9:
            agent = f"a{rng.randrange(8)}"
            gauges = {k: (rng.randrange(4), rng.randrange(3)) for k in rng.sample(keys, k=rng.randrange(4))}
            collector.record(agent, [LoadDelta(service=s, endpoint=e, in_flight=f, queue_length=q)
                                     for (s, e), (f, q) in gauges.items()], now)
            latest[agent] = (now, {k: g for k, g in gauges.items() if g != (0, 0)})
        else:
            agent = f"a{rng.randrange(8)}"
            collector.agent_gone(agent)
            latest.pop(agent, None)
        for when in (now, now + 3.0, now):  # another `now` between two reads at the same one
            fresh = [g for at, g in latest.values() if when - at <= 5.0]
            for key in keys:
                expected = (sum(g.get(key, (0, 0))[0] for g in fresh), sum(g.get(key, (0, 0))[1] for g in fresh))
                stats = collector.stats(key, WINDOW_S, when)
                assert (collector.in_flight(key, when), stats.queue_length) == expected == (stats.in_flight,
                                                                                           stats.queue_length)
