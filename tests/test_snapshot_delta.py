"""Delta delivery, without sockets: the control plane's change log and delta bodies, and the
agent's Applier taking them. The property: an agent fed deltas ends in exactly the state an
agent fed whole snapshots of the same versions is in, over random sequences of changes."""

from __future__ import annotations

import dataclasses
import random

import pytest

from switchgear.adapters import builtin_adapters
from switchgear.cli import main
from switchgear.controlplane import snapshot as snap
from switchgear.controlplane.discovery import SnapshotFeed
from switchgear.controlplane.model import ApiKey, Category, EndpointSpec, RegistryState, ServiceSpec, Tenant
from switchgear.dataplane.client import Applier, SnapshotClient
from switchgear.dataplane.snapshot import AgentSnapshot, Holder, without_health_verdicts
from switchgear.v1 import discovery_pb2

NAMES = tuple(f"svc-{i}" for i in range(8))


def spec(name: str, rng: random.Random) -> ServiceSpec:
    """A service with random content: sometimes one this agent rejects (an unknown option),
    sometimes with no endpoint (not served), sometimes a fallback (maybe to one not served)."""
    endpoints = tuple(EndpointSpec(id=f"e{i}", url=f"http://127.0.0.1:{9000 + rng.randrange(50)}/v1",
                                   weight=rng.randint(1, 3)) for i in range(rng.choice((0, 1, 1, 2, 3))))
    options = '{"nope": 1}' if rng.random() < 0.15 else "{}"
    fallbacks = (rng.choice(NAMES),) if rng.random() < 0.3 else ()
    fallbacks = tuple(f for f in fallbacks if f != name)
    category = rng.choice((Category.LLM, Category.LLM, Category.EMBEDDING))
    return ServiceSpec(name=name, category=category, protocol="openai", model=f"m{rng.randrange(3)}",
                       endpoints=endpoints, options_json=options, fallbacks=fallbacks)


def mutate(state: RegistryState, overlay: snap.Overlay, rng: random.Random
           ) -> tuple[RegistryState, snap.Overlay]:
    """One random change: register, update, deregister, an overlay (health, weights, alert
    action), a settings change, or a tenant / key change."""
    services = {s.name: s for s in state.services}
    kind = rng.choice(("register", "update", "update", "deregister", "overlay", "overlay", "settings", "governance"))
    if kind in ("register", "update"):
        name = rng.choice(NAMES)
        services[name] = spec(name, rng)
    elif kind == "deregister" and services:
        del services[rng.choice(sorted(services))]
    elif kind == "overlay":
        entries = [(f"{s.name}/{e.id}", snap.EndpointOverride(rng.randint(0, 100), rng.choice(
            ("healthy", "degraded", "ejected", "draining")))) for s in services.values() for e in s.endpoints
                   if rng.random() < 0.5]
        actions = [(n, snap.ServiceOverride(strategy=rng.choice(("", "priority")))) for n in sorted(services)
                   if rng.random() < 0.2]
        overlay = snap.Overlay(tuple(sorted(entries)), tuple(actions), rng.choice((0, 0, 3)))
    elif kind == "settings":
        settings = dataclasses.replace(state.settings, default_strategy=rng.choice(("intelligent", "round_robin")))
        state = dataclasses.replace(state, settings=settings)
    elif kind == "governance":
        tenants = tuple(Tenant(id=f"t{i}") for i in range(rng.randrange(3)))
        keys = tuple(ApiKey(id=f"k{t.id}", tenant=t.id, sha256=f"{rng.randrange(16):x}" * 64,
                            revoked_at=rng.choice((0.0, 0.0, 5.0))) for t in tenants)
        state = dataclasses.replace(state, tenants=tenants, keys=keys)
    state = dataclasses.replace(state, services=tuple(services[n] for n in sorted(services)))
    return state, overlay.pruned(state)


def response(body: bytes, nonce: str = "n") -> discovery_pb2.StreamSnapshotsResponse:
    return discovery_pb2.StreamSnapshotsResponse.FromString(
        body + discovery_pb2.StreamSnapshotsResponse(nonce=nonce).SerializeToString())


