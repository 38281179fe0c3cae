"""Quotas and budgets per tenant (and per tenant and service), enforced across agents.

Design: shared counters, as Envoy's rate-limit service keeps them, rather than leases handed out
by the control plane (Google's Doorman). Counters give exact totals — "100 requests a minute"
means 100 however many agents serve the tenant — with one Redis round trip per request, and
need no control-plane involvement on the request path. The embedded default keeps the same
counters in the agent's memory (exact for one agent, per-agent for several). With Redis, a
slow or dead Redis degrades to the local counters (see RedisCounters), never to failed calls.

Windows are fixed and UTC-aligned (minute for requests and tokens, hour and day for budgets):
"N per minute" then means exactly N in each clock minute, and the retry-after hint is the time
to the window's end. Budgets count actual cost from responses' usage, so the request that
crosses a budget completes and the next one is refused.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple, Protocol

from switchgear.dataplane.governance import Quota, TenantView
from switchgear.dataplane.redis_round import Check, Count, Gate, Lookup, RedisRound, gate
from switchgear.dataplane.redis_state import RedisUnavailable, SharedRedis

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0


class CounterStore(Protocol):
    async def admit(self, checks: Sequence[Check], counts: Sequence[Count], lookup: Lookup | None = None,
                    seen: list[float] | None = None) -> int:
        """Read `checks` in order, then add 1 to each of `counts` in order, stopping at the first
        that refuses. Returns 0 when admitted, else the 1-based index of the refusing entry in
        `checks` followed by `counts` (an earlier count stays counted, as a refused one does).
        `seen` (when given) gets each entry's value as read (a count's: its new total), up to the
        refusing one. A store that can, answers `lookup` (a cache read) in the same call when
        admitting."""
        ...

    def record(self, key: str, amount: float, ttl_s: float) -> None:
        """Add `amount` to the counter (created with `ttl_s`); seen by admissions soon after."""
        ...

    async def aclose(self) -> None:
        """Send what is still pending (the agent is stopping)."""
        ...


class LocalCounters:
    """Counters in this agent's memory. Expired counters are dropped when the table is swept."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._values: dict[str, tuple[float, float]] = {}  # key -> (expires_at, value)
        self._next_sweep = 0.0

    async def add(self, key: str, amount: float, ttl_s: float) -> float:
        return self.add_now(key, amount, ttl_s)

    def add_now(self, key: str, amount: float, ttl_s: float) -> float:
        now = self._clock()
        self._sweep(now)
        expires_at, value = self._values.get(key, (now + ttl_s, 0.0))
        if expires_at <= now:
            expires_at, value = now + ttl_s, 0.0
        self._values[key] = (expires_at, value + amount)
        return value + amount

    async def get(self, key: str) -> float:
        return self.get_now(key)

    def get_now(self, key: str) -> float:
        expires_at, value = self._values.get(key, (0.0, 0.0))
        return value if expires_at > self._clock() else 0.0

    async def admit(self, checks: Sequence[Check], counts: Sequence[Count], lookup: Lookup | None = None,
                    seen: list[float] | None = None) -> int:
        seen = [] if seen is None else seen
        for i, (key, limit) in enumerate(checks, 1):
            seen.append(self.get_now(key))
            if seen[-1] >= limit:
                return i
        for i, (key, limit, ttl_s) in enumerate(counts, len(checks) + 1):
            seen.append(self.add_now(key, 1, ttl_s))
            if seen[-1] > limit:
                return i
        return 0

    def record(self, key: str, amount: float, ttl_s: float) -> None:
        self.add_now(key, amount, ttl_s)

    async def aclose(self) -> None:
        return None

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._values = {k: v for k, v in self._values.items() if v[0] > now}
        self._next_sweep = now + MINUTE


