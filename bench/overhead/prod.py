"""The production-settings agent of `python -m bench.overhead` (modes `prod-*`).

Beside the bare agent (auth none, no Redis, cache off, no tracing) the same run starts a second
control plane and agent configured as a deployment would be:

- client keys on (`--auth api_key`): one tenant, one key, sent as `Authorization: Bearer`;
- the tenant limited on every axis (requests and tokens per minute, budgets per hour and day,
  tenant-wide and on the service), high enough never to refuse here, counted in a real
  redis-server (`--redis`), which also shares the response cache;
- the response cache on (`communication.caching.enabled`) with prices on both services, so
  budgets count real cost;
- tracing on at a 1 % sample ratio, exported by OTLP/HTTP to a real receiver (`oteltap`);
- Prometheus-style scraping of `--metrics-listen` every 15 s by a thread of this process
  (the Prometheus server itself is not installed here).

Modes: `prod-http` (cache misses: every request's body is unique), `prod-http-hit` (one body,
stored before the run: every request is a hit) and `prod-grpc-hit`. There is no gRPC miss
mode: h2load sends one body, and `cache-control: no-cache` would not make misses of it —
identical concurrent calls share one upstream call (pipeline.py's single flight).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import grpc
import httpx

from switchgear.supervise import Proc
from switchgear.v1 import governance_pb2, governance_pb2_grpc

PROD_MODES = ("prod-http", "prod-http-hit", "prod-grpc-hit")
SAMPLE_RATIO = 0.01
SCRAPE_INTERVAL_S = 15.0

def prod_config(bare: str) -> str:
    """The bare agent's config (bench.yaml) with the response cache on and prices on every service."""
    assert "  communication:\n" in bare and "          timeout: 10\n" in bare
    return (bare.replace("  communication:\n", "  communication:\n    caching: {enabled: true}\n")
            .replace("          timeout: 10\n", "          timeout: 10\n          cost_per_1k_tokens: 0.0001\n"))


#: Limits on every axis, far above what a few minutes of benchmark spend: every request goes
#: through the whole admission and accounting path and none is refused.
_LIMITS = {"requests_per_minute": 4_000_000_000, "tokens_per_minute": 10**15,
           "budget_per_hour_usd": 1e9, "budget_per_day_usd": 1e10}


class Scraper(threading.Thread):
    """GET /metrics every `interval_s` (what a Prometheus server would do); counts scrapes."""

    def __init__(self, url: str, interval_s: float = SCRAPE_INTERVAL_S) -> None:
        super().__init__(daemon=True, name="scraper")
        self.url, self.interval_s = url, interval_s
        self.scrapes = self.failures = self.bytes = 0
        self._stop = threading.Event()

    def run(self) -> None:
        while True:
            try:
                body = httpx.get(self.url, timeout=5).content
                self.scrapes += 1
                self.bytes = len(body)
            except httpx.HTTPError:
                self.failures += 1
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()


class ProdAgent(NamedTuple):
    """One production agent of a ProdStack (`--workers N`: the supervisor's process)."""

    proc: Proc
    grpc_address: str
    http_address: str
    metrics_url: str


