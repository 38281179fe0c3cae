"""Tail latency under upstream faults, with real processes: issue 21's fault timelines.

One command (`python -m bench.tail`) starts an OpenAI emulator with three instances A, B and C
(medians 40, 60 and 80 ms: a base delay plus uniform jitter), a control plane and one agent,
applies a config with one service over the three (default strategy, retries 2, service timeout
9 s, every call hedged by the llm policy), then drives an open-loop load of 30 Invoke calls a
second over gRPC through a timeline of faults, set at run time on the emulator
(`/_emulator/faults`):

    warm-up · A hangs (reads the request, never answers) · healthy · A x10 slow · healthy ·
    B answers 500 half the time · C refuses connections (B just recovered) · healthy ·
    A answers 429 half the time with Retry-After 1 s · healthy

Per phase it reports client errors, p50/p99 of the calls, upstream attempts per call (the
agent's `switchgear_request_count`, hedges included), each instance's share of those attempts,
and for the faulty instance the time to divert (its share of attempts in a sliding 1 s window
first below 5 %) and to return (first back to 15 % after the fault ends). The agent's counters
are scraped from /metrics four times a second.

Bounded and self-stopping: the timeline lasts `--phase` x 10 seconds (15 s: 2.5 minutes), then
every process started here is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson

from switchgear.supervise import Proc
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc

RATE = 30.0
NAMES = ("a", "b", "c")
#: (base delay, jitter) in ms: uniform(base, base + jitter) has medians 40 / 60 / 80 ms.
BASE = {"a": (30.0, 20.0), "b": (45.0, 30.0), "c": (60.0, 40.0)}
PAYLOAD = orjson.dumps({"messages": [{"role": "user", "content": "How long is a piece of string?"}],
                        "max_tokens": 16})

CONFIG = """\
external_services:
  coordination:
    scheduling_policies:
      llm_services: {{hedge_min_priority: {hedge}}}   # 1: the route opts every call into hedging
  communication:
    retry_policy: {{max_retries: 2}}
  services:
    llm_services:
      local_models:
        - {{name: "chat", model: "gpt-4o-mini", timeout: 9, cost_per_1k_tokens: 0.001,
           endpoints: [{{id: "a", url: "{a}"}}, {{id: "b", url: "{b}"}}, {{id: "c", url: "{c}"}}]}}
