"""The console's Replicas page (issue 18): every managed replica from ListReplicas, a failed one's
last log lines escaped in a <pre> (they are a program's own output: hostile text), the scaling
decisions; 401 without a session, readable by a viewer. A real control plane in-process, with the
agent's side of the load-report stream injected into its container manager as test_containers does."""

from __future__ import annotations

import asyncio
import html
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from switchgear.controlplane.console import ConsoleOptions
from switchgear.controlplane.container_manager import MAX_LOG_LINES, MAX_TEXT, ContainerManager
from tests.test_console import Plane, console_plane
from tests.test_containers import MANAGED, offer, status

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture
async def managed_plane(tmp_path: Path) -> AsyncIterator[tuple[Plane, ContainerManager]]:
    console = ConsoleOptions(listen="127.0.0.1:0", viewer_token_file=str(tmp_path / "viewer-token"))
    async with console_plane(tmp_path, MANAGED, console) as (plane, cp):
        yield plane, cp.parts.containers


async def placed(manager: ContainerManager, node: str) -> str:
    """The agent offers room and reports; the manager's own loop places the replica there."""
    manager.node_offered(node, offer())
    manager.node_report(node, [])
    deadline = asyncio.get_running_loop().time() + 10
    while not manager.rows():
        assert asyncio.get_running_loop().time() < deadline, "nothing placed"
        await asyncio.sleep(0.05)
    return manager.rows()[0].id


async def test_replicas_page_lists_replicas_and_escapes_a_failed_ones_log(
        managed_plane: tuple[Plane, ContainerManager]) -> None:
    plane, manager = managed_plane
    for path in ("/replicas", "/api/replicas"):
        anonymous = await plane.get(path)
        assert anonymous.status_code == 401 and "llama" not in anonymous.text, path
    sid, _ = await plane.login()
    page = await plane.get("/replicas", sid)
    assert page.status_code == 200 and "No managed replicas." in page.text
    assert '<a href="/replicas" class="active">Replicas</a>' in page.text

    replica = await placed(manager, "agent-1")
    manager.node_report("agent-1", [status(replica, "failed", restarts=3, pid=4242, message=f"crashed {HOSTILE}",
                                           last_log=["loading model", f"boom {HOSTILE}", "exit 1"])])
    manager.decisions.append(f"llama: scale out to 2 (utilisation 0.93) {HOSTILE}")
    page = await plane.get("/replicas", sid)
    assert page.status_code == 200
    text = page.text
    assert "<script>alert" not in text and "<img src=x" not in text  # hostile text never becomes markup
    assert text.count("<script") == 1  # only the layout's own /static/console.js
    escaped = html.escape(HOSTILE, quote=True)
    assert f'<pre class="log">loading model\nboom {escaped}\nexit 1</pre>' in text
    assert f"<td>crashed {escaped}</td>" in text
    assert f"<li>llama: scale out to 2 (utilisation 0.93) {escaped}</li>" in text
    row = f"<td>llama</td><td>{replica}</td><td>agent-1</td><td><span class=\"replica failed\">failed</span></td>"
    assert row + "<td>no</td><td>3</td><td>4242</td><td>http://127.0.0.1:9001/v1</td>" in text
    assert f"Last lines of {replica} (llama, failed)" in text

    # Ready and serving once its agent says so; the poll fragment carries the same table.
    manager.node_report("agent-1", [status(replica, "ready", pid=4243)])
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        fragment = await plane.get("/api/replicas", sid)
        assert fragment.status_code == 200 and "<html" not in fragment.text
        if '<span class="replica ready">ready</span></td><td>yes</td>' in fragment.text:
            break
        assert asyncio.get_running_loop().time() < deadline, fragment.text
        await asyncio.sleep(0.05)
    assert '<pre class="log">' not in fragment.text  # a ready replica shows no crash log

    viewer, _ = await plane.login(plane.viewer_token)
    seen = await plane.get("/replicas", viewer)
    assert seen.status_code == 200 and replica in seen.text


async def test_a_flood_of_log_lines_from_a_replica_renders_a_bounded_page(
        managed_plane: tuple[Plane, ContainerManager]) -> None:
    plane, manager = managed_plane
    replica = await placed(manager, "agent-1")
    sid, _ = await plane.login()
    manager.node_report("agent-1", [status(replica, "failed", message="m" * 100_000,
                                           last_log=[f"{i:04d}" + "<" * 100_000 for i in range(1000)])])
    page = await plane.get("/replicas", sid)
    assert page.status_code == 200
    lines = page.text.split('<pre class="log">')[1].split("</pre>")[0].split("\n")
    assert len(lines) == MAX_LOG_LINES and lines[-1].startswith("0999")  # the newest lines, each cut
    assert all(len(html.unescape(line)) == MAX_TEXT for line in lines)
    assert len(page.text) < 8 * MAX_TEXT * (MAX_LOG_LINES + 1) + 16_384  # "<" is 4 characters escaped
