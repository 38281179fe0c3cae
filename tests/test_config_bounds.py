"""The config loader's bounds (README "Config loader bounds"): hostile YAML — deep nesting,
alias and merge-key bombs, huge or non-finite numbers and sizes, long keys, floods of
problems — gives the project's ConfigError naming the key path and line, never a traceback,
through every entry point: `config validate`, ApplyConfig on a running control plane, and
control-plane start-up with --config."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchgear.controlplane.agent_check import agent_problems
from switchgear.cli_config import describe
from switchgear.controlplane.config import (
    MAX_DEPTH,
    MAX_PROBLEMS,
    ConfigError,
    load_config,
)
from switchgear.controlplane.registry import Registry
from switchgear.controlplane.store import SqliteStore
from switchgear.supervise import Proc
from switchgear.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(120)

ROOT = "external_services:\n"


def at(path: str, value: str) -> str:
    """A document setting one dotted key path (under external_services) to `value` as written."""
    lines, keys = [ROOT], path.split(".")
    for depth, key in enumerate(keys[:-1], start=1):
        lines.append("  " * depth + f"{key}:\n")
    lines.append("  " * len(keys) + f"{keys[-1]}: {value}\n")
    return "".join(lines)


def alias_chain(levels: int) -> str:
    """Each list holds the one before it: shallow as written, `levels` deep once expanded."""
    lines = [ROOT, "  monitoring:\n", "    alert_rules:\n", "      x: &a0 [1]\n"]
    lines += [f"      x{i}: &a{i} [*a{i - 1}]\n" for i in range(1, levels)]
    return "".join(lines)


def laughs(levels: int, fan: int) -> str:
    lines = [ROOT, '  services: &l0 ["lol"]\n']
    for i in range(1, levels):
        lines.append(f"  k{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]\n")
    return "".join(lines)


def merge_bomb(levels: int) -> str:
    lines = [ROOT, "  m0: &m0 {a: 1, b: 2}\n"]
    lines += [f"  m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: 1}}\n" for i in range(1, levels)]
    return "".join(lines)


RA = "coordination.resource_allocation"
#: (document, the key path a problem names (a prefix), its line, words in its message)
HOSTILE = [
    pytest.param(ROOT.rstrip("\n") + " " + "[" * 600 + "]" * 600, "external_services[0][0]", 1, "deeper than 64",
                 id="600-nested-lists"),
    pytest.param(ROOT.rstrip("\n") + " " + "{a: " * 600 + "1" + "}" * 600, "external_services.a.a.a", 1,
                 "deeper than 64", id="600-nested-flow-mappings"),
    pytest.param(ROOT + "".join("  " * d + f"k{d}:\n" for d in range(1, 600)) + "  " * 600 + "v: 1\n",
                 "external_services.k1.k2.k3", 64, "deeper than 64", id="600-nested-block-mappings"),
    pytest.param(alias_chain(100), "external_services.monitoring.alert_rules.x", None, "deeper than 64",
                 id="alias-chain-100-deep"),
    pytest.param(laughs(10, 10), "", None, "more than 100000 values", id="billion-laughs"),
    pytest.param(merge_bomb(40), "", None, "more than 100000 values", id="merge-key-bomb"),
    pytest.param(at(f"{RA}.default_memory", '"99999999999999999999999Ei"'),
                 "external_services.coordination.resource_allocation.default_memory", 4, "size", id="huge-quantity"),
    pytest.param(at(f"{RA}.default_memory", "99999999999999999999999"),
                 "external_services.coordination.resource_allocation.default_memory", 4, "size", id="huge-size-int"),
    pytest.param(at(f"{RA}.default_memory", '"' + "9" * 5000 + 'Gi"'),
                 "external_services.coordination.resource_allocation.default_memory", 4, "size", id="5000-digit-size"),
    pytest.param(at(f"{RA}.max_concurrent_tasks", "9" * 5000),
                 "external_services.coordination.resource_allocation.max_concurrent_tasks", 4, "longer than 40",
                 id="5000-digit-int"),
    pytest.param(at(f"{RA}.max_concurrent_tasks", '"' + "9" * 5000 + '"'),
                 "external_services.coordination.resource_allocation.max_concurrent_tasks", 4, "at most 40",
                 id="5000-digit-int-string"),
    pytest.param(at(f"{RA}.max_concurrent_tasks", str(2**40)),
                 "external_services.coordination.resource_allocation.max_concurrent_tasks", 4, "2147483647",
                 id="int-beyond-32-bits"),
    pytest.param(at(f"{RA}.default_cpu", ".inf"), "external_services.coordination.resource_allocation.default_cpu",
                 4, "finite", id="inf"),
    pytest.param(at(f"{RA}.default_cpu", ".nan"), "external_services.coordination.resource_allocation.default_cpu",
                 4, "finite", id="nan"),
    pytest.param(at(f"{RA}.default_cpu", "1.0e+400"), "external_services.coordination.resource_allocation.default_cpu",
                 4, "finite", id="float-overflow"),
    pytest.param(at(f"{RA}.default_cpu", '"1e999"'), "external_services.coordination.resource_allocation.default_cpu",
                 4, "finite", id="float-string-overflow"),
    pytest.param(at("coordination.service_discovery.cache_ttl", '"99999999999999999999h"'),
                 "external_services.coordination.service_discovery.cache_ttl", 4, "duration", id="huge-duration"),
    pytest.param(at("communication.default_timeout", "1.0e+308"), "external_services.communication.default_timeout",
                 3, "duration", id="duration-1e308"),
    pytest.param(at("services.llm_services.local_models", '{endpoint: "http://h/v1", options: {x: .nan}}'),
                 "external_services.services.llm_services.local_models.options", 4, "finite", id="nan-in-options"),
    pytest.param(at("services.llm_services.local_models", '{endpoint: "h", options: {max_response_bytes: 2Gi}}'),
                 "external_services.services.llm_services.local_models.options.max_response_bytes", 4, "1Gi",
                 id="response-cap-over-max"),
    pytest.param(at("services.llm_services.local_models", '{endpoint: "http://h/v1", options: {max_decoded_bytes: 0}}'),
                 "external_services.services.llm_services.local_models.options.max_decoded_bytes", 4, "from 1 byte",
                 id="decoded-cap-zero"),
    pytest.param(at("services.llm_services.local_models", '{endpoint: "http://h/v1", priority: 1099511627776}'),
                 "external_services.services.llm_services.local_models.priority", 4, "2147483647", id="huge-priority"),
    pytest.param(at("coordination", "{" + "k" * 500 + ": 1}"), "external_services.coordination", 2,
                 "longer than 256", id="500-char-key"),
    pytest.param(ROOT + "  x: &a [*a]\n", "external_services.x[0]", 2, "contains it", id="recursive-alias"),
    pytest.param(at(f"{RA}.default_cpu", '!!binary "AAAA"'),
                 "external_services.coordination.resource_allocation.default_cpu", 4, "expected a number", id="binary"),
    pytest.param(at(f"{RA}.default_cpu", "!!python/name:os.system"),
                 "external_services.coordination.resource_allocation.default_cpu", 4, "cannot read", id="python-tag"),
    pytest.param(at(f"{RA}.default_cpu", "2024-02-30"),
                 "external_services.coordination.resource_allocation.default_cpu", 4, "expected a number",
                 id="impossible-date"),
    pytest.param(ROOT + "  x: " + "a" * (5 << 20) + "\n", "", None, "larger than", id="5-mib-document"),
]


@pytest.mark.parametrize(("text", "path", "line", "words"), HOSTILE)
def test_hostile_documents_give_a_config_error_naming_where(text: str, path: str, line: int | None, words: str) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(text, source="hostile.yaml", env={})
    assert time.monotonic() - started < 5  # bombs are refused by counting, not by expanding
    assert any(
        p.path.startswith(path) and words in p.message and (line is None or p.line == line)
        for p in caught.value.problems
    ), caught.value
    assert len(str(caught.value)) < 20_000  # a bounded message, whatever the input


def test_depth_up_to_the_limit_is_fine_and_the_limit_is_64() -> None:
    assert MAX_DEPTH == 64
    inside = ROOT.rstrip("\n") + " {metadata_only: " + "[" * 60 + "]" * 60 + "}"  # 63 levels with the root
    with pytest.raises(ConfigError) as caught:
        load_config(inside, env={})
    assert "deeper" not in str(caught.value)  # refused for its unknown key, not its depth


def test_a_flood_of_problems_is_listed_up_to_a_bound() -> None:
    text = ROOT + "  coordination:\n" + "".join(f"    bad{i}: 1\n" for i in range(5000))
    with pytest.raises(ConfigError) as caught:
        load_config(text, env={})
    assert len(caught.value.problems) == MAX_PROBLEMS + 1
    assert caught.value.problems[-1].message == f"and {5000 - MAX_PROBLEMS} more problems not listed"


# --- property: whatever the values, only ConfigError comes out ----------------------------

LEAF_PATHS = [
    f"{RA}.default_memory", f"{RA}.default_cpu", f"{RA}.max_concurrent_tasks",
    "coordination.service_discovery.cache_ttl", "coordination.service_discovery.failover_threshold",
    "coordination.scheduling_policies.llm_services.max_cost_per_request",
    "coordination.scheduling_policies.llm_services.min_success_rate",
    "coordination.scheduling_policies.llm_services.max_queue_size",
    "communication.default_timeout", "communication.retry_policy.max_retries", "communication.retry_policy.base_delay",
    "communication.load_balancing.circuit_breaker_threshold", "communication.caching.ttl.llm_responses",
    "monitoring.report_interval", "monitoring.breaker_threshold", "monitoring.alert_rules.r.hysteresis",
    "services.llm_services.local_models.priority", "services.llm_services.local_models.max_tokens",
    "services.llm_services.local_models.context_window",
    "services.llm_services.local_models.timeout", "services.llm_services.local_models.cost_per_1k_tokens",
    "services.llm_services.local_models.options.max_response_bytes",
    "services.llm_services.local_models.options.x",
    "services.document_services.unstructured.max_file_size",
]
HOSTILE_SCALARS = [
    "1", "-1", "0", "1.5", "-0.0", "9" * 39, "9" * 41, "9" * 5000, f'"{"9" * 5000}"', str(2**63), str(-(2**63) - 1),
    ".inf", "-.inf", ".nan", "1.0e+400", '"1e999"', '"-1e999"', '"99999999999999999999999Ei"', '"1.5Ki"', '"0.1B"',
    '"99999999999999999999h"', '"1e3ms"', '"${NOPE}"', '"${X:-12}"', "2024-02-30", "2001-12-14t21:59:43.10-05:00",
    "0x7fffffffffffffffffff", "0o777", "1_000", "~", "[]", "{}", "[1, [2, [3]]]", "yes", '"\\u0000"', "!!binary AAAA",
    "1:30", "190:20:30", "'4Gi'", "'-4Gi'",
]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    store = SqliteStore(tmp_path_factory.mktemp("bounds") / "r.db")
    yield Registry(store)
    store.close()


def base_tree() -> dict[str, object]:
    """Services that load when nothing else is wrong, so hostile leaves reach every reader."""
    return {"services": {
        "llm_services": {"local_models": {"endpoint": _Raw('"http://127.0.0.1:9/v1"')}},
        "document_services": {"unstructured": {"endpoint": _Raw('"http://127.0.0.1:9/general/v0"')}},
    }}


def document(leaves: list[tuple[str, str]]) -> str:
    tree = base_tree()
    for path, value in leaves:
        *parents, leaf = path.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})  # type: ignore[assignment]
        node[leaf] = _Raw(value)
    return ROOT + _render(tree, 1)


def test_every_hostile_value_in_every_field_is_accepted_whole_or_refused(registry: Registry) -> None:
    accepted = 0
    for path in LEAF_PATHS:
        for value in HOSTILE_SCALARS:
            try:
                state = load_config(document([(path, value)]), env={"X": ""}, check=agent_problems)
            except ConfigError:
                continue
            registry.replace(state, "test", "hostile.yaml")  # what ApplyConfig and start-up do next
            accepted += 1
    assert accepted > 50  # the table reaches the store, not only the parser


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(LEAF_PATHS), st.sampled_from(HOSTILE_SCALARS)), min_size=1, max_size=4))
def test_any_value_anywhere_is_accepted_whole_or_refused_with_a_config_error(
    registry: Registry, leaves: list[tuple[str, str]]
) -> None:
    try:
        state = load_config(document(leaves), env={"X": ""}, check=agent_problems)
    except ConfigError:
        return
    registry.replace(state, "test", "hostile.yaml")  # what ApplyConfig and start-up do next: no exception


class _Raw(str):
    """A scalar written into the document exactly as given."""


def _render(tree: dict[str, object], depth: int) -> str:
    return "".join(
        "  " * depth + f"{key}:\n" + _render(value, depth + 1) if isinstance(value, dict)
        else "  " * depth + f"{key}: {value}\n"
        for key, value in tree.items()
    )


# --- the three entry points -------------------------------------------------------------------

DEEP = HOSTILE[0].values[0]
HUGE = at(f"{RA}.default_memory", '"99999999999999999999999Ei"')
ENTRY_CASES = [
    pytest.param(DEEP, "external_services[0][0]", "(line 1): nested deeper than 64 levels", id="deep"),
    pytest.param(HUGE, "external_services.coordination.resource_allocation.default_memory", "(line 4): ", id="huge"),
    pytest.param(laughs(10, 10), "", "more than 100000 values", id="laughs"),
]


def switchgear_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "switchgear", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("text", "path", "words"), ENTRY_CASES)
def test_config_validate_prints_where_and_exits_1(tmp_path: Path, text: str, path: str, words: str) -> None:
    config = tmp_path / "hostile.yaml"
    config.write_text(text)
    done = switchgear_cli("config", "validate", str(config))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"{config}: {path}") and words in done.stderr


@pytest.mark.parametrize(("text", "path", "words"), ENTRY_CASES)
def test_control_plane_start_up_refuses_with_a_clean_error(tmp_path: Path, text: str, path: str, words: str) -> None:
    config = tmp_path / "hostile.yaml"
    config.write_text(text)
    done = switchgear_cli("controlplane", "--admin-auth", "none", "--db", str(tmp_path / "r.db"),
                          "--listen", "127.0.0.1:0", "--config", str(config))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"{config}: {path}" in done.stderr and words in done.stderr
    assert len(done.stderr.splitlines()) <= 3  # what is wrong, not a stack


def test_unreadable_start_up_config_is_a_clean_error(tmp_path: Path) -> None:
    done = switchgear_cli("controlplane", "--admin-auth", "none", "--db", str(tmp_path / "r.db"),
                          "--listen", "127.0.0.1:0", "--config", str(tmp_path / "missing.yaml"))
    assert done.returncode != 0 and "Traceback" not in done.stderr and "cannot read the file" in done.stderr


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    workdir = tmp_path_factory.mktemp("cp")
    proc = Proc.switchgear("controlplane", ["controlplane", "--admin-auth", "none", "--db", str(workdir / "r.db"),
                                            "--listen", "127.0.0.1:0"], workdir)
    proc.start()
    yield proc
    proc.stop()


@pytest.mark.parametrize(("text", "path", "words"), ENTRY_CASES)
def test_apply_config_answers_invalid_argument_naming_where(control_plane: Proc, text: str, path: str,
                                                            words: str) -> None:
    with grpc.insecure_channel(control_plane.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            admin.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=text, source="hostile.yaml"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        details = caught.value.details()  # type: ignore[attr-defined]
        assert details.startswith(f"hostile.yaml: {path}") and words in details
        good = at("services.llm_services.local_models", '{endpoint: "http://127.0.0.1:9/v1"}')
        assert admin.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=good, source="good.yaml"), timeout=30).version
    assert control_plane.running() and "Traceback" not in control_plane.log_path.read_text()


def test_per_service_answer_caps_are_read_as_sizes_and_shown() -> None:
    text = at("services.llm_services.local_models",
              '{endpoint: "http://127.0.0.1:9/v1", options: {max_response_bytes: 16Mi, max_decoded_bytes: 500}}')
    state = load_config(text, env={})
    spec = state.services[0]
    assert json.loads(spec.options_json) == {"max_response_bytes": 16 << 20, "max_decoded_bytes": 500}
    assert "max_response_bytes=16Mi  max_decoded_bytes=500B" in describe(state)


def written_out(services: int) -> str:
    """A registry written out in full: `services` one-endpoint services, ~18 values each."""
    lines = [ROOT, "  services:\n", "    llm_services:\n", "      local_models:\n"]
    for i in range(services):
        lines += [f'        - name: "svc-{i}"\n', '          model: "m"\n', "          cost_per_1k_tokens: 0.0005\n",
                  "          timeout: 5\n", "          endpoints:\n", f'            - id: "e{i}"\n',
                  f'              url: "http://127.0.0.1:{10000 + i}/v1"\n']
    return "".join(lines)


def test_a_large_registry_written_out_loads_and_aliases_still_add_at_most_100000_values() -> None:
    """The value bound is on what aliases and merge keys add, not on what a document writes out
    (that is bounded by its 4 MiB): 7,000 services write ~112,000 values and were refused before,
    as a 10,000-service registry (~160,000) was. The same document with a bomb beside it is not."""
    text = written_out(7000)
    state = load_config(text, source="large.yaml", env={})
    assert len(state.services) == 7000
    bomb = text + '  k0: &l0 ["lol"]\n' + "".join(
        f"  k{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 7))  # 10^6 values once expanded
    with pytest.raises(ConfigError, match="more than 100000 values"):
        load_config(bomb, source="large.yaml", env={})
