"""`switchgear admin apply|register --wait`: wait until every connected agent answered a version.

After the change is committed the command polls ListAgents until each connected agent has
answered the change's version — ACKed it (or a later version, which includes it) or NACKed
it — or `--wait-timeout` passes, then prints one line per agent and, below an ACK, each
service that agent did not apply (version skew: it serves its last good definition instead).

Exit status: 0 when every connected agent ACKed and applied every service; 1 on any NACK, any
rejected service or the timeout. With no agent connected there is nothing to wait for (0).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from switchgear.controlplane.snapshot import version_seq
from switchgear.v1 import admin_pb2

POLL_S = 0.2


@dataclass(frozen=True)
class Answer:
    """One agent's answer to a version: "ACK", "NACK" or "" (none yet); `lines` say the detail."""

    node_id: str
    verdict: str
    lines: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.verdict == "ACK" and len(self.lines) == 1


def answer(agent: admin_pb2.AgentStatus, version: str) -> Answer:
    """What `agent` answered to `version` (pure)."""
    wanted = version_seq(version)
    acked, nacked = agent.acked_version, agent.nacked_version
    node = agent.node.id
    if acked == version or version_seq(acked) > wanted:
        rejected = tuple(
            f"  did not apply service {r.service!r}: {r.error_detail.field_path}: {r.error_detail.message}"
            for r in agent.rejected_services
        )
        return Answer(node, "ACK", (f"{node}  ACK  {acked}", *rejected))
    if nacked == version or version_seq(nacked) > wanted:
        nack = agent.last_nack
        return Answer(node, "NACK", (f"{node}  NACK {nacked}: {nack.field_path}: {nack.message} (serves {acked})",))
    return Answer(node, "", (f"{node}  no answer yet (serves {acked or 'nothing'})",))


def answers(reply: admin_pb2.ListAgentsResponse, version: str) -> list[Answer]:
    return [answer(a, version) for a in reply.agents if a.connected]


def wait(
    list_agents: Callable[[], admin_pb2.ListAgentsResponse], version: str, timeout_s: float,
    *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> tuple[int, list[str]]:
    """Poll until every connected agent answered `version` or `timeout_s` passed; the exit
    status and the lines to print."""
    deadline = clock() + timeout_s
    while True:
        current = answers(list_agents(), version)
        if all(a.verdict for a in current) or clock() >= deadline:
            return _report(current, version, timeout_s)
        sleep(min(POLL_S, max(0.0, deadline - clock())))


def _report(current: Sequence[Answer], version: str, timeout_s: float) -> tuple[int, list[str]]:
    if not current:
        return 0, [f"version {version}: no agent is connected; nothing to wait for"]
    late = [a for a in current if not a.verdict]
    head = f"version {version}: {len(current) - len(late)} of {len(current)} agent(s) answered"
    lines = [head + (f"; gave up after {timeout_s:g} s" if late else "")]
    lines.extend(line for a in current for line in a.lines)
    return (0 if all(a.ok for a in current) else 1), lines
