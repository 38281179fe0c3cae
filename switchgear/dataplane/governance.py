"""Who is calling and what they may do, decided on the agent from its snapshot. Pure.

Keys are checked locally against the SHA-256 digests the snapshot carries (a revoked key is
simply absent from the next snapshot), so authentication survives a lost control plane like
everything else the agent does.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class Unauthenticated(PermissionError):
    pass


class PermissionDenied(PermissionError):
    """The tenant's policy forbids the call. `path` names the request field it is about."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class TenantBusy(Exception):
    """The tenant already has its `max_in_flight` calls running on this agent."""

    def __init__(self, tenant: str, limit: int) -> None:
        super().__init__(f"tenant {tenant!r} already has {limit} calls in flight on this agent "
                         "(its max_in_flight); retry when one finishes")
        self.tenant = tenant
        self.limit = limit


@dataclass(frozen=True)
class Quota:
    """Zero means no limit. Per minute / per hour / per day windows are UTC-aligned."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    budget_per_hour_usd: float = 0.0
    budget_per_day_usd: float = 0.0

    @property
    def limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.budget_per_hour_usd
                    or self.budget_per_day_usd)


@dataclass(frozen=True)
class TenantView:
    id: str
    user_type: str = "standard"
    allowed_services: frozenset[str] = frozenset()
    allowed_categories: frozenset[str] = frozenset()
    required_capabilities: frozenset[str] = frozenset()
    max_cost_per_request: float = 0.0
    min_success_rate: float = 0.0
    priority_cap: int = 0
    max_in_flight: int = 0  # calls this tenant may have running on one agent at once; 0 = no cap
    quota: Quota = field(default_factory=Quota)
    service_quotas: Mapping[str, Quota] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Governance:
    """Tenants by id and live key digests by key id."""

    tenants: Mapping[str, TenantView] = field(default_factory=lambda: MappingProxyType({}))
    # key id -> (tenant id, SHA-256 of the whole key)
    keys: Mapping[str, tuple[str, bytes]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Principal:
    tenant: TenantView
    key_id: str


def key_id_of(secret: str) -> str | None:
    """`sg-<id>-<secret>` -> id; None for anything else."""
    parts = secret.split("-", 2)
    if len(parts) != 3 or parts[0] != "sg" or not parts[1]:
        return None
    return parts[1]


def authenticate(authorization: str | None, governance: Governance) -> Principal:
    """`authorization` is the request's "Bearer <key>" (gRPC metadata or HTTP header)."""
    if not authorization:
        raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
    scheme, _, secret = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not secret:
        raise Unauthenticated("authorization must be 'Bearer <key>'")
    key_id = key_id_of(secret.strip())
    known = governance.keys.get(key_id or "")
    if key_id is None or known is None:
        raise Unauthenticated("unknown or revoked API key")
    tenant_id, digest = known
    if not hmac.compare_digest(hashlib.sha256(secret.strip().encode()).digest(), digest):
        raise Unauthenticated("unknown or revoked API key")
    tenant = governance.tenants.get(tenant_id)
    if tenant is None:
        raise Unauthenticated("the key's tenant no longer exists")
    return Principal(tenant=tenant, key_id=key_id)


def authorize(
    tenant: TenantView, service: str, category: str, capabilities: frozenset[str] | tuple[str, ...]
) -> None:
    """Raise PermissionDenied unless the tenant may call this service."""
    if tenant.allowed_services and service not in tenant.allowed_services:
        raise PermissionDenied("service", f"tenant {tenant.id!r} may not call service {service!r}")
    if tenant.allowed_categories and category not in tenant.allowed_categories:
        raise PermissionDenied("category", f"tenant {tenant.id!r} may not call {category} services")
    missing = tenant.required_capabilities - frozenset(capabilities)
    if missing:
        raise PermissionDenied("service", f"service {service!r} lacks required capabilities {sorted(missing)}")


def may_call(tenant: TenantView, service: str, category: str, capabilities: frozenset[str] | tuple[str, ...]) -> bool:
    """Whether `authorize` lets the tenant call this service."""
    try:
        authorize(tenant, service, category, capabilities)
    except PermissionDenied:
        return False
    return True


def capped_priority(tenant: TenantView, priority: int) -> int:
    """The request's priority, lowered to the tenant's cap when it has one."""
    return min(priority, tenant.priority_cap) if tenant.priority_cap else priority


class InFlight:
    """Calls in flight per tenant on this agent, held under each tenant's `max_in_flight`, so one
    tenant's flood cannot take every admission slot of the endpoints behind the agent.
    Not thread-safe: the agent's event loop only."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def enter(self, tenant: TenantView) -> None:
        """Count one more call for `tenant`; raise TenantBusy when it is at its cap."""
        count = self._counts.get(tenant.id, 0)
        if tenant.max_in_flight and count >= tenant.max_in_flight:
            raise TenantBusy(tenant.id, tenant.max_in_flight)
        self._counts[tenant.id] = count + 1

    def leave(self, tenant: TenantView) -> None:
        left = self._counts.get(tenant.id, 0) - 1
        if left > 0:
            self._counts[tenant.id] = left
        else:
            self._counts.pop(tenant.id, None)

    def count(self, tenant: str) -> int:
        return self._counts.get(tenant, 0)
