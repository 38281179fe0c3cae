"""The scheduling pipeline: hard filters -> policy bounds -> slow peers off -> share cap ->
load shifting -> silent endpoints held back -> strategy stages -> score -> pick (peers.py says
why the two peer stages run for every strategy; shift.py, the seed's 0.8 / 0.6 load shifting;
filters.not_silent, the first-token silence test, which judges only endpoints whose attempts
report first tokens: streams, and whole answers streamed from the upstream).

`Scheduler.pick` is synchronous and does no I/O. Its time is the stats' clock and its
randomness an injected `random.Random`, so tests and the simulation replay exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from switchgear.dataplane.scheduling import filters
from switchgear.dataplane.scheduling.filters import Filter
from switchgear.dataplane.scheduling.model import Bounds, Candidate, Context, Request
from switchgear.dataplane.scheduling.peers import PeerSettings, off_slow, over_cap, record_pick
from switchgear.dataplane.scheduling.scorers import clamp
from switchgear.dataplane.scheduling.shift import ShiftSettings, shed
from switchgear.dataplane.scheduling.stats import LiveStats
from switchgear.dataplane.scheduling.strategies import STRATEGIES, Strategy

NO_BOUNDS = Bounds()
DEFAULT_PEERS = PeerSettings()
DEFAULT_SHIFT = ShiftSettings()

#: A policy's cost cap applies to every strategy, as a preference: when no candidate meets
#: it, all are kept. Its min_success_rate is a qualification of cost_optimized (the seed's
#: rule), not a global filter: applied to every strategy it would herd traffic onto whichever
#: endpoint has not failed *yet* — a black hole, whose attempts never end, looks perfect.
POLICY_BOUNDS = filters.prefer(filters.within_cost)


class Scheduler:
    """Picks endpoints for requests by named strategy.

    `unavailable` (keys "service/endpoint", or a predicate on the key) is what the resilience
    engine feeds: open breakers, ejected outliers. `tenant_allowed(tenant, candidate)` is the
    governance hook. Picker state is kept per (group, strategy), where group is usually the
    service name. Not thread-safe: use from one event loop.
    """

    def __init__(
        self,
        stats: LiveStats,
        rng: random.Random | None = None,
        unavailable: Collection[str] | Callable[[str], bool] = (),
        tenant_allowed: Callable[[str, Candidate], bool] | None = None,
        strategies: Mapping[str, Strategy] = STRATEGIES,
        peers: PeerSettings | None = DEFAULT_PEERS,
        shift: ShiftSettings | None = DEFAULT_SHIFT,
        silence: bool = True,
    ) -> None:
        """`peers`: the slow-peer and share-cap stages (peers.py); `shift`: the load-shifting
        stage's default thresholds (shift.py); None leaves them out. `silence`: the
        first-token silence stage (filters.not_silent); False leaves it out."""
        self.stats = stats
        self.rng = rng or random.Random()
        self.strategies = strategies
        hard: list[Filter] = [filters.usable, filters.not_blocked(unavailable),
                              filters.has_capabilities, filters.fits_context]
        if tenant_allowed is not None:
            hard.append(filters.tenant_allowed(tenant_allowed))
        self._hard = tuple(hard)
        self._peers = peers
        self._off_slow = off_slow(peers) if peers is not None else None
        self._over_cap = over_cap(peers) if peers is not None else None
        self._shed = shed(shift) if shift is not None else None
        self._silence = silence
        self._memory: dict[tuple[str, str], dict[str, Any]] = {}

    def pick(
        self,
        candidates: Sequence[Candidate],
        request: Request,
        strategy: str,
        *,
        group: str = "",
        bounds: Bounds = NO_BOUNDS,
        exclude: Collection[str] = (),
    ) -> Candidate | None:
        """The candidate to try next, or None when none may serve. `exclude`: keys already tried."""
        plan = self.strategies[strategy]
        memory = self._memory.setdefault((group, plan.name), {})
        ctx = Context(request, self.stats, self.stats.clock(), self.rng, bounds, memory)
        for c in candidates:  # endpoints seen together start their slow start together
            self.stats.get(c.key, ctx.now)
        cands = [c for c in candidates if c.key not in exclude] if exclude else list(candidates)
        for f in self._hard:
            if not cands:
                return None
            cands = f(cands, ctx)
        if not cands:
            return None
        if len(cands) == 1:  # bounds, stages, scores and pickers keep at least one of a non-empty
            # input: a lone candidate is the pick (~10% of a call's CPU went to passing it through)
            chosen = cands[0]
        else:
            cands = POLICY_BOUNDS(cands, ctx)
            if self._off_slow is not None:
                cands = self._off_slow(cands, ctx)
            if self._over_cap is not None and len(cands) > 1:
                capped = self._over_cap(cands, ctx)
                if capped:
                    cands = [c for c in cands if c.key not in capped]
            if self._shed is not None and len(cands) > 1:
                cands = self._shed(cands, ctx)
            if self._silence and len(cands) > 1:  # after the peer stages: a silent endpoint is still
                cands = filters.not_silent(cands, ctx)  # a peer there (the yardstick of a slow one)
            for stage in plan.stages:
                cands = stage(cands, ctx)
            scores = None
            if plan.scorer is not None:
                raw = plan.scorer(cands, ctx)
                ramp = self.stats.slow_start
                scores = [clamp(s * ramp(c.key, ctx.now)) for c, s in zip(cands, raw, strict=True)]
            chosen = plan.picker(cands, scores, ctx)
        if self._peers is not None:
            record_pick(ctx, chosen, candidates, self._peers.share_alpha)
        return chosen
