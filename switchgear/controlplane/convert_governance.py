"""Governance messages <-> model: tenants, policies, keys, audit entries.

Conversions from the wire raise ConvertError naming the field path; semantic checks are
validate.py's job.
"""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from switchgear.controlplane.convert_base import ConvertError, category_from_proto, category_to_proto, timestamp
from switchgear.controlplane.model import ApiKey, RegistryState, ServiceQuota, Tenant, TenantPolicy, UserType
from switchgear.controlplane.store import AuditEntry
from switchgear.controlplane.usage import TenantUsage
from switchgear.v1 import governance_pb2

_USER_TYPES = {
    governance_pb2.USER_TYPE_STANDARD: UserType.STANDARD,
    governance_pb2.USER_TYPE_PREMIUM: UserType.PREMIUM,
}


def user_type_from_proto(value: int, path: str) -> UserType | None:
    """None for UNSPECIFIED (the caller's default applies)."""
    if value == governance_pb2.USER_TYPE_UNSPECIFIED:
        return None
    if value not in _USER_TYPES:
        raise ConvertError(path, f"unknown user type {value}")
    return _USER_TYPES[value]  # type: ignore[index]


def user_type_to_proto(user_type: UserType) -> int:
    return next(k for k, v in _USER_TYPES.items() if v == user_type)


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    return float(ts.ToNanoseconds()) / 1e9


def policy_from_proto(msg: governance_pb2.TenantPolicy, path: str = "policy") -> TenantPolicy:
    return TenantPolicy(
        allowed_services=tuple(msg.allowed_services),
        allowed_categories=tuple(
            category_from_proto(c, f"{path}.allowed_categories[{i}]") for i, c in enumerate(msg.allowed_categories)
        ),
        required_capabilities=tuple(msg.required_capabilities),
        max_cost_per_request=msg.max_cost_per_request,
        min_success_rate=msg.min_success_rate,
        requests_per_minute=msg.requests_per_minute,
        tokens_per_minute=msg.tokens_per_minute,
        budget_per_hour_usd=msg.budget_per_hour_usd,
        budget_per_day_usd=msg.budget_per_day_usd,
        priority_cap=msg.priority_cap,
        max_in_flight=msg.max_in_flight,
        max_unfinished_tasks=msg.max_unfinished_tasks,
        max_blobs=msg.max_blobs,
        max_blob_bytes=msg.max_blob_bytes,
        services=tuple(
            sorted(
                (name, ServiceQuota(q.requests_per_minute, q.tokens_per_minute, q.budget_per_hour_usd,
                                    q.budget_per_day_usd))
                for name, q in msg.services.items()
            )
        ),
    )


def policy_to_proto(policy: TenantPolicy) -> governance_pb2.TenantPolicy:
    return governance_pb2.TenantPolicy(
        allowed_services=policy.allowed_services,
        allowed_categories=[category_to_proto(c) for c in policy.allowed_categories],  # type: ignore[misc]
        required_capabilities=policy.required_capabilities,
        max_cost_per_request=policy.max_cost_per_request,
        min_success_rate=policy.min_success_rate,
        requests_per_minute=policy.requests_per_minute,
        tokens_per_minute=policy.tokens_per_minute,
        budget_per_hour_usd=policy.budget_per_hour_usd,
        budget_per_day_usd=policy.budget_per_day_usd,
        priority_cap=policy.priority_cap,
        max_in_flight=policy.max_in_flight,
        max_unfinished_tasks=policy.max_unfinished_tasks,
        max_blobs=policy.max_blobs,
        max_blob_bytes=policy.max_blob_bytes,
        services={
            name: governance_pb2.ServiceQuota(
                requests_per_minute=q.requests_per_minute, tokens_per_minute=q.tokens_per_minute,
                budget_per_hour_usd=q.budget_per_hour_usd, budget_per_day_usd=q.budget_per_day_usd,
            )
            for name, q in policy.services
        },
    )


def tenant_from_proto(msg: governance_pb2.Tenant, now: float, path: str = "tenant") -> Tenant:
    if not msg.id:
        raise ConvertError(f"{path}.id", "required")
    return Tenant(
        id=msg.id,
        display_name=msg.display_name,
        user_type=user_type_from_proto(msg.user_type, f"{path}.user_type") or UserType.STANDARD,
        policy=policy_from_proto(msg.policy, f"{path}.policy"),
        created_at=now,
    )


def tenant_to_proto(tenant: Tenant) -> governance_pb2.Tenant:
    return governance_pb2.Tenant(
        id=tenant.id,
        display_name=tenant.display_name,
        user_type=user_type_to_proto(tenant.user_type),  # type: ignore[arg-type]
        policy=policy_to_proto(tenant.policy),
        created_at=timestamp(tenant.created_at),
    )


def key_info_to_proto(key: ApiKey) -> governance_pb2.ApiKeyInfo:
    msg = governance_pb2.ApiKeyInfo(
        id=key.id, tenant=key.tenant, description=key.description,
        created_at=timestamp(key.created_at), revoked=not key.live,
    )
    if not key.live:
        msg.revoked_at.CopyFrom(timestamp(key.revoked_at))
    return msg


def governance_for_snapshot(state: RegistryState) -> tuple[list[governance_pb2.Tenant], list[governance_pb2.KeyDigest]]:
    """Tenants and the digests of live keys only: a revoked key disappears from the next push."""
    tenants = [tenant_to_proto(t) for t in state.tenants]
    keys = [
        governance_pb2.KeyDigest(id=k.id, tenant=k.tenant, sha256=bytes.fromhex(k.sha256))
        for k in state.keys if k.live
    ]
    return tenants, keys


def audit_to_proto(entry: AuditEntry) -> governance_pb2.AuditEntry:
    return governance_pb2.AuditEntry(
        id=entry.id, at=timestamp(entry.at), actor=entry.actor, action=entry.action, target=entry.target,
        version=entry.version, before_json=entry.before, after_json=entry.after, detail=entry.detail,
    )


def usage_to_proto(usage: TenantUsage) -> governance_pb2.TenantUsage:
    return governance_pb2.TenantUsage(
        tenant=usage.tenant,
        requests_this_minute=usage.requests_this_minute,
        tokens_this_minute=usage.tokens_this_minute,
        cost_this_hour_usd=usage.cost_this_hour_usd,
        cost_this_day_usd=usage.cost_this_day_usd,
        requests_total=usage.requests_total,
        rejected_total=usage.rejected_total,
        cost_total_usd=usage.cost_total_usd,
    )
