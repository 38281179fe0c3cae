"""The operator console's HTTP server (aiohttp): login, pages, live fleet stream, actions.

Security (issue 17):
- Every page and API needs a session (401 without one; the login page and /static are the only
  open paths, and /static holds no data). A login exchanges the admin token (or a viewer token:
  read-only) for a random session id in an HttpOnly, SameSite=Strict cookie (sessions.py).
- Every POST but the login must carry the session's CSRF token (form field `csrf` or header
  X-CSRF-Token): 403 without it. Viewer sessions get 403 on every POST but logout. A POST whose
  Origin (or Referer) names another origin is refused (403) before anything else, the login too.
- Every response carries a strict Content-Security-Policy (no inline script or style, nothing
  from another origin), nosniff, frame-ancestors 'none', no-store, and Referrer-Policy
  same-origin (with no-referrer a browser sends `Origin: null` even on same-origin POSTs, which
  the origin check must refuse).
- Bounded: connections (`max_connections`, server.py), request bodies (`max_body_bytes`, 413 past it;
  `body_timeout_s`, 408), sessions, failed logins, and live
  streams (`max_streams` at once, 503 past it). Nothing secret reaches a page: the services
  never return secrets' values or key digests, a new key's secret is rendered once into the
  answer to the request that issued it, and audit JSON is redacted again before rendering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from google.protobuf import json_format
from multidict import MultiDictProxy

from switchgear.controlplane import convert
from switchgear.controlplane.agent_check import agent_problems
from switchgear.controlplane.config import ConfigError, load_config
from switchgear.controlplane.console import pages
from switchgear.controlplane.console.backend import Backend, History
from switchgear.controlplane.console.server import ConsoleRunner
from switchgear.controlplane.console.sessions import LoginGuard, Session, Sessions, csrf_matches, role_of

log = logging.getLogger("switchgear.controlplane.console")

STATIC = Path(__file__).parent / "static"
COOKIE = "switchgear_console"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY", "Cache-Control": "no-store",
}
OPEN_PATHS = ("/login", "/static/")
STREAM_TICK_S = 0.5  # the fleet stream looks for changes this often (the issue asks for <= 1 s)

SESSION = web.RequestKey("session", Session)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ConsoleOptions:
    """`--console-*` flags. `listen` "" = no console."""

    listen: str = ""
    viewer_token_file: str | None = None
    session_ttl_s: float = 3600.0
    max_sessions: int = 64
    max_streams: int = 8
    max_body_bytes: int = 1 << 20
    history_interval_s: float = 2.0  # 450 points per target over the charts' 15 min
    allow_remote: bool = False  # plain HTTP on a non-loopback address (the token would cross the network)
    idle_timeout_s: float = 15.0  # an idle keep-alive connection is closed after this
    body_timeout_s: float = 10.0  # a request body not whole by then answers 408
    max_connections: int = 256  # open at once; a connection past it is closed as it is accepted


class Console:
    """One console bound to one control plane's gRPC address. `start` binds, `close` stops."""

    def __init__(self, options: ConsoleOptions, backend: Backend, tokens: dict[str, str]) -> None:
        self.options = options
        self.backend = backend
        self._tokens = tokens  # role -> token
        self.sessions = Sessions(max_sessions=options.max_sessions, ttl_s=options.session_ttl_s)
        self._guard = LoginGuard()
        self.history = History(interval_s=options.history_interval_s)
        self.streams = 0
        self._runner: web.AppRunner | None = None
        self._stop = asyncio.Event()
        self._sampler: asyncio.Future[None] | None = None
        self._fleet_cache: dict[str, tuple[float, pages.Raw]] = {}  # target version -> (when, fragment)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.options.max_body_bytes,
                              middlewares=[self._errors, self._authenticate])
        app.on_response_prepare.append(_security_headers)
        app.router.add_get("/login", self.login_form)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/", self.root)
        app.router.add_get("/fleet", self.fleet)
        app.router.add_get("/api/fleet", self.api_fleet)
        app.router.add_get("/api/stream/fleet", self.stream_fleet)
        app.router.add_get("/routes", self.routes)
        app.router.add_get("/api/routes", self.api_routes)
        app.router.add_get("/alerts", self.alerts)
        app.router.add_get("/tenants", self.tenants)
        app.router.add_post("/tenants/keys", self.issue_key)
        app.router.add_post("/tenants/keys/{id}/revoke", self.revoke_key)
        app.router.add_get("/tasks", self.tasks)
        app.router.add_get("/tasks/{id}", self.task)
        app.router.add_post("/tasks/{id}/cancel", self.cancel_task)
        app.router.add_get("/replicas", self.replicas)
        app.router.add_get("/api/replicas", self.api_replicas)
        app.router.add_get("/config", self.config)
        app.router.add_post("/config", self.config_post)
        app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
        return app

    async def start(self) -> str:
        """Bind and serve; returns "host:port" actually listened on."""
        host, _, port = self.options.listen.rpartition(":")
        self._runner = ConsoleRunner(self.app(), max_connections=self.options.max_connections,
                                     headers=SECURITY_HEADERS, access_log=None, shutdown_timeout=1.0,
                                     keepalive_timeout=self.options.idle_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]") or "127.0.0.1", int(port))
        await site.start()
        bound = self._runner.addresses[0][1]  # the port chosen when 0 was asked for
        self._sampler = asyncio.ensure_future(self.history.run(self.backend, self._stop))
        return f"{host}:{bound}"

    async def close(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            await self._sampler
        if self._runner is not None:
            await self._runner.cleanup()
        await self.backend.close()

    # -- middleware ------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except grpc.aio.AioRpcError as exc:
            session = request.get(SESSION)
            page = request.path.strip("/").split("/")[0]
            status = 400 if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                           grpc.StatusCode.FAILED_PRECONDITION) else 502
            return _html(pages.layout("Error", page, "", session, error=f"{exc.code().name}: {exc.details()}"),
                         status)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD") and not _same_origin(request):
            return _html(pages.layout("Forbidden", "", "", None, error="cross-origin request refused"), 403)
        if request.path.startswith(OPEN_PATHS):
            return await handler(request)
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            if request.path.startswith("/api/"):
                return web.json_response({"error": "log in first"}, status=401)
            return _html(pages.login_page(), 401)
        if request.method not in ("GET", "HEAD"):
            presented = request.headers.get("X-CSRF-Token")
            if presented is None and request.content_type in ("application/x-www-form-urlencoded",
                                                              "multipart/form-data"):
                presented = _str((await self._form(request)).get("csrf"))
            if not csrf_matches(session, presented):
                return _html(pages.layout("Forbidden", "", "", session, error="missing or wrong CSRF token"), 403)
            if not session.can_change and request.path != "/logout":
                return _html(pages.layout("Forbidden", "", "", session, error="viewer sessions are read-only"), 403)
        request[SESSION] = session
        return await handler(request)

    async def _form(self, request: web.Request) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
        """The request's form, read within body_timeout_s (408 after: a slow body holds nothing long)."""
        try:
            return await asyncio.wait_for(request.post(), self.options.body_timeout_s)
        except TimeoutError:
            raise web.HTTPRequestTimeout(text="request body too slow") from None

    # -- login -----------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        return _html(pages.login_page())

    async def login(self, request: web.Request) -> web.StreamResponse:
        remote = request.remote or ""
        if not self._guard.allowed(remote):
            return _html(pages.login_page("too many failed logins; try again in a minute"), 429)
        role = role_of(_str((await self._form(request)).get("token")) or "", self._tokens)
        if role is None:
            self._guard.failed(remote)
            log.warning("console: failed login from %s", request.remote)
            return _html(pages.login_page("that token opens nothing here"), 401)
        session = self.sessions.create(role)
        log.info("console: %s session opened from %s", role, request.remote)
        response = web.HTTPSeeOther("/fleet")
        response.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict", path="/",
                            max_age=int(self.options.session_ttl_s), secure=request.secure)
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.drop(_session(request).id)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        raise response

    # -- fleet -----------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/fleet")

    async def _fleet_fragment(self, target: str = "") -> pages.Raw:
        """At most one round of calls per target per tick, however many pages stream it."""
        now = asyncio.get_running_loop().time()
        cached = self._fleet_cache.get(target)
        if cached is not None and now - cached[0] < STREAM_TICK_S * 0.8:
            return cached[1]
        fragment = await self._fresh_fleet_fragment(target)
        if len(self._fleet_cache) >= 64:  # targets come from query strings: bounded
            self._fleet_cache.clear()
        self._fleet_cache[target] = (now, fragment)
        return fragment

    async def _fresh_fleet_fragment(self, target: str) -> pages.Raw:
        agents = await self.backend.agents()
        try:  # the leader's figures: missing for a moment while replicas elect one
            loads = {a.node_id: a for a in (await self.backend.stats()).agents}
            tasks = {a.agent: a.usage.tasks for a in (await self.backend.task_stats()).agents}
        except grpc.aio.AioRpcError:
            loads, tasks = {}, {}
        try:
            latest = next(iter((await self.backend.audit(limit=1)).entries), None)
        except grpc.aio.AioRpcError:
            latest = None
        return pages.fleet_fragment(agents, target, loads, tasks, latest)

    async def fleet(self, request: web.Request) -> web.StreamResponse:
        body = pages.fleet_page(await self._fleet_fragment())
        return _html(pages.layout("Fleet", "fleet", body, _session(request)))

    async def api_fleet(self, request: web.Request) -> web.StreamResponse:
        reply = await self.backend.agents()
        return web.json_response({
            "current_version": reply.current_version,
            "agents": [{"node": a.node.id, "zone": a.node.zone, "replica": a.replica, "connected": a.connected,
                        "state": pages.agent_state(a, reply.current_version), "acked_version": a.acked_version,
                        "nacked_version": a.nacked_version, "pending_version": a.pending_version,
                        "rejected_services": [r.service for r in a.rejected_services],
                        "snapshot_delivery": a.snapshot_delivery} for a in reply.agents],
        })

    async def stream_fleet(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the fleet fragment whenever it changes (looked at every 0.5 s)."""
        if self.streams >= self.options.max_streams:
            return web.json_response({"error": "too many live streams; try again later"}, status=503)
        self.streams += 1
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await self._stream(request, response, request.query.get("version", ""))
            return response
        finally:
            self.streams -= 1

    async def _stream(self, request: web.Request, response: web.StreamResponse, target: str) -> None:
        session_id = _session(request).id
        last = ""
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while not self._stop.is_set() and self.sessions.get(session_id) is not None:
                try:
                    fragment = str(await self._fleet_fragment(target))
                except grpc.aio.AioRpcError as exc:
                    fragment = str(pages.tag("p", f"control plane unreachable: {exc.code().name}", class_="error"))
                if fragment != last:
                    data = "".join(f"data: {line}\n" for line in fragment.splitlines() or [""])
                    await response.write(f"event: fragment\n{data}\n".encode())
                    last = fragment
                else:
                    await response.write(b": idle\n\n")  # finds a closed connection within a tick
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=STREAM_TICK_S)

    # -- routes, alerts --------------------------------------------------------------

    async def _routes_fragment(self) -> pages.Raw:
        stats = await self.backend.stats()
        history = {(s.service, s.endpoint): self.history.series(s.service, s.endpoint) for s in stats.stats}
        return pages.routes_fragment(stats, history)

    async def routes(self, request: web.Request) -> web.StreamResponse:
        body = pages.Raw(f'<div id="routes" data-poll="/api/routes" data-interval="1000">'
                         f'{await self._routes_fragment()}</div>')
        return _html(pages.layout("Routes", "routes", body, _session(request)))

    async def api_routes(self, request: web.Request) -> web.StreamResponse:
        return _html(str(await self._routes_fragment()))

    async def alerts(self, request: web.Request) -> web.StreamResponse:
        body = pages.alerts_page(await self.backend.alerts(), await self.backend.audit())
        return _html(pages.layout("Alerts", "alerts", body, _session(request)))

    # -- tenants ---------------------------------------------------------------------

    async def _tenants(self, request: web.Request, new_key: str = "", notice: str = "") -> web.StreamResponse:
        b = self.backend
        body = pages.tenants_page(await b.tenants(), await b.usage(), await b.keys(), _session(request), new_key)
        return _html(pages.layout("Tenants", "tenants", body, _session(request), notice=notice))

    async def tenants(self, request: web.Request) -> web.StreamResponse:
        return await self._tenants(request, notice=request.query.get("notice", "")[:200])

    async def issue_key(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        tenant, description = _str(form.get("tenant")) or "", (_str(form.get("description")) or "")[:200]
        reply = await self.backend.issue_key(tenant, description)
        # The secret goes into this answer only; the next page load shows the key's id.
        return await self._tenants(request, new_key=reply.secret, notice=f"key {reply.key.id} issued")

    async def revoke_key(self, request: web.Request) -> web.StreamResponse:
        reply = await self.backend.revoke_key(request.match_info["id"])
        raise web.HTTPSeeOther(f"/tenants?notice=key+{reply.key.id}+revoked+in+version+{reply.version}")

    # -- tasks -----------------------------------------------------------------------

    async def tasks(self, request: web.Request) -> web.StreamResponse:
        body = pages.tasks_page(await self.backend.task_list(), await self.backend.task_stats(), _session(request))
        notice = request.query.get("notice", "")[:200]
        return _html(pages.layout("Tasks", "tasks", body, _session(request), notice=notice))

    async def task(self, request: web.Request) -> web.StreamResponse:
        reply = await self.backend.task(request.match_info["id"])
        body = pages.task_page(reply.task, _session(request))
        return _html(pages.layout(f"Task {reply.task.id}", "tasks", body, _session(request)))

    async def cancel_task(self, request: web.Request) -> web.StreamResponse:
        reply = await self.backend.cancel_task(request.match_info["id"])
        raise web.HTTPSeeOther(f"/tasks?notice=task+{reply.task.id}+is+{pages.task_state(reply.task.state)}")

    # -- managed replicas ------------------------------------------------------------

    async def replicas(self, request: web.Request) -> web.StreamResponse:
        body = pages.Raw(f'<div id="replicas" data-poll="/api/replicas" data-interval="2000">'
                         f'{pages.replicas_fragment(await self.backend.replicas())}</div>')
        return _html(pages.layout("Replicas", "replicas", body, _session(request)))

    async def api_replicas(self, request: web.Request) -> web.StreamResponse:
        return _html(str(pages.replicas_fragment(await self.backend.replicas())))

    # -- config ----------------------------------------------------------------------

    async def config(self, request: web.Request) -> web.StreamResponse:
        version = request.query.get("version", "")[:64]
        propagation = pages.fleet_page(await self._fleet_fragment(version), version) if version else None
        body = pages.config_page(_session(request), propagation=propagation)
        notice = f"applied: serving version {version}" if version else ""
        return _html(pages.layout("Config", "config", body, _session(request), notice=notice))

    async def config_post(self, request: web.Request) -> web.StreamResponse:
        session = _session(request)
        form = await self._form(request)
        upload = form.get("file")
        yaml = _str(form.get("yaml")) or ""
        if isinstance(upload, web.FileField) and upload.filename:
            try:
                yaml = upload.file.read().decode("utf-8")
            except UnicodeDecodeError:
                return _html(pages.layout("Config", "config", pages.config_page(session), session,
                                          error="file: not UTF-8 text"), 400)
        if not yaml.strip():
            return _html(pages.layout("Config", "config", pages.config_page(session), session,
                                      error="yaml: paste a config or choose a file"), 400)
        try:
            if form.get("action") == "apply":
                applied = await self.backend.apply(yaml, dry_run=False)
                raise web.HTTPSeeOther(f"/config?version={applied.version}")
            dry = await self.backend.apply(yaml, dry_run=True)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            body = pages.config_page(session, yaml)
            return _html(pages.layout("Config", "config", body, session, error=exc.details() or "invalid"), 400)
        diffs = [(name, pages.json_diff(await self._running(name), self._proposed(yaml, name))) for name in dry.changed]
        return _html(pages.layout("Config", "config", pages.config_page(session, yaml, dry, diffs), session))

    async def _running(self, name: str) -> str:
        reply = await self.backend.service(name)
        return json.dumps(json_format.MessageToDict(reply.service))

    def _proposed(self, yaml: str, name: str) -> str:
        """The service as the proposed config defines it, in the same JSON shape as the running one."""
        try:
            state = load_config(yaml, source="<console>", env=os.environ, check=agent_problems)
        except ConfigError:
            return ""  # the dry run accepted it, so this is only reached if the environment changed meanwhile
        spec = state.service(name)
        return json.dumps(json_format.MessageToDict(convert.service_to_proto(spec))) if spec else ""


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _same_origin(request: web.Request) -> bool:
    """False when the browser says the request comes from another origin (Origin, else Referer
    is checked when sent; a client that sends neither is not a browser on another site)."""
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin:
        return True
    expected = f"{request.scheme}://{request.host}"
    return origin == expected or origin.startswith(expected + "/")


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _session(request: web.Request) -> Session:
    return request[SESSION]


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
