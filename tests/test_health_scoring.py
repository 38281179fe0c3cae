"""Health scoring, the collector's windows and the overlay: tables of cases, no sockets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from switchgear.controlplane import health as hl
from switchgear.controlplane.collector import Collector, LoadDelta, service_totals
from switchgear.controlplane.model import RegistryState
from switchgear.controlplane.snapshot import EMPTY_OVERLAY, EndpointOverride, Overlay, ServiceOverride, content_hash
from tests.conftest import service

REPO = Path(__file__).resolve().parents[1]
PARAMS = hl.HealthParams(blackout_s=0.0, min_requests=10)


def evaluate(samples: dict[str, hl.Sample], *, scorer: hl.HealthScorer | None = None, now: float = 100.0,
             first: float = 0.0, probe_failures: dict[str, int] | None = None,
             weights: dict[str, int] | None = None) -> dict[str, hl.Verdict]:
    scorer = scorer or hl.HealthScorer(PARAMS)
    inputs = [hl.EndpointInput("svc", e, (weights or {}).get(e, 1), 0, (probe_failures or {}).get(e, 0))
              for e in samples]
    verdicts = scorer.evaluate(now, inputs, lambda s, e, since: samples[e], lambda s, e: first)
    return {k[1]: v for k, v in verdicts.items()}


def ok(latency: float = 0.1, errors: float = 0.0, n: int = 100, in_flight: int = 0) -> hl.Sample:
    return hl.Sample(n, errors, latency, in_flight)


def test_equal_endpoints_all_get_the_top_bucket() -> None:
    verdicts = evaluate({"a": ok(0.100), "b": ok(0.110), "c": ok(0.095)})  # within the 25 % noise band
    assert {v.bucket for v in verdicts.values()} == {20}
    assert {v.state for v in verdicts.values()} == {"healthy"}


@pytest.mark.parametrize(
    ("errors", "bucket", "state"),
    [(0.0, 20, "healthy"), (0.04, 19, "healthy"), (0.1, 17, "degraded"), (0.5, 10, "degraded"), (0.7, 8, "degraded")],
)
def test_error_penalty(errors: float, bucket: int, state: str) -> None:
    """factor = 1 / (1 + 2 e): half the attempts failing halves the weight."""
    verdicts = evaluate({"a": ok(), "b": ok(errors=errors)})
    assert (verdicts["b"].bucket, verdicts["b"].state) == (bucket, state)
    assert verdicts["b"].weight == bucket  # configured weight 1 x bucket


def test_latency_beyond_the_band_lowers_the_weight_proportionally() -> None:
    verdicts = evaluate({"a": ok(0.1), "b": ok(0.5)})
    # b's latency 0.5 vs the band 0.125: factor 0.25 -> bucket 5, degraded (below 0.5 of the best)
    assert verdicts["b"].bucket == 5 and verdicts["b"].state == "degraded"


def test_configured_weights_scale_the_buckets() -> None:
    verdicts = evaluate({"a": ok(), "b": ok(errors=0.5)}, weights={"a": 3, "b": 2})
    assert (verdicts["a"].weight, verdicts["b"].weight) == (60, 20)


def test_blackout_and_min_requests_give_the_mean() -> None:
    scorer = hl.HealthScorer(hl.HealthParams(blackout_s=10.0, min_requests=10))
    fresh = evaluate({"a": ok(), "b": ok(errors=0.5)}, scorer=scorer, now=5.0, first=0.0)
    assert {v.bucket for v in fresh.values()} == {20}  # both in blackout: unjudged
    few = evaluate({"a": ok(), "b": ok(errors=0.5, n=3)}, scorer=hl.HealthScorer(PARAMS))
    assert few["b"].bucket == 20 and few["b"].state == "healthy"  # 3 attempts: no evidence


def test_expired_data_returns_the_weight() -> None:
    scorer = hl.HealthScorer(PARAMS)
    assert evaluate({"a": ok(), "b": ok(errors=0.5)}, scorer=scorer)["b"].bucket == 10
    # nothing in the window any more (the collector's window expired the old data)
    assert evaluate({"a": ok(), "b": ok(n=0)}, scorer=scorer)["b"].bucket == 20


def test_hysteresis_keeps_a_bucket_against_noise() -> None:
    scorer = hl.HealthScorer(PARAMS)
    assert evaluate({"a": ok(), "b": ok(errors=0.5)}, scorer=scorer)["b"].bucket == 10
    # 1 / (1 + 2 * 0.48) = 0.51 -> raw 10.2: inside 10 +- 0.8, stays
    assert evaluate({"a": ok(), "b": ok(errors=0.48)}, scorer=scorer)["b"].bucket == 10
    # 0.42 -> 0.543 -> raw 10.9: a whole bucket away, moves
    assert evaluate({"a": ok(), "b": ok(errors=0.42)}, scorer=scorer)["b"].bucket == 11


def test_load_lowers_the_score() -> None:
    scorer = hl.HealthScorer(PARAMS)
    inputs = [hl.EndpointInput("svc", "a", 1, 10), hl.EndpointInput("svc", "b", 1, 10)]
    samples = {"a": ok(in_flight=0), "b": ok(in_flight=10)}  # b is at its max_concurrency
    verdicts = scorer.evaluate(100.0, inputs, lambda s, e, since: samples[e], lambda s, e: 0.0)
    assert verdicts[("svc", "b")].bucket == 10


def test_ejection_on_errors_bounded_by_the_ratio_and_timed() -> None:
    scorer = hl.HealthScorer(PARAMS)
    bad = {"a": ok(), "b": ok(errors=0.9), "c": ok(errors=0.95)}
    verdicts = evaluate(bad, scorer=scorer, now=100.0)
    states = sorted(v.state for v in verdicts.values())
    assert states == ["degraded", "ejected", "healthy"]  # floor(0.5 * 3) = 1 ejection at most
    ejected = next(k for k, v in verdicts.items() if v.state == "ejected")
    assert "ejected for 30 s" in verdicts[ejected].reason
    assert evaluate(bad, scorer=scorer, now=120.0)[ejected].state == "ejected"
    # after the ejection only data newer than its end counts: a clean sample brings it back
    clean = {k: (ok() if k == ejected else v) for k, v in bad.items()}
    assert evaluate(clean, scorer=scorer, now=131.0)[ejected].state == "healthy"


def test_single_endpoint_is_never_ejected_for_errors() -> None:
    assert evaluate({"a": ok(errors=1.0)})["a"].state == "degraded"


def test_active_probe_failures_eject_at_the_failover_threshold() -> None:
    assert evaluate({"a": ok(), "b": ok(n=0)}, probe_failures={"b": 2})["b"].state == "healthy"
    verdict = evaluate({"a": ok(), "b": ok(n=0)}, probe_failures={"b": 3})["b"]
    assert verdict.state == "ejected" and "health checks failed" in verdict.reason


def test_quantise_edges() -> None:
    p = hl.HealthParams()
    assert hl.quantise(0.0, 0, p) == 1  # never zero: ejection, not weight, takes an endpoint out
    assert hl.quantise(1.0, 0, p) == 20
    assert hl.quantise(0.97, 20, p) == 20


# --- collector windows ------------------------------------------------------------------------


def d(service: str, endpoint: str, **kw: object) -> LoadDelta:
    return LoadDelta(service=service, endpoint=endpoint, category="llm", **kw)  # type: ignore[arg-type]


def test_collector_sums_agents_and_expires_old_buckets() -> None:
    c = Collector(bucket_s=1.0, retention_s=60.0)
    c.record("a1", [d("s", "e", issued=10, succeeded=8, failed=(("retryable", 2),), latency_sum_s=1.0,
                      latency_count=10, cost_usd=0.5, in_flight=3)], now=100.2)
    c.record("a2", [d("s", "e", issued=10, succeeded=10, latency_sum_s=3.0, latency_count=10, in_flight=1)],
             now=100.7)
    st = c.stats(("s", "e"), window_s=10.0, now=101.0)
    assert (st.issued, st.succeeded, st.failed, st.in_flight) == (20, 18, 2, 4)
    assert st.error_rate == pytest.approx(0.1) and st.avg_latency_s == pytest.approx(0.2)
    assert st.cost_per_hour == pytest.approx(0.5 * 360)
    assert c.stats(("s", "e"), window_s=10.0, now=112.0).issued == 0  # out of the window
    c.agent_gone("a1")
    assert c.stats(("s", "e"), window_s=10.0, now=101.0).in_flight == 1
    assert c.totals(101.0)[("s", "e")].issued == 20


def test_stale_gauges_expire() -> None:
    c = Collector(gauge_ttl_s=5.0)
    c.record("a1", [d("s", "e", in_flight=3)], now=0.0)
    assert c.stats(("s", "e"), 10.0, now=1.0).in_flight == 3
    assert c.stats(("s", "e"), 10.0, now=10.0).in_flight == 0


def test_histogram_quantile_and_service_totals() -> None:
    c = Collector()
    c.record("a", [d("s", "x", issued=100, succeeded=100, latency_count=100, latency_buckets=(50, 49, 1)),
                   d("s", "y", issued=10, succeeded=5, failed=(("timeout", 5),))], now=1.0)
    rows = c.window(10.0, 1.5)
    assert rows[("s", "x")].quantile_s(0.5, (0.1, 1.0)) == 0.1
    assert rows[("s", "x")].quantile_s(0.995, (0.1, 1.0)) == math.inf
    total = service_totals(rows)["s"]
    assert (total.issued, total.failed, total.errors) == (110, 5, (("timeout", 5),))


# --- the overlay in snapshots -----------------------------------------------------------------


def test_an_empty_overlay_keeps_the_state_hash_and_a_real_one_changes_it() -> None:
    state = RegistryState(services=(service("chat"),))
    assert content_hash(state, EMPTY_OVERLAY) == content_hash(state)
    overlay = Overlay(endpoints=(("chat/e0", EndpointOverride(10, "degraded")),))
    assert content_hash(state, overlay) != content_hash(state)


def test_overlay_is_pruned_to_what_the_registry_has() -> None:
    state = RegistryState(services=(service("chat"), service("other")))
    overlay = Overlay(
        endpoints=(("chat/e0", EndpointOverride(5, "degraded")), ("gone/e0", EndpointOverride(5, "ejected"))),
        services=(("chat", ServiceOverride("latency", ("other", "gone"))), ("gone", ServiceOverride("latency"))),
    )
    pruned = overlay.pruned(state)
    assert pruned.endpoints == (("chat/e0", EndpointOverride(5, "degraded")),)
    assert pruned.services == (("chat", ServiceOverride("latency", ("other",))),)


def test_fast_paths_agree_with_the_full_figures() -> None:
    c = Collector()
    for t in range(30):
        c.record("a", [d("s", "x", issued=4, succeeded=3, failed=(("timeout", 1),), latency_sum_s=0.4, latency_count=4,
                         success_latency_sum_s=0.6, success_latency_count=3, latency_buckets=(1, 2, 1)),
                       d("s", "", cache_lookups=2, cache_hits=1),
                       d("t", "y", issued=1, succeeded=1, cost_usd=0.5)], float(t))
    full = c.stats(("s", "x"), 10.0, 30.0)
    assert c.sample(("s", "x"), 10.0, 30.0) == (full.finished, full.error_rate, full.avg_success_latency_s, 0)
    assert c.sample(("s", "x"), 10.0, 30.0, since=25.0)[0] == 4 * 4  # buckets 26..29
    assert c.services(10.0, 30.0) == service_totals(c.window(10.0, 30.0))
