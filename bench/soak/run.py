"""A soak: an agent and a control plane under steady mixed traffic for a set time, and what
their resources and latency look like at the start and at the end.

One command (`make soak`, or `python -m bench.soak --seconds 1800`) starts an OpenAI emulator
with two instances (`steady`, and `flappy`, which fails every call for `--flap-down` seconds out
of every `--flap-period`), a control plane (admin and agent tokens on) and one agent (client keys
on, response cache on, /metrics), creates two tenants, then sends `--rate` requests per second,
open loop, through the agent's HTTP front door, cycling through:

- chat, a new question each time (cache misses; the `chat` service has both instances, so
  the flapping one's failures are retried on the steady one or it is ejected),
- chat, one of a few repeated questions (cache hits after the first),
- chat streamed (SSE; never cached),
- embeddings,
- chat as the tenant limited to `--limited-rpm` requests per minute (quota rejections, HTTP 429).

Every `--sample` seconds it records the agent's and the control plane's RSS, open file
descriptors and threads (/proc), and the agent's asyncio tasks (its /metrics). "start" is the
window of `--window` seconds after `--warmup`; "end" the last `--window` seconds. The agent's
RSS climbs while its response cache fills up to `--cache-mb` (every chat miss and embedding is
cached), so the warm-up must outlast that. Reported per
window: mean RSS, fds, threads and tasks, and the p99 of the unary calls that were answered
200. The verdict lines apply the issue's targets (RSS growth < 5 %, no fd or task growth, p99
within 10 %); `check` applies looser bounds for the short run in the test suite.

A p99 on a shared machine moves with the neighbours, so each window also reports figures that
do not: the agent's CPU per call (/proc), its garbage collections and their pauses (the agent
runs under bench/soak/probe.py, which also counts its live objects by type at the start
window's end, half-way and the end), the machine's load average, and beside the window's p99
the median of its per-minute p99s and the p99 of the calls its first upstream attempt served
(a call that met the flapping instance waits out a retry). Both windows span the same length,
start at the same phase of the flap, and hold the same mix of calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.overhead.run import rss_mb
from bench.soak.probe import ask
from switchgear.admin_client import admin_channel
from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc, governance_pb2, governance_pb2_grpc

LIMITED_RPM = 30
REPEATED = ("What is a circuit breaker?", "What is a token bucket?", "What is a snapshot?")
KINDS = ("chat", "cached", "stream", "embed", "chat", "limited", "cached", "chat", "embed", "stream")

CONFIG = """\
external_services:
  communication:
    caching:
      enabled: true
    retry_policy: {{max_retries: 1, backoff_strategy: "exponential", base_delay: 0.05, max_delay: 0.5}}
  services:
    llm_services:
      local_models:
        - name: "chat"
          model: "gpt-4o-mini"
          timeout: 10
          endpoints: [{{id: "steady", url: "{steady}/v1"}}, {{id: "flappy", url: "{flappy}/v1"}}]
    embedding_services:
      local:
        protocol: openai
        endpoint: "{steady}/v1"
        models:
          - name: "text-embedding-3-small"
