"""`stream_upstream` with real processes: the config key reaches an agent through the control
plane's snapshot and takes effect there (the emulator answers its whole-answer calls as
streams, the answers unchanged), and turning it off in the next config turns it off."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from switchgear.v1 import gateway_pb2
from tests.test_end_to_end import Cluster
from tests.test_resilience_e2e import emulator_stats

pytestmark = pytest.mark.timeout(60)

CONFIG = """\
external_services:
  coordination:
    scheduling_policies:
      llm_services:
        stream_upstream: {on}
  services:
    llm_services:
      cloud_providers:
        - name: "chat"
          protocol: "openai"
          model: "gpt-4o-mini"
          cost_per_1k_tokens: 0.002
          endpoints:
            - {{id: "a", url: "{url}"}}
"""
PAYLOAD = {"messages": [{"role": "user", "content": "lookup the weather"}],
           "tools": [{"type": "function", "function": {"name": "weather"}}]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("stream-upstream-e2e"))
    try:
        c.start_emulators()
        c.start_control_plane()
        c.start_agent()
        yield c
    finally:
        c.stop()


def apply(cluster: Cluster, on: bool) -> None:
    cluster.apply_config(CONFIG.format(on=str(on).lower(), url=cluster.urls["a"]), "s.yaml")


def streamed(cluster: Cluster) -> int:
    return int(emulator_stats(cluster.urls["a"])["streamed"])


def answer(cluster: Cluster) -> tuple[dict[str, object], gateway_pb2.InvokeResponse]:
    reply = cluster.gateway().Invoke(gateway_pb2.InvokeRequest(service="chat", method="chat.completions",
                                                               payload=orjson.dumps(PAYLOAD)), timeout=10)
    body = orjson.loads(reply.payload)
    body.pop("id"), body.pop("created")
    for call in body["choices"][0]["message"]["tool_calls"]:
        call.pop("id")
    return body, reply


def test_the_setting_travels_to_the_agent_and_back_off(cluster: Cluster) -> None:
    apply(cluster, True)
    before = streamed(cluster)
    on, on_reply = answer(cluster)
    assert streamed(cluster) == before + 1
    apply(cluster, False)
    off, off_reply = answer(cluster)
    assert streamed(cluster) == before + 1  # the whole answer asked for as one again
    assert on == off and on["choices"][0]["finish_reason"] == "tool_calls"  # type: ignore[index]
    assert (on_reply.usage.input_tokens, on_reply.usage.output_tokens, on_reply.usage.cost_usd) == (
        off_reply.usage.input_tokens, off_reply.usage.output_tokens, off_reply.usage.cost_usd)
    assert on_reply.usage.cost_usd > 0
