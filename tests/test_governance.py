"""Governance: tenant and key operations, authentication on the agent, quotas and budgets."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from types import MappingProxyType
from typing import Any

import pytest

from switchgear.controlplane import tenancy
from switchgear.controlplane.model import ApiKey, RegistryState, Tenant, TenantPolicy, UserType
from switchgear.controlplane.validate import validate_state
from switchgear.dataplane.governance import (
    Governance,
    PermissionDenied,
    Quota,
    TenantView,
    Unauthenticated,
    authenticate,
    authorize,
    capped_priority,
)
from switchgear.dataplane.quota import MINUTE, LocalCounters, QuotaEnforcer, window_end


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def state_with_tenant() -> RegistryState:
    return tenancy.create_tenant(RegistryState(), Tenant(id="acme", display_name="Acme"))


# -- control plane: tenancy operations ---------------------------------------------------


def test_new_key_stores_only_a_digest_of_the_whole_key() -> None:
    key, secret = tenancy.new_key("acme", "ci", now=5.0)
    assert secret.startswith(f"sg-{key.id}-") and len(secret) > 40
    assert key.sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in repr(key)


def test_tenant_operations() -> None:
    state = state_with_tenant()
    with pytest.raises(tenancy.GovernanceError, match="already exists"):
        tenancy.create_tenant(state, Tenant(id="acme"))
    key, _ = tenancy.new_key("acme", "", now=1.0)
    state = tenancy.add_key(state, key)
    with pytest.raises(tenancy.GovernanceError) as info:
        tenancy.add_key(state, dataclasses.replace(key, id="ffffffff", tenant="ghost"))
    assert info.value.not_found
    revoked_state, revoked = tenancy.revoke_key(state, key.id, now=2.0)
    assert not revoked.live and revoked.revoked_at == 2.0
    assert tenancy.revoke_key(revoked_state, key.id, now=3.0)[1].revoked_at == 2.0  # idempotent
    premium = tenancy.set_policy(state, "acme", TenantPolicy(requests_per_minute=5), UserType.PREMIUM)
    tenant = premium.tenant("acme")
    assert tenant is not None and tenant.user_type == UserType.PREMIUM and tenant.policy.requests_per_minute == 5
    gone = tenancy.delete_tenant(state, "acme")
    assert gone.tenants == () and gone.keys == ()  # a deleted tenant's keys go with it


@pytest.mark.parametrize(
    ("tenant", "path"),
    [
        (Tenant(id="Not Valid"), "tenants[Not Valid].id"),
        (Tenant(id="t", policy=TenantPolicy(requests_per_minute=-1)), "tenants[t].policy.requests_per_minute"),
        (Tenant(id="t", policy=TenantPolicy(min_success_rate=1.5)), "tenants[t].policy.min_success_rate"),
        (Tenant(id="t", policy=TenantPolicy(priority_cap=11)), "tenants[t].policy.priority_cap"),
        (Tenant(id="t", policy=TenantPolicy(budget_per_day_usd=float("nan"))), "tenants[t].policy.budget_per_day_usd"),
    ],
)
def test_invalid_tenants_name_the_field(tenant: Tenant, path: str) -> None:
    problems = validate_state(RegistryState(tenants=(tenant,)))
    assert [p.path for p in problems] == [path]


def test_keys_must_belong_to_a_tenant() -> None:
    key = ApiKey(id="0a1b2c3d", tenant="ghost", sha256="0" * 64)
    assert [p.path for p in validate_state(RegistryState(keys=(key,)))] == ["keys[0a1b2c3d].tenant"]


# -- agent: authentication and authorization ----------------------------------------------


def governance_for(secret_key: ApiKey, tenant: TenantView) -> Governance:
    return Governance(
        tenants=MappingProxyType({tenant.id: tenant}),
        keys=MappingProxyType({secret_key.id: (tenant.id, bytes.fromhex(secret_key.sha256))}),
    )


def test_authenticate_accepts_only_a_live_key() -> None:
    key, secret = tenancy.new_key("acme", "", now=0.0)
    governance = governance_for(key, TenantView(id="acme", user_type="premium"))
    principal = authenticate(f"Bearer {secret}", governance)
    assert principal.tenant.id == "acme" and principal.tenant.user_type == "premium" and principal.key_id == key.id
    for bad in (None, "", secret, f"Basic {secret}", "Bearer ", f"Bearer {secret}x", f"Bearer sg-{key.id}-nope",
                "Bearer sg-00000000-whatever", "Bearer not-a-key"):
        with pytest.raises(Unauthenticated):
            authenticate(bad, governance)
    with pytest.raises(Unauthenticated):  # revoked: the digest is no longer in the snapshot
        authenticate(f"Bearer {secret}", Governance(tenants=governance.tenants))


@pytest.mark.parametrize(
    ("tenant", "service", "category", "caps", "path"),
    [
        (TenantView(id="t", allowed_services=frozenset({"a"})), "b", "llm", (), "service"),
        (TenantView(id="t", allowed_categories=frozenset({"embedding"})), "a", "llm", (), "category"),
        (TenantView(id="t", required_capabilities=frozenset({"chat"})), "a", "llm", ("code",), "service"),
        (TenantView(id="t"), "a", "llm", (), None),
        (TenantView(id="t", allowed_services=frozenset({"a"}), required_capabilities=frozenset({"chat"})),
         "a", "llm", ("chat", "code"), None),
    ],
)
def test_authorize(tenant: TenantView, service: str, category: str, caps: tuple[str, ...], path: str | None) -> None:
    if path is None:
        authorize(tenant, service, category, caps)
        return
    with pytest.raises(PermissionDenied) as info:
        authorize(tenant, service, category, caps)
    assert info.value.path == path


def test_priority_cap() -> None:
    assert capped_priority(TenantView(id="t", priority_cap=5), 9) == 5
    assert capped_priority(TenantView(id="t", priority_cap=5), 3) == 3
    assert capped_priority(TenantView(id="t"), 9) == 9


# -- agent: quotas and budgets ---------------------------------------------------------------


async def test_requests_per_minute_admits_exactly_n_per_window() -> None:
    clock = Clock(1_800_000_010.0)  # 10 s into a minute
    quotas = QuotaEnforcer(LocalCounters(clock), clock)
    tenant = TenantView(id="acme", quota=Quota(requests_per_minute=3))
    results = [await quotas.admit(tenant, "chat") for _ in range(5)]
    assert [r.allowed for r in results] == [True, True, True, False, False]
    assert results[3].retry_after_s == pytest.approx(50.0)
    assert "3 requests per minute" in results[3].reason
    clock.now += 50.0  # the next minute
    assert (await quotas.admit(tenant, "chat")).allowed
    usage = quotas.drain_usage()["acme"]
    assert (usage.requests, usage.rejected) == (4, 2)
    assert quotas.drain_usage() == {}


class _Awaited(LocalCounters):
    """Local counters whose admissions wait for `go`, as a Redis round trip waits for its reply."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def admit(self, *args: Any, **kwargs: Any) -> int:
        await self.go.wait()
        return await super().admit(*args, **kwargs)


