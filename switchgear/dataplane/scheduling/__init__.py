"""Switchgear's scheduling core: filter -> score -> pick, pure and synchronous.

No grpc, httpx, aiohttp, OpenTelemetry or generated protobuf code may be imported here
(tests/test_scheduling_purity.py checks every module's AST). Time and randomness are injected.

- model:      Candidate, Request, Bounds, Context; token estimates; the user-type convention
- stats:      LiveStats — per-endpoint live numbers, an AttemptObserver; slow start
- filters:    which candidates may serve
- scorers:    [0, 1] ratings, normalised across candidates; the seed's weight tables
- pickers:    round robin, smooth WRR, power of two choices, argmax, least, random
- strategies: the seven named compositions
- policy:     which strategy and bounds apply (service > category policy > seed rule > default)
- scheduler:  the pipeline
"""

from switchgear.dataplane.scheduling.model import Bounds, Candidate, Request, candidates_of, estimate_tokens
from switchgear.dataplane.scheduling.policy import bounds_for, choose_strategy, seed_rule
from switchgear.dataplane.scheduling.scheduler import Scheduler
from switchgear.dataplane.scheduling.stats import LiveStats, StatsConfig
from switchgear.dataplane.scheduling.strategies import STRATEGIES, Strategy

__all__ = [
    "STRATEGIES",
    "Bounds",
    "Candidate",
    "LiveStats",
    "Request",
    "Scheduler",
    "StatsConfig",
    "Strategy",
    "bounds_for",
    "candidates_of",
    "choose_strategy",
    "estimate_tokens",
    "seed_rule",
]
