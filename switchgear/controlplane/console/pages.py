"""HTML for the console's pages, rendered on the server from the control plane's API replies.

Every value that comes from the registry, an agent or an operator passes through `esc` (cells
take plain strings and escape them; only this module's own markup is `Raw`). Pages carry no
inline script or style (the Content-Security-Policy forbids both): behaviour is in
static/console.js, looks in static/console.css, and charts are inline SVG drawn with
presentation attributes.
"""

from __future__ import annotations

import difflib
import html
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from switchgear.controlplane.console.backend import Sample
from switchgear.controlplane.console.sessions import Session
from switchgear.controlplane.snapshot import version_seq
from switchgear.v1 import admin_pb2, common_pb2, governance_pb2, tasks_pb2

PAGES = (("fleet", "Fleet"), ("routes", "Routes"), ("alerts", "Alerts"), ("tenants", "Tenants"),
         ("tasks", "Tasks"), ("replicas", "Replicas"), ("config", "Config"))

#: JSON fields never shown, whatever object they turn up in (defence in depth: the services
#: already leave key digests out of the audit trail and never carry secrets' values).
REDACTED_FIELDS = frozenset({"sha256", "secret", "digest", "password", "token", "value"})

#: The audit action of a change the control plane refused before committing it (store.REFUSED).
REFUSED = "refused"


class Raw(str):
    """Markup made by this module: not escaped again."""


def esc(value: object) -> Raw:
    return value if isinstance(value, Raw) else Raw(html.escape(str(value), quote=True))


def tag(name: str, body: object = "", **attrs: object) -> Raw:
    rendered = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return Raw(f"<{name}{rendered}>{esc(body)}</{name}>")


def join(parts: Iterable[object]) -> Raw:
    return Raw("".join(esc(p) for p in parts))


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], cls: str = "") -> Raw:
    head = join(tag("th", h) for h in headers)
    body = join(tag("tr", join(tag("td", c) for c in row)) for row in rows)
    return tag("table", Raw(f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>"), class_=cls or None)


def csrf_field(session: Session) -> Raw:
    return Raw(f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">')


def button_form(action: str, label: str, session: Session, cls: str = "") -> Raw:
    if not session.can_change:
        return Raw("")
    return Raw(f'<form method="post" action="{esc(action)}" class="inline">{csrf_field(session)}'
               f'<button type="submit" class="{esc(cls)}">{esc(label)}</button></form>')


def layout(title: str, active: str, body: object, session: Session | None, *, notice: str = "",
           error: str = "") -> str:
    nav = join(tag("a", label, href=f"/{page}", class_="active" if page == active else None) for page, label in PAGES)
    who = ""
    if session is not None:
        who = (f'<span class="role">{esc(session.role)}</span><form method="post" action="/logout" class="inline">'
               f'{csrf_field(session)}<button type="submit">Log out</button></form>')
    messages = (tag("p", notice, class_="notice", role="status") if notice else "") + (
        tag("p", error, class_="error", role="alert") if error else "")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)} · Switchgear</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="/static/favicon.svg"><link rel="stylesheet" href="/static/console.css">'
        '<script src="/static/console.js" defer></script>'
        f'</head><body><header><strong>Switchgear</strong><nav>{nav if session else ""}</nav>{who}</header>'
        f'<main><h1>{esc(title)}</h1>{messages}{esc(body)}</main></body></html>'
    )


def login_page(error: str = "") -> str:
    form = Raw('<form method="post" action="/login" class="login"><label>Admin or viewer token '
               '<input type="password" name="token" autocomplete="off" required></label>'
               '<button type="submit">Log in</button></form>'
               '<p class="hint">The admin token is in the file beside the control plane\'s store '
               '(&lt;db&gt;.admin-token) or --admin-token-file.</p>')
    return layout("Log in", "", form, None, error=error)


def ago(seconds_since_epoch: float, now: float | None = None) -> str:
    if seconds_since_epoch <= 0:
        return "never"
    delta = max(0.0, (now or time.time()) - seconds_since_epoch)
    if delta < 120:
        return f"{delta:.0f} s ago"
    if delta < 7200:
        return f"{delta / 60:.0f} min ago"
    return f"{delta / 3600:.1f} h ago"


def _ts(stamp: Any) -> float:
    return float(stamp.seconds) + float(stamp.nanos) / 1e9


# -- fleet ----------------------------------------------------------------------------


