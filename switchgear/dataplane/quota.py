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

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from switchgear.dataplane.governance import Quota, TenantView
from switchgear.dataplane.redis_state import RedisUnavailable, SharedRedis

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0


class CounterStore(Protocol):
    async def add(self, key: str, amount: float, ttl_s: float) -> float:
        """Add `amount` to the counter (created with `ttl_s`); return its new total."""
        ...

    async def get(self, key: str) -> float: ...


class LocalCounters:
    """Counters in this agent's memory. Expired counters are dropped when the table is swept."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._values: dict[str, tuple[float, float]] = {}  # key -> (expires_at, value)
        self._next_sweep = 0.0

    async def add(self, key: str, amount: float, ttl_s: float) -> float:
        now = self._clock()
        self._sweep(now)
        expires_at, value = self._values.get(key, (now + ttl_s, 0.0))
        if expires_at <= now:
            expires_at, value = now + ttl_s, 0.0
        self._values[key] = (expires_at, value + amount)
        return value + amount

    async def get(self, key: str) -> float:
        expires_at, value = self._values.get(key, (0.0, 0.0))
        return value if expires_at > self._clock() else 0.0

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._values = {k: v for k, v in self._values.items() if v[0] > now}
        self._next_sweep = now + MINUTE


class RedisCounters:
    """Counters shared by every agent through Redis (INCRBYFLOAT + EXPIRE in one transaction).

    Each call is bounded by `timeout_s`. When Redis fails or is degraded (redis_state.py: one
    state for the counters and the cache, with its metrics and log lines), `fallback` answers
    instead, so a quota check never fails a request and waits at most one timeout.

    The trade-off when Redis is back: counts made locally while degraded are not replayed to
    Redis. Replaying could not be exact anyway (a call that timed out may still have been
    applied by a slow Redis), and the local counts matter only for the window they fall in.
    So in a window that spans an outage a tenant may get up to N requests per agent while
    degraded plus what the shared counter still allows afterwards, and budgets undercount the
    cost spent during the outage (a Redis restarted without persistence starts every counter
    again from zero). Local counters keep what they counted and serve the next outage in the
    same window.
    """

    def __init__(self, redis: SharedRedis, fallback: LocalCounters, *, prefix: str = "sg:q:",
                 timeout_s: float = 0.05) -> None:
        self._redis = redis
        self._fallback = fallback
        self._prefix = prefix
        self._timeout_s = timeout_s

    async def add(self, key: str, amount: float, ttl_s: float) -> float:
        try:
            return await self._redis.call("quota", lambda: self._add(self._prefix + key, amount, ttl_s),
                                          self._timeout_s)
        except RedisUnavailable:
            return await self._fallback.add(key, amount, ttl_s)

    async def get(self, key: str) -> float:
        try:
            return await self._redis.call("quota", lambda: self._get(self._prefix + key), self._timeout_s)
        except RedisUnavailable:
            return await self._fallback.get(key)

    async def _get(self, key: str) -> float:
        return float(await self._redis.client.get(key) or 0.0)  # inside `call`: a bad value is Redis trouble

    async def _add(self, key: str, amount: float, ttl_s: float) -> float:
        async with self._redis.client.pipeline(transaction=True) as pipe:
            pipe.incrbyfloat(key, amount)
            pipe.expire(key, int(ttl_s) + 1, nx=True)
            total, _ = await pipe.execute()
        return float(total)


class QuotaExceeded(Exception):
    """A tenant's quota or budget refused the call; `retry_after_s` is when its window ends."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Admission:
    allowed: bool
    retry_after_s: float = 0.0
    reason: str = ""


ADMITTED = Admission(True)


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


@dataclass
class UsageTally:
    """Per-tenant usage since the last report (drained by the load reporter)."""

    requests: int = 0
    rejected: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


class QuotaEnforcer:
    def __init__(self, counters: CounterStore, clock: Callable[[], float] = time.time) -> None:
        self._counters = counters
        self._clock = clock
        self._tallies: dict[str, UsageTally] = {}

    async def admit(self, tenant: TenantView, service: str) -> Admission:
        """Check budgets and token windows (read-only), then count the request against its
        requests-per-minute windows. A refusal carries the seconds until the window ends."""
        now = self._clock()
        tally = self._tallies.setdefault(tenant.id, UsageTally())
        for scope, quota in _scopes(tenant, service):
            refused = await self._exhausted(tenant.id, scope, quota, now)
            if refused is not None:
                tally.rejected += 1
                return refused
        for scope, quota in _scopes(tenant, service):
            if quota.requests_per_minute:
                count = await self._counters.add(_key(tenant.id, scope, "req", MINUTE, now), 1, 2 * MINUTE)
                if count > quota.requests_per_minute:
                    tally.rejected += 1
                    where = "" if scope == "*" else f" on {scope}"
                    return Admission(False, window_end(now, MINUTE),
                                     f"{quota.requests_per_minute} requests per minute{where} used")
        tally.requests += 1
        return ADMITTED

    async def _exhausted(self, tenant: str, scope: str, quota: Quota, now: float) -> Admission | None:
        where = "" if scope == "*" else f" on {scope}"
        checks = (
            (quota.tokens_per_minute, "tok", MINUTE, f"{quota.tokens_per_minute} tokens per minute{where} used"),
            (quota.budget_per_hour_usd, "usd", HOUR, f"budget of ${quota.budget_per_hour_usd:g} per hour{where} spent"),
            (quota.budget_per_day_usd, "usd", DAY, f"budget of ${quota.budget_per_day_usd:g} per day{where} spent"),
        )
        for limit, what, width, reason in checks:
            if limit and await self._counters.get(_key(tenant, scope, what, width, now)) >= limit:
                return Admission(False, window_end(now, width), reason)
        return None

    async def record(self, tenant: TenantView, service: str, tokens: int, cost_usd: float) -> None:
        """Count a completed call's tokens and cost against every window that limits them."""
        now = self._clock()
        tally = self._tallies.setdefault(tenant.id, UsageTally())
        tally.tokens += tokens
        tally.cost_usd += cost_usd
        for scope, quota in _scopes(tenant, service):
            if quota.tokens_per_minute and tokens:
                await self._counters.add(_key(tenant.id, scope, "tok", MINUTE, now), tokens, 2 * MINUTE)
            if quota.budget_per_hour_usd and cost_usd:
                await self._counters.add(_key(tenant.id, scope, "usd", HOUR, now), cost_usd, 2 * HOUR)
            if quota.budget_per_day_usd and cost_usd:
                await self._counters.add(_key(tenant.id, scope, "usd", DAY, now), cost_usd, 2 * DAY)

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
