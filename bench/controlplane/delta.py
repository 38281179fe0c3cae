"""Delta delivery at fleet scale: a real control plane with a large registry, thousands of agent
streams in several client processes, one-service changes.

    python -m bench.controlplane.delta [--agents 10000] [--services 10000] [--procs 2]
                                       [--changes 5] [--whole-agents 50] [--real-agents 4]

Reported:
- bytes per agent of a one-service change, as received on the wire: a delta vs the whole
  snapshot (the whole-snapshot agents of the same run, `--snapshot-delivery whole`);
- change -> ACK: time from the Admin RegisterService that changes one service to each agent
  having ACKed the new version, p50 / p99 / max over agents x changes, delta agents and
  whole-snapshot agents apart;
- the control plane's CPU per change and RSS per connected agent; the client processes' CPU;
- the fan-out's parts on the control plane, timed in this process on the same registry:
  building + serialising one delta body and one whole body (once per version, shared by every
  agent at the same base), and the per-stream work (the nonce appended);
- the agent's side: a real Applier taking one delta onto a 10,000-service snapshot vs the whole.

The fleet's agents are wire-level clients (`_child`): each opens its own channel and stream with
the agent token, says it holds the current version (as an agent reconnecting with the version
it holds does, so the control plane sends nothing until a change), asks for deltas, and ACKs each
response after checking its base and counting its bytes. They do not convert what they get, so
that 10,000 of them fit on a 2-core machine beside the control plane; `--real-agents` full
agents (SnapshotClient + Applier, the real validation and apply code) take the same deltas in
the parent process and are timed apart.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench.controlplane.run import Agent, cpu_s, pct, rss_kb
from switchgear.adapters import builtin_adapters
from switchgear.cli import run_event_loop
from switchgear.controlplane import snapshot as snap
from switchgear.controlplane.discovery import SnapshotFeed
from switchgear.controlplane.model import Category, EndpointSpec, RegistryState, ServiceSpec
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore
from switchgear.dataplane.client import Applier
from switchgear.dataplane.snapshot import Holder
from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc, common_pb2, discovery_pb2

METHOD = "/switchgear.v1.DiscoveryService/StreamSnapshots"


def registry_state(n: int) -> RegistryState:
    """A registry of `n` one-endpoint chat services."""
    return RegistryState(services=tuple(
        ServiceSpec(name=f"svc-{i:05d}", category=Category.LLM, protocol="openai", model="m",
                    endpoints=(EndpointSpec(id="e0", url=f"http://10.0.{i // 250 % 250}.{i % 250}:8080/v1"),))
        for i in range(n)))


def seed_store(db: Path, n: int) -> None:
    """Write the registry into the control plane's store before it starts (a config file of
    10,000 services exceeds the config loader's bound on values, on purpose)."""
    store = SqliteStore(db)
    try:
        Registry(store).replace(registry_state(n), "bench", "bench.controlplane.delta")
    finally:
        store.close()


def service(i: int, model: str) -> common_pb2.Service:
    return common_pb2.Service(
        name=f"svc-{i:05d}", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai", model=model,
        endpoints=[common_pb2.Endpoint(id="e0", url=f"http://10.0.{i // 250 % 250}.{i % 250}:8080/v1", weight=1)])


# ---- the client processes ---------------------------------------------------------------------

