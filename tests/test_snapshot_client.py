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


def response(version: str, options_json: str = "{}") -> discovery_pb2.StreamSnapshotsResponse:
    service = common_pb2.Service(
        name="chat", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", options_json=options_json,
        endpoints=[common_pb2.Endpoint(id="a", url="http://127.0.0.1:9/v1", weight=1)],
    )
    return discovery_pb2.StreamSnapshotsResponse(
        version_info=version, nonce=f"n-{version}", snapshot=discovery_pb2.Snapshot(version=version, services=[service])
    )


def client(holder: Holder, applied: list[str]) -> SnapshotClient:
    applier = Applier(holder, builtin_adapters(), lambda s: applied.append(s.version))
    return SnapshotClient(["127.0.0.1:9"], discovery_pb2.Node(id="n"), holder, applier)


def test_good_snapshot_is_swapped_in_and_acked() -> None:
    holder, applied = Holder(), []
    answer = client(holder, applied)._answer(response("1.a"))
    assert answer.version_info == "1.a" and answer.response_nonce == "n-1.a"
    assert not answer.HasField("error_detail")
    assert holder.version == "1.a" and applied == ["1.a"]


def test_bad_snapshot_is_nacked_and_the_old_one_kept() -> None:
    holder, applied = Holder(), []
    c = client(holder, applied)
    c._answer(response("1.a"))
    kept = holder.current
    answer = c._answer(response("2.b", options_json='{"nope": true}'))
    assert answer.version_info == "1.a"  # a NACK carries the version still held
    assert answer.response_nonce == "n-2.b"
    assert answer.error_detail.field_path == "services[chat].options_json.nope"
    assert holder.current is kept and applied == ["1.a"]
