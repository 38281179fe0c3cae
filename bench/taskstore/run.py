"""The task store with a big backlog: what a submission's quota count, a lease's candidate
query and the blob quota cost, and how long one purge bite holds the store's thread, with the
indexes of schema 4 and without them (the schema before retention and quotas).

    .venv/bin/python -m bench.taskstore [--finished 200000] [--tenants 20] [--postgres | --dsn DSN]

SQLite in a temporary file by default; `--postgres` runs the same on a throwaway PostgreSQL
cluster (scripts/postgres.sh, as bench/replicas does), `--dsn` on a scratch database of yours
(its task tables are emptied).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from switchgear.controlplane.tasks.model import Resources, Task, TaskState
from switchgear.controlplane.tasks.scheduler import PURGE_BATCH
from switchgear.controlplane.tasks.store import SqlTaskStore, TaskStore

INDEXES = ("tasks_finished", "tasks_tenant", "tasks_tenant_finished", "tasks_payload_blob", "task_blobs_created",
           "task_blob_owners_tenant")
FINAL = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.DEAD_LETTERED)


def fill(store: SqlTaskStore, finished: int, tenants: int) -> None:
    """`finished` final tasks (half of them older than the retention) spread over `tenants`
    tenants, 2,000 queued ones, and one blob per 100 tasks."""
    rows = []
    for i in range(finished):
        rows.append(Task(id=f"f{i}", tenant=f"t{i % tenants}", service=f"svc{i % 8}", category="llm", method="m",
                         priority=5, requirements=Resources(cpu=1.0), submitted_at=float(i), state=FINAL[i % 4],
                         finished_at=float(i) if i % 2 else 1e12, payload=b"{}"))
    for i in range(2000):
        rows.append(Task(id=f"q{i}", tenant=f"t{i % tenants}", service=f"svc{i % 8}", category="llm", method="m",
                         priority=1 + i % 10, requirements=Resources(cpu=1.0), submitted_at=float(i), payload=b"{}"))
    with store._db.transaction() as db:
        from switchgear.controlplane.tasks.store import _INSERT, _row

        db.executemany(_INSERT, [_row(t) for t in rows])
    for i in range(finished // 100):
        store.put_blob(b"blob %d" % i, "text/plain", 1.0 if i % 2 else 1e12, tenant=f"t{i % tenants}")


def timed(fn: Callable[[], object], repeat: int = 50) -> float:
    """Median milliseconds of `fn`."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure(store: SqlTaskStore, label: str) -> None:
    count = timed(lambda: store.unfinished_of("t3"))
    usage = timed(lambda: store.blob_usage("t3"))
    lease = timed(lambda: store.candidates({"svc1", "svc2"}, 1e9, 60.0, 64), repeat=20)
    over = timed(lambda: store.tenants_over(1000), repeat=5)
    bites, total, deleted = [], time.perf_counter(), 0
    while True:
        start = time.perf_counter()
        bite = store.purge_tasks(1e9, PURGE_BATCH) + store.purge_blobs(1e9, PURGE_BATCH)
        bites.append((time.perf_counter() - start) * 1e3)
        deleted += bite.tasks
        if bite.tasks < PURGE_BATCH and bite.blobs < PURGE_BATCH:
            break
    total = time.perf_counter() - total
    print(f"{label:<22} quota count {count:7.2f} ms | blob usage {usage:6.2f} ms | lease candidates "
          f"{lease:6.2f} ms | tenants over a cap {over:6.1f} ms | purge {deleted} tasks in {len(bites)} bites, "
          f"{total:5.2f} s, "
          f"longest bite {max(bites):6.1f} ms")


def sqlite_store(path: Path, indexed: bool) -> TaskStore:
    store = TaskStore(path)
    if not indexed:
        for name in INDEXES:
            store._db.execute(f"DROP INDEX IF EXISTS {name}")
    return store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.taskstore")
    parser.add_argument("--finished", type=int, default=200_000)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--dsn", default="")
    parser.add_argument("--postgres", action="store_true", help="on a throwaway PostgreSQL cluster")
    args = parser.parse_args(argv)
    if args.postgres:
        from bench.replicas.run import Postgres

        cluster = Postgres()
        try:
            return main(["--finished", str(args.finished), "--tenants", str(args.tenants), "--dsn", cluster.start()])
        finally:
            cluster.stop()
    print(f"{args.finished} finished tasks (half past the retention), 2000 queued, {args.finished // 100} blobs, "
          f"{args.tenants} tenants; {'PostgreSQL' if args.dsn else 'SQLite'}")
    for indexed in (True, False):
        label = "schema 4 (indexed)" if indexed else "without the indexes"
        if args.dsn:
            from switchgear.controlplane import pg
            from switchgear.controlplane.tasks.store_pg import PgTaskStore

            conn = pg.connect(args.dsn)
            pg.migrate(conn)
            conn.execute("TRUNCATE tasks, task_attempts, task_blobs, task_blob_owners")
            for name in INDEXES:
                conn.execute(f"DROP INDEX IF EXISTS {name}")
            if indexed:
                for statement in pg._MIGRATIONS[4]:
                    conn.execute(statement)
            store: SqlTaskStore = PgTaskStore(conn, owns_connection=True)
            fill(store, args.finished, args.tenants)
            conn.execute("ANALYZE")
            measure(store, label)
            store.close()
        else:
            with tempfile.TemporaryDirectory() as tmp:
                sqlite_store_ = sqlite_store(Path(tmp) / "cp.db", indexed)
                fill(sqlite_store_, args.finished, args.tenants)
                sqlite_store_._db.execute("ANALYZE")
                measure(sqlite_store_, label)
                sqlite_store_.close()
    return 0