"""


@dataclass
class Sample:
    t: float  # seconds since traffic started
    agent_rss_mb: float
    agent_fds: int
    agent_threads: int
    agent_tasks: float
    cp_rss_mb: float
    cp_fds: int
    cp_threads: int
    agent_cpu_s: float = 0.0  # user + system CPU seconds since the agent started (/proc)
    gc_collections: list[int] = field(default_factory=list)  # by generation, since the agent started (probe)
    gc_pause_s: list[float] = field(default_factory=list)  # by generation, likewise
    load1: float = 0.0  # the machine's one-minute load average


@dataclass
class Call:
    t: float
    kind: str
    status: int
    ms: float
    attempts: int = 0  # upstream attempts the agent made (x-switchgear-attempts; 0: not said)


@dataclass
class Window:
    name: str
    agent_rss_mb: float
    agent_fds: float
    agent_threads: float
    agent_tasks: float
    cp_rss_mb: float
    cp_fds: float
    cp_threads: float
    p99_ms: float
    calls: int
    ok: int
    lo: float = 0.0  # seconds since traffic started
    hi: float = 0.0
    p50_ms: float = float("nan")  # unary calls answered 200, like p99_ms
    first_attempt_p99_ms: float = float("nan")  # of those, the calls the first upstream attempt served
    median_minute_p99_ms: float = float("nan")  # the median of the window's per-minute unary p99s
    kinds: dict[str, int] = field(default_factory=dict)  # calls sent, by kind
    cpu_ms_per_call: float = float("nan")  # the agent's CPU over the window / calls sent in it
    gc2_collections: int = 0  # full collections in the window
    gc2_pause_ms: float = 0.0  # their total pause
    gc_pause_ms_per_1k: float = float("nan")  # pauses of every generation per 1,000 calls
    load1: float = float("nan")  # the machine's mean one-minute load average
    live_objects: int = 0  # after a full collection at the window's end (frozen start-up heap excluded)
    # the fewest descriptors and tasks a sample saw: calls in flight add to both for a moment,
    # more when the machine is busy; a leak raises the floor
    agent_fds_min: float = 0.0
    agent_tasks_min: float = 0.0


@dataclass
class Report:
    seconds: float
    rate: float
    start: Window
    end: Window
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> status -> count
    upstream: dict[str, dict[str, int]] = field(default_factory=dict)  # instance -> the emulator's outcomes
    samples: list[Sample] = field(default_factory=list)
    # object types that grew most between the probe's counts: from the start window's end to
    # half-way through the rest, and from there to the end (a leak grows in both halves; a
    # bounded cache filling up, or a one-off, does not)
    grown_types: list[tuple[str, int]] = field(default_factory=list)
    grown_late: list[tuple[str, int]] = field(default_factory=list)
    late_calls: int = 0  # calls sent in the second half
    grown_sites: list[dict[str, object]] = field(default_factory=list)  # allocation sites, with --tracemalloc
    probe_error: str = ""  # what the agent's probe said went wrong counting objects

    def growth(self, attr: str) -> float:
        before = getattr(self.start, attr)
        return (getattr(self.end, attr) - before) / before if before else 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


class Soak:
    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir, self.args = workdir, args
        self.procs: list[Proc] = []

    def _start(self, proc: Proc, **kw: str) -> str:
        self.procs.append(proc)
        return proc.start(**kw)  # type: ignore[arg-type]

    def up(self) -> None:
        ports = json.loads("{" + self._start(Proc.switchgear(
            "emulator", ["emulate", "openai", "--instance", "steady:2", "--instance", "flappy:2"], self.workdir),
            ready_prefix="{"))
        self.steady, self.flappy = (f"http://127.0.0.1:{ports[n]}" for n in ("steady", "flappy"))
        db = self.workdir / "r.db"
        self.cp_proc = Proc.switchgear("controlplane", [
            "controlplane", "--db", str(db), "--listen", "127.0.0.1:0", "--log-level", "warning"], self.workdir)
        self.cp = self._start(self.cp_proc)
        self.admin_token = Path(f"{db}.admin-token").read_text().strip()
        self.probe = str(self.workdir / "probe.sock")
        env = {"SOAK_PROBE_SOCKET": self.probe, "SOAK_TRACEMALLOC": "1" if self.args.tracemalloc else "0"}
        self.agent = Proc("agent", [sys.executable, "-m", "bench.soak.probe",
            "agent", "--control-plane", self.cp, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--agent-token-file", f"{db}.agent-token", "--log-level", "warning",
            "--ejection-time", "2", "--breaker-open", "2", "--cache-bytes", str(self.args.cache_mb << 20)],
            self.workdir, env)
        self._start(self.agent)
        self.http = "http://" + self.agent.wait_line("HTTP ", 10).split()[1]
        self.metrics = "http://" + self.agent.wait_line("METRICS ", 10).split()[1] + "/metrics"
        channel = admin_channel(self.cp, self.admin_token)
        admin_pb2_grpc.AdminServiceStub(channel).ApplyConfig(admin_pb2.ApplyConfigRequest(
            yaml=CONFIG.format(steady=self.steady, flappy=self.flappy), source="soak.yaml"), timeout=10)
        gov = governance_pb2_grpc.GovernanceServiceStub(channel)
        self.keys = {}
        for tenant, policy in (("main", governance_pb2.TenantPolicy()),
                               ("limited", governance_pb2.TenantPolicy(requests_per_minute=self.args.limited_rpm))):
            gov.CreateTenant(governance_pb2.CreateTenantRequest(
                tenant=governance_pb2.Tenant(id=tenant, policy=policy)), timeout=5)
            self.keys[tenant] = str(gov.IssueKey(governance_pb2.IssueKeyRequest(tenant=tenant), timeout=5).secret)
        self._wait_serving()

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + 30
        while True:  # the agent holds the services and both keys
            codes = {httpx.post(f"{self.http}/v1/chat/completions", json=_chat("ready?"), timeout=5,
                                headers=_auth(key)).status_code for key in self.keys.values()}
            if codes == {200}:
                return
            assert time.monotonic() < deadline, f"agent not serving: {codes}"
            time.sleep(0.2)

    def upstream(self) -> dict[str, dict[str, int]]:
        return {name: dict(httpx.get(f"{url}/_emulator/stats", timeout=5).json()["by_outcome"])
                for name, url in (("steady", self.steady), ("flappy", self.flappy))}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def sample(self, t: float) -> Sample:
        tasks = float("nan")
        try:
            for line in httpx.get(self.metrics, timeout=5).text.splitlines():
                if line.startswith("switchgear_event_loop_tasks "):
                    tasks = float(line.split()[1])
        except httpx.HTTPError:
            pass
        a, c = self.agent.pid, self.cp_proc.pid
        gc_figures = ask(self.probe, "gc")
        return Sample(t, rss_mb(a), fds(a), threads(a), tasks, rss_mb(c), fds(c), threads(c), cpu_s(a),
                      gc_figures["collections"], gc_figures["pause_s"], load1())

    def objects(self) -> dict[str, Any]:
        """The agent's live objects by type (and, with --tracemalloc, what grew since last asked)."""
        return ask(self.probe, "objects")


