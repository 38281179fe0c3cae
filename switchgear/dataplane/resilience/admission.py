"""Admission control: per-endpoint concurrency, a per-service priority queue, shedding. Pure.

Every mutating call takes `now` and returns `Effects`: the requests granted a slot and the
requests shed by that call (the caller's own request included), so an I/O edge
(`admission_edge`) only has to wake the right waiters. Nothing here sleeps or schedules.

Rules:

- A request for endpoint E is granted at once when `in_flight(E) < limit(E)` (limit 0 = no
  limit). Waiters for E exist only while E is full, so a newcomer never overtakes them.
- Otherwise it waits in its service's queue, ordered by priority (higher first), then
  arrival. A released slot of E goes to the first waiter for E in that order.
- The queue holds at most `max_queue_size` waiters (0 = unbounded). When it is full the
  LOWEST priority loses: the newcomer if its priority is <= the lowest queued one (on a tie
  the newer request loses), else the lowest queued waiter (newest among equals) is shed
  with QUEUE_FULL and the newcomer takes its place.
- A waiter leaves, shed, at min(deadline, arrival + queue_timeout_s) (DEADLINE or
  QUEUE_TIMEOUT); `expire(now)` does it, and every call runs it first.

Retry-After hint for a shed request, from recent service times of the service:

    hint = clamp(ewma_service_s * (queued + 1) / capacity, min_retry_after_s, max_retry_after_s)

where `ewma_service_s` is an EWMA (weight `ewma_alpha`) of slot hold times (s) and
`capacity` the sum of the service's endpoint limits (1 when none are set);
`default_retry_after_s` before any slot has been released.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from switchgear.wire.lean import lean


class ShedReason(str, Enum):
    QUEUE_FULL = "queue_full"
    DEADLINE = "deadline"
    QUEUE_TIMEOUT = "queue_timeout"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class AdmissionSettings:
    queue_timeout_s: float = 0.0  # 0 = a waiter is bounded by its deadline only
    ewma_alpha: float = 0.2
    default_retry_after_s: float = 1.0
    min_retry_after_s: float = 0.1
    max_retry_after_s: float = 30.0


@lean
@dataclass(frozen=True)
class Grant:
    id: int
    service: str
    endpoint: str
    at: float


@dataclass(frozen=True)
class Rejection:
    id: int
    service: str
    endpoint: str
    priority: int
    reason: ShedReason
    retry_after_s: float


@dataclass(frozen=True)
class Effects:
    granted: tuple[Grant, ...] = ()
    shed: tuple[Rejection, ...] = ()

    def __add__(self, other: Effects) -> Effects:
        if not (other.granted or other.shed):
            return self
        if not (self.granted or self.shed):
            return other
        return Effects(self.granted + other.granted, self.shed + other.shed)


NOTHING = Effects()  # the usual outcome of expire() and of a release nobody waits for


@dataclass(frozen=True)
class Waiter:
    id: int
    service: str
    endpoint: str
    priority: int
    arrival: float
    expires_at: float
    expiry_reason: ShedReason

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: higher priority first, then earlier arrival (ids grow with arrival)."""
        return (-self.priority, self.id)


@dataclass
class _Service:
    max_queue_size: int = 0
    limits: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    queue: list[Waiter] = field(default_factory=list)  # sorted by Waiter.order
    ewma_service_s: float | None = None

    def has_room(self, endpoint: str) -> bool:
        limit = self.limits.get(endpoint, 0)
        return limit <= 0 or self.in_flight.get(endpoint, 0) < limit

    def capacity(self) -> int:
        return max(1, sum(v for v in self.limits.values() if v > 0))


