"""What the control plane knows of each connected agent: versions sent, ACKed and NACKed, and
the services of the version it holds that it did not apply (per-service rejections).

Plain in-memory bookkeeping, driven by the discovery stream; not persisted (agents reconnect
and say what they hold). Versions an agent NACKed are remembered per node across its streams
so a reconnect never makes the control plane resend a rejected version.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeInfo:
    id: str
    zone: str = ""
    build_version: str = ""
    protocols: tuple[str, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Nack:
    version: str  # the version the agent rejected
    field_path: str
    message: str


@dataclass(frozen=True)
class Rejection:
    """A service of the version an agent holds that the agent did not apply (version skew)."""

    service: str
    field_path: str
    message: str


@dataclass(frozen=True)
class AgentStatus:
    node: NodeInfo
    connected: bool
    peer: str
    acked_version: str
    nacked_version: str
    last_nack: Nack | None
    pending_version: str
    connected_at: float
    last_seen: float
    replica: str = ""  # which control-plane replica the stream is on (replicas only)
    rejections: tuple[Rejection, ...] = ()  # of acked_version
    delivery: str = ""  # "delta" or "whole": how its stream asked for snapshots


@dataclass
class _Agent:
    node: NodeInfo
    peer: str = ""
    streams: int = 0
    acked: str = ""
    pending: str = ""
    last_nack: Nack | None = None
    rejected: set[str] = field(default_factory=set)
    rejections: tuple[Rejection, ...] = ()
    connected_at: float = 0.0
    last_seen: float = 0.0
    delivery: str = ""


class AgentTracker:
    """Per-node stream state. Times are wall-clock seconds from `clock`. An agent whose streams
    all ended more than `forget_s` ago is dropped (restarted agents come back under new node
    ids, so without this the tracker and ListAgents grow with every restart); the fleet view
    (replicas.py) uses the same horizon."""

    def __init__(self, clock: Callable[[], float] = time.time, forget_s: float = 600.0) -> None:
        self._clock = clock
        self.forget_s = forget_s
        self._agents: dict[str, _Agent] = {}
        # Agents without an open stream, in the order their last stream ended: forgetting looks at
        # the oldest only, so a connect costs O(1) rather than a scan of every agent (10,000 agents
        # reconnecting to a restarted control plane made that ~5 x 10^7 steps).
        self._gone: OrderedDict[str, None] = OrderedDict()

    def connected(
        self, node: NodeInfo, peer: str, held_version: str, rejections: tuple[Rejection, ...] = (),
        delivery: str = "whole",
    ) -> None:
        self._forget_gone()
        self._gone.pop(node.id, None)
        agent = self._agents.setdefault(node.id, _Agent(node=node))
        agent.node, agent.peer, agent.pending = node, peer, ""
        agent.streams += 1
        agent.acked, agent.rejections, agent.delivery = held_version, rejections, delivery
        agent.connected_at = agent.last_seen = self._clock()

    def disconnected(self, node_id: str) -> None:
        agent = self._agents[node_id]
        agent.streams = max(0, agent.streams - 1)
        agent.pending = ""
        agent.last_seen = self._clock()
        if not agent.streams:
            self._gone[node_id] = None

    def sent(self, node_id: str, version: str) -> None:
        self._agents[node_id].pending = version

    def acked(self, node_id: str, version: str, rejections: tuple[Rejection, ...] = ()) -> None:
        """The agent applied `version`, all of it but `rejections`."""
        agent = self._touch(node_id)
        agent.acked, agent.pending, agent.rejections = version, "", rejections

    def nacked(self, node_id: str, held: str, nack: Nack, rejections: tuple[Rejection, ...] = ()) -> None:
        """The agent refused `nack.version` whole and still holds `held` (less `rejections`)."""
        agent = self._touch(node_id)
        agent.acked, agent.pending, agent.last_nack, agent.rejections = held, "", nack, rejections
        agent.rejected.add(nack.version)

    def rejected(self, node_id: str, version: str) -> bool:
        return version in self._agents[node_id].rejected

    def list(self) -> list[AgentStatus]:
        self._forget_gone()
        return [self._status(a) for a in sorted(self._agents.values(), key=lambda a: a.node.id)]

    def _forget_gone(self) -> None:
        horizon = self._clock() - self.forget_s
        while self._gone:
            node_id = next(iter(self._gone))
            agent = self._agents[node_id]
            if agent.last_seen >= horizon:  # the oldest to end is not due: none after it is
                return
            del self._gone[node_id], self._agents[node_id]

    def _touch(self, node_id: str) -> _Agent:
        agent = self._agents[node_id]
        agent.last_seen = self._clock()
        return agent

    @staticmethod
    def _status(agent: _Agent) -> AgentStatus:
        return AgentStatus(
            node=agent.node,
            connected=agent.streams > 0,
            peer=agent.peer,
            acked_version=agent.acked,
            nacked_version=agent.last_nack.version if agent.last_nack else "",
            last_nack=agent.last_nack,
            pending_version=agent.pending,
            connected_at=agent.connected_at,
            last_seen=agent.last_seen,
            rejections=agent.rejections,
            delivery=agent.delivery,
        )
