"""Control-plane replicas on a real PostgreSQL: a change across replicas, a killed leader, commits.

    python -m bench.replicas [--agents 100] [--changes 10] [--failovers 5] [--seconds 3]

A throwaway PostgreSQL (scripts/postgres.sh: fsync off) and three `switchgear controlplane
--store` processes on it. The agents are bench.controlplane's in-process stream clients (the
agent's own SnapshotClient + Applier), agent i starting on replica i % 3 and knowing all three,
as `--control-plane a,b,c` does. Every ratio printed is of numbers measured in the same run.

- propagation: K admin changes through replica 1; time from sending RegisterService to each
  agent having applied (and at once ACKed) the new version, p50 / p99 / max, for the agents on
  replica 1 apart from those on the other two (commit, NOTIFY, refresh from the store, push);
  then every replica's ListAgents (the whole fleet, on any replica) must list every agent
  ACKing the final version.
- failover, T rounds: SIGKILL the leader; time until the leader row holds a new epoch of a live
  replica, and until every agent of the dead replica has reconnected to a live one and applied
  a change made through a live replica right after the kill; then until every live replica's
  ListAgents lists them ACKing it (that view is published by each replica every 1 s). The
  killed replica restarts on a fresh port, as a follower, and the
  next round starts a fresh fleet spread over the three current addresses (agents learn the
  addresses at start; a fleet that kept its old list would lose every restarted replica).
- commit throughput: sequential RegisterService calls/s on one control plane with SQLite
  (`--db`) and on one replica of three with PostgreSQL (the other two adopt every commit);
  then three writer threads, one per replica, whose commits conflict (StaleVersion: the replica
  reloads and retries): commits/s, and failed calls by status (ABORTED: a change that lost the
  race registry.MAX_ATTEMPTS times in a row).

The clients here back off 0.05 s before reconnecting (bench.controlplane's Agent); a real
agent waits up to 0.2 s on its first retry (dataplane.client.Backoff's default).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
from psycopg.rows import TupleRow

from bench.controlplane.run import Agent, chat, pct, wait_for
from switchgear.adapters import builtin_adapters
from switchgear.adapters.base import Adapter
from switchgear.dataplane.client import Applier, Backoff, SnapshotClient
from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc, common_pb2, discovery_pb2

REPO = Path(__file__).resolve().parents[2]
SLOTS = ("cp-1", "cp-2", "cp-3")
Metadata = tuple[tuple[str, str], ...]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    """A throwaway cluster (scripts/postgres.sh) in a new directory under /tmp: as root the
    `postgres` user runs it and must reach the directory. stop() stops it and removes it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sg-bench-pg-", dir="/tmp"))

    def _script(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(REPO / "scripts" / "postgres.sh"), *args], capture_output=True, text=True,
                              timeout=120, check=False)

    def start(self) -> str:
        """Start on a free port; the DSN."""
        done = self._script("start", str(self.dir), str(free_port()))
        if done.returncode != 0:
            raise RuntimeError(f"scripts/postgres.sh start failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def stop(self) -> None:
        pidfile = self.dir / "data" / "postmaster.pid"
        if pidfile.exists() and self._script("stop", str(self.dir)).returncode != 0 and pidfile.exists():
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGINT)  # pg_ctl failed: fast shutdown by pid
            time.sleep(1.0)
        shutil.rmtree(self.dir, ignore_errors=True)


class Replicas:
    """Three control-plane processes on one PostgreSQL, by slot (cp-1..cp-3). A slot's replica
    may be restarted: same --replica-id, a fresh port. stop() stops every process started."""

    def __init__(self, dsn: str, workdir: Path, token_file: Path) -> None:
        self.dsn = dsn
        self.workdir = workdir
        self.token_file = token_file
        # The agents' credential, the same on every replica (required with a shared store).
        self.agent_token = secrets.token_urlsafe(24)
        self.agent_token_file = workdir / "agent-token"
        self.agent_token_file.write_text(self.agent_token + "\n", encoding="utf-8")
        self.agent_token_file.chmod(0o600)
        self.procs: dict[str, Proc] = {}
        self._started: list[Proc] = []
        self._lock = threading.Lock()  # start_all starts from three threads

    def start(self, slot: str) -> Proc:
        """Start (or restart) `slot`'s replica and wait until it listens."""
        with self._lock:
            proc = Proc.switchgear(f"{slot}.{len(self._started)}", [
                "controlplane", "--store", self.dsn, "--listen", "127.0.0.1:0", "--replica-id", slot,
                "--admin-auth", "token", "--admin-token-file", str(self.token_file), "--no-probes",
                "--agent-token-file", str(self.agent_token_file), "--log-level", "warning",
            ], self.workdir)
            self._started.append(proc)
            self.procs[slot] = proc
        proc.start(timeout_s=60)
        return proc

    def start_all(self) -> None:
        """Side by side: they race for the migration and the lead, as a real roll-out would."""
        threads = [threading.Thread(target=self.start, args=(slot,)) for slot in SLOTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not all(p.running() and p.address for p in self.procs.values()):
            raise RuntimeError("a replica did not start")

    def addresses(self) -> list[str]:
        return [self.procs[slot].address for slot in SLOTS]

    def slot_of(self, address: str) -> str:
        return next(slot for slot, proc in self.procs.items() if proc.address == address)

    def stop(self) -> None:
        for proc in reversed(self._started):
            proc.stop()

    def tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(20)}" for p in self._started)


