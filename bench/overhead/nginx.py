"""A cheap upstream for `python -m bench.overhead --upstream nginx`: nginx answering a canned body.

The OpenAI emulator is a Python process: at zero delay it takes about half a core to answer what
one agent sends, so on a 2-core machine it, not the agent, decides how far `--workers 2` can go.
nginx (Debian `nginx-light`, installed with apt-get when missing and running as root) answers
`POST /v1/chat/completions` with the bytes the emulator gave for the bench's own request (a valid
chat.completion, usage included) for a few microseconds of CPU each.

It runs from the bench's workdir with its own config: loopback, a port the bench picks below the
kernel's ephemeral range (so no outgoing connection of the load generator or the agent holds it),
one worker process, no access log, pid file and temp paths in the workdir, not daemonised
(`daemon off`: the master is the bench's child, stopped by its pid). `served()` reads nginx's
stub_status: requests handled, less the status reads themselves.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

CHAT_PATH = "/v1/chat/completions"
STATUS_PATH = "/_nginx/status"
PORTS = (20000, 30000)  # candidates: below the usual ephemeral range (32768-60999 on Linux)


def ensure_nginx() -> str:
    """The nginx binary; installs Debian's nginx-light when missing (as root), else exits saying how."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"  # (sbin is not on every user's PATH)
    if os.access(binary, os.X_OK):
        return binary
    if os.geteuid() != 0:
        sys.exit("--upstream nginx needs nginx; run: apt-get install -y nginx-light")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(binary, os.X_OK):
        sys.exit("nginx-light installed but no nginx binary found")
    return binary


def quoted(text: str) -> str:
    """`text` (JSON) as one single-quoted nginx config string that nginx turns back into `text`.

    nginx unescapes backslash and quote inside quotes, and expands `$name` everywhere (there is no
    escape for `$`): a `$` can only be inside a JSON string, where `\\u0024` means the same."""
    if "\n" in text or "\r" in text:
        raise ValueError("the canned body must be one line")
    return "'" + text.replace("$", "\\u0024").replace("\\", "\\\\").replace("'", "\\'") + "'"


def config(workdir: Path, port: int, body: str) -> str:
    """nginx.conf for one worker on 127.0.0.1:`port` answering `body` (JSON) to POST CHAT_PATH."""
    temp = "".join(f"    {kind}_temp_path {workdir / ('nginx-' + kind)};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (
        "daemon off;\n"
        "worker_processes 1;\n"
        f"pid {workdir / 'nginx.pid'};\n"
        f"error_log {workdir / 'nginx-error.log'} warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "    access_log off;\n"
        f"{temp}"
        "    keepalive_requests 100000000;\n"  # the default 1,000 would close each connection now and then
        "    keepalive_timeout 300s;\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port} backlog=1024;\n"
        f"        location = {CHAT_PATH} {{\n"
        "            if ($request_method != POST) { return 405; }\n"
        "            default_type application/json;\n"
        f"            return 200 {quoted(body)};\n"
        "        }\n"
        f"        location = {STATUS_PATH} {{ stub_status; }}\n"
        "        location / { return 404; }\n"
        "    }\n"
        "}\n"
    )


def _ports() -> list[int]:
    low, high = PORTS
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        if ephemeral_low > low + 1000:  # (a range moved below ours: keep ours)
            high = min(high, ephemeral_low)
    except (OSError, ValueError, IndexError):
        pass
    start = random.randrange(low, high)
    return [*range(start, high), *range(low, start)]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Nginx:
    """One nginx serving `body` from `workdir`; start() picks the port and waits until it answers."""

    def __init__(self, workdir: Path, body: str, preexec: Callable[[], None] | None = None) -> None:
        self.workdir = workdir
        self.body = body
        self.preexec = preexec  # run in the child before nginx starts (e.g. a scheduling policy)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._status_reads = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{CHAT_PATH}"

    def start(self, timeout_s: float = 10.0) -> int:
        binary = ensure_nginx()
        self.workdir.mkdir(parents=True, exist_ok=True)
        tries = 0
        for port in _ports():
            if not _bindable(port):
                continue
            conf = self.workdir / "nginx.conf"
            conf.write_text(config(self.workdir, port, self.body))
            log = (self.workdir / "nginx-error.log").open("ab")
            self.proc = subprocess.Popen([binary, "-p", str(self.workdir), "-c", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True, preexec_fn=self.preexec)
            log.close()
            self.port = port
            if self._wait_listening(timeout_s):
                return port
            tries += 1  # taken between the check and nginx's bind: another port
            if tries == 3:
                break
        raise RuntimeError(f"nginx did not start; its log:\n{self.log()}")

    def _wait_listening(self, timeout_s: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "Address already in use" in self.log():
                    return False
                raise RuntimeError(f"nginx exited (code {self.proc.returncode}); its log:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nginx did not listen within {timeout_s:g} s; its log:\n{self.log()}")

    def served(self) -> int:
        """Requests nginx handled, less this method's own status reads (each counts itself)."""
        text = httpx.get(f"http://127.0.0.1:{self.port}{STATUS_PATH}", timeout=5).text
        self._status_reads += 1
        match = re.search(r"^\s*\d+\s+\d+\s+(\d+)\s*$", text, re.M)  # "accepts handled requests"
        if match is None:
            raise RuntimeError(f"unexpected nginx status: {text!r}")
        return int(match.group(1)) - self._status_reads

    def log(self) -> str:
        try:
            return (self.workdir / "nginx-error.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (nginx's fast shutdown: the master stops its worker), then SIGKILL of the group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the master and its worker only
            self.proc.wait(timeout=10)
