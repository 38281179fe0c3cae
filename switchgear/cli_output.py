"""What the `switchgear` command prints: tables for lists (`--json` prints the reply instead),
and RPC failures that name the fix (the flag, file or variable; or that the address is the
other kind of process)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import json_format

from switchgear.admin_client import API_KEY_ENV, TOKEN_ENV

#: Who a command talks to: the control plane's Admin/Governance ("admin") or Tasks ("tasks")
#: services, or an agent's Gateway ("agent").
ADMIN, TASKS, AGENT = "admin", "tasks", "agent"

_ADMIN_FIX = (f"pass --admin-token-file FILE (the control plane writes <its --db>.admin-token on first start) "
              f"or set ${TOKEN_ENV}")
_KEY_FIX = f"--api-key KEY or ${API_KEY_ENV} (a key from `switchgear keys issue TENANT`)"


def print_json(message: Any) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def when(ts: Any) -> str:
    """A protobuf Timestamp as UTC "YYYY-MM-DD HH:MM:SS"; "-" when unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return datetime.fromtimestamp(ts.ToNanoseconds() / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """An enum value by its short name ("llm" for SERVICE_CATEGORY_LLM); "" for 0/unknown."""
    if not value:
        return ""
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def _num(value: float) -> str:
    return f"{value:g}" if value else "-"


# ---------------------------------------------------------------------------------------
# failures


def _hint(code: grpc.StatusCode, details: str, role: str, address: str, listing: str) -> str:
    wrong_process = "method not found" in details.lower() or "unknown method" in details.lower()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if role == AGENT:
            return f"send the tenant's client key: {_KEY_FIX}"
        if role == TASKS:
            return f"{_ADMIN_FIX}; or send a tenant's client key: {_KEY_FIX}"
        return _ADMIN_FIX
    if code == grpc.StatusCode.UNIMPLEMENTED and wrong_process:
        if role == AGENT:
            return (f"{address} is not an agent (this is a control plane address?): point --agent at an agent's "
                    "gRPC --listen address (default 127.0.0.1:50061)")
        return (f"{address} is not a control plane (this is an agent address?): point --control-plane at the "
                "control plane's --listen address (default 127.0.0.1:50051)")
    if code == grpc.StatusCode.UNIMPLEMENTED and role == AGENT:
        return "this agent cannot serve that service's protocol or method: see `switchgear admin services`"
    if code == grpc.StatusCode.NOT_FOUND and listing:
        return f"see what exists with `{listing}`"
    if code == grpc.StatusCode.UNAVAILABLE:
        flag = "--agent" if role == AGENT else "--control-plane"
        return f"nothing answered at {address}: is it running? (the address comes from {flag})"
    return ""


def rpc_failure(exc: grpc.RpcError, role: str, address: str, listing: str = "") -> str:
    """`CODE: details`, and on a second line the fix when there is one to name."""
    code: grpc.StatusCode = exc.code()
    details = str(exc.details() or "")
    hint = _hint(code, details, role, address, listing)
    return f"{code.name}: {details}" + (f"\n  fix: {hint}" if hint else "")


# ---------------------------------------------------------------------------------------
# tables: one function per list reply, rows with the header first


def services_rows(reply: Any) -> list[tuple[str, ...]]:
    from switchgear.v1 import common_pb2

    rows: list[tuple[str, ...]] = [("NAME", "CATEGORY", "PROTOCOL", "MODEL", "PRIORITY", "ENDPOINTS")]
    for s in reply.services:
        endpoints = ", ".join(
            f"{e.id}({enum_name(common_pb2.HealthState, e.health, 'HEALTH_STATE_') or '?'})" for e in s.endpoints)
        rows.append((s.name, enum_name(common_pb2.ServiceCategory, s.category, "SERVICE_CATEGORY_"), s.protocol,
                     s.model or "-", str(s.priority), endpoints or "-"))
    return rows


def _secret(ref: Any) -> str:
    source = ref.WhichOneof("source")
    return f"{source}:{getattr(ref, source)}" if source else "-"


def _pricing(p: Any) -> str:
    parts = [f"{name} {value:g}" for name, value in (
        ("per 1k tokens", p.cost_per_1k_tokens), ("per 1k input", p.input_cost_per_1k_tokens),
        ("per 1k output", p.output_cost_per_1k_tokens), ("per request", p.cost_per_request),
        ("per 1k cache-read input", p.cache_read_input_cost_per_1k_tokens),
        ("per 1k cache-write input", p.cache_write_input_cost_per_1k_tokens),
        ("per 1k web searches", p.web_search_cost_per_1k_requests)) if value]
    return "USD " + ", ".join(parts) if parts else "-"


def service_rows(reply: Any) -> list[tuple[str, ...]]:
    """One service (GetService) as FIELD/VALUE rows; its endpoints follow in `endpoint_rows`."""
    from switchgear.v1 import common_pb2

    s = reply.service
    timeout = s.timeout.ToNanoseconds() / 1e9 if s.HasField("timeout") else 0.0
    return [
        ("FIELD", "VALUE"), ("name", s.name),
        ("category", enum_name(common_pb2.ServiceCategory, s.category, "SERVICE_CATEGORY_") or "-"),
        ("protocol", s.protocol), ("model", s.model or "-"), ("api_key", _secret(s.api_key)),
        ("pricing", _pricing(s.pricing)), ("priority", str(s.priority)), ("strategy", s.strategy or "default"),
        ("timeout", f"{timeout:g} s" if timeout else "default"), ("max_tokens", _num(s.max_tokens)),
        ("context_window", _num(s.context_window)),
        ("capabilities", ", ".join(s.capabilities) or "-"), ("fallbacks", ", ".join(s.fallbacks) or "-"),
        ("metadata", ", ".join(f"{k}={v}" for k, v in sorted(s.metadata.items())) or "-"),
        ("options", s.options_json if s.options_json not in ("", "{}") else "-"),
    ]


def endpoint_rows(reply: Any) -> list[tuple[str, ...]]:
    from switchgear.v1 import common_pb2

    rows: list[tuple[str, ...]] = [("ENDPOINT", "URL", "WEIGHT", "PRIORITY", "HEALTH", "PROTOCOL", "MODEL")]
    for e in reply.service.endpoints:
        rows.append((e.id, e.url, str(e.weight), str(e.priority),
                     enum_name(common_pb2.HealthState, e.health, "HEALTH_STATE_") or "-", e.protocol or "-",
                     e.model or "-"))
    return rows


def snapshot_lines(reply: Any) -> list[str]:
    """The snapshot being served, in brief: its version and counts, then its services' table."""
    snap = reply.snapshot
    return [f"snapshot {snap.version}: {len(snap.services)} service(s), {len(snap.tenants)} tenant(s), "
            f"{len(snap.keys)} key(s) (--json for all of it)"]


def rejections_rows(reply: Any) -> list[tuple[str, ...]]:
    """ListServices' rejections: which agent did not apply which service, and why."""
    rows: list[tuple[str, ...]] = [("REJECTED_BY", "VERSION", "SERVICE", "FIELD", "MESSAGE")]
    for r in reply.rejections:
        detail = r.rejection.error_detail
        rows.append((r.node_id, r.version or "-", r.rejection.service, detail.field_path or "-", detail.message))
    return rows


def agents_rows(reply: Any) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("NODE", "CONNECTED", "ACKED", "NACKED", "PENDING", "PEER", "REPLICA",
                                    "LAST_SEEN", "REJECTED", "DELIVERY")]
    for a in reply.agents:
        rejected = ", ".join(r.service for r in a.rejected_services) or "-"
        rows.append((a.node.id, "yes" if a.connected else "no", a.acked_version or "-", a.nacked_version or "-",
                     a.pending_version or "-", a.peer or "-", a.replica or "-", when(a.last_seen), rejected,
                     a.snapshot_delivery or "-"))
    return rows