class AdminClient:
    """Admin stubs by replica address (one aio channel each), calling with the admin token."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> admin_pb2_grpc.AdminServiceStub:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return admin_pb2_grpc.AdminServiceStub(self._channels[address])

    async def register(self, address: str, service: common_pb2.Service) -> str:
        """The version the change committed as."""
        reply = await self._stub(address).RegisterService(
            admin_pb2.RegisterServiceRequest(service=service), metadata=self._metadata, timeout=10)
        return str(reply.version)

    async def view(self, address: str, ids: set[str]) -> View:
        reply = await self._stub(address).ListAgents(admin_pb2.ListAgentsRequest(), metadata=self._metadata,
                                                     timeout=10)
        listed = [a for a in reply.agents if a.connected and a.node.id in ids]
        return View(str(reply.current_version), {a.node.id: a.acked_version for a in listed},
                    {a.node.id: a.replica for a in listed})

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


@dataclass(frozen=True)
class View:
    """One replica's ListAgents, narrowed to a fleet: the version it serves, and the acked
    version of each fleet agent listed as connected (to any replica: the list is fleet-wide)."""

    current: str
    acked: dict[str, str]
    replica: dict[str, str]  # node -> the replica (its --replica-id) its stream is on

    def on(self, replica: str) -> set[str]:
        return {node for node, where in self.replica.items() if where == replica}


class ReplicaAgent(Agent):
    """bench.controlplane's Agent, knowing every replica and trying them in the given order."""

    def __init__(self, index: int, addresses: Sequence[str], adapters: Mapping[str, Adapter], token: str) -> None:
        super().__init__(index, addresses[0], adapters, token)
        self.node_id = f"bench-{index:05d}"  # the id Agent gives its node
        node = discovery_pb2.Node(id=self.node_id, protocols=sorted(adapters))
        applier = Applier(self.holder, adapters, self._applied)
        self.client = SnapshotClient(addresses, node, self.holder, applier, backoff=Backoff(0.05, 1.0), token=token)


class Fleet:
    """N agents in this process, agent i starting on addresses[i % len] and knowing all of them.
    Each generation has its own node ids, so ListAgents never mixes two fleets' agents."""

    def __init__(self, n: int, addresses: Sequence[str], generation: int, token: str) -> None:
        adapters = builtin_adapters()
        k = len(addresses)
        self.agents = [ReplicaAgent(generation * 100_000 + i, [*addresses[i % k:], *addresses[:i % k]], adapters,
                                    token) for i in range(n)]
        self.ids = {a.node_id for a in self.agents}
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(a.client.run(self._stop)) for a in self.agents]

    def applied(self, version: str, ids: set[str] | None = None) -> bool:
        return all(version in a.applied_at for a in self.agents if ids is None or a.node_id in ids)

    async def close(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, every_s: float = 0.02) -> float:
    """Poll `check` until it holds; the time it took. TimeoutError naming `what` otherwise."""
    started = time.perf_counter()
    while not await check():
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"no {what} within {timeout_s} s")
        await asyncio.sleep(every_s)
    return time.perf_counter() - started


async def settled(admin: AdminClient, addresses: Sequence[str], ids: set[str], timeout_s: float = 60
                  ) -> dict[str, View]:
    """Wait until every replica serves one version and its ListAgents lists every fleet agent
    connected and ACKing it; the replicas' views then."""
    views: dict[str, View] = {}

    async def check() -> bool:
        nonlocal views
        views = dict(zip(addresses, await asyncio.gather(*(admin.view(a, ids) for a in addresses)), strict=True))
        served = {v.current for v in views.values()}
        return len(served) == 1 and all(v.acked == dict.fromkeys(ids, v.current) for v in views.values())

    try:
        await until(check, timeout_s, "fleet settled on one version", every_s=0.05)
    except TimeoutError as exc:
        seen = {a: (v.current, Counter(v.acked.values())) for a, v in views.items()}
        raise TimeoutError(f"{exc}: {len(ids)} agents; per replica (serves, listed acked): {seen}") from None
    return views


