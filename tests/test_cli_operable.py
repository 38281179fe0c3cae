"""The `switchgear` command against real processes (control plane with its admin token, an agent
that requires client keys, emulators): credentials for `tasks`, tables and `--json`, errors that
name their fix, enum short names, `emulate --help`; and the official `anthropic` SDK against
the live agent's front door."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import pytest

from switchgear.admin_client import admin_channel
from switchgear.cli import main
from switchgear.emulators.openai import reply_text
from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.timeout(120)
PROMPT = "hello from the cli test"


@dataclass
class Cluster:
    workdir: Path
    cp: str
    agent: str
    http: str
    token_file: str
    key: str


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _register(workdir: Path, cp: str, token_file: str, spec: dict[str, object]) -> None:
    path = workdir / f"{spec['name']}.json"
    path.write_text(json.dumps(spec))
    assert main(["admin", "--control-plane", cp, "--admin-token-file", token_file, "register", str(path)]) == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cli")
    db = workdir / "r.db"
    procs: list[Proc] = []

    def start(proc: Proc, **kwargs: object) -> str:
        procs.append(proc)
        return proc.start(**kwargs)  # type: ignore[arg-type]

    try:
        ports = json.loads("{" + start(Proc.switchgear("openai", ["emulate", "openai", "--instance", "a:0"], workdir),
                                       ready_prefix="{"))
        claude = json.loads("{" + start(Proc.switchgear("claude", ["emulate", "anthropic"], workdir),
                                        ready_prefix="{"))["port"]
        cp = start(Proc.switchgear("cp", ["controlplane", "--db", str(db), "--listen", "127.0.0.1:0", "--no-probes"],
                                   workdir))
        agent_proc = Proc.switchgear("agent", ["agent", "--control-plane", cp, "--listen", "127.0.0.1:0",
                                               "--http-listen", "127.0.0.1:0", "--agent-token-file",
                                               f"{db}.agent-token"], workdir)
        agent = start(agent_proc)
        http = agent_proc.wait_line("HTTP ", 10)
        token_file = f"{db}.admin-token"
        openai_url = f"http://127.0.0.1:{ports['a']}/v1"
        # enum values by their short names, as a person writes them
        _register(workdir, cp, token_file, {"name": "chat", "category": "llm", "protocol": "openai",
                                            "model": "gpt-4o-mini", "endpoints": [{"id": "a", "url": openai_url}]})
        _register(workdir, cp, token_file, {"name": "embed", "category": "Embedding", "protocol": "openai",
                                            "model": "text-embedding-3-small",
                                            "endpoints": [{"id": "a", "url": openai_url}]})
        _register(workdir, cp, token_file, {"name": "claude", "category": "SERVICE_CATEGORY_LLM",
                                            "protocol": "anthropic", "model": "claude-3-sonnet",
                                            "endpoints": [{"id": "c", "url": f"http://127.0.0.1:{claude}"}]})
        assert main(["tenants", "create", "acme", "--control-plane", cp, "--admin-token-file", token_file]) == 0
        issued = subprocess.run([sys.executable, "-m", "switchgear", "keys", "issue", "acme", "--control-plane", cp,
                                 "--admin-token-file", token_file], capture_output=True, text=True, timeout=30)
        found = re.search(r"^sg-\S+$", issued.stdout, re.MULTILINE)
        assert found, issued.stderr
        _wait_for_ack(cp, token_file)
        yield Cluster(workdir, cp, agent, http.removeprefix("HTTP ").strip(), token_file, found.group(0))
    finally:
        for proc in reversed(procs):
            proc.stop()


def _wait_for_ack(cp: str, token_file: str) -> None:
    token = Path(token_file).read_text().strip()
    deadline = time.monotonic() + 15
    with admin_channel(cp, token) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        while True:
            reply = stub.ListAgents(admin_pb2.ListAgentsRequest(), timeout=5)
            if reply.agents and all(a.acked_version == reply.current_version for a in reply.agents):
                return
            assert time.monotonic() < deadline, "the agent did not ACK the registrations"
            time.sleep(0.05)


@pytest.fixture(autouse=True)
def _no_credentials_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SWITCHGEAR_ADMIN_TOKEN", "SWITCHGEAR_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_tasks_take_the_admin_token_or_a_client_key(cluster: Cluster, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = _run(capsys, "tasks", "--control-plane", cluster.cp, "stats")
    assert code == 1 and "UNAUTHENTICATED" in err
    assert "--admin-token-file" in err and "$SWITCHGEAR_ADMIN_TOKEN" in err and "--api-key" in err
    code, out, err = _run(capsys, "tasks", "--control-plane", cluster.cp, "--admin-token-file", cluster.token_file,
                          "stats")
    assert code == 0, err
    assert out.startswith("tasks: ") and "AGENT" in out.splitlines()[1] and "(cluster)" in out
    monkeypatch.setenv("SWITCHGEAR_ADMIN_TOKEN", Path(cluster.token_file).read_text().strip())
    code, out, _ = _run(capsys, "tasks", "--control-plane", cluster.cp, "stats", "--json")
    assert code == 0 and "counts" in json.loads(out)
    monkeypatch.delenv("SWITCHGEAR_ADMIN_TOKEN")

    monkeypatch.setenv("SWITCHGEAR_API_KEY", cluster.key)  # a tenant's key: its own tasks
    code, out, err = _run(capsys, "tasks", "--control-plane", cluster.cp, "submit", "--service", "chat",
                          "--payload", json.dumps({"messages": [{"role": "user", "content": PROMPT}]}))
    assert code == 0, err
    task = json.loads(out)["task"]
    assert task["tenant"] == "acme"
    code, out, err = _run(capsys, "tasks", "--control-plane", cluster.cp, "get", task["id"])
    assert code == 0, err
    rows = dict(line.split(None, 1) for line in out.splitlines()[1:] if len(line.split(None, 1)) == 2)
    assert out.split()[:2] == ["FIELD", "VALUE"] and rows["id"] == task["id"] and rows["tenant"] == "acme"
    code, out, _ = _run(capsys, "tasks", "--control-plane", cluster.cp, "get", task["id"], "--json")
    assert code == 0 and json.loads(out)["task"]["id"] == task["id"]
    monkeypatch.delenv("SWITCHGEAR_API_KEY")
    code, out, _ = _run(capsys, "tasks", "--control-plane", cluster.cp, "--api-key", cluster.key, "list")
    assert code == 0 and task["id"] in out and out.startswith("ID")
    code, _, err = _run(capsys, "tasks", "--control-plane", cluster.cp, "--api-key", cluster.key, "get", "nope")
    assert code == 1 and "NOT_FOUND" in err and "switchgear tasks list" in err


@pytest.mark.parametrize(("argv", "header", "row"), [
    (("admin", "services"), "NAME", "chat"),
    (("admin", "agents"), "NODE", "yes"),
    (("admin", "get", "claude"), "FIELD", "anthropic"),
    (("admin", "snapshot"), "snapshot", "chat"),
    (("tenants", "list"), "ID", "acme"),
    (("keys", "list"), "ID", "acme"),
    (("audit",), "WHEN", "register_service"),
])
def test_lists_print_a_table_or_json(cluster: Cluster, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...],
                                     header: str, row: str) -> None:
    where = ["--control-plane", cluster.cp, "--admin-token-file", cluster.token_file]
    full = [argv[0], *where, *argv[1:]] if argv[0] == "admin" else [*argv, *where]
    code, out, err = _run(capsys, *full)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[0] == header and len(lines) >= 2 and any(row in line for line in lines[1:])
    assert not out.lstrip().startswith("{") and cluster.key not in out  # never a key's secret
    code, out, _ = _run(capsys, *full, "--json")
    assert code == 0 and isinstance(json.loads(out), dict)


def test_admin_services_table_shows_short_enum_names(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "admin", "--control-plane", cluster.cp, "--admin-token-file", cluster.token_file,
                        "services")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert code == 0 and rows["chat"][1] == "llm" and rows["embed"][1] == "embedding"
    assert rows["claude"][1:3] == ["llm", "anthropic"]


def test_an_unknown_enum_value_lists_the_valid_ones(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    path = cluster.workdir / "bad.json"
    path.write_text(json.dumps({"name": "bad", "category": "lm", "protocol": "openai"}))
    code, _, err = _run(capsys, "admin", "--control-plane", cluster.cp, "--admin-token-file", cluster.token_file,
                        "register", str(path))
    assert code == 1 and "category: 'lm'" in err
    assert "llm, document, knowledge_graph, vector_db, embedding" in err


def test_errors_name_the_fix(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    chat = json.dumps({"messages": [{"role": "user", "content": PROMPT}]})
    code, _, err = _run(capsys, "invoke", "--agent", cluster.cp, "--service", "chat", "--payload", chat)
    assert code == 1 and "UNIMPLEMENTED" in err and "is not an agent" in err and "--agent" in err
    code, _, err = _run(capsys, "admin", "--control-plane", cluster.agent, "--admin-token-file", cluster.token_file,
                        "services")
    assert code == 1 and "is not a control plane" in err and "--control-plane" in err
    code, _, err = _run(capsys, "invoke", "--agent", cluster.agent, "--service", "chat", "--payload", chat)
    assert code == 1 and "UNAUTHENTICATED" in err and "--api-key" in err and "$SWITCHGEAR_API_KEY" in err
    code, _, err = _run(capsys, "admin", "--control-plane", cluster.cp, "services")
    assert code == 1 and "UNAUTHENTICATED" in err and "--admin-token-file" in err and "$SWITCHGEAR_ADMIN_TOKEN" in err
    code, _, err = _run(capsys, "tenants", "list", "--control-plane", cluster.cp)
    assert code == 1 and "--admin-token-file" in err
    code, _, err = _run(capsys, "admin", "--control-plane", cluster.cp, "--admin-token-file", cluster.token_file,
                        "get", "nope")
    assert code == 1 and "NOT_FOUND" in err and "switchgear admin services" in err
    code, _, err = _run(capsys, "keys", "revoke", "nope", "--control-plane", cluster.cp, "--admin-token-file",
                        cluster.token_file)
    assert code == 1 and "NOT_FOUND" in err and "switchgear keys list" in err
    code, _, err = _run(capsys, "admin", "--control-plane", cluster.cp, "--admin-token-file",
                        str(cluster.workdir / "absent-token"), "services")
    assert code == 1 and "absent-token" in err and "Traceback" not in err


def test_invoke_on_an_embedding_service_without_method_suggests_it(
        cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["invoke", "--agent", cluster.agent, "--service", "embed", "--api-key", cluster.key,
            "--payload", json.dumps({"input": PROMPT})]
    code, _, err = _run(capsys, *base)
    assert code == 1 and "--method embeddings" in err
    code, out, err = _run(capsys, *base, "--method", "embeddings")
    assert code == 0 and '"embedding"' in out, err


def test_emulate_help_exits_zero() -> None:
    for argv in (["emulate", "--help"], ["emulate", "anthropic", "--help"]):
        done = subprocess.run([sys.executable, "-m", "switchgear", *argv], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "usage: switchgear emulate" in done.stdout
    assert subprocess.run([sys.executable, "-m", "switchgear", "emulate"], capture_output=True, text=True,
                          timeout=30).returncode == 2


@pytest.mark.parametrize(("model", "instance"), [("claude", "anthropic"), ("chat", "a")])
def test_anthropic_sdk_against_the_live_agent(cluster: Cluster, model: str, instance: str) -> None:
    client = anthropic.Anthropic(base_url=f"http://{cluster.http}", api_key=cluster.key, max_retries=0)
    message = client.messages.create(model=model, max_tokens=100, system="be brief",
                                     messages=[{"role": "user", "content": PROMPT}])
    assert message.content[0].text == reply_text(instance, PROMPT)  # type: ignore[union-attr]
    with client.messages.stream(model=model, max_tokens=100,
                                messages=[{"role": "user", "content": PROMPT}]) as stream:
        assert "".join(stream.text_stream) == reply_text(instance, PROMPT)
        assert stream.get_final_message().usage.output_tokens > 0
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=f"http://{cluster.http}", api_key="sg-x-y", max_retries=0).messages.create(
            model=model, max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_services_table_lists_which_agent_rejected_which_service() -> None:
    from switchgear import cli_output
    from switchgear.v1 import common_pb2, discovery_pb2

    detail = discovery_pb2.NackDetail(field_path="services[chat].options_json.x", message="unknown option")
    rejection = discovery_pb2.ServiceRejection(service="chat", error_detail=detail)
    reply = admin_pb2.ListServicesResponse(
        services=[common_pb2.Service(name="chat", category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai")],
        rejections=[admin_pb2.AgentRejection(node_id="agent-1", version="7.ab", rejection=rejection)])
    assert cli_output.services_rows(reply)[1][:3] == ("chat", "llm", "openai")
    assert cli_output.rejections_rows(reply) == [
        ("REJECTED_BY", "VERSION", "SERVICE", "FIELD", "MESSAGE"),
        ("agent-1", "7.ab", "chat", "services[chat].options_json.x", "unknown option")]
