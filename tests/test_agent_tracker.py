"""AgentTracker forgets agents whose streams ended long ago, and never a connected one."""

from __future__ import annotations

import random

from switchgear.controlplane.agents import AgentTracker, NodeInfo


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def node(node_id: str) -> NodeInfo:
    return NodeInfo(id=node_id)


def test_a_gone_agent_is_listed_until_the_horizon_then_forgotten() -> None:
    clock = Clock()
    tracker = AgentTracker(clock, forget_s=600)
    tracker.connected(node("gone"), "ipv4:127.0.0.1:1", "")
    tracker.connected(node("steady"), "ipv4:127.0.0.1:2", "")
    tracker.disconnected("gone")
    clock.now += 599
    assert [(a.node.id, a.connected) for a in tracker.list()] == [("gone", False), ("steady", True)]
    clock.now += 2  # 601 s after its stream ended
    assert [a.node.id for a in tracker.list()] == ["steady"]
    clock.now += 10_000  # a connected agent is kept however long it has been quiet
    assert [a.node.id for a in tracker.list()] == ["steady"]


def test_an_agent_back_before_the_horizon_keeps_its_record() -> None:
    clock = Clock()
    tracker = AgentTracker(clock, forget_s=600)
    tracker.connected(node("a"), "p", "")
    tracker.acked("a", "1.abc")
    tracker.disconnected("a")
    clock.now += 300
    tracker.connected(node("a"), "p", "1.abc")
    clock.now += 10_000
    (status,) = tracker.list()
    assert status.connected and status.acked_version == "1.abc"


def test_connecting_prunes_too() -> None:
    """Without anyone listing, restarts (new node ids) must not grow the tracker forever."""
    clock = Clock()
    tracker = AgentTracker(clock, forget_s=600)
    for i in range(50):
        tracker.connected(node(f"restart-{i}"), "p", "")
        tracker.disconnected(f"restart-{i}")
        clock.now += 60
    assert len(tracker._agents) <= 11  # the bound is the point of the test


def test_forgetting_matches_a_scan_of_every_agent() -> None:
    """The tracker keeps its stream-less agents in the order they went quiet and looks only at the
    oldest (a connect is O(1), not a scan): over random connects, second streams, disconnects and
    time steps, the agents it lists are those a scan of all of them would keep."""
    rng = random.Random(19)
    clock = Clock()
    tracker = AgentTracker(clock, forget_s=100)
    streams: dict[str, int] = {}
    last_seen: dict[str, float] = {}
    for _ in range(3000):
        op, node_id = rng.random(), f"n{rng.randrange(40)}"
        if op < 0.4:
            tracker.connected(node(node_id), "p", "")
            streams[node_id] = streams.get(node_id, 0) + 1
            last_seen[node_id] = clock.now
        elif op < 0.8 and streams.get(node_id):
            tracker.disconnected(node_id)
            streams[node_id] -= 1
            last_seen[node_id] = clock.now
        else:
            clock.now += rng.choice((1.0, 10.0, 50.0, 99.0, 100.0, 101.0))
        if op < 0.4 or rng.random() < 0.2:  # connects prune; so does listing
            horizon = clock.now - tracker.forget_s
            for gone in [n for n, count in streams.items() if not count and last_seen[n] < horizon]:
                del streams[gone], last_seen[gone]
            if op >= 0.4:
                listed = {a.node.id: a.connected for a in tracker.list()}
                assert listed == {n: count > 0 for n, count in streams.items()}
    assert set(tracker._agents) == set(streams)
