"""Resilience for the request path: breakers, outlier ejection, retries, admission, fallbacks.

Every module is pure decision logic (time is a parameter, randomness an injected
`random.Random`) except `admission_edge`, the one asyncio module. None imports grpc, httpx,
aiohttp or OpenTelemetry (tests/test_resilience_purity.py).

| module          | decides                                                            |
| --------------- | ------------------------------------------------------------------ |
| signals         | what an ErrorKind says about endpoint health (429 throttles, never trips) |
| breaker         | per-endpoint closed/open/half-open breaker, `BreakerBook` of them  |
| outlier         | Envoy-style ejection across a service's endpoints                  |
| backoff         | retry delays, jitter, per-category defaults (`policy_for`)         |
| retry           | after a failure: FAILOVER / RETRY_AFTER / GIVE_UP (with reason)    |
| budget          | per-service retry budget (20 % of calls + 3/s floor)               |
| admission       | per-endpoint concurrency + per-service priority queue + shedding   |
| admission_edge  | `async with Admission.slot(...)`, raises `Shed`                    |
| fallback        | the ordered chain: same service, its fallbacks, local model, preset/queue/UNAVAILABLE |
| stats           | per-(service, endpoint) counters of every decision                 |
| observer        | feeds outlier ejection from AttemptEnd events                      |
| gate            | breakers + ejection as one view; the scheduler's `unavailable` predicate |

Integration note (wired in dataplane/attempts.py: `Resilience` + `AttemptController`, used by
invoke.py and stream.py)
-----------------------------------------------------------------------------------------------

tests/test_resilience_flow.py runs exactly this sequence against scripted upstreams.

Agent-lifetime objects (built once; they survive snapshot swaps; keys are (service, endpoint id)):

    stats     = ResilienceStats()
    breakers  = BreakerBook(settings_from_threshold(snap.settings.breaker_failure_threshold),
                            on_trip=lambda s, e, now: stats.bump(s, e, "trips"))
    outliers  = OutlierDetector(on_eject=lambda s, e, now: stats.bump(s, e, "ejections"), now=clock())
    budgets   = RetryBudgets()
    admission = Admission(AdmissionCore(), clock, stats)  # admission_edge; counts queued/sheds
    rng       = random.Random()
    gate      = Gate(breakers, outliers, clock)
    scheduler = Scheduler(live_stats, rng, unavailable=gate.unavailable)   # "service/endpoint" keys
    observers = (*observers, OutlierObserver(outliers, clock))   # or outliers.record inline

On every applied snapshot, per service: `outliers.sync(name, ids)` and
`admission.configure(name, max_queue_size, {e.id: e.max_concurrency})` (wakes waiters that
now fit); then `breakers.retain(pairs)`, `outliers.forget(names)` and
`breakers.reconfigure(settings_from_threshold(...))`. `max_queue_size` is
`snap.settings.category_policies[service.category].max_queue_size` (0 or absent = unbounded;
each wait is still bounded by its call's deadline).

Per call, for the requested service and then each SERVICE step of the fallback plan:

    policy = policy_for(service.category, snap.settings.retry)
    budget = budgets.get(service.name); budget.record_request(start)
    ids = {e.id for e in service.endpoints}; allowed = set(ids); tried = set(); attempts = 0; prev = 0.0
    loop:
        now = clock()
        # filter BEFORE picking: open breakers, ejected and Retry-After-held endpoints are
        # refused by gate.unavailable inside the scheduler; the retry decision narrows further
        endpoint = scheduler.pick(candidates, request, strategy, group=name,
                                  exclude={candidate_key(name, e) for e in ids - allowed})
        if endpoint is None: give up on this service (error = last kind, or None: nothing usable)
        breaker = breakers.get(name, endpoint.id)
        ticket = breaker.take(now)            # no second consult: the pick filtered with the gate
        if ticket.probe: stats.bump(name, endpoint.id, "probes")
        try:
            async with admission.slot(name, endpoint.id, call.priority, deadline):
                remaining = deadline - clock()   # recompute: queueing took time
                ...the attempt as today (AttemptStart / adapter / AttemptEnd)...
        except Shed as shed:
            breaker.release(ticket)            # (the edge already counted the shed)
            end the call: RESOURCE_EXHAUSTED (QUEUE_FULL) or DEADLINE_EXCEEDED, Retry-After =
            shed.retry_after_s. Shed load is not sent to fallbacks: that would defeat shedding.
        except CancelledError: breaker.release(ticket); raise
        success:  breaker.record(clock(), ticket, None); return the Result
        UpstreamError exc (TimeoutError -> ErrorKind.TIMEOUT, as today):
            now = clock()
            breaker.record(now, ticket, exc.kind, exc.retry_after_s)
            attempts += 1; tried.add(endpoint.id)
            d = decide(Failure(endpoint.id, exc.kind, exc.retry_after_s),
                       RetryState(attempts, deadline - now, gate.usable(name, ids, now), tried,
                                  budget.available(now), prev), policy, rng)
            GIVE_UP: if d.give_up is GiveUp.BUDGET: stats.bump(name, endpoint.id, "budget_denied")
                     give up on this service with exc.kind (CallFailed keeps d.reason)
            else:    budget.spend(now, d.cost)
                     stats.bump(name, endpoint.id, "failovers" if d.new_endpoint else "retries")
                     if d.delay_s: await asyncio.sleep(d.delay_s); prev = d.delay_s
                     allowed = set(d.endpoints)

`retry.max_retries` now comes from `policy.max_retries` (same value as today).

Fallback, when a service gives up and `should_fall_back(kind)` (every kind but CLIENT):

    p = plan(call.service, snap.services, fallback_settings,
             serves=lambda s: s.protocol in adapters and call.method in adapters[s.protocol].methods,
             usable=lambda n: bool(gate.usable(n, ids_of(n), now)),
             metadata={n: s.metadata for n, s in snap.services.items()})  # once ServiceView has it

then walk `p.fallbacks` (every step but the requested service) while the deadline allows,
with `stats.bump(call.service, "", "fallbacks")` per step. Terminal steps: PRESET -> a Result
whose body is `step.body`, marked as a fallback (source "preset_response"); QUEUE_FOR_LATER ->
UNAVAILABLE until the task queue is wired (then: enqueue, answer with the queue id);
UNAVAILABLE -> CallFailed / UNAVAILABLE with `step.reason`. `FallbackSettings()` has no presets,
so no answer is ever invented until configured: proposed config key
`communication.fallback.preset_responses.<category>`, or a service's metadata
`preset_response`. ServiceView needs `metadata` (the proto's Service.metadata, field 14,
already exists) for metadata rules; the capability "local" works today.

What AttemptObserver events give: AttemptEnd carries service, endpoint, error kind and latency,
enough for outlier ejection (`OutlierObserver`) and stats. It carries neither the breaker
ticket nor retry_after_s, so the breaker is recorded inline; adding `retry_after_s` to
AttemptEnd would let metrics show throttling as well.
"""

