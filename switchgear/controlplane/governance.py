"""The Governance service: tenants, their policies and keys, usage, and the audit trail.

Thin: convert, apply a pure operation from tenancy.py to the registry state, commit it through
the registry (validated, versioned, audited with before/after), map failures to gRPC codes.
Every store access (commits, the audit trail, a follower replica's saved usage) is awaited on
the store's thread, never run on the event loop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc

from switchgear.controlplane import codec, tenancy
from switchgear.controlplane import convert_governance as cg
from switchgear.controlplane.convert import ConvertError
from switchgear.controlplane.model import ApiKey, Tenant
from switchgear.controlplane.registry import Contended, Registry
from switchgear.controlplane.store import Change
from switchgear.controlplane.usage import UsageBook
from switchgear.controlplane.validate import ValidationError
from switchgear.v1 import governance_pb2, governance_pb2_grpc


async def _abort(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")


async def _ready(book: UsageBook) -> UsageBook:
    return book


def _json(obj: Tenant | ApiKey | None) -> str:
    if obj is None:
        return ""
    if isinstance(obj, ApiKey):
        obj = dataclasses.replace(obj, sha256="")  # the digest is not for the audit trail
    return codec.dumps(obj)


def _actor(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    return f"admin@{context.peer()}"


class GovernanceServicer(governance_pb2_grpc.GovernanceServiceServicer):
    def __init__(self, registry: Registry, usage: UsageBook, clock: Callable[[], float] = time.time,
                 usage_source: Callable[[], Awaitable[UsageBook]] | None = None) -> None:
        self._registry = registry
        self._usage = usage_source or (lambda: _ready(usage))  # replicas: the leader's saved book
        self._clock = clock

    async def _commit(self, context: Any, operation: Callable[[], Any], action: str, subject: str) -> Any:
        """Run a tenancy operation and the commit it makes, mapping errors to codes; a refused
        change (`action` on `subject`) gets a "refused" audit row."""
        try:
            return await self._registry.retrying_async(operation)
        except Contended as exc:
            await _abort(context, grpc.StatusCode.ABORTED, str(exc))
        except ConvertError as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except tenancy.GovernanceError as exc:
            code = grpc.StatusCode.NOT_FOUND if exc.not_found else grpc.StatusCode.INVALID_ARGUMENT
            if "already exists" in exc.message:
                code = grpc.StatusCode.ALREADY_EXISTS
            message = str(exc)
        except ValidationError as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, "; ".join(str(p) for p in exc.problems)
        await self._registry.record_refusal(_actor(context), action, subject, message)
        await _abort(context, code, message)

    async def CreateTenant(self, request: governance_pb2.CreateTenantRequest, context: Any) -> Any:  # noqa: N802
        def op() -> governance_pb2.CreateTenantResponse:
            tenant = cg.tenant_from_proto(request.tenant, self._clock())
            state = tenancy.create_tenant(self._registry.state, tenant)
            change = Change(_actor(context), "create_tenant", tenant.id, after=_json(tenant))
            snapshot = self._registry.change(state, change)
            return governance_pb2.CreateTenantResponse(tenant=cg.tenant_to_proto(tenant), version=snapshot.version)

        return await self._commit(context, op, "create_tenant", request.tenant.id)

    async def ListTenants(self, request: governance_pb2.ListTenantsRequest, context: Any) -> Any:  # noqa: N802
        return governance_pb2.ListTenantsResponse(tenants=[cg.tenant_to_proto(t) for t in self._registry.state.tenants])

    async def DeleteTenant(self, request: governance_pb2.DeleteTenantRequest, context: Any) -> Any:  # noqa: N802
        def op() -> governance_pb2.DeleteTenantResponse:
            before = self._registry.state.tenant(request.id)
            state = tenancy.delete_tenant(self._registry.state, request.id)
            change = Change(_actor(context), "delete_tenant", request.id, before=_json(before))
            return governance_pb2.DeleteTenantResponse(version=self._registry.change(state, change).version)

        return await self._commit(context, op, "delete_tenant", request.id)

    async def SetPolicy(self, request: governance_pb2.SetPolicyRequest, context: Any) -> Any:  # noqa: N802
        def op() -> governance_pb2.SetPolicyResponse:
            policy = cg.policy_from_proto(request.policy)
            user_type = cg.user_type_from_proto(request.user_type, "user_type")
            before = self._registry.state.tenant(request.tenant)
            state = tenancy.set_policy(self._registry.state, request.tenant, policy, user_type)
            after = state.tenant(request.tenant)
            change = Change(_actor(context), "set_policy", request.tenant, before=_json(before), after=_json(after))
            snapshot = self._registry.change(state, change)
            assert after is not None
            return governance_pb2.SetPolicyResponse(tenant=cg.tenant_to_proto(after), version=snapshot.version)

        return await self._commit(context, op, "set_policy", request.tenant)

    async def IssueKey(self, request: governance_pb2.IssueKeyRequest, context: Any) -> Any:  # noqa: N802
        def op() -> governance_pb2.IssueKeyResponse:
            key, secret = tenancy.new_key(request.tenant, request.description, self._clock())
            state = tenancy.add_key(self._registry.state, key)
            snapshot = self._registry.change(state, Change(_actor(context), "issue_key", key.id, after=_json(key)))
            info = cg.key_info_to_proto(key)
            return governance_pb2.IssueKeyResponse(key=info, secret=secret, version=snapshot.version)

        return await self._commit(context, op, "issue_key", request.tenant)

    async def RevokeKey(self, request: governance_pb2.RevokeKeyRequest, context: Any) -> Any:  # noqa: N802
        def op() -> governance_pb2.RevokeKeyResponse:
            before = self._registry.state.key(request.id)
            state, revoked = tenancy.revoke_key(self._registry.state, request.id, self._clock())
            change = Change(_actor(context), "revoke_key", request.id, before=_json(before), after=_json(revoked))
            snapshot = self._registry.change(state, change)
            return governance_pb2.RevokeKeyResponse(key=cg.key_info_to_proto(revoked), version=snapshot.version)

        return await self._commit(context, op, "revoke_key", request.id)

    async def ListKeys(self, request: governance_pb2.ListKeysRequest, context: Any) -> Any:  # noqa: N802
        keys = [k for k in self._registry.state.keys if not request.tenant or k.tenant == request.tenant]
        return governance_pb2.ListKeysResponse(keys=[cg.key_info_to_proto(k) for k in keys])

    async def GetUsage(self, request: governance_pb2.GetUsageRequest, context: Any) -> Any:  # noqa: N802
        tenants = [t.id for t in self._registry.state.tenants if not request.tenant or t.id == request.tenant]
        if request.tenant and not tenants:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"tenant: no tenant {request.tenant!r}")
        book = await self._usage()
        now = self._clock()
        return governance_pb2.GetUsageResponse(usage=[cg.usage_to_proto(book.usage(t, now)) for t in tenants])

    async def ListAudit(self, request: governance_pb2.ListAuditRequest, context: Any) -> Any:  # noqa: N802
        entries = await self._registry.call(lambda: self._registry.audit(request.limit or 100))
        return governance_pb2.ListAuditResponse(entries=[cg.audit_to_proto(e) for e in entries])
