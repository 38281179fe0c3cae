"""What an operator reads about ACKs: one info line per version (not one per agent per change),
counting ACKs, NACKs, streams that ended unanswered and pushes still pending."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.conftest import ControlPlane, service
from tests.test_discovery_stream import FakeAgent, status, wait_for

LOGGER = "switchgear.controlplane.discovery"


@pytest.fixture
async def channel(control_plane: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(control_plane.address) as ch:
        yield ch


def summaries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.INFO and r.getMessage().startswith("version ")]


def counts(line: str) -> tuple[int, ...]:
    match = re.fullmatch(r"version \S+: (\d+) of (\d+) agents ACKed in [\d.]+ s \((\d+) NACKed, "
                         r"(\d+) ended or resynchronised, (\d+) pending\)", line)
    assert match, line
    return tuple(int(g) for g in match.groups())


async def test_one_line_per_version_counts_acks_and_nacks(
    control_plane: ControlPlane, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    held = control_plane.registry.register(service("chat"), "test").version
    agents = [FakeAgent(channel, f"n-{i}") for i in range(3)]
    for agent in agents:
        await agent.hello(held=held)
    await wait_for(lambda: sum(a.connected for a in control_plane.tracker.list()) == 3)
    version = control_plane.registry.register(service("chat", "http://127.0.0.1:10/v1"), "test").version
    responses = [await agent.read() for agent in agents]
    await agents[0].ack(responses[0])
    await agents[1].ack(responses[1])
    assert summaries(caplog) == []  # one push unanswered: no line yet
    await agents[2].nack(responses[2], held=held, message="unknown option")
    await wait_for(lambda: summaries(caplog) != [])
    [line] = summaries(caplog)
    assert line.startswith(f"version {version}: ") and counts(line) == (2, 3, 1, 0, 0)
    # Each agent's ACK is still there, at debug; the NACK stays a warning per agent.
    acks = [r for r in caplog.records if " ACKed " in r.getMessage() and r.getMessage().startswith("agent ")]
    assert len(acks) == 2 and {r.levelno for r in acks} == {logging.DEBUG}
    assert [r.levelno for r in caplog.records if "NACKed" in r.getMessage() and "agent n-2" in r.getMessage()] == [
        logging.WARNING]


async def test_a_newer_version_closes_the_line_of_the_pending_one_and_stale_answers_do_not_count(
    control_plane: ControlPlane, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    held = control_plane.registry.register(service("chat"), "test").version
    fast, slow, gone = (FakeAgent(channel, f"n-{i}") for i in range(3))
    for agent in (fast, slow, gone):
        await agent.hello(held=held)
    await wait_for(lambda: sum(a.connected for a in control_plane.tracker.list()) == 3)
    first = control_plane.registry.register(service("chat", "http://127.0.0.1:10/v1"), "test").version
    to_fast, to_slow, _ = await fast.read(), await slow.read(), await gone.read()
    gone.call.cancel()  # ends with its push unanswered
    await wait_for(lambda: not status(control_plane, "n-2").connected)
    await fast.ack(to_fast)
    await wait_for(lambda: status(control_plane, "n-0").acked_version == first)
    assert summaries(caplog) == []  # the slow agent has not answered
    second = control_plane.registry.register(service("chat", "http://127.0.0.1:11/v1"), "test").version
    to_fast = await fast.read()  # the first push of `second` closes `first`'s line
    assert to_fast.version_info == second
    [line] = summaries(caplog)
    assert line.startswith(f"version {first}: ") and counts(line) == (1, 3, 0, 1, 1)
    await slow.ack(to_slow)  # late: `first` was logged already, and this answer is not `second`'s
    await wait_for(lambda: status(control_plane, "n-1").acked_version == first)
    to_slow = await slow.read()
    await fast.ack(to_fast)
    await slow.ack(to_slow)
    await wait_for(lambda: len(summaries(caplog)) == 2)
    assert summaries(caplog)[1].startswith(f"version {second}: ") and counts(summaries(caplog)[1]) == (2, 2, 0, 0, 0)
