"""Live statistics per endpoint, fed by every attempt through the AttemptObserver interface.

Single-threaded by contract: observers and pickers run on the agent's event loop, so nothing
here locks. Time comes from an injected clock (seconds, monotonic). Keys are
`model.candidate_key(service, endpoint)`, so a new snapshot that keeps an endpoint keeps its
numbers; `retain` forgets endpoints that are gone.

What is kept, per endpoint:

- in-flight attempts, and the start of the oldest one still outstanding (stall detection);
- the starts of attempts abandoned unanswered (a hedge's loser, a caller gone) since the
  endpoint's last answer: from UNANSWERED of them in a row they count for stall detection as
  if still outstanding — an endpoint whose every attempt is hedged away never answers, and
  would otherwise never look stalled;
- a plain per-sample EWMA of latency (the "average response time" bounds are checked against);
- peak-EWMA latency (Finagle/Linkerd): a sample above the estimate replaces it at once, one
  below decays it with weight w = exp(-dt / decay_s) — quick to notice trouble, slow to forget;
- the same for time to first token (streams) and for seconds per output token (LLMs);
- success rate over a sliding time window of buckets, with one prior success so a fresh
  endpoint reads 1.0; a floor on it is judged by `EndpointStats.below`, a test rather than
  the point estimate, so one failure in few samples does not condemn it. A success is
  evidence as of when its attempt was *sent*: once FAILING failures in a row, by send time,
  say the endpoint may now fail what it is sent (a 503 on every new call), successes of
  attempts sent before the latest failure are *held* rather than counted — calls it accepted
  before the fault finish for seconds afterwards (a long LLM answer), and counting them would
  lift its rate back over a bound it no longer meets, bringing new calls back to it (as the
  breaker, resilience/breaker.py). The next success of an attempt sent after the latest
  failure ends the streak and releases what was held (the streak was noise); an endpoint kept
  out by the rate meanwhile gets a trickle of probes (filters.min_success), so that success
  can come;
- the EWMA of the observed cost of a successful request (USD);
- latency by concurrency level (`Capacity`), from which a capacity is learned where no
  max_concurrency is configured (scheduling/shift.py sheds load above 80 % of it);
- the attempts still awaiting a first token, and the send time of the newest attempt that sent
  one (`alive_sent_at`), for the first-token silence test (`EndpointStats.silence`): an
  endpoint whose attempts sent since that one are all still silent, at ages its own learned
  time to first token makes jointly improbable, is *silent* — accepting calls and answering
  none of them (a hang, a partition) — and filters.not_silent holds new calls back from it;
- when the endpoint was first seen — or last came back from being blocked (open breaker,
  ejection, Retry-After hold) — for slow start: a target back from a fault ramps up over
  `recovery_ramp_s` instead of taking its full share at once (no herd onto it, and none away
  from it onto the others: see scheduling/peers.py).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.events import AttemptEnd, AttemptStart, FirstToken
from switchgear.dataplane.scheduling.model import Request, candidate_key

#: An attempt outstanding this many times the endpoint's peak latency counts as failing.
OVERDUE = 3.0

#: How many latest outcomes `EndpointStats.lasts` keeps (peers.off_slow's recovery rule).
LASTS = 2

#: Failures in a row, by send time, from which late successes of older attempts stop counting.
#: One or two failures among the calls of one service time are noise (0.5 % of calls fail anyway);
#: three in a row with no newer success between are what a provider failing every new call looks
#: like (at ten calls a second, within a third of a second).
FAILING = 3

#: Abandoned attempts in a row, with no answer between, that count as a stall (see `unanswered`):
#: a healthy endpoint loses a hedge race now and then (~5 % of calls), never three in a row.
UNANSWERED = 3

#: The first-token silence test (`EndpointStats.silence`): an endpoint is silent when the joint
#: probability, under its own time-to-first-token samples, that its attempts sent since the
#: newest one that sent a first token are all still silent at their ages is below SILENT_P —
#: and so is exp(-pace x seconds since its latest first token), pace = the rate its first
#: tokens came at lately (a FIFO queue keeps sending them at its service rate: without this
#: bound a sustained queue read as silent). Each attempt contributes at least 1 / (n + 1)
#: (1/129 with a full window): no single stuck call can make an endpoint silent. 1e-3 was
#: chosen in bench/scheduling (`providers_hang`, `cost_optimized+stream`): at 9 calls a second
#: to a hung provider (ttft 0.6 s x lognormal(0, 0.25)) it read silent 0.7..1.2 s after the
#: last first token of the calls in service before the fault, 1.2..2.1 s after the fault (move
#: off 2.0 s in six seed sets), and it never fired on the healthy provider (its busy share
#: before the fault unchanged in all six). A dimensionless probability of the endpoint's own
#: numbers: nothing per deployment to tune, so a constant, not a setting.
SILENT_P = 1e-3

#: First-token samples an endpoint needs before it is judged (fewer: never silent). Below ~30 the
#: empirical tail is too coarse: the floor 1 / (n + 1) would let two attempts past a handful
#: of samples read as improbable.
SILENT_SAMPLES = 32

#: The endpoint's pace of first tokens (what bounds `silence` from below) is measured over its
#: latest this many first tokens: ~2 s at ten a second, long enough to span a queue's jitter.
FIRST_PACE = 16

#: At most this many of the oldest judged attempts are multiplied (the younger ones would only
#: lower the product further), so a pick costs a bounded walk however many calls are in flight.
SILENT_WALK = 64

#: A success-rate floor disqualifies (`EndpointStats.below`) only on failures this improbable,
#: P < BELOW_P, for an endpoint whose true success rate is the floor — or in a failure streak
#: (FAILING). One failure is never enough alone (at a floor of 0.95, P(>= 1 of n) >= 0.05):
#: with few samples in the window (a fresh one, after `LiveStats.unblocked`) one random failure
#: read as a rate of 1/2 and kept an endpoint out for the window's 30 s. Two of two (P 0.0025)
#: or three of nine (0.008) are enough; two of ten (0.086) are not.
BELOW_P = 0.01

#: Failures that say something about the endpoint (a bad request says nothing about it).
ENDPOINT_FAULTS = frozenset(
    {ErrorKind.RETRYABLE, ErrorKind.RATE_LIMITED, ErrorKind.TIMEOUT, ErrorKind.CONNECT, ErrorKind.AUTH}
)


@dataclass(frozen=True)
class StatsConfig:
    """Tunables. Seconds throughout.

    `slow_start_s`: ramp window for a new endpoint's weight (Envoy's slow_start_window);
    `slow_start_min`: the ramp's floor (Envoy's min_weight_percent, as a fraction);
    `slow_start_aggression`: ramp shape, factor = (age / window) ** (1 / aggression).
    `forget_s`: how fast an estimate with no new samples regresses to the candidates' median
    (see scorers.latency_estimates) — what lets a penalised endpoint be tried again.
    `recovery_ramp_s`: the slow-start window of an endpoint coming back from being blocked
    (`LiveStats.unblocked`); shorter than a new endpoint's, since its numbers are known.
    `bend_factor`, `bend_samples`: the learned capacity's rule (`Capacity`).
    """

    decay_s: float = 10.0
    window_s: float = 30.0
    buckets: int = 6
    max_latency_s: float = 600.0
    cost_alpha: float = 0.2
    slow_start_s: float = 10.0
    slow_start_min: float = 0.1
    slow_start_aggression: float = 1.0
    forget_s: float = 30.0
    mean_alpha: float = 0.1
    recovery_ramp_s: float = 5.0
    bend_factor: float = 2.0
    bend_samples: int = 8


#: Concurrency levels are grouped in powers of two: 1, 2-3, 4-7, ... up to 2**(LEVELS - 1) and more.
LEVELS = 12


class Capacity:
    """Where an endpoint's latency bends: its capacity, learned, for endpoints with no
    configured max_concurrency (an elastic provider API still queues or throttles somewhere).

    Each success is a sample at concurrency level n = the endpoint's attempts in flight when
    it ended, itself included (under a steady load, the level it ran at). Its latency is taken
    per output token when the answer has tokens (so long and short answers compare), else
    whole. Levels are grouped in powers of two (1, 2-3, 4-7, ...); each group keeps a plain
    EWMA of its samples (alpha `mean_alpha`) and a count.

    The rule: u = the EWMA of the lowest group with at least `bend_samples` samples (the
    unloaded value); the capacity is the lowest level 2**g of the first higher group g with at
    least `bend_samples` samples whose EWMA exceeds `bend_factor` x u — the in-flight level
    at which latency rises past k x its unloaded value (k = 2 by default). 0 (unknown) until
    such a group is seen; it moves as the groups' averages do (a provider that scales up stops
    bending there, and its capacity reads unknown again or higher).
    """

    __slots__ = ("_learned", "alpha", "counts", "factor", "means", "need")

    def __init__(self, config: StatsConfig) -> None:
        self.alpha = config.mean_alpha
        self.factor = config.bend_factor
        self.need = config.bend_samples
        self.means = [0.0] * LEVELS
        self.counts = [0] * LEVELS
        self._learned: int | None = 0  # None: to be worked out again (read per pick, written per answer)

    def record(self, level: int, sample: float) -> None:
        self._learned = None
        g = min(LEVELS - 1, max(1, level).bit_length() - 1)
        if self.counts[g]:
            self.means[g] += self.alpha * (sample - self.means[g])
        else:
            self.means[g] = sample
        if self.counts[g] < self.need:
            self.counts[g] += 1

    def learned(self) -> int:
        """The learned capacity (in-flight attempts), 0 when unknown (see the class docstring)."""
        if self._learned is None:
            self._learned = self._bend()
        return self._learned

    def _bend(self) -> int:
        unloaded = 0.0
        for g in range(LEVELS):
            if self.counts[g] < self.need:
                continue
            if not unloaded:
                unloaded = self.means[g] or 1e-12
            elif self.means[g] > self.factor * unloaded:
                return 1 << g
        return 0


class PeakEwma:
    """Peak EWMA of a positive quantity. `value` is None until the first sample."""

    __slots__ = ("decay_s", "stamp", "value")

    def __init__(self, decay_s: float) -> None:
        self.decay_s = decay_s
        self.value: float | None = None
        self.stamp = 0.0

    def update(self, sample: float, now: float) -> None:
        """value' = sample if sample > value, else value*w + sample*(1-w), w = exp(-dt/decay_s)."""
        if self.value is None or sample > self.value:
            self.value = sample
        else:
            w = math.exp(-max(0.0, now - self.stamp) / self.decay_s)
            self.value = self.value * w + sample * (1.0 - w)
        self.stamp = now