class RedisCounters:
    """Counters shared by every agent through Redis: one script call per admission (redis_round.py).

    Each admission is one server-side script, so it is atomic and exact across agents: it adds
    the pending accounting (this agent's, and its cache stores written behind), reads the token
    and budget windows and counts the request, and may read a cache entry in the same call (a
    `Lookup`). `record` (a finished call's tokens and cost) only queues its addition; the next
    round carries it, or a flush `flush_after_s` later when no round comes first. So a busy
    agent makes one Redis round trip per request, and another agent sees a finished call's cost
    within `flush_after_s` (this agent's own next admission sees it at once).

    Each call is bounded by `timeout_s`. When Redis fails or is degraded (redis_state.py: one
    state for the counters and the cache, with its metrics and log lines), `fallback` answers
    instead (pending additions included), so a quota check never fails a request and waits at
    most one timeout.

    The trade-off when Redis is back: counts made locally while degraded are not replayed to
    Redis. Replaying could not be exact anyway (a call that timed out may still have been
    applied by a slow Redis), and the local counts matter only for the window they fall in.
    So in a window that spans an outage a tenant may get up to N requests per agent while
    degraded plus what the shared counter still allows afterwards, and budgets undercount the
    cost spent during the outage (a Redis restarted without persistence starts every counter
    again from zero). Local counters keep what they counted and serve the next outage in the
    same window.

    `rounds` is the agent's RedisRound, shared with the response cache; one is made when not given.
    """

    def __init__(self, redis: SharedRedis, fallback: LocalCounters, *, prefix: str = "sg:q:",
                 timeout_s: float = 0.05, flush_after_s: float = 0.05, rounds: RedisRound | None = None) -> None:
        self._redis = redis
        self._fallback = fallback
        self._prefix = prefix
        self._timeout_s = timeout_s
        self.rounds = rounds if rounds is not None else RedisRound(redis, flush_after_s=flush_after_s,
                                                                   flush_timeout_s=timeout_s)
        self._gates: dict[tuple[tuple[Check, ...], tuple[Count, ...]], Gate] = {}  # per plan, its script input
        cut = len(prefix)
        self.rounds.on_lost_addition = lambda key, amount, ttl_s: fallback.record(key[cut:], amount, ttl_s)

    @property
    def flushing(self) -> asyncio.Task[None] | None:
        """The timer's flush in flight (tests await it)."""
        return self.rounds.flushing

    async def admit(self, checks: Sequence[Check], counts: Sequence[Count], lookup: Lookup | None = None,
                    seen: list[float] | None = None) -> int:
        if not checks and not counts:
            return 0
        plan = (tuple(checks), tuple(counts))  # (the enforcer passes the same tuples all minute)
        admission = self._gates.get(plan)
        if admission is None:
            prefix = self._prefix
            admission = gate([(prefix + k, limit) for k, limit in checks],
                             [(prefix + k, limit, ttl_s) for k, limit, ttl_s in counts])
            if len(self._gates) >= QuotaEnforcer.MAX_PLANS:
                self._gates.clear()
            self._gates[plan] = admission
        try:
            return await self.rounds.run("quota", self._timeout_s, admission, lookup, seen)
        except RedisUnavailable:
            return await self._fallback.admit(checks, counts, seen=seen)

    def record(self, key: str, amount: float, ttl_s: float) -> None:
        if self._redis.skipped("quota"):  # answered locally at once, as every degraded call is
            self._fallback.record(key, amount, ttl_s)
            return
        self.rounds.add(self._prefix + key, amount, ttl_s)

    async def flush(self) -> None:
        """Send the pending additions (and cache stores) now."""
        await self.rounds.flush()

    async def aclose(self) -> None:
        """Flush what is pending (an agent shutting down keeps its last calls' accounting)."""
        await self.rounds.aclose()


class QuotaExceeded(Exception):
    """A tenant's quota or budget refused the call; `retry_after_s` is when its window ends."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Limit(NamedTuple):
    """A per-minute rate limit as an admission left it: what rate-limit headers tell a caller.
    `what` is "requests" or "tokens"; `remaining` is from 0 to `limit` whatever the counter read
    (an odd value another writer left in Redis included); `reset_s` is the time until
    its window ends. (A tuple: made per admission, where a frozen dataclass costs ~1 us more.)"""

    what: str
    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True)
class Admission:
    allowed: bool
    retry_after_s: float = 0.0
    reason: str = ""
    # The tightest requests and tokens limits the admission read (tenant-wide or on the service;
    # none when the tenant has no such limit).
    limits: tuple[Limit, ...] = ()


ADMITTED = Admission(True)


def limit_headers(limits: Sequence[Limit], anthropic: bool = False) -> list[tuple[str, str]]:
    """`limits` as response headers: OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
    (reset as a duration, "13s"), and with `anthropic` also Anthropic's
    `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` (reset as an RFC 3339 time)."""
    headers: list[tuple[str, str]] = []
    for limit in limits:
        seconds = max(1, math.ceil(limit.reset_s))
        headers += ((f"x-ratelimit-limit-{limit.what}", str(limit.limit)),
                    (f"x-ratelimit-remaining-{limit.what}", str(limit.remaining)),
                    (f"x-ratelimit-reset-{limit.what}", f"{seconds}s"))
        if anthropic:
            at = datetime.fromtimestamp(time.time() + limit.reset_s, UTC).replace(microsecond=0)
            headers += ((f"anthropic-ratelimit-{limit.what}-limit", str(limit.limit)),
                        (f"anthropic-ratelimit-{limit.what}-remaining", str(limit.remaining)),
                        (f"anthropic-ratelimit-{limit.what}-reset", at.isoformat().replace("+00:00", "Z")))
    return headers


def window_end(now: float, width: float) -> float:
    """Seconds until the UTC-aligned window of `width` that holds `now` ends."""
    return width - (now % width)


def _key(tenant: str, scope: str, what: str, width: float, now: float) -> str:
    return f"{tenant}|{scope}|{what}/{int(width)}|{int(now // width)}"


def _scopes(tenant: TenantView, service: str) -> Iterator[tuple[str, Quota]]:
    """The tenant-wide quota and the tenant's quota on this service, when limited."""
    if tenant.quota.limited:
        yield "*", tenant.quota
    per_service = tenant.service_quotas.get(service)
    if per_service is not None and per_service.limited:
        yield service, per_service