def tenants_rows(reply: Any) -> list[tuple[str, ...]]:
    from switchgear.v1 import common_pb2, governance_pb2

    rows: list[tuple[str, ...]] = [("ID", "NAME", "TYPE", "RPM", "TPM", "USD/HOUR", "USD/DAY", "USD/REQUEST",
                                    "MAX_IN_FLIGHT", "TASK_STORE", "SERVICES", "CATEGORIES", "CREATED")]
    for t in reply.tenants:
        p = t.policy
        categories = ",".join(enum_name(common_pb2.ServiceCategory, c, "SERVICE_CATEGORY_")
                              for c in p.allowed_categories)
        rows.append((t.id, t.display_name or "-", enum_name(governance_pb2.UserType, t.user_type, "USER_TYPE_") or "-",
                     _num(p.requests_per_minute), _num(p.tokens_per_minute), _num(p.budget_per_hour_usd),
                     _num(p.budget_per_day_usd), _num(p.max_cost_per_request), _num(p.max_in_flight),
                     _task_store(p),
                     ",".join(p.allowed_services) or "all", categories or "all", when(t.created_at)))
    return rows


def _task_store(policy: Any) -> str:
    """The tenant's own task store quotas ("-": resource_allocation's defaults)."""
    own = [f"{name}={value}" for name, value in (("tasks", policy.max_unfinished_tasks), ("blobs", policy.max_blobs),
                                                  ("bytes", policy.max_blob_bytes)) if value]
    return ",".join(own) or "-"


