"""The scheduling simulation drives the real scheduler; a few short runs keep it honest."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.scheduling.routers import ALL, LiteLLMCooldown, SchedulerRouter, make_router
from bench.scheduling.run import fault_figures, move_off_s, plot, run_one, summarise, verdicts
from bench.scheduling.scenarios import scenarios
from bench.scheduling.sim import InstanceSpec, Scenario, Simulation, constant
from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.events import AttemptEnd, FirstToken
from switchgear.dataplane.scheduling.model import Request


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


def test_move_off_is_when_the_faulty_one_s_share_stays_low() -> None:
    picks = [(60.2, "cheap"), (60.4, "mid"), (61.1, "cheap"), (61.3, "cheap"), (61.5, "mid"),
             (62.5, "mid"), (63.5, "cheap"), *[(63.0 + k / 10, "mid") for k in range(9)]]
    assert move_off_s(picks, (60.0, 65.0, "cheap")) == 2.0  # 63..64: 1 of 10, within 20 %
    assert move_off_s([*picks, (64.5, "cheap"), (64.6, "cheap")], (60.0, 65.0, "cheap")) == float("inf")


def test_one_attempt_in_a_second_is_a_probe_not_traffic() -> None:
    """A breaker's half-open probe in a second that saw few arrivals is over 20 % of them,
    and still not traffic: one attempt a second is the least any detector sends to learn
    whether the provider is back."""
    picks = [(60.2, "cheap"), (60.3, "cheap"), (60.4, "mid"), (62.5, "mid"), (62.6, "cheap"),
             (63.1, "mid"), (64.2, "cheap"), (64.3, "mid")]
    assert move_off_s(picks, (60.0, 65.0, "cheap")) == 1.0


def test_the_litellm_cooldown_leaves_a_failing_deployment_out_for_5_s() -> None:
    sim = Simulation(tiny(), 1)
    router = make_router("litellm_cost+cooldown", sim.clock, 1)
    assert isinstance(router, LiteLLMCooldown)
    cands = sim.candidates  # "slow" is the cheaper one
    for i in range(5):
        router.attempt_ended(AttemptEnd(f"r{i}", "pool", "llm", "slow", 1, 0.02, ErrorKind.RETRYABLE))
    got = router.pick(cands, Request(), set())
    assert got is not None and got.endpoint == "fast"
    sim.now += 5.1
    got = router.pick(cands, Request(), set())
    assert got is not None and got.endpoint == "slow"


def test_the_provider_scenarios_measure_cost_optimized_against_the_cost_baselines() -> None:
    scenario = next(s for s in scenarios() if s.name == "providers_partition")
    short = Scenario(**{**scenario.__dict__, "duration_s": 75.0})
    ours = fault_figures("cost_optimized", [run_one(short, "cost_optimized", 1)])
    theirs = fault_figures("litellm_cost", [run_one(short, "litellm_cost", 1)])
    assert ours.busy_share > 0.6 and theirs.busy_share > 0.9
    assert ours.move_off_s < theirs.move_off_s and ours.fault_success > theirs.fault_success


def test_streamed_from_the_upstream_first_tokens_reach_routing_and_a_hang_is_left_within_2_s() -> None:
    """`+stream`: every attempt's first token reaches LiveStats (none from a black-holed
    attempt), AttemptEnd carries its ttft; the silence test moves cost_optimized off a hung
    provider in the time the plain one cannot (3 s, bench/scheduling/README.md)."""
    scenario = next(s for s in scenarios() if s.name == "providers_hang")
    short = Scenario(**{**scenario.__dict__, "duration_s": 75.0})
    plain = run_one(short, "cost_optimized", 1)
    fed = Simulation(short, 1, stream_upstream=True)
    router = make_router("cost_optimized+stream", fed.clock, 1, breakers=True)
    assert isinstance(router, SchedulerRouter)
    firsts: list[tuple[float, str, float]] = []
    told = router.first_token

    def first_token(event: FirstToken) -> None:
        firsts.append((fed.now, event.endpoint, event.ttft_s))
        told(event)

    router.first_token = first_token  # type: ignore[method-assign]
    fed.router = router
    fed.run()
    assert isinstance(plain.router, SchedulerRouter)
    assert plain.router.stats.get("pool/cheap").recent_ttft.count == 0
    cheap = router.stats.get("pool/cheap")
    assert cheap.recent_ttft.count > 100 and 0.3 < (cheap.recent_ttft.quantile(0.5) or 0) < 0.9
    sent_in_fault = [t - ttft for t, endpoint, ttft in firsts if endpoint == "cheap" and t - ttft >= 60.0]
    assert sent_in_fault == []  # a hung provider sends no first token
    assert any(t >= 60.0 for t, endpoint, _ in firsts if endpoint == "cheap")  # those in service before do
    figures = fault_figures("cost_optimized+stream", [fed])
    assert figures.move_off_s <= 2.0 < fault_figures("cost_optimized", [plain]).move_off_s
    assert figures.busy_share == pytest.approx(fault_figures("cost_optimized", [plain]).busy_share, abs=0.01)


def test_the_sims_first_token_comes_after_any_queue_and_with_the_answers_jitter() -> None:
    seen: list[tuple[str, float, float | None]] = []

    class Spy(SchedulerRouter):
        def first_token(self, event: FirstToken) -> None:
            seen.append((event.request_id, event.ttft_s, None))
            super().first_token(event)

        def attempt_ended(self, event: AttemptEnd) -> None:
            assert event.unary and (event.error is not None or event.ttft_s is not None)
            seen.append((event.request_id, event.latency_s, event.ttft_s))
            super().attempt_ended(event)

    sim = Simulation(tiny(), 1, stream_upstream=True)
    inner = make_router("latency", sim.clock, 1)
    assert isinstance(inner, SchedulerRouter)
    sim.router = Spy("latency", inner.stats, inner.scheduler, inner.bounds)
    sim.run()
    firsts = {rid: t for rid, t, end in seen if end is None}
    ends = [(rid, latency, ttft) for rid, latency, ttft in seen if ttft is not None]
    assert len(ends) > 50 and all(firsts[rid] == ttft < latency for rid, latency, ttft in ends)
