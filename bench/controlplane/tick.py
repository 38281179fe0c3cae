"""The health monitor's tick at fleet scale: CPU per `Monitor.tick()` over a registry of
one-endpoint services, in-process (no sockets, no agents), with an injected clock.

    python -m bench.controlplane.tick [--services 10000] [--agents 10000] [--ticks 10] [--active 100]

Reported, CPU time per tick (the tick runs on the control plane's one event loop, every half
report interval, whether or not anything changes), with `--agents` agents sending a report
every second (empty: an agent reports even with nothing in flight; one more carries the data):
- idle: no endpoint has reported (an idle fleet, or one whose traffic stopped);
- some active: `--active` services report every second, the rest are idle;
- all with data: every endpoint reports every second;
each with the quiet-service shortcut (`HealthScorer.evaluate(..., active=...)`) and, in the same
run, with every service scored in full (the reference the shortcut is tested against).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.controlplane.delta import registry_state
from switchgear.controlplane import health as hl
from switchgear.controlplane.collector import Collector, LoadDelta
from switchgear.controlplane.monitor import Monitor
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore


class _FullScorer(hl.HealthScorer):
    """Scores every service every tick (no shortcut)."""

    def evaluate(self, now: float, endpoints: Sequence[hl.EndpointInput], sample: hl.SampleFn,
                 first_seen: Callable[[str, str], float],
                 active: Callable[[str], bool] | None = None) -> dict[tuple[str, str], hl.Verdict]:
        return super().evaluate(now, endpoints, sample, first_seen)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cpu_per_tick(registry: Registry, agents: int, active: int, ticks: int, full: bool) -> float:
    """Seconds of CPU per tick, `active` of the services reporting 20 calls a second each."""
    clock, collector = _Clock(), Collector()
    monitor = Monitor(registry, collector, clock=clock)
    if full:
        monitor._scorer = _FullScorer(monitor._scorer.params)
    names = [s.name for s in registry.state.services[:active]]

    def second() -> None:
        clock.now += 1.0
        for agent in range(agents):
            collector.record(f"agent-{agent}", [], clock.now)
        if names:
            collector.record("agent", [LoadDelta(service=n, endpoint="e0", category="llm", issued=20, succeeded=20,
                                                 latency_sum_s=2.0, latency_count=20, success_latency_sum_s=2.0,
                                                 success_latency_count=20) for n in names], clock.now)

    for _ in range(3):  # past the first evaluation of each endpoint
        second()
        monitor.tick()
    spent = 0.0
    for _ in range(ticks):
        second()
        start = time.process_time()
        monitor.tick()
        spent += time.process_time() - start
    return spent / ticks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.controlplane.tick", description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=10_000, help="one-endpoint services in the registry")
    parser.add_argument("--agents", type=int, default=10_000, help="agents reporting (empty reports) every second")
    parser.add_argument("--ticks", type=int, default=10, help="ticks timed per case")
    parser.add_argument("--active", type=int, default=100, help="services with data in the 'some active' case")
    args = parser.parse_args(argv)
    print(f"# health tick benchmark (python {sys.version.split()[0]}, {os.cpu_count()} cpu, load "
          f"{os.getloadavg()[0]:.2f}), {args.services} one-endpoint services, {args.agents} agents reporting, "
          "CPU per tick")
    with tempfile.TemporaryDirectory(prefix="sg-tick-") as tmp:
        store = SqliteStore(Path(tmp) / "r.db")
        try:
            registry = Registry(store)
            registry.replace(registry_state(args.services), "bench", "bench.controlplane.tick")
            cases = (("idle", 0), (f"{args.active} active", args.active), ("all with data", args.services))
            for label, active in cases:
                quick = cpu_per_tick(registry, args.agents, active, args.ticks, full=False)
                full = cpu_per_tick(registry, args.agents, active, args.ticks, full=True)
                print(f"  {label:>14}: {quick * 1e3:7.1f} ms with the quiet-service shortcut, "
                      f"{full * 1e3:7.1f} ms scoring every service")
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
