"""The `docker` backend: each replica a container, through the Docker Engine API (the `docker`
package; podman's Docker-compatible API service works with it too).

- The image must already be present on the host: it is never pulled (a missing image is a
  crash with its reason, so the replica ends failed and says why).
- Host networking: the container listens on the port the agent picked, on the host, like a
  process replica, so `${PORT}`, `${HOST}` and the readiness call mean the same for both.
- `volumes` are bind mounts ("HOST:CONTAINER[:ro]"); the environment is the spec's `env`,
  `inherit_env` and `PORT` (not the agent's own, which belongs to another filesystem).
- Each run is a new container named `switchgear-<replica>`, removed when the run ends; stopping
  is the API's stop (SIGTERM, SIGKILL after `stop_grace_s`). Docker's own restart policy is off:
  supervision (restarts with backoff, failed after repeated crashes, logs) is supervisor.py's.

The API client is synchronous; every call runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx

from switchgear.dataplane.managed.backend import ReplicaSpec
from switchgear.dataplane.managed.supervisor import LaunchError, Supervised, SupervisingBackend

Container = Any  # docker.models.containers.Container (the package ships no type hints)
API_TIMEOUT_S = 30


def _mounts(volumes: tuple[str, ...]) -> dict[str, dict[str, str]]:
    out = {}
    for volume in volumes:
        host, inside, *mode = volume.split(":")
        out[host] = {"bind": inside, "mode": mode[0] if mode else "rw"}
    return out


class _ContainerReplica(Supervised[Container]):
    def __init__(self, client: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client = client
        self._pid = 0
        self._sending: set[asyncio.Future[None]] = set()

    @property
    def name(self) -> str:
        return f"switchgear-{self.spec.id}"

    def env(self) -> dict[str, str]:
        return {k: v for k, v in super().env().items()
                if k not in ("PATH", "HOME", "LANG", "PYTHONPATH", "TMPDIR") or k in dict(self.spec.env)}

    async def _launch(self, argv: list[str], env: dict[str, str]) -> Container:
        try:
            return await asyncio.to_thread(self._run, argv, env)
        except docker.errors.ImageNotFound:
            raise LaunchError(f"image {self.spec.image!r} is not present on this host (images are never pulled)") \
                from None
        except (docker.errors.DockerException, OSError) as exc:
            raise LaunchError(f"the container engine refused the container: {str(exc)[:300]}") from None

    def _run(self, argv: list[str], env: dict[str, str]) -> Container:
        with contextlib.suppress(docker.errors.NotFound):  # a run this agent did not clean up (it was killed)
            self._client.containers.get(self.name).remove(force=True)
        # create + start, not run: run() pulls an image it does not find, and nothing is pulled here.
        container = self._client.containers.create(
            self.spec.image, command=argv or None, name=self.name, network_mode="host",
            environment=env, volumes=_mounts(self.spec.volumes), labels={"switchgear.replica": self.spec.id},
            restart_policy={"Name": "no"})
        try:
            container.start()
        except BaseException:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                container.remove(force=True)
            raise
        container.reload()
        self._pid = int(container.attrs.get("State", {}).get("Pid") or 0)
        return container

    async def _pump(self, run: Container) -> None:
        loop = asyncio.get_running_loop()

        def follow() -> None:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                for chunk in run.logs(stream=True, follow=True):
                    loop.call_soon_threadsafe(self.log.write, chunk)

        await asyncio.to_thread(follow)

    async def _wait(self, run: Container) -> int:
        def wait() -> int:
            while True:
                with contextlib.suppress(Exception):  # the API's read timeout: keep waiting
                    return int(run.wait(timeout=API_TIMEOUT_S).get("StatusCode", -1))

        code = await asyncio.to_thread(wait)
        self._pid = 0
        return code

    def _signal(self, run: Container, sig: str) -> None:
        def send() -> None:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                run.kill(signal=sig)

        task = asyncio.ensure_future(asyncio.to_thread(send))
        self._sending.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._sending.discard)

    def _terminate(self, run: Container) -> None:
        self._signal(run, "SIGTERM")

    def _kill(self, run: Container) -> None:
        self._signal(run, "SIGKILL")

    async def _end(self, run: Container, grace_s: float) -> None:
        def end() -> None:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                run.stop(timeout=max(1, round(grace_s)))
            with contextlib.suppress(docker.errors.DockerException, OSError):
                run.remove(force=True)

        await asyncio.to_thread(end)

    def pid(self) -> int:
        return self._pid


class DockerBackend(SupervisingBackend[Container]):
    """Runs replicas as containers (see the module docstring)."""

    def __init__(self, log_dir: Path, base_url: str, **kwargs: Any) -> None:
        super().__init__(log_dir, **kwargs)
        self._client = docker.DockerClient(base_url=base_url, timeout=API_TIMEOUT_S)

    def _make(self, spec: ReplicaSpec, http: httpx.AsyncClient, environ: Mapping[str, str],
              clock: Callable[[], float], on_change: Callable[[], None]) -> Supervised[Container]:
        return _ContainerReplica(self._client, spec, self._log_dir, http, environ, clock, on_change)

    async def close(self) -> None:
        await super().close()
        await asyncio.to_thread(self._client.close)
