"""The five scenarios. One heterogeneous pool of four OpenAI-compatible instances:

| instance | TTFT   | s/token | capacity | errors | USD / 1k in / out |
| -------- | ------ | ------- | -------- | ------ | ----------------- |
| fast     | 0.25 s | 0.004   | 12       | 0.5%   | 0.005 / 0.015     |
| mid      | 0.35 s | 0.008   | 16       | 1%     | 0.0015 / 0.002    |
| cheap    | 0.60 s | 0.014   | 24       | 2%     | 0.0002 / 0.0006   |
| spare    | 0.30 s | 0.006   | 8        | 0.5%   | 0.003 / 0.006     |

Each queues up to twice its capacity, then answers 503. Requests: 20% high priority (9),
30% from premium users, 50% standard (the seed's three weight tables); prompts of 200..2000
tokens, max_tokens 400, actual output 50..400 tokens; deadline 30 s (the agent's default
timeout); 3 retries. Total
capacity is about 29 requests/s; the steady load is 18/s (about 62%).
"""

from __future__ import annotations

from bench.scheduling.sim import InstanceSpec, PriceChange, Scenario, constant


def _ramp(t0: float, t1: float, v0: float, v1: float):  # type: ignore[no-untyped-def]
    def f(t: float) -> float:
        if t <= t0:
            return v0
        if t >= t1:
            return v1
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0)

    return f


def pool(**changes: dict[str, object]) -> tuple[InstanceSpec, ...]:
    base = (
        InstanceSpec("fast", 0.25, 0.004, 12, 24, 0.005, 0.005, 0.015, weight=10, priority=2),
        InstanceSpec("mid", 0.35, 0.008, 16, 32, 0.01, 0.0015, 0.002, weight=7, priority=1),
        InstanceSpec("cheap", 0.60, 0.014, 24, 48, 0.02, 0.0002, 0.0006, weight=6, priority=0),
        InstanceSpec("spare", 0.30, 0.006, 8, 16, 0.005, 0.003, 0.006, weight=5, priority=2),
    )
    out = []
    for spec in base:
        extra = changes.get(spec.name)
        if extra:
            spec = InstanceSpec(**{**spec.__dict__, **extra})
        out.append(spec)
    return tuple(out)


STEADY_RATE = 18.0

#: One model at three providers (issue 15): prices and speeds of a small, a mid and a frontier
#: offering; each queues up to twice its capacity, then answers 503. 10 requests/s keep the
#: cheapest about 60 % busy. The provider scenarios compare these strategies only.
PROVIDERS = (
    InstanceSpec("cheap", 0.60, 0.006, 32, 64, 0.005, 0.00015, 0.0006),
    InstanceSpec("mid", 0.40, 0.005, 32, 64, 0.005, 0.0005, 0.0015),
    InstanceSpec("dear", 0.25, 0.004, 32, 64, 0.005, 0.0025, 0.01),
)
PROVIDER_RATE = 10.0
PROVIDER_CONTENDERS = ("cost_optimized", "cost_optimized+stream", "latency", "intelligent", "litellm_cost",
                       "litellm_cost+cooldown", "simple_shuffle+cooldown", "litellm_latency")
FAULT = (60.0, 120.0)


def providers(**changes: dict[str, object]) -> tuple[InstanceSpec, ...]:
    return tuple(InstanceSpec(**{**s.__dict__, **changes.get(s.name, {})}) for s in PROVIDERS)


def _during_fault(t: float) -> bool:
    return FAULT[0] <= t < FAULT[1]


def scenarios() -> tuple[Scenario, ...]:
    burst = _ramp(0, 0, STEADY_RATE, STEADY_RATE)
    return (
        Scenario("steady", "Steady heterogeneous pool (18 req/s, ~62% of capacity)",
                 pool(), constant(STEADY_RATE), STEADY_RATE),
        Scenario("degrading", "'fast' slowly degrades: latency x1 -> x25, errors 0.5% -> 20% (t=30..150 s)",
                 pool(fast={"slowdown": _ramp(30, 150, 1.0, 25.0), "error": _ramp(30, 150, 0.005, 0.20)}),
                 constant(STEADY_RATE), STEADY_RATE, marks=((30, "degrading starts"),)),
        Scenario("dying", "'fast' black-holes (never answers) at t=60 s and comes back at t=100 s",
                 pool(fast={"down": lambda t: 60 <= t < 100}),
                 constant(STEADY_RATE), STEADY_RATE, marks=((60, "fast dies"), (100, "fast back"))),
        Scenario("price_change", "'cheap' becomes the dearest at t=60 s (x20 prices)",
                 pool(), constant(STEADY_RATE), STEADY_RATE,
                 price_changes=(PriceChange(60, "cheap", 0.004, 0.012),), marks=((60, "price change"),)),
        Scenario("burst", "Burst above total capacity: 18 -> 40 req/s for t=60..90 s",
                 pool(), lambda t: 40.0 if 60 <= t < 90 else burst(t), 40.0,
                 marks=((60, "burst"), (90, "burst ends"))),
        Scenario("providers_hang", "One model at three providers; the cheapest takes new calls and never "
                 "answers them (those in service finish) at t=60..120 s",
                 providers(cheap={"down": _during_fault}), constant(PROVIDER_RATE), PROVIDER_RATE,
                 marks=((FAULT[0], "cheap hangs"), (FAULT[1], "cheap back")),
                 contenders=PROVIDER_CONTENDERS, breakers=True, fault=(*FAULT, "cheap")),
        Scenario("providers_partition", "One model at three providers; the cheapest is cut off (no call "
                 "answers, in service or new) at t=60..120 s",
                 providers(cheap={"down": _during_fault, "partition": True}), constant(PROVIDER_RATE), PROVIDER_RATE,
                 marks=((FAULT[0], "cheap cut off"), (FAULT[1], "cheap back")),
                 contenders=PROVIDER_CONTENDERS, breakers=True, fault=(*FAULT, "cheap")),
        Scenario("providers_5xx", "One model at three providers; the cheapest answers 503 at t=60..120 s",
                 providers(cheap={"error": lambda t: 1.0 if _during_fault(t) else 0.005}), constant(PROVIDER_RATE),
                 PROVIDER_RATE, marks=((FAULT[0], "cheap fails"), (FAULT[1], "cheap back")),
                 contenders=PROVIDER_CONTENDERS, breakers=True, fault=(*FAULT, "cheap")),
    )
