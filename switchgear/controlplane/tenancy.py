"""Tenants and client keys as operations on the registry state. Pure: stdlib only.

Keys look like `sg-<id>-<secret>`: `id` is 8 hex characters, public, shown in listings and
audit entries; `secret` is 32 random bytes (URL-safe base64). Only the SHA-256 of the whole key
is stored and sent to agents. A fast hash is right here (unlike for passwords): the keys are
256-bit random strings, so there is nothing to brute-force, and agents check a key per request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from collections.abc import Callable

from switchgear.controlplane.model import ApiKey, RegistryState, Tenant, TenantPolicy, UserType

KEY_PREFIX = "sg"


class GovernanceError(ValueError):
    """A governance operation that cannot apply; `path` names the offending field."""

    def __init__(self, path: str, message: str, *, not_found: bool = False) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
        self.not_found = not_found


def key_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(
    tenant: str, description: str, now: float, token: Callable[[int], str] = secrets.token_urlsafe,
    key_id: Callable[[int], str] = secrets.token_hex,
) -> tuple[ApiKey, str]:
    """A fresh key for `tenant`: the stored record and the whole key (to show once)."""
    ident = key_id(4)
    secret = f"{KEY_PREFIX}-{ident}-{token(32)}"
    return ApiKey(id=ident, tenant=tenant, sha256=key_digest(secret), description=description, created_at=now), secret


def tenant_of_key(state: RegistryState, secret: str) -> str | None:
    """The tenant a live key belongs to, or None (unknown, revoked, malformed, tenant gone).
    Digests are compared in constant time, as agents compare them."""
    parts = secret.split("-", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    stored = state.key(parts[1])
    if stored is None or not stored.live or not hmac.compare_digest(stored.sha256, key_digest(secret)):
        return None
    return stored.tenant if state.tenant(stored.tenant) is not None else None


def _tenants(state: RegistryState, tenants: list[Tenant]) -> RegistryState:
    return dataclasses.replace(state, tenants=tuple(sorted(tenants, key=lambda t: t.id)))


def create_tenant(state: RegistryState, tenant: Tenant) -> RegistryState:
    if state.tenant(tenant.id) is not None:
        raise GovernanceError("tenant.id", f"tenant {tenant.id!r} already exists")
    return _tenants(state, [*state.tenants, tenant])


def delete_tenant(state: RegistryState, tenant_id: str) -> RegistryState:
    """The tenant and every key it owns go: its keys stop working with the next snapshot."""
    if state.tenant(tenant_id) is None:
        raise GovernanceError("id", f"no tenant {tenant_id!r}", not_found=True)
    return dataclasses.replace(
        _tenants(state, [t for t in state.tenants if t.id != tenant_id]),
        keys=tuple(k for k in state.keys if k.tenant != tenant_id),
    )


def set_policy(state: RegistryState, tenant_id: str, policy: TenantPolicy, user_type: UserType | None) -> RegistryState:
    tenant = state.tenant(tenant_id)
    if tenant is None:
        raise GovernanceError("tenant", f"no tenant {tenant_id!r}", not_found=True)
    updated = dataclasses.replace(tenant, policy=policy, user_type=user_type or tenant.user_type)
    return _tenants(state, [updated if t.id == tenant_id else t for t in state.tenants])


def add_key(state: RegistryState, key: ApiKey) -> RegistryState:
    if state.tenant(key.tenant) is None:
        raise GovernanceError("tenant", f"no tenant {key.tenant!r}", not_found=True)
    if state.key(key.id) is not None:
        raise GovernanceError("id", "key id collision; issue again")
    return dataclasses.replace(state, keys=tuple(sorted((*state.keys, key), key=lambda k: k.id)))


def revoke_key(state: RegistryState, key_id: str, now: float) -> tuple[RegistryState, ApiKey]:
    """Marks the key revoked (kept for the listing and the audit trail; no longer sent to agents)."""
    key = state.key(key_id)
    if key is None:
        raise GovernanceError("id", f"no key {key_id!r}", not_found=True)
    if not key.live:
        return state, key
    revoked = dataclasses.replace(key, revoked_at=now)
    return dataclasses.replace(state, keys=tuple(revoked if k.id == key_id else k for k in state.keys)), revoked