async def test_an_admission_answered_after_a_load_report_drained_counts_in_the_next_one() -> None:
    counters = _Awaited()
    quotas = QuotaEnforcer(counters)
    tenant = TenantView(id="acme", quota=Quota(requests_per_minute=1))
    pending = [asyncio.ensure_future(quotas.admit(tenant, "chat")) for _ in range(3)]
    await asyncio.sleep(0)  # all three are waiting on the counter store
    assert quotas.drain_usage() == {}  # a load report goes out meanwhile
    counters.go.set()
    assert [a.allowed for a in await asyncio.gather(*pending)] == [True, False, False]
    usage = quotas.drain_usage()["acme"]  # the next report carries all three (they used to be lost)
    assert (usage.requests, usage.rejected) == (1, 2)


async def test_budget_stops_traffic_once_actual_cost_crosses_it() -> None:
    clock = Clock(1_800_000_000.0)
    quotas = QuotaEnforcer(LocalCounters(clock), clock)
    tenant = TenantView(id="acme", quota=Quota(budget_per_hour_usd=0.10))
    admitted = 0
    while (await quotas.admit(tenant, "chat")).allowed:
        admitted += 1
        await quotas.record(tenant, "chat", tokens=100, cost_usd=0.03)
        assert admitted < 100
    assert admitted == 4  # 0.03 x 3 = 0.09 < 0.10, the 4th crosses it, the 5th is refused
    refused = await quotas.admit(tenant, "chat")
    assert "per hour" in refused.reason and refused.retry_after_s == pytest.approx(window_end(clock.now, 3600.0))


async def test_tokens_per_minute_and_per_service_quotas() -> None:
    clock = Clock(1_800_000_000.0)
    quotas = QuotaEnforcer(LocalCounters(clock), clock)
    tenant = TenantView(id="acme", quota=Quota(tokens_per_minute=1000),
                        service_quotas=MappingProxyType({"gpt-4": Quota(requests_per_minute=1)}))
    assert (await quotas.admit(tenant, "gpt-4")).allowed
    refused = await quotas.admit(tenant, "gpt-4")
    assert not refused.allowed and "on gpt-4" in refused.reason
    assert (await quotas.admit(tenant, "llama")).allowed  # other services are not capped per service
    await quotas.record(tenant, "llama", tokens=1000, cost_usd=0.0)
    assert not (await quotas.admit(tenant, "llama")).allowed
    clock.now += MINUTE
    assert (await quotas.admit(tenant, "llama")).allowed


async def test_local_counters_expire() -> None:
    clock = Clock(100.0)
    counters = LocalCounters(clock)
    assert await counters.add("k", 2, ttl_s=10) == 2
    assert await counters.add("k", 1, ttl_s=10) == 3
    clock.now = 111.0
    assert await counters.get("k") == 0.0
    assert await counters.add("k", 1, ttl_s=10) == 1


def test_usage_book_survives_a_dump_and_load() -> None:
    from switchgear.controlplane.usage import UsageBook, UsageDelta

    book = UsageBook()
    book.add(UsageDelta("acme", requests=3, rejected=1, tokens=50, cost_usd=0.2), now=1_800_000_030.0)
    again = UsageBook()
    again.load("acme", book.dump("acme"))
    assert again.usage("acme", 1_800_000_031.0) == book.usage("acme", 1_800_000_031.0)
    assert again.usage("acme", 1_800_000_031.0).requests_this_minute == 3
