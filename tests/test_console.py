"""The operator console's security and pages over real HTTP, on a real control plane in-process:
401 without a session (every page and API, forged cookies too), 403 without the CSRF token and
for viewer sessions, bounded bodies (413), bounded live streams (503), throttled logins (429),
strict headers on every answer, and no secret in any page. The session table's rules are
checked with a fake clock. (The pages in a real browser: test_console_browser.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import re
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from switchgear import cli_output
from switchgear.controlplane import registry
from switchgear.controlplane.collector import Collector, LoadDelta
from switchgear.controlplane.console import ConsoleOptions
from switchgear.controlplane.console.app import COOKIE, CSP
from switchgear.controlplane.console.backend import Backend
from switchgear.controlplane.console.sessions import LoginGuard, Sessions, csrf_matches, role_of
from switchgear.controlplane.server import ControlPlane, Options, StartupError, build_control_plane
from switchgear.v1 import admin_pb2, governance_pb2

GET_PATHS = ["/", "/fleet", "/routes", "/alerts", "/tenants", "/tasks", "/tasks/t-1", "/config", "/api/fleet",
             "/api/routes", "/api/stream/fleet"]
POST_PATHS = ["/logout", "/tenants/keys", "/tenants/keys/k/revoke", "/tasks/t-1/cancel", "/config"]

CONFIG = """\
external_services:
  services:
    llm_services:
      local_models:
        - name: chat
          model: m
          endpoint: http://127.0.0.1:9/v1
