"""Mutual TLS between real agents and a real control plane, with certificates the test makes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from switchgear.admin_client import admin_channel
from switchgear.supervise import Proc
from switchgear.tls import ClientTls
from switchgear.v1 import admin_pb2, admin_pb2_grpc
from tests.certs import make_certs
from tests.test_end_to_end import wait_until

pytestmark = pytest.mark.timeout(90)


def test_agents_need_a_client_certificate(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    procs: list[Proc] = []
    try:
        cp = Proc.switchgear("cp", [
            "controlplane", "--admin-auth", "none", "--db", str(tmp_path / "r.db"), "--listen", "127.0.0.1:0", "--no-probes",
            "--tls-cert", certs.server_cert, "--tls-key", certs.server_key, "--tls-client-ca", certs.ca], tmp_path)
        procs.append(cp)
        address = cp.start()
        for name, extra in (("trusted", ["--tls-cert", certs.client_cert, "--tls-key", certs.client_key]),
                            ("no-cert", [])):
            agent = Proc.switchgear(name, ["agent", "--auth", "none", "--control-plane", address, "--listen", "127.0.0.1:0",
                                           "--node-id", name, "--tls-ca", certs.ca, *extra], tmp_path)
            procs.append(agent)
            agent.start()
        operator = ClientTls(certs.ca, certs.client_cert, certs.client_key)
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel(address, None, operator))

        def trusted_connected() -> bool:
            agents = admin.ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).agents
            return any(a.node.id == "trusted" and a.connected and a.acked_version for a in agents)

        wait_until(trusted_connected, 20, "the agent with a certificate to ACK")
        agents = admin.ListAgents(admin_pb2.ListAgentsRequest(), timeout=5).agents
        assert [a.node.id for a in agents] == ["trusted"]  # the other never got through the handshake
        with pytest.raises(grpc.RpcError) as info:  # plaintext is refused too
            admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(address)).ListAgents(
                admin_pb2.ListAgentsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        for proc in reversed(procs):
            proc.stop()
