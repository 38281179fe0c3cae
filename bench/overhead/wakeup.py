"""What 20 ms of idleness costs the next piece of work on this machine (`python -m bench.overhead.wakeup`).

Two measurements behind the idle-call section of README.md, each hot (back to back) against after a
20 ms pause:

- **Redis round trips** from a uvloop client over a unix socket to a redis-server of its own: PING,
  and EVALSHA of the agent's own round script (dataplane/redis_round.py) with an admission of four
  checks, four counts and a cache lookup. The client waits for the reply either blocked in the
  loop (as the agent does) or busy-polling the loop (a chain of `call_soon`), which tells whether
  the time is the client's wake-up or the server's; `busy-yield` busy-polls with a `sched_yield()`
  per turn (a spinner that gives way to whatever else is runnable on its CPU), `warm-before` sleeps
  the pause but its last 2 ms, then busy-polls until the answer (a client that wakes before an
  answer it expects: the anticipatory spin of README, Session 11).
- **Cold memory**: CPU time of one pass writing one byte in each of N pages, hot, after a 20 ms
  sleep, and after 20 ms of spinning (the process never sleeps).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import uvloop

from switchgear.dataplane.redis_round import ROUND_LUA


def _pack(*args: str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def _redis(sock: str, calls: int, gap_s: float) -> None:
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(_pack("SCRIPT", "LOAD", ROUND_LUA))
    await reader.readuntil(b"\r\n")
    await reader.readuntil(b"\r\n")
    sha = hashlib.sha1(ROUND_LUA.encode()).hexdigest()
    keys = [f"bench:k{i}" for i in range(9)]
    # no additions or stores; 4 checks, 4 counts, 1 lookup (ROUND_LUA's argument layout)
    numbers = "0 0 4 4 1 " + " ".join(["1e15"] * 4) + " " + " ".join(["4e9 61"] * 4) + " 9"
    commands = (("PING", _pack("PING"), 1), ("EVALSHA", _pack("EVALSHA", sha, str(len(keys)), *keys, numbers), 4))
    loop = asyncio.get_running_loop()
    spinning = yielding = False

    def spin() -> None:
        if spinning:
            if yielding:
                os.sched_yield()
            loop.call_soon(spin)

    for name, command, lines in commands:
        for gap in (0.0, gap_s):
            for wait in ("blocked", "busy-poll", "busy-yield", "warm-before"):
                times = []
                for _ in range(calls):
                    yielding = wait == "busy-yield"
                    if gap:
                        if wait == "warm-before":
                            await asyncio.sleep(gap - 0.002)
                            spinning = True
                            loop.call_soon(spin)
                            await asyncio.sleep(0.002)
                        else:
                            await asyncio.sleep(gap)
                    if wait.startswith("busy"):
                        spinning = True
                        loop.call_soon(spin)
                    start = time.perf_counter_ns()
                    writer.write(command)
                    for _ in range(lines):
                        await reader.readuntil(b"\r\n")
                    times.append((time.perf_counter_ns() - start) / 1e3)
                    spinning = False
                times = times[10:]  # warm
                print(f"| {name} | {gap * 1e3:g} ms | {wait} | {_pct(times, 0.5):.1f} | {_pct(times, 0.9):.1f} |",
                      flush=True)
    writer.close()


def _touch(pages: int, pause_s: float, how: str, passes: int) -> float:
    """Median CPU µs of one pass over `pages` pages after each pause (`how`: sleep or spin)."""
    buf = bytearray(pages * 4096)
    offsets = range(0, pages * 4096, 4096)
    for _ in range(20):
        for i in offsets:
            buf[i] = (buf[i] + 1) & 0xFF
    cpu = []
    for _ in range(passes):
        if pause_s and how == "sleep":
            time.sleep(pause_s)
        elif pause_s:
            until = time.perf_counter() + pause_s
            while time.perf_counter() < until:
                pass
        start = time.thread_time_ns()
        for i in offsets:
            buf[i] = (buf[i] + 1) & 0xFF
        cpu.append((time.thread_time_ns() - start) / 1e3)
    return _pct(cpu, 0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead.wakeup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=150, help="round trips per row")
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--pages", default="16,256,2048")
    args = parser.parse_args(argv)
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("needs redis-server (apt-get install redis-server)")
    print("| command | pause before | client waits | RTT p50 µs | RTT p90 µs |\n| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="sg-wakeup-") as tmp:
        sock = Path(tmp) / "redis.sock"
        redis = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly",
                                  "no", "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                if redis.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start")
                time.sleep(0.02)
            uvloop.run(_redis(str(sock), args.calls, args.gap_ms / 1e3))
        finally:
            redis.terminate()
            redis.wait(timeout=10)
    gap = args.gap_ms / 1e3
    print("\n| pages touched | CPU µs hot | after a sleep | after spinning |\n| --- | --- | --- | --- |")
    for pages in (int(p) for p in args.pages.split(",")):
        print(f"| {pages} | {_touch(pages, 0, 'sleep', 200):.1f} | {_touch(pages, gap, 'sleep', 150):.1f} "
              f"| {_touch(pages, gap, 'spin', 100):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
