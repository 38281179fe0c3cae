"""No change can poison the fleet (issue 14, item 8), below the process level.

- the control plane runs the agents' own snapshot checks before it commits a change and
  refuses what agents would reject, naming the field, with nothing committed;
- an agent applies a snapshot per service: the rest applies, a rejected service keeps its last
  good definition (or is left out), and the rejection is reported and shown by the Admin API;
- `admin register|apply --wait` reports every agent's answer and fails on a NACK, a rejected
  service or the timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import grpc
import pytest

from switchgear import admin_wait, cli
from switchgear.adapters import builtin_adapters
from switchgear.controlplane import agent_check, codec
from switchgear.controlplane import registry as registry_module
from switchgear.controlplane.agents import AgentStatus, AgentTracker, NodeInfo, Rejection
from switchgear.controlplane.config import ConfigError, load_config
from switchgear.controlplane.model import RegistryState, Settings
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore
from switchgear.controlplane.validate import ValidationError, validate_state
from switchgear.dataplane.convert import SnapshotError, convert_snapshot, snapshot_from_proto
from switchgear.dataplane.snapshot import CATEGORIES
from switchgear.v1 import admin_pb2, admin_pb2_grpc, common_pb2, discovery_pb2
from switchgear.wire import checks
from tests.conftest import REPO, ControlPlane, service
from tests.test_discovery_stream import FakeAgent, status, wait_for

ADAPTERS = builtin_adapters()
BAD_OPTION = '{"chat_pth": "/chat"}'


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(SqliteStore(tmp_path / "r.db"))


# --- the control plane refuses what agents would reject ----------------------------------


def test_shared_checks_know_the_agents_categories() -> None:
    assert checks.CATEGORIES == CATEGORIES


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        (service("bad", options_json=BAD_OPTION), "services[bad].options_json.chat_pth"),
        (service("bad", protocol="anthropic", options_json='{"default_max_tokens": 0}'),
         "services[bad].options_json.default_max_tokens"),
        (service("bad", timeout_s=7200.0), "services[bad].timeout"),  # the model allows it; agents do not
    ],
)
def test_register_of_what_agents_would_reject_is_refused_and_nothing_committed(
    registry: Registry, spec: object, path: str
) -> None:
    good = registry.register(service("good"), "test")
    audit = len(registry.audit())
    with pytest.raises(ValidationError) as info:
        registry.register(spec, "test")  # type: ignore[arg-type]
    assert [p.path for p in info.value.problems] == [path]
    assert registry.snapshot is good and registry.state.service("bad") is None
    assert len(registry.audit()) == audit  # no commit, no audit row


def test_settings_agents_would_reject_are_refused_on_replace(registry: Registry) -> None:
    before = registry.snapshot
    state = RegistryState(services=(service("a"),), settings=dataclasses.replace(Settings(), default_timeout_s=7200.0))
    with pytest.raises(ValidationError) as info:
        registry.replace(state, "test", "file.yaml")
    assert [p.path for p in info.value.problems] == ["settings.default_timeout"]
    assert registry.snapshot is before


CONFIG = """\
external_services:
  services:
    llm_services:
      local_models:
        - name: local
          protocol: openai
          endpoint: http://127.0.0.1:9/v1
          options:
            chat_pth: /chat