from switchgear.dataplane.resilience.admission import (
    AdmissionCore,
    AdmissionSettings,
    Effects,
    Grant,
    Rejection,
    ShedReason,
)
from switchgear.dataplane.resilience.backoff import BackoffPolicy, policy_for
from switchgear.dataplane.resilience.breaker import (
    BreakerBook,
    BreakerSettings,
    CircuitBreaker,
    State,
    Ticket,
    settings_from_threshold,
)
from switchgear.dataplane.resilience.budget import BudgetSettings, RetryBudget, RetryBudgets
from switchgear.dataplane.resilience.fallback import FallbackSettings, Plan, Step, StepKind, plan, should_fall_back
from switchgear.dataplane.resilience.gate import Gate
from switchgear.dataplane.resilience.outlier import OutlierDetector, OutlierSettings
from switchgear.dataplane.resilience.retry import Action, Failure, GiveUp, RetryDecision, RetryState, decide
from switchgear.dataplane.resilience.signals import Signal, signal_of
from switchgear.dataplane.resilience.stats import Counters, ResilienceStats

__all__ = (
    "Action",
    "AdmissionCore",
    "AdmissionSettings",
    "BackoffPolicy",
    "BreakerBook",
    "BreakerSettings",
    "BudgetSettings",
    "CircuitBreaker",
    "Counters",
    "Effects",
    "Failure",
    "FallbackSettings",
    "Gate",
    "GiveUp",
    "Grant",
    "OutlierDetector",
    "OutlierSettings",
    "Plan",
    "Rejection",
    "ResilienceStats",
    "RetryBudget",
    "RetryBudgets",
    "RetryDecision",
    "RetryState",
    "ShedReason",
    "Signal",
    "State",
    "Step",
    "StepKind",
    "Ticket",
    "decide",
    "plan",
    "policy_for",
    "settings_from_threshold",
    "should_fall_back",
    "signal_of",
)
