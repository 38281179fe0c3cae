"""bench/overhead's nginx upstream (`--upstream nginx`): its config gives back the canned body byte
for byte in meaning (quotes, backslashes, `$`, non-ASCII), it counts what it answered, it stops
with its worker; and the bench's own stack (emulator, control plane, agent) serves through it,
the agent reading the canned usage. Real nginx; skipped when it is not installed (the bench
installs it on demand)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from bench.overhead.nginx import Nginx, quoted
from bench.overhead.run import CHAT, Stack, check_canned
from tests.servers import _alive, _children

pytestmark = pytest.mark.timeout(60)

needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                                 reason="nginx not installed (python -m bench.overhead --upstream nginx installs it)")


def wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while [p for p in pids if _alive(p)]:
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.02)


@needs_nginx
def test_nginx_answers_the_canned_body_counts_it_and_stops(tmp_path: Path) -> None:
    canned = {"id": "c-1", "object": "chat.completion", "text": "it's $request_uri \\ \"quoted\" {x; y} é",
              "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}
    nginx = Nginx(tmp_path, json.dumps(canned, ensure_ascii=False))
    port = nginx.start()
    try:
        assert 20000 <= port < 32768  # below the ephemeral range: no outgoing connection holds it
        with httpx.Client(timeout=5) as client:
            for _ in range(3):
                answer = client.post(nginx.url, json={**CHAT, "model": "gpt-4o-mini"})
                assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
                assert answer.json() == canned
            assert client.get(nginx.url).status_code == 405
            assert client.post(nginx.url.replace("/chat/", "/other/"), json={}).status_code == 404
        assert nginx.served() == 5  # every request it answered, not its own status reads
        assert nginx.served() == 5
        worker = _children(nginx.pid)
        assert len(worker) == 1  # worker_processes 1
    finally:
        nginx.stop()
    assert nginx.proc is not None and nginx.proc.returncode is not None
    wait_gone(worker)


def test_quoted_refuses_a_body_of_more_than_one_line() -> None:
    with pytest.raises(ValueError, match="one line"):
        quoted('{"a":\n1}')
    assert quoted("{\"a\": \"it's $x\"}") == "'{\"a\": \"it\\'s \\\\u0024x\"}'"


def test_check_canned_refuses_an_answer_whose_usage_differs() -> None:
    canned = {"object": "chat.completion", "choices": [], "usage": {"total_tokens": 8}}
    check_canned(httpx.Response(200, json=canned), canned)
    with pytest.raises(AssertionError, match="usage"):
        check_canned(httpx.Response(200, json={**canned, "usage": {"total_tokens": 7}}), canned)


@needs_nginx
def test_the_bench_stack_serves_the_zero_delay_service_from_nginx(tmp_path: Path) -> None:
    stack = Stack(tmp_path, upstream="nginx")
    try:
        stack.start()  # checks the agent's HTTP answer and its gRPC usage against nginx's body
        assert stack.nginx is not None and stack.upstream_pid("zero") == stack.nginx.pid
        assert stack.upstream_pid("fixed") == stack.emulator.pid  # the 20 ms service stays on the emulator
        before, emulated = stack.served("zero"), stack.served("fixed")
        answer = httpx.post(f"http://{stack.http_address}/v1/chat/completions", json={**CHAT, "model": "bench-0ms"},
                            timeout=5)
        assert answer.status_code == 200 and answer.headers["x-switchgear-endpoint"] == "zero"
        check_canned(answer, stack.canned)
        assert stack.served("zero") == before + 1 and stack.served("fixed") == emulated
    finally:
        stack.stop()
    assert stack.nginx.proc is not None and stack.nginx.proc.returncode is not None
