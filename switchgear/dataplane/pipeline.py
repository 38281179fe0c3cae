"""What wraps the invoke step for every front door: identity, policy, quotas, the response cache.

    authenticate (snapshot key digests) -> authorize (tenant policy) -> cap priority
      -> the tenant's in-flight slot on this agent (TenantView.max_in_flight; held to the end)
      -> quota admission (requests per minute, tokens per minute, budgets)
      -> cache lookup -> single-flight -> invoke (routing, resilience, adapters)
      -> cache store (complete, non-fallback successes only) -> quota accounting (actual usage)

The store and the accounting are handed to `afterward.later`: a door that writes its own answers
(the HTTP front door) runs them once the answer is out; elsewhere they run at once.

With Redis, the admission, the cache's Redis read, and the previous requests' stores and
accounting are one round trip (redis_round.py): the store and the accounting are queued, not
awaited, on the answer's path.

The gRPC Gateway and the HTTP front door both call `Pipeline.invoke` (and `Pipeline.stream`),
so a request is governed and cached the same way whichever door it came through.

Streams are charged for what they sent, whether or not the caller reads to the end:
`Pipeline.stream` charges the stream's `Meter` in a `finally`, which runs when the caller
cancels or disconnects too (see `stream.Meter` for how a cut stream's tokens are counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import Enum

from switchgear.adapters.base import TokenUsage
from switchgear.dataplane import access_log
from switchgear.dataplane.afterward import later
from switchgear.dataplane.cache import Entry, cache_key, ttl_for
from switchgear.dataplane.cache_shared import ResponseCache
from switchgear.dataplane.convert import MAX_JSON_DEPTH, Call, NoTargetFits
from switchgear.dataplane.governance import InFlight, Principal, authenticate, authorize, capped_priority
from switchgear.dataplane.invoke import Result, ServiceNotFound
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer, QuotaExceeded
from switchgear.dataplane.redis_round import Lookup
from switchgear.dataplane.scheduling.model import asked_output, context_need, estimate_tokens, inferred
from switchgear.dataplane.singleflight import SingleFlight
from switchgear.dataplane.snapshot import AgentSettings, AgentSnapshot, ServiceView
from switchgear.dataplane.stream import Meter, StreamItem

__all__ = ["CacheMode", "OpenStream", "Pipeline", "QuotaExceeded", "Recorded", "Served", "open_pipeline"]

_CACHE_PLANS = 512  # services whose cache plan is kept (a larger snapshot: the table starts over)

log = logging.getLogger("switchgear.dataplane.pipeline")

Invoke = Callable[[Call, AgentSnapshot], Awaitable[Result]]
#: Opens a stream's items, metered (dataplane.stream.Streamer.stream).
OpenStream = Callable[[Call, AgentSnapshot, Meter], AsyncGenerator[StreamItem, None]]


class Recorded:
    """An OpenStream that keeps the Meter `Pipeline.stream` gives it: once the stream's first
    item is out, the meter names the target it committed to (a door's answer headers)."""

    def __init__(self, open_stream: OpenStream) -> None:
        self._open = open_stream
        self.meter: Meter | None = None

    def __call__(self, call: Call, snapshot: AgentSnapshot, meter: Meter) -> AsyncGenerator[StreamItem, None]:
        self.meter = meter
        return self._open(call, snapshot, meter)


class CacheMode(str, Enum):
    """Per-request cache control (gRPC metadata or HTTP header `cache-control`)."""

    USE = "use"
    BYPASS = "no-cache"  # don't read the cache; store the fresh answer
    NO_STORE = "no-store"  # neither read nor store

    @classmethod
    def parse(cls, header: str | None) -> CacheMode:
        if not header:  # the usual case: no header, no parsing
            return cls.USE
        words = {w.strip().lower() for w in header.split(",")}
        if "no-store" in words:
            return cls.NO_STORE
        return cls.BYPASS if "no-cache" in words else cls.USE


@dataclass(frozen=True)
class Served:
    result: Result
    cached: bool
    tenant: str  # "" when auth is off


class Pipeline:
    """`auth_required=False` is the explicit local-development mode: every request is accepted
    as an anonymous standard user and no quota applies (the agent says so loudly at start)."""

    def __init__(
        self, invoke: Invoke, *, auth_required: bool, quotas: QuotaEnforcer, cache: ResponseCache | None,
        on_cache: Callable[[str, bool], None] = lambda service, hit: None, max_json_depth: int = MAX_JSON_DEPTH,
    ) -> None:
        self.max_json_depth = max_json_depth  # both doors refuse request JSON nested deeper
        self._on_cache = on_cache  # (service, hit) per lookup: metrics and load reports
        self._invoke = invoke
        self._auth_required = auth_required
        self._quotas = quotas
        self._cache = cache
        self._flight: SingleFlight[tuple[Result, bool]] = SingleFlight()
        self.in_flight = InFlight()  # per tenant, capped by each tenant's max_in_flight
        # per service name: (its view, the settings, TTL, shared?, key identity), kept while both are current
        self._cache_plans: dict[str, tuple[ServiceView, AgentSettings, float, bool, str]] = {}

    @property
    def cache(self) -> ResponseCache | None:
        return self._cache

    @property
    def quotas(self) -> QuotaEnforcer:
        return self._quotas

    def identify(self, authorization: str | None, snapshot: AgentSnapshot) -> Principal | None:
        """The caller, or None in auth-none mode. Raises Unauthenticated."""
        if not self._auth_required:
            return None
        return authenticate(authorization, snapshot.governance)

    def govern(self, call: Call, snapshot: AgentSnapshot, principal: Principal | None) -> Call:
        """Apply the tenant's policy to the call (raises PermissionDenied / ServiceNotFound), add
        the tenant's required capabilities to the call's, and refuse a call no target of its
        service can serve (`check_fits`: NoTargetFits)."""
        service = snapshot.services.get(call.service)
        if principal is None:
            return call if service is None else needs(call, service)
        if service is None:
            raise ServiceNotFound(f"service: no service named {call.service!r}")
        tenant = principal.tenant
        authorize(tenant, service.name, service.category, service.offered)
        priority = capped_priority(tenant, call.priority)
        need = tenant.required_capabilities
        if need and not need <= call.capabilities:  # each target serving it must offer them (the router filters)
            call = dataclasses.replace(call, capabilities=call.capabilities | need)
        call = needs(call, service)
        if priority == call.priority and tenant.user_type == call.user_type and tenant.id == call.tenant:
            return call  # (a copy of a frozen call costs more than the comparison: doors set the tenant)
        return dataclasses.replace(call, priority=priority, user_type=tenant.user_type, tenant=tenant.id)

    async def admit(self, call: Call, principal: Principal | None, lookup: Lookup | None = None) -> None:
        if principal is None:
            return
        admission = await self._quotas.admit(principal.tenant, call.service, lookup)
        if admission.limits:
            access_log.note_limits(admission.limits)
        if not admission.allowed:
            raise QuotaExceeded(admission.reason, admission.retry_after_s)

    @contextlib.contextmanager
    def _slot(self, principal: Principal | None) -> Iterator[None]:
        """One of the tenant's in-flight slots on this agent (raises TenantBusy at its cap)."""
        if principal is None:
            yield
            return
        self.in_flight.enter(principal.tenant)
        try:
            yield
        finally:
            self.in_flight.leave(principal.tenant)

    async def stream(self, call: Call, snapshot: AgentSnapshot, principal: Principal | None,
                     open_stream: OpenStream) -> AsyncGenerator[StreamItem, None]:
        """Policy, the tenant's slot and quota admission, then the stream's items (chunks, then
        one StreamEnd). Raises like `invoke` before the first item. Whatever the stream sent
        is charged when it ends, is cancelled, or the caller stops reading (`aclose`)."""
        call = self.govern(call, snapshot, principal)
        with self._slot(principal):
            await self.admit(call, principal)
            meter = Meter()
            items = open_stream(call, snapshot, meter)
            try:
                async for item in items:
                    yield item
            finally:  # runs on cancellation and on aclose too: a cut stream is charged
                await items.aclose()
                usage, cost = meter.charge()
                if usage.input_tokens or usage.output_tokens or cost:
                    await self.account(principal, call.service, usage, cost)

    async def invoke(
        self, call: Call, snapshot: AgentSnapshot, principal: Principal | None, mode: CacheMode = CacheMode.USE
    ) -> Served:
        call = self.govern(call, snapshot, principal)
        plan = self._plan(call, snapshot, principal)
        if principal is None:  # auth-none mode: no tenant, no slot, no quota (and no cost for them)
            return await self._served(call, snapshot, None, mode, plan, None)
        with self._slot(principal):
            # The cache's Redis read rides on the admission's round trip (redis_round.py).
            carried = self._cache.carried_lookup(plan[0]) if plan and mode is CacheMode.USE and self._cache else None
            await self.admit(call, principal, carried)
            return await self._served(call, snapshot, principal, mode, plan, carried)

    def _plan(self, call: Call, snapshot: AgentSnapshot, principal: Principal | None) -> tuple[str, float] | None:
        """The call's cache key and TTL, or None when its answer is not cached."""
        service = snapshot.services.get(call.service)
        if service is None or self._cache is None:
            return None
        known = self._cache_plans.get(service.name)
        if known is None or known[0] is not service or known[1] is not snapshot.settings:
            # The upstream model is part of the key: re-pointing a service at another model must
            # not serve the old model's answers. Endpoints are not: instances of one model agree.
            # So is a vector service's data scope (adapters/_scope.py): another index, namespace
            # or database holds other data.
            scope = getattr(service.options, "describe_scope", None)
            known = (service, snapshot.settings, self._ttl(service, snapshot),
                     service.metadata.get("cache.shared", "").lower() == "true",
                     f"{service.name}|{service.protocol}|{service.model}" + (f"|{scope()}" if scope else ""))
            if len(self._cache_plans) >= _CACHE_PLANS:
                self._cache_plans.clear()
            self._cache_plans[service.name] = known  # (once per service and snapshot, not per call)
        _, _, ttl, shared, identity = known
        if ttl <= 0:
            return None
        tenant = principal.tenant.id if principal else ""
        if call.capabilities:  # an answer a target without them gave must not answer a call requiring them
            identity = f"{identity}|requires:{','.join(sorted(call.capabilities))}"
        return cache_key(identity, call.method, call.payload, tenant=tenant, shared=shared), ttl

    async def _served(self, call: Call, snapshot: AgentSnapshot, principal: Principal | None,
                      mode: CacheMode, plan: tuple[str, float] | None, carried: Lookup | None) -> Served:
        tenant = principal.tenant.id if principal else ""
        if plan is None or self._cache is None:
            result = await self._invoke(call, snapshot)
            await self._account(principal, call.service, result)
            return Served(result, False, tenant)
        key, ttl = plan
        cache = self._cache
        if carried is not None and carried.done:  # the admission's round read Redis: answer before the flight
            entry = await cache.get(key, carried)
            self._on_cache(call.service, entry is not None)
            if entry is not None:
                return Served(_from_entry(entry, snapshot.version), True, tenant)

        async def fetch() -> tuple[Result, bool]:
            """Lookup, upstream call and store as one flight: a caller arriving while another
            fetches the same key joins it instead of racing it to the upstream."""
            if mode is CacheMode.USE:
                if carried is not None and carried.done:  # looked up above; a flight that ended since stored it here
                    entry = cache.local.peek(key)
                else:
                    entry = await cache.get(key)
                    self._on_cache(call.service, entry is not None)
                if entry is not None:
                    return _from_entry(entry, snapshot.version), True
            fresh = await self._invoke(call, snapshot)
            if mode is not CacheMode.NO_STORE and not fresh.fallback:
                later(_keep, cache, key, fresh, ttl)  # (after the answer is written: afterward.py)
            return fresh, False

        flight_key = key if mode is CacheMode.USE else f"{key}|{mode.value}"
        if call.timeout_s or call.max_retries is not None:
            # A flight runs under its leader's deadline and retries: a caller's own shorter ones
            # must not fail a call that allowed more (another tenant's, with a shared cache).
            flight_key = f"{flight_key}|{call.timeout_s}|{call.max_retries}"
        (result, hit), joined = await self._flight.do(flight_key, fetch)
        if not hit and not joined:
            await self._account(principal, call.service, result)
        return Served(result, hit or joined, tenant)

    def _ttl(self, service: ServiceView, snapshot: AgentSnapshot) -> float:
        if not snapshot.settings.cache_enabled:
            return 0.0
        own = service.metadata.get("cache.ttl")
        try:
            service_ttl = float(own) if own is not None else None
        except ValueError:
            service_ttl = None
        return ttl_for(service.category, snapshot.settings.cache_ttl_s, service_ttl)

    async def _account(self, principal: Principal | None, service: str, result: Result) -> None:
        if principal is not None:  # (after the answer is written: afterward.py)
            usage = result.usage
            later(self._quotas.note, principal.tenant, service, usage.input_tokens + usage.output_tokens,
                  result.cost_usd)

    async def account(self, principal: Principal | None, service: str, usage: TokenUsage, cost_usd: float) -> None:
        """Count a finished call's actual tokens and cost against the tenant's windows."""
        if principal is None:
            return
        await self._quotas.record(principal.tenant, service, usage.input_tokens + usage.output_tokens, cost_usd)


def needs(call: Call, service: ServiceView) -> Call:
    """`call` with the capabilities its payload shows it needs added (`model.inferred`, only for a
    service whose targets offer some: `ServiceView.inferable`), checked by `check_fits`. For a
    service offering none of them and a call requiring nothing: two emptiness checks."""
    infer = service.inferable
    if infer:
        found = inferred(call.payload, infer)
        if not found <= call.capabilities:
            call = dataclasses.replace(call, capabilities=call.capabilities | found)
    if call.capabilities or service.context_bound:
        check_fits(call, service)
    return call


#: The method that only measures a prompt (Anthropic's count_tokens): no context window refuses it.
COUNT_TOKENS = "count_tokens"


def check_fits(call: Call, service: ServiceView) -> None:
    """NoTargetFits when no target of `service` can serve `call` at all: none offers every
    capability it requires (`ServiceView.capability_sets`), or every target has a context window
    and none holds it (the router's `filters.fits_context` by the same estimate). The router then
    filters per target; this refusal comes first, so a call nothing could serve makes no attempt
    and counts against no breaker, health score, budget or alert. A token count (`count_tokens`)
    is never too long: saying how long a prompt is is its whole point. Pure."""
    need = call.capabilities
    if need and not any(need <= offered for offered in service.capability_sets):
        raise NoTargetFits(service.name, missing=need - service.offered, together=need)
    if service.context_bound and call.method != COUNT_TOKENS:
        input_tokens, _ = estimate_tokens(call.payload)
        asked = asked_output(call.payload)
        if not any(context_need(input_tokens, asked, t.max_tokens) <= t.context_window
                   for t in map(service.target, service.endpoints)):
            largest = service.context_bound
            raise NoTargetFits(service.name, tokens=input_tokens + asked, largest=largest)


def open_pipeline(invoke: Invoke) -> Pipeline:
    """No keys, no quotas, no cache: what a front door uses when built without a pipeline."""
    return Pipeline(invoke, auth_required=False, quotas=QuotaEnforcer(LocalCounters()), cache=None)


def _keep(cache: ResponseCache, key: str, result: Result, ttl_s: float) -> None:
    cache.keep(key, _to_entry(result), ttl_s)


def _to_entry(result: Result) -> Entry:
    return Entry(body=result.body, service=result.service, endpoint=result.endpoint,
                 input_tokens=result.usage.input_tokens, output_tokens=result.usage.output_tokens,
                 cost_usd=result.cost_usd)


def _from_entry(entry: Entry, version: str) -> Result:
    """A cache hit as a result: no upstream attempt, no cost (the original call paid)."""
    return Result(body=entry.body, service=entry.service, endpoint=entry.endpoint, attempts=0, latency_s=0.0,
                  usage=TokenUsage(entry.input_tokens, entry.output_tokens), cost_usd=0.0, version=version)
