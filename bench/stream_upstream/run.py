"""The agent's CPU per whole-answer chat call with `stream_upstream` off and on, and per streamed
call (InvokeStream's path) for the same answer: what the setting costs an agent.

One command (`python -m bench.stream_upstream`) starts an OpenAI emulator process (one instance,
no delay) and drives, in this process, the agent's own request path (Invoker, Streamer, routing
statistics, client pool) against it: warm-up, then `--rounds` rounds of `--calls` sequential
calls of each kind, alternated, timing this process's CPU (`time.process_time`: the emulator's
work is in its own process). Every process started here is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Any

from switchgear.adapters import builtin_adapters
from switchgear.dataplane.attempts import Resilience
from switchgear.dataplane.convert import Call
from switchgear.dataplane.invoke import Invoker
from switchgear.dataplane.scheduling.stats import LiveStats
from switchgear.dataplane.snapshot import AgentSettings, AgentSnapshot, EndpointView, SchedulingPolicy, ServiceView
from switchgear.dataplane.stream import Streamer
from switchgear.dataplane.upstreams import ClientPool, SecretResolver

ADAPTERS = builtin_adapters()
PAYLOAD = MappingProxyType({"messages": [{"role": "user", "content": "a one-line prompt of a dozen words or so"}]})


class _First:
    """The agent's pick, reduced to its one endpoint."""

    def pick(self, service: ServiceView, exclude: Any = (), call: Any = None,
             settings: Any = None) -> EndpointView | None:
        return service.endpoints[0]


def _path(url: str, stream_upstream: bool) -> tuple[Invoker, Streamer, AgentSnapshot, ClientPool]:
    service = ServiceView(name="chat", category="llm", protocol="openai", endpoints=(EndpointView("e0", url),),
                          model="gpt-4o-mini", options=ADAPTERS["openai"].parse_options({}))
    policies = MappingProxyType({"llm": SchedulingPolicy(stream_upstream=stream_upstream)})
    snapshot = AgentSnapshot("1", MappingProxyType({"chat": service}), AgentSettings(category_policies=policies))
    live, pool = LiveStats(), ClientPool()
    resilience = Resilience(stats=live)
    resilience.apply(snapshot)
    secrets = SecretResolver({})
    invoker = Invoker(ADAPTERS, pool, secrets, _First(), observers=[live], resilience=resilience)
    streamer = Streamer(ADAPTERS, pool, secrets, _First().pick, observers=[live], resilience=resilience)
    return invoker, streamer, snapshot, pool


def _call(n: int) -> Call:
    return Call(request_id=f"b{n}", category="", service="chat", method="chat.completions", payload=PAYLOAD,
                priority=5, timeout_s=0.0, user_id="", session_id="")


async def _measure(url: str, calls: int, rounds: int) -> dict[str, list[float]]:
    off, on = _path(url, False), _path(url, True)
    counter = iter(range(1 << 62))

    async def unary_off() -> None:
        await off[0].invoke(_call(next(counter)), off[2])

    async def unary_on() -> None:
        await on[0].invoke(_call(next(counter)), on[2])

    async def streamed() -> None:
        async for _ in off[1].stream(_call(next(counter)), off[2]):
            pass

    kinds: dict[str, Callable[[], Awaitable[None]]] = {
        "whole answer, stream_upstream off": unary_off,
        "whole answer, stream_upstream on": unary_on,
        "InvokeStream (same answer)": streamed,
    }
    for run in kinds.values():  # warm-up: connections, caches, statistics
        for _ in range(50):
            await run()
    results: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(rounds):
        for name, run in kinds.items():
            started = time.process_time()
            for _ in range(calls):
                await run()
            results[name].append((time.process_time() - started) / calls * 1e6)
    await off[3].close()
    await on[3].close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_upstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls of each kind per round (default 200)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, kinds alternated (default 4)")
    args = parser.parse_args(argv)
    emulator = subprocess.Popen([sys.executable, "-m", "switchgear", "emulate", "openai", "--instance", "a:0"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert emulator.stdout is not None
        port = json.loads(emulator.stdout.readline())["a"]
        results = asyncio.run(_measure(f"http://127.0.0.1:{port}/v1", args.calls, args.rounds))
    finally:
        emulator.terminate()
        emulator.wait(10)
    print("| path | agent CPU per call, µs (median of rounds) | rounds |")
    print("| --- | --- | --- |")
    for name, values in results.items():
        print(f"| {name} | {sorted(values)[len(values) // 2]:.0f} | {', '.join(f'{v:.0f}' for v in values)} |")
    return 0
