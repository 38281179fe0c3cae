"""The pipeline around the invoke step: identity, policy, quotas and the response cache."""

from __future__ import annotations

import asyncio
import dataclasses
from types import MappingProxyType

import pytest

from switchgear.adapters.base import ErrorKind, TokenUsage, UpstreamError
from switchgear.controlplane import tenancy
from switchgear.dataplane.cache import MemoryCache
from switchgear.dataplane.cache_shared import ResponseCache
from switchgear.dataplane.convert import Call
from switchgear.dataplane.governance import Governance, PermissionDenied, Quota, TenantView, Unauthenticated
from switchgear.dataplane.invoke import CallFailed, Result
from switchgear.dataplane.pipeline import CacheMode, Pipeline, QuotaExceeded
from switchgear.dataplane.quota import LocalCounters, QuotaEnforcer
from switchgear.dataplane.snapshot import AgentSettings, AgentSnapshot, EndpointView, ServiceView

KEYS = {name: tenancy.new_key(name, "", 0.0) for name in ("acme", "globex")}


def snapshot(cache: bool = True, **tenant_fields: object) -> AgentSnapshot:
    services = {
        "chat": ServiceView(name="chat", category="llm", protocol="openai", endpoints=(EndpointView("a", "http://h/v1"),)),
        "vec": ServiceView(name="vec", category="vector_db", protocol="chroma", endpoints=(EndpointView("a", "http://h"),)),
    }
    tenants = {name: TenantView(id=name, **tenant_fields) for name in KEYS}  # type: ignore[arg-type]
    keys = {key.id: (name, bytes.fromhex(key.sha256)) for name, (key, _) in KEYS.items()}
    return AgentSnapshot(
        version="1.a", services=MappingProxyType(services),
        settings=AgentSettings(cache_enabled=cache, cache_ttl_s=MappingProxyType({"llm_responses": 3600.0})),
        governance=Governance(tenants=MappingProxyType(tenants), keys=MappingProxyType(keys)),
    )


def call(service: str = "chat", text: str = "hi") -> Call:
    return Call(request_id="r", category="", service=service, method="chat.completions",
                payload={"messages": [{"role": "user", "content": text}]}, priority=9, timeout_s=0,
                user_id="", session_id="")


class Upstream:
    def __init__(self, delay: asyncio.Event | None = None) -> None:
        self.calls: list[Call] = []
        self.release = delay

    async def __call__(self, c: Call, snap: AgentSnapshot) -> Result:
        self.calls.append(c)
        if self.release is not None:
            await self.release.wait()
        return Result(body=b'{"n": %d}' % len(self.calls), service=c.service, endpoint="a", attempts=1,
                      latency_s=0.01, usage=TokenUsage(10, 20), cost_usd=0.5, version="1.a")


def pipeline(upstream: Upstream, auth: bool = True, cache: bool = True) -> Pipeline:
    return Pipeline(upstream, auth_required=auth, quotas=QuotaEnforcer(LocalCounters()),
                    cache=ResponseCache(MemoryCache(1 << 20)) if cache else None)


def bearer(tenant: str) -> str:
    return f"Bearer {KEYS[tenant][1]}"


async def test_auth_none_mode_accepts_anyone_and_auth_mode_needs_a_key() -> None:
    snap = snapshot()
    assert pipeline(Upstream(), auth=False).identify(None, snap) is None
    with pytest.raises(Unauthenticated):
        pipeline(Upstream()).identify(None, snap)
    assert pipeline(Upstream()).identify(bearer("acme"), snap).tenant.id == "acme"  # type: ignore[union-attr]


async def test_policy_caps_priority_sets_user_type_and_denies_services() -> None:
    upstream = Upstream()
    snap = snapshot(priority_cap=3, user_type="premium", allowed_services=frozenset({"chat"}))
    p = pipeline(upstream)
    principal = p.identify(bearer("acme"), snap)
    await p.invoke(call(), snap, principal)
    assert upstream.calls[0].priority == 3 and upstream.calls[0].user_type == "premium"
    with pytest.raises(PermissionDenied):
        await p.invoke(call("vec"), snap, principal)


