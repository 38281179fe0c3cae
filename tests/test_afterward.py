"""A request's work after its answer (dataplane/afterward.py): queued while the HTTP door's handler
runs, run once the whole answer is written, and never lost (a failed handler, a failing piece,
work queued after the request's queue ran, no door at all)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from switchgear.dataplane import access_log, afterward
from switchgear.dataplane.door_metrics import DoorMetrics, Edge
from switchgear.dataplane.http_edge import observe
from switchgear.dataplane.snapshot import Holder

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def test_without_a_door_the_work_runs_at_once() -> None:
    ran: list[int] = []
    afterward.later(ran.append, 1)
    assert ran == [1]


def test_queued_work_runs_in_order_and_a_failing_piece_does_not_stop_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    ran: list[int] = []
    work, token = afterward.collect()
    try:
        afterward.later(ran.append, 1)
        afterward.later(lambda: 1 / 0)
        afterward.later(ran.append, 2)
        assert ran == []  # queued, not run
    finally:
        afterward.stop(token)
    with caplog.at_level(logging.ERROR, logger="switchgear.dataplane.afterward"):
        work.run()
    assert ran == [1, 2]
    assert "work after an answer failed" in caplog.text
    work.add(ran.append, (3,))  # queued after the run (a straggling task): runs at once, not lost
    assert ran == [1, 2, 3]
    afterward.later(ran.append, 4)  # the request's queue is no longer current
    assert ran == [1, 2, 3, 4]


async def _door(handler: Handler) -> tuple[web.AppRunner, str]:
    """An app behind the door's `observe` middleware; its URL."""
    app = web.Application(middlewares=[observe(Edge(DoorMetrics(), Holder()), None)])
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/v1/chat/completions"


async def test_the_answer_is_written_before_the_requests_work_and_the_next_request_sees_it_done(
        monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[str] = []
    monkeypatch.setattr(access_log, "write", lambda exchange: logged.append(exchange.request_id))
    seen: list[tuple[str, int, bool]] = []  # (request id, bytes written when the work ran, line logged)
    done: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        rid = request.headers["x-request-id"]
        assert done == [f"r{i}" for i in range(len(done))], "a request began before the last one's work ran"

        def work() -> None:
            seen.append((rid, request.writer.output_size, rid in logged))
            done.append(rid)

        afterward.later(work)
        return web.Response(body=b'{"ok": true}', content_type="application/json")

    runner, url = await _door(handler)
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(3):
                async with session.post(url, json={}, headers={"x-request-id": f"r{i}"}) as response:
                    assert response.status == 200
                    assert response.headers["x-request-id"] == f"r{i}"
                    assert await response.json() == {"ok": True}
    finally:
        await runner.cleanup()
    assert [rid for rid, _, _ in seen] == ["r0", "r1", "r2"]
    assert all(written > 0 for _, written, _ in seen), "the work ran before the answer was written"
    assert not any(line for _, _, line in seen), "the access-log line came before the request's work"
    assert logged == ["r0", "r1", "r2"]


async def test_a_failed_handler_still_runs_its_work_and_is_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access_log, "write", lambda exchange: None)
    ran: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        afterward.later(ran.append, "queued before the failure")
        raise RuntimeError("boom")

    runner, url = await _door(handler)
    try:
        async with aiohttp.ClientSession() as session, session.post(url, json={}) as response:
            assert response.status == 500
    finally:
        await runner.cleanup()
    assert ran == ["queued before the failure"]


def test_a_success_reaches_counting_observers_after_the_answer_and_the_others_at_once() -> None:
    from switchgear.dataplane.events import AttemptEnd, AttemptStart
    from switchgear.dataplane.invoke import Invoker

    seen: list[str] = []

    class Observer:
        def __init__(self, name: str) -> None:
            self.name = name

        def attempt_started(self, event: AttemptStart) -> None:
            seen.append(f"{self.name} started")

        def attempt_ended(self, event: AttemptEnd) -> None:
            seen.append(f"{self.name} ended")

    class Counting(Observer):
        after_answer = True

    invoker = Invoker({}, None, None, None, observers=[Counting("metrics"), Observer("live")])  # type: ignore[arg-type]
    work, token = afterward.collect()
    try:
        invoker._answered(AttemptEnd("r", "s", "llm", "e", 1, 0.02))
    finally:
        afterward.stop(token)
    assert seen == ["live ended"]
    work.run()
    assert seen == ["live ended", "metrics ended"]
    invoker._answered(AttemptEnd("r", "s", "llm", "e", 1, 0.02))  # no door collecting (gRPC): all at once
    assert seen[2:] == ["live ended", "metrics ended"]