class Agent:
    def __init__(self) -> None:
        self.holder = Holder()
        self.applier = Applier(self.holder, builtin_adapters())

    def take(self, body: bytes) -> None:
        error = self.applier.apply(response(body))
        assert error is None, error

    def state(self) -> tuple[AgentSnapshot | None, list[tuple[str, str, str]]]:
        rejections = sorted((r.service, r.error.path, r.error.message) for r in self.applier.rejections)
        return self.holder.current, rejections


@pytest.mark.parametrize("seed", range(12))
def test_an_agent_fed_deltas_ends_where_one_fed_whole_snapshots_does(seed: int) -> None:
    rng = random.Random(seed)
    state, overlay, seq = RegistryState(), snap.EMPTY_OVERLAY, 1
    feed = SnapshotFeed(snap.build(state, seq), history=rng.choice((2, 5, 64)))
    by_delta, by_whole = Agent(), Agent()
    by_delta.take(feed.body(None)[0])
    deltas = wholes = 0
    for _ in range(60):
        state, overlay = mutate(state, overlay, rng)
        new = snap.build(state, seq + 1, overlay=overlay)
        if new.content_hash == feed.current.content_hash:
            continue
        seq += 1
        feed.publish(new)
        if rng.random() < 0.35:
            continue  # this agent pair skips the version: the next delta spans several steps
        body, is_delta = feed.body(by_delta.holder.version)
        deltas, wholes = deltas + is_delta, wholes + (not is_delta)
        by_delta.take(body)
        by_whole.take(feed.body(None)[0])
        assert by_delta.state() == by_whole.state(), f"diverged at {new.version}"
    assert deltas > 10  # the property was exercised on deltas, not only whole fallbacks


def test_a_delta_names_only_what_changed() -> None:
    rng = random.Random(1)
    a, b = spec("a", rng), spec("b", rng)
    a = dataclasses.replace(a, endpoints=(EndpointSpec(id="e0", url="http://127.0.0.1:9/v1"),), options_json="{}",
                            fallbacks=())
    b = dataclasses.replace(a, name="b")
    feed = SnapshotFeed(snap.build(RegistryState(services=(a, b)), 1))
    v1 = feed.current.version
    state = RegistryState(services=(dataclasses.replace(a, model="other"),))
    feed.publish(snap.build(state, 2))
    delta = response(feed.body(v1)[0]).delta
    assert delta.base_version == v1 and delta.version == feed.current.version
    assert [s.name for s in delta.services] == ["a"] and list(delta.removed_services) == ["b"]
    assert not delta.HasField("settings") and not delta.HasField("governance")
    # A health change is a change of the service it is on (its endpoints' weights).
    v2 = feed.current.version
    overlay = snap.Overlay(endpoints=(("a/e0", snap.EndpointOverride(7, "degraded")),))
    feed.publish(snap.build(state, 3, overlay=overlay))
    delta = response(feed.body(v2)[0]).delta
    assert [(s.name, s.endpoints[0].weight) for s in delta.services] == [("a", 7)]
    # Settings and governance travel only when they changed, whole.
    v3 = feed.current.version
    state = dataclasses.replace(state, tenants=(Tenant(id="t1"),))
    feed.publish(snap.build(state, 4, overlay=overlay))
    delta = response(feed.body(v3)[0]).delta
    assert not delta.services and delta.HasField("governance") and [t.id for t in delta.governance.tenants] == ["t1"]
    assert not delta.HasField("settings")


def test_an_unknown_forged_or_too_old_base_gets_the_whole_snapshot_and_no_memory_per_base() -> None:
    state = RegistryState(services=(ServiceSpec("a", Category.LLM, "openai", (EndpointSpec("e", "http://h/v1"),)),))
    feed = SnapshotFeed(snap.build(state, 1), history=4)
    versions = [feed.current.version]
    for seq in range(2, 8):
        state = dataclasses.replace(state, services=(dataclasses.replace(state.services[0], model=f"m{seq}"),))
        feed.publish(snap.build(state, seq))
        versions.append(feed.current.version)
    too_old, recent = versions[-6], versions[-5]  # 4 steps kept: from versions[-5] on
    assert feed.body(recent)[1] and not feed.body(too_old)[1]
    for forged in ("", "1." + "0" * 12, "x" * 100_000, versions[-2] + "~health-expired"):
        body, is_delta = feed.body(forged)
        assert not is_delta and response(body).HasField("snapshot")
    assert not feed.body(None)[1]
    assert sorted(feed._bodies) == ["", recent]  # one whole body and one per base in the log, no more