async def test_quota_exceeded_carries_retry_after() -> None:
    snap = snapshot(quota=Quota(requests_per_minute=2))
    p = pipeline(Upstream(), cache=False)
    principal = p.identify(bearer("acme"), snap)
    await p.invoke(call(), snap, principal)
    await p.invoke(call(), snap, principal)
    with pytest.raises(QuotaExceeded) as info:
        await p.invoke(call(), snap, principal)
    assert 0 < info.value.retry_after_s <= 60


async def test_identical_calls_hit_the_cache_per_tenant() -> None:
    upstream = Upstream()
    snap = snapshot()
    p = pipeline(upstream)
    acme, globex = p.identify(bearer("acme"), snap), p.identify(bearer("globex"), snap)
    first = await p.invoke(call(), snap, acme)
    second = await p.invoke(call(), snap, acme)
    assert not first.cached and second.cached and second.result.body == first.result.body
    assert second.result.attempts == 0 and second.result.cost_usd == 0.0
    assert not (await p.invoke(call(), snap, globex)).cached  # another tenant never sees acme's entry
    assert len(upstream.calls) == 2


async def test_cache_control_and_what_is_never_cached() -> None:
    upstream = Upstream()
    snap = snapshot()
    p = pipeline(upstream, auth=False)
    await p.invoke(call(), snap, None, CacheMode.NO_STORE)
    assert not (await p.invoke(call(), snap, None)).cached  # no-store stored nothing
    assert (await p.invoke(call(), snap, None)).cached
    assert not (await p.invoke(call(), snap, None, CacheMode.BYPASS)).cached  # bypass reads nothing
    await p.invoke(call("vec"), snap, None)
    assert not (await p.invoke(call("vec"), snap, None)).cached  # vector queries: no TTL kind
    off = snapshot(cache=False)
    await p.invoke(call(text="other"), off, None)
    assert not (await p.invoke(call(text="other"), off, None)).cached  # caching disabled in config


async def test_fifty_concurrent_identical_misses_make_one_upstream_call() -> None:
    release = asyncio.Event()
    upstream = Upstream(release)
    snap = snapshot()
    p = pipeline(upstream, auth=False)
    tasks = [asyncio.ensure_future(p.invoke(call(), snap, None)) for _ in range(50)]
    for _ in range(10_000):  # let every task reach the cache and the flight (bounded, no timing)
        if p._flight.shared == 49:
            break
        await asyncio.sleep(0)
    release.set()
    served = await asyncio.gather(*tasks)
    assert len(upstream.calls) == 1
    assert sum(not s.cached for s in served) == 1 and len({s.result.body for s in served}) == 1


async def test_a_call_s_own_deadline_and_retries_fail_no_other_call_that_would_join_its_flight() -> None:
    """A flight runs under its leader's deadline and retry count: a caller who chose 20 ms (or
    no retries) must not hand its timeout to an identical call of another tenant (a shared
    cache) or of its own that allowed more. Calls with the same limits still share one flight."""
    release = asyncio.Event()

    class Hasty(Upstream):
        async def __call__(self, c: Call, snap: AgentSnapshot) -> Result:
            if c.timeout_s or c.max_retries is not None:  # as the deadline or the one attempt would end it
                self.calls.append(c)
                await release.wait()
                raise CallFailed(UpstreamError(ErrorKind.TIMEOUT, "no answer within the deadline"), 1)
            return await super().__call__(c, snap)

    upstream = Hasty()
    snap = snapshot()
    chat = snap.services["chat"]
    snap = dataclasses.replace(snap, services=MappingProxyType(
        {**snap.services, "chat": dataclasses.replace(chat, metadata=MappingProxyType({"cache.shared": "true"}))}))
    p = pipeline(upstream)
    acme, globex = p.identify(bearer("acme"), snap), p.identify(bearer("globex"), snap)
    hasty = [asyncio.ensure_future(p.invoke(dataclasses.replace(call(), timeout_s=0.02), snap, acme)),
             asyncio.ensure_future(p.invoke(dataclasses.replace(call(), max_retries=0), snap, acme))]
    for _ in range(10_000):  # both leaders are in their flights (bounded, no timing)
        if len(upstream.calls) == 2:
            break
        await asyncio.sleep(0)
    patient = asyncio.ensure_future(p.invoke(call(), snap, globex))
    same = asyncio.ensure_future(p.invoke(dataclasses.replace(call(), timeout_s=0.02), snap, acme))
    for _ in range(10_000):
        if p._flight.shared >= 1 or patient.done():
            break
        await asyncio.sleep(0)
    release.set()
    served = await patient
    assert not served.result.fallback and served.result.body == b'{"n": 3}'  # its own call, answered
    for task in (*hasty, same):
        with pytest.raises(CallFailed):
            await task
    assert len(upstream.calls) == 3 and p._flight.shared == 1  # the second 20 ms call joined the first