"""


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (CONFIG, ("options_json.chat_pth", "unknown option", "line 8")),
        (CONFIG.replace("          options:\n            chat_pth: /chat\n", "          timeout: 7200\n"),
         ("services[local].timeout", "must be within 0..3600 s", "line 5")),
    ],
)
def test_config_agents_would_reject_names_the_field_and_its_line(text: str, needles: tuple[str, ...]) -> None:
    load_config(text, env={})  # without the agents' checks the file passes (as on the original main)
    with pytest.raises(ConfigError) as info:
        load_config(text, source="c.yaml", env={}, check=agent_check.agent_problems)
    assert all(n in str(info.value) for n in needles), str(info.value)


def test_what_an_older_build_stored_does_not_block_unrelated_changes(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:  # as a build without the check committed it
        m.setattr(registry_module, "introduced_problems", lambda *a: [])
        registry.register(service("old-bad", options_json=BAD_OPTION), "test")
    assert agent_check.agent_problems(registry.state)  # agents reject it, and report it
    registry.register(service("unrelated"), "test")  # but an unrelated change goes through
    with pytest.raises(ValidationError):
        registry.register(service("old-bad", options_json='{"chat_pth": "/v2"}'), "test")  # a change to it does not
    registry.deregister("old-bad", "test")
    assert agent_check.agent_problems(registry.state) == []


def test_a_value_a_newer_rule_refuses_blocks_only_changes_to_its_own_service(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store written before a rule existed (service metadata an agent reads, checked since session
    11) keeps serving: unrelated services and tenants still change; the service itself must be
    corrected by its next change."""
    stale = service("old-meta", metadata=(("cache.ttl", "1h"),))
    with monkeypatch.context() as m:  # as a build without the rule committed it
        m.setattr(registry_module, "validate_state", lambda state: [])
        registry.register(stale, "test")
    assert [p.path for p in validate_state(registry.state)] == ["services[old-meta].metadata[0]"]
    registry.register(service("unrelated"), "test")  # goes through
    registry.register(stale, "test")  # the same definition again: nothing new, nothing refused
    with pytest.raises(ValidationError) as info:
        registry.register(service("old-meta", metadata=(("cache.ttl", "2h"),)), "test")
    assert [p.path for p in info.value.problems] == ["services[old-meta].metadata[0]"]
    with pytest.raises(ValidationError):
        registry.register(service("new-meta", metadata=(("cache.ttl", "1h"),)), "test")  # a new one is checked
    registry.register(service("old-meta", metadata=(("cache.ttl", "3600"),)), "test")  # corrected
    assert validate_state(registry.state) == []