# -- 1. propagation ---------------------------------------------------------------------------


@dataclass
class Propagation:
    same: list[float] = field(default_factory=list)  # seconds, agents on the replica that committed
    other: list[float] = field(default_factory=list)  # seconds, agents on the other two
    confirmed: bool = False


async def propagation(replicas: Replicas, admin: AdminClient, n: int, changes: int) -> Propagation:
    """`changes` RegisterService calls through cp-1, 0.2 s apart, each timed to every agent."""
    addresses = replicas.addresses()
    writer = addresses[0]
    fleet = Fleet(n, addresses, generation=0, token=replicas.agent_token)
    out = Propagation()
    try:
        views = await settled(admin, addresses, fleet.ids)
        on_writer = views[writer].on(replicas.slot_of(writer))
        version = ""
        for i in range(changes):
            sent = time.perf_counter()
            version = await admin.register(writer, chat(f"change-{i}"))
            if not await wait_for(lambda v=version: fleet.applied(v), 30):
                raise TimeoutError(f"not every agent applied {version}")
            for a in fleet.agents:
                (out.same if a.node_id in on_writer else out.other).append(a.applied_at[version] - sent)
            await asyncio.sleep(0.2)
        try:
            views = await settled(admin, addresses, fleet.ids, timeout_s=10)
            out.confirmed = all(v.current == version for v in views.values()) and \
                views[writer].on(replicas.slot_of(writer)) == on_writer
        except TimeoutError:
            out.confirmed = False
    finally:
        await fleet.close()
    return out


# -- 2. leader failover -----------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    killed: str
    new_leader: str
    moved: int  # agents that were on the killed replica
    leader_s: float  # kill -> leader row with a new epoch, held by a live replica
    applied_s: float  # kill -> every moved agent applied the change made right after the kill
    acked_s: float  # kill -> the live replicas list every moved agent as connected, ACKing it


async def leader_row(conn: psycopg.AsyncConnection[TupleRow]) -> tuple[str, str, int]:
    cur = await conn.execute("SELECT replica, address, epoch FROM leader WHERE id = 1")
    row = await cur.fetchone()
    return ("", "", 0) if row is None else (str(row[0]), str(row[1]), int(row[2]))


async def failover_round(replicas: Replicas, admin: AdminClient, conn: psycopg.AsyncConnection[TupleRow],
                         n: int, index: int) -> Round:
    addresses = replicas.addresses()
    fleet = Fleet(n, addresses, generation=index + 1, token=replicas.agent_token)
    try:
        views = await settled(admin, addresses, fleet.ids)
        leader: tuple[str, str, int] = ("", "", 0)

        async def has_leader() -> bool:
            nonlocal leader
            leader = await leader_row(conn)
            return leader[1] in addresses

        await until(has_leader, 30, "leader")
        _, dead, epoch = leader
        slot = replicas.slot_of(dead)
        moved = views[dead].on(slot)
        live = [a for a in addresses if a != dead]
        killed_at = time.perf_counter()
        replicas.procs[slot].kill()

        async def new_leader() -> bool:
            nonlocal leader
            leader = await leader_row(conn)
            return leader[2] > epoch and leader[1] in live

        leader_s, (applied_s, acked_s) = await asyncio.gather(
            until(new_leader, 30, "new leader", every_s=0.005),
            reach(admin, fleet, moved, live, killed_at, f"failover-{index}"))
    finally:
        await fleet.close()
    await asyncio.to_thread(replicas.start, slot)  # a follower now, on a fresh port
    return Round(slot, leader[0], len(moved), leader_s, applied_s, acked_s)


async def reach(admin: AdminClient, fleet: Fleet, moved: set[str], live: Sequence[str], killed_at: float,
                name: str) -> tuple[float, float]:
    """A change through a live replica right after the kill; seconds from the kill until every
    moved agent applied it, and until every live replica's ListAgents lists them ACKing it."""
    version = await admin.register(live[0], chat(name))
    if not await wait_for(lambda: fleet.applied(version, moved), 30):
        raise TimeoutError(f"the dead replica's agents did not all apply {version}")
    applied_s = max(a.applied_at[version] for a in fleet.agents if a.node_id in moved) - killed_at

    async def acked() -> bool:
        views = await asyncio.gather(*(admin.view(a, moved) for a in live))
        return all(view.acked == dict.fromkeys(moved, version) for view in views)

    await until(acked, 30, "ACKs of the moved agents")
    return applied_s, time.perf_counter() - killed_at


