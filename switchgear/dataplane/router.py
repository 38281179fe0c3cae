"""Endpoint picking. Pure: no I/O, no clock; state is one counter per service.

For now one strategy, round robin, over the endpoints not excluded (already tried, or not
usable); the scheduling issue brings filter -> score -> pick compositions here.
"""

from __future__ import annotations

from collections.abc import Collection

from switchgear.dataplane.snapshot import EndpointView, ServiceView

UNUSABLE = frozenset({"ejected", "draining"})


class RoundRobin:
    """Cycles through a service's usable endpoints in snapshot order.

    The counter is per service name and survives snapshot swaps, so a new version does not
    send the next burst of traffic to the first endpoint again.
    """

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def pick(self, service: ServiceView, exclude: Collection[str] = ()) -> EndpointView | None:
        candidates = [e for e in service.endpoints if e.id not in exclude and e.health not in UNUSABLE]
        if not candidates:
            return None
        turn = self._next.get(service.name, 0)
        self._next[service.name] = turn + 1
        return candidates[turn % len(candidates)]
