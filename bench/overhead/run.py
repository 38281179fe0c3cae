"""What an agent adds: latency and throughput through Switchgear vs calling the upstream directly.

One command (`python -m bench.overhead`, or `make bench-overhead`) starts an OpenAI emulator
with two instances (fixed 20 ms, and zero delay), a control plane and one agent with its HTTP
front door, then for each upstream delay and each concurrency (1, 16, 64) drives:

- direct: wrk → emulator `POST /v1/chat/completions`
- http:   wrk → agent front door `POST /v1/chat/completions` (model = service name)
- grpc:   h2load → agent `switchgear.v1.GatewayService/Invoke` (unary gRPC over h2c), served by
          the agent's own gRPC server (switchgear.rpc, the default)
- grpcio: the same against a second agent started with `--grpc-server grpcio` (grpc.aio), only
          when this mode is asked for: the A/B of the two gRPC servers in one run
- prod-http, prod-http-hit, prod-grpc-hit: a second control plane and agent with production
          settings (client keys, quotas and budgets in a real Redis, the response cache, tracing
          at 1 % to a real OTLP receiver, /metrics scraped every 15 s): see prod.py

`--upstream nginx` puts nginx (nginx.py) in the emulator's place for the zero-delay service and the
direct path, answering the emulator's own body for the bench's request at a few µs of CPU a call:
for `--workers`, where the emulator's half core would be taken from the agent's two.

wrk and h2load are compiled load generators (Debian `wrk`, `nghttp2-client`; installed with
apt-get when missing and running as root). h2load counts any gRPC status as success, so every
gRPC run is checked against the emulator's own count of answered requests. Percentiles come
from wrk's --latency and h2load's --log-file (per-request durations). CPU seconds of the load
generator (its rusage), the upstream and the agent (/proc/<pid>/stat) are reported per run,
and the agent's RSS at the end; with `--workers 1,N`, each N-worker run's ratio to the 1-worker
run and each worker's CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson

from bench.overhead.nginx import Nginx
from bench.overhead.prod import PROD_MODES, ProdStack, summary, unique_body_lua
from switchgear.supervise import Proc
from switchgear.v1 import gateway_pb2, gateway_pb2_grpc

CHAT = {"messages": [{"role": "user", "content": "benchmark"}], "max_tokens": 8}
CLK_TCK = os.sysconf("SC_CLK_TCK")

CONFIG = """\
external_services:
  communication:
    retry_policy: {{max_retries: 1, backoff_strategy: "exponential", base_delay: 0.05, max_delay: 1.0}}
  services:
    llm_services:
      local_models:
        - name: "bench-20ms"
          model: "gpt-4o-mini"
          timeout: 10
          endpoints: [{{id: "fixed", url: "http://127.0.0.1:{fixed}/v1"}}]
        - name: "bench-0ms"
          model: "gpt-4o-mini"
          timeout: 10
          endpoints: [{{id: "zero", url: "http://127.0.0.1:{zero}/v1"}}]
"""


@dataclass
class Run:
    mode: str
    delay_ms: int
    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu_s: float
    emulator_cpu_s: float
    agent_cpu_s: float
    seconds: float
    workers: int = 1  # the agent's --workers (its CPU is the supervisor's and every worker's)
    worker_cpu_s: tuple[float, ...] = ()  # with --workers N > 1: each worker's CPU s over the run
    upstream: str = "emulator"  # what answered: the emulator or nginx (--upstream, zero-delay service only)


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("h2load", "nghttp2-client")) if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing load generators; run: apt-get install -y {' '.join(missing)}")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *missing],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


def cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and its children (an agent's `--workers` processes, nginx's worker)."""
    return sum(cpu_by_process(pid).values())


