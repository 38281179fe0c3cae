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

wrk and h2load are compiled load generators (Debian `wrk`, `nghttp2-client`; installed with
apt-get when missing and running as root). h2load counts any gRPC status as success, so every
gRPC run is checked against the emulator's own count of answered requests. Percentiles come
from wrk's --latency and h2load's --log-file (per-request durations). CPU seconds of the load
generator (its rusage), the emulator and the agent (/proc/<pid>/stat) are reported per run,
and the agent's RSS at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import orjson

from switchgear.supervise import Proc
from switchgear.v1 import gateway_pb2

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
    """CPU seconds of `pid` and its children (an agent's `--workers` processes)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_measured(argv: list[str], pids: tuple[int, int]) -> tuple[str, float, float, float, float]:
    """(stdout, loadgen cpu s, emulator cpu s, agent cpu s, wall s)."""
    before = [cpu_s(p) for p in pids]
    start = time.monotonic()
    _children_cpu_delta()  # only the load generator's CPU counts below
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False).stdout
    wall = time.monotonic() - start
    after = [cpu_s(p) for p in pids]
    loadgen = _children_cpu_delta()
    return out, loadgen, after[0] - before[0], after[1] - before[1], wall


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
    url: str, body: dict[str, object], concurrency: int, seconds: float, pids: tuple[int, int], workdir: Path
) -> tuple[Run, str]:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{orjson.dumps(body).decode()}]]\n"
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
    out, lg, emu, agent, wall = run_measured(argv, pids)
    try:
        requests, errors, rps, p50, p99 = parse_wrk(out)
    except (AttributeError, ValueError):
        raise RuntimeError(f"unexpected wrk output:\n{out}") from None
    return Run("", 0, concurrency, requests, errors, rps, p50, p99, lg, emu, agent, wall), out


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
) -> tuple[Run, str]:
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
        f"--log-file={log}",
        f"http://{address}/switchgear.v1.GatewayService/Invoke",
    ]
    out, lg, emu, agent, wall = run_measured(argv, pids)
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
    ), out


class Stack:
    def __init__(self, workdir: Path, grpcio: bool = False, workers: tuple[int, ...] = (1,)) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
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
        for _, _, http_address in self.by_workers.values():
            while True:  # an agent serves once it holds the snapshot (each worker: several connections)
                if all(httpx.post(f"http://{http_address}/v1/chat/completions", json={**CHAT, "model": "bench-0ms"},
                                  timeout=5).status_code == 200 for _ in range(8)):
                    break
                assert time.monotonic() < deadline, f"agent at {http_address} not serving"
                time.sleep(0.1)

    def _agent(self, name: str, cp_address: str, grpc_server: str, workers: int = 1) -> tuple[Proc, str, str]:
        argv = ["agent", "--auth", "none", "--control-plane", cp_address, "--listen", "127.0.0.1:0",
                "--http-listen", "127.0.0.1:0", "--grpc-server", grpc_server, "--log-level", "warning",
                "--agent-token-file", str(self.workdir / "r.db.agent-token"), "--workers", str(workers)]
        agent = Proc.switchgear(name, argv, self.workdir)
        self.procs.append(agent)
        grpc_address = agent.start()
        return agent, grpc_address, agent.wait_line("HTTP ", 20)[5:].strip()

    def served(self, instance: str) -> int:
        stats = httpx.get(f"http://127.0.0.1:{self.ports[instance]}/_emulator/stats", timeout=5).json()
        return int(stats["by_outcome"].get("ok", 0))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def per_request(run: Run) -> str:
    """The agent's CPU per request, ms: what bounds one agent's throughput on a free core."""
    return f"{run.agent_cpu_s * 1000 / run.requests:.2f}" if run.mode != "direct" and run.requests else ""


def fmt(runs: list[Run], rss: float) -> str:
    lines = [
        "| upstream | conc | path | req/s | p50 ms | p99 ms | added p50 | added p99 | req/s vs direct | errors "
        "| CPU s: loadgen / emulator / agent | agent CPU ms/req |",
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


def _workers_lines(runs: list[Run]) -> list[str]:
    """--workers 1,N: each N-worker run's req/s as a ratio of the 1-worker run of the same path."""
    one = {(r.mode, r.delay_ms, r.concurrency): r for r in runs if r.workers == 1}
    pairs = [(r, one[(r.mode, r.delay_ms, r.concurrency)]) for r in runs
             if r.workers > 1 and (r.mode, r.delay_ms, r.concurrency) in one]
    lines = [f"--workers {r.workers} vs 1 (same run), {r.mode} {r.delay_ms} ms c={r.concurrency}: "
             f"{r.rps / o.rps:.2f}x req/s; CPU over the run, in cores: load generator "
             f"{r.loadgen_cpu_s / r.seconds:.2f}, emulator {r.emulator_cpu_s / r.seconds:.2f}, agent "
             f"{r.agent_cpu_s / r.seconds:.2f} (1 worker: {o.agent_cpu_s / o.seconds:.2f})"
             for r, o in pairs if o.rps]
    return ["", *lines] if lines else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per run")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--delays", default="20,0", help="upstream delays in ms: 20 and/or 0")
    parser.add_argument("--modes", default="direct,http,grpc,grpcio")
    parser.add_argument("--out", default="", help="also write the runs as JSON here")
    parser.add_argument("--workers", default="1",
                        help="agents' --workers, e.g. 1,2: the http and grpc paths run once per count, each on "
                             "an agent of its own (same control plane and emulator)")
    args = parser.parse_args(argv)
    worker_counts = tuple(int(n) for n in args.workers.split(","))
    ensure_tools()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="sg-overhead-") as tmp:
        workdir = Path(tmp)
        modes = args.modes.split(",")
        stack = Stack(workdir, grpcio="grpcio" in modes, workers=worker_counts)
        try:
            stack.start()
            for delay in (int(d) for d in args.delays.split(",")):
                instance, service = ("fixed", "bench-20ms") if delay == 20 else ("zero", "bench-0ms")
                for conc in (int(c) for c in args.concurrency.split(",")):
                    for mode, n in [(m, n) for m in modes for n in (worker_counts if m in ("http", "grpc")
                                                                    else worker_counts[:1])]:
                        agent, grpc_address, http_address = stack.by_workers[n]
                        agent = stack.agent_grpcio if mode == "grpcio" else agent
                        pids = (stack.emulator.pid, agent.pid)
                        if mode == "direct":
                            run, _ = wrk(
                                f"http://127.0.0.1:{stack.ports[instance]}/v1/chat/completions",
                                {**CHAT, "model": "gpt-4o-mini"},
                                conc,
                                args.seconds,
                                pids,
                                workdir,
                            )
                        elif mode == "http":
                            run, _ = wrk(
                                f"http://{http_address}/v1/chat/completions",
                                {**CHAT, "model": service},
                                conc,
                                args.seconds,
                                pids,
                                workdir,
                            )
                        else:
                            run, _ = h2load(
                                stack.grpcio_address if mode == "grpcio" else grpc_address,
                                service,
                                conc,
                                args.seconds,
                                pids,
                                workdir,
                                functools.partial(stack.served, instance),
                            )
                        run.mode, run.delay_ms, run.workers = mode, delay, n
                        runs.append(run)
                        print(
                            f"  {mode:6} w{n} {delay:>2} ms c={conc:<3} {run.rps:8,.0f} req/s  "
                            f"p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms  errors {run.errors}",
                            flush=True,
                        )
            rss = rss_mb(stack.agent.pid)
        finally:
            stack.stop()
    print()
    print(fmt(runs, rss))
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": [asdict(r) for r in runs], "agent_rss_mb": rss}, indent=2))
    return 0