class WireAgent:
    """One agent stream, wire level: hold a version, ACK what comes, check a delta's base."""

    def __init__(self, name: str, held: str, delivery: int) -> None:
        self.name, self.held, self.delivery = name, held, delivery
        self.acks: list[tuple[str, float, int]] = []  # (version, when ACKed, bytes received)
        self.reconnects = 0

    async def run(self, address: str, token: str, connected: asyncio.Event, on_ack: object) -> None:
        """Keep a stream open, as an agent does: after a failure, reconnect holding the version held."""
        while True:
            try:
                await self._stream(address, token, connected, on_ack)
                return
            except grpc.aio.AioRpcError as exc:
                self.reconnects += 1
                if os.environ.get("DELTA_BENCH_DEBUG") and self.reconnects == 1:
                    print(f"{self.name}: {exc.code().name} {exc.details()}", file=sys.stderr, flush=True)
                await asyncio.sleep(random.uniform(0.05, 0.5))

    async def _stream(self, address: str, token: str, connected: asyncio.Event, on_ack: object) -> None:
        # Its own TCP connection, as each agent process has (grpc would share one per process).
        async with grpc.aio.insecure_channel(address, options=(("grpc.use_local_subchannel_pool", 1),)) as channel:
            stream = channel.stream_stream(
                METHOD, request_serializer=discovery_pb2.StreamSnapshotsRequest.SerializeToString,
                response_deserializer=lambda b: b)
            call = stream(metadata=(("authorization", f"Bearer {token}"),))
            await call.write(discovery_pb2.StreamSnapshotsRequest(
                node=discovery_pb2.Node(id=self.name, protocols=["openai"]), version_info=self.held,
                delivery=self.delivery))  # type: ignore[arg-type]
            await call.initial_metadata()
            connected.set()
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return
                response = discovery_pb2.StreamSnapshotsResponse.FromString(raw)
                if response.HasField("delta") and response.delta.base_version != self.held:
                    raise AssertionError(f"{self.name}: delta onto {response.delta.base_version}, held {self.held}")
                self.held = response.version_info
                await call.write(discovery_pb2.StreamSnapshotsRequest(version_info=self.held,
                                                                      response_nonce=response.nonce))
                self.acks.append((self.held, time.perf_counter(), len(raw)))
                on_ack(self.held)  # type: ignore[operator]


