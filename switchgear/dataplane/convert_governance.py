"""Snapshot tenants and key digests -> the agent's Governance view (raises SnapshotError).

The checks are the shared ones (`switchgear.wire.checks.check_governance`), which the control
plane also runs before it commits a governance change.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

from switchgear.dataplane.governance import Governance, Quota, TenantView
from switchgear.v1 import common_pb2, governance_pb2
from switchgear.wire.checks import check_governance

_USER_TYPES = {
    governance_pb2.USER_TYPE_UNSPECIFIED: "standard",
    governance_pb2.USER_TYPE_STANDARD: "standard",
    governance_pb2.USER_TYPE_PREMIUM: "premium",
}


def _quota(msg: governance_pb2.TenantPolicy | governance_pb2.ServiceQuota) -> Quota:
    return Quota(msg.requests_per_minute, msg.tokens_per_minute, msg.budget_per_hour_usd, msg.budget_per_day_usd)


def _category(value: int) -> str:
    return str(common_pb2.ServiceCategory.Name(value)).removeprefix("SERVICE_CATEGORY_").lower()


def _tenant(msg: governance_pb2.Tenant) -> TenantView:
    p = msg.policy
    return TenantView(
        id=msg.id,
        user_type=_USER_TYPES[msg.user_type],
        allowed_services=frozenset(p.allowed_services),
        allowed_categories=frozenset(_category(c) for c in p.allowed_categories),
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
    check_governance(tenants, keys)
    return Governance(
        tenants=MappingProxyType({msg.id: _tenant(msg) for msg in tenants}),
        keys=MappingProxyType({key.id: (key.tenant, bytes(key.sha256)) for key in keys}),
    )