def cpu_by_process(pid: int) -> dict[int, float]:
    """CPU seconds of `pid` and of each of its children, by pid: the scheduler's own nanosecond
    count (`/proc/<pid>/task/*/schedstat`), not utime + stime, which are sampled at clock ticks and
    overcharge a process that wakes on a timer and sleeps again between ticks."""
    pids = [pid, *children(pid)]
    by_pid: dict[int, float] = {}
    for p in pids:
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # a process that ended meanwhile
            continue
        ticks = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
        total = 0
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
                continue
        by_pid[p] = total / 1e9 if total else ticks  # no schedstat (kernel without CONFIG_SCHED_INFO): ticks
    return by_pid


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid`, in pid order."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    return sorted(found)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


#: --loadgen-sched batch: the load generator (and nginx) run as SCHED_BATCH (see main's help).
LOADGEN_BATCH = [False]


def sched_batch() -> None:
    """Make the calling process SCHED_BATCH: it no longer preempts running tasks when it wakes."""
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def run_measured(argv: list[str], pids: tuple[int, int]) -> tuple[str, float, float, float, float, tuple[float, ...]]:
    """(stdout, loadgen cpu s, upstream cpu s, agent cpu s, wall s, workers' cpu s): the last is each
    worker's CPU s over the run for an agent with `--workers N` (its children), else empty."""
    upstream, agent = pids
    before = (cpu_s(upstream), cpu_by_process(agent))
    start = time.monotonic()
    _children_cpu_delta()  # only the load generator's CPU counts below
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
                         preexec_fn=sched_batch if LOADGEN_BATCH[0] else None).stdout
    wall = time.monotonic() - start
    after = (cpu_s(upstream), cpu_by_process(agent))
    loadgen = _children_cpu_delta()
    split = {p: s - before[1].get(p, 0.0) for p, s in after[1].items()}
    workers = tuple(cpu for p, cpu in split.items() if p != agent)
    return out, loadgen, after[0] - before[0], sum(split.values()), wall, workers


_LAST_CHILDREN = [0.0]


def _children_cpu_delta() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    delta, _LAST_CHILDREN[0] = total - _LAST_CHILDREN[0], total
    return delta


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(out: str) -> tuple[int, int, float, float, float]:
    """(requests, errors, rps, p50 ms, p99 ms) from `wrk --latency` output."""
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return requests, errors, rps, p50, p99


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def wrk(
    url: str, body: dict[str, object], concurrency: int, seconds: float, pids: tuple[int, int], workdir: Path,
    headers: dict[str, str] | None = None, unique: bool = False,
) -> tuple[Run, str]:
    """`unique`: every request's body differs (its text numbered), so none is a cache hit."""
    script = workdir / "post.lua"
    if unique:
        script.write_text(unique_body_lua(orjson.dumps(body).decode(), headers or {}))
    else:
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
            + f"wrk.body = [[{orjson.dumps(body).decode()}]]\n"
        )
    argv = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    out, lg, emu, agent, wall, split = run_measured(argv, pids)
    try:
        requests, errors, rps, p50, p99 = parse_wrk(out)
    except (AttributeError, ValueError):
        raise RuntimeError(f"unexpected wrk output:\n{out}") from None
    return Run("", 0, concurrency, requests, errors, rps, p50, p99, lg, emu, agent, wall, worker_cpu_s=split), out


def grpc_frame(service: str) -> bytes:
    message = gateway_pb2.InvokeRequest(
        service=service, method="chat.completions", payload=orjson.dumps(CHAT)
    ).SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + bytes(message)


def h2load(
    address: str,
    service: str,
    concurrency: int,
    seconds: float,
    pids: tuple[int, int],
    workdir: Path,
    served: Callable[[], int],
    headers: tuple[str, ...] = (),
) -> tuple[Run, str]:
    """`served()`: calls answered so far by whatever really answers them (the emulator, or the
    cache for cache hits); `headers`: more request headers ("name: value")."""
    body = workdir / f"{service}.grpc"
    body.write_bytes(grpc_frame(service))
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)
    before = served()
    argv = [
        "h2load",
        f"-c{concurrency}",
        "-m1",
        "-t1",
        "-D",
        str(int(seconds)),
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        *(arg for header in headers for arg in ("-H", header)),
        f"--log-file={log}",
        f"http://{address}/switchgear.v1.GatewayService/Invoke",
    ]
    out, lg, emu, agent, wall, split = run_measured(argv, pids)
    if not log.exists():
        raise RuntimeError(f"h2load wrote no log:\n{out}")
    durations = sorted(
        int(line.split("\t")[2]) / 1000.0 for line in log.read_text().splitlines() if line.count("\t") >= 2
    )
    done = len(durations)
    answered = served() - before
    # h2load counts any gRPC status as success: the emulator's count says how many really got through.
    errors = max(0, done - answered)
    rps_match = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
    rps = float(rps_match.group(2)) if rps_match else done / max(seconds, 1e-9)
    return Run(
        "",
        0,
        concurrency,
        done,
        errors,
        rps,
        percentile(durations, 0.5),
        percentile(durations, 0.99),
        lg,
        emu,
        agent,
        wall,
        worker_cpu_s=split,
    ), out


class Stack:
    def __init__(self, workdir: Path, grpcio: bool = False, workers: tuple[int, ...] = (1,),
                 upstream: str = "emulator", worker_flags: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.worker_flags = worker_flags  # more agent flags for --workers N > 1 (e.g. --worker-spread kernel)
        self.procs: list[Proc] = []
        self.upstream = upstream  # the zero-delay service's: "emulator" or "nginx" (nginx.py)
        self.nginx: Nginx | None = None
        self.with_grpcio = grpcio
        self.workers = workers
        self.by_workers: dict[int, tuple[Proc, str, str]] = {}  # --workers N -> (agent, gRPC, HTTP address)

    def start(self) -> None:
        emu = Proc.switchgear(
            "emulator", ["emulate", "openai", "--instance", "fixed:20", "--instance", "zero:0"], self.workdir
        )
        self.procs.append(emu)
        self.ports = json.loads("{" + emu.start(ready_prefix="{"))
        self.emulator = emu
        if self.upstream == "nginx":  # the zero-delay service's calls go to nginx, answering the emulator's body
            answer = httpx.post(f"http://127.0.0.1:{self.ports['zero']}/v1/chat/completions",
                                json={**CHAT, "model": "gpt-4o-mini"}, timeout=5)
            answer.raise_for_status()
            self.canned = answer.json()
            self.nginx = Nginx(self.workdir / "nginx", answer.text, sched_batch if LOADGEN_BATCH[0] else None)
            self.ports["zero"] = self.nginx.start()
        config = self.workdir / "bench.yaml"
        config.write_text(CONFIG.format(fixed=self.ports["fixed"], zero=self.ports["zero"]))
        cp = Proc.switchgear(
            "controlplane",
            [
                "controlplane",
                "--admin-auth",
                "none",
                "--db",
                str(self.workdir / "r.db"),
                "--listen",
                "127.0.0.1:0",
                "--config",
                str(config),
                "--log-level",
                "warning",
            ],
            self.workdir,
        )
        self.procs.append(cp)
        cp_address = cp.start()
        for n in self.workers:
            self.by_workers[n] = self._agent("agent" if n == self.workers[0] else f"agent-w{n}", cp_address,
                                             "switchgear", n)
        self.agent, self.grpc_address, self.http_address = self.by_workers[self.workers[0]]
        if self.with_grpcio:
            self.agent_grpcio, self.grpcio_address, _ = self._agent("agent-grpcio", cp_address, "grpcio")
        deadline = time.monotonic() + 20
        for _, grpc_address, http_address in self.by_workers.values():
            while True:  # an agent serves once it holds the snapshot (each worker: several connections)
                answers = [httpx.post(f"http://{http_address}/v1/chat/completions",
                                      json={**CHAT, "model": "bench-0ms"}, timeout=5) for _ in range(8)]
                if all(a.status_code == 200 for a in answers):
                    if self.nginx is not None:
                        check_canned(answers[-1], self.canned)
                        check_usage(grpc_address, self.canned)
                    break
                assert time.monotonic() < deadline, f"agent at {http_address} not serving"
                time.sleep(0.1)

    def _agent(self, name: str, cp_address: str, grpc_server: str, workers: int = 1) -> tuple[Proc, str, str]:
        argv = ["agent", "--auth", "none", "--control-plane", cp_address, "--listen", "127.0.0.1:0",
                "--http-listen", "127.0.0.1:0", "--grpc-server", grpc_server, "--log-level", "warning",
                *(("--workers", str(workers), *self.worker_flags) if workers != 1 else ())]  # (older commits
        # have no --workers)
        token = self.workdir / "r.db.agent-token"
        if token.exists():  # (absent on commits from before agents authenticated: A/B against them)
            argv += ["--agent-token-file", str(token)]
        agent = Proc.switchgear(name, argv, self.workdir)
        self.procs.append(agent)
        grpc_address = agent.start()
        return agent, grpc_address, agent.wait_line("HTTP ", 20)[5:].strip()

    def upstream_pid(self, instance: str) -> int:
        return self.nginx.pid if self.nginx is not None and instance == "zero" else self.emulator.pid

    def served(self, instance: str) -> int:
        if self.nginx is not None and instance == "zero":
            return self.nginx.served()
        stats = httpx.get(f"http://127.0.0.1:{self.ports[instance]}/_emulator/stats", timeout=5).json()
        return int(stats["by_outcome"].get("ok", 0))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        if self.nginx is not None:
            self.nginx.stop()


def check_canned(answer: httpx.Response, canned: dict[str, Any]) -> None:
    """The agent relayed nginx's canned chat.completion: its choices, and its usage (what the
    agent counts for quotas, budgets and metrics) as nginx sent it."""
    body = answer.json()
    usage = canned.get("usage")
    assert isinstance(usage, dict) and usage.get("total_tokens"), f"the canned body has no usage: {canned}"
    for key in ("object", "choices", "usage"):
        assert body.get(key) == canned[key], f"the agent's answer differs from nginx's in {key!r}: {body}"


def check_usage(grpc_address: str, canned: dict[str, Any]) -> None:
    """One gRPC Invoke of the zero-delay service: the usage the agent read from nginx's answer (what
    it counts for quotas, budgets and load reports) is the canned one, not an estimate."""
    with grpc.insecure_channel(grpc_address) as channel:
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(gateway_pb2.InvokeRequest(
            service="bench-0ms", method="chat.completions", payload=orjson.dumps(CHAT)), timeout=10)
    usage = canned["usage"]
    got = (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.estimated)
    assert got == (usage["prompt_tokens"], usage["completion_tokens"], False), f"usage {got}, nginx sent {usage}"


def per_request(run: Run) -> str:
    """The agent's CPU per request, ms: what bounds one agent's throughput on a free core."""
    return f"{run.agent_cpu_s * 1000 / run.requests:.2f}" if run.mode != "direct" and run.requests else ""


def fmt(runs: list[Run], rss: float) -> str:
    lines = [
        "| upstream | conc | path | req/s | p50 ms | p99 ms | added p50 | added p99 | req/s vs direct | errors "
        "| CPU s: loadgen / upstream / agent | agent CPU ms/req |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    direct = {(r.delay_ms, r.concurrency): r for r in runs if r.mode == "direct"}
    for r in runs:
        d = direct.get((r.delay_ms, r.concurrency))
        added50 = f"{r.p50_ms - d.p50_ms:+.2f}" if d and r.mode != "direct" else ""
        added99 = f"{r.p99_ms - d.p99_ms:+.2f}" if d and r.mode != "direct" else ""
        ratio = f"{r.rps / d.rps:.2f}x" if d and r.mode != "direct" and d.rps else ""
        lines.append(
            f"| {r.delay_ms} ms | {r.concurrency} | {r.mode}{f' w{r.workers}' if r.workers > 1 else ''} | "
            f"{r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{added50} | {added99} | {ratio} | {r.errors} | "
            f"{r.loadgen_cpu_s:.1f} / {r.emulator_cpu_s:.1f} / {r.agent_cpu_s:.1f} | {per_request(r)} |"
        )
    grpcio = {(r.delay_ms, r.concurrency): r for r in runs if r.mode == "grpcio"}
    ours = [(r, grpcio[(r.delay_ms, r.concurrency)]) for r in runs
            if r.mode == "grpc" and (r.delay_ms, r.concurrency) in grpcio]
    if ours:
        lines.append("\ngRPC servers, switchgear.rpc vs grpc.aio (same run): " + "; ".join(
            f"{r.delay_ms} ms c={r.concurrency} {r.rps / g.rps:.2f}x req/s, "
            f"{(r.agent_cpu_s / r.requests) / (g.agent_cpu_s / g.requests):.2f}x CPU per call"
            for r, g in ours if g.rps and r.requests and g.requests and g.agent_cpu_s))
    lines.extend(_workers_lines(runs))
    lines.append(f"\nagent RSS after the runs: {rss:.0f} MB")
    return "\n".join(lines)


#: --http-keepalive off: the http path's requests say `Connection: close` (a new connection each).
HTTP_HEADERS: list[dict[str, str] | None] = [None]


def one_run(mode: str, stack: Stack, prod: ProdStack | None, instance: str, service: str, conc: int,
            seconds: float, workdir: Path, workers: int) -> Run:
    """One load run of `mode` against `service` (on the emulator's `instance`), through the agent
    started with `--workers workers` for the http and grpc paths."""
    if mode == "direct":
        url = f"http://127.0.0.1:{stack.ports[instance]}/v1/chat/completions"
        return wrk(url, {**CHAT, "model": "gpt-4o-mini"}, conc, seconds,
                   (stack.upstream_pid(instance), stack.agent.pid), workdir)[0]
    if mode in ("http", "grpc", "grpcio"):
        agent, grpc_address, http_address = stack.by_workers[workers]
        agent = stack.agent_grpcio if mode == "grpcio" else agent
        pids = (stack.upstream_pid(instance), agent.pid)
        if mode == "http":
            return wrk(f"http://{http_address}/v1/chat/completions", {**CHAT, "model": service}, conc,
                       seconds, pids, workdir, HTTP_HEADERS[0])[0]
        address = stack.grpcio_address if mode == "grpcio" else grpc_address
        return h2load(address, service, conc, seconds, pids, workdir, functools.partial(stack.served, instance))[0]
    assert prod is not None
    ours = prod.by_workers[workers]
    pids = (stack.upstream_pid(instance), ours.proc.pid)
    if mode.startswith("prod-http"):
        hit = mode == "prod-http-hit"
        body = {**CHAT, "model": service}
        if hit:  # the first answer is stored: every request of the run is a hit
            httpx.post(f"http://{ours.http_address}/v1/chat/completions", content=orjson.dumps(body),
                       headers={**prod.auth, "Content-Type": "application/json"}, timeout=10).raise_for_status()
        return wrk(f"http://{ours.http_address}/v1/chat/completions", body, conc, seconds, pids, workdir,
                   headers=prod.auth, unique=not hit)[0]
    auth = f"authorization: Bearer {prod.key}"  # prod-grpc-hit
    hits = functools.partial(prod.cache_hits, ours.metrics_url)
    prime = h2load(ours.grpc_address, service, 1, 1, pids, workdir, hits, (auth,))[0]
    assert prime.requests > 0, "the gRPC cache-hit run could not store its answer"
    return h2load(ours.grpc_address, service, conc, seconds, pids, workdir, hits, (auth,))[0]


def _workers_lines(runs: list[Run]) -> list[str]:
    """--workers 1,N: each N-worker run's req/s as a ratio of the 1-worker run of the same path."""
    one = {(r.mode, r.delay_ms, r.concurrency): r for r in runs if r.workers == 1}
    pairs = [(r, one[(r.mode, r.delay_ms, r.concurrency)]) for r in runs
             if r.workers > 1 and (r.mode, r.delay_ms, r.concurrency) in one]
    lines = [f"--workers {r.workers} vs 1 (same run), {r.mode} {r.delay_ms} ms c={r.concurrency}: "
             f"{r.rps / o.rps:.2f}x req/s; CPU over the run, in cores: load generator "
             f"{r.loadgen_cpu_s / r.seconds:.2f}, upstream ({r.upstream}) {r.emulator_cpu_s / r.seconds:.2f}, agent "
             f"{r.agent_cpu_s / r.seconds:.2f} (workers {' + '.join(f'{w / r.seconds:.2f}' for w in r.worker_cpu_s)}; "
             f"1 worker: {o.agent_cpu_s / o.seconds:.2f}); agent CPU per request {per_request(r)} ms "
             f"(1 worker: {per_request(o)})"
             for r, o in pairs if o.rps]
    return ["", *lines] if lines else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per run")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--delays", default="20,0", help="upstream delays in ms: 20 and/or 0")
    parser.add_argument("--modes", default="direct,http,grpc,grpcio",
                        help="direct, http, grpc, grpcio; production settings: " + ", ".join(PROD_MODES))
    parser.add_argument("--upstream", choices=("emulator", "nginx"), default="emulator",
                        help="what answers the zero-delay service (and the direct path): the OpenAI emulator, or "
                             "nginx with the emulator's answer canned (a few µs a call: for --workers, where the "
                             "emulator's CPU would take a core's share from the agent); the 20 ms service stays "
                             "on the emulator")
    parser.add_argument("--loadgen-sched", choices=("normal", "batch"), default="normal",
                        help="scheduling policy of the load generator and nginx: batch (SCHED_BATCH) keeps them "
                             "from preempting the agent each time they wake (~1.7 times a request with --workers 2 "
                             "on 2 cores), as if they ran on other machines; their CPU is counted as ever")
    parser.add_argument("--out", default="", help="also write the runs as JSON here")
    parser.add_argument("--workers", default="1",
                        help="agents' --workers, e.g. 1,2: the http, grpc and prod-* paths run once per count, "
                             "each on an agent of its own (same control plane and emulator; the production agents "
                             "share their control plane, Redis and OTLP receiver)")
    parser.add_argument("--prod-sched-slice-us", type=int, default=0, metavar="US",
                        help="start the production agents with --sched-slice-us US (default: not passed, the "
                             "kernel's slice)")
    parser.add_argument("--worker-flags", default="",
                        help="more agent flags for the agents with --workers N > 1, e.g. '--worker-spread kernel' "
                             "(A/B of the workers' settings against the same 1-worker run)")
    parser.add_argument("--http-keepalive", choices=("on", "off"), default="on",
                        help="off: every request of the http path on a new connection (wrk sends Connection: close): "
                             "the agent's cost per connection, as with clients that do not keep connections alive")
    parser.add_argument("--idle-poll", action="store_true",
                        help="hold the kernel's CPU latency request at 0 µs for the run (/dev/cpu_dma_latency, "
                             "root): idle vCPUs poll instead of halting, to tell the cost of halting from the "
                             "cost of sleeping (README: Session 11)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as held:
        if args.idle_poll:
            held.enter_context(_idle_poll())
        return _main(parser, args)


@contextlib.contextmanager
def _idle_poll() -> Iterator[None]:
    """PM QoS: while the file stays open with 0 written, cpuidle keeps every CPU in its polling
    state (the kernel's documented interface, Documentation/power/pm_qos_interface.rst)."""
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    except OSError as exc:
        raise SystemExit(f"--idle-poll: /dev/cpu_dma_latency: {exc.strerror} (needs root)") from None
    try:
        os.write(fd, struct.pack("i", 0))
        yield
    finally:
        os.close(fd)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    HTTP_HEADERS[0] = {"Connection": "close"} if args.http_keepalive == "off" else None
    worker_counts = tuple(int(n) for n in args.workers.split(","))
    LOADGEN_BATCH[0] = args.loadgen_sched == "batch"
    ensure_tools()
    runs: list[Run] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sg-overhead-") as tmp:
        workdir = Path(tmp)
        modes = args.modes.split(",")
        unknown = [m for m in modes if m not in ("direct", "http", "grpc", "grpcio", *PROD_MODES)]
        if unknown:
            parser.error(f"unknown modes: {', '.join(unknown)}")
        stack = Stack(workdir, grpcio="grpcio" in modes, workers=worker_counts, upstream=args.upstream,
                      worker_flags=tuple(shlex.split(args.worker_flags)))
        prod: ProdStack | None = None
        try:
            stack.start()
            if any(m in PROD_MODES for m in modes):
                prod = ProdStack(workdir, stack.ports, worker_counts, args.prod_sched_slice_us)
                prod.start()
            for delay in (int(d) for d in args.delays.split(",")):
                instance, service = ("fixed", "bench-20ms") if delay == 20 else ("zero", "bench-0ms")
                for conc in (int(c) for c in args.concurrency.split(",")):
                    for mode, n in [(m, n) for m in modes for n in (worker_counts if m in ("http", "grpc", *PROD_MODES)
                                                                    else worker_counts[:1])]:
                        run = one_run(mode, stack, prod, instance, service, conc, args.seconds, workdir, n)
                        run.mode, run.delay_ms, run.workers = mode, delay, n
                        run.upstream = args.upstream if instance == "zero" else "emulator"
                        runs.append(run)
                        print(
                            f"  {mode:13} w{n} {delay:>2} ms c={conc:<3} {run.rps:8,.0f} req/s  "
                            f"p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms  errors {run.errors}",
                            flush=True,
                        )
            rss = rss_mb(stack.agent.pid)
            if prod is not None:
                notes.append(f"production agent RSS after the runs: {rss_mb(prod.agent.pid):.0f} MB (--workers "
                             f"{worker_counts[0]}: the first process)")
                notes.append(summary(prod))
        finally:
            if prod is not None:
                prod.stop()
            stack.stop()
    print()
    print(f"zero-delay upstream: {args.upstream}; load generator{' and nginx' if args.upstream == 'nginx' else ''} "
          f"scheduled {args.loadgen_sched}{f'; workers started with {args.worker_flags}' if args.worker_flags else ''}"
          f"{'; http path without keep-alive' if HTTP_HEADERS[0] else ''}")
    print(fmt(runs, rss))
    for note in notes:
        print(note)
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": [asdict(r) for r in runs], "agent_rss_mb": rss,
                                              "notes": notes}, indent=2))
    return 0
