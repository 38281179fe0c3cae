"""The `docker` backend against podman's Docker-compatible API service (started and stopped here,
on its own storage under the test's directory), with an image built locally (`podman import` of
a near-empty root: the host's interpreter and this checkout are bind-mounted read-only, since no
image registry is reachable). The model server is the OpenAI emulator: ready only once its health
call answers, restarted after SIGKILL on the same port, failed (with its last lines) when the
image is missing, removed when stopped; under load a second container replica is started and
after the load one is drained and removed with no failed call (as test_containers_e2e does for the
process backend)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from switchgear.dataplane.managed.backend import ReplicaSpec, State

docker = pytest.importorskip("docker")
if shutil.which("podman") is None or shutil.which("runc") is None:
    pytest.skip("podman and runc are not installed (apt-get install podman runc)", allow_module_level=True)

from switchgear.dataplane.managed.docker import DockerBackend  # noqa: E402 (after the skips)
from switchgear.v1 import admin_pb2  # noqa: E402
from tests.test_containers_e2e import HEAD, Load, ManagedCluster, alive, invoke  # noqa: E402
from tests.test_end_to_end import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(60)

IMAGE = "localhost/switchgear-test-base:1"
ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path(sys.executable)
# The interpreter (and its base installation), its virtual environment and this checkout.
MOUNTS = tuple(f"{d}:{d}:ro" for d in dict.fromkeys(("/usr", "/lib", "/lib64", "/bin", str(ROOT), sys.prefix,
                                                      sys.base_prefix)) if Path(d).exists())
CONF = """[containers]
default_ulimits = []
pids_limit = 0
[engine]
cgroup_manager = "cgroupfs"
"""


def podman(base: Path) -> list[str]:
    return ["podman", "--root", str(base / "root"), "--runroot", str(base / "run"), "--storage-driver", "vfs",
            "--runtime", "runc", "--cgroup-manager", "cgroupfs"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("podman")
    env = {**os.environ, "CONTAINERS_CONF": str(base / "containers.conf")}
    (base / "containers.conf").write_text(CONF)
    rootfs = base / "rootfs"
    for d in ("tmp", "proc", "dev", "sys", "etc", "root"):
        (rootfs / d).mkdir(parents=True)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    with tarfile.open(base / "base.tar", "w") as tar:
        tar.add(rootfs, arcname=".")
    subprocess.run([*podman(base), "import", str(base / "base.tar"), IMAGE], env=env, check=True,
                   capture_output=True, timeout=60)
    sock = base / "podman.sock"
    service = subprocess.Popen([*podman(base), "system", "service", "--time=0", f"unix://{sock}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline and service.poll() is None, "podman's API service did not start"
            time.sleep(0.05)
        yield f"unix://{sock}"
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(5)


def spec(replica_id: str, image: str = IMAGE, **kw: object) -> ReplicaSpec:
    base: dict[str, object] = {
        "command": (str(PYTHON), "-m", "switchgear", "emulate", "openai", "--instance", "r:1:${PORT}"),
        "env": (("PYTHONPATH", str(ROOT)),), "image": image, "volumes": MOUNTS, "backend": "docker",
        "url": "http://127.0.0.1:${PORT}/v1", "readiness_url": "http://127.0.0.1:${PORT}/v1/models",
        "readiness_timeout_s": 20.0, "restart_backoff_s": 0.05, "restart_max_backoff_s": 0.2, "stop_grace_s": 2.0}
    return ReplicaSpec(replica_id, "svc", **(base | kw))  # type: ignore[arg-type]


async def until(check: Callable[[], bool], timeout_s: float = 25.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def state(backend: DockerBackend, replica_id: str) -> State | None:
    status = backend.status(replica_id)
    return None if status is None else status.state


async def test_a_container_replica_is_ready_gated_restarted_after_sigkill_and_removed_when_stopped(
        engine: str, tmp_path: Path) -> None:
    backend = DockerBackend(tmp_path / "logs", engine)
    client = docker.DockerClient(base_url=engine)
    try:
        await backend.start(spec("replica-d1"))
        assert state(backend, "replica-d1") is State.STARTING
        await until(lambda: state(backend, "replica-d1") is State.READY, what="ready")
        first = backend.status("replica-d1")
        assert first is not None and first.pid
        assert urllib.request.urlopen(f"{first.url}/models", timeout=5).status == 200
        (container,) = client.containers.list(filters={"label": "switchgear.replica=replica-d1"})
        assert container.name == "switchgear-replica-d1"
        os.kill(first.pid, signal.SIGKILL)  # the server inside the container dies
        await until(lambda: backend.status("replica-d1").restarts > first.restarts  # type: ignore[union-attr]
                    and backend.status("replica-d1").pid not in (0, first.pid)  # type: ignore[union-attr]
                    and state(backend, "replica-d1") is State.READY, what="restarted and ready")
        again = backend.status("replica-d1")
        assert again is not None and again.url == first.url and again.pid != first.pid
        assert urllib.request.urlopen(f"{again.url}/models", timeout=5).status == 200
        assert "exited with status 137" in (tmp_path / "logs" / "replica-d1.log").read_text()
        await backend.stop("replica-d1")
        assert client.api.containers(all=True, filters={"label": "switchgear.replica=replica-d1"}) == []
    finally:
        await backend.close()
        client.close()


async def test_a_missing_image_is_failed_with_its_reason(engine: str, tmp_path: Path) -> None:
    backend = DockerBackend(tmp_path / "logs", engine)
    try:
        await backend.start(spec("replica-d2", image="localhost/not-built:1", max_crashes=2))
        await until(lambda: state(backend, "replica-d2") is State.FAILED, what="failed")
        status = backend.status("replica-d2")
        assert status is not None and "not present on this host" in status.message
        assert any("never pulled" in line for line in status.last_log)
    finally:
        await backend.close()


CONFIG = HEAD + """\
        - name: "{name}"
          model: "gpt-4o-mini"
          timeout: 10
          managed:
            backend: docker
            image: "{image}"
            command: ["{python}", "-m", "switchgear", "emulate", "openai", "--instance", "r:{latency}:${{PORT}}"]
            env: {{PYTHONPATH: "{root}"}}
            volumes: [{volumes}]
            readiness: {{timeout: 20s}}
            resources: {{cpu: 1}}
{more}"""
#: Scaled out and in (named as test_containers_e2e's service, so its Load and views apply unchanged).
SCALED = """\
            replicas: {min: 1, max: 2}
            concurrency: 2
            scaling: {scale_up_window: 1s, scale_down_window: 2s}
            stop_grace: 2s
            drain_timeout: 10s
