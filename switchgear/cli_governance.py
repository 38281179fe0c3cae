"""`switchgear tenants|keys|usage|audit`: governance from the command line (a thin edge)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format

from switchgear import cli_output
from switchgear.admin_client import admin_channel, resolve_token
from switchgear.v1 import common_pb2, governance_pb2, governance_pb2_grpc


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, governance_pb2_grpc.GovernanceServiceStub]:
    channel = admin_channel(args.control_plane, resolve_token(args.admin_token_file))
    return channel, governance_pb2_grpc.GovernanceServiceStub(channel)


def _policy(args: argparse.Namespace) -> governance_pb2.TenantPolicy:
    return governance_pb2.TenantPolicy(
        allowed_services=args.allow_service or [],
        allowed_categories=[common_pb2.ServiceCategory.Value(f"SERVICE_CATEGORY_{c.upper()}")
                            for c in (args.allow_category or [])],
        requests_per_minute=args.rpm, tokens_per_minute=args.tpm,
        budget_per_hour_usd=args.budget_hour, budget_per_day_usd=args.budget_day,
        max_cost_per_request=args.max_cost, priority_cap=args.priority_cap,
        max_in_flight=args.max_in_flight, max_unfinished_tasks=args.max_tasks, max_blobs=args.max_blobs,
        max_blob_bytes=args.max_blob_bytes,
    )


def _user_type(name: str | None) -> Any:
    return {None: 0, "standard": governance_pb2.USER_TYPE_STANDARD, "premium": governance_pb2.USER_TYPE_PREMIUM}[name]


def _print_usage(reply: governance_pb2.GetUsageResponse) -> None:
    columns = ("req/min", "tok/min", "$ hour", "$ day", "requests", "rejected", "$ total")
    print(f"{'tenant':<16}" + "".join(f"{c:>10}" for c in columns))
    for u in reply.usage:
        print(f"{u.tenant:<16}{u.requests_this_minute:>10}{u.tokens_this_minute:>10}{u.cost_this_hour_usd:>10.4f}"
              f"{u.cost_this_day_usd:>10.4f}{u.requests_total:>10}{u.rejected_total:>10}{u.cost_total_usd:>10.4f}")


def run(args: argparse.Namespace) -> int:
    calls: dict[str, Callable[[governance_pb2_grpc.GovernanceServiceStub], Any]] = {
        "tenants.create": lambda g: g.CreateTenant(governance_pb2.CreateTenantRequest(tenant=governance_pb2.Tenant(
            id=args.id, display_name=args.name or "", user_type=_user_type(args.user_type), policy=_policy(args)))),
        "tenants.list": lambda g: g.ListTenants(governance_pb2.ListTenantsRequest()),
        "tenants.delete": lambda g: g.DeleteTenant(governance_pb2.DeleteTenantRequest(id=args.id)),
        "tenants.policy": lambda g: g.SetPolicy(governance_pb2.SetPolicyRequest(
            tenant=args.id, policy=_policy(args), user_type=_user_type(args.user_type))),
        "keys.issue": lambda g: g.IssueKey(
            governance_pb2.IssueKeyRequest(tenant=args.tenant, description=args.description)),
        "keys.revoke": lambda g: g.RevokeKey(governance_pb2.RevokeKeyRequest(id=args.id)),
        "keys.list": lambda g: g.ListKeys(governance_pb2.ListKeysRequest(tenant=args.tenant or "")),
        "usage": lambda g: g.GetUsage(governance_pb2.GetUsageRequest(tenant=args.tenant or "")),
        "audit": lambda g: g.ListAudit(governance_pb2.ListAuditRequest(limit=args.limit)),
    }
    name = args.command if args.command in ("usage", "audit") else f"{args.command}.{args.action}"
    try:
        channel, stub = _stub(args)
    except OSError as exc:
        print(f"switchgear {args.command}: --admin-token-file: {exc}", file=sys.stderr)
        return 1
    try:
        reply = calls[name](stub)
    except grpc.RpcError as exc:
        listing = "switchgear keys list" if name.startswith("keys.") else "switchgear tenants list"
        print(cli_output.rpc_failure(exc, cli_output.ADMIN, args.control_plane, listing), file=sys.stderr)
        return 1
    finally:
        channel.close()
    as_json = getattr(args, "json", False)
    if name == "usage" and not as_json:
        _print_usage(reply)
    elif name in _TABLES:
        rows, empty = _TABLES[name]
        cli_output.show(reply, as_json, rows, empty)
    elif name == "keys.issue":
        print(f"key {reply.key.id} for tenant {reply.key.tenant} (shown once, store it now):\n{reply.secret}")
    else:
        print(json_format.MessageToJson(reply, preserving_proto_field_name=True, indent=2))
    return 0


#: List commands' tables: (rows, what to print when there are none).
_TABLES: dict[str, tuple[Callable[[Any], list[tuple[str, ...]]], str]] = {
    "tenants.list": (cli_output.tenants_rows, "no tenants"),
    "keys.list": (cli_output.keys_rows, "no keys"),
    "audit": (cli_output.audit_rows, "no audit entries"),
}


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control-plane", default="127.0.0.1:50051")
    parser.add_argument("--admin-token-file", help="file holding the admin token (else $SWITCHGEAR_ADMIN_TOKEN)")


def _count(text: str) -> int:
    """A whole number >= 0, as argparse reads it (a clear usage error, not a traceback)."""
    if not text.isdigit() or int(text) >= 2**32:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {2**32 - 1}, got {text!r}")
    return int(text)


def _size(text: str) -> int:
    """Bytes, written as the config writes sizes (4Gi, 500MB, 1000000), within uint64."""
    from switchgear.controlplane.config import parse_size

    size = parse_size(text)
    if size is None or size >= 2**64:
        raise argparse.ArgumentTypeError(f"must be a size like 4Gi, 500MB or a number of bytes, got {text!r}")
    return size


def _policy_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user-type", choices=("standard", "premium"))
    parser.add_argument("--rpm", type=int, default=0, help="requests per minute (0 = no limit)")
    parser.add_argument("--tpm", type=int, default=0, help="tokens per minute")
    parser.add_argument("--budget-hour", type=float, default=0.0, help="USD per hour")
    parser.add_argument("--budget-day", type=float, default=0.0, help="USD per day")
    parser.add_argument("--max-cost", type=float, default=0.0, help="USD per request")
    parser.add_argument("--priority-cap", type=int, default=0)
    parser.add_argument("--max-in-flight", type=_count, default=0, metavar="N",
                        help="calls in flight per agent at once (0 = no cap); more get 429 / RESOURCE_EXHAUSTED")
    parser.add_argument("--max-tasks", type=_count, default=0, metavar="N",
                        help="unfinished tasks in the task store (0 = resource_allocation.max_tasks_per_tenant)")
    parser.add_argument("--max-blobs", type=_count, default=0, metavar="N",
                        help="blobs in the task store (0 = resource_allocation.max_blobs_per_tenant)")
    parser.add_argument("--max-blob-bytes", type=_size, default=0, metavar="SIZE",
                        help="bytes of blobs, e.g. 4Gi (0 = resource_allocation.max_blob_bytes_per_tenant)")
    parser.add_argument("--allow-service", action="append", help="repeatable; none = all")
    parser.add_argument("--allow-category", action="append",
                        choices=("llm", "document", "knowledge_graph", "vector_db", "embedding"))


def add_commands(sub: Any) -> None:
    tenants = sub.add_parser("tenants", help="create, list, delete tenants and set their policies")
    t_sub = tenants.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = t_sub.add_parser("create", help="create a tenant with a policy")
    create.add_argument("id")
    create.add_argument("--name")
    _policy_flags(create)
    t_sub.add_parser("list", help="list tenants and their policies")
    delete = t_sub.add_parser("delete", help="delete a tenant and its keys")
    delete.add_argument("id")
    policy = t_sub.add_parser("policy", help="replace a tenant's whole policy")
    policy.add_argument("id")
    _policy_flags(policy)
    keys = sub.add_parser("keys", help="issue, revoke and list client API keys")
    k_sub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    issue = k_sub.add_parser("issue", help="issue a key (its secret is shown once)")
    issue.add_argument("tenant")
    issue.add_argument("--description", default="")
    revoke = k_sub.add_parser("revoke", help="revoke a key on every agent with the next snapshot")
    revoke.add_argument("id")
    listing = k_sub.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant")
    usage = sub.add_parser("usage", help="usage per tenant this minute, hour and day")
    usage.add_argument("--tenant")
    audit = sub.add_parser("audit", help="the append-only audit log of admin changes")
    audit.add_argument("--limit", type=int, default=50)
    for parser in (create, t_sub.choices["list"], delete, policy, issue, revoke, listing, usage, audit):
        _connection(parser)
    for parser in (t_sub.choices["list"], listing, usage, audit):
        parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    for parser in (tenants, keys, usage, audit):
        parser.set_defaults(func=run)