def agent_state(agent: admin_pb2.AgentStatus, target: str) -> str:
    """ACK, NACK, pending or disconnected, for `target` (a version; a later ACK counts)."""
    if not agent.connected:
        return "disconnected"
    want = version_seq(target)
    if agent.nacked_version and version_seq(agent.nacked_version) >= want > version_seq(agent.acked_version):
        return "NACK"
    if version_seq(agent.acked_version) >= want:
        return "ACK"
    return "pending"


def _reasons(agent: admin_pb2.AgentStatus, state: str) -> str:
    parts = []
    if state == "NACK" and agent.HasField("last_nack"):
        parts.append(f"rejected {agent.nacked_version}: {agent.last_nack.field_path}: {agent.last_nack.message}")
    for r in agent.rejected_services:
        parts.append(f"did not apply service '{r.service}': {r.error_detail.field_path}: {r.error_detail.message}")
    return "; ".join(parts)


def latest_change(entry: governance_pb2.AuditEntry | None) -> Raw:
    """The newest audit row and its outcome: "refused: <path>: <message>" for a change the control
    plane refused before committing it, else the version it made."""
    if entry is None:
        return Raw("")
    if entry.action == REFUSED:
        outcome = tag("span", f"refused: {entry.detail}", class_="refused")
    else:
        outcome = esc(f"{entry.action}, version {entry.version or '-'}")
    what = entry.target if entry.action == REFUSED else f"{entry.action} {entry.target}"
    return tag("p", Raw(f"Latest change: <code>{esc(what)}</code> by {esc(entry.actor)}, {esc(ago(_ts(entry.at)))}: "
                        f"{outcome}"), class_="latest-change", id="latest-change")


def fleet_fragment(reply: admin_pb2.ListAgentsResponse, target: str = "",
                   loads: dict[str, admin_pb2.AgentLoad] | None = None, tasks: dict[str, int] | None = None,
                   latest: governance_pb2.AuditEntry | None = None) -> Raw:
    """The propagation of `target` (default: the version served), the latest change and its
    outcome (`latest`: the newest audit row), and a row per agent. `loads`: agents' last load
    reports (in-flight calls); `tasks`: tasks each agent holds."""
    loads, tasks = loads or {}, tasks or {}
    target = target or reply.current_version
    states = [(a, agent_state(a, target)) for a in reply.agents]
    counts = {s: sum(1 for _, st in states if st == s) for s in ("ACK", "NACK", "pending", "disconnected")}
    partial = sum(1 for a, st in states if st == "ACK" and a.rejected_services)
    summary = tag("p", Raw(
        f'Version <code class="version">{esc(target)}</code> (serving {esc(reply.current_version)}): '
        f'<span class="ack">{counts["ACK"]} ACK</span>'
        f'{f" ({partial} without some services)" if partial else ""}, '
        f'<span class="nack">{counts["NACK"]} NACK</span>, {counts["pending"]} pending, '
        f'{counts["disconnected"]} disconnected, of {len(states)} agent(s)'), class_="propagation", id="propagation")
    rows = []
    for agent, state in sorted(states, key=lambda s: s[0].node.id):
        load = loads.get(agent.node.id)
        last = _ts(load.last_report) if load is not None else _ts(agent.last_seen) if agent.HasField("last_seen") else 0
        rows.append([
            agent.node.id, agent.node.zone or "-", agent.replica or "-", agent.node.build_version or "-",
            tag("span", state + (" (partial)" if state == "ACK" and agent.rejected_services else ""),
                class_=f"state {state.lower()}"),
            agent.acked_version or "-", agent.pending_version or "-",
            _reasons(agent, state) or "-",
            str(load.in_flight) if load is not None else "-", str(tasks.get(agent.node.id, "-")), ago(last),
        ])
    headers = ["Agent", "Zone", "Replica", "Build", "State", "ACKed", "Pending", "NACK / rejection reason",
               "In flight", "Tasks", "Last report"]
    return join([summary, latest_change(latest), table(headers, rows, "fleet")])


def fleet_page(fragment: Raw, target: str = "") -> Raw:
    url = "/api/stream/fleet" + (f"?version={target}" if target else "")
    return Raw(f'<div id="fleet" data-sse="{esc(url)}">{fragment}</div>'
               '<p class="hint">Updated live as agents ACK or NACK (server-sent events): '
               '<span id="live-status">connecting…</span></p>')


# -- routes ---------------------------------------------------------------------------


def sparkline(points: Sequence[float], *, width: int = 160, height: int = 32, top: float | None = None,
              label: str = "") -> Raw:
    """An inline SVG polyline of `points` (oldest first) scaled to [0, top]."""
    if len(points) < 2:
        return tag("span", "collecting…", class_="muted")
    high = top if top is not None else max(max(points), 1e-9)
    step = width / (len(points) - 1)
    coords = " ".join(f"{i * step:.1f},{height - min(p, high) / high * (height - 2) - 1:.1f}"
                      for i, p in enumerate(points))
    return Raw(f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
               f'aria-label="{esc(label)}"><polyline fill="none" stroke="currentColor" stroke-width="1.5" '
               f'points="{coords}"/></svg>')