async def fleet_phases(replicas: Replicas, metadata: Metadata, n: int, changes: int, failovers: int
                       ) -> tuple[Propagation, list[Round]]:
    admin = AdminClient(metadata)
    try:
        prop = await propagation(replicas, admin, n, changes)
        print_propagation(prop, n, changes)
        rounds: list[Round] = []
        async with await psycopg.AsyncConnection.connect(replicas.dsn, autocommit=True) as conn:
            for i in range(failovers):
                rounds.append(await failover_round(replicas, admin, conn, n, i))
        print_failover(rounds)
        return prop, rounds
    finally:
        await admin.close()


# -- 3. commit throughput ---------------------------------------------------------------------


@dataclass
class Commits:
    ok: int = 0
    seconds: float = 0.0
    failed: Counter[str] = field(default_factory=Counter)  # by gRPC status name
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def hammer(address: str, metadata: Metadata, seconds: float, prefix: str) -> Commits:
    """Sequential RegisterService calls for `seconds`, each a new version: ten services named
    `prefix-0..9` in turn, each call with a model name not used before."""
    out = Commits()
    with grpc.insecure_channel(address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        started = time.perf_counter()
        i = 0
        while (now := time.perf_counter()) - started < seconds:
            service = chat(f"{prefix}-{i % 10}")
            service.model = f"model-{i}"
            try:
                stub.RegisterService(admin_pb2.RegisterServiceRequest(service=service), metadata=metadata, timeout=30)
                out.ok += 1
            except grpc.RpcError as exc:
                out.failed[exc.code().name] += 1
            out.latencies.append(time.perf_counter() - now)
            i += 1
        out.seconds = time.perf_counter() - started
    return out


def concurrent(addresses: Sequence[str], metadata: Metadata, seconds: float) -> Commits:
    """One writer thread per replica, all at once; their commits conflict on the version row."""
    results: list[Commits] = []
    threads = [threading.Thread(target=lambda a=a, k=k: results.append(hammer(a, metadata, seconds, f"writer{k}")))
               for k, a in enumerate(addresses)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = Commits(seconds=max(r.seconds for r in results))
    for r in results:
        total.ok += r.ok
        total.failed += r.failed
        total.latencies += r.latencies
    return total


def sqlite_commits(workdir: Path, token_file: Path, metadata: Metadata, services: Sequence[common_pb2.Service],
                   seconds: float) -> Commits:
    """One control plane on SQLite, holding the same services as the replicas, hammered alone."""
    proc = Proc.switchgear("sqlite-cp", [
        "controlplane", "--db", str(workdir / "sqlite.db"), "--listen", "127.0.0.1:0", "--admin-auth", "token",
        "--admin-token-file", str(token_file), "--no-probes", "--log-level", "warning",
    ], workdir)
    try:
        address = proc.start(timeout_s=60)
        with grpc.insecure_channel(address) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            for service in services:
                stub.RegisterService(admin_pb2.RegisterServiceRequest(service=service), metadata=metadata, timeout=10)
        return hammer(address, metadata, seconds, "seq")
    finally:
        proc.stop()


def throughput(replicas: Replicas, workdir: Path, token_file: Path, metadata: Metadata, seconds: float
               ) -> tuple[Commits, Commits, Commits]:
    """(SQLite sequential, PostgreSQL sequential on one replica, three writers on three)."""
    addresses = replicas.addresses()
    with grpc.insecure_channel(addresses[0]) as channel:
        services = admin_pb2_grpc.AdminServiceStub(channel).ListServices(
            admin_pb2.ListServicesRequest(), metadata=metadata, timeout=10).services
    sqlite = sqlite_commits(workdir, token_file, metadata, list(services), seconds)
    pg = hammer(addresses[0], metadata, seconds, "seq")
    together = concurrent(addresses, metadata, seconds)
    print_throughput(sqlite, pg, together, len(services), seconds)
    return sqlite, pg, together


# -- output -----------------------------------------------------------------------------------


def ms(values: Sequence[float], q: float) -> str:
    return f"{pct(values, q) * 1e3:7.1f} ms"


def print_propagation(p: Propagation, n: int, changes: int) -> None:
    print(f"propagation: {n} agents, {changes} changes through cp-1; change -> applied+ACKed per agent")
    print(f"  {'':<34} {'p50':>10} {'p99':>10} {'max':>10}")
    for label, values in ((f"same replica as the change ({len(p.same) // changes})", p.same),
                          (f"other replicas, via NOTIFY ({len(p.other) // changes})", p.other)):
        print(f"  {label:<34} {ms(values, 0.5):>10} {ms(values, 0.99):>10} {ms(values, 1.0):>10}")
    print(f"  every replica's ListAgents lists all {n} agents ACKing the final version: "
          f"{'yes' if p.confirmed else 'NO'}")


def print_failover(rounds: Sequence[Round]) -> None:
    if not rounds:
        return
    print(f"failover: {len(rounds)} rounds, SIGKILL of the leader (leader election tried every 0.5 s)")
    for r in rounds:
        print(f"  killed {r.killed} -> {r.new_leader or '?'} leads after {r.leader_s * 1e3:6.0f} ms; its {r.moved} "
              f"agents applied a change made right after the kill at {r.applied_s * 1e3:5.0f} ms, "
              f"listed ACKing it by every live replica at {r.acked_s * 1e3:5.0f} ms")
    for label, values in (("new leader", [r.leader_s for r in rounds]),
                          ("dead replica's agents applied", [r.applied_s for r in rounds]),
                          ("... listed ACKing by every replica", [r.acked_s for r in rounds])):
        print(f"  {label:<34} p50 {ms(values, 0.5)}  max {ms(values, 1.0)}")


def print_throughput(sqlite: Commits, pg: Commits, together: Commits, services: int, seconds: float) -> None:
    print(f"commit throughput: Admin RegisterService, each a new version, {services} services registered before, "
          f"{seconds:g} s per run")
    for label, c in (("SQLite, one control plane, 1 writer", sqlite),
                     ("PostgreSQL, one of 3 replicas, 1 writer", pg),
                     ("PostgreSQL, 3 writers on 3 replicas", together)):
        failed = ", ".join(f"{k} {v}" for k, v in sorted(c.failed.items())) or "none"
        print(f"  {label:<40} {c.rate:6.1f} commits/s ({c.ok} ok)  call p50 {ms(c.latencies, 0.5)} "
              f"p99 {ms(c.latencies, 0.99)}  failed: {failed}")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--agents", type=int, default=100, help="in-process agents, spread over the 3 replicas")
    parser.add_argument("--changes", type=int, default=10, help="admin changes timed for propagation")
    parser.add_argument("--failovers", type=int, default=5, help="leader kills")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each commit-throughput run")
    args = parser.parse_args(argv)
    if args.agents < 3 or args.changes < 1 or args.failovers < 0:
        parser.error("need --agents >= 3 (one per replica at least), --changes >= 1, --failovers >= 0")
    logging.basicConfig(level=logging.ERROR)  # the clients' reconnect warnings are expected at each kill
    token = secrets.token_urlsafe(24)
    metadata: Metadata = (("authorization", f"Bearer {token}"),)
    pg = Postgres()
    with tempfile.TemporaryDirectory(prefix="sg-bench-replicas-") as tmp:
        workdir = Path(tmp)
        token_file = workdir / "admin-token"
        token_file.write_text(token + "\n", encoding="utf-8")
        token_file.chmod(0o600)
        replicas: Replicas | None = None
        try:
            dsn = pg.start()
            with psycopg.connect(dsn) as conn:
                row = conn.execute("SELECT current_setting('server_version')").fetchone()
            print(f"# control-plane replicas benchmark (pid {os.getpid()}, python {sys.version.split()[0]}, "
                  f"{os.cpu_count()} cpu shared by PostgreSQL {row[0] if row else '?'} (fsync off), 3 replicas "
                  f"and the clients)")
            replicas = Replicas(dsn, workdir, token_file)
            replicas.start_all()
            prop, _ = asyncio.run(fleet_phases(replicas, metadata, args.agents, args.changes, args.failovers))
            sqlite, pg_seq, together = throughput(replicas, workdir, token_file, metadata, args.seconds)
        except BaseException:
            if replicas is not None:
                print(replicas.tails(), file=sys.stderr)
            raise
        finally:
            if replicas is not None:
                replicas.stop()
            pg.stop()
    print(f"ratios: other/same replica p50 {ratio(pct(prop.other, 0.5), pct(prop.same, 0.5))}, "
          f"p99 {ratio(pct(prop.other, 0.99), pct(prop.same, 0.99))}; PostgreSQL/SQLite sequential commits "
          f"{ratio(pg_seq.rate, sqlite.rate)}; 3 writers/1 writer on PostgreSQL {ratio(together.rate, pg_seq.rate)}")
    return 0
