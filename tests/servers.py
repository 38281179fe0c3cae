"""Real servers for tests, started from the machine's packages and stopped by their pid."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
        self._proc = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self.socket.exists():
            assert self._proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not open its socket in time"
            time.sleep(0.02)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
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
