"""Start Switchgear's own processes and know when they are ready; stop them by their id.

Used by the demo, the benchmarks and the end-to-end tests. A child prints `READY <address>`
on stdout once it listens (see the CLI); its stderr goes to a log file for post-mortems.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


class ProcessFailed(RuntimeError):
    pass


class Proc:
    """One child process running `python -m switchgear ...` (or any argv)."""

    def __init__(
        self, name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.address = ""
        self._popen: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    @classmethod
    def switchgear(cls, name: str, args: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None) -> Proc:
        return cls(name, [sys.executable, "-m", "switchgear", *args], log_dir, env)

    @property
    def pid(self) -> int:
        assert self._popen is not None
        return self._popen.pid

    def start(self, timeout_s: float = 20.0, ready_prefix: str = "READY ") -> str:
        """Start and wait for the first stdout line starting with `ready_prefix`.

        Returns the rest of that line: for `READY <address>`, the address.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("a", encoding="utf-8")
        self._popen = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
            env=self.env, text=True, start_new_session=True,
        )
        log.close()
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, args=(self._popen, self._lines), daemon=True).start()
        rest = self.wait_line(ready_prefix, timeout_s)[len(ready_prefix):].strip()
        if ready_prefix == "READY ":
            self.address = rest
        return rest

    def wait_line(self, prefix: str, timeout_s: float) -> str:
        """The next stdout line starting with `prefix` (earlier lines are dropped)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                code = self.returncode()
                raise ProcessFailed(f"{self.name} exited (code {code}); see {self.log_path}:\n{self.tail()}")
            if line.startswith(prefix):
                return line
        raise ProcessFailed(f"{self.name} printed no {prefix.strip()!r} within {timeout_s} s; see {self.log_path}")

    @staticmethod
    def _pump(popen: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def kill(self) -> None:
        """Abrupt death (SIGKILL), as a crash would be."""
        if self.running():
            assert self._popen is not None
            self._popen.kill()
            self._popen.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL if it did not exit in time. Returns the exit code."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait(timeout=10)
        return self._popen.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8").splitlines()[-lines:])
        except OSError:
            return ""
