"""The agent's end of the snapshot stream: subscribe, validate, swap, ACK or NACK; reconnect.

Static stability: losing the control plane changes nothing in what the agent serves — with
one bound, the config's `service_discovery.cache_ttl`: once cut off from every control plane
that long, the agent stops applying its last snapshot's health verdicts (degraded, ejected:
facts only a live control plane keeps true) and lets its own breakers and outlier detection
judge the endpoints (snapshot.py::without_health_verdicts). The client reconnects with
full-jitter exponential backoff, rotating through the control-plane addresses it was given,
and on every new stream says which version it holds, so an unchanged control plane sends
nothing (after health verdicts expired, the version it holds is one no control plane sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from switchgear.adapters.base import Adapter
from switchgear.dataplane.convert import Converted, Rejection, SnapshotError, convert_delta, convert_snapshot
from switchgear.dataplane.convert_governance import governance_from_proto
from switchgear.dataplane.snapshot import AgentSnapshot, Holder, without_health_verdicts
from switchgear.tls import ClientTls, aio_channel
from switchgear.v1 import discovery_pb2, discovery_pb2_grpc
from switchgear.wire.reconnect import RECONNECT_MAX_S

log = logging.getLogger("switchgear.dataplane.client")

#: Where agents may take the agent token from when no --agent-token-file is given.
AGENT_TOKEN_ENV = "SWITCHGEAR_AGENT_TOKEN"

CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

#: --snapshot-delivery: how the agent asks for snapshots (discovery.proto): "delta", what changed
#: since the version held when the control plane still knows it (else whole); "whole", always all.
DELIVERIES = {"delta": discovery_pb2.SNAPSHOT_DELIVERY_DELTA, "whole": discovery_pb2.SNAPSHOT_DELIVERY_WHOLE}

#: Response header of the snapshot stream: the token this node's load reports carry (the control
#: plane's agent_auth.py: reports are bound to the node's own snapshot stream).
REPORT_TOKEN_HEADER = "switchgear-report-token"


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the agent token (none without one: mTLS, or agent auth off).
    Passed on each call rather than by a channel interceptor: grpc.aio's intercepted
    stream-stream calls can hang when the connection fails under them."""
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class StreamSession:
    """The snapshot stream open now: where, and the report token it was issued."""

    address: str
    report_token: str


class Backoff:
    """Full-jitter exponential backoff: the n-th delay is uniform in [0, min(cap, base * 2**n)].

    Jitter spreads reconnecting agents so a restarted control plane is not hit by all at once.
    """

    def __init__(self, base_s: float = 0.2, cap_s: float = RECONNECT_MAX_S, rng: random.Random | None = None) -> None:
        self._base = base_s
        self._cap = cap_s
        self._rng = rng or random.Random()
        self._attempt = 0

    def next(self) -> float:
        ceiling = min(self._cap, self._base * (2 ** min(self._attempt, 30)))
        self._attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self._attempt = 0


class Applier:
    """Turns a snapshot message (whole, or a delta onto the one held) into the agent's view and
    swaps it in, or reports why not.

    Per service (see convert.convert_snapshot): `rejections` lists the services of the version
    held that were not applied; the ACK, a NACK and a reconnect's first request all carry them.
    A delta applies only onto the snapshot this applier made last (convert.convert_delta); after
    any other swap (expired health verdicts) it is refused at "base_version", which asks the
    control plane for the whole snapshot.
    """

    def __init__(
        self,
        holder: Holder,
        adapters: Mapping[str, Adapter],
        on_applied: Callable[[AgentSnapshot], None] = lambda s: None,
    ) -> None:
        self._holder = holder
        self._adapters = adapters
        self._on_applied = on_applied
        self._held: Converted | None = None  # what the last apply made: a delta's base
        self.rejections: tuple[Rejection, ...] = ()

    def apply(self, response: discovery_pb2.StreamSnapshotsResponse) -> SnapshotError | None:
        held = self._holder.current
        try:
            if response.HasField("delta"):
                converted = self._delta(response.delta, response.version_info)
                governance = (governance_from_proto(response.delta.governance.tenants, response.delta.governance.keys)
                              if response.delta.HasField("governance") else converted.snapshot.governance)
            else:
                converted = convert_snapshot(
                    response.snapshot, response.version_info, self._adapters, held.services if held else {})
                governance = governance_from_proto(response.snapshot.tenants, response.snapshot.keys)
        except SnapshotError as exc:
            return exc
        new = dataclasses.replace(converted.snapshot, governance=governance)
        for rejection in converted.rejections:
            log.warning("snapshot %s: service %r not applied (%s)", new.version, rejection.service, rejection.error)
        self.rejections = converted.rejections
        self.swap(new)
        self._held = dataclasses.replace(converted, snapshot=new)
        return None

    def _delta(self, delta: discovery_pb2.SnapshotDelta, version: str) -> Converted:
        base, held = self._holder.current, self._held
        if base is None or held is None:
            raise SnapshotError("base_version", "a delta, but this agent holds no snapshot")
        return convert_delta(delta, version, self._adapters, base, held)

    def swap(self, new: AgentSnapshot) -> None:
        """Make `new` what requests see, and tell the agent's routing and resilience."""
        self._holder.current = new  # the one assignment that changes what requests see
        self._on_applied(new)


