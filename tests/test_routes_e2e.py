"""Issue 15's end-to-end acceptance with real processes: one route over three emulated providers
with different keys and prices. The agent sends each provider its own key (each emulator
refuses any other), the cost of each call follows the target that served it, the answer names
that target, and no key value reaches the snapshot, the store or any log."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import grpc
import orjson
import pytest
from google.protobuf import duration_pb2

from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.test_end_to_end import wait_until

pytestmark = pytest.mark.timeout(120)

KEYS = {"one": "e2e-route-key-one-71a2", "two": "e2e-route-key-two-c40f", "claude": "e2e-route-key-claude-9e3d"}
VARS = {name: f"SWITCHGEAR_ROUTE_KEY_{name.upper()}" for name in KEYS}
# per target: (input per 1k, output per 1k, per request), all different
PRICES = {"one": (1.0, 2.0, 0.0), "two": (0.25, 0.5, 0.01), "claude": (3.0, 15.0, 0.002)}


def config(ports: dict[str, int]) -> str:
    def target(name: str, url: str, extra: str = "") -> str:
        i, o, r = PRICES[name]
        return (f"          - {{id: {name}, url: \"{url}\", api_key: \"${{{VARS[name]}}}\", provider: {name}, "
                f"input_cost_per_1k_tokens: {i}, output_cost_per_1k_tokens: {o}, cost_per_request: {r}{extra}}}\n")

    return ("external_services:\n  services:\n    llm_services:\n      chat:\n        protocol: openai\n"
            "        model: gpt-4o-mini\n        strategy: round_robin\n        endpoints:\n"
            + target("one", f"http://127.0.0.1:{ports['one']}/v1")
            + target("two", f"http://127.0.0.1:{ports['two']}/v1")
            + target("claude", f"http://127.0.0.1:{ports['claude']}",
                     ", protocol: anthropic, model: claude-3-sonnet"))


WEATHER = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


def chat(gateway: str, body: dict[str, object] | None = None) -> gateway_pb2.InvokeResponse:
    payload = orjson.dumps(body or {"messages": [{"role": "user", "content": "which provider are you"}]})
    with grpc.insecure_channel(gateway) as channel:
        return gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(
            gateway_pb2.InvokeRequest(service="chat", method="chat.completions", payload=payload), timeout=10)


def test_one_route_over_three_providers_each_with_its_own_key_and_prices(tmp_path: Path) -> None:
    procs: list[Proc] = []

    def start(name: str, argv: list[str], env: dict[str, str] | None = None, **kw: object) -> str:
        proc = Proc.switchgear(name, argv, tmp_path, env=env)
        procs.append(proc)
        return proc.start(**kw)  # type: ignore[arg-type]

    try:
        ports = {
            "one": json.loads("{" + start("emu-one", ["emulate", "openai", "--instance", "one:0", "--api-key",
                                                      KEYS["one"]], ready_prefix="{"))["one"],
            "two": json.loads("{" + start("emu-two", ["emulate", "openai", "--instance", "two:0", "--api-key",
                                                      KEYS["two"]], ready_prefix="{"))["two"],
            "claude": json.loads("{" + start("emu-claude", ["emulate", "anthropic", "--api-key", KEYS["claude"]],
                                       ready_prefix="{"))["port"],
        }
        (tmp_path / "routes.yaml").write_text(config(ports), encoding="utf-8")
        db = tmp_path / "r.db"
        cp = start("cp", ["controlplane", "--admin-auth", "none", "--db", str(db), "--listen", "127.0.0.1:0",
                          "--config", str(tmp_path / "routes.yaml"), "--no-probes"])
        gateway = start("agent", ["agent", "--auth", "none", "--control-plane", cp, "--listen", "127.0.0.1:0",
                                  "--node-id", "routes", "--agent-token-file", f"{db}.agent-token"],
                        env={VARS[name]: key for name, key in KEYS.items()})
        admin = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(cp))
        version = admin.GetSnapshot(admin_pb2.GetSnapshotRequest(), timeout=5).snapshot.version

        def acked() -> bool:
            agents = admin.ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).agents
            return len(agents) == 1 and agents[0].acked_version == version

        wait_until(acked, what="the agent to ACK the route")

        served: Counter[str] = Counter()
        for _ in range(9):
            answer = chat(gateway)
            assert orjson.loads(answer.payload)["object"] == "chat.completion"
            target = answer.target
            assert target.id == answer.endpoint and target.provider == answer.endpoint
            i, o, r = PRICES[target.id]
            assert (target.pricing.input_cost_per_1k_tokens, target.pricing.output_cost_per_1k_tokens,
                    target.pricing.cost_per_request) == (i, o, r)
            usage = answer.usage
            assert usage.input_tokens > 0 and usage.output_tokens > 0
            assert usage.cost_usd == pytest.approx(r + (usage.input_tokens * i + usage.output_tokens * o) / 1000)
            assert (target.protocol, target.model) == (
                ("anthropic", "claude-3-sonnet") if target.id == "claude" else ("openai", "gpt-4o-mini"))
            served[target.id] += 1
        assert set(served) == {"one", "two", "claude"}, served  # every provider took its own key

        # Tool calling across the route: each turn may land on another provider (round robin),
        # the Anthropic target's calls continued on OpenAI ones and the other way round.
        pairs = set()
        for _ in range(3):
            ask = {"messages": [{"role": "user", "content": "what is it like in Oslo"}], "tools": WEATHER,
                   "tool_choice": "required"}
            first = chat(gateway, ask)
            message = orjson.loads(first.payload)["choices"][0]["message"]
            assert [c["function"]["name"] for c in message["tool_calls"]] == ["weather"], first.endpoint
            result = {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "sunny"}
            second = chat(gateway, {**ask, "tool_choice": "auto", "messages": [*ask["messages"], message, result]})
            (choice,) = orjson.loads(second.payload)["choices"]
            assert choice["finish_reason"] == "stop" and choice["message"]["content"], second.endpoint
            pairs.add((first.endpoint, second.endpoint))
        assert any(a == "claude" != b for a, b in pairs) and any(a != "claude" == b for a, b in pairs), pairs

        # Per-request overrides beyond the route's policy are refused naming the field.
        payload = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})
        for request, field in (
            (gateway_pb2.InvokeRequest(service="chat", method="chat.completions", payload=payload, max_retries=99),
             "max_retries"),
            (gateway_pb2.InvokeRequest(service="chat", method="chat.completions", payload=payload,
                                       timeout=duration_pb2.Duration(seconds=600)), "timeout"),
        ):
            with grpc.insecure_channel(gateway) as channel, pytest.raises(grpc.RpcError) as refused:
                gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert refused.value.details().startswith(field)  # type: ignore[attr-defined]

        # A bad target over the Admin API: INVALID_ARGUMENT naming the field path, nothing committed.
        bad = common_pb2.Service(
            name="bad-route", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai",
            endpoints=[common_pb2.Endpoint(id="a", url="http://127.0.0.1:9/v1", weight=1),
                       common_pb2.Endpoint(id="b", url="http://127.0.0.1:9", weight=1, protocol="carrier-pigeon")])
        with pytest.raises(grpc.RpcError) as info:
            admin.RegisterService(admin_pb2.RegisterServiceRequest(service=bad), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "endpoints[1].protocol" in info.value.details()  # type: ignore[attr-defined]

        snapshot = admin.GetSnapshot(admin_pb2.GetSnapshotRequest(), timeout=5).snapshot
        assert {e.api_key.env for s in snapshot.services for e in s.endpoints} == set(VARS.values())
        evidence = snapshot.SerializeToString() + b"".join(p.read_bytes() for p in tmp_path.glob("r.db*"))
        for proc in procs:
            proc.stop()
        evidence += b"".join(p.read_bytes() for p in tmp_path.glob("*.log"))
        for name, key in KEYS.items():
            assert VARS[name].encode() in evidence  # the reference travels ...
            assert key.encode() not in evidence  # ... the value never
    finally:
        for proc in procs:
            proc.stop()
