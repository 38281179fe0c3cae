"""The agent's snapshot client: backoff arithmetic and how it answers snapshots."""

from __future__ import annotations

import random

from switchgear.adapters import builtin_adapters
from switchgear.dataplane.client import Applier, Backoff, SnapshotClient
from switchgear.dataplane.snapshot import Holder
from switchgear.v1 import common_pb2, discovery_pb2


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    backoff = Backoff(base_s=0.1, cap_s=2.0, rng=random.Random(7))
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    for ceiling in ceilings:
        delay = backoff.next()
        assert 0.0 <= delay <= ceiling
    backoff.reset()
    assert backoff.next() <= 0.1


def test_backoff_spreads_agents_apart() -> None:
    delays = {round(Backoff(base_s=1.0, cap_s=8.0, rng=random.Random(seed)).next(), 6) for seed in range(50)}
    assert len(delays) == 50  # jitter: no two agents reconnect in lockstep


def wire(name: str = "chat", options_json: str = "{}", **fields: object) -> common_pb2.Service:
    return common_pb2.Service(
        name=name, category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", options_json=options_json,
        endpoints=[common_pb2.Endpoint(id="a", url="http://127.0.0.1:9/v1", weight=1)], **fields,  # type: ignore[arg-type]
    )


def response(
    version: str, options_json: str = "{}", *more: common_pb2.Service, timeout_s: int = 0
) -> discovery_pb2.StreamSnapshotsResponse:
    snap = discovery_pb2.Snapshot(version=version, services=[wire("chat", options_json), *more])
    snap.settings.default_timeout.seconds = timeout_s
    return discovery_pb2.StreamSnapshotsResponse(version_info=version, nonce=f"n-{version}", snapshot=snap)


def client(holder: Holder, applied: list[str]) -> SnapshotClient:
    applier = Applier(holder, builtin_adapters(), lambda s: applied.append(s.version))
    return SnapshotClient(["127.0.0.1:9"], discovery_pb2.Node(id="n"), holder, applier)


def test_good_snapshot_is_swapped_in_and_acked() -> None:
    holder, applied = Holder(), []
    answer = client(holder, applied)._answer(response("1.a"))
    assert answer.version_info == "1.a" and answer.response_nonce == "n-1.a"
    assert not answer.HasField("error_detail") and not answer.rejected_services
    assert holder.version == "1.a" and applied == ["1.a"]


def test_a_service_the_agent_cannot_take_is_reported_in_the_ack_and_its_last_good_definition_kept() -> None:
    holder, applied = Holder(), []
    c = client(holder, applied)
    c._answer(response("1.a"))
    kept = holder.current.services["chat"]  # type: ignore[union-attr]
    answer = c._answer(response("2.b", '{"nope": true}', wire("other")))
    assert answer.version_info == "2.b" and not answer.HasField("error_detail")  # an ACK: per service
    assert [(r.service, r.error_detail.field_path) for r in answer.rejected_services] == [
        ("chat", "services[chat].options_json.nope")]
    assert "unknown option" in answer.rejected_services[0].error_detail.message
    assert holder.version == "2.b" and applied == ["1.a", "2.b"]
    assert holder.current is not None and holder.current.services["chat"] is kept  # the last good one
    assert "other" in holder.current.services  # the rest of the snapshot is applied

    fixed = c._answer(response("3.c", "{}"))
    assert fixed.version_info == "3.c" and not fixed.rejected_services


def test_a_new_service_the_agent_cannot_take_is_left_out_and_the_rest_applied() -> None:
    holder, applied = Holder(), []
    c = client(holder, applied)
    answer = c._answer(response("1.a", "{}", wire("bad", '{"nope": 1}'), wire("good")))
    assert [r.service for r in answer.rejected_services] == ["bad"]
    assert holder.current is not None and sorted(holder.current.services) == ["chat", "good", "llm"]  # llm: a route


def test_settings_the_agent_cannot_take_are_nacked_whole_and_the_old_snapshot_kept() -> None:
    holder, applied = Holder(), []
    c = client(holder, applied)
    c._answer(response("1.a", "{}", wire("bad", '{"nope": 1}')))
    kept = holder.current
    answer = c._answer(response("2.b", timeout_s=99_999))
    assert answer.version_info == "1.a"  # a NACK carries the version still held ...
    assert answer.response_nonce == "n-2.b"
    assert answer.error_detail.field_path == "settings.default_timeout"
    assert [r.service for r in answer.rejected_services] == ["bad"]  # ... and what it left out of it
    assert holder.current is kept and applied == ["1.a"]
