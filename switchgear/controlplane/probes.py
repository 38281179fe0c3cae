"""Active health checks from the control plane: one cheap, unauthenticated GET per endpoint.

Why unauthenticated, from the control plane: the control plane never holds API keys (DESIGN:
secrets stay on agents), and a probe's job is *reachability* — is the endpoint up and
answering HTTP — which needs no key. A 401/403 therefore counts as "up": the server answered,
and whether the key works is what live traffic, measured by agents and reported in load
reports, already tells us. Agents do not probe, so N agents never multiply probe traffic.

What is probed, per protocol: openai -> GET {base}/models; chroma -> GET
{base}/api/v2/heartbeat; anything else -> GET {base}. Outcome: status < 500 (except 429) is
up; 5xx, a timeout or a connection error is down; 429 says nothing (the provider is
rate-limiting us, which is load, not health) and does not count either way.

Rate-limit budget rule: at most one probe per endpoint per `health_check_interval`, and no
probe at all for an endpoint that carried successful live traffic within the last interval
(the traffic is the health check). With the seed's 30 s interval that is at most 2 requests a
minute per endpoint, against provider limits measured in hundreds or thousands a minute.
`failover_threshold` consecutive failures mark the endpoint ejected (health.py); one success
clears the count.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

from switchgear.controlplane.model import EndpointSpec, ServiceSpec

log = logging.getLogger("switchgear.controlplane.probes")

PROBE_PATHS = {"openai": "/models", "chroma": "/api/v2/heartbeat"}


def probe_url(spec: ServiceSpec, endpoint: EndpointSpec) -> str:
    return endpoint.url.rstrip("/") + PROBE_PATHS.get(endpoint.protocol or spec.protocol, "")  # a target's own


def outcome(status: int) -> bool | None:
    """True = up, False = down, None = no evidence (429)."""
    if status == 429:
        return None
    return status < 500


@dataclass
class ProbeState:
    failures: int = 0  # consecutive
    last_probe_at: float = -math.inf
    last_status: str = ""


class Prober:
    """Runs due probes; `last_success(service, endpoint)` is live traffic's last success time
    (same clock). Use from one event loop."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        last_success: Callable[[tuple[str, str]], float],
        *,
        clock: Callable[[], float] = time.monotonic,
        max_concurrent: int = 16,
    ) -> None:
        self._client = client
        self._last_success = last_success
        self._clock = clock
        self._states: dict[tuple[str, str], ProbeState] = {}
        self._limit = asyncio.Semaphore(max_concurrent)
        self.probes_sent = 0

    def failures(self, service: str, endpoint: str) -> int:
        state = self._states.get((service, endpoint))
        return state.failures if state else 0

    def state(self, service: str, endpoint: str) -> ProbeState | None:
        return self._states.get((service, endpoint))

    def due(
        self, services: Iterable[ServiceSpec], interval_s: float, now: float
    ) -> list[tuple[ServiceSpec, EndpointSpec]]:
        live = set()
        picked = []
        for spec in services:
            for endpoint in spec.endpoints:
                key = (spec.name, endpoint.id)
                live.add(key)
                state = self._states.setdefault(key, ProbeState())
                if now - state.last_probe_at < interval_s:
                    continue  # at most one probe per interval
                if now - self._last_success(key) < interval_s:
                    state.failures = 0  # live traffic succeeded: that is the health check
                    continue
                picked.append((spec, endpoint))
        for gone in set(self._states) - live:
            del self._states[gone]
        return picked

    async def run_due(self, services: Iterable[ServiceSpec], interval_s: float, timeout_s: float) -> int:
        now = self._clock()
        due = self.due(services, interval_s, now)
        for spec, endpoint in due:
            self._states[(spec.name, endpoint.id)].last_probe_at = now
        await asyncio.gather(*(self._probe(spec, endpoint, timeout_s) for spec, endpoint in due))
        return len(due)

    async def _probe(self, spec: ServiceSpec, endpoint: EndpointSpec, timeout_s: float) -> None:
        url = probe_url(spec, endpoint)
        async with self._limit:
            self.probes_sent += 1
            try:
                response = await self._client.get(url, timeout=timeout_s)
                result, detail = outcome(response.status_code), f"HTTP {response.status_code}"
            except httpx.TimeoutException:
                result, detail = False, "timeout"
            except httpx.HTTPError as exc:
                result, detail = False, type(exc).__name__
        state = self._states.get((spec.name, endpoint.id))
        if state is None or result is None:
            return
        state.last_status = detail
        if result:
            state.failures = 0
        else:
            state.failures += 1
            log.info("probe of %s/%s failed (%s), %d in a row", spec.name, endpoint.id, detail, state.failures)
