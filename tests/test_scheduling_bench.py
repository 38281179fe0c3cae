"""The scheduling simulation drives the real scheduler; a few short runs keep it honest."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.scheduling.routers import ALL, make_router
from bench.scheduling.run import plot, summarise, verdicts
from bench.scheduling.sim import InstanceSpec, Scenario, Simulation, constant


def tiny(**fast: object) -> Scenario:
    spec = {"name": "fast", "ttft_s": 0.1, "per_token_s": 0.001, "capacity": 4, "queue_limit": 4,
            "input_price": 0.01, "output_price": 0.01, **fast}
    return Scenario(
        "tiny", "two instances", (
            InstanceSpec(**spec),  # type: ignore[arg-type]
            InstanceSpec("slow", 0.5, 0.004, 4, 50, input_price=0.001, output_price=0.001),
        ), constant(5.0), 5.0, duration_s=20.0, deadline_s=5.0, max_tokens=100,
    )


def run(scenario: Scenario, name: str, seed: int = 1):  # type: ignore[no-untyped-def]
    sim = Simulation(scenario, seed)
    sim.router = make_router(name, sim.clock, seed)
    return sim.run()


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_serves_a_calm_pool(name: str) -> None:
    s = summarise(name, run(tiny(), name))
    assert s.calls > 50 and s.success == 1.0 and s.cost_per_1k > 0


def test_same_seed_same_arrivals_and_a_deterministic_replay() -> None:
    a, b = run(tiny(), "latency"), run(tiny(), "latency")
    assert [(r.arrival, r.latency_s) for r in a] == [(r.arrival, r.latency_s) for r in b]
    assert sorted(r.arrival for r in run(tiny(), "round_robin")) == sorted(r.arrival for r in a)


def test_failures_fail_over_to_the_next_untried_endpoint() -> None:
    records = run(tiny(error=constant(1.0)), "round_robin")  # fast always answers 5xx
    assert all(r.ok for r in records)
    assert max(r.attempts for r in records) == 2


def test_a_black_hole_fails_calls_at_their_deadline_but_the_strategy_learns() -> None:
    scenario = tiny(down=lambda t: True)
    shuffled = summarise("simple_shuffle", run(scenario, "simple_shuffle"))
    latency = summarise("latency", run(scenario, "latency"))
    assert shuffled.p99_s == pytest.approx(5.0) and shuffled.success < 0.7
    assert latency.success > shuffled.success + 0.25


def test_verdicts_and_plot(tmp_path: Path) -> None:
    scenario = tiny()
    results = {name: run(scenario, name) for name in ALL}
    rows = {name: summarise(name, recs) for name, recs in results.items()}
    checks = verdicts(Scenario("dying", "t", scenario.instances, scenario.rate, 5.0), rows)
    assert len(checks) >= 6 and all(isinstance(ok, bool) for _, ok in checks)
    assert plot(scenario, results, tmp_path).stat().st_size > 1000