async def drive(soak: Soak, seconds: float, rate: float, sample_s: float,
                objects: list[dict[str, Any]]) -> tuple[list[Call], list[Sample]]:
    """Open-loop traffic at `rate` per second for `seconds`, the flapping upstream and sampling;
    the agent's objects are counted at the start window's end and after the traffic."""
    calls: list[Call] = []
    samples: list[Sample] = []
    pending: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        start = time.monotonic()
        flapper = asyncio.ensure_future(flap(client, soak, soak.args.flap_period, soak.args.flap_down))
        sampler = asyncio.ensure_future(sample_every(soak, start, sample_s, samples))
        counter = asyncio.ensure_future(count_objects(soak, start, samples, objects))
        n = 0
        while time.monotonic() - start < seconds:
            kind = KINDS[n % len(KINDS)]
            task = asyncio.ensure_future(one_call(client, soak, kind, n, start, calls))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.gather(*pending)
        for background in (flapper, sampler, counter):
            background.cancel()
        await asyncio.gather(flapper, sampler, counter, return_exceptions=True)
        samples.append(await asyncio.to_thread(soak.sample, time.monotonic() - start))
        objects.append(await asyncio.to_thread(soak.objects))
    return calls, samples


async def count_objects(soak: Soak, start: float, samples: list[Sample], objects: list[dict[str, Any]]) -> None:
    """At the start window's end a sample (so the window's figures close before the probe's full
    collection runs), then the objects; the objects again half-way to the end."""
    await asyncio.sleep(max(0.0, start + soak.args.start_hi - time.monotonic()))
    samples.append(await asyncio.to_thread(soak.sample, soak.args.start_hi))
    objects.append(await asyncio.to_thread(soak.objects))
    await asyncio.sleep(max(0.0, start + soak.args.mid - time.monotonic()))
    objects.append(await asyncio.to_thread(soak.objects))


async def one_call(client: httpx.AsyncClient, soak: Soak, kind: str, n: int, start: float, calls: list[Call]) -> None:
    key = soak.keys["limited" if kind == "limited" else "main"]
    body: dict[str, object]
    if kind == "embed":
        path, body = "/v1/embeddings", {"model": "text-embedding-3-small", "input": [f"soak text {n}"]}
    elif kind == "cached":
        path, body = "/v1/chat/completions", _chat(REPEATED[n % len(REPEATED)])
    else:
        path, body = "/v1/chat/completions", {**_chat(f"question {n}"), "stream": kind == "stream"}
    began = time.monotonic()
    attempts = "0"
    try:
        if kind == "stream":
            async with client.stream("POST", soak.http + path, json=body, headers=_auth(key)) as response:
                async for _ in response.aiter_bytes():
                    pass
                status = response.status_code
        else:
            response = await client.post(soak.http + path, json=body, headers=_auth(key))
            status, attempts = response.status_code, response.headers.get("x-switchgear-attempts", "0")
    except httpx.HTTPError:
        status = 0
    calls.append(Call(began - start, kind, status, (time.monotonic() - began) * 1000,
                      int(attempts) if attempts.isdigit() else 0))