"""


def config(name: str = "boxed", latency_ms: int = 1, more: str = "            restart: {backoff: 0.1s}\n") -> str:
    return CONFIG.format(name=name, latency=latency_ms, more=more, image=IMAGE, python=PYTHON, root=ROOT,
                         volumes=", ".join(f'"{m}"' for m in MOUNTS))


def test_a_managed_container_serves_through_its_route_and_is_restarted_after_sigkill(
        engine: str, tmp_path: Path) -> None:
    cluster = ManagedCluster(tmp_path)
    try:
        cluster.start_control_plane_fast()
        cluster.start_node_agent(1, "--managed-docker", engine)
        cluster.admin().ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=config(), source="boxed.yaml"), timeout=5)

        def serving() -> list[admin_pb2.ManagedReplica]:
            return [r for r in cluster.replicas() if r.serving and r.state == "ready"]

        wait_until(lambda: len(serving()) == 1, 30, "the container to be ready and serving")
        (first,) = serving()
        wait_until(lambda: _answers(cluster) == first.id, 10, "a call through the route")
        os.kill(first.pid, signal.SIGKILL)
        wait_until(lambda: any(r.restarts > first.restarts and r.pid not in (0, first.pid) and r.serving
                               for r in cluster.replicas()), 30, "the restart")
        (again,) = serving()
        assert again.id == first.id and again.pid != first.pid and not alive(first.pid)
        wait_until(lambda: _answers(cluster) == first.id, 10, "calls again after the restart")
    finally:
        cluster.stop()


def _answers(cluster: ManagedCluster, service: str = "boxed") -> str:
    try:
        return str(invoke(cluster, service).endpoint)
    except Exception:  # grpc.RpcError while the agent has not applied the new version yet
        return ""



def test_managed_containers_scale_out_under_load_and_drain_in_without_a_failed_call(
        engine: str, tmp_path: Path) -> None:
    cluster = ManagedCluster(tmp_path)
    client = docker.DockerClient(base_url=engine)

    def containers(replica_id: str) -> list[object]:
        # The low-level list: the high-level one inspects each container it lists, and a container
        # removed between the list and the inspect (the drain this test waits for) is a 500.
        return list(client.api.containers(all=True, filters={"label": f"switchgear.replica={replica_id}"}))

    try:
        cluster.start_control_plane_fast()
        cluster.start_node_agent(2.5, "--managed-docker", engine)
        yaml = config("llama-local", latency_ms=60, more=SCALED)
        cluster.admin().ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=yaml, source="scaled.yaml"), timeout=5)
        wait_until(lambda: len(cluster.serving()) == 1, 30, "the first container to be ready and serving")
        (first,) = cluster.serving()
        wait_until(lambda: _answers(cluster, "llama-local") == first.id, 10, "a call through the route")

        with Load(cluster, threads=4) as load:
            # 4 callers on concurrency 2: utilisation above 0.8 for the 1 s window -> a second container.
            wait_until(lambda: len(cluster.serving()) == 2, 30, "a second container replica under load")
            wait_until(lambda: len(load.endpoints) == 2, 10, "calls on both replicas")
            assert all(len(containers(r.id)) == 1 for r in cluster.serving())
        assert not load.failures, load.failures[:5]
        decisions = cluster.admin().ListReplicas(admin_pb2.ListReplicasRequest(), timeout=5).decisions
        assert any("scale_out" in d for d in decisions), decisions

        # Load stopped: below 0.6 for 2 s -> one drained, stopped and removed, while calls keep coming.
        before = {r.id for r in cluster.replicas_of()}
        with Load(cluster, threads=1) as light:
            wait_until(lambda: len(cluster.replicas_of()) == 1, 25, "a container replica to be drained and stopped")
            survivor = cluster.replicas_of()[0].id
            calls = light.ok
            wait_until(lambda: light.ok >= calls + 5, 10, "calls to go on after the drain")
        assert not light.failures, light.failures[:5]
        assert light.endpoints <= before
        (gone,) = before - {survivor}
        wait_until(lambda: containers(gone) == [], 10, "the drained replica's container to be removed")
        assert len(containers(survivor)) == 1 and cluster.snapshot_endpoints() == [survivor]
        decisions = cluster.admin().ListReplicas(admin_pb2.ListReplicasRequest(), timeout=5).decisions
        assert any("scale_in" in d for d in decisions), decisions
    finally:
        cluster.stop()
        client.close()