class ProdStack:
    """Redis, an OTLP receiver, a control plane with governance, and the production agent."""

    def __init__(self, workdir: Path, ports: dict[str, int], workers: tuple[int, ...] = (1,),
                 sched_slice_us: int = 0) -> None:
        self.workdir = workdir / "prod"
        self.workdir.mkdir()
        self.ports = ports
        self.workers = workers  # one production agent per count (`--workers N`), sharing the rest
        self.by_workers: dict[int, ProdAgent] = {}
        self.sched_slice_us = sched_slice_us  # the production agents' --sched-slice-us (0: not passed)
        self.procs: list[Proc] = []
        self.redis: subprocess.Popen[bytes] | None = None
        self.tap: subprocess.Popen[bytes] | None = None
        self.spans_path = self.workdir / "spans.ndjson"
        self.key = ""

    def start(self) -> None:
        self._start_redis()
        otlp_port = _free_port()
        self._start_tap(otlp_port)
        config = self.workdir / "prod.yaml"
        config.write_text(prod_config((self.workdir.parent / "bench.yaml").read_text()))
        cp = Proc.switchgear("controlplane", ["controlplane", "--admin-auth", "none", "--db",
                                              str(self.workdir / "r.db"), "--listen", "127.0.0.1:0", "--config",
                                              str(config), "--log-level", "warning"], self.workdir)
        self.procs.append(cp)
        cp_address = cp.start()
        self.key = _tenant_key(cp_address)
        for n in self.workers:
            self.by_workers[n] = self._agent(n, cp_address, otlp_port)
        first = self.by_workers[self.workers[0]]
        self.agent, self.grpc_address, self.http_address, self.metrics_url = first
        self.scrapers = [Scraper(agent.metrics_url) for agent in self.by_workers.values()]
        self.scraper = self.scrapers[0]
        for scraper in self.scrapers:
            scraper.start()

    def _agent(self, workers: int, cp_address: str, otlp_port: int) -> ProdAgent:
        argv = ["agent", "--auth", "api_key", "--control-plane", cp_address, "--listen", "127.0.0.1:0",
                "--http-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--redis", self.redis_url,
                "--otlp-endpoint", f"http://127.0.0.1:{otlp_port}", "--trace-sample-ratio", str(SAMPLE_RATIO),
                "--log-level", "warning", *(("--workers", str(workers)) if workers != 1 else ()),
                *(("--sched-slice-us", str(self.sched_slice_us)) if self.sched_slice_us else ())]
        token = self.workdir / "r.db.agent-token"
        if token.exists():
            argv += ["--agent-token-file", str(token)]
        agent = Proc.switchgear("agent-prod" if workers == self.workers[0] else f"agent-prod-w{workers}", argv,
                                self.workdir)
        self.procs.append(agent)
        grpc_address = agent.start()
        http_address = agent.wait_line("HTTP ", 20)[5:].strip()
        metrics_url = f"http://{agent.wait_line('METRICS ', 20)[8:].strip()}/metrics"
        deadline = time.monotonic() + 20
        while True:  # the agent serves once it holds the snapshot and the key (each worker: several connections)
            answers = [httpx.post(f"http://{http_address}/v1/chat/completions", headers=self.auth,
                                  json={"messages": [{"role": "user", "content": "warm"}], "max_tokens": 8,
                                        "model": "bench-0ms"}, timeout=5) for _ in range(1 if workers == 1 else 8)]
            if all(r.status_code == 200 for r in answers):
                break
            assert time.monotonic() < deadline, f"production agent not serving: {answers[-1].status_code}"
            time.sleep(0.1)
        return ProdAgent(agent, grpc_address, http_address, metrics_url)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def redis_url(self) -> str:
        return f"unix://{self.workdir / 'redis.sock'}"

    def cache_hits(self, metrics_url: str) -> int:
        text = httpx.get(metrics_url, timeout=5).text
        match = re.search(r"^switchgear_cache_hits_total (\S+)$", text, re.M)
        return int(float(match.group(1))) if match else 0

    def spans(self) -> int:
        """Spans the OTLP receiver printed (one NDJSON line per span)."""
        if not self.spans_path.exists():
            return 0
        return sum(1 for line in self.spans_path.read_text(errors="replace").splitlines() if '"span' in line.lower())

    def redis_cpu_s(self) -> float:
        from bench.overhead.run import cpu_s

        return cpu_s(self.redis.pid) if self.redis is not None else 0.0

    def stop(self) -> None:
        for scraper in getattr(self, "scrapers", ()):
            scraper.stop()
        for proc in reversed(self.procs):
            proc.stop()
        for child in (self.tap, self.redis):
            if child is not None:
                child.terminate()
                child.wait(timeout=10)

    def _start_tap(self, port: int) -> None:
        if importlib.util.find_spec("oteltap") is None:
            raise SystemExit("prod modes need an OTLP receiver: pip install oteltap")
        with self.spans_path.open("wb") as out:
            self.tap = subprocess.Popen([sys.executable, "-m", "oteltap", "--port", str(port)], stdout=out,
                                        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                assert self.tap.poll() is None, "oteltap exited at start"
                assert time.monotonic() < deadline, "oteltap did not listen in time"
                time.sleep(0.05)

    def _start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("prod modes need redis-server (apt-get install redis-server)")
        sock = self.workdir / "redis.sock"
        self.redis = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(sock), "--save", "",
                                       "--appendonly", "no", "--dir", str(self.workdir)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert self.redis.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not open its socket"
            time.sleep(0.02)


def _tenant_key(cp_address: str) -> str:
    with grpc.insecure_channel(cp_address) as channel:
        gov = governance_pb2_grpc.GovernanceServiceStub(channel)
        quota = governance_pb2.ServiceQuota(**_LIMITS)  # type: ignore[arg-type]
        policy = governance_pb2.TenantPolicy(**_LIMITS, services={"bench-0ms": quota, "bench-20ms": quota})  # type: ignore[arg-type]
        gov.CreateTenant(governance_pb2.CreateTenantRequest(tenant=governance_pb2.Tenant(id="bench", policy=policy)),
                         timeout=10)
        return str(gov.IssueKey(governance_pb2.IssueKeyRequest(tenant="bench"), timeout=10).secret)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_body_lua(body_json: str, headers: dict[str, str]) -> str:
    """A wrk script whose every request has a body no earlier request had (cache misses)."""
    prefix, _, suffix = body_json.partition('"benchmark"')
    assert suffix, "the chat body must hold the text 'benchmark'"
    head = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    run = f"{os.getpid()}-{time.time_ns()}"
    return (
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n{head}'
        "local n = 0\n"
        "request = function()\n"
        "  n = n + 1\n"
        f"  return wrk.format(nil, nil, nil, [[{prefix}\"benchmark {run}-]] .. n .. [[\"{suffix}]])\n"
        "end\n"
    )


def summary(stack: ProdStack) -> str:
    pairs = zip(stack.workers, stack.scrapers, strict=True)
    scrapes = "; ".join(f"--workers {n}: {s.scrapes} scrapes of /metrics every {s.interval_s:g} s ({s.bytes:,} "
                        f"bytes the last, {s.failures} failed)" for n, s in pairs)
    return (f"production agents: {stack.spans()} spans received by the OTLP receiver (sample ratio "
            f"{SAMPLE_RATIO:g}); {scrapes}; redis-server CPU {stack.redis_cpu_s():.1f} s in all")


__all__ = ["PROD_MODES", "ProdAgent", "ProdStack", "json", "summary", "unique_body_lua"]