def health_name(value: int) -> str:
    return str(common_pb2.HealthState.Name(value)).removeprefix("HEALTH_STATE_").lower() if value else "unscored"


def routes_fragment(stats: admin_pb2.GetStatsResponse, history: dict[tuple[str, str], list[Sample]]) -> Raw:
    rows = []
    for s in sorted(stats.stats, key=lambda r: (r.service, r.endpoint != "", r.endpoint)):
        series = history.get((s.service, s.endpoint), [])
        p50, p99 = (f"{ms:.0f}" if ms >= 0 else "-" for ms in (s.p50_response_time_ms, s.p99_response_time_ms))
        target = s.endpoint or "(all)"
        rows.append([
            s.service, tag("span", target, class_="target" if s.endpoint else "total"),
            tag("span", health_name(s.health), class_=f"health {health_name(s.health)}") if s.endpoint else "",
            str(s.weight) if s.endpoint else "", f"{s.circuit_breaker_trips}",
            f"{s.success_rate * 100:.1f}%", p50, p99, f"{s.avg_response_time_ms:.0f}", f"${s.cost_per_hour:.4f}",
            str(s.request_count), str(s.in_flight),
            sparkline([x.success_rate for x in series], top=1.0, label="success rate, last 15 min"),
            sparkline([max(x.p99_ms, 0.0) for x in series], label="p99 latency, last 15 min"),
        ])
    window = stats.window.seconds
    headers = ["Service", "Target", "Health", "Weight", "Breaker trips", "Success", "p50 ms", "p99 ms", "Mean ms",
               "Cost / h", "Requests", "In flight", "Success (15 min)", "p99 (15 min)"]
    return join([tag("p", f"Over the last {window} s, from {stats.reporting_agents} reporting agent(s).",
                     class_="hint"), table(headers, rows, "routes")])


# -- alerts and audit ------------------------------------------------------------------


def _alert_rows(alerts: Iterable[admin_pb2.Alert]) -> list[list[object]]:
    return [[a.rule, a.service or "-", tag("span", a.severity, class_=f"sev {a.severity}"), a.condition,
             f"{a.value:.3g}", a.action or "-", a.action_detail or "-", ago(_ts(a.fired_at)), a.fired_version or "-",
             ago(_ts(a.recovered_at)) if a.HasField("recovered_at") else "firing", a.recovered_version or "-"]
            for a in alerts]