def test_a_fallback_to_a_service_agents_reject_says_so(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(registry_module, "introduced_problems", lambda *a: [])
        registry.register(service("old-bad", options_json=BAD_OPTION), "test")
    with pytest.raises(ValidationError) as info:
        registry.register(service("a", fallbacks=("old-bad",)), "test")
    assert [str(p) for p in info.value.problems] == [
        "services[a].fallbacks[0]: falls back to 'old-bad', which agents reject"]


def test_rejections_survive_the_fleet_view_between_replicas() -> None:
    status = AgentStatus(node=NodeInfo("n1"), connected=True, peer="p", acked_version="2.b", nacked_version="",
                         last_nack=None, pending_version="", connected_at=1.0, last_seen=2.0,
                         rejections=(Rejection("b", "services[b].options_json.x", "unknown option"),))
    assert codec.loads(AgentStatus, codec.dumps(status)) == status  # replicas.py stores it so


# --- an agent applies per service -----------------------------------------------------------


def wire(name: str, options_json: str = "{}", fallbacks: tuple[str, ...] = ()) -> common_pb2.Service:
    return common_pb2.Service(
        name=name, category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", options_json=options_json,
        endpoints=[common_pb2.Endpoint(id="a", url="http://127.0.0.1:9/v1", weight=1)], fallbacks=fallbacks,
    )


def snap(version: str, *services: common_pb2.Service) -> discovery_pb2.Snapshot:
    return discovery_pb2.Snapshot(version=version, services=list(services))


def test_a_fallback_to_a_rejected_service_is_rejected_too_keeping_its_last_good_definition() -> None:
    first = convert_snapshot(snap("1.a", wire("a", fallbacks=("b",)), wire("b")), "1.a", ADAPTERS).snapshot
    changed = snap("2.b", wire("a", '{"chat_path": "/v2"}', fallbacks=("b",)), wire("b", BAD_OPTION), wire("c"))
    kept = convert_snapshot(changed, "2.b", ADAPTERS, first.services)
    assert [r.service for r in kept.rejections] == ["b"]  # b keeps its old definition: a stays valid
    assert kept.snapshot.services["b"] is first.services["b"] and "c" in kept.snapshot.services
    assert kept.snapshot.services["a"].options.path("chat.completions") == "/v2"

    fresh = convert_snapshot(snap("1.a", wire("a", fallbacks=("b",)), wire("b", BAD_OPTION), wire("c")), "1.a",
                             ADAPTERS)
    assert [(r.service, r.error.path) for r in fresh.rejections] == [
        ("b", "services[b].options_json.chat_pth"), ("a", "services[a].fallbacks[0]")]
    assert sorted(fresh.snapshot.services) == ["c"]  # nothing to keep: left out


def test_duplicates_and_bad_names_are_rejected_per_service_and_whole_conversion_still_refuses() -> None:
    result = convert_snapshot(snap("1.a", wire("a"), wire("a", BAD_OPTION), wire("no spaces")), "1.a", ADAPTERS)
    assert [(r.service, r.error.path) for r in result.rejections] == [
        ("a", "services[a].name"), ("no spaces", "services[no spaces].name")]
    assert list(result.snapshot.services) == ["a"]
    with pytest.raises(SnapshotError, match="duplicate service name"):
        snapshot_from_proto(snap("1.a", wire("a"), wire("a")), "1.a", ADAPTERS)


def test_a_url_agents_reject_is_not_echoed() -> None:
    msg = wire("a")
    msg.endpoints[0].url = "ftp://user:secret@host/x"
    result = convert_snapshot(snap("1.a", msg), "1.a", ADAPTERS)
    assert result.rejections[0].error.path == "services[a].endpoints[0].url"
    assert "secret" not in str(result.rejections[0].error)


# --- the control plane records rejections, bounded -----------------------------------------


def test_tracker_keeps_the_rejections_of_the_version_each_agent_holds() -> None:
    tracker = AgentTracker(clock=lambda: 1.0)
    held = (Rejection("b", "services[b].options_json.x", "unknown option"),)
    tracker.connected(NodeInfo("n1"), "peer", "1.a", held)  # a reconnect says what it left out
    assert tracker.list()[0].rejections == held
    tracker.acked("n1", "2.b")
    assert tracker.list()[0].rejections == ()


async def test_rejections_reach_list_agents_and_list_services(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    control_plane.registry.register(service("chat"), "test")
    version = control_plane.registry.register(service("other"), "test").version
    agent = FakeAgent(channel)
    await agent.hello()
    response = await agent.read()
    await agent.call.write(discovery_pb2.StreamSnapshotsRequest(
        version_info=response.version_info, response_nonce=response.nonce,
        rejected_services=[discovery_pb2.ServiceRejection(
            service="chat", error_detail=discovery_pb2.NackDetail(field_path="services[chat].options_json.x",
                                                                  message="unknown option"))],
    ))
    await wait_for(lambda: status(control_plane).acked_version == version)
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    agents = (await admin.ListAgents(admin_pb2.ListAgentsRequest())).agents
    assert [(r.service, r.error_detail.field_path) for r in agents[0].rejected_services] == [
        ("chat", "services[chat].options_json.x")]
    services = await admin.ListServices(admin_pb2.ListServicesRequest())
    assert [(r.node_id, r.version, r.rejection.service) for r in services.rejections] == [("fake-1", version, "chat")]


async def test_a_flood_of_rejections_is_bounded(control_plane: ControlPlane, channel: grpc.aio.Channel) -> None:
    from switchgear.controlplane.discovery import MAX_REJECTION_TEXT, MAX_REJECTIONS

    flood = [discovery_pb2.ServiceRejection(service=f"s{i}", error_detail=discovery_pb2.NackDetail(message="x" * 2000))
             for i in range(MAX_REJECTIONS + 500)]
    agent = FakeAgent(channel)
    await agent.call.write(discovery_pb2.StreamSnapshotsRequest(node=agent.node, rejected_services=flood))
    await wait_for(lambda: "fake-1" in {a.node.id for a in control_plane.tracker.list()})
    kept = status(control_plane).rejections
    assert len(kept) == MAX_REJECTIONS and max(len(r.message) for r in kept) == MAX_REJECTION_TEXT


@pytest.fixture
async def channel(control_plane: ControlPlane):  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(control_plane.address) as ch:
        yield ch


async def test_register_of_an_unknown_option_over_the_admin_api_is_invalid_argument(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    before = control_plane.registry.snapshot.version
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    bad = common_pb2.Service(name="bad", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai",
                             options_json=BAD_OPTION, endpoints=[common_pb2.Endpoint(id="a", url="http://h/v1")])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await admin.RegisterService(admin_pb2.RegisterServiceRequest(service=bad))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("service.options_json.chat_pth: unknown option")
    assert control_plane.registry.snapshot.version == before
    with pytest.raises(grpc.aio.AioRpcError) as apply:
        await admin.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=CONFIG, source="c.yaml"))
    assert apply.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "line 8" in apply.value.details()
    assert control_plane.registry.snapshot.version == before


# --- admin --wait ---------------------------------------------------------------------------


def agent_status(node: str, acked: str, nacked: str = "", *rejected: str) -> admin_pb2.AgentStatus:
    msg = admin_pb2.AgentStatus(node=discovery_pb2.Node(id=node), connected=True, acked_version=acked,
                                nacked_version=nacked)
    msg.last_nack.field_path, msg.last_nack.message = "settings.default_timeout", "too long"
    for name in rejected:
        msg.rejected_services.add(service=name, error_detail=discovery_pb2.NackDetail(field_path=f"services[{name}]"))
    return msg


@pytest.mark.parametrize(
    ("agents", "code", "needle"),
    [
        ([agent_status("a", "5.x"), agent_status("b", "6.y")], 0, "2 of 2 agent(s) answered"),
        ([agent_status("a", "5.x", "", "skewed")], 1, "did not apply service 'skewed'"),
        ([agent_status("a", "4.w", "5.x")], 1, "a  NACK 5.x: settings.default_timeout: too long (serves 4.w)"),
        ([], 0, "no agent is connected"),
    ],
)
def test_wait_reports_each_agent_and_fails_on_any_nack_or_rejection(
    agents: list[admin_pb2.AgentStatus], code: int, needle: str
) -> None:
    result, lines = admin_wait.wait(lambda: admin_pb2.ListAgentsResponse(agents=agents), "5.x", 1.0)
    assert result == code and any(needle in line for line in lines), lines


def test_wait_gives_up_at_its_timeout() -> None:
    now = [0.0]
    reply = admin_pb2.ListAgentsResponse(agents=[agent_status("a", "4.w")])
    result, lines = admin_wait.wait(lambda: reply, "5.x", 2.0, clock=lambda: now[0],
                                    sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert result == 1 and "gave up after 2 s" in lines[0] and "a  no answer yet (serves 4.w)" in lines
    assert now[0] == 2.0


@pytest.mark.parametrize("value", ["0", "-1", "3601", "soon"])
def test_wait_timeout_flag_is_bounded(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["admin", "register", "f.json", "--wait", "--wait-timeout", value])
    assert "--wait-timeout" in capsys.readouterr().err


async def test_admin_register_wait_against_a_control_plane_and_an_acking_agent(
    control_plane: ControlPlane, channel: grpc.aio.Channel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = FakeAgent(channel)
    await agent.hello()
    await agent.ack(await agent.read())  # the snapshot it connected to

    async def answer(rejected: tuple[str, ...]) -> None:
        response = await agent.read()
        await agent.call.write(discovery_pb2.StreamSnapshotsRequest(
            version_info=response.version_info, response_nonce=response.nonce,
            rejected_services=[discovery_pb2.ServiceRejection(service=n) for n in rejected]))

    spec = tmp_path / "svc.json"
    argv = ["admin", "--control-plane", control_plane.address, "register", str(spec), "--wait", "--wait-timeout", "5"]
    for name, rejected, code in (("chat", (), 0), ("skewed", ("skewed",), 1)):
        spec.write_text(json.dumps({"name": name, "category": "SERVICE_CATEGORY_LLM", "protocol": "openai",
                                    "endpoints": [{"id": "a", "url": "http://127.0.0.1:9/v1", "weight": 1}]}))
        answering = asyncio.ensure_future(answer(rejected))
        assert await asyncio.to_thread(cli.main, argv) == code
        await answering
        out = capsys.readouterr().out
        assert f"fake-1  ACK  {control_plane.registry.snapshot.version}" in out
        assert ("did not apply service 'skewed'" in out) == bool(rejected)
