"""The Governance service over real gRPC: tenants, keys shown once, audit with before/after,
snapshots carrying only live key digests, and the admin token guarding it all."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from switchgear.controlplane import convert
from switchgear.controlplane.admin import AdminServicer
from switchgear.controlplane.agents import AgentTracker
from switchgear.controlplane.auth import AdminTokenInterceptor, load_or_create_token
from switchgear.controlplane.governance import GovernanceServicer
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore
from switchgear.controlplane.usage import UsageBook, UsageDelta
from switchgear.v1 import admin_pb2, admin_pb2_grpc, governance_pb2, governance_pb2_grpc

TOKEN = "test-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


class Plane:
    def __init__(self, registry: Registry, usage: UsageBook, address: str) -> None:
        self.registry = registry
        self.usage = usage
        self.channel = grpc.aio.insecure_channel(address)
        self.gov = governance_pb2_grpc.GovernanceServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    store = SqliteStore(tmp_path / "r.db")
    registry = Registry(store)
    usage = UsageBook()
    server = grpc.aio.server(interceptors=[AdminTokenInterceptor(TOKEN)])
    governance_pb2_grpc.add_GovernanceServiceServicer_to_server(GovernanceServicer(registry, usage), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(registry, AgentTracker(), {}), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    p = Plane(registry, usage, f"127.0.0.1:{port}")
    try:
        yield p
    finally:
        await p.channel.close()
        await server.stop(None)
        store.close()


async def test_calls_without_the_admin_token_are_rejected(plane: Plane) -> None:
    for call in (
        plane.gov.ListTenants(governance_pb2.ListTenantsRequest()),
        plane.gov.ListTenants(governance_pb2.ListTenantsRequest(), metadata=(("authorization", "Bearer wrong"),)),
        plane.admin.ListServices(admin_pb2.ListServicesRequest()),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await plane.admin.ListServices(admin_pb2.ListServicesRequest(), metadata=AUTH)).services == []


async def test_tenant_key_lifecycle_is_audited_and_reaches_snapshots(plane: Plane) -> None:
    created = await plane.gov.CreateTenant(
        governance_pb2.CreateTenantRequest(tenant=governance_pb2.Tenant(
            id="acme", display_name="Acme", user_type=governance_pb2.USER_TYPE_PREMIUM,
            policy=governance_pb2.TenantPolicy(requests_per_minute=100))),
        metadata=AUTH,
    )
    assert created.tenant.policy.requests_per_minute == 100
    issued = await plane.gov.IssueKey(governance_pb2.IssueKeyRequest(tenant="acme", description="ci"), metadata=AUTH)
    secret = issued.secret
    assert secret.startswith(f"sg-{issued.key.id}-")

    listed = await plane.gov.ListKeys(governance_pb2.ListKeysRequest(tenant="acme"), metadata=AUTH)
    assert secret not in str(listed) and [k.id for k in listed.keys] == [issued.key.id]

    wire = convert.snapshot_to_proto(plane.registry.snapshot)
    assert [k.sha256 for k in wire.keys] == [hashlib.sha256(secret.encode()).digest()]
    assert [t.id for t in wire.tenants] == ["acme"]

    revoked = await plane.gov.RevokeKey(governance_pb2.RevokeKeyRequest(id=issued.key.id), metadata=AUTH)
    assert revoked.key.revoked and revoked.version != issued.version
    assert list(convert.snapshot_to_proto(plane.registry.snapshot).keys) == []  # gone from the next push

    await plane.gov.SetPolicy(governance_pb2.SetPolicyRequest(
        tenant="acme", policy=governance_pb2.TenantPolicy(requests_per_minute=5)), metadata=AUTH)
    entries = (await plane.gov.ListAudit(governance_pb2.ListAuditRequest(limit=10), metadata=AUTH)).entries
    assert [e.action for e in entries[:4]] == ["set_policy", "revoke_key", "issue_key", "create_tenant"]
    policy_change = entries[0]
    assert json.loads(policy_change.before_json)["policy"]["requests_per_minute"] == 100
    assert json.loads(policy_change.after_json)["policy"]["requests_per_minute"] == 5
    assert all(secret not in e.before_json + e.after_json + e.detail for e in entries)
    assert all(e.actor.startswith("admin@") and e.version for e in entries[:4])


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda g: g.CreateTenant(governance_pb2.CreateTenantRequest(tenant=governance_pb2.Tenant(id="Bad Id")),
                                  metadata=AUTH), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda g: g.CreateTenant(governance_pb2.CreateTenantRequest(), metadata=AUTH), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda g: g.IssueKey(governance_pb2.IssueKeyRequest(tenant="ghost"), metadata=AUTH), grpc.StatusCode.NOT_FOUND),
        (lambda g: g.RevokeKey(governance_pb2.RevokeKeyRequest(id="00000000"), metadata=AUTH), grpc.StatusCode.NOT_FOUND),
        (lambda g: g.SetPolicy(governance_pb2.SetPolicyRequest(
            tenant="ghost", policy=governance_pb2.TenantPolicy()), metadata=AUTH), grpc.StatusCode.NOT_FOUND),
        (lambda g: g.DeleteTenant(governance_pb2.DeleteTenantRequest(id="ghost"), metadata=AUTH), grpc.StatusCode.NOT_FOUND),
        (lambda g: g.GetUsage(governance_pb2.GetUsageRequest(tenant="ghost"), metadata=AUTH), grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_bad_governance_calls_get_clear_codes_and_change_nothing(plane: Plane, call, code) -> None:  # type: ignore[no-untyped-def]
    before = plane.registry.snapshot
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(plane.gov)
    assert info.value.code() == code
    assert plane.registry.snapshot == before


async def test_duplicate_tenant_is_already_exists(plane: Plane) -> None:
    request = governance_pb2.CreateTenantRequest(tenant=governance_pb2.Tenant(id="acme"))
    await plane.gov.CreateTenant(request, metadata=AUTH)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await plane.gov.CreateTenant(request, metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_usage_reports_windows(plane: Plane) -> None:
    await plane.gov.CreateTenant(governance_pb2.CreateTenantRequest(tenant=governance_pb2.Tenant(id="acme")),
                                 metadata=AUTH)
    import time

    plane.usage.add(UsageDelta("acme", requests=3, rejected=1, tokens=120, cost_usd=0.25), time.time())
    usage = (await plane.gov.GetUsage(governance_pb2.GetUsageRequest(tenant="acme"), metadata=AUTH)).usage
    assert len(usage) == 1
    assert (usage[0].requests_total, usage[0].rejected_total) == (3, 1)
    assert usage[0].cost_total_usd == pytest.approx(0.25)


def test_admin_token_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    token = load_or_create_token(path)
    assert len(token) >= 40 and path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_token(path) == token
