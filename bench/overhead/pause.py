"""The idle-call overhead: what a pause between calls costs (`python -m bench.overhead.pause`).

One caller on one keep-alive connection, zero-delay upstream, `--calls` calls per pause, each
pause (0, 1, 5, 20, 50 ms by default) slept before every call; the same for the emulator
directly and through the agent's HTTP front door. Per pause: client-side p50 and p99, and per
call the CPU and the run-queue wait (schedstat: time runnable but not running) of the emulator
and of the agent. A pause of 20 ms between calls is what a 20 ms upstream gives a single caller.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path

import orjson

from bench.overhead.run import CHAT, Stack


def sched(pid: int) -> tuple[float, float]:
    """(CPU s, run-queue wait s) of every thread of `pid`."""
    cpu = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        cpu, wait = cpu + int(fields[0]), wait + int(fields[1])
    return cpu / 1e9, wait / 1e9


def call(sock: socket.socket, request: bytes) -> float:
    """One request on the connection; seconds until its whole answer was read."""
    start = time.perf_counter()
    sock.sendall(request)
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        buf += chunk
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            if len(rest) >= length:
                return time.perf_counter() - start


def measure(address: tuple[str, int], body: bytes, pid: int, pause_s: float, calls: int
            ) -> tuple[float, float, float, float]:
    """(p50 ms, p99 ms, CPU ms per call, run-queue wait ms per call) of `pid`."""
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    with socket.create_connection(address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(20):  # warm: connection, pool, caches
            call(sock, request)
        cpu0, wait0 = sched(pid)
        latencies = []
        for _ in range(calls):
            if pause_s:
                time.sleep(pause_s)
            latencies.append(call(sock, request))
        cpu1, wait1 = sched(pid)
    latencies.sort()
    return (latencies[len(latencies) // 2] * 1e3, latencies[int(len(latencies) * 0.99)] * 1e3,
            (cpu1 - cpu0) / calls * 1e3, (wait1 - wait0) / calls * 1e3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead.pause", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pauses", default="0,1,5,20,50", help="ms slept before each call")
    parser.add_argument("--calls", type=int, default=200, help="per pause and path")
    args = parser.parse_args(argv)
    print("| pause | direct p50 ms | direct p99 ms | emulator CPU ms/call | emulator run-queue wait ms/call "
          "| agent p50 ms | agent p99 ms | agent CPU ms/call | agent run-queue wait ms/call | added p50 ms |")
    print("| --- " * 10 + "|")
    with tempfile.TemporaryDirectory(prefix="sg-pause-") as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.start()
            host, _, port = stack.http_address.rpartition(":")
            direct = ("127.0.0.1", stack.ports["zero"])
            for pause_ms in (float(p) for p in args.pauses.split(",")):
                d = measure(direct, orjson.dumps({**CHAT, "model": "gpt-4o-mini"}), stack.emulator.pid,
                            pause_ms / 1e3, args.calls)
                a = measure((host, int(port)), orjson.dumps({**CHAT, "model": "bench-0ms"}), stack.agent.pid,
                            pause_ms / 1e3, args.calls)
                cells = " | ".join(f"{v:.3f}" for v in (*d, *a))
                print(f"| {pause_ms:g} ms | {cells} | {a[0] - d[0]:+.3f} |", flush=True)
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
