"""A listener that cannot be opened is a one-line refusal naming the flag and the address, and
exit status 2 — never a traceback — for every port either plane opens, on both gRPC servers."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

AGENT = ["agent", "--auth", "none", "--control-plane", "127.0.0.1:9", "--listen", "127.0.0.1:0"]


@pytest.fixture
def taken() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(("argv", "flag"), [
    (["agent", "--auth", "none", "--control-plane", "127.0.0.1:9", "--grpc-server", "switchgear", "--listen"],
     "--listen"),
    (["agent", "--auth", "none", "--control-plane", "127.0.0.1:9", "--grpc-server", "grpcio", "--listen"],
     "--listen"),
    ([*AGENT, "--http-listen"], "--http-listen"),
    ([*AGENT, "--metrics-listen"], "--metrics-listen"),
    (["controlplane", "--listen"], "--listen"),
], ids=["agent-switchgear-rpc", "agent-grpcio", "agent-http", "agent-metrics", "controlplane"])
def test_a_taken_port_is_refused_in_one_line(argv: list[str], flag: str, taken: str, tmp_path: object) -> None:
    extra = ["--db", f"{tmp_path}/r.db"] if argv[0] == "controlplane" else []
    done = subprocess.run([sys.executable, "-m", "switchgear", *argv, taken, *extra], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(("switchgear agent: ", "switchgear controlplane: ")), last
    assert f"{flag} {taken}: " in last, last