async def flap(client: httpx.AsyncClient, soak: Soak, period_s: float, down_s: float) -> None:
    """The `flappy` instance fails every call for `down_s` of every `period_s` seconds."""
    while True:
        await client.post(f"{soak.flappy}/_emulator/faults", json={"error_rate": 1.0})
        await asyncio.sleep(down_s)
        await client.post(f"{soak.flappy}/_emulator/faults", json={"reset": True})
        await asyncio.sleep(period_s - down_s)


async def sample_every(soak: Soak, start: float, every_s: float, samples: list[Sample]) -> None:
    while True:
        samples.append(await asyncio.to_thread(soak.sample, time.monotonic() - start))
        await asyncio.sleep(every_s)


def _chat(text: str) -> dict[str, object]:
    return {"model": "chat", "messages": [{"role": "user", "content": text}], "max_tokens": 8}


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


UNARY = ("chat", "cached", "embed")


def window(name: str, lo: float, hi: float, calls: list[Call], samples: list[Sample]) -> Window:
    inside = sorted((s for s in samples if lo <= s.t <= hi), key=lambda s: s.t) or [
        min(samples, key=lambda s: abs(s.t - lo))]
    answered = [c for c in calls if lo <= c.t < hi]
    unary = [c for c in answered if c.status == 200 and c.kind in UNARY]
    unary_ok = [c.ms for c in unary]

    def mean(attr: str) -> float:
        return float(sum(getattr(s, attr) for s in inside)) / len(inside)

    w = Window(name, mean("agent_rss_mb"), mean("agent_fds"), mean("agent_threads"), mean("agent_tasks"),
               mean("cp_rss_mb"), mean("cp_fds"), mean("cp_threads"), percentile(unary_ok, 0.99),
               len(answered), sum(c.status == 200 for c in answered), lo, hi)
    w.p50_ms = percentile(unary_ok, 0.5)
    w.agent_fds_min = min(s.agent_fds for s in inside)
    w.agent_tasks_min = min(s.agent_tasks for s in inside)
    w.first_attempt_p99_ms = percentile([c.ms for c in unary if c.attempts == 1], 0.99)
    w.median_minute_p99_ms = median_bucket_p99(unary, lo, hi)
    for c in answered:
        w.kinds[c.kind] = w.kinds.get(c.kind, 0) + 1
    w.load1 = mean("load1")
    first, last = inside[0], inside[-1]
    between = sum(first.t <= c.t < last.t for c in calls)  # the calls sent while the CPU was counted
    if between and first.gc_collections and last.gc_collections:
        w.cpu_ms_per_call = (last.agent_cpu_s - first.agent_cpu_s) * 1000 / between
        w.gc2_collections = last.gc_collections[2] - first.gc_collections[2]
        w.gc2_pause_ms = (last.gc_pause_s[2] - first.gc_pause_s[2]) * 1000
        w.gc_pause_ms_per_1k = (sum(last.gc_pause_s) - sum(first.gc_pause_s)) * 1e6 / between
    return w


