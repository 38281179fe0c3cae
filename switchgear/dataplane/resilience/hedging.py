"""Hedged requests (the gRPC / Envoy design): when to send a second attempt. Pure.

A hedged call sends its first attempt as usual; if that attempt is still outstanding after
the endpoint's own p95 latency, a second attempt goes to another endpoint, the first answer
wins and the other is cancelled (its upstream connection closed). The tail of one endpoint
then costs a call about its p95 plus a healthy endpoint's latency, not the tail itself.

Who is hedged: calls that opt in — a call whose priority is at least its category policy's
`hedge_min_priority` (default 8, "high" in the seed's rules, for llm, embedding and vector_db
calls; never for documents and knowledge graphs, whose calls are long and dear) — and whose
method is idempotent (`Adapter.idempotent(method, payload)`: a chat completion is, a vector
`add` is not; an adapter that does not say is taken as not idempotent). The value 11 turns
hedging off for the category.

Bounds: at most `max_hedges` extra attempts per call; each costs one unit of the service's
retry budget (hedges and retries together add at most the budget's share of load), and none
is sent when the budget is spent, when no other endpoint is usable, or when less than
`min_left_s` of the deadline would be left for it. The delay is the endpoint's p95 over its
recent answers once it has `min_samples` of them (before that there is no hedge: the p95 of a
few samples says little), never below `min_delay_s` — except for a probe of an endpoint judged
far slower than its peers (scheduling/peers.py), hedged at its fastest peer's p95: waiting for
its own (slow) p95 would hand the probe's caller the slow spell it is probing.

A hedge that wins cancels the other attempt: its ticket and admission slot are given back, its
connection is closed (the upstream sees the client go away), and its AttemptEnd says
`cancelled` — counted in no outcome, latency, usage or cost. Three abandoned attempts in a row
with no answer between do count, as a stall (scheduling/stats.py): an endpoint whose every
attempt is hedged away never answers, and must not look healthy for it.
"""

from __future__ import annotations

from switchgear.wire.attempt_policy import DEFAULT_HEDGING, NEVER, HedgeSettings, hedging_for

__all__ = ("DEFAULT_HEDGING", "NEVER", "HedgeSettings", "hedge_delay", "hedged", "hedging_for", "may_hedge")

def hedged(settings: HedgeSettings, priority: int, idempotent: bool) -> bool:
    """Whether a call may be hedged at all: it opted in and repeating it is harmless."""
    return idempotent and priority >= settings.min_priority and settings.max_hedges > 0


def hedge_delay(settings: HedgeSettings, p95_s: float | None, samples: int) -> float | None:
    """Seconds after which an outstanding attempt on this endpoint gets a hedge, or None
    (no hedge: too few samples to know its p95)."""
    if p95_s is None or samples < settings.min_samples:
        return None
    return max(settings.min_delay_s, p95_s)


def may_hedge(settings: HedgeSettings, sent: int, budget_available: float, others_usable: bool,
              remaining_s: float) -> bool:
    """Whether the next hedge may go now: `sent` hedges so far in this call."""
    return (sent < settings.max_hedges and budget_available >= 1.0 and others_usable
            and remaining_s >= settings.min_left_s)