def keys_rows(reply: Any) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("ID", "TENANT", "STATE", "CREATED", "REVOKED", "DESCRIPTION")]
    for k in reply.keys:
        rows.append((k.id, k.tenant, "revoked" if k.revoked else "live", when(k.created_at), when(k.revoked_at),
                     k.description or "-"))
    return rows


def audit_rows(reply: Any) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("WHEN", "VERSION", "ACTOR", "ACTION", "TARGET", "CHANGE", "DETAIL")]
    for e in reply.entries:
        change = ("created" if not e.before_json and e.after_json else "removed" if e.before_json and not e.after_json
                  else "changed" if e.before_json else "-")
        rows.append((when(e.at), e.version or "-", e.actor or "-", e.action, e.target or "-", change, e.detail or "-"))
    return rows


def task_rows(task: Any) -> list[tuple[str, ...]]:
    """One task as FIELD/VALUE rows (the payload and result as their sizes; --json shows them)."""
    from switchgear.v1 import common_pb2, tasks_pb2

    usage = task.usage
    rows: list[tuple[str, ...]] = [
        ("FIELD", "VALUE"), ("id", task.id), ("state", enum_name(tasks_pb2.TaskState, task.state, "TASK_STATE_")),
        ("tenant", task.tenant or "-"), ("service", task.service),
        ("category", enum_name(common_pb2.ServiceCategory, task.category, "SERVICE_CATEGORY_") or "-"),
        ("method", task.method), ("priority", f"{task.priority} (effective {task.effective_priority:.2f})"),
        ("attempts", f"{task.attempts}/{task.max_attempts}"), ("agent", task.agent or "-"),
        ("endpoint", task.endpoint or "-"), ("progress", f"{task.progress:.0%} {task.progress_message}".rstrip()),
        ("payload", f"blob {task.payload_blob_id}" if task.payload_blob_id else f"{len(task.payload)} bytes"),
        ("result", f"{len(task.result)} bytes"),
        ("usage", f"{usage.input_tokens} in / {usage.output_tokens} out tokens, ${usage.cost_usd:.6f}"),
        ("error", f"{task.error.kind}: {task.error.message}" if task.error.message else "-"),
        ("created", when(task.created_at)), ("started", when(task.started_at)), ("finished", when(task.finished_at)),
    ]
    return rows


def task_stats_rows(reply: Any) -> list[tuple[str, ...]]:
    """Counts by state, then one row per agent (and the cluster) with its task slots and use."""
    rows: list[tuple[str, ...]] = [("AGENT", "TASKS", "SLOTS", "CPU", "MEMORY", "GPU", "LAST_SEEN")]

    def usage_row(name: str, usage: Any, seen: str) -> tuple[str, ...]:
        util = usage.utilisation
        return (name, str(usage.tasks), str(usage.task_capacity), f"{util.get('cpu', 0.0):.0%}",
                f"{util.get('memory', 0.0):.0%}", f"{util.get('gpu', 0.0):.0%}", seen)

    rows.append(usage_row("(cluster)", reply.cluster, "-"))
    rows.extend(usage_row(a.agent, a.usage, when(a.last_seen)) for a in reply.agents)
    return rows


def task_counts_line(reply: Any) -> str:
    counts = ", ".join(f"{state} {n}" for state, n in sorted(reply.counts.items())) or "no tasks"
    return f"tasks: {counts}; max concurrent per agent {reply.max_concurrent_tasks}"


def show(reply: Any, as_json: bool, rows: Callable[[Any], list[tuple[str, ...]]], empty: str) -> None:
    """`--json`: the reply as JSON; else its table, or `empty` when it has no rows."""
    if as_json:
        print_json(reply)
        return
    table = rows(reply)
    if len(table) == 1:
        print(empty)
        return
    print_table(table)