def median_bucket_p99(unary: list[Call], lo: float, hi: float) -> float:
    """The median of the p99s of the window's minutes (thirds, in a window under two minutes):
    one slow minute, a neighbour's burst, moves it less than the window's p99."""
    span = 60.0 if hi - lo >= 120 else (hi - lo) / 3
    buckets: dict[int, list[float]] = {}
    for c in unary:
        buckets.setdefault(int((c.t - lo) // span), []).append(c.ms)
    p99s = sorted(percentile(ms, 0.99) for ms in buckets.values())
    if not p99s:
        return float("nan")
    middle = len(p99s) // 2
    return p99s[middle] if len(p99s) % 2 else (p99s[middle - 1] + p99s[middle]) / 2


def grown_types(before: dict[str, Any], after: dict[str, Any], top: int = 10) -> list[tuple[str, int]]:
    """The object types whose live count grew most between two of the probe's counts."""
    before, after = before.get("by_type", {}), after.get("by_type", {})
    grown = sorted(((name, n - before.get(name, 0)) for name, n in after.items()), key=lambda g: -g[1])
    return [(name, n) for name, n in grown[:top] if n > 0]


def run(args: argparse.Namespace) -> Report:
    with tempfile.TemporaryDirectory(prefix="sg-soak-") as tmp:
        soak = Soak(Path(tmp), args)
        try:
            soak.up()
            objects: list[dict[str, Any]] = []
            calls, samples = asyncio.run(drive(soak, args.seconds, args.rate, args.sample, objects))
            upstream = soak.upstream()
        finally:
            soak.stop()
    start = window("start", args.warmup, args.start_hi, calls, samples)
    end = window("end", args.end_lo, args.end_lo + args.window, calls, samples)
    if objects:
        start.live_objects, end.live_objects = objects[0].get("objects", 0), objects[-1].get("objects", 0)
    statuses: dict[str, dict[str, int]] = {}
    for c in calls:
        by_status = statuses.setdefault(c.kind, {})
        by_status[str(c.status)] = by_status.get(str(c.status), 0) + 1
    return Report(args.seconds, args.rate, start, end, statuses, upstream, sorted(samples, key=lambda s: s.t),
                  grown_types(objects[0], objects[1]) if len(objects) == 3 else [],
                  grown_types(objects[1], objects[2]) if len(objects) == 3 else [],
                  sum(c.t >= args.mid for c in calls), list(objects[-1].get("grown", [])) if objects else [],
                  "; ".join(str(o["error"]) for o in objects if "error" in o))


def fmt(report: Report) -> str:
    lines = ["| window | agent RSS MB | agent fds | agent threads | agent asyncio tasks | CP RSS MB | CP fds "
             "| CP threads | unary p99 ms | calls | 200s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w in (report.start, report.end):
        lines.append(f"| {w.name} | {w.agent_rss_mb:.1f} | {w.agent_fds:.0f} | {w.agent_threads:.0f} | "
                     f"{w.agent_tasks:.0f} | {w.cp_rss_mb:.1f} | {w.cp_fds:.0f} | {w.cp_threads:.0f} | "
                     f"{w.p99_ms:.1f} | {w.calls} | {w.ok} |")
    lines += ["", "| window | seconds | calls by kind | agent CPU ms/call | gen2 GCs | gen2 pause ms | "
              "GC pause ms/1k calls | live objects | load avg 1m | unary p50 ms | unary p99 ms | "
              "first-attempt p99 ms | median minute p99 ms |", "| --- " * 13 + "|"]
    for w in (report.start, report.end):
        kinds = " ".join(f"{k} {n}" for k, n in sorted(w.kinds.items()))
        lines.append(f"| {w.name} | {w.lo:.0f}–{w.hi:.0f} | {kinds} | {w.cpu_ms_per_call:.2f} | "
                     f"{w.gc2_collections} | {w.gc2_pause_ms:.1f} | {w.gc_pause_ms_per_1k:.1f} | "
                     f"{w.live_objects} | {w.load1:.2f} | {w.p50_ms:.1f} | {w.p99_ms:.1f} | "
                     f"{w.first_attempt_p99_ms:.1f} | {w.median_minute_p99_ms:.1f} |")
    lines.append("")
    for half, grown in (("start window's end -> half-way", report.grown_types),
                        (f"half-way -> end ({report.late_calls} calls)", report.grown_late)):
        lines.append(f"object types grown, {half}: " + (", ".join(f"{name} {n:+d}" for name, n in grown) or "none"))
    if report.grown_sites:
        lines.append("allocation sites grown (tracemalloc): " + "; ".join(
            f"{g['site']} {g['kib']:+.0f} KiB" for g in report.grown_sites))
    lines.append("statuses by kind: " + "; ".join(
        f"{kind} " + ", ".join(f"{s}: {n}" for s, n in sorted(by.items()))
        for kind, by in sorted(report.statuses.items())))
    lines.append("upstream outcomes (emulator): " + "; ".join(
        f"{name} {counts}" for name, counts in sorted(report.upstream.items())))
    lines.append(f"agent RSS growth {report.growth('agent_rss_mb'):+.1%} (target < 5 %), control plane "
                 f"{report.growth('cp_rss_mb'):+.1%}; fewest fds {report.start.agent_fds_min:.0f} -> "
                 f"{report.end.agent_fds_min:.0f}, fewest tasks {report.start.agent_tasks_min:.0f} -> "
                 f"{report.end.agent_tasks_min:.0f}; unary p99 {report.growth('p99_ms'):+.1%} (target within 10 %)")
    lines.append(f"per call: agent CPU {report.start.cpu_ms_per_call:.2f} -> {report.end.cpu_ms_per_call:.2f} ms "
                 f"({report.growth('cpu_ms_per_call'):+.1%}), GC pauses {report.start.gc_pause_ms_per_1k:.1f} -> "
                 f"{report.end.gc_pause_ms_per_1k:.1f} ms per 1,000 calls; median minute p99 "
                 f"{report.start.median_minute_p99_ms:.1f} -> {report.end.median_minute_p99_ms:.1f} ms "
                 f"({report.growth('median_minute_p99_ms'):+.1%}), first-attempt p99 "
                 f"{report.growth('first_attempt_p99_ms'):+.1%}; load average {report.start.load1:.2f} -> "
                 f"{report.end.load1:.2f}")
    return "\n".join(lines)


def check(report: Report, rss_growth: float, fd_growth: float, task_growth: float,
          p99_growth: float | None = None) -> list[str]:
    """What is out of bounds (empty: nothing): growth of RSS (a ratio), of the fewest fds and
    tasks a window's samples saw (counts), of the unary p99 (a ratio; None: not checked), plus
    calls that should have succeeded and did not (any kind but the limited tenant's)."""
    problems = [f"the agent's probe failed: {report.probe_error}"] if report.probe_error else []
    if p99_growth is not None and report.growth("p99_ms") > p99_growth:
        problems.append(f"unary p99 {report.start.p99_ms:.1f} -> {report.end.p99_ms:.1f} ms")
    if report.growth("agent_rss_mb") > rss_growth:
        problems.append(f"agent RSS grew {report.growth('agent_rss_mb'):.1%}")
    if report.end.agent_fds_min - report.start.agent_fds_min > fd_growth:
        problems.append(f"agent fds (fewest) {report.start.agent_fds_min:.0f} -> {report.end.agent_fds_min:.0f}")
    if report.end.agent_tasks_min - report.start.agent_tasks_min > task_growth:
        problems.append(f"agent tasks (fewest) {report.start.agent_tasks_min:.0f} -> "
                        f"{report.end.agent_tasks_min:.0f}")
    failed = {kind: {s: n for s, n in by.items() if s != "200"} for kind, by in report.statuses.items()
              if kind != "limited"}
    if any(failed.values()):
        problems.append(f"failed calls: {failed}")
    if not report.statuses.get("limited", {}).get("429"):
        problems.append("the limited tenant was never refused")
    return problems


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 1800)))
    p.add_argument("--rate", type=float, default=float(os.environ.get("SOAK_RATE", 20)), help="requests per second")
    p.add_argument("--warmup", type=float, default=None, help="seconds before the start window (default: 20 %%)")
    p.add_argument("--cache-mb", type=int, default=16,
                   help="the agent's --cache-bytes in MiB: RSS climbs until the cache is full, which must happen "
                        "within the warm-up (16 MiB: ~2 min at 20 requests/s)")
    p.add_argument("--window", type=float, default=None, help="seconds each window spans (default: 10 %%)")
    p.add_argument("--sample", type=float, default=None, help="seconds between samples (default: 1 %%, 1..10)")
    p.add_argument("--limited-rpm", type=int, default=LIMITED_RPM, help="the limited tenant's requests per minute")
    p.add_argument("--flap-period", type=float, default=30.0)
    p.add_argument("--flap-down", type=float, default=10.0)
    p.add_argument("--tracemalloc", action="store_true",
                   help="trace the agent's allocations and report the sites that grew (slows the agent: "
                        "for finding a leak, not for the latency figures)")
    p.add_argument("--out", default="", help="also write the report as JSON here")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    args.warmup = args.seconds * 0.2 if args.warmup is None else args.warmup
    args.window = args.seconds * 0.1 if args.window is None else args.window
    args.sample = min(10.0, max(1.0, args.seconds / 100)) if args.sample is None else args.sample
    # Both windows start at the same phase of the flap and span the same whole number of its
    # periods, so both see the flapping instance down for the same share of the time.
    period = args.flap_period
    if args.window >= period:
        args.window -= args.window % period
        args.warmup -= args.warmup % period
    args.start_hi = args.warmup + args.window
    args.mid = (args.start_hi + args.seconds) / 2  # the probe's second count of objects
    args.end_lo = args.seconds - args.window
    if args.window >= period:
        args.end_lo -= (args.end_lo - args.warmup) % period
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    report = run(args)
    print(fmt(report))
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(report), indent=2))
    problems = check(report, rss_growth=0.05, fd_growth=0, task_growth=0, p99_growth=0.10)
    print("targets met" if not problems else "targets missed: " + "; ".join(problems))
    return 0