def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("[redacted]" if k.lower() in REDACTED_FIELDS and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _pretty(text: str) -> list[str]:
    if not text:
        return []
    try:
        return json.dumps(redact(json.loads(text)), indent=1, sort_keys=True).splitlines()
    except ValueError:
        return ["(not JSON)"]


def json_diff(before: str, after: str) -> Raw:
    if not before and not after:
        return esc("-")
    lines = list(difflib.unified_diff(_pretty(before), _pretty(after), "before", "after", lineterm="", n=1))
    if not lines:
        return tag("span", "no change", class_="muted")
    cls = {"+": "add", "-": "del", "@": "hunk"}
    body = join(tag("span", line + "\n", class_=cls.get(line[:1], "ctx")) for line in lines[2:])
    return tag("pre", body, class_="diff")


def alerts_page(alerts: admin_pb2.ListAlertsResponse, audit: governance_pb2.ListAuditResponse) -> Raw:
    headers = ["Rule", "Service", "Severity", "Condition", "Value", "Action", "What it changed", "Fired",
               "Version", "Recovered", "Revert version"]
    audit_rows = [[ago(_ts(e.at)), e.actor,
                   tag("span", e.action, class_="refused") if e.action == REFUSED else e.action,
                   e.target, e.version or "-", e.detail or "",
                   json_diff(e.before_json, e.after_json)] for e in audit.entries]
    return join([
        tag("h2", f"Firing ({len(alerts.firing)})"),
        table(headers, _alert_rows(alerts.firing), "alerts firing") if alerts.firing else tag("p", "Nothing firing."),
        tag("h2", "Recently recovered"),
        table(headers, _alert_rows(alerts.recovered), "alerts") if alerts.recovered else tag("p", "None."),
        tag("h2", "Audit trail"),
        table(["When", "Who", "Action", "Target", "Version", "Detail", "Before → after"], audit_rows, "audit"),
    ])


# -- tenants ---------------------------------------------------------------------------


def _budget(spent: float, budget: float) -> Raw:
    if budget <= 0:
        return esc(f"${spent:.4f} (no budget)")
    share = min(spent / budget, 1.0)
    return Raw(f'${spent:.4f} of ${budget:.2f} <meter min="0" max="1" value="{share:.3f}"></meter>')


def tenants_page(tenants: governance_pb2.ListTenantsResponse, usage: governance_pb2.GetUsageResponse,
                 keys: governance_pb2.ListKeysResponse, session: Session, new_key: str = "") -> Raw:
    by_tenant = {u.tenant: u for u in usage.usage}
    rows = []
    for t in tenants.tenants:
        u = by_tenant.get(t.id, governance_pb2.TenantUsage(tenant=t.id))
        rows.append([t.id, t.display_name or "-", str(u.requests_this_minute), str(u.requests_total),
                     str(u.rejected_total), _budget(u.cost_this_hour_usd, t.policy.budget_per_hour_usd),
                     _budget(u.cost_this_day_usd, t.policy.budget_per_day_usd), f"${u.cost_total_usd:.4f}"])
    key_rows = [[k.id, k.tenant, k.description or "-", ago(_ts(k.created_at)),
                 "revoked " + ago(_ts(k.revoked_at)) if k.revoked else "live",
                 "" if k.revoked else button_form(f"/tenants/keys/{k.id}/revoke", "Revoke", session, "danger")]
                for k in keys.keys]
    parts: list[object] = []
    if new_key:
        parts.append(Raw('<div class="newkey" role="status"><p>New key — shown once, store it now:</p>'
                         f'<code id="new-key">{esc(new_key)}</code></div>'))
    parts += [
        table(["Tenant", "Name", "Requests this minute", "Requests", "Quota rejections", "Spend this hour",
               "Spend today", "Spend total"], rows, "tenants"),
        tag("h2", "Keys"),
        table(["Key id", "Tenant", "Description", "Issued", "State", ""], key_rows, "keys"),
    ]
    if session.can_change and tenants.tenants:
        options = join(tag("option", t.id, value=t.id) for t in tenants.tenants)
        parts.append(Raw(
            f'<h2>Issue a key</h2><form method="post" action="/tenants/keys" class="issue">{csrf_field(session)}'
            f'<label>Tenant <select name="tenant">{options}</select></label>'
            '<label>Description <input name="description" maxlength="200"></label>'
            '<button type="submit">Issue key</button></form>'))
    return join(parts)


# -- tasks -----------------------------------------------------------------------------

_LIVE = {tasks_pb2.TASK_STATE_QUEUED, tasks_pb2.TASK_STATE_LEASED, tasks_pb2.TASK_STATE_RUNNING}


def task_state(value: int) -> str:
    return str(tasks_pb2.TaskState.Name(value)).removeprefix("TASK_STATE_").lower()


def _task_row(t: tasks_pb2.Task, session: Session) -> list[object]:
    cancel = button_form(f"/tasks/{t.id}/cancel", "Cancel", session, "danger") if t.state in _LIVE else ""
    return [tag("a", t.id, href=f"/tasks/{t.id}"), t.tenant or "-", t.service, t.method or "-", str(t.priority),
            f"{t.effective_priority:.1f}", tag("span", task_state(t.state), class_=f"task {task_state(t.state)}"),
            f"{t.attempts}/{t.max_attempts}", t.agent or "-", f"{t.progress * 100:.0f}%", ago(_ts(t.updated_at)),
            cancel]


def _utilisation(values: Any) -> str:
    return ", ".join(f"{k} {v * 100:.0f}%" for k, v in sorted(values.items())) or "-"


def tasks_page(tasks: tasks_pb2.ListTasksResponse, stats: tasks_pb2.GetTaskStatsResponse, session: Session) -> Raw:
    counts = ", ".join(f"{state}: {n}" for state, n in sorted(stats.counts.items())) or "no tasks"
    live = sorted((t for t in tasks.tasks if t.state in _LIVE),
                  key=lambda t: (-t.effective_priority, _ts(t.created_at)))
    done = sorted((t for t in tasks.tasks if t.state not in _LIVE), key=lambda t: -_ts(t.updated_at))
    headers = ["Task", "Tenant", "Service", "Method", "Priority", "Effective", "State", "Attempts", "Agent",
               "Progress", "Updated", ""]
    agents = [[a.agent, f"{a.usage.tasks}/{a.usage.task_capacity}", _utilisation(a.usage.utilisation),
               _utilisation(a.peak_utilisation), ago(_ts(a.last_seen))] for a in stats.agents]
    return join([
        tag("p", f"By state: {counts}. Cluster: {_utilisation(stats.cluster.utilisation)}.", class_="hint"),
        tag("h2", "Queue (by effective priority)"), table(headers, [_task_row(t, session) for t in live], "queue"),
        tag("h2", "Per-agent resources"),
        table(["Agent", "Tasks", "Utilisation", "Peak", "Last seen"], agents, "agents"),
        tag("h2", "History"), table(headers, [_task_row(t, session) for t in done[:50]], "history"),
    ])


def task_page(t: tasks_pb2.Task, session: Session) -> Raw:
    def when(name: str) -> str:
        return ago(_ts(getattr(t, name))) if t.HasField(name) else "-"

    facts = [("State", task_state(t.state)), ("Tenant", t.tenant), ("Service", t.service), ("Method", t.method),
             ("Priority", f"{t.priority} (effective {t.effective_priority:.1f})"), ("Origin", t.origin or "-"),
             ("Attempts", f"{t.attempts} of {t.max_attempts}"), ("Agent", t.agent or "-"),
             ("Endpoint", t.endpoint or "-"), ("Progress", f"{t.progress * 100:.0f}% {t.progress_message}"),
             ("Created", when("created_at")), ("Started", when("started_at")), ("Updated", when("updated_at")),
             ("Finished", when("finished_at")), ("Not before", when("not_before")),
             ("Lease expires", when("lease_expires_at")),
             ("Last error", f"{t.error.kind}: {t.error.message}" if t.HasField("error") else "-")]
    cancel = button_form(f"/tasks/{t.id}/cancel", "Cancel", session, "danger") if t.state in _LIVE else ""
    return join([table(["", ""], facts, "facts"), cancel])


# -- managed replicas ------------------------------------------------------------------


def replicas_fragment(reply: admin_pb2.ListReplicasResponse) -> Raw:
    """Every managed replica (ListReplicas), a failed or restarting one's last log lines, and the
    scaling decisions. Log lines are a program's own output: escaped like every other value."""
    rows = [[r.service, r.id, r.node or "-",
             tag("span", r.state + (" (draining)" if r.draining else ""), class_=f"replica {r.state}"),
             "yes" if r.serving else "no", str(r.restarts), str(r.pid or "-"), r.url or "-", r.message or "-"]
            for r in reply.replicas]
    headers = ["Service", "Replica", "Node", "State", "Serving", "Restarts", "PID", "URL", "Message"]
    parts: list[object] = [table(headers, rows, "replicas") if rows else tag("p", "No managed replicas.")]
    for r in reply.replicas:
        if r.last_log:
            parts.append(tag("h2", f"Last lines of {r.id} ({r.service}, {r.state})"))
            parts.append(tag("pre", "\n".join(r.last_log), class_="log"))
    parts.append(tag("h2", "Scaling decisions"))
    parts.append(tag("ul", join(tag("li", d) for d in reply.decisions), class_="decisions")
                 if reply.decisions else tag("p", "None yet.", class_="hint"))
    return join(parts)


# -- config ----------------------------------------------------------------------------


def config_page(session: Session, yaml: str = "", dry: admin_pb2.ApplyConfigResponse | None = None,
                diffs: Sequence[tuple[str, Raw]] = (), propagation: Raw | None = None) -> Raw:
    parts: list[object] = []
    if propagation is not None:
        parts.append(tag("h2", "Propagation"))
        parts.append(propagation)
    if dry is not None:
        summary = (f"Dry run against version {dry.version}: added {', '.join(dry.added) or 'none'}; "
                   f"changed {', '.join(dry.changed) or 'none'}; removed {', '.join(dry.removed) or 'none'}.")
        parts.append(tag("p", summary, class_="notice", id="dry-run"))
        for name, body in diffs:
            parts.append(tag("h3", name))
            parts.append(body)
    if session.can_change:
        parts.append(Raw(
            f'<form method="post" action="/config" enctype="multipart/form-data" class="config">{csrf_field(session)}'
            f'<label>Config (YAML)<textarea name="yaml" rows="18" spellcheck="false">{esc(yaml)}</textarea></label>'
            '<label>or upload a file <input type="file" name="file" accept=".yaml,.yml,.json"></label>'
            '<div><button type="submit" name="action" value="dry-run">Dry run</button> '
            '<button type="submit" name="action" value="apply" class="danger">Apply</button></div></form>'))
    else:
        parts.append(tag("p", "Viewer sessions cannot change the configuration.", class_="hint"))
    return join(parts)