"""


@dataclass(frozen=True)
class Phase:
    name: str
    target: str  # the faulty instance ("" = none)
    faults: Mapping[str, Any] = field(default_factory=dict)
    length: float = 1.0  # in units of --phase


TIMELINE = (
    Phase("warm-up", "", length=2 / 3),
    Phase("A hangs", "a", {"hang": True}),
    Phase("healthy", "", length=2 / 3),
    Phase("A x10 slow", "a", {"latency_ms": 300.0, "jitter_ms": 200.0}),
    Phase("healthy", "", length=2 / 3),
    Phase("B 50% 500s", "b", {"error_rate": 0.5, "error_status": 500}),
    Phase("C refuses", "c", {"refuse_s": 1.0}),  # refuse_s is set to the phase's length
    Phase("healthy", "", length=2 / 3),
    Phase("A 50% 429", "a", {"rate_limit_rate": 0.5, "retry_after_s": 1.0}),
    Phase("healthy", "", length=2 / 3),
)


@dataclass
class Call:
    sent: float
    latency_s: float
    ok: bool
    endpoint: str = ""
    error: str = ""


@dataclass
class Stack:
    workdir: Path
    procs: list[Proc] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    grpc_address: str = ""
    metrics: str = ""

    hedge_min_priority: int = 1

    def start(self) -> None:
        args = ["emulate", "openai", *[x for n in NAMES for x in ("--instance", f"{n}:{BASE[n][0]:g}")]]
        emu = self._start(Proc.switchgear("emulators", args, self.workdir), ready_prefix="{")
        self.urls = {n: f"http://127.0.0.1:{p}/v1" for n, p in json.loads("{" + emu).items()}
        config = self.workdir / "tail.yaml"
        config.write_text(CONFIG.format(hedge=self.hedge_min_priority, **self.urls))
        cp = self._start(Proc.switchgear("controlplane", [
            "controlplane", "--admin-auth", "none", "--db", str(self.workdir / "r.db"), "--listen", "127.0.0.1:0",
            "--config", str(config), "--log-level", "warning"], self.workdir))
        agent = Proc.switchgear("agent", [
            "agent", "--auth", "none", "--control-plane", cp, "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--log-level", "warning",
            "--agent-token-file", str(self.workdir / "r.db.agent-token")], self.workdir)
        self.grpc_address = self._start(agent)
        self.metrics = agent.wait_line("METRICS ", 10).split(" ", 1)[1].strip()

    def _start(self, proc: Proc, **kwargs: Any) -> str:
        self.procs.append(proc)
        return proc.start(**kwargs)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


async def set_faults(http: httpx.AsyncClient, url: str, name: str, faults: Mapping[str, Any]) -> None:
    base, jitter = BASE[name]
    body = {"reset": True, "latency_ms": base, "jitter_ms": jitter, "seed": ord(name), **faults}
    (await http.post(url.removesuffix("/v1") + "/_emulator/faults", json=body, timeout=5)).raise_for_status()


_COUNT = re.compile(r"^switchgear_request_count(?:_total)?\{(.*)\} ([0-9.e+]+)$", re.M)
_DECISION = re.compile(r"^switchgear_resilience_decisions_total\{(.*)\} ([0-9.e+]+)$", re.M)
DECISIONS = ("hedges", "hedge_wins", "attempt_timeouts", "failovers", "trips", "ejections", "probes", "throttled")


async def attempts(http: httpx.AsyncClient, metrics: str) -> dict[str, float]:
    """The agent's attempts started per endpoint of "chat" (hedges included), and its decision
    counters summed over the endpoints (keys DECISIONS)."""
    text = (await http.get(f"http://{metrics}/metrics", timeout=5)).text
    found = dict.fromkeys((*NAMES, *DECISIONS), 0.0)
    for labels, value in _COUNT.findall(text):
        got = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if got.get("service") == "chat" and got.get("endpoint") in NAMES:
            found[got["endpoint"]] = float(value)
    for labels, value in _DECISION.findall(text):
        got = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if got.get("service") == "chat" and got.get("decision") in DECISIONS:
            found[got["decision"]] += float(value)
    return found


async def one(stub: Any, calls: list[Call], t0: float) -> None:
    sent = time.monotonic()
    try:
        reply = await stub.Invoke(gateway_pb2.InvokeRequest(service="chat", method="chat.completions",
                                                            payload=PAYLOAD), timeout=10)
        calls.append(Call(sent - t0, time.monotonic() - sent, True, reply.endpoint))
    except grpc.aio.AioRpcError as exc:
        calls.append(Call(sent - t0, time.monotonic() - sent, False, error=exc.code().name))


async def drive(stack: Stack, phase_s: float) -> tuple[list[Call], list[tuple[float, dict[str, float]]],
                                                        list[tuple[float, float, Phase]]]:
    calls: list[Call] = []
    samples: list[tuple[float, dict[str, float]]] = []
    bounds: list[tuple[float, float, Phase]] = []
    async with httpx.AsyncClient() as http, grpc.aio.insecure_channel(stack.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for _ in range(50):  # the agent serves once it holds the snapshot
            try:
                await stub.Invoke(gateway_pb2.InvokeRequest(service="chat", method="chat.completions",
                                                            payload=PAYLOAD), timeout=5)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        for name in NAMES:
            await set_faults(http, stack.urls[name], name, {})
        t0 = time.monotonic()
        stop = asyncio.Event()

        async def scrape() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - t0, await attempts(http, stack.metrics)))
                await asyncio.sleep(0.25)

        scraper = asyncio.ensure_future(scrape())
        tasks: set[asyncio.Task[None]] = set()
        start = 0.0
        n = 0
        for phase in TIMELINE:
            end = start + phase.length * phase_s
            if phase.target:
                faults = dict(phase.faults)
                if "refuse_s" in faults:
                    faults["refuse_s"] = end - start
                await set_faults(http, stack.urls[phase.target], phase.target, faults)
            bounds.append((start, end, phase))
            while (due := n / RATE) < end:
                await asyncio.sleep(max(0.0, t0 + due - time.monotonic()))
                task = asyncio.ensure_future(one(stub, calls, t0))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            if phase.target and "refuse_s" not in phase.faults:
                await set_faults(http, stack.urls[phase.target], phase.target, {})
            start = end
        await asyncio.gather(*tasks)
        stop.set()
        await scraper
    return calls, samples, bounds


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def delta(samples: list[tuple[float, dict[str, float]]], t0: float, t1: float) -> dict[str, float]:
    """Attempts per endpoint between the samples nearest t0 and t1."""
    first = min(samples, key=lambda s: abs(s[0] - t0))[1]
    last = min(samples, key=lambda s: abs(s[0] - t1))[1]
    return {n: last[n] - first[n] for n in (*NAMES, *DECISIONS)}


def share_at(samples: list[tuple[float, dict[str, float]]], t: float, name: str) -> float:
    d = delta(samples, t - 1.0, t)
    total = sum(d[n] for n in NAMES)
    return d[name] / total if total else 0.0


def divert_and_return(samples: list[tuple[float, dict[str, float]]], start: float, end: float,
                      name: str) -> tuple[float | None, float | None]:
    """Seconds from the fault's start until `name`'s share of attempts over the last second is
    below 5 % (None: never in the phase), and from its end until back to 15 % (None: not by
    the end of the next phase)."""
    times = [t for t, _ in samples]
    divert = next((t - start for t in times if start + 0.25 <= t <= end and share_at(samples, t, name) < 0.05), None)
    back = next((t - end for t in times if end + 0.25 <= t <= end + 15.0 and share_at(samples, t, name) >= 0.15), None)
    return divert, back


def report(calls: list[Call], samples: list[tuple[float, dict[str, float]]],
           bounds: list[tuple[float, float, Phase]]) -> str:
    lines = ["| phase | s | calls | errors | p50 ms | p99 ms | max ms | attempts/call | share A/B/C of attempts | "
             "divert s | return s | max share while all healthy | agent decisions |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ready = 0.0  # when every instance is back: the last fault's end plus its return time
    for start, end, phase in bounds:
        mine = [c for c in calls if start <= c.sent < end]
        lat = [c.latency_s * 1e3 for c in mine]
        d = delta(samples, start, end)
        total = sum(d[n] for n in NAMES) or 1.0
        decided = ", ".join(f"{k} {d[k]:.0f}" for k in DECISIONS if d[k])
        shares = "/".join(f"{100 * d[n] / total:.0f}%" for n in NAMES)
        divert = back = ""
        if phase.target:
            a, b = divert_and_return(samples, start, end, phase.target)
            divert = "never" if a is None else f"{a:.2f}"
            back = "> 15" if b is None else f"{b:.2f}"
            ready = end + (b if b is not None else 15.0)
        healthy = ""
        if not phase.target and phase.name != "warm-up":  # the busiest instance's 1 s share, at worst,
            ts = [t for t, _ in samples if max(start, ready) + 1.0 <= t <= end]  # once all are back
            worst = max((share_at(samples, t, n) for t in ts for n in NAMES), default=None)
            healthy = "not all back" if worst is None else f"{100 * worst:.0f}%"
        errors = sum(not c.ok for c in mine)
        lines.append(f"| {phase.name} | {end - start:.0f} | {len(mine)} | {errors} | {pct(lat, 0.5):.0f} | "
                     f"{pct(lat, 0.99):.0f} | {max(lat, default=0):.0f} | {total / max(1, len(mine)):.2f} | {shares} | "
                     f"{divert} | "
                     f"{back} | {healthy} | {decided} |")
    lat = [c.latency_s * 1e3 for c in calls]
    kinds = sorted({c.error for c in calls if not c.ok})
    d = delta(samples, 0.0, bounds[-1][1])
    lines.append(f"| **whole run** | {bounds[-1][1]:.0f} | {len(calls)} | {sum(not c.ok for c in calls)} "
                 f"{' '.join(kinds)} | {pct(lat, 0.5):.0f} | {pct(lat, 0.99):.0f} | {max(lat, default=0):.0f} | "
                 f"{sum(d[n] for n in NAMES) / max(1, len(calls)):.2f} | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tail", description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", type=float, default=15.0, help="seconds of a fault phase (default 15)")
    parser.add_argument("--out", default="", help="also write every call and counter sample as JSON here")
    parser.add_argument("--hedge-min-priority", type=int, default=1, choices=range(1, 12), metavar="1..11",
                        help="the llm policy's hedge_min_priority (calls are priority 5; 11 = no hedging)")
    parser.add_argument("--report", default="", metavar="RUN_JSON", help="only print the table of a saved --out")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        phases = {p.name: p for p in TIMELINE}
        print(report([Call(**c) for c in saved["calls"]], [(t, v) for t, v in saved["samples"]],
                     [(s, e, phases[name]) for s, e, name in saved["phases"]]))
        return 0
    with tempfile.TemporaryDirectory(prefix="sg-tail-") as tmp:
        stack = Stack(Path(tmp), hedge_min_priority=args.hedge_min_priority)
        try:
            stack.start()
            calls, samples, bounds = asyncio.run(drive(stack, args.phase))
        finally:
            stack.stop()
    print(report(calls, samples, bounds))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "calls": [c.__dict__ for c in calls], "samples": samples,
            "phases": [(s, e, p.name) for s, e, p in bounds]}))
    return 0
