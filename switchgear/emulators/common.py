"""What every emulator shares: fault state, the /_emulator routes, running apps, a CLI.

The fault model is the OpenAI emulator's (`openai.Faults`, `openai._Instance`): one app per
instance keeps its `_Instance` under the same app key, so `GET/POST /_emulator/faults` and
`GET/DELETE /_emulator/stats` behave identically for every provider. Each provider supplies
only how an injected failure looks on its wire (`ErrorRenderer`) and how it checks keys.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from switchgear.emulators import openai as oa

INSTANCE = oa._INSTANCE
Faults = oa.Faults
InstanceSpec = oa.InstanceSpec

#: (status, message, kind) -> the provider's error answer. kind: "server", "rate_limit",
#: "auth", "invalid", "not_found", "too_large", "context".
ErrorRenderer = Callable[[int, str, str], web.Response]


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers)


def add_emulator_routes(app: web.Application) -> None:
    app.router.add_get("/_emulator/faults", oa._get_faults)
    app.router.add_post("/_emulator/faults", oa._post_faults)
    app.router.add_get("/_emulator/stats", oa._get_stats)
    app.router.add_delete("/_emulator/stats", oa._delete_stats)


def new_app(spec: InstanceSpec, middlewares: Sequence[Any] = ()) -> web.Application:
    app = web.Application(middlewares=list(middlewares), client_max_size=64 * 1024 * 1024)
    app[INSTANCE] = oa._Instance(spec)
    add_emulator_routes(app)
    return app


async def inject(
    request: web.Request, render: ErrorRenderer, auth_ok: Callable[[web.Request], bool], count_path: bool = True
) -> web.StreamResponse | None:
    """Apply the instance's faults in the OpenAI emulator's order (latency → drop → hang →
    key → fail_next → bucket → rate → error_rate); a response that replaces the answer."""
    instance = request.app[INSTANCE]
    if count_path:
        resource = request.match_info.route.resource
        instance.by_path[resource.canonical if resource is not None else "unmatched"] += 1
    delay = instance.delay_s()
    if delay:
        await asyncio.sleep(delay)
    faults = instance.faults
    if faults.drop:
        instance.by_outcome["drop"] += 1
        return await oa._abandon(request)
    if faults.hang:
        instance.by_outcome["hang"] += 1
        await instance.closing.wait()
        return await oa._abandon(request)
    if not auth_ok(request):
        instance.by_outcome["unauthorized"] += 1
        return render(401, "invalid api key", "auth")
    error = instance.injected_error("")
    if error is None:
        return None
    instance.by_outcome[oa._outcome(error.status)] += 1
    response = render(error.status, error.message, "rate_limit" if error.status == 429 else "server")
    response.headers.update(error.headers)
    return response


def gated(render: ErrorRenderer, auth_ok: Callable[[web.Request], bool]) -> Any:
    """Middleware: faults on every non-/_emulator request, outcomes counted."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/_emulator/"):
            return await handler(request)
        replaced = await inject(request, render, auth_ok)
        if replaced is not None:
            return replaced
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status in (404, 405):
                response = render(exc.status, f"Invalid URL ({request.method} {request.path})", "not_found")
            else:
                raise
        request.app[INSTANCE].by_outcome[oa._outcome(response.status)] += 1
        return response

    return middleware


# ---------------------------------------------------------------------------------------
# running


@dataclass
class Running:
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def instance(self) -> oa._Instance:
        return self.runner.app[INSTANCE]

    def set_faults(self, faults: Faults) -> None:
        faults.check()
        self.instance.set_faults(faults)

    async def close(self) -> None:
        if INSTANCE in self.runner.app:
            self.instance.closing.set()
        await self.runner.cleanup()

    async def __aenter__(self) -> Running:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def run_app(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> Running:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
    except BaseException:
        await runner.cleanup()
        raise
    return Running(runner, int(runner.addresses[0][1]))


def cli(
    kind: str,
    build: Callable[[argparse.Namespace], web.Application],
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> Callable[[list[str] | None], int]:
    """A `switchgear emulate KIND --port P [--latency-ms L] [--api-key K]` main that prints
    `{"port": P}` once listening and runs until SIGTERM/SIGINT."""

    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=f"switchgear emulate {kind}", description=f"Run a {kind} API emulator.")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=0)
        parser.add_argument("--latency-ms", type=float, default=0.0)
        parser.add_argument("--api-key", default=None)
        if extra_args is not None:
            extra_args(parser)
        args = parser.parse_args(argv)

        async def serve() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            running = await run_app(build(args), args.host, args.port)
            try:
                sys.stdout.buffer.write(orjson.dumps({"port": running.port}) + b"\n")
                sys.stdout.buffer.flush()
                await stop.wait()
            finally:
                await running.close()

        try:
            oa.run_loop(serve())
        except OSError as exc:
            print(f"switchgear emulate {kind}: {exc}", file=sys.stderr)
            return 1
        return 0

    return main