def test_a_delta_onto_another_version_than_the_one_held_asks_for_a_resync() -> None:
    state = RegistryState(services=(ServiceSpec("a", Category.LLM, "openai", (EndpointSpec("e", "http://h/v1"),)),))
    feed = SnapshotFeed(snap.build(state, 1))
    agent = Agent()
    agent.take(feed.body(None)[0])
    v1 = feed.current.version
    feed.publish(snap.build(dataclasses.replace(state, services=()), 2))
    delta = feed.body(v1)[0]
    agent.applier.swap(without_health_verdicts(agent.holder.current))  # type: ignore[arg-type]
    error = agent.applier.apply(response(delta))
    assert error is not None and error.path == "base_version"
    assert agent.holder.version.endswith("~health-expired")  # nothing half-applied


def test_a_delta_service_the_agent_cannot_take_is_reported_and_its_last_good_definition_kept() -> None:
    good = ServiceSpec("a", Category.LLM, "openai", (EndpointSpec("e", "http://127.0.0.1:9/v1"),))
    feed = SnapshotFeed(snap.build(RegistryState(services=(good,)), 1))
    holder = Holder()
    client = SnapshotClient(["127.0.0.1:9"], discovery_pb2.Node(id="n"), holder, Applier(holder, builtin_adapters()))
    client._answer(response(feed.body(None)[0]))
    kept = holder.current.services["a"]  # type: ignore[union-attr]
    v1 = feed.current.version
    feed.publish(snap.build(RegistryState(services=(dataclasses.replace(good, options_json='{"nope": 1}'),)), 2))
    answer = client._answer(response(feed.body(v1)[0]))
    assert not answer.HasField("error_detail") and answer.version_info == feed.current.version  # an ACK
    assert [(r.service, r.error_detail.field_path) for r in answer.rejected_services] == [
        ("a", "services[a].options_json.nope")]
    assert holder.current is not None and holder.current.services["a"] is kept
    # An unrelated later delta leaves the rejection standing (the service did not change) ...
    v2 = feed.current.version
    other = dataclasses.replace(good, name="b")
    feed.publish(snap.build(RegistryState(services=(dataclasses.replace(good, options_json='{"nope": 1}'), other)), 3))
    answer = client._answer(response(feed.body(v2)[0]))
    assert [r.service for r in answer.rejected_services] == ["a"] and "b" in holder.current.services
    # ... and a NACKed delta (settings it cannot take) changes nothing.
    v3 = feed.current.version
    bad = discovery_pb2.StreamSnapshotsResponse(version_info="4.x", nonce="n4", delta=discovery_pb2.SnapshotDelta(
        version="4.x", base_version=v3, settings=discovery_pb2.DataPlaneSettings(
            preset_responses={"no-such-category": "x"})))
    answer = client._answer(bad)
    assert answer.HasField("error_detail") and answer.version_info == v3 == holder.version
    assert answer.error_detail.field_path.startswith("settings")


def test_the_first_request_says_how_snapshots_are_wanted_and_a_bad_mode_is_refused() -> None:
    holder = Holder()
    applier = Applier(holder, builtin_adapters())
    assert SnapshotClient(["x:1"], discovery_pb2.Node(id="n"), holder, applier)._delivery == \
        discovery_pb2.SNAPSHOT_DELIVERY_DELTA
    assert SnapshotClient(["x:1"], discovery_pb2.Node(id="n"), holder, applier, delivery="whole")._delivery == \
        discovery_pb2.SNAPSHOT_DELIVERY_WHOLE
    with pytest.raises(ValueError, match="snapshot delivery"):
        SnapshotClient(["x:1"], discovery_pb2.Node(id="n"), holder, applier, delivery="sometimes")
    with pytest.raises(SystemExit) as info:
        main(["agent", "--control-plane", "127.0.0.1:9", "--snapshot-delivery", "sometimes"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["controlplane", "--delta-history", "5000"])
    assert info.value.code == 2
