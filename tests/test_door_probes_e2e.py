"""Probes and reflection on real processes: an agent started before its control plane.

The agent prints READY (its ports serve) at once, and `SERVING <version>` only once it holds a
snapshot; its front door's /readyz is 503 until then and 200 after. The control plane's gRPC
health answers SERVING for every service it serves, and both gRPC servers (the control
plane's grpc.aio, the agent's switchgear.rpc) answer reflection as v1 and as v1alpha.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from switchgear.controlplane.server import SERVICE_NAMES
from switchgear.supervise import Proc
from tests.servers import free_port
from tests.test_replicas_e2e import CONFIG  # one service, "chat"

pytestmark = pytest.mark.timeout(60)



def status(url: str | urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def reflect(address: str, version: str) -> reflection_pb2.ServerReflectionResponse:
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=f"grpc.reflection.{version}"
                                                                                  ".ServerReflection")]
        listed, described = list(call(iter(requests), timeout=5))
    assert described.HasField("file_descriptor_response"), described
    return listed


def test_ready_only_with_a_snapshot_health_and_reflection(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    token_file = Path(f"{db}.agent-token")
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("agent-token-for-the-test\n")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(url="http://127.0.0.1:9"), encoding="utf-8")
    cp_address = f"127.0.0.1:{free_port()}"
    access = tmp_path / "access.log"
    agent = Proc.switchgear("agent", ["agent", "--control-plane", cp_address, "--listen", "127.0.0.1:0",
                                      "--http-listen", "127.0.0.1:0", "--agent-token-file", str(token_file),
                                      "--access-log", str(access)], tmp_path)
    cp = Proc.switchgear("cp", ["controlplane", "--db", str(db), "--listen", cp_address, "--config", str(config),
                                "--no-probes"], tmp_path)
    try:
        agent_address = agent.start()
        http = agent.wait_line("HTTP ", 20).split()[1]
        assert status(f"http://{http}/healthz") == 200
        assert status(f"http://{http}/readyz") == 503  # no control plane yet: no snapshot
        cp.start()
        version = agent.wait_line("SERVING ", 20).split()[1]
        assert version
        assert status(f"http://{http}/readyz") == 200
        request = urllib.request.Request(f"http://{http}/v1/chat/completions", data=b"{}", method="POST",
                                         headers={"x-request-id": "e2e-1", "Authorization": "Bearer sk-not-a-key"})
        assert status(request) == 401
        deadline = time.monotonic() + 5  # the access log reaches its file within its flush interval
        while not access.exists() or not access.read_bytes().endswith(b"\n"):
            assert time.monotonic() < deadline, "no access-log line"
            time.sleep(0.02)
        (line,) = access.read_text().splitlines()  # the probes are not logged
        entry = json.loads(line)
        assert (entry["request_id"], entry["status"], entry["reason"]) == ("e2e-1", 401, "invalid_api_key")
        assert "sk-not-a-key" not in line
        with grpc.insecure_channel(cp_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", *SERVICE_NAMES):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        for address, expected in ((cp_address, "switchgear.v1.TasksService"),
                                  (agent_address, "switchgear.v1.GatewayService")):
            for version_name in ("v1", "v1alpha"):
                listed = {s.name for s in reflect(address, version_name).list_services_response.service}
                assert {expected, "grpc.reflection.v1.ServerReflection",
                        "grpc.reflection.v1alpha.ServerReflection"} <= listed, (address, version_name, listed)
    finally:
        agent.stop()
        cp.stop()


@pytest.mark.parametrize(("flags", "message"), [
    (["--access-log", "/nonexistent-dir/access.log"], "--access-log /nonexistent-dir/access.log"),
    (["--metrics-max-tenants", "0"], "--metrics-max-tenants"),
    (["--metrics-max-routes", "many"], "--metrics-max-routes"),
])
def test_bad_edge_flags_are_refused_naming_the_flag(flags: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "switchgear", "agent", "--control-plane", "127.0.0.1:9",
                           "--listen", "127.0.0.1:0", *flags], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SWITCHGEAR_AGENT_TOKEN": "t"})
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
