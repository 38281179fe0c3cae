"""The README's quick start runs as written: its `bash` blocks, in order, in one bash process.

The blocks under the "Quick start" heading start an emulator, a control plane and an agent,
issue a client key and make a call with curl and with the openai SDK, then stop the processes.
Only the ports on the `export UPSTREAM_PORT=...` line are swapped for free ones; the script runs
from the repository's root with this checkout first on PYTHONPATH. Bounded in time; whatever the
script started is ended by its process group (the group of the bash this test started).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PORTS_LINE = re.compile(r"^export UPSTREAM_PORT=\d+ CP_PORT=\d+ AGENT_PORT=\d+ HTTP_PORT=\d+$", re.M)


def quick_start_blocks(text: str) -> list[str]:
    """The ```bash blocks between the "## Quick start" heading and the next "## " heading."""
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```bash\n(.*?)^```$", section, re.S | re.M)


def test_quick_start_blocks_are_found() -> None:
    blocks = quick_start_blocks(README.read_text())
    assert len(blocks) >= 3, "the README's Quick start lost its bash blocks"
    script = "\n".join(blocks)
    assert len(PORTS_LINE.findall(script)) == 1, "the ports line the test substitutes changed shape"
    for needed in ("switchgear controlplane", "switchgear agent", "keys issue", "/v1/chat/completions", "kill "):
        assert needed in script


def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(4)]
    script = "set -euo pipefail\n" + PORTS_LINE.sub(
        "export UPSTREAM_PORT={} CP_PORT={} AGENT_PORT={} HTTP_PORT={}".format(*ports),
        "\n".join(quick_start_blocks(README.read_text())))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("SWITCHGEAR_ADMIN_TOKEN", None)
    env.pop("SWITCHGEAR_API_KEY", None)
    log = tmp_path / "quickstart.out"
    with log.open("w") as sink:  # a file, not a pipe: a process left running cannot hold the test up
        proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything the script left running
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, f"the quick start failed or did not finish in 45 s ({proc.returncode}):\n{out}"
    answers = [line for line in out.splitlines() if line.startswith("{")]
    assert len(answers) >= 2, f"no two JSON answers from curl (chat completions, then invoke):\n{out}"
    completion, invoked = json.loads(answers[-2]), json.loads(answers[-1])
    assert completion["object"] == "chat.completion", completion
    assert completion["choices"][0]["message"]["content"], completion
    # the SDK's call printed the emulator's answer too (between curl's two)
    lines = out.splitlines()
    sdk = lines[lines.index(answers[-2]) + 1:lines.index(answers[-1])]
    assert any(line.strip() for line in sdk), f"the SDK printed nothing:\n{out}"
    assert invoked["payload"]["object"] == "chat.completion" and invoked["attempts"] == 1, invoked
    assert invoked["service"] == "quickstart-chat" and invoked["tenant"] == "my-app", invoked
