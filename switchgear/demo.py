"""`make demo`: both planes end to end on one machine, with no keys and no external servers.

It starts three OpenAI-protocol emulators (different latencies) plus a spare one (and, for one
route over two providers, one more and an Anthropic emulator), a control
plane on a temporary SQLite file loaded from config/demo.yaml, and two agents; drives a
workload through the agents' Gateway with gRPC stubs; kills the control plane mid-run and
keeps going; restarts it and watches the agents reconverge; tries a change the agents would
reject (refused before it is committed), then a good one they ACK; finally shows the managed
local model agent-1 runs (started, ready, serving, SIGKILLed, restarted). Every process it
starts, it stops (agent-1 stops the managed model with itself).

The control plane serves the operator console (--console-listen, on one port across the restart):
the demo prints its URL and where the admin token to log in with is; `--hold S` keeps everything
running S seconds after the story, to look around.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchgear.admin_client import admin_channel
from switchgear.controlplane.snapshot import version_seq
from switchgear.supervise import Proc
from switchgear.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    governance_pb2,
    governance_pb2_grpc,
)

CONFIG = Path(__file__).resolve().parents[1] / "config" / "demo.yaml"
INSTANCES = {"fast": 5, "medium": 20, "slow": 60, "spare": 10, "route": 10}  # name -> emulated latency, ms
SERVICE = "demo-chat"
ROUTE = "demo-route"  # one route over the "route" instance and an Anthropic emulator (config/demo.yaml)
CLAUDE_LATENCY_MS = 15
LOCAL = "demo-local"


@dataclass
class Phase:
    name: str
    served_by: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    providers: Counter[str] = field(default_factory=Counter)  # the serving route target's provider
    mispriced: int = 0  # answers whose cost does not follow their target's prices


def _say(text: str) -> None:
    print(text, flush=True)


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Demo:
    def __init__(self, workdir: Path, requests: int, hold_s: float = 0.0) -> None:
        self.workdir = workdir
        self.requests = requests
        self.hold_s = hold_s
        self.console_port = _free_port()  # the same across the control plane's restart
        self.procs: list[Proc] = []
        self.phases: list[Phase] = []
        self.cp_address = ""
        self.agent_addresses: list[str] = []
        self.emulator_urls: dict[str, str] = {}
        self.route_ok = False
        self.local_ok = False
        self.local_calls = 0

    # -- processes ---------------------------------------------------------------------
    def start(self, proc: Proc, **kwargs: object) -> str:
        self.procs.append(proc)
        return proc.start(**kwargs)  # type: ignore[arg-type]

    def start_emulators(self) -> None:
        args = ["emulate", "openai", "--model", "smollm2"]
        for name, latency in INSTANCES.items():
            args += ["--instance", f"{name}:{latency}"]
        line = self.start(Proc.switchgear("emulators", args, self.workdir), ready_prefix="{")
        ports: dict[str, int] = json.loads("{" + line)
        self.emulator_urls = {name: f"http://127.0.0.1:{port}/v1" for name, port in ports.items()}
        self.ports = ports
        line = self.start(Proc.switchgear("emulator-claude", ["emulate", "anthropic", "--latency-ms",
                                                              str(CLAUDE_LATENCY_MS)], self.workdir), ready_prefix="{")
        self.ports["claude"] = json.loads("{" + line)["port"]

    def control_plane(self, listen: str) -> Proc:
        env = {f"DEMO_{name.upper()}_PORT": str(port) for name, port in self.ports.items()}
        env["DEMO_PYTHON"] = sys.executable  # the managed local model runs this interpreter
        return Proc.switchgear(
            "controlplane",
            ["controlplane", "--config", str(CONFIG), "--db", str(self.workdir / "registry.db"), "--listen", listen,
             "--admin-auth", "token", "--report-interval", "0.5",
             "--console-listen", f"127.0.0.1:{self.console_port}"],
            self.workdir, env,
        )

    def wait_serving(self, address: str) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            _wait(serving, 15, f"agent {address} to be SERVING")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    # -- admin -------------------------------------------------------------------------
    def token(self) -> str:
        return (self.workdir / "registry.db.admin-token").read_text(encoding="utf-8").strip()

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(admin_channel(self.cp_address, self.token()))

    def governance(self) -> governance_pb2_grpc.GovernanceServiceStub:
        return governance_pb2_grpc.GovernanceServiceStub(admin_channel(self.cp_address, self.token()))

    def issue_key(self) -> None:
        """A tenant with a generous rate limit and its key: agents require keys (--auth api_key)."""
        gov = self.governance()
        gov.CreateTenant(governance_pb2.CreateTenantRequest(tenant=governance_pb2.Tenant(
            id="demo", display_name="Demo app", policy=governance_pb2.TenantPolicy(requests_per_minute=1000))),
            timeout=5)
        issued = gov.IssueKey(governance_pb2.IssueKeyRequest(tenant="demo", description="make demo"), timeout=5)
        self.key = issued.secret
        _wait(lambda: self.converged(issued.version), 10, "agents to ACK the tenant")

    async def unauthenticated(self) -> str:
        async with grpc.aio.insecure_channel(self.agent_addresses[0]) as channel:
            request = gateway_pb2.InvokeRequest(service=SERVICE, method="chat.completions", payload=b'{"messages": []}')
            try:
                await gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(request, timeout=5)
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
        return "accepted (unexpected)"

    def refused(self, service: common_pb2.Service) -> str:
        try:
            self.admin().RegisterService(admin_pb2.RegisterServiceRequest(service=service), timeout=5)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return "accepted (unexpected)"

    def agents(self) -> list[admin_pb2.AgentStatus]:
        return list(self.admin().ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).agents)

    def converged(self, version: str) -> bool:
        agents = [a for a in self.agents() if a.connected]
        return len(agents) == len(self.agent_addresses) and all(a.acked_version == version for a in agents)

    def current_version(self) -> str:
        return str(self.admin().ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).current_version)

    def show_agents(self) -> None:
        for a in self.agents():
            newer = version_seq(a.nacked_version) > version_seq(a.acked_version)
            nack = f"  NACKed {a.nacked_version}: {a.last_nack.field_path}: {a.last_nack.message}" if newer else ""
            _say(f"    {a.node.id:<10} {'connected' if a.connected else 'gone':<9} ACKed {a.acked_version}{nack}")

    # -- workload ----------------------------------------------------------------------
    async def workload(self, name: str, count: int, concurrency: int = 8, service: str = SERVICE) -> Phase:
        phase = Phase(name)
        channels = [grpc.aio.insecure_channel(a) for a in self.agent_addresses]
        stubs = [gateway_pb2_grpc.GatewayServiceStub(c) for c in channels]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                payload = {"messages": [{"role": "user", "content": f"{name}: question {i}"}], "max_tokens": 32}
                request = gateway_pb2.InvokeRequest(
                    service=service, method="chat.completions", payload=orjson.dumps(payload),
                    category=common_pb2.SERVICE_CATEGORY_LLM, user_id="demo",
                )
                started = time.perf_counter()
                try:
                    reply = await stubs[i % len(stubs)].Invoke(
                        request, timeout=10, metadata=(("authorization", f"Bearer {self.key}"),))
                except grpc.aio.AioRpcError as exc:
                    phase.errors[exc.code().name] += 1
                    continue
                phase.latencies_ms.append((time.perf_counter() - started) * 1000)
                phase.served_by[reply.endpoint] += 1
                phase.versions[reply.snapshot_version] += 1
                phase.providers[reply.target.provider or reply.target.protocol] += 1
                phase.mispriced += not _priced_right(reply)

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            for channel in channels:
                await channel.close()
        self.phases.append(phase)
        return phase

    def run_phase(self, name: str, count: int, service: str = SERVICE) -> Phase:
        phase = asyncio.run(self.workload(name, count, service=service))
        lat = sorted(phase.latencies_ms)
        p50 = statistics.median(lat) if lat else 0.0
        p95 = lat[int(0.95 * (len(lat) - 1))] if lat else 0.0
        spread = ", ".join(f"{k}={v}" for k, v in sorted(phase.served_by.items()))
        errors = sum(phase.errors.values())
        _say(f"  -> {len(lat)} ok, {errors} errors; served by {spread}; p50 {p50:.1f} ms, p95 {p95:.1f} ms")
        return phase

    # -- the story ---------------------------------------------------------------------
    def run(self) -> int:
        per_phase = max(8, self.requests // 4)
        _say("== Switchgear demo: a control plane, two agents, four OpenAI-protocol emulators ==")
        self.start_emulators()
        _say(f"1. emulators up: {', '.join(f'{n} ({INSTANCES[n]} ms)' for n in INSTANCES)}")
        cp = self.control_plane("127.0.0.1:0")
        self.cp_address = self.start(cp)
        _say(f"2. control plane on {self.cp_address}, registry from {CONFIG.name}, version {self.current_version()}")
        _say(f"   console: http://127.0.0.1:{self.console_port}/ (log in with the admin token in "
             f"{self.workdir / 'registry.db.admin-token'})")
        for i in (1, 2):
            agent = Proc.switchgear(f"agent-{i}", ["agent", "--control-plane", self.cp_address,
                                                   "--listen", "127.0.0.1:0", "--node-id", f"agent-{i}",
                                                   "--auth", "api_key", "--agent-token-file",
                                                   str(self.workdir / "registry.db.agent-token"),
                                                   *(("--managed-cpu", "1") if i == 1 else ())], self.workdir)
            self.agent_addresses.append(self.start(agent))
        for address in self.agent_addresses:
            self.wait_serving(address)
        _wait(lambda: any(r.serving for r in self.replicas()), 20, "the managed local model to be ready")
        first = self.current_version()
        _wait(lambda: self.converged(first), 10, "agents to ACK")
        _say(f"3. two agents on {', '.join(self.agent_addresses)} ACKed {first}:")
        self.show_agents()
        self.issue_key()
        _say(f"   tenant 'demo' created and a key issued (admin token required); a call without a key gets "
             f"{asyncio.run(self.unauthenticated())}")
        first = self.current_version()

        _say(f"4. workload A: {per_phase} chat completions through the agents' Gateway.Invoke")
        self.run_phase("A", per_phase)

        cp.kill()
        _say("5. control plane killed (SIGKILL); workload B runs on the agents' last snapshot")
        self.run_phase("B", per_phase)

        self.procs.remove(cp)
        cp = self.control_plane(self.cp_address)
        self.start(cp)
        _wait(lambda: self.converged(first), 20, "agents to reconnect")
        _say(f"6. control plane restarted on the same SQLite file; agents reconnected holding {first} "
             "(nothing resent: the version is unchanged)")
        self.show_agents()

        bad = self.service_with(options_json='{"chat_pth": "/chat/completions"}')
        _say(f"7. a change with a misspelt adapter option is refused before it is committed (the agents' own "
             f"checks): {self.refused(bad)}; still {self.current_version()}, which the agents keep.")
        audit = self.governance().ListAudit(governance_pb2.ListAuditRequest(limit=20), timeout=5).entries
        row = next((f"'{e.action}: {e.target}' by {e.actor}" for e in audit if e.action == "refused"), "(no row!)")
        _say(f"   recorded in the audit trail as {row}; the console "
             f"shows it (\"refused: <field>: <reason>\" under the propagation line of "
             f"http://127.0.0.1:{self.console_port}/fleet, and in the audit trail on /alerts); the agents:")
        self.show_agents()
        self.run_phase("C", per_phase)

        good = self.service_with(extra_endpoint="spare")
        fixed = self.admin().RegisterService(admin_pb2.RegisterServiceRequest(service=good), timeout=5).version
        _wait(lambda: self.converged(fixed), 10, "agents to ACK the fix")
        _say(f"8. pushed {fixed} adding the 'spare' instance; both agents ACKed it:")
        self.show_agents()
        self.run_phase("D", self.requests - 3 * per_phase)

        _say(f"9. one route, two providers: {per_phase} calls to '{ROUTE}', whose targets are the OpenAI "
             f"emulator 'route' and an Anthropic emulator ({CLAUDE_LATENCY_MS} ms), each with its own model "
             "and prices; the same OpenAI-shaped call goes through either adapter")
        route = self.run_phase("R", per_phase, service=ROUTE)
        _say("  -> served by provider: " + ", ".join(f"{k}={v}" for k, v in sorted(route.providers.items()))
             + f"; answers whose cost does not follow their target's prices: {route.mispriced}")
        self.route_ok = set(route.providers) == {"openai-emulator", "anthropic-emulator"} and not route.mispriced
        self.managed_story()
        result = self.report()
        if self.hold_s > 0:
            _say(f"holding for {self.hold_s:.0f} s: console at http://127.0.0.1:{self.console_port}/")
            time.sleep(self.hold_s)
        return result

    # -- the managed local model (container manager) -------------------------------------
    def replicas(self) -> list[admin_pb2.ManagedReplica]:
        return list(self.admin().ListReplicas(admin_pb2.ListReplicasRequest(service=LOCAL), timeout=5).replicas)

    def ask_local(self) -> str:
        self.local_calls += 1
        with grpc.insecure_channel(self.agent_addresses[1]) as channel:
            payload = orjson.dumps({"messages": [{"role": "user", "content": "hello, local model"}]})
            reply = gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(
                gateway_pb2.InvokeRequest(service=LOCAL, method="chat.completions", payload=payload),
                timeout=10, metadata=(("authorization", f"Bearer {self.key}"),))
        return str(reply.endpoint)

    def answered_by_local(self) -> str:
        try:
            return self.ask_local()
        except grpc.RpcError:
            self.local_calls -= 1  # refused by the agent before it reached anything: not usage
            return ""

    def managed_story(self) -> None:
        (replica,) = self.replicas()
        _say(f"10. managed local model '{LOCAL}' (config: local_models with managed:): agent {replica.node} started "
             f"it as {replica.id} (pid {replica.pid}); a target only once its health call answered; "
             f"now {replica.state}")
        answered = [self.ask_local() for _ in range(3)]
        _say(f"   3 calls to {LOCAL} answered by {', '.join(sorted(set(answered)))}")
        os.kill(replica.pid, signal.SIGKILL)
        _say(f"   killed pid {replica.pid} (SIGKILL); its agent restarts it with backoff, the route drops it meanwhile")
        _wait(lambda: any(r.restarts > replica.restarts and r.pid not in (0, replica.pid) and r.serving
                          for r in self.replicas()), 20, "the restart")
        (again,) = self.replicas()
        # Calls find it again once the agents applied the version that serves it once more
        # (until then demo-local has no ready replica and is not in their snapshot).
        with contextlib.suppress(TimeoutError):
            _wait(lambda: self.answered_by_local() == again.id, 10, "calls to reach the restarted replica")
        self.local_ok = self.ask_local() == again.id and again.pid != replica.pid
        _say(f"   restarted: {again.id} pid {again.pid}, restarts {again.restarts}, {again.state}; it answers calls "
             f"again ({'ok' if self.local_ok else 'FAILED'}). `switchgear admin replicas` shows the same.")

    def service_with(self, options_json: str = "{}", extra_endpoint: str = "") -> common_pb2.Service:
        reply = self.admin().GetService(admin_pb2.GetServiceRequest(name=SERVICE), timeout=5)
        service: common_pb2.Service = reply.service
        service.options_json = options_json
        if extra_endpoint:
            service.endpoints.add(id=extra_endpoint, url=self.emulator_urls[extra_endpoint], weight=1)
        return service

    def report(self) -> int:
        stats = {name: httpx.get(url.removesuffix("/v1") + "/_emulator/stats", timeout=5).json()
                 for name, url in self.emulator_urls.items()}
        total = Counter[str]()
        for phase in self.phases:
            total.update(phase.served_by)
        errors = sum(sum(p.errors.values()) for p in self.phases)
        _say("\n== Account ==")
        _say(f"  {'phase':<6}{'ok':>5}{'errors':>8}   versions routed with")
        for p in self.phases:
            _say(f"  {p.name:<6}{sum(p.served_by.values()):>5}{sum(p.errors.values()):>8}   "
                 + ", ".join(f"{v} x{n}" for v, n in sorted(p.versions.items())))
        _say(f"  {'instance':<10}{'latency':>9}{'served':>8}{'emulator saw':>14}")
        for name in INSTANCES:
            seen = _completions_seen(stats[name])
            _say(f"  {name:<10}{INSTANCES[name]:>6} ms{total[name]:>8}{seen:>14}")
        served = sum(total.values())

        def usage() -> governance_pb2.TenantUsage:
            reply = self.governance().GetUsage(governance_pb2.GetUsageRequest(tenant="demo"), timeout=5)
            found: governance_pb2.TenantUsage = reply.usage[0]
            return found

        with contextlib.suppress(TimeoutError):  # the account says what arrived, whatever it is
            _wait(lambda: usage().requests_total >= served + self.local_calls, 10, "usage reports")
        tenant = usage()
        _say(f"  tenant demo: {tenant.requests_total} of {served} + {self.local_calls} ({LOCAL}) requests reported by "
             f"the agents' load reports (kept across the control-plane restart), cost ${tenant.cost_total_usd:.4f}")
        _say(f"  errors = {errors}")
        ok = errors == 0 and all(total[n] == _completions_seen(stats[n]) for n in INSTANCES)
        ok = ok and tenant.requests_total == served + self.local_calls and self.route_ok and self.local_ok
        _say("  RESULT: " + ("every request served; counts agree with the emulators and the usage reports"
                             if ok else "FAILED"))
        return 0 if ok else 1


def _priced_right(reply: gateway_pb2.InvokeResponse) -> bool:
    """Whether the answer's cost is its serving target's prices applied to its usage."""
    p, u = reply.target.pricing, reply.usage
    in_price = p.input_cost_per_1k_tokens or p.cost_per_1k_tokens
    out_price = p.output_cost_per_1k_tokens or p.cost_per_1k_tokens
    expected = p.cost_per_request + (u.input_tokens * in_price + u.output_tokens * out_price) / 1000
    return abs(u.cost_usd - expected) <= 1e-9 + 1e-6 * expected


def _completions_seen(stats: dict[str, object]) -> int:
    """Chat completions an emulator answered (the demo's calls all succeed; the control plane's
    health probes go to /v1/models and are not counted)."""
    paths = stats.get("by_path") or {}
    return int(paths.get("/v1/chat/completions", 0)) if isinstance(paths, dict) else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(requests: int = 120, hold_s: float = 0.0) -> int:
    with tempfile.TemporaryDirectory(prefix="switchgear-demo-") as tmp:
        demo = Demo(Path(tmp), requests, hold_s)
        try:
            return demo.run()
        except Exception as exc:  # the demo reports, then cleans up
            _say(f"demo failed: {exc}")
            for proc in demo.procs:
                _say(f"--- {proc.name} log tail ---\n{proc.tail()}")
            return 1
        finally:
            demo.stop_all()


if __name__ == "__main__":
    sys.exit(main())