"""


@dataclass
class Plane:
    url: str
    admin_token: str
    viewer_token: str
    http: httpx.AsyncClient
    backend: Backend

    async def login(self, token: str | None = None) -> tuple[str, str]:
        """(session id, CSRF token) of a new session."""
        reply = await self.http.post("/login", data={"token": token or self.admin_token})
        assert reply.status_code == 303, reply.text
        sid = reply.cookies[COOKIE]
        page = await self.get("/fleet", sid)
        match = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert match
        return sid, match.group(1)

    async def get(self, path: str, sid: str = "") -> httpx.Response:
        return await self.http.get(path, headers={"Cookie": f"{COOKIE}={sid}"} if sid else {})

    async def post(self, path: str, sid: str = "", headers: dict[str, str] | None = None,
                   **kwargs: object) -> httpx.Response:
        headers = {**(headers or {}), **({"Cookie": f"{COOKIE}={sid}"} if sid else {})}
        return await self.http.post(path, headers=headers, **kwargs)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def console_plane(tmp_path: Path, config: str, console: ConsoleOptions
                        ) -> AsyncIterator[tuple[Plane, ControlPlane]]:
    """A control plane in-process serving `config`, its console bound as `console` says."""
    (tmp_path / "c.yaml").write_text(config, encoding="utf-8")
    options = Options(db_path=str(tmp_path / "r.db"), listen="127.0.0.1:0", config_path=str(tmp_path / "c.yaml"),
                      active_probes=False, console=console)
    stop, address = asyncio.Event(), asyncio.get_running_loop().create_future()
    cp = build_control_plane(options)
    task = asyncio.ensure_future(cp.run(stop, on_console=address.set_result))
    url = f"http://{await asyncio.wait_for(address, 10)}"
    async with httpx.AsyncClient(base_url=url, follow_redirects=False, trust_env=False, timeout=10) as http:
        assert cp.console is not None
        yield Plane(url, (tmp_path / "r.db.admin-token").read_text().strip(),
                    (tmp_path / "viewer-token").read_text().strip(), http, cp.console.backend), cp
    stop.set()
    await asyncio.wait_for(task, 10)


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    console = ConsoleOptions(listen="127.0.0.1:0", viewer_token_file=str(tmp_path / "viewer-token"), max_streams=2,
                             max_body_bytes=64 * 1024, body_timeout_s=0.5, max_connections=8)
    async with console_plane(tmp_path, CONFIG, console) as (running, cp):
        assert cp.console is not None
        tenant = governance_pb2.Tenant(id="acme", display_name="Acme")
        await cp.console.backend.governance.CreateTenant(governance_pb2.CreateTenantRequest(tenant=tenant),
                                                         metadata=cp.console.backend.md)
        yield running


async def test_without_a_session_every_page_and_api_answers_401(plane: Plane) -> None:
    for sid in ("", "forged-" + "x" * 40):
        for path in GET_PATHS:
            reply = await plane.get(path, sid)
            assert reply.status_code == 401, (path, sid)
            assert reply.headers["content-security-policy"] == CSP
        for path in POST_PATHS:
            assert (await plane.post(path, sid, data={"csrf": "x"})).status_code == 401, path
    assert (await plane.get("/static/console.js")).status_code == 200  # the open assets hold no data


async def test_login_gives_an_httponly_strict_cookie_and_pages_carry_strict_headers(plane: Plane) -> None:
    reply = await plane.http.post("/login", data={"token": plane.admin_token})
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    sid, _ = await plane.login()
    for path in GET_PATHS[1:-1]:
        if path == "/tasks/t-1":
            continue
        page = await plane.get(path, sid)
        assert page.status_code == 200, (path, page.text[:300])
        assert page.headers["content-security-policy"] == CSP and page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store" and page.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in page.text and " style=" not in page.text and "javascript:" not in page.text
    assert (await plane.get("/tasks/t-1", sid)).status_code == 400  # NOT_FOUND from TasksService, named
    wrong = await plane.http.post("/login", data={"token": plane.admin_token + "x"})
    assert wrong.status_code == 401 and COOKIE not in wrong.cookies


async def test_a_change_without_the_csrf_token_is_403_and_changes_nothing(plane: Plane) -> None:
    sid, csrf = await plane.login()
    for data in ({"tenant": "acme"}, {"tenant": "acme", "csrf": "wrong"}, {"tenant": "acme", "csrf": ""}):
        assert (await plane.post("/tenants/keys", sid, data=data)).status_code == 403
    other_sid, other_csrf = await plane.login()
    assert (await plane.post("/tenants/keys", sid, data={"tenant": "acme", "csrf": other_csrf})).status_code == 403
    assert "<tbody></tbody>" in (await plane.get("/tenants", sid)).text.split("<h2>Keys</h2>")[1]
    assert (await plane.post("/tenants/keys", other_sid, data={"tenant": "acme", "csrf": csrf})).status_code == 403

    issued = await plane.post("/tenants/keys", sid, data={"tenant": "acme", "description": "ci", "csrf": csrf})
    assert issued.status_code == 200
    secret = re.search(r'<code id="new-key">([^<]+)</code>', issued.text)
    assert secret, issued.text[:500]
    # Shown once: no later page holds the secret or its digest.
    digest = hashlib.sha256(secret.group(1).encode()).hexdigest()
    for path in ("/tenants", "/alerts", "/fleet", "/config", "/routes"):
        text = (await plane.get(path, sid)).text
        assert secret.group(1) not in text and digest not in text, path
    assert "issue_key" in (await plane.get("/alerts", sid)).text  # the audit trail names the change

    evil = {"Origin": "http://evil.example"}
    assert (await plane.post("/tenants/keys", sid, headers=evil, data={"tenant": "acme", "csrf": csrf})
            ).status_code == 403
    assert (await plane.http.post("/login", headers=evil, data={"token": plane.admin_token})).status_code == 403
    assert (await plane.http.post("/login", headers={"Origin": "null"}, data={"token": plane.admin_token})
            ).status_code == 403
    same = {"Origin": plane.url}
    assert (await plane.post("/tasks/t-1/cancel", sid, headers=same, data={"csrf": csrf})).status_code == 400

    logout = await plane.post("/logout", sid, headers={"X-CSRF-Token": csrf})
    assert logout.status_code == 303
    assert (await plane.get("/fleet", sid)).status_code == 401


async def test_viewer_sessions_read_but_cannot_change(plane: Plane) -> None:
    sid, csrf = await plane.login(plane.viewer_token)
    page = await plane.get("/tenants", sid)
    assert page.status_code == 200 and 'action="/tenants/keys"' not in page.text
    refused = await plane.post("/tenants/keys", sid, data={"tenant": "acme", "csrf": csrf})
    assert refused.status_code == 403 and "read-only" in refused.text
    assert (await plane.post("/config", sid, data={"yaml": CONFIG, "action": "apply", "csrf": csrf})).status_code == 403


async def test_config_dry_run_apply_and_refusals(plane: Plane) -> None:
    sid, csrf = await plane.login()
    changed = CONFIG.replace("model: m", "model: m2")
    dry = await plane.post("/config", sid, data={"yaml": changed, "action": "dry-run", "csrf": csrf})
    assert dry.status_code == 200 and "changed chat" in dry.text
    assert 'class="del">- &quot;model&quot;: &quot;m&quot;' in dry.text
    bad = await plane.post("/config", sid, data={"yaml": "external_services: [1", "action": "apply", "csrf": csrf})
    assert bad.status_code == 400 and 'class="error"' in bad.text
    big = "#" * (65 * 1024)
    assert (await plane.post("/config", sid, data={"yaml": big, "csrf": csrf})).status_code == 413
    upload = await plane.post("/config", sid, data={"action": "apply", "csrf": csrf},
                              files={"file": ("c.yaml", changed.encode(), "application/yaml")})
    assert upload.status_code == 303 and upload.headers["location"].startswith("/config?version=")
    after = await plane.post("/config", sid, data={"yaml": changed, "action": "dry-run", "csrf": csrf})
    assert "changed none" in after.text


async def _refused(call: Awaitable[object]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return refused.value.details() or ""


async def test_a_refused_change_shows_on_the_fleet_stream_within_a_second_or_two(plane: Plane) -> None:
    sid, _ = await plane.login()
    md = plane.backend.md
    service = (await plane.backend.service("chat")).service
    service.options_json = '{"chat_pth": "/chat/completions"}'  # the demo's step 7: agents would NACK it
    async with plane.http.stream("GET", "/api/stream/fleet", headers={"Cookie": f"{COOKIE}={sid}"}) as stream:
        lines = stream.aiter_lines()
        assert await lines.__anext__() == "event: fragment"
        message = await _refused(plane.backend.admin.RegisterService(
            admin_pb2.RegisterServiceRequest(service=service), metadata=md))
        assert "service.options_json" in message and "chat_pth" in message
        started = asyncio.get_running_loop().time()

        async def refusal_shown() -> str:
            async for line in lines:
                if "refused: " in line:
                    return line
            raise AssertionError("stream ended")

        line = await asyncio.wait_for(refusal_shown(), 2.0)
    assert asyncio.get_running_loop().time() - started < 2.0
    assert 'id="latest-change"' in line and "register_service chat" in line
    assert f"refused: {html.escape(message, quote=True)}" in line
    assert "by admin@" in line
    alerts = (await plane.get("/alerts", sid)).text
    assert '<span class="refused">refused</span>' in alerts and html.escape(message, quote=True) in alerts
    entry = (await plane.backend.audit(limit=1)).entries[0]
    assert (entry.action, entry.target, entry.detail, entry.before_json) == (
        "refused", "register_service chat", message, "")


async def test_refused_configs_and_governance_changes_are_audited_bounded_and_without_secrets(
        plane: Plane, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "tok-s3cr3t-0123456789"
    monkeypatch.setenv("SG_TEST_REFUSAL_SECRET", secret)  # the control plane interpolates its own environment
    monkeypatch.setattr(registry, "MAX_REFUSED_ROWS", 4)
    version = (await plane.backend.agents()).current_version
    twice = CONFIG.replace("name: chat", "name: ${SG_TEST_REFUSAL_SECRET}") + CONFIG.split("local_models:\n")[1] \
        .replace("name: chat", "name: ${SG_TEST_REFUSAL_SECRET}")
    for _ in range(6):  # a flood of refused applies: the audit trail keeps the newest 4 refusals
        message = await _refused(plane.backend.apply(twice, dry_run=False))
        assert secret in message  # the caller sees its own mistake; the store does not keep the value
    await _refused(plane.backend.apply(twice, dry_run=True))  # a dry run changes nothing: no row
    await _refused(plane.backend.governance.SetPolicy(governance_pb2.SetPolicyRequest(
        tenant="acme", policy=governance_pb2.TenantPolicy(min_success_rate=2.0)), metadata=plane.backend.md))
    entries = (await plane.backend.audit(limit=100)).entries
    refused = [e for e in entries if e.action == "refused"]
    assert len(refused) == 4 and refused[0].target == "set_policy acme" and "min_success_rate" in refused[0].detail
    assert {e.target for e in refused[1:]} == {"apply_config <console>"}
    assert all("duplicate service name '[redacted]'" in e.detail for e in refused[1:])
    assert all(e.version == version for e in refused)  # nothing committed
    assert "create_tenant" in [e.action for e in entries]  # committed changes' rows stay
    assert not any(secret in str(e) for e in entries)
    rows = cli_output.audit_rows(governance_pb2.ListAuditResponse(entries=entries))  # `switchgear audit`
    assert rows[1][3:] == ("refused", "set_policy acme", "-", refused[0].detail)


def test_a_refusal_row_is_bounded_and_redacts_the_secrets_it_is_given() -> None:
    change = registry.refusal("admin@x", "apply_config", "c.yaml", "a: 'abcdefgh12' " + "x" * 5000,
                              secrets=("abcdefgh12", "short", ""))
    assert change.action == "refused" and change.target == "apply_config c.yaml"
    assert change.detail.startswith("a: '[redacted]' ") and len(change.detail) == registry.MAX_REFUSAL_DETAIL
    assert registry.refusal("a", "op", "s", "b: 'short'", secrets=("short",)).detail == "b: 'short'"


async def test_live_streams_are_bounded(plane: Plane) -> None:
    sid, _ = await plane.login()
    headers = {"Cookie": f"{COOKIE}={sid}"}
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            stream = await stack.enter_async_context(plane.http.stream("GET", "/api/stream/fleet", headers=headers))
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
            first = await stream.aiter_lines().__anext__()
            assert first == "event: fragment"
        assert (await plane.get("/api/stream/fleet", sid)).status_code == 503
    deadline = asyncio.get_running_loop().time() + 5
    while (await plane.http.get("/api/fleet", headers=headers)).status_code == 200:
        async with plane.http.stream("GET", "/api/stream/fleet", headers=headers) as again:
            if again.status_code == 200:
                break  # closed streams gave their slots back
        assert asyncio.get_running_loop().time() < deadline, "slots were not freed"
        await asyncio.sleep(0.1)


async def test_a_slow_body_gets_408(plane: Plane) -> None:
    host, port = plane.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                 b"Content-Length: 100\r\n\r\ntoken=")  # and never the rest
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    assert status.startswith(b"HTTP/1.1 408"), status
    writer.close()


async def test_connections_past_the_cap_are_closed_on_arrival(plane: Plane) -> None:
    host, port = plane.url.removeprefix("http://").rsplit(":", 1)
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(9):  # idle sockets; the fixture allows 8 connections (its client may hold one)
            reader, writer = await asyncio.open_connection(host, int(port))
            held.append(writer)
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                    break  # closed by the server as it arrived
        else:
            raise AssertionError("no connection was refused past the cap")
    finally:
        for writer in held:
            writer.close()
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # slots come back once the sockets close
        with contextlib.suppress(httpx.TransportError):
            if (await plane.http.get("/login")).status_code == 200:
                break
        assert asyncio.get_running_loop().time() < deadline, "slots were not given back"
        await asyncio.sleep(0.05)


async def test_unparseable_requests_are_refused_without_echoing_or_logging_their_bytes(
        plane: Plane, caplog: pytest.LogCaptureFixture) -> None:
    host, port = plane.url.removeprefix("http://").rsplit(":", 1)
    for raw in (b"GET /fleet HTTP/1.1\r\nHost: x\r\nCookie: switchgear_console=SECRET\x00SESSION\r\n\r\n",
                b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
                b"Cookie: switchgear_console=SECRETSESSION\r\n\r\n"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 5)  # the connection is closed after the answer
        writer.close()
        assert answer.startswith(b"HTTP/1.0 400 Bad Request") and b"SECRET" not in answer, answer
        assert CSP.encode() in answer
    assert "SECRET" not in caplog.text and "Traceback" not in caplog.text
    assert "console refused a request" in caplog.text


async def test_failed_logins_are_throttled_per_address(plane: Plane) -> None:
    for _ in range(20):
        assert (await plane.http.post("/login", data={"token": "guess"})).status_code == 401
    assert (await plane.http.post("/login", data={"token": plane.admin_token})).status_code == 429


def test_the_console_needs_admin_auth(tmp_path: Path) -> None:
    options = Options(db_path=str(tmp_path / "r.db"), listen="127.0.0.1:0", admin_auth=False,
                      console=ConsoleOptions(listen="127.0.0.1:0"))
    with pytest.raises(StartupError, match="--console-listen needs admin authentication"):
        asyncio.run(_build(options))


def test_the_console_refuses_a_non_loopback_address_unless_told(tmp_path: Path) -> None:
    options = Options(db_path=str(tmp_path / "r.db"), listen="127.0.0.1:0",
                      console=ConsoleOptions(listen="0.0.0.0:0"))
    with pytest.raises(StartupError, match="not a loopback address"):
        asyncio.run(_build(options))


def test_console_settings_without_a_console_are_refused(tmp_path: Path) -> None:
    options = Options(db_path=str(tmp_path / "r.db"), listen="127.0.0.1:0",
                      console=ConsoleOptions(viewer_token_file=str(tmp_path / "viewer")))
    with pytest.raises(StartupError, match="without --console-listen"):
        asyncio.run(_build(options))


async def _build(options: Options) -> None:
    build_control_plane(options)


def test_sessions_expire_are_bounded_and_each_has_its_own_csrf() -> None:
    now = [0.0]
    table = Sessions(max_sessions=2, ttl_s=10, clock=lambda: now[0])
    a, b = table.create("admin"), table.create("viewer")
    assert a.csrf != b.csrf and csrf_matches(a, a.csrf) and not csrf_matches(a, b.csrf) and not csrf_matches(a, None)
    c = table.create("admin")  # evicts the oldest
    assert table.get(a.id) is None and table.get(b.id) == b and len(table) == 2
    now[0] = 10.0
    assert table.get(c.id) is None and table.get(None) is None and table.get("") is None
    assert not b.can_change and c.can_change


def test_agent_loads_sum_each_agents_in_flight_and_drop_silent_agents() -> None:
    c = Collector(gauge_ttl_s=30.0)
    c.record("a1", [LoadDelta(service="s", endpoint="e1", category="llm", issued=1, in_flight=2),
                    LoadDelta(service="s", endpoint="e2", category="llm", issued=1, in_flight=3, queue_length=1)],
             now=100.0)
    c.record("a2", [], now=90.0)
    assert c.agent_loads(110.0) == {"a1": (5, 1, 100.0), "a2": (0, 0, 90.0)}
    assert c.agent_loads(125.0) == {"a1": (5, 1, 100.0)}  # a2 has been silent past the gauge TTL


def test_login_guard_and_roles() -> None:
    now = [0.0]
    guard = LoginGuard(max_failures=2, window_s=60, max_addresses=2, clock=lambda: now[0])
    guard.failed("a")
    guard.failed("a")
    assert not guard.allowed("a") and guard.allowed("b")
    guard.failed("b")
    guard.failed("c")  # forgets "a", the oldest address
    assert guard.allowed("a")
    guard.failed("b")
    now[0] = 61.0
    assert guard.allowed("b")
    assert role_of("t1", {"admin": "t1", "viewer": "t2"}) == "admin"
    assert role_of("t2", {"admin": "t1", "viewer": "t2"}) == "viewer"
    assert role_of("t3", {"admin": "t1", "viewer": ""}) is None and role_of("", {"viewer": ""}) is None
