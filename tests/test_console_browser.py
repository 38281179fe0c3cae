"""The operator console in a real browser (Debian's Chromium, driven by playwright), against real
processes: OpenAI emulators, a control plane with the console on, a current agent and an
"older" agent that cannot take the `stream_usage` option (version skew, as in
test_no_poison_e2e.py).

One story, because starting processes is the slow part: log in; apply a config from the Config
page (dry run first) and watch it propagate to both agents live; apply one the older agent
cannot fully take and see its rejection with the reason on the Fleet page; issue a key and
revoke it; cancel a queued task; inject faults into one target and see it turn degraded on the
Routes page. A screenshot of every page is saved under pytest's temporary directory (never the
work tree). Skipped, with the reason, only when Chromium cannot be launched.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from switchgear.admin_client import admin_channel
from switchgear.supervise import Proc
from switchgear.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2_grpc,
    governance_pb2,
    governance_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)
from tests.test_end_to_end import chat
from tests.test_no_poison_e2e import OLD_AGENT

pytestmark = pytest.mark.timeout(120)

FAST = ["--report-interval", "0.2", "--health-window", "3", "--alert-window", "3", "--health-debounce", "0.3",
        "--health-blackout", "0", "--health-min-requests", "5", "--no-probes"]


def config(urls: dict[str, str], skewed: bool = False) -> str:
    text = (
        "external_services:\n  services:\n    llm_services:\n      local_models:\n"
        "        - name: chat\n          model: gpt-4o-mini\n          endpoints:\n"
        f"            - id: a\n              url: {urls['a']}\n"
        f"            - id: b\n              url: {urls['b']}\n"
    )
    if skewed:
        text += (f"        - name: skewed\n          model: gpt-4o-mini\n          endpoint: {urls['b']}\n"
                 "          options: {stream_usage: false}\n")
    return text


class Stack:
    """The processes, started and stopped by pid (Proc)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.db = workdir / "registry.db"
        self.procs: list[Proc] = []
        self.urls: dict[str, str] = {}
        self.gateways: dict[str, str] = {}
        self.cp_address = self.console = ""
        self.cp: Proc | None = None

    def start(self) -> None:
        emulators = Proc.switchgear("emulators", ["emulate", "openai", "--instance", "a:0", "--instance", "b:0"],
                                    self.workdir)
        self.procs.append(emulators)
        self.urls = {n: f"http://127.0.0.1:{p}/v1" for n, p in json.loads("{" + emulators.start(ready_prefix="{"))
                     .items()}
        self.start_control_plane("127.0.0.1:0", "127.0.0.1:0")
        script = self.workdir / "old_agent.py"
        script.write_text(OLD_AGENT, encoding="utf-8")
        for node, argv in {"agent-new": [sys.executable, "-m", "switchgear"],
                           "agent-old": [sys.executable, str(script)]}.items():
            proc = Proc(node, [*argv, "agent", "--auth", "none", "--control-plane", self.cp_address, "--listen",
                               "127.0.0.1:0", "--node-id", node, "--agent-token-file", f"{self.db}.agent-token"],
                        self.workdir)
            self.procs.append(proc)
            self.gateways[node] = proc.start()

    def start_control_plane(self, listen: str, console: str) -> None:
        self.cp = Proc.switchgear("controlplane", ["controlplane", "--db", str(self.db), "--listen", listen,
                                                   "--console-listen", console, *FAST], self.workdir)
        self.procs.append(self.cp)
        self.cp_address = self.cp.start()
        self.console = self.cp.wait_line("CONSOLE ", 10).removeprefix("CONSOLE ").strip()

    def kill_control_plane(self) -> None:
        assert self.cp is not None
        self.cp.kill()

    def restart_control_plane(self) -> None:
        """A new one on the same ports and store."""
        self.start_control_plane(self.cp_address, self.console.removeprefix("http://").rstrip("/"))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    @property
    def token(self) -> str:
        return Path(f"{self.db}.admin-token").read_text(encoding="utf-8").strip()

    def channel(self) -> grpc.Channel:
        return admin_channel(self.cp_address, self.token)

    def faults(self, name: str, faults: dict[str, object]) -> None:
        request = urllib.request.Request(f"{self.urls[name].removesuffix('/v1')}/_emulator/faults",
                                         data=json.dumps(faults).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert reply.status == 200


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("Chromium is not installed (`make test` installs Debian's chromium package)")
    with sync_api.sync_playwright() as p:
        try:
            launched = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Exception as exc:  # playwright's own Error: the browser could not start here
            pytest.skip(f"Chromium ({executable}) cannot be launched: {exc}")
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("console"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


def test_an_operator_watches_changes_nacks_keys_tasks_and_health_in_the_console(
        browser: Any, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> None:
    shots = tmp_path_factory.mktemp("console-screenshots")
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []  # script errors and CSP violations
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Failed to load" not in m.text
            else None)
    failed: list[str] = []  # answers >= 400 (only the first, before logging in, is expected)
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.set_default_timeout(15_000)

    def shot(name: str) -> None:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

    # Without a session: the login page, answered 401.
    reply = page.goto(stack.console + "fleet")
    assert reply is not None and reply.status == 401
    page.fill("input[name=token]", stack.token)
    page.click("button[type=submit]")
    page.wait_for_url("**/fleet")
    page.locator("table.fleet td", has_text="agent-new").wait_for()
    page.locator("table.fleet td", has_text="agent-old").wait_for()
    shot("login-fleet")

    # A change from the Config page: dry run, apply, and its propagation to both agents, live.
    page.goto(stack.console + "config")
    page.fill("textarea[name=yaml]", config(stack.urls))
    page.click("button[value=dry-run]")
    assert "added chat" in page.locator("#dry-run").inner_text()
    page.click("button[value=apply]")
    page.wait_for_url("**/config?version=*")
    version = page.url.rsplit("=", 1)[1]
    page.locator("#propagation", has_text="2 ACK").wait_for()  # pushed by the server as agents ACK
    assert version in page.locator("#propagation").inner_text()
    shot("config")

    # A change the older agent cannot fully take: its rejection and the reason, on the Fleet page.
    page.fill("textarea[name=yaml]", config(stack.urls, skewed=True))
    page.click("button[value=apply]")
    page.wait_for_url("**/config?version=*")
    page.goto(stack.console + "fleet")
    old = page.locator("table.fleet tr", has_text="agent-old")
    old.locator("td", has_text="did not apply service 'skewed'").wait_for()
    assert "services[skewed].options_json.stream_usage: unknown option" in old.inner_text()
    new = page.locator("table.fleet tr", has_text="agent-new")
    assert "did not apply" not in new.inner_text()
    assert re.fullmatch(r"\d+", new.locator("td").nth(8).inner_text())  # in flight, from its load reports

    # A change agents would NACK is refused before it is committed: the Fleet page shows it live.
    model = "model: gpt-4o-mini\n"
    misspelt = config(stack.urls).replace(model, model + "          options: {chat_pth: /x}\n", 1)
    with pytest.raises(grpc.RpcError) as refused:
        admin_pb2_grpc.AdminServiceStub(stack.channel()).ApplyConfig(
            admin_pb2.ApplyConfigRequest(yaml=misspelt, source="browser-test"), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    latest = page.locator("#latest-change", has_text="refused:")
    latest.wait_for(timeout=2_000)  # pushed by the server within a tick or two
    assert "apply_config browser-test" in latest.inner_text() and "chat_pth" in latest.inner_text()
    shot("fleet")

    # Keys: issue (shown once), then revoke.
    governance_pb2_grpc.GovernanceServiceStub(stack.channel()).CreateTenant(governance_pb2.CreateTenantRequest(
        tenant=governance_pb2.Tenant(id="acme", display_name="Acme")), timeout=5)
    page.goto(stack.console + "tenants")
    page.fill("input[name=description]", "browser test")
    page.click("form.issue button")
    secret = page.locator("#new-key").inner_text()
    assert secret
    key_row = page.locator("table.keys tr", has_text="browser test")
    key_row.locator("button", has_text="Revoke").click()
    page.locator("p.notice", has_text="revoked").wait_for()
    assert "revoked" in page.locator("table.keys tr", has_text="browser test").inner_text()
    assert secret not in page.content()
    shot("tenants")

    # Tasks: a queued task (no agent here takes tasks) cancelled from the page.
    submitted = tasks_pb2_grpc.TasksServiceStub(stack.channel()).SubmitTask(tasks_pb2.SubmitTaskRequest(
        service="chat", method="chat.completions", payload=b'{"messages": []}', tenant="acme", priority=7), timeout=5)
    task_id = submitted.task.id
    page.goto(stack.console + "tasks")
    page.locator("table.queue tr", has_text=task_id).locator("button", has_text="Cancel").click()
    page.locator("table.history tr", has_text=task_id).locator(".task.cancelled").wait_for()
    page.goto(stack.console + f"tasks/{task_id}")
    assert "cancelled" in page.locator("table.facts").inner_text()
    shot("tasks")

    # Health: faults on target b turn it degraded (or ejected) on the Routes page, which polls.
    stop = threading.Event()

    def traffic() -> None:
        stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(stack.gateways["agent-new"]))
        while not stop.is_set():
            with contextlib.suppress(grpc.RpcError):  # failures are the point: the agent reports them
                chat(stub, "chat")

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        stack.faults("b", {"error_rate": 0.6, "error_status": 503, "seed": 1})
        page.goto(stack.console + "routes")

        def route(endpoint: str) -> Any:
            target = page.locator("span.target").filter(has_text=re.compile(f"^{endpoint}$"))
            return page.locator("table.routes tr").filter(has_text="chat").filter(has=target)

        route("b").locator(".health.degraded, .health.ejected").wait_for(timeout=30_000)
        assert "healthy" in route("a").inner_text()
        route("b").locator("svg.spark polyline").first.wait_for()  # its chart, sampled every 2 s
        shot("routes")
    finally:
        stop.set()
        worker.join(timeout=15)

    # The control plane dies and comes back (sessions live in its memory): the fleet page says
    # so, then asks for a new login.
    page.goto(stack.console + "fleet")
    page.locator("#live-status", has_text="live").wait_for()
    stack.kill_control_plane()
    page.locator("#live-status", has_text="lost").wait_for()
    assert "stale" in (page.locator("#fleet").get_attribute("class") or "")
    shot("fleet-restart")
    stack.restart_control_plane()
    page.wait_for_url("**/login")
    page.fill("input[name=token]", stack.token)
    page.click("button[type=submit]")
    page.locator("table.fleet td", has_text="agent-old").wait_for()

    page.goto(stack.console + "alerts")
    assert "apply_config" in page.locator("table.audit").inner_text() or "apply" in page.locator(
        "table.audit").inner_text()
    shot("alerts")
    assert not errors, errors  # no CSP violation or script error in any page
    # Only the deliberate 401s: before the first login, and the stream's and the session check's
    # after the restart.
    assert failed == [f"401 {stack.console}{path}" for path in ("fleet", "api/stream/fleet", "api/fleet")], failed
    assert sorted(p.name for p in shots.iterdir()) == sorted(
        f"{n}.png" for n in ("login-fleet", "config", "fleet", "tenants", "tasks", "routes", "fleet-restart", "alerts"))
    print(f"console screenshots in {shots}")
