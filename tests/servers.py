"""Real servers for tests, started from the machine's packages and stopped by their pid."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg


class RedisServer:
    """redis-server on a unix socket in `workdir` (no TCP port to collide on)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: run `make test`, which installs it"
        self.socket = workdir / "redis.sock"
        self._argv = [binary, "--port", "0", "--unixsocket", str(self.socket), "--save", "", "--appendonly", "no",
                      "--dir", str(workdir)]
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start (or start again after `kill`/`stop`, on the same socket: same URL, empty data)."""
        self.socket.unlink(missing_ok=True)  # a killed server leaves its socket file behind
        self._proc = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self.socket.exists():
            assert self._proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not open its socket in time"
            time.sleep(0.02)

    def kill(self) -> None:
        """Abrupt death (SIGKILL): the socket file stays, connecting to it is refused."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: connections still open, nothing answers (a slow or hung Redis)."""
        assert self._proc is not None and self._proc.poll() is None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.resume()  # a paused server would hold SIGTERM until continued
            self._proc.terminate()
            self._proc.wait(timeout=10)
        self.socket.unlink(missing_ok=True)


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def postgres_bindir() -> Path:
    """Where PostgreSQL's server binaries are: `pg_config --bindir`, else Debian's versioned dirs."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
        if (found / "postgres").exists():
            return found
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    assert dirs, "PostgreSQL is not installed: run `make system-deps`, which installs it"
    return Path(dirs[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A throwaway PostgreSQL cluster in `workdir`: TCP on 127.0.0.1 (a free port chosen at the
    first start and kept across restarts, so DSNs stay valid), its unix socket in `workdir`,
    trust auth for user `postgres`, and durability off for speed.

    PostgreSQL refuses to run as root: as root, initdb and postgres run as the `postgres`
    system user, who is given `workdir`; it must be able to reach it (pytest's tmp_path, under
    a 0700 directory of root's, will not do: use tempfile.mkdtemp).
    """

    SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "shared_buffers=16MB",
                "max_connections=200")

    def __init__(self, workdir: Path) -> None:
        self.bindir = postgres_bindir()
        self.workdir = workdir
        self.data = workdir / "data"
        self.log = workdir / "postgres.log"
        self.port = 0
        self._as = {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
        self._proc: subprocess.Popen[bytes] | None = None

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start (initdb first when `workdir` has no cluster yet), or start again after stop/kill."""
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        self.port = self.port or free_port()
        argv = [str(self.bindir / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                "-k", str(self.workdir)]
        for setting in self.SETTINGS:
            argv += ["-c", setting]
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                          **self._as)  # type: ignore[call-overload]
        self._wait_ready(timeout_s)

    def _initdb(self) -> None:
        if self._as:
            shutil.chown(self.workdir, "postgres", "postgres")
        done = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            capture_output=True, text=True, cwd=self.workdir, **self._as,  # type: ignore[call-overload]
        )
        assert done.returncode == 0, f"initdb failed:\n{done.stdout}{done.stderr}"

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                pass
            if self._proc.poll() is not None:
                raise AssertionError(f"postgres exited at start:\n{self.log.read_text(errors='replace')[-2000:]}")
            assert time.monotonic() < deadline, "postgres did not accept connections in time"
            time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are disconnected, then a clean checkpoint)."""
        self._signal(signal.SIGINT)

    def kill(self, timeout_s: float = 10.0) -> None:
        """SIGKILL the postmaster: a crash; the next start recovers. Returns once its backends
        have noticed and exited too (while one lives, a restart refuses the shared memory)."""
        if self._proc is None:
            return
        backends = _children(self._proc.pid)
        self._signal(signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while any(_alive(pid) for pid in backends):
            assert time.monotonic() < deadline, "postgres backends outlived their postmaster"
            time.sleep(0.02)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)
            self._proc.wait(timeout=30)
        self._proc = None


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running, or anything but a zombie (an orphan's zombie may never be reaped in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextmanager
def postgres_server(workdir: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
