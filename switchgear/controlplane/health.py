"""Health scoring: per endpoint a state and a weight, from load reports and active probes. Pure.

Inputs per endpoint (all windowed by the caller): finished attempts, error rate, mean latency
of successful attempts, in-flight attempts summed over agents, the endpoint's configured
weight and max_concurrency, consecutive failed active probes, and whether an operator drains it.

Weight (after gRPC's weighted round robin, with latency standing in for server utilisation,
which an external API never reports):

    score_i  = 1 / ( max(L_i, L_floor) * (1 + P * e_i) * (1 + u_i) )
    factor_i = score_i / max_j score_j                       in (0, 1]
    bucket_i = clamp(round(factor_i * B), 1, B)              B = weight_buckets (20)
    weight_i = configured_weight_i * bucket_i

L = mean latency of successful attempts (s), floored at max(L_floor, (1 + tolerance) *
fastest L of the service) — latencies within the tolerance band (25%) are measurement noise
and score alike, so only a real difference moves weights; e = error rate of finished attempts; P =
`error_penalty` (2: an endpoint failing half its attempts gets half the traffic of an equal
one); u = in_flight / max_concurrency (0 when unlimited). As in gRPC WRR:
- *blackout*: an endpoint's data counts only `blackout_s` after its first report (a new or
  returning endpoint is not judged on a handful of cold requests), and only with at least
  `min_requests` finished attempts in the window;
- *expiry*: with no attempts in the window the data is gone, and so is the weight;
- an endpoint without usable data scores the mean of those with data.
Quantising into B buckets, with `hysteresis` (in buckets) before leaving the current one,
means noise does not make new snapshot versions. A service whose endpoints are all in the top
bucket and healthy needs no overlay at all: it is served with its configured weights.

States, first match wins:
- draining: the operator drains it (weight kept; routers do not pick it);
- ejected: `failover_threshold` consecutive failed probes, or an error rate of at least
  `eject_error_rate` — for `base_ejection_s * n` (n = times ejected, capped at
  `max_ejection_s`; at least `eject_min_requests` attempts in the window), never more than
  `max_ejection_ratio` of a service's endpoints at once
  (the rest are marked degraded instead). When an ejection ends, only data newer than its end
  counts (`data_since`), after the blackout;
- degraded: error rate above `degraded_error_rate`, or factor below `degraded_factor`;
- healthy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

HEALTHY, DEGRADED, EJECTED, DRAINING = "healthy", "degraded", "ejected", "draining"


@dataclass(frozen=True)
class HealthParams:
    error_penalty: float = 2.0
    latency_floor_s: float = 0.005
    latency_tolerance: float = 0.25  # latencies within 25% of the service's fastest count as equal
    min_requests: int = 10
    blackout_s: float = 10.0
    degraded_error_rate: float = 0.05
    degraded_factor: float = 0.5
    eject_error_rate: float = 0.8
    max_ejection_ratio: float = 0.5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    weight_buckets: int = 20
    hysteresis: float = 0.3  # < 0.5, so a whole-bucket move always goes through
    eject_min_requests: int = 20  # ejection needs more evidence than weighting
    failover_threshold: int = 3


@dataclass(frozen=True)
class Sample:
    """Windowed figures for one endpoint (see collector.WindowStats)."""

    finished: int = 0
    error_rate: float = 0.0
    latency_s: float = 0.0
    in_flight: int = 0


@dataclass(frozen=True)
class EndpointInput:
    service: str
    endpoint: str
    weight: int = 1
    max_concurrency: int = 0
    probe_failures: int = 0
    draining: bool = False


@dataclass(frozen=True)
class Verdict:
    state: str
    weight: int  # the wire weight (configured weight x bucket)
    bucket: int  # 1..B
    reason: str = ""


#: A sample for (service, endpoint) counting only data after `since` (monotonic s).
SampleFn = Callable[[str, str, float], Sample]


@dataclass
class _Memory:
    bucket: int = 0
    ejected_until: float = -math.inf
    ejections: int = 0
    data_since: float = -math.inf


@dataclass
class HealthScorer:
    """Keeps what scoring must remember between evaluations (buckets for hysteresis,
    ejections); everything else comes in as arguments. `first_seen(service, endpoint)` is when
    the endpoint's first data arrived (inf when never)."""

    params: HealthParams = field(default_factory=HealthParams)
    _memory: dict[tuple[str, str], _Memory] = field(default_factory=dict)
    # services without usable data at the last evaluation: their inputs and verdicts (evaluate)
    _quiet: dict[str, tuple[list[EndpointInput], dict[tuple[str, str], Verdict]]] = field(default_factory=dict)
    _quiet_params: HealthParams | None = None
    _quiet_at: float = -math.inf

    def evaluate(
        self,
        now: float,
        endpoints: Sequence[EndpointInput],
        sample: SampleFn,
        first_seen: Callable[[str, str], float],
        active: Callable[[str], bool] | None = None,
    ) -> dict[tuple[str, str], Verdict]:
        """Verdicts for `endpoints`. With `active` (False: none of the service's endpoints has
        data in the health window), a service that had no usable data at the previous
        evaluation either, with the same inputs and nothing the clock changes (an ejection
        running out), keeps its verdicts without re-scoring: they are exactly what scoring would
        give (no usable data scores every endpoint alike, in the bucket it already holds).
        tests/test_health_incremental.py holds the two side by side."""
        by_service: dict[str, list[EndpointInput]] = {}
        for e in endpoints:
            by_service.setdefault(e.service, []).append(e)
        # min_requests 0 makes an endpoint without data usable once its blackout ends (the clock's doing)
        idle = active if self.params.min_requests > 0 and now >= self._quiet_at else None
        if self.params is not self._quiet_params:
            self._quiet.clear()
            self._quiet_params = self.params
        verdicts: dict[tuple[str, str], Verdict] = {}
        quiet: dict[str, tuple[list[EndpointInput], dict[tuple[str, str], Verdict]]] = {}
        for name, members in by_service.items():
            kept = self._quiet.get(name) if idle is not None and not idle(name) else None
            if kept is not None and kept[0] == members:
                found = kept[1]
                quiet[name] = kept
            else:
                found, any_usable = self._service(now, members, sample, first_seen)
                if not any_usable and all(self._memory[key].ejected_until <= now for key in found):
                    quiet[name] = (members, found)
            verdicts.update(found)
        self._quiet, self._quiet_at = quiet, now
        if len(self._memory) != len(verdicts):  # every verdict has a memory: equal sizes, equal keys
            for gone in set(self._memory) - set(verdicts):
                del self._memory[gone]
        return verdicts

    def _usable(self, now: float, e: EndpointInput, s: Sample, first: float, memory: _Memory) -> bool:
        settled = max(first, memory.data_since) + self.params.blackout_s <= now
        return settled and s.finished >= self.params.min_requests

    def _service(
        self, now: float, members: list[EndpointInput], sample: SampleFn, first_seen: Callable[[str, str], float]
    ) -> tuple[dict[tuple[str, str], Verdict], bool]:
        """The service's verdicts, and whether any endpoint had usable data."""
        p = self.params
        memories = {
            (e.service, e.endpoint): self._memory.setdefault((e.service, e.endpoint), _Memory(bucket=p.weight_buckets))
            for e in members
        }
        samples: dict[tuple[str, str], Sample] = {}
        usable: list[EndpointInput] = []
        for e in members:
            key = (e.service, e.endpoint)
            memory = memories[key]
            samples[key] = s = sample(e.service, e.endpoint, memory.data_since)
            if self._usable(now, e, s, first_seen(e.service, e.endpoint), memory):
                usable.append(e)
        fastest = min((samples[(e.service, e.endpoint)].latency_s for e in usable), default=0.0)
        band = max(p.latency_floor_s, fastest * (1.0 + p.latency_tolerance))
        scores = {(e.service, e.endpoint): score(samples[(e.service, e.endpoint)], e.max_concurrency, p, band)
                  for e in usable}
        mean = sum(scores.values()) / len(scores) if scores else 1.0
        best = max(scores.values(), default=mean)
        best = max(best, mean)
        ejected_now = sum(1 for m in memories.values() if m.ejected_until > now)
        budget = math.floor(p.max_ejection_ratio * len(members))
        verdicts: dict[tuple[str, str], Verdict] = {}
        for e in members:
            key = (e.service, e.endpoint)
            memory, s = memories[key], samples[key]
            factor = scores.get(key, mean) / best if best > 0 else 1.0
            memory.bucket = bucket = quantise(factor, memory.bucket, p)
            weight = max(1, e.weight) * bucket
            state, reason = self._state(now, e, s, key in scores, factor, memory, ejected_now < budget)
            if state == EJECTED and memory.ejected_until > now and reason.startswith("error rate"):
                ejected_now += 1
            verdicts[key] = Verdict(state, weight, bucket, reason)
        return verdicts, bool(usable)

    def _state(
        self, now: float, e: EndpointInput, s: Sample, usable: bool, factor: float, memory: _Memory, may_eject: bool
    ) -> tuple[str, str]:
        p = self.params
        if e.draining:
            return DRAINING, "drained by the operator"
        if e.probe_failures >= p.failover_threshold:
            return EJECTED, f"{e.probe_failures} consecutive active health checks failed"
        if memory.ejected_until > now:
            return EJECTED, f"error rate: ejected until +{memory.ejected_until - now:.1f} s"
        if memory.ejected_until > -math.inf and memory.data_since < memory.ejected_until:
            memory.data_since = memory.ejected_until  # the ejection ended: judge fresh data only
        if usable and s.finished >= p.eject_min_requests and s.error_rate >= p.eject_error_rate:
            if may_eject:
                memory.ejections += 1
                span = min(p.max_ejection_s, p.base_ejection_s * memory.ejections)
                memory.ejected_until = now + span
                return EJECTED, f"error rate {s.error_rate:.2f} >= {p.eject_error_rate}: ejected for {span:g} s"
            return DEGRADED, f"error rate {s.error_rate:.2f} (ejection budget of the service used up)"
        if usable and s.error_rate > p.degraded_error_rate:
            return DEGRADED, f"error rate {s.error_rate:.3f} > {p.degraded_error_rate}"
        if usable and factor < p.degraded_factor:
            return DEGRADED, f"score {factor:.2f} of the best endpoint's"
        if usable and memory.ejections and s.error_rate <= p.degraded_error_rate:
            memory.ejections = max(0, memory.ejections - 1)  # healthy again: forgive one ejection
        return HEALTHY, ""


def score(s: Sample, max_concurrency: int, p: HealthParams, floor_s: float | None = None) -> float:
    """1 / (latency * (1 + penalty * error_rate) * (1 + utilisation)); higher is better.

    Latency is floored at `floor_s` (default `latency_floor_s`): the caller passes the
    service's noise band, so endpoints within it score alike."""
    latency = max(s.latency_s, p.latency_floor_s if floor_s is None else floor_s)
    utilisation = s.in_flight / max_concurrency if max_concurrency > 0 else 0.0
    return 1.0 / (latency * (1.0 + p.error_penalty * s.error_rate) * (1.0 + utilisation))


def quantise(factor: float, previous: int, p: HealthParams) -> int:
    """`factor` in (0, 1] as a bucket 1..B; stays in `previous` while within the hysteresis."""
    raw = min(1.0, max(0.0, factor)) * p.weight_buckets
    if previous and abs(raw - previous) < 0.5 + p.hysteresis:
        return previous
    return min(p.weight_buckets, max(1, round(raw)))
