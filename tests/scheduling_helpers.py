"""Shared builders for the scheduling tests: a fake clock, candidates, fed statistics."""

from __future__ import annotations

import random
from collections.abc import Sequence

from switchgear.adapters.base import ErrorKind, TokenUsage
from switchgear.dataplane.events import AttemptEnd, AttemptStart
from switchgear.dataplane.scheduling.model import Bounds, Candidate, Context, Request
from switchgear.dataplane.scheduling.stats import LiveStats, StatsConfig
from switchgear.dataplane.snapshot import Pricing

NO_SLOW_START = StatsConfig(slow_start_s=0.0)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def cand(name: str, *, service: str = "s", price: float = 0.0, **kw: object) -> Candidate:
    pricing = Pricing(cost_per_1k_tokens=price)
    return Candidate(key=f"{service}/{name}", service=service, endpoint=name, pricing=pricing, **kw)  # type: ignore[arg-type]


def stats(clock: Clock | None = None, config: StatsConfig = NO_SLOW_START) -> LiveStats:
    return LiveStats(clock or Clock(), config)


ANY = Request()
NO_BOUNDS = Bounds()


def ctx(live: LiveStats, request: Request = ANY, bounds: Bounds = NO_BOUNDS, seed: int = 0) -> Context:
    return Context(request, live, live.clock(), random.Random(seed), bounds, {})


def complete(live: LiveStats, key: str, latency_s: float, *, error: ErrorKind | None = None,
             tokens: int = 0, ttft_s: float | None = None, n: int = 1) -> None:
    """`n` attempts on `key` that each took `latency_s` (on the stats' clock, started and ended now)."""
    service, endpoint = key.split("/", 1)
    for i in range(n):
        rid = f"{key}-{live.clock()}-{i}-{id(live)}"
        live.attempt_started(AttemptStart(rid, service, "llm", endpoint, 1, 5))
        live.attempt_ended(AttemptEnd(rid, service, "llm", endpoint, 1, latency_s, error,
                                      TokenUsage(10, tokens), 0.0, ttft_s))


def occupy(live: LiveStats, key: str, n: int, tag: str = "busy") -> None:
    """`n` attempts on `key` left in flight."""
    service, endpoint = key.split("/", 1)
    for i in range(n):
        live.attempt_started(AttemptStart(f"{tag}-{key}-{i}", service, "llm", endpoint, 1, 5))


def names(cands: Sequence[Candidate]) -> list[str]:
    return [c.endpoint for c in cands]