class AdmissionCore:
    """All services' admission state. Not thread-safe (event-loop use)."""

    def __init__(self, settings: AdmissionSettings = AdmissionSettings()) -> None:
        self.settings = settings
        self._services: dict[str, _Service] = {}
        self._granted: dict[int, Grant] = {}
        self._ids = itertools.count(1)

    # --- configuration -------------------------------------------------------------------

    def configure(self, now: float, service: str, max_queue_size: int, limits: Mapping[str, int]) -> Effects:
        """Set a service's queue bound and per-endpoint limits (0 = unlimited); a raised limit
        admits waiters at once. In-flight counts are kept."""
        svc = self._svc(service)
        svc.max_queue_size = max(0, max_queue_size)
        svc.limits = dict(limits)
        effects = Effects()
        for endpoint in {w.endpoint for w in svc.queue}:
            effects += self._grant_waiters(now, svc, endpoint)
        return effects

    def new_id(self) -> int:
        return next(self._ids)

    # --- reading -------------------------------------------------------------------------

    def in_flight(self, service: str, endpoint: str) -> int:
        return self._svc(service).in_flight.get(endpoint, 0)

    def has_room(self, service: str, endpoint: str) -> bool:
        """Whether a request for `endpoint` would be granted at once (a scheduler hint)."""
        return self._svc(service).has_room(endpoint)

    def queued(self, service: str) -> tuple[Waiter, ...]:
        return tuple(self._svc(service).queue)

    def queue_length(self, service: str) -> int:
        """len(queued(service)) without the copy (read on every grant and release)."""
        return len(self._svc(service).queue)

    def waiter(self, service: str, request_id: int) -> Waiter | None:
        return next((w for w in self._svc(service).queue if w.id == request_id), None)

    def retry_after_s(self, service: str) -> float:
        """The Retry-After hint for a request shed from `service` (module docstring)."""
        svc = self._svc(service)
        s = self.settings
        if svc.ewma_service_s is None:
            return s.default_retry_after_s
        hint = svc.ewma_service_s * (len(svc.queue) + 1) / svc.capacity()
        return min(s.max_retry_after_s, max(s.min_retry_after_s, hint))

    # --- acting --------------------------------------------------------------------------

    def request(self, now: float, request_id: int, service: str, endpoint: str, priority: int,
                deadline: float) -> Effects:
        """Ask for a slot on `endpoint`. The result names `request_id` in `granted` or `shed`,
        or in neither: then it is queued until a later call's effects name it."""
        effects = self.expire(now)
        svc = self._svc(service)
        if deadline <= now:
            return effects + self._reject(svc, service, endpoint, request_id, priority, ShedReason.DEADLINE)
        if svc.has_room(endpoint) and not (svc.queue and any(w.endpoint == endpoint for w in svc.queue)):
            return effects + Effects(granted=(self._grant(now, svc, service, endpoint, request_id),))
        timeout = self.settings.queue_timeout_s
        by_timeout = timeout > 0 and now + timeout < deadline
        waiter = Waiter(request_id, service, endpoint, priority, now,
                        now + timeout if by_timeout else deadline,
                        ShedReason.QUEUE_TIMEOUT if by_timeout else ShedReason.DEADLINE)
        return effects + self._enqueue(svc, waiter)

    def release(self, now: float, request_id: int) -> Effects:
        """Give back a granted slot; the freed capacity goes to the best waiter for it."""
        grant = self._granted.pop(request_id, None)
        if grant is None:
            return self.expire(now)
        svc = self._svc(grant.service)
        svc.in_flight[grant.endpoint] -= 1
        held = max(0.0, now - grant.at)
        a = self.settings.ewma_alpha
        svc.ewma_service_s = held if svc.ewma_service_s is None else a * held + (1 - a) * svc.ewma_service_s
        return self.expire(now) + self._grant_waiters(now, svc, grant.endpoint)

    def cancel(self, now: float, service: str, request_id: int, reason: ShedReason = ShedReason.CANCELLED) -> Effects:
        """Take a waiter out of the queue (it gave up or timed out at the edge). The effects
        name it as shed with `reason` if it was still queued; otherwise nothing changes."""
        svc = self._svc(service)
        waiter = next((w for w in svc.queue if w.id == request_id), None)
        if waiter is None:
            return Effects()
        svc.queue.remove(waiter)
        return Effects(shed=(self._rejection(svc, waiter, reason),))

    def expire(self, now: float) -> Effects:
        """Shed every waiter whose time ran out."""
        shed: list[Rejection] = []
        for svc in self._services.values():
            if not svc.queue:
                continue
            late = [w for w in svc.queue if w.expires_at <= now]
            for w in late:
                svc.queue.remove(w)
                shed.append(self._rejection(svc, w, w.expiry_reason))
        return Effects(shed=tuple(shed)) if shed else NOTHING

    # --- internals -----------------------------------------------------------------------

    def _svc(self, service: str) -> _Service:
        svc = self._services.get(service)
        if svc is None:
            svc = self._services[service] = _Service()
        return svc

    def _grant(self, now: float, svc: _Service, service: str, endpoint: str, request_id: int) -> Grant:
        svc.in_flight[endpoint] = svc.in_flight.get(endpoint, 0) + 1
        grant = self._granted[request_id] = Grant(request_id, service, endpoint, now)
        return grant

    def _grant_waiters(self, now: float, svc: _Service, endpoint: str) -> Effects:
        if not svc.queue:
            return NOTHING
        granted: list[Grant] = []
        while svc.has_room(endpoint):
            waiter = next((w for w in svc.queue if w.endpoint == endpoint), None)
            if waiter is None:
                break
            svc.queue.remove(waiter)
            granted.append(self._grant(now, svc, waiter.service, endpoint, waiter.id))
        return Effects(granted=tuple(granted))

    def _enqueue(self, svc: _Service, waiter: Waiter) -> Effects:
        if 0 < svc.max_queue_size <= len(svc.queue):
            lowest = svc.queue[-1]
            if waiter.priority <= lowest.priority:
                return Effects(shed=(self._rejection(svc, waiter, ShedReason.QUEUE_FULL),))
            svc.queue.pop()
            evicted = self._rejection(svc, lowest, ShedReason.QUEUE_FULL)
            bisect.insort(svc.queue, waiter, key=lambda w: w.order)
            return Effects(shed=(evicted,))
        bisect.insort(svc.queue, waiter, key=lambda w: w.order)
        return Effects()

    def _reject(self, svc: _Service, service: str, endpoint: str, request_id: int, priority: int,
                reason: ShedReason) -> Effects:
        waiter = Waiter(request_id, service, endpoint, priority, 0.0, 0.0, reason)
        return Effects(shed=(self._rejection(svc, waiter, reason),))

    def _rejection(self, svc: _Service, waiter: Waiter, reason: ShedReason) -> Rejection:
        return Rejection(waiter.id, waiter.service, waiter.endpoint, waiter.priority, reason,
                         self.retry_after_s(waiter.service))
