"""Endpoint picking for the agent: the request path's edge to the scheduling core.

`Router.pick(service, exclude, call, settings)` turns the service into candidates (cached per
ServiceView, so once per snapshot), the call into a scheduling `Request` (token estimate,
priority, user type), chooses the strategy and bounds by policy precedence (see
scheduling/policy.py) and asks the `Scheduler`. Stats and picker state are keyed by service
and endpoint names, so a snapshot swap keeps them for endpoints that persist.

Without a call (a caller that only has the service) the request is a priority-5 request of the
service's category; without settings, the holder's current snapshot's settings are used.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection

from switchgear.dataplane.convert import Call
from switchgear.dataplane.scheduling import Scheduler
from switchgear.dataplane.scheduling.model import (
    Bounds,
    Candidate,
    Request,
    asked_output,
    candidate_key,
    candidates_of,
    estimate_tokens,
)
from switchgear.dataplane.scheduling.policy import HIGH_PRIORITY, bounds_for, choose_strategy
from switchgear.dataplane.scheduling.stats import LiveStats
from switchgear.dataplane.snapshot import AgentSettings, EndpointView, Holder, ServiceView

UNUSABLE = frozenset({"ejected", "draining"})
_CACHE_LIMIT = 512


class Router:
    """Picks an endpoint of a service for a call. Not thread-safe: one event loop."""

    def __init__(
        self,
        stats: LiveStats | None = None,
        rng: random.Random | None = None,
        unavailable: Collection[str] | Callable[[str], bool] = (),
        holder: Holder | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats or LiveStats(clock)
        self.scheduler = Scheduler(self.stats, rng or random.Random(), unavailable)
        self._holder = holder
        self._views: dict[int, tuple[ServiceView, tuple[Candidate, ...], dict[str, EndpointView]]] = {}
        # (id of the service view, a high-priority call?) -> (the view, the settings, strategy, bounds)
        self._policies: dict[tuple[int, bool], tuple[ServiceView, AgentSettings, str, Bounds]] = {}

    def strategy_for(self, service: ServiceView, call: Call | None, settings: AgentSettings) -> str:
        return choose_strategy(
            service_strategy=service.strategy,
            category=service.category,
            priority=call.priority if call else 5,
            policies=settings.category_policies,
            default_strategy=settings.default_strategy,
            known=self.scheduler.strategies,
        )

    def pick(
        self,
        service: ServiceView,
        exclude: Collection[str] = (),
        call: Call | None = None,
        settings: AgentSettings | None = None,
    ) -> EndpointView | None:
        """The endpoint to try next, or None. `exclude`: endpoint ids already tried."""
        if settings is None:
            current = self._holder.current if self._holder else None
            settings = current.settings if current else AgentSettings()
        candidates, by_id = self._candidates(service)
        strategy, bounds = self._policy(service, call, settings)
        chosen = self.scheduler.pick(
            candidates,
            self._request(service, call),
            strategy,
            group=service.name,
            bounds=bounds,
            exclude=[candidate_key(service.name, e) for e in exclude],
        )
        return by_id[chosen.endpoint] if chosen else None

    def _policy(self, service: ServiceView, call: Call | None, settings: AgentSettings) -> tuple[str, Bounds]:
        """`strategy_for` and the category's bounds, worked out once per service view, settings
        and side of the priority rule (policy.HIGH_PRIORITY), not per call."""
        high = call is not None and call.priority > HIGH_PRIORITY
        key = (id(service), high)
        entry = self._policies.get(key)
        if entry is None or entry[0] is not service or entry[1] is not settings:
            if len(self._policies) >= _CACHE_LIMIT:
                self._policies.clear()
            entry = (service, settings, self.strategy_for(service, call, settings),
                     bounds_for(service.category, settings.category_policies))
            self._policies[key] = entry
        return entry[2], entry[3]

    def retain(self, services: Collection[ServiceView]) -> None:
        """Forget stats of endpoints no longer in any service (call after a snapshot swap)."""
        self.stats.retain({candidate_key(s.name, e.id) for s in services for e in s.endpoints})

    def _candidates(self, service: ServiceView) -> tuple[tuple[Candidate, ...], dict[str, EndpointView]]:
        entry = self._views.get(id(service))
        if entry is None or entry[0] is not service:
            if len(self._views) >= _CACHE_LIMIT:
                self._views.clear()
            entry = (service, candidates_of(service), {e.id: e for e in service.endpoints})
            self._views[id(service)] = entry
        return entry[1], entry[2]

    @staticmethod
    def _request(service: ServiceView, call: Call | None) -> Request:
        if call is None:
            return Request(category=service.category)
        input_tokens, output_tokens = estimate_tokens(call.payload, service.max_tokens)
        return Request(
            category=service.category,
            priority=call.priority,
            user_type=call.user_type,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            stream=call.payload.get("stream") is True,
            capabilities=call.capabilities,
            output_default=not asked_output(call.payload),
        )


__all__ = ["UNUSABLE", "Router"]