class Ewma:
    """Plain per-sample EWMA: an average of roughly the last 2/alpha samples (for bounds like
    the seed's avg_response_time). Per sample rather than per second, so a sparse stream of
    samples of varied sizes is averaged rather than replaced by its latest sample."""

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def update(self, sample: float, now: float) -> None:
        """value' = value x (1 - alpha) + sample x alpha; the first sample is taken as is."""
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)


class Recent:
    """The last `size` samples of a quantity, for quantiles (the attempt timeout's p99, the
    hedge delay's p95). `quantile` sorts a copy at most once per `size // 8` new samples, so
    reading it on every attempt costs a list index, not a sort."""

    __slots__ = ("_cached", "_fresh", "_next", "count", "samples", "size")

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self.samples: list[float] = []
        self._next = 0
        self.count = 0  # samples ever recorded
        self._cached: list[float] = []
        self._fresh = 0  # samples since the cached sort

    def record(self, sample: float) -> None:
        if len(self.samples) < self.size:
            self.samples.append(sample)
        else:
            self.samples[self._next] = sample
            self._next = (self._next + 1) % self.size
        self.count += 1
        self._fresh += 1

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1, nearest rank) of the retained samples; None with none."""
        if not self.samples:
            return None
        ranked = self.ranked()
        return ranked[min(len(ranked) - 1, int(q * len(ranked)))]

    def ranked(self) -> list[float]:
        """The retained samples sorted (re-sorted as `quantile` says); not to be mutated."""
        if self._fresh and (self._fresh >= max(1, self.size // 8) or len(self._cached) < self.size // 2):
            self._cached = sorted(self.samples)
            self._fresh = 0
        return self._cached


def failures_tail(k: int, n: int, q: float) -> float:
    """P(X >= k) for X ~ Binomial(n, q): how probable k or more failures in n attempts are for
    an endpoint that fails with probability q. Summed upwards from k (cheap when k is above
    the mean n x q, the only case `EndpointStats.below` asks about)."""
    if k <= 0:
        return 1.0
    if k > n or q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    term = math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                    + k * math.log(q) + (n - k) * math.log1p(-q))
    total = 0.0
    odds = q / (1.0 - q)
    for j in range(k, n + 1):
        total += term
        if term <= total * 1e-9:
            break
        term *= (n - j) / (j + 1) * odds
    return min(1.0, total)


class SuccessWindow:
    """Outcomes in `buckets` time buckets spanning `window_s`; older buckets are forgotten."""

    __slots__ = ("bad", "epoch", "ok", "width")

    def __init__(self, window_s: float, buckets: int) -> None:
        self.width = window_s / buckets
        self.ok = [0] * buckets
        self.bad = [0] * buckets
        self.epoch = [-1] * buckets

    def record(self, success: bool, now: float, count: int = 1) -> None:
        index = int(now // self.width)
        slot = index % len(self.ok)
        if self.epoch[slot] != index:
            self.epoch[slot], self.ok[slot], self.bad[slot] = index, 0, 0
        if success:
            self.ok[slot] += count
        else:
            self.bad[slot] += count

    def counts(self, now: float) -> tuple[int, int]:
        """(successes, failures) within the window ending at `now`."""
        oldest = int(now // self.width) - len(self.ok) + 1
        ok = bad = 0
        for slot, epoch in enumerate(self.epoch):
            if epoch >= oldest:
                ok += self.ok[slot]
                bad += self.bad[slot]
        return ok, bad

    def rate(self, now: float) -> float:
        """(successes + 1) / (successes + failures + 1): in (0, 1], 1.0 with no data."""
        ok, bad = self.counts(now)
        return (ok + 1) / (ok + bad + 1)


class EndpointStats:
    """The live numbers of one endpoint. Mutated only by LiveStats."""

    __slots__ = (
        "alive_sent_at",
        "awaiting_first",
        "capacity",
        "completed",
        "cost_usd",
        "created_at",
        "failed",
        "failing",
        "failure_sent_at",
        "first_times",
        "held",
        "held_since",
        "last_first_at",
        "last_sample_at",
        "lasts",
        "latency",
        "mean_latency",
        "outstanding",
        "per_token",
        "probed_at",
        "ramp_s",
        "recent",
        "recent_ttft",
        "silence_probed_at",
        "slow",
        "success_sent_at",
        "ttft",
        "unanswered",
        "window",
    )

    def __init__(self, config: StatsConfig, now: float) -> None:
        self.created_at = now  # first seen, or back from being blocked: slow start counts from here
        self.ramp_s = config.slow_start_s
        self.outstanding: OrderedDict[tuple[str, int], float] = OrderedDict()
        # outstanding attempts with no first token yet (FirstToken): by start, oldest first
        self.awaiting_first: OrderedDict[tuple[str, int], float] = OrderedDict()
        self.alive_sent_at = -math.inf  # send time of the newest attempt that sent a first token
        self.last_first_at = -math.inf  # when the latest first token came (any attempt)
        self.first_times: deque[float] = deque(maxlen=FIRST_PACE)  # when the latest first tokens came
        self.silence_probed_at = -math.inf  # when filters.not_silent last sent it a probe
        self.unanswered: list[float] = []  # starts of attempts abandoned since the last answer
        self.latency = PeakEwma(config.decay_s)
        self.mean_latency = Ewma(config.mean_alpha)
        self.ttft = PeakEwma(config.decay_s)
        self.per_token = PeakEwma(config.decay_s)
        self.recent = Recent()  # whole answers (s), for the attempt timeout's p99 and the hedge's p95
        self.recent_ttft = Recent()  # times to first token (s) of streams and streamed-upstream calls
        self.slow = False  # judged far slower than its peers (peers.off_slow) until `recovered`
        self.probed_at = -math.inf  # when peers.off_slow last sent it a probe
        self.lasts = [math.inf] * LASTS  # the latest outcomes' seconds (inf: failed), newest at completed+failed
        self.window = SuccessWindow(config.window_s, config.buckets)
        self.cost_usd: float | None = None
        self.capacity = Capacity(config)
        self.last_sample_at: float | None = None
        self.completed = 0
        self.failed = 0
        self.failing = 0  # failures in a row by send time (no success sent after the latest one)
        self.failure_sent_at = -math.inf  # when the latest failed attempt was sent
        self.success_sent_at = -math.inf  # when the latest counted successful attempt was sent
        self.held = 0  # successes held back during a failure streak (module docstring)
        self.held_since = 0.0

    @property
    def in_flight(self) -> int:
        return len(self.outstanding)

    def failing_now(self) -> bool:
        """In a failure streak (FAILING or more failures by send time, no newer success) with
        nothing sent since its latest failure still in flight: only a new attempt can say
        whether the streak is over (filters.min_success probes such an endpoint)."""
        if self.failing < FAILING:
            return False
        newest = next(reversed(self.outstanding.values()), -math.inf)
        return newest <= self.failure_sent_at

    def silence(self, now: float) -> float:
        """The joint probability, under this endpoint's own times to first token
        (`recent_ttft`), that its attempts sent after the newest one that sent a first token
        (`alive_sent_at`) are all still silent at their ages: the product of P(ttft > age),
        each (samples above the age + 1) / (samples + 1). 1.0 when nothing is judged: fewer
        than SILENT_SAMPLES samples (an endpoint whose attempts report no first token is
        never judged), or no such attempt. Attempts sent before a live one are not judged
        (the endpoint has shown it is alive since), so the test clears as soon as one of the
        judged attempts sends a first token — or they end. Each attempt sent before the
        endpoint's latest first token counts only its silence since: P(ttft > age | ttft >
        age - silence). Oldest first, SILENT_WALK at most, stopping at the first whose age is
        below every sample (it and the younger ones contribute 1). Bounded below by
        exp(-pace x seconds since the latest first token) (see SILENT_P)."""
        if not self.awaiting_first or self.recent_ttft.count < SILENT_SAMPLES:
            return 1.0
        ranked = self.recent_ttft.ranked()
        n = len(ranked)
        low = ranked[0]
        alive = self.alive_sent_at
        p = 1.0
        walked = 0
        for started in self.awaiting_first.values():  # oldest first
            if started <= alive:
                continue
            age = now - started
            if age <= low or walked >= SILENT_WALK:
                break
            walked += 1
            # P(no first token by its age | none by when the endpoint last showed life)
            silent_for = now - max(started, self.last_first_at)
            before = n - bisect.bisect_right(ranked, age - silent_for) + 1 if silent_for < age else n + 1
            p *= (n - bisect.bisect_right(ranked, age) + 1) / before
        if p < SILENT_P and len(self.first_times) > 1:
            # No more improbable than the endpoint's own pace allows: first tokens have come
            # at rate r lately, so a healthy one is silent for d seconds with p ~ exp(-r d),
            # however many attempts wait — a queue emits at its service rate, not at the sum
            # of its waiting attempts' hazards.
            span = self.first_times[-1] - self.first_times[0]
            if span > 0:
                rate = (len(self.first_times) - 1) / span
                p = max(p, math.exp(-rate * max(0.0, now - self.last_first_at)))
        return p

    def silent(self, now: float) -> bool:
        """Accepting calls and answering none of them, by the first-token test (`silence`)."""
        return self.silence(now) < SILENT_P

    def note_last(self, seconds: float) -> None:
        """One more outcome for `lasts` (call before counting it in completed / failed)."""
        self.lasts[(self.completed + self.failed) % LASTS] = seconds

    def judge_slow(self) -> None:
        """Judged far slower than its peers: only outcomes from now on can show it recovered."""
        self.slow = True
        self.lasts = [math.inf] * LASTS

    def recovered(self, bound_s: float, now: float) -> bool:
        """True when each of the latest LASTS outcomes answered within `bound_s`: then the peak
        EWMA, which would take tens of seconds to forget a slow spell, restarts from them (and
        the per-token and first-token estimates from the next answers)."""
        worst = max(self.lasts)
        if worst > bound_s:
            return False
        self.latency.value, self.latency.stamp = worst, now
        self.ttft.value = self.per_token.value = None  # learnt afresh: the slow spell's are stale
        return True

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest outstanding attempt has been running (0 when none)."""
        if not self.outstanding:
            return 0.0
        return max(0.0, now - next(iter(self.outstanding.values())))

    def success_rate(self, now: float) -> float:
        """(successes + 1) / (successes + failures + overdue + 1) in the window, where overdue
        counts attempts still outstanding after OVERDUE x the peak latency: a black hole's
        attempts never fail, so without them its success rate would stay perfect."""
        ok, bad = self.window.counts(now)
        return (ok + 1) / (ok + bad + self.overdue(now) + 1)

    def below(self, floor: float, now: float) -> bool:
        """Whether the window says the success rate is below `floor`: `success_rate` < floor,
        and either the endpoint is in a failure streak (FAILING failures in a row by send time,
        what a provider failing every new call looks like: judged at once) or its failures
        (overdue attempts included) are improbable, P < BELOW_P, at a true rate of `floor`
        (`failures_tail`) — a bound is not decided by one or two samples."""
        ok, bad = self.window.counts(now)
        bad += self.overdue(now)
        if (ok + 1) / (ok + bad + 1) >= floor:
            return False
        return self.failing >= FAILING or failures_tail(bad, ok + bad, 1.0 - floor) < BELOW_P

    def overdue(self, now: float) -> int:
        peak = self.latency.value
        if not peak or not self.outstanding:
            return 0
        cutoff = now - OVERDUE * peak
        n = 0
        for started in self.outstanding.values():  # oldest first: stop at the first recent one
            if started > cutoff:
                break
            n += 1
        return n

    def expected_latency(self, request: Request, now: float) -> float | None:
        """Seconds this request is expected to take here, or None with no data yet.

        stream -> TTFT estimate; output tokens known -> TTFT (0 if unknown) + s/token x tokens;
        else the whole-request peak EWMA. (Stall and staleness are applied by
        scorers.latency_estimates, which sees all candidates.)
        """
        if request.stream and self.ttft.value is not None:
            return self.ttft.value
        if request.output_tokens > 0 and self.per_token.value is not None:
            return (self.ttft.value or 0.0) + self.per_token.value * request.output_tokens
        return self.latency.value

    def stall_factor(self, now: float, reference_s: float, margin: float = 4.0) -> float:
        """How much an endpoint's answers are overdue; 1 when they are not. The larger of:

        - oldest outstanding age / whole-request peak latency (or `reference_s` with none):
          an attempt older than the endpoint's recent peak;
        - silence x in_flight / (mean latency (or `reference_s`) x margin), silence = seconds
          since the last answer
          (or since the oldest outstanding attempt started, if later): a healthy endpoint with
          n attempts in flight answers about every mean/n seconds, so a silence of `margin`
          such intervals (p ~ e^-margin by chance) is evidence of a stall.

        A black hole shows here within a second or two, long before any attempt times out.
        """
        if len(self.unanswered) >= UNANSWERED:
            started = self.unanswered[0]
            if self.outstanding:
                started = min(started, next(iter(self.outstanding.values())))
        elif self.outstanding:
            started = next(iter(self.outstanding.values()))
        else:
            return 1.0
        reference = self.latency.value or reference_s
        factor = (now - started) / reference if reference > 0 else 1.0
        mean = self.mean_latency.value or reference_s
        if mean > 0:
            silence = now - max(started, self.last_sample_at or started)
            factor = max(factor, silence * len(self.outstanding) / (mean * margin))
        return max(1.0, factor)


