"""Snapshot tenants and key digests -> the agent's Governance view (raises SnapshotError)."""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

from switchgear.dataplane.convert import SnapshotError
from switchgear.dataplane.governance import Governance, Quota, TenantView
from switchgear.v1 import common_pb2, governance_pb2

_USER_TYPES = {
    governance_pb2.USER_TYPE_UNSPECIFIED: "standard",
    governance_pb2.USER_TYPE_STANDARD: "standard",
    governance_pb2.USER_TYPE_PREMIUM: "premium",
}


def _quota(msg: governance_pb2.TenantPolicy | governance_pb2.ServiceQuota) -> Quota:
    return Quota(msg.requests_per_minute, msg.tokens_per_minute, msg.budget_per_hour_usd, msg.budget_per_day_usd)


def _category(value: int, path: str) -> str:
    if value not in common_pb2.ServiceCategory.values() or value == 0:
        raise SnapshotError(path, f"unknown category {value}")
    return str(common_pb2.ServiceCategory.Name(value)).removeprefix("SERVICE_CATEGORY_").lower()


def _tenant(msg: governance_pb2.Tenant, path: str) -> TenantView:
    if msg.user_type not in _USER_TYPES:
        raise SnapshotError(f"{path}.user_type", f"unknown user type {msg.user_type}")
    p = msg.policy
    return TenantView(
        id=msg.id,
        user_type=_USER_TYPES[msg.user_type],
        allowed_services=frozenset(p.allowed_services),
        allowed_categories=frozenset(
            _category(c, f"{path}.policy.allowed_categories[{i}]") for i, c in enumerate(p.allowed_categories)
        ),
        required_capabilities=frozenset(p.required_capabilities),
        max_cost_per_request=p.max_cost_per_request,
        min_success_rate=p.min_success_rate,
        priority_cap=p.priority_cap,
        max_in_flight=p.max_in_flight,
        quota=_quota(p),
        service_quotas=MappingProxyType({name: _quota(q) for name, q in p.services.items()}),
    )


def governance_from_proto(
    tenants: Sequence[governance_pb2.Tenant], keys: Sequence[governance_pb2.KeyDigest]
) -> Governance:
    views: dict[str, TenantView] = {}
    for i, msg in enumerate(tenants):
        path = f"tenants[{msg.id or i}]"
        if not msg.id or msg.id in views:
            raise SnapshotError(f"{path}.id", "missing or duplicate tenant id")
        views[msg.id] = _tenant(msg, path)
    digests: dict[str, tuple[str, bytes]] = {}
    for i, key in enumerate(keys):
        path = f"keys[{key.id or i}]"
        if not key.id or key.id in digests:
            raise SnapshotError(f"{path}.id", "missing or duplicate key id")
        if key.tenant not in views:
            raise SnapshotError(f"{path}.tenant", f"no tenant {key.tenant!r} in the snapshot")
        if len(key.sha256) != 32:
            raise SnapshotError(f"{path}.sha256", "must be 32 bytes")
        digests[key.id] = (key.tenant, bytes(key.sha256))
    return Governance(tenants=MappingProxyType(views), keys=MappingProxyType(digests))