def _reason(width: float, what: str, quota: Quota, scope: str) -> str:
    where = "" if scope == "*" else f" on {scope}"
    if what == "req":
        return f"{quota.requests_per_minute} requests per minute{where} used"
    if what == "tok":
        return f"{quota.tokens_per_minute} tokens per minute{where} used"
    if width == HOUR:
        return f"budget of ${quota.budget_per_hour_usd:g} per hour{where} spent"
    return f"budget of ${quota.budget_per_day_usd:g} per day{where} spent"


@dataclass
class UsageTally:
    """Per-tenant usage since the last report (drained by the load reporter)."""

    requests: int = 0
    rejected: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True)
class _Plan:
    """A tenant's admission on one service in one minute: the counter store's checks and counts,
    and what each entry means when it refuses. Windows are whole minutes, so the hour and day
    keys of one minute never change within it."""

    tenant: TenantView
    minute: int
    checks: tuple[Check, ...]
    counts: tuple[Count, ...]
    refusals: tuple[tuple[float, str, Quota, str], ...]  # (window, what, quota, scope) per entry
    records: tuple[tuple[bool, str, float], ...]  # (tokens, else cost; key; ttl s): what a finished call adds to
    rates: tuple[tuple[int, str, int], ...]  # (entry's 1-based index, "requests"/"tokens", per-minute limit)


def _limits(rates: tuple[tuple[int, str, int], ...], seen: Sequence[float], refused: int,
            reset_s: float) -> tuple[Limit, ...]:
    """The tightest requests and tokens per minute limits, from the entries' values as read
    (`seen`: up to the refusing entry, which is left with none remaining); of two with as many
    remaining, the smaller limit."""
    requests = tokens = None  # (remaining, limit): the tightest of each so far
    read = len(seen)
    for index, kind, limit in rates:  # (in index order)
        if index > read:
            break
        room = limit - seen[index - 1]  # (a counter read as NaN, negative or infinite stays in 0..limit)
        left = (0 if index == refused or not room > 0 else int(min(room, limit)), limit)
        if kind == "requests":
            requests = left if requests is None or left < requests else requests
        else:
            tokens = left if tokens is None or left < tokens else tokens
    told = () if requests is None else (Limit("requests", requests[1], requests[0], reset_s),)
    return told if tokens is None else (*told, Limit("tokens", tokens[1], tokens[0], reset_s))