async def test_budget_counts_actual_cost() -> None:
    snap = snapshot(quota=Quota(budget_per_hour_usd=1.2))
    p = pipeline(Upstream(), cache=False)
    principal = p.identify(bearer("acme"), snap)
    for _ in range(3):  # 0.5 + 0.5 + 0.5 crosses 1.2 on the third
        await p.invoke(call(), snap, principal)
    with pytest.raises(QuotaExceeded, match="per hour"):
        await p.invoke(call(), snap, principal)


async def test_a_model_change_does_not_serve_the_old_models_answers() -> None:
    import dataclasses

    upstream = Upstream()
    snap = snapshot()
    p = pipeline(upstream, auth=False)
    await p.invoke(call(), snap, None)
    assert (await p.invoke(call(), snap, None)).cached
    chat = dataclasses.replace(snap.services["chat"], model="bigger-model")
    changed = dataclasses.replace(snap, services=MappingProxyType({**snap.services, "chat": chat}))
    assert not (await p.invoke(call(), changed, None)).cached


async def test_a_new_snapshot_s_cache_settings_take_effect_at_once() -> None:
    """The cache plan of a service (TTL, sharing) is kept per service view and settings: a
    snapshot that turns the service's TTL to 0, or shares its entries, is obeyed on its first call."""
    import dataclasses

    upstream = Upstream()
    snap = snapshot()
    p = pipeline(upstream)
    acme, globex = p.identify(bearer("acme"), snap), p.identify(bearer("globex"), snap)
    await p.invoke(call(), snap, acme)
    assert (await p.invoke(call(), snap, acme)).cached
    chat = snap.services["chat"]
    no_ttl = dataclasses.replace(snap, services=MappingProxyType(
        {**snap.services, "chat": dataclasses.replace(chat, metadata=MappingProxyType({"cache.ttl": "0"}))}))
    assert not (await p.invoke(call(), no_ttl, acme)).cached
    shared = dataclasses.replace(snap, services=MappingProxyType(
        {**snap.services, "chat": dataclasses.replace(chat, metadata=MappingProxyType({"cache.shared": "true"}))}))
    await p.invoke(call(text="shared"), shared, acme)
    assert (await p.invoke(call(text="shared"), shared, globex)).cached  # one entry for every tenant now
    off = dataclasses.replace(snap, settings=dataclasses.replace(snap.settings, cache_enabled=False))
    assert not (await p.invoke(call(), off, acme)).cached
    assert (await p.invoke(call(), snap, acme)).cached  # the first snapshot again: its plan again
    assert len(upstream.calls) == 4


async def test_cache_lookups_are_metered() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from switchgear.dataplane.metrics import AgentMetrics

    seen: list[tuple[str, bool]] = []
    cache = ResponseCache(MemoryCache(1 << 20))
    p = Pipeline(Upstream(), auth_required=False, quotas=QuotaEnforcer(LocalCounters()), cache=cache,
                 on_cache=lambda service, hit: seen.append((service, hit)))
    snap = snapshot()
    await p.invoke(call(), snap, None)
    await p.invoke(call(), snap, None)
    assert seen == [("chat", False), ("chat", True)]
    metrics = AgentMetrics(version=lambda: "1.a")
    metrics.set_cache(lambda: cache.local.counters)
    registry = CollectorRegistry()
    registry.register(metrics)
    text = generate_latest(registry).decode()
    assert "switchgear_cache_hits_total 1.0" in text and "switchgear_cache_misses_total 1.0" in text
    assert "switchgear_cache_bytes" in text and "switchgear_cache_evictions_total 0.0" in text