class SnapshotClient:
    def __init__(
        self,
        addresses: Sequence[str],
        node: discovery_pb2.Node,
        holder: Holder,
        applier: Applier,
        *,
        backoff: Backoff | None = None,
        stable_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        tls: ClientTls | None = None,
        token: str | None = None,
        delivery: str = "delta",
    ) -> None:
        if not addresses:
            raise ValueError("at least one control-plane address is required")
        if delivery not in DELIVERIES:
            raise ValueError(f"snapshot delivery must be one of {', '.join(DELIVERIES)}, not {delivery!r}")
        self._delivery = DELIVERIES[delivery]
        self._addresses = list(addresses)
        self._tls = tls
        self._token = token  # the agent token, sent on every call (None: mTLS or no agent auth)
        self.session: StreamSession | None = None
        self._node = node
        self._holder = holder
        self._applier = applier
        self._backoff = backoff or Backoff()
        self._stable_after_s = stable_after_s
        self._clock = clock
        self.connected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a stream open to some control plane until `stop` is set."""
        turn = 0
        cut_off_since: float | None = None  # when the last stream ended (None: never had one)
        while not stop.is_set():
            self._expire_health(cut_off_since)
            address = self._addresses[turn % len(self._addresses)]
            started = self._clock()
            try:
                await self._session(address, stop)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    log.error("control plane %s refused this agent's credential: set --agent-token-file or $%s "
                              "to its agent token (<db>.agent-token), or a client certificate (--tls-cert)",
                              address, AGENT_TOKEN_ENV)
                else:
                    log.warning("snapshot stream to %s ended: %s %s", address, exc.code().name, exc.details())
            finally:
                if self.connected.is_set() or cut_off_since is None:
                    cut_off_since = self._clock()
                self.session = None
                self.connected.clear()
            if self._clock() - started >= self._stable_after_s:
                self._backoff.reset()
            turn += 1
            delay = self._backoff.next()
            log.info("reconnecting in %.2f s (holding version %r)", delay, self._holder.version)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    def _expire_health(self, cut_off_since: float | None) -> None:
        """The cache_ttl rule (module docstring), checked before each reconnection attempt."""
        current = self._holder.current
        ttl = current.settings.discovery_cache_ttl_s if current is not None else 0.0
        if current is None or not ttl or cut_off_since is None or self._clock() - cut_off_since < ttl:
            return
        expired = without_health_verdicts(current)
        if expired.services != current.services:
            log.warning("cut off from the control plane for %.0f s (service_discovery.cache_ttl %g s): its "
                        "health verdicts no longer apply", self._clock() - cut_off_since, ttl)
            self._applier.swap(expired)

    async def _session(self, address: str, stop: asyncio.Event) -> None:
        async with aio_channel(address, self._tls, CHANNEL_OPTIONS) as channel:
            call = discovery_pb2_grpc.DiscoveryServiceStub(channel).StreamSnapshots(metadata=bearer(self._token))
            await call.write(discovery_pb2.StreamSnapshotsRequest(
                node=self._node, version_info=self._holder.version, rejected_services=self._rejected(),
                delivery=self._delivery))
            headers = dict(await call.initial_metadata() or ())
            if headers.get(REPORT_TOKEN_HEADER):  # absent when the call was refused
                self.session = StreamSession(address, str(headers[REPORT_TOKEN_HEADER]))
            self.connected.set()
            log.info("subscribed to %s holding version %r", address, self._holder.version)
            stopping = asyncio.ensure_future(stop.wait())
            try:
                while True:
                    read = asyncio.ensure_future(call.read())
                    done, _ = await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    if stopping in done:
                        read.cancel()
                        call.cancel()
                        return
                    response = read.result()
                    if response is grpc.aio.EOF:
                        return
                    self._backoff.reset()
                    await call.write(self._answer(response))
            finally:
                stopping.cancel()

    def _answer(self, response: discovery_pb2.StreamSnapshotsResponse) -> discovery_pb2.StreamSnapshotsRequest:
        error = self._applier.apply(response)
        if error is None:
            log.info("applied snapshot %s (%s)", response.version_info,
                     f"delta onto {response.delta.base_version}" if response.HasField("delta") else "whole")
            return discovery_pb2.StreamSnapshotsRequest(
                version_info=response.version_info, response_nonce=response.nonce,
                rejected_services=self._rejected(),
            )
        log.warning("rejected snapshot %s: %s", response.version_info, error)
        return discovery_pb2.StreamSnapshotsRequest(
            version_info=self._holder.version,
            response_nonce=response.nonce,
            error_detail=discovery_pb2.NackDetail(field_path=error.path, message=error.message),
            rejected_services=self._rejected(),
        )

    def _rejected(self) -> list[discovery_pb2.ServiceRejection]:
        """The services of the version held that were not applied, as the wire says them."""
        return [
            discovery_pb2.ServiceRejection(service=r.service, error_detail=discovery_pb2.NackDetail(
                field_path=r.error.path, message=r.error.message))
            for r in self._applier.rejections
        ]
