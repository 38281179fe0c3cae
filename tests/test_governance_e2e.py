"""Governance and caching across real processes: a control plane with admin auth, two agents
requiring client keys and sharing a real Redis, and an OpenAI emulator counting upstream calls."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from switchgear.admin_client import admin_channel
from switchgear.supervise import Proc
from switchgear.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    governance_pb2,
    governance_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)
from tests.servers import redis_server
from tests.test_end_to_end import wait_until

pytestmark = pytest.mark.timeout(120)

CONFIG = """\
external_services:
  communication:
    caching:
      enabled: true
  services:
    llm_services:
      local_models:
        - name: "chat"
          model: "gpt-4o-mini"
          cost_per_1k_tokens: 1.0
          endpoint: "{url}"
"""


class Fleet:
    def __init__(self, workdir: Path, redis_url: str) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.emulator_url = ""
        self.cp = ""
        self.agents: list[str] = []
        self.http: list[str] = []
        self.redis_url = redis_url

    def start(self, proc: Proc, **kw: object) -> str:
        self.procs.append(proc)
        return proc.start(**kw)  # type: ignore[arg-type]

    def up(self) -> None:
        ports = json.loads("{" + self.start(
            Proc.switchgear("emulator", ["emulate", "openai", "--instance", "u:0"], self.workdir), ready_prefix="{"))
        self.emulator_url = f"http://127.0.0.1:{ports['u']}"
        db = self.workdir / "r.db"
        self.cp = self.start(Proc.switchgear(
            "cp", ["controlplane", "--db", str(db), "--listen", "127.0.0.1:0", "--admin-auth", "token", "--no-probes"],
            self.workdir))
        self.token = Path(f"{db}.admin-token").read_text().strip()
        for i in (1, 2):
            agent = Proc.switchgear(f"agent-{i}", [
                "agent", "--control-plane", self.cp, "--listen", "127.0.0.1:0", "--node-id", f"agent-{i}",
                "--auth", "api_key", "--redis", self.redis_url, "--http-listen", "127.0.0.1:0",
                "--agent-token-file", f"{db}.agent-token"], self.workdir)
            self.agents.append(self.start(agent))
            self.http.append("http://" + agent.wait_line("HTTP ", 10).removeprefix("HTTP ").strip())
        reply = self.admin().ApplyConfig(admin_pb2.ApplyConfigRequest(
            yaml=CONFIG.format(url=self.emulator_url + "/v1"), source="test.yaml"), timeout=10)
        self.converge(reply.version)

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(admin_channel(self.cp, self.token))

    def governance(self) -> governance_pb2_grpc.GovernanceServiceStub:
        return governance_pb2_grpc.GovernanceServiceStub(admin_channel(self.cp, self.token))

    def converge(self, version: str) -> None:
        def done() -> bool:
            agents = self.admin().ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).agents
            return len(agents) == 2 and all(a.acked_version == version and a.connected for a in agents)

        wait_until(done, 15, f"both agents to ACK {version}")

    def tenant(self, name: str, **policy: object) -> str:
        gov = self.governance()
        gov.CreateTenant(governance_pb2.CreateTenantRequest(tenant=governance_pb2.Tenant(
            id=name, policy=governance_pb2.TenantPolicy(**policy))), timeout=5)  # type: ignore[arg-type]
        issued = gov.IssueKey(governance_pb2.IssueKeyRequest(tenant=name), timeout=5)
        self.converge(issued.version)
        return str(issued.secret)

    def upstream_calls(self) -> int:
        stats = httpx.get(self.emulator_url + "/_emulator/stats", timeout=5).json()
        return int(stats["by_outcome"].get("ok", 0))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def request(text: str) -> gateway_pb2.InvokeRequest:
    payload = orjson.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 8})
    return gateway_pb2.InvokeRequest(service="chat", method="chat.completions", payload=payload)


async def spray(agents: list[str], key: str | None, texts: list[str], metadata: tuple[tuple[str, str], ...] = ()
                ) -> list[gateway_pb2.InvokeResponse | grpc.aio.AioRpcError]:
    auth = (("authorization", f"Bearer {key}"),) if key else ()
    channels = [grpc.aio.insecure_channel(a) for a in agents]
    stubs = [gateway_pb2_grpc.GatewayServiceStub(c) for c in channels]

    async def one(i: int, text: str) -> gateway_pb2.InvokeResponse | grpc.aio.AioRpcError:
        try:
            return await stubs[i % len(stubs)].Invoke(request(text), metadata=auth + metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc

    try:
        return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(texts))))
    finally:
        for c in channels:
            await c.close()


def outcomes(results: list[gateway_pb2.InvokeResponse | grpc.aio.AioRpcError]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        name = r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK"
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("governance")
    with redis_server(workdir) as redis:
        f = Fleet(workdir, redis.url)
        try:
            f.up()
            yield f
        finally:
            f.stop()


def test_admin_rpcs_need_the_token(fleet: Fleet) -> None:
    with grpc.insecure_channel(fleet.cp) as channel, pytest.raises(grpc.RpcError) as info:
        admin_pb2_grpc.AdminServiceStub(channel).ListServices(admin_pb2.ListServicesRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


async def test_requests_need_a_valid_key(fleet: Fleet) -> None:
    results = await spray(fleet.agents, None, ["no key"]) + await spray(fleet.agents, "sg-00000000-forged", ["forged"])
    assert outcomes(results) == {"UNAUTHENTICATED": 2}


async def test_rate_limit_holds_across_two_agents(fleet: Fleet) -> None:
    key = fleet.tenant("limited", requests_per_minute=12)
    wait_until(lambda: 60 - time.time() % 60 > 20, 45, "a minute with 20 s left")  # one window for the burst
    results = await spray(fleet.agents, key, [f"limited {i}" for i in range(40)])
    assert outcomes(results) == {"OK": 12, "RESOURCE_EXHAUSTED": 28}
    refused = next(r for r in results if isinstance(r, grpc.aio.AioRpcError))
    assert "requests per minute" in (refused.details() or "")
    assert 0 < int(dict(refused.trailing_metadata() or ())["retry-after"]) <= 60

    seen: list[tuple[int, int]] = []

    def reported() -> bool:  # agents' load reports carry per-tenant usage to the control plane
        usage = fleet.governance().GetUsage(governance_pb2.GetUsageRequest(tenant="limited"), timeout=5).usage[0]
        seen.append((usage.requests_total, usage.rejected_total))
        return seen[-1] == (12, 28)

    deadline = time.monotonic() + 15
    while not reported():
        assert time.monotonic() < deadline, f"usage of 'limited' never reached (12, 28); last seen {seen[-3:]}"
        time.sleep(0.05)


async def test_budget_stops_traffic_once_real_cost_crosses_it(fleet: Fleet) -> None:
    key = fleet.tenant("budgeted", budget_per_hour_usd=0.05)
    spent, served, refused = 0.0, 0, None
    for i in range(200):
        (result,) = await spray(fleet.agents[i % 2:i % 2 + 1], key, [f"budget question number {i} " * 4])
        if isinstance(result, grpc.aio.AioRpcError):
            refused = result
            break
        spent += result.usage.cost_usd
        served += 1
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "budget" in (refused.details() or "")
    assert spent >= 0.05 and spent - 0.05 < 0.05  # stopped right after the crossing
    assert served > 1


async def test_revoked_key_is_rejected_on_every_agent_after_one_push(fleet: Fleet) -> None:
    key = fleet.tenant("revocable")
    assert outcomes(await spray(fleet.agents, key, ["before a", "before b"])) == {"OK": 2}
    key_id = key.split("-")[1]
    revoked = fleet.governance().RevokeKey(governance_pb2.RevokeKeyRequest(id=key_id), timeout=5)
    fleet.converge(revoked.version)
    assert outcomes(await spray(fleet.agents, key, ["after a", "after b"])) == {"UNAUTHENTICATED": 2}


async def cache_entries(fleet: Fleet) -> int:
    client = aioredis.from_url(fleet.redis_url)
    try:
        return len([k async for k in client.scan_iter("sg:c:*")])
    finally:
        await client.aclose()


async def stored_in_redis(fleet: Fleet, at_least: int, timeout_s: float = 5.0) -> None:
    """Poll Redis until it holds `at_least` cache entries."""
    deadline = time.monotonic() + timeout_s
    while await cache_entries(fleet) < at_least:
        assert time.monotonic() < deadline, "the cache store never reached Redis"
        await asyncio.sleep(0.02)


async def test_cache_one_upstream_call_per_tenant_shared_through_redis(fleet: Fleet) -> None:
    acme, globex = fleet.tenant("cache-acme"), fleet.tenant("cache-globex")
    before, entries = fleet.upstream_calls(), await cache_entries(fleet)
    burst = await spray(fleet.agents[:1], acme, ["the same question"] * 50)
    assert outcomes(burst) == {"OK": 50}
    assert fleet.upstream_calls() == before + 1  # 50 concurrent identical misses, one upstream call
    await stored_in_redis(fleet, entries + 1)  # the store is written behind (within 50 ms, or with the next round)
    (other_agent,) = await spray(fleet.agents[1:], acme, ["the same question"])
    assert isinstance(other_agent, gateway_pb2.InvokeResponse) and other_agent.cached  # shared via Redis
    assert fleet.upstream_calls() == before + 1
    (other_tenant,) = await spray(fleet.agents[1:], globex, ["the same question"])
    assert isinstance(other_tenant, gateway_pb2.InvokeResponse) and not other_tenant.cached
    assert fleet.upstream_calls() == before + 2
    (fresh,) = await spray(fleet.agents[:1], acme, ["the same question"], (("cache-control", "no-cache"),))
    assert isinstance(fresh, gateway_pb2.InvokeResponse) and not fresh.cached
    assert fleet.upstream_calls() == before + 3


def test_every_admin_change_is_in_the_audit_log(fleet: Fleet) -> None:
    fleet.tenant("audited")
    entries = fleet.governance().ListAudit(governance_pb2.ListAuditRequest(limit=200), timeout=5).entries
    actions = {(e.action, e.target) for e in entries}
    assert ("create_tenant", "audited") in actions and ("apply_config", "test.yaml") in actions
    assert any(a == "issue_key" for a, _ in actions)
    assert all(e.actor and e.version and e.at.seconds for e in entries)


def test_cli_uses_the_admin_token(fleet: Fleet) -> None:
    import subprocess
    import sys

    token_file = str(fleet.workdir / "r.db.admin-token")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "switchgear", *args], capture_output=True, text=True, timeout=30)

    denied = cli("admin", "--control-plane", fleet.cp, "services")
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    created = cli("tenants", "create", "from-cli", "--rpm", "7", "--control-plane", fleet.cp,
                  "--admin-token-file", token_file)
    assert created.returncode == 0, created.stderr
    issued = cli("keys", "issue", "from-cli", "--control-plane", fleet.cp, "--admin-token-file", token_file)
    assert issued.returncode == 0 and "sg-" in issued.stdout and "shown once" in issued.stdout
    audit = cli("audit", "--control-plane", fleet.cp, "--admin-token-file", token_file)
    assert audit.returncode == 0 and "create_tenant" in audit.stdout and "from-cli" in audit.stdout
    usage = cli("usage", "--control-plane", fleet.cp, "--admin-token-file", token_file)
    assert usage.returncode == 0 and "from-cli" in usage.stdout


def test_http_front_door_and_streams_are_governed_too(fleet: Fleet) -> None:
    import openai

    key = fleet.tenant("http-tenant", requests_per_minute=2)
    wait_until(lambda: 60 - time.time() % 60 > 15, 45, "a minute with 15 s left")
    keyless = openai.OpenAI(base_url=fleet.http[0] + "/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        keyless.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    client = openai.OpenAI(base_url=fleet.http[0] + "/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["chat"]
    reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "http one"}])
    assert reply.choices[0].message.content
    chunks = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "http two"}],
                                            stream=True)
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    with pytest.raises(openai.RateLimitError):  # the third request of the minute, gRPC or HTTP alike
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "http three"}])

    stream_request = gateway_pb2.InvokeStreamRequest(request=request("stream without a key"))
    with grpc.insecure_channel(fleet.agents[1]) as channel, pytest.raises(grpc.RpcError) as info:
        list(gateway_pb2_grpc.GatewayServiceStub(channel).InvokeStream(stream_request, timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_applications_submit_tasks_with_their_key_not_the_admin_token(fleet: Fleet) -> None:
    """The running control plane checks tenant keys on task calls against its registry."""
    mine, other = fleet.tenant("tasker"), fleet.tenant("bystander")
    payload = orjson.dumps({"messages": [{"role": "user", "content": "later"}]})
    with grpc.insecure_channel(fleet.cp) as channel:
        tasks = tasks_pb2_grpc.TasksServiceStub(channel)
        submitted = tasks.SubmitTask(tasks_pb2.SubmitTaskRequest(service="chat", method="chat.completions",
                                                                 payload=payload),
                                     metadata=(("authorization", f"Bearer {mine}"),), timeout=5).task
        assert submitted.tenant == "tasker"
        with pytest.raises(grpc.RpcError) as info:
            tasks.GetTask(tasks_pb2.GetTaskRequest(id=submitted.id),
                          metadata=(("authorization", f"Bearer {other}"),), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as info:  # no key, no token
            tasks.ListTasks(tasks_pb2.ListTasksRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    operator = tasks_pb2_grpc.TasksServiceStub(admin_channel(fleet.cp, fleet.token))
    seen = operator.GetTask(tasks_pb2.GetTaskRequest(id=submitted.id), timeout=5).task
    assert seen.tenant == "tasker"