async def _child(address: str, token: str, prefix: str, count: int, held: str, delivery: int) -> None:
    """A client process: `count` wire agents; prints CONNECTED, then ALL <version> once every one
    of them ACKed a version, and on STOP (stdin) a JSON line of their ACKs."""
    agents = [WireAgent(f"{prefix}-{i:05d}", held, delivery) for i in range(count)]
    counts: dict[str, int] = {}

    def on_ack(version: str) -> None:
        counts[version] = counts.get(version, 0) + 1
        if counts[version] == count:
            print(f"ALL {version}", flush=True)

    events = [asyncio.Event() for _ in agents]
    tasks = []
    for agent, event in zip(agents, events, strict=True):
        tasks.append(asyncio.ensure_future(agent.run(address, token, event, on_ack)))
        await asyncio.sleep(0)  # a spread of connects, not one burst of 5,000 handshakes
    while not all(e.is_set() for e in events):
        await asyncio.sleep(1)
        if os.environ.get("DELTA_BENCH_DEBUG"):
            print(f"{prefix}: {sum(e.is_set() for e in events)} connected, "
                  f"{sum(t.done() for t in tasks)} ended", file=sys.stderr, flush=True)
            ended = [t for t in tasks if t.done()]
            if ended:
                print(repr(ended[0].exception())[:500], file=sys.stderr, flush=True)
    # The clients share the control plane's 2 cores (real agents run elsewhere): as in the control
    # plane (GC_YOUNG_THRESHOLD), keep the cycle collector off their 5,000 streams' objects, so
    # that what a change costs the clients does not slow the control plane down.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, *gc.get_threshold()[1:])
    print("CONNECTED", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    acks: dict[str, list[float]] = {}
    sizes: dict[str, list[int]] = {}
    for agent in agents:
        for version, at, size in agent.acks:
            acks.setdefault(version, []).append(at)
            sizes.setdefault(version, []).append(size)
    print(json.dumps({"acks": acks, "bytes": {v: [min(s), max(s)] for v, s in sizes.items()},
                      "reconnects": sum(a.reconnects for a in agents)}), flush=True)


class Clients:
    """A client process of the parent's, read line by line."""

    def __init__(self, args: list[str]) -> None:
        self.popen = subprocess.Popen([sys.executable, "-m", "bench.controlplane.delta", "--child", *args],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def line(self, prefix: str) -> str:
        assert self.popen.stdout is not None
        while True:
            text = self.popen.stdout.readline()
            if not text:
                raise RuntimeError(f"client process exited (code {self.popen.poll()}) before {prefix!r}")
            if text.startswith(prefix):
                return text.strip()

    def finish(self) -> dict[str, object]:
        assert self.popen.stdin is not None
        self.popen.stdin.write("STOP\n")
        self.popen.stdin.flush()
        result: dict[str, object] = json.loads(self.line("{"))
        self.popen.wait(timeout=30)
        return result


# ---- the parent -------------------------------------------------------------------------------

async def fleet(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    db = workdir / "fleet.db"
    seed_store(db, args.services)
    cp = Proc.switchgear("cp", ["controlplane", "--admin-auth", "none", "--db", str(db), "--listen", "127.0.0.1:0",
                                "--no-probes", "--log-level", "warning",
                                "--max-concurrent-pushes", str(args.max_concurrent_pushes),
                                "--grpc-server", args.grpc_server], workdir)
    address = cp.start(timeout_s=120)
    procs: list[Clients] = []
    out: dict[str, float] = {}
    stop = asyncio.Event()
    real: list[Agent] = []
    real_tasks: list[asyncio.Future[None]] = []
    try:
        admin = admin_pb2_grpc.AdminServiceStub(grpc.aio.insecure_channel(address))
        held = (await admin.ListAgents(admin_pb2.ListAgentsRequest(), timeout=30)).current_version
        token = Path(f"{db}.agent-token").read_text(encoding="utf-8").strip()
        await asyncio.sleep(0.5)
        rss_before = rss_kb(cp.pid)
        per = args.agents // args.procs
        for p in range(args.procs):
            procs.append(Clients([address, token, f"d{p}", str(per), held, "delta"]))
        if args.whole_agents:
            procs.append(Clients([address, token, "w", str(args.whole_agents), held, "whole"]))
        started = time.perf_counter()
        for c in procs:
            c.line("CONNECTED")
        out["connect_s"] = time.perf_counter() - started
        print(f"  ... {args.agents + args.whole_agents} wire agents connected", file=sys.stderr, flush=True)
        adapters = builtin_adapters()
        real = [Agent(i, address, adapters, token) for i in range(args.real_agents)]
        real_tasks = [asyncio.ensure_future(a.client.run(stop)) for a in real]
        while not all(a.holder.current is not None for a in real):
            await asyncio.sleep(0.05)
        print("  ... full agents synced", file=sys.stderr, flush=True)
        await asyncio.sleep(1.0)
        gc.collect()
        n = args.agents + args.whole_agents + args.real_agents
        out["cp_rss_per_agent_kb"] = (rss_kb(cp.pid) - rss_before) / n
        out["cp_rss_mb"] = rss_kb(cp.pid) / 1024
        cp_cpu, child_cpu = cpu_s(cp.pid), sum(cpu_s(c.popen.pid) for c in procs)
        sent: dict[str, float] = {}
        all_acked: list[float] = []
        for i in range(args.changes):
            t0 = time.perf_counter()
            reply = await admin.RegisterService(admin_pb2.RegisterServiceRequest(service=service(i, f"m{i}")),
                                                timeout=30)
            sent[reply.version] = t0
            for c in procs:
                c.line(f"ALL {reply.version}")
            while not all(reply.version in a.applied_at for a in real):
                await asyncio.sleep(0.005)
            all_acked.append(time.perf_counter() - t0)
            await asyncio.sleep(0.3)
        out["cp_cpu_ms_per_change"] = (cpu_s(cp.pid) - cp_cpu) * 1e3 / args.changes
        out["clients_cpu_ms_per_change"] = (sum(cpu_s(c.popen.pid) for c in procs) - child_cpu) * 1e3 / args.changes
        out["all_acked_max_ms"] = max(all_acked) * 1e3
        results = [c.finish() for c in procs]
        delta_lat: list[float] = []
        whole_lat: list[float] = []
        delta_bytes: list[int] = []
        whole_bytes: list[int] = []
        for c, r in zip(procs, results, strict=True):
            whole = c is procs[-1] and args.whole_agents > 0
            for version, times in r["acks"].items():  # type: ignore[attr-defined]
                if version in sent:
                    (whole_lat if whole else delta_lat).extend(t - sent[version] for t in times)
                    (whole_bytes if whole else delta_bytes).extend(r["bytes"][version])  # type: ignore[index]
        out["reconnects"] = float(sum(r["reconnects"] for r in results))  # type: ignore[misc]
        real_lat = [a.applied_at[v] - t0 for a in real for v, t0 in sent.items()]
        out |= {"delta_p50_ms": pct(delta_lat, 0.5) * 1e3, "delta_p99_ms": pct(delta_lat, 0.99) * 1e3,
                "delta_max_ms": max(delta_lat) * 1e3, "delta_bytes_max": max(delta_bytes),
                "acks_counted": len(delta_lat)}
        if whole_lat:
            out |= {"whole_p50_ms": pct(whole_lat, 0.5) * 1e3, "whole_p99_ms": pct(whole_lat, 0.99) * 1e3,
                    "whole_bytes_min": min(whole_bytes)}
        if real_lat:
            out |= {"real_p50_ms": pct(real_lat, 0.5) * 1e3, "real_max_ms": max(real_lat) * 1e3}
    finally:
        stop.set()
        await asyncio.gather(*real_tasks, return_exceptions=True)
        for c in procs:
            if c.popen.poll() is None:
                c.popen.kill()
                c.popen.wait(timeout=10)
        cp.stop()
    return out


def fanout_parts(n_services: int) -> dict[str, float]:
    """The control plane's share of a fan-out, in this process: one version's bodies and the
    per-stream work, for a one-service change to an `n_services` registry."""
    state = registry_state(n_services)
    specs = state.services
    feed = SnapshotFeed(snap.build(state, 1))
    base = feed.current.version
    feed.body(None)  # warm: the per-service wire cache, as a running control plane has it
    timings: dict[str, list[float]] = {"publish": [], "delta_body": [], "whole_body": [], "per_stream": []}
    sizes = (0, 0)
    for k in range(5):
        edited = dataclasses.replace(specs[k], model=f"m{k}")
        new = dataclasses.replace(state, services=tuple(edited if s.name == edited.name else s for s in state.services))
        built = snap.build(new, k + 2)
        t0 = time.perf_counter()
        feed.publish(built)
        t1 = time.perf_counter()
        delta, _ = feed.body(base)
        t2 = time.perf_counter()
        whole, _ = feed.body(None)
        t3 = time.perf_counter()
        for _ in range(1000):
            _ = delta + discovery_pb2.StreamSnapshotsResponse(nonce="0123456789abcdef").SerializeToString()
        t4 = time.perf_counter()
        timings["publish"].append(t1 - t0)
        timings["delta_body"].append(t2 - t1)
        timings["whole_body"].append(t3 - t2)
        timings["per_stream"].append((t4 - t3) / 1000)
        state, base, sizes = new, built.version, (len(delta), len(whole))
    out = {k: statistics.median(v) * 1e3 for k, v in timings.items()}
    out["delta_bytes"], out["whole_bytes"] = float(sizes[0]), float(sizes[1])
    # The agent's side: one delta applied onto the 10,000-service snapshot vs the whole snapshot.
    holder = Holder()
    applier = Applier(holder, builtin_adapters())
    whole_msg = discovery_pb2.StreamSnapshotsResponse.FromString(feed.body(None)[0])
    t0 = time.perf_counter()
    assert applier.apply(whole_msg) is None
    out["agent_whole_ms"] = (time.perf_counter() - t0) * 1e3
    base = feed.current.version
    edited = dataclasses.replace(state.services[7], model="m-final")
    state = dataclasses.replace(state, services=tuple(edited if s.name == edited.name else s for s in state.services))
    feed.publish(snap.build(state, 99))
    msg = discovery_pb2.StreamSnapshotsResponse.FromString(feed.body(base)[0])
    t0 = time.perf_counter()
    assert applier.apply(msg) is None and msg.HasField("delta")
    out["agent_delta_ms"] = (time.perf_counter() - t0) * 1e3
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        address, token, prefix, count, held, delivery = argv[1:7]
        mode = discovery_pb2.SNAPSHOT_DELIVERY_DELTA if delivery == "delta" else discovery_pb2.SNAPSHOT_DELIVERY_WHOLE
        run_event_loop(_child(address, token, prefix, int(count), held, mode))  # uvloop, as agents run
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.controlplane.delta", description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=10_000, help="wire-level agents taking deltas")
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--procs", type=int, default=2, help="client processes the delta agents are spread over")
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--whole-agents", type=int, default=50, help="wire-level agents taking whole snapshots")
    parser.add_argument("--real-agents", type=int, default=4, help="full agents (SnapshotClient + Applier)")
    parser.add_argument("--max-concurrent-pushes", type=int, default=256)
    parser.add_argument("--grpc-server", choices=("switchgear", "grpcio"), default="switchgear",
                        help="the control plane's gRPC server (its --grpc-server)")
    args = parser.parse_args(argv)
    print(f"# delta delivery benchmark (python {sys.version.split()[0]}, {os.cpu_count()} cpu, load "
          f"{os.getloadavg()[0]:.2f})")
    parts = fanout_parts(args.services)
    print(f"one-service change to a {args.services}-service registry, on the control plane: publish (diff + change "
          f"log) {parts['publish']:.1f} ms; delta body {parts['delta_body']:.2f} ms ({parts['delta_bytes']:.0f} B); "
          f"whole body {parts['whole_body']:.1f} ms ({parts['whole_bytes'] / 1024:.0f} KB); per stream "
          f"{parts['per_stream'] * 1e3:.1f} µs (nonce appended to the shared body)")
    print(f"on an agent: apply the delta {parts['agent_delta_ms']:.1f} ms, the whole snapshot "
          f"{parts['agent_whole_ms']:.0f} ms")
    with tempfile.TemporaryDirectory(prefix="sg-delta-") as tmp:
        r = asyncio.run(fleet(args, Path(tmp)))
    n = args.agents
    print(f"{n} delta agents in {args.procs} processes + {args.whole_agents} whole-snapshot agents + "
          f"{args.real_agents} full agents, {args.changes} one-service changes:")
    ratio = f" = {100 * r['delta_bytes_max'] / r['whole_bytes_min']:.2f} %" if "whole_bytes_min" in r else ""
    print(f"  bytes per agent per change: delta {r['delta_bytes_max']:.0f} B, whole "
          f"{r.get('whole_bytes_min', 0) / 1024:.0f} KB{ratio} [target <= 1 %]")
    print(f"  change->ACK, delta agents: p50 {r['delta_p50_ms']:.0f} ms, p99 {r['delta_p99_ms']:.0f} ms, max "
          f"{r['delta_max_ms']:.0f} ms over {int(r['acks_counted'])} ACKs [target p99 <= 2000 ms]")
    if "whole_p50_ms" in r:
        print(f"  change->ACK, whole-snapshot agents: p50 {r['whole_p50_ms']:.0f} ms, p99 {r['whole_p99_ms']:.0f} ms")
    if "real_p50_ms" in r:
        print(f"  change->applied, full agents (validate + apply + ACK): p50 {r['real_p50_ms']:.0f} ms, max "
              f"{r['real_max_ms']:.0f} ms")
    print(f"  every agent ACKed each change within {r['all_acked_max_ms']:.0f} ms (worst change); "
          f"{r['reconnects']:.0f} streams failed and reconnected")
    print(f"  CPU per change: control plane {r['cp_cpu_ms_per_change']:.0f} ms, client processes "
          f"{r['clients_cpu_ms_per_change']:.0f} ms")
    print(f"  control plane memory: {r['cp_rss_per_agent_kb']:.1f} KB per connected agent (RSS {r['cp_rss_mb']:.0f} MB)"
          f" [target <= 50 KB]; all connected in {r['connect_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