class LiveStats:
    """Per-endpoint statistics for the whole agent; an AttemptObserver.

    Register it in the request path's observers; read it from pickers via `get`. The clock
    must be the same one the request path's events are measured with (monotonic seconds).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, config: StatsConfig | None = None) -> None:
        self.clock = clock
        self.config = config or StatsConfig()
        self._by_key: dict[str, EndpointStats] = {}
        self.blocked: set[str] = set()  # keys the gate refused at their last pick (filters.not_blocked)
        self.silenced: set[str] = set()  # keys judged silent at their last pick (filters.not_silent)
        #: told (key, True) when a key is first judged silent and (key, False) when it no longer
        #: is: the agent counts and logs the transitions (attempts.Resilience.silence_changed)
        self.on_silence: Callable[[str, bool], None] | None = None
        #: told `key` at every pick that finds it silent (dataplane/abandon.py: its waiting attempts)
        self.while_silent: Callable[[str], None] | None = None

    def judged_silent(self, key: str, silent: bool) -> None:
        """What filters.not_silent found of `key` at a pick; transitions go to `on_silence`."""
        if silent and self.while_silent is not None:
            self.while_silent(key)
        if silent == (key in self.silenced):
            return
        if silent:
            self.silenced.add(key)
        else:
            self.silenced.discard(key)
        if self.on_silence is not None:
            self.on_silence(key, silent)

    def get(self, key: str, now: float | None = None) -> EndpointStats:
        """The stats of `key`, created (first seen at `now`, default the clock) if unknown."""
        stats = self._by_key.get(key)
        if stats is None:
            stats = self._by_key[key] = EndpointStats(self.config, self.clock() if now is None else now)
        return stats

    def known(self, key: str) -> bool:
        return key in self._by_key

    def peek(self, key: str) -> EndpointStats | None:
        """The stats of `key`, or None: creates nothing (safe to call from a scrape thread)."""
        return self._by_key.get(key)

    def retain(self, keys: Collection[str]) -> None:
        """Forget endpoints not in `keys` (call after a snapshot swap)."""
        for key in [k for k in self._by_key if k not in keys]:
            del self._by_key[key]
        self.blocked.intersection_update(keys)

    def slow_start(self, key: str, now: float) -> float:
        """Weight factor in [slow_start_min, 1]: max(min, (age / window) ** (1 / aggression)),
        where age counts from `created_at` and window is the endpoint's `ramp_s`."""
        c = self.config
        stats = self.get(key)
        window = stats.ramp_s
        age = now - stats.created_at
        if window <= 0 or age >= window:
            return 1.0
        ramp: float = (max(0.0, age) / window) ** (1.0 / c.slow_start_aggression)
        return max(c.slow_start_min, ramp)

    def unblocked(self, key: str, now: float) -> None:
        """`key` is usable again after being blocked (or judged slow): its slow start restarts
        over recovery_ramp_s, and its success window starts afresh — the fault is over (a probe
        said so), and a 30 s memory of it would keep a recovered endpoint out of scored
        strategies long after it came back."""
        self.blocked.discard(key)
        stats = self.get(key, now)
        c = self.config
        stats.window = SuccessWindow(c.window_s, c.buckets)
        stats.held = 0
        if self.config.slow_start_s > 0 and self.config.recovery_ramp_s > 0:
            stats.created_at, stats.ramp_s = now, self.config.recovery_ramp_s

    # --- AttemptObserver ------------------------------------------------------------------

    def attempt_started(self, event: AttemptStart) -> None:
        stats = self.get(candidate_key(event.service, event.endpoint))
        now = self.clock()
        stats.outstanding[(event.request_id, event.attempt)] = now
        if event.streamed:  # only attempts that will report a first token can be silent
            stats.awaiting_first[(event.request_id, event.attempt)] = now

    def first_token(self, event: FirstToken) -> None:
        """An outstanding attempt sent its first token: it is alive (`awaiting_first` no longer
        holds it), and so is the endpoint as of when it was sent (`alive_sent_at`)."""
        stats = self.get(candidate_key(event.service, event.endpoint))
        stats.awaiting_first.pop((event.request_id, event.attempt), None)
        started = stats.outstanding.get((event.request_id, event.attempt))
        if started is not None and started > stats.alive_sent_at:
            stats.alive_sent_at = started
        stats.last_first_at = now = self.clock()
        stats.first_times.append(now)

    def attempt_ended(self, event: AttemptEnd) -> None:
        now = self.clock()
        stats = self.get(candidate_key(event.service, event.endpoint))
        started = stats.outstanding.pop((event.request_id, event.attempt), None)
        stats.awaiting_first.pop((event.request_id, event.attempt), None)
        if event.cancelled:
            if started is not None and len(stats.unanswered) < 2 * UNANSWERED:
                stats.unanswered.append(started)
            return
        sent = now - max(0.0, event.latency_s) if started is None else started
        if event.error is None:
            self._success(stats, event, now, sent)
        elif event.error in ENDPOINT_FAULTS:
            self._failure(stats, event, now, sent)

    def _success(self, stats: EndpointStats, event: AttemptEnd, now: float, sent: float) -> None:
        latency = max(0.0, event.latency_s)
        if sent >= stats.failure_sent_at:
            stats.failing = 0
            stats.success_sent_at = max(stats.success_sent_at, sent)
            if stats.held and now - stats.held_since < self.config.window_s:
                stats.window.record(True, now, stats.held)  # the streak was noise: they count after all
            stats.held = 0
            stats.window.record(True, now)
        elif stats.failing < FAILING:
            stats.window.record(True, now)  # older than a failure or two: still counts
        else:
            if not stats.held:
                stats.held_since = now
            stats.held += 1  # older than a streak of failures: says nothing about now
        if stats.unanswered:
            stats.unanswered.clear()  # it answers: what was abandoned says nothing more
        stats.latency.update(latency, now)
        stats.mean_latency.update(latency, now)
        ttft = event.ttft_s
        if ttft is not None:
            stats.ttft.update(max(0.0, ttft), now)
            stats.recent_ttft.record(max(0.0, ttft))
            stats.alive_sent_at = max(stats.alive_sent_at, sent)
            stats.last_first_at = max(stats.last_first_at, sent + ttft)
        if ttft is None or event.unary:
            stats.recent.record(latency)
        tokens = event.usage.output_tokens
        if tokens > 0:
            stats.per_token.update(max(0.0, latency - (ttft or 0.0)) / tokens, now)
        stats.capacity.record(len(stats.outstanding) + 1, latency / tokens if tokens > 0 else latency)
        stats.note_last(latency)
        a = self.config.cost_alpha
        stats.cost_usd = event.cost_usd if stats.cost_usd is None else stats.cost_usd * (1 - a) + event.cost_usd * a
        stats.last_sample_at = now
        stats.completed += 1

    def _failure(self, stats: EndpointStats, event: AttemptEnd, now: float, sent: float) -> None:
        # A failure counts against the success rate only. Its latency is not a sample of how
        # fast the endpoint serves — a "connection refused" in 2 ms must not look fast, and a
        # penalty computed from the estimate would compound on itself — except for a timeout,
        # whose elapsed time is a true lower bound of the endpoint's latency.
        if event.error is ErrorKind.TIMEOUT:
            sample = min(self.config.max_latency_s, max(0.0, event.latency_s))
            stats.latency.update(sample, now)
            stats.mean_latency.update(sample, now)
        stats.window.record(False, now)
        if sent > stats.success_sent_at:  # an attempt sent before a counted success extends no streak
            stats.failing += 1
            stats.failure_sent_at = max(stats.failure_sent_at, sent)
        stats.note_last(math.inf)
        stats.last_sample_at = now
        stats.failed += 1