class QuotaEnforcer:
    MAX_PLANS = 4096  # (tenant, service) pairs remembered; the table starts again when full

    def __init__(self, counters: CounterStore, clock: Callable[[], float] = time.time) -> None:
        self._counters = counters
        self._clock = clock
        self._tallies: dict[str, UsageTally] = {}
        self._plans: dict[tuple[str, str], _Plan] = {}

    async def admit(self, tenant: TenantView, service: str, lookup: Lookup | None = None) -> Admission:
        """Check budgets and token windows (read-only), then count the request against its
        requests-per-minute windows: one call of the counter store, which may answer `lookup`
        (a cache read) in the same call. A refusal carries the seconds until the window ends."""
        now = self._clock()
        plan = self._current(tenant, service, now)
        if not plan.refusals:
            self._tally(tenant.id).requests += 1
            return ADMITTED
        seen: list[float] = []
        refused = await self._counters.admit(plan.checks, plan.counts, lookup, seen)
        # The tally is looked up after the counter store's answer: a load report drained while it
        # was awaited (drain_usage) took the tallies then, and this request belongs to the next.
        tally = self._tally(tenant.id)
        limits = _limits(plan.rates, seen, refused, window_end(now, MINUTE)) if plan.rates else ()
        if refused:
            tally.rejected += 1
            width, what, quota, scope = plan.refusals[refused - 1]
            return Admission(False, window_end(now, width), _reason(width, what, quota, scope), limits)
        tally.requests += 1
        return Admission(True, limits=limits) if limits else ADMITTED

    def _tally(self, tenant_id: str) -> UsageTally:
        tally = self._tallies.get(tenant_id)
        if tally is None:
            tally = self._tallies[tenant_id] = UsageTally()
        return tally

    def _current(self, tenant: TenantView, service: str, now: float) -> _Plan:
        plan = self._plans.get((tenant.id, service))
        if plan is None or plan.tenant is not tenant or plan.minute != int(now // MINUTE):
            plan = self._plan(tenant, service, now)
        return plan

    def _plan(self, tenant: TenantView, service: str, now: float) -> _Plan:
        records: list[tuple[bool, str, float]] = []
        for scope, quota in _scopes(tenant, service):
            if quota.tokens_per_minute:
                records.append((True, _key(tenant.id, scope, "tok", MINUTE, now), 2 * MINUTE))
            if quota.budget_per_hour_usd:
                records.append((False, _key(tenant.id, scope, "usd", HOUR, now), 2 * HOUR))
            if quota.budget_per_day_usd:
                records.append((False, _key(tenant.id, scope, "usd", DAY, now), 2 * DAY))
        checks: list[Check] = []
        counts: list[Count] = []
        refusals: list[tuple[float, str, Quota, str]] = []
        for scope, quota in _scopes(tenant, service):
            for limit, what, width in ((quota.tokens_per_minute, "tok", MINUTE),
                                       (quota.budget_per_hour_usd, "usd", HOUR),
                                       (quota.budget_per_day_usd, "usd", DAY)):
                if limit:
                    checks.append((_key(tenant.id, scope, what, width, now), limit))
                    refusals.append((width, what, quota, scope))
        for scope, quota in _scopes(tenant, service):
            if quota.requests_per_minute:
                counts.append((_key(tenant.id, scope, "req", MINUTE, now), quota.requests_per_minute, 2 * MINUTE))
                refusals.append((MINUTE, "req", quota, scope))
        if len(self._plans) >= self.MAX_PLANS:
            self._plans.clear()
        rates = tuple((index, "requests" if what == "req" else "tokens",
                       quota.requests_per_minute if what == "req" else quota.tokens_per_minute)
                      for index, (_, what, quota, _) in enumerate(refusals, 1) if what in ("req", "tok"))
        plan = self._plans[(tenant.id, service)] = _Plan(tenant, int(now // MINUTE), tuple(checks), tuple(counts),
                                                          tuple(refusals), tuple(records), rates)
        return plan

    async def record(self, tenant: TenantView, service: str, tokens: int, cost_usd: float) -> None:
        """Count a completed call's actual tokens and cost against every window that limits them."""
        self.note(tenant, service, tokens, cost_usd)

    def note(self, tenant: TenantView, service: str, tokens: int, cost_usd: float) -> None:
        """`record`, as a plain call (what a request's work after its answer runs: afterward.py)."""
        now = self._clock()
        tally = self._tally(tenant.id)
        tally.tokens += tokens
        tally.cost_usd += cost_usd
        if not tokens and not cost_usd:
            return
        for is_tokens, key, ttl_s in self._current(tenant, service, now).records:
            amount = tokens if is_tokens else cost_usd
            if amount:
                self._counters.record(key, amount, ttl_s)

    async def aclose(self) -> None:
        """The counter store's pending accounting is sent (before its Redis client closes)."""
        await self._counters.aclose()

    def drain_usage(self) -> dict[str, UsageTally]:
        """Usage per tenant since the last call (for load reports to the control plane)."""
        tallies, self._tallies = self._tallies, {}
        return tallies

    def restore_usage(self, tallies: Mapping[str, UsageTally]) -> None:
        """Adds drained tallies back (a load report that could not be sent)."""
        for tenant, drained in tallies.items():
            tally = self._tallies.setdefault(tenant, UsageTally())
            tally.requests += drained.requests
            tally.rejected += drained.rejected
            tally.tokens += drained.tokens
            tally.cost_usd += drained.cost_usd
