"""Issue 21 in-process: adaptive attempt timeouts, hedged requests, the emulator's disconnect
counter and refusals. Pure tables for the decisions; the request path against OpenAI emulator
instances on loopback (a hung one, a slow one) with the agent's LiveStats primed by events."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from types import MappingProxyType

import pytest

from switchgear.adapters.base import ErrorKind
from switchgear.controlplane.model import CategoryPolicy
from switchgear.dataplane.attempts import Resilience
from switchgear.dataplane.events import AttemptEnd
from switchgear.dataplane.invoke import CallFailed, Invoker, idempotent
from switchgear.dataplane.resilience.hedging import NEVER, HedgeSettings, hedge_delay, hedged, hedging_for, may_hedge
from switchgear.dataplane.resilience.timeouts import AttemptTimeouts, attempt_timeout, gap_timeout, timeouts_for
from switchgear.dataplane.scheduling.stats import LiveStats, Recent
from switchgear.dataplane.snapshot import AgentSettings, AgentSnapshot, RetrySettings, SchedulingPolicy
from switchgear.dataplane.stream import StreamEnd, Streamer
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.emulators.openai import EmulatorGroup, Faults, InstanceSpec, start_instances
from tests.test_attempts import call
from tests.test_stream import ADAPTERS, FirstUntried, Recorder, view

pytestmark = pytest.mark.timeout(30)

# --- pure: the timeout -----------------------------------------------------------------------

LLM = AttemptTimeouts(floor_s=5.0, ceiling_s=120.0, factor=4.0, min_samples=20, gap_s=30.0)


@pytest.mark.parametrize(("p99", "samples", "expected", "want"), [
    (None, 0, None, 120.0),  # nothing known: the ceiling
    (0.05, 19, None, 120.0),  # too few answers to trust a p99: still the ceiling
    (0.05, 20, None, 5.0),  # fast endpoint: the floor (never 0.2 s for an LLM)
    (3.0, 50, None, 12.0),  # 4 x p99
    (60.0, 50, None, 120.0),  # capped by the ceiling
    (0.05, 50, 2.5, 10.0),  # a call asking for many tokens: 4 x its own expected time
])
def test_attempt_timeout_table(p99: float | None, samples: int, expected: float | None, want: float) -> None:
    assert attempt_timeout(LLM, p99, samples, expected) == pytest.approx(want)


def test_category_defaults_are_safe_for_slow_calls_and_policies_override_them() -> None:
    assert timeouts_for("document").floor_s >= 60 and timeouts_for("llm").floor_s >= 5
    assert timeouts_for("llm", floor_s=1.0).floor_s == 1.0
    assert timeouts_for("llm", floor_s=200.0).ceiling_s == 200.0  # a floor above the default ceiling lifts it
    assert timeouts_for("llm", ceiling_s=3.0).floor_s == 3.0  # never a floor above the ceiling
    assert timeouts_for("embedding", factor=2.0).factor == 2.0
    assert gap_timeout(LLM, None) == 30.0 and gap_timeout(LLM, 10.0) == 40.0 and gap_timeout(LLM, 100.0) == 120.0


def test_recent_quantiles() -> None:
    r = Recent(size=100)
    assert r.quantile(0.99) is None
    for i in range(1, 101):
        r.record(i / 1000)
    assert r.quantile(0.5) == pytest.approx(0.051) and r.quantile(0.99) == pytest.approx(0.1)
    for _ in range(100):  # the window slides: old samples are forgotten
        r.record(1.0)
    assert r.quantile(0.5) == 1.0 and r.count == 200


# --- pure: hedging ------------------------------------------------------------------------------


def test_who_is_hedged() -> None:
    llm = hedging_for("llm")
    assert hedged(llm, 8, True) and not hedged(llm, 7, True)  # opt in by priority
    assert not hedged(llm, 10, False)  # never a non-idempotent call
    assert not hedged(hedging_for("document"), 10, True)  # documents: off by default
    assert hedged(hedging_for("llm", 1), 1, True) and not hedged(hedging_for("llm", NEVER), 10, True)


def test_hedge_delay_and_bounds() -> None:
    s = HedgeSettings(min_samples=20, min_delay_s=0.005)
    assert hedge_delay(s, 0.08, 19) is None and hedge_delay(s, 0.08, 20) == 0.08
    assert hedge_delay(s, 0.001, 50) == 0.005
    assert may_hedge(s, 0, 1.0, True, 1.0)
    assert not may_hedge(s, 1, 5.0, True, 1.0)  # one hedge per call
    assert not may_hedge(s, 0, 0.5, True, 1.0)  # the retry budget is spent
    assert not may_hedge(s, 0, 5.0, False, 1.0)  # nowhere else to go
    assert not may_hedge(s, 0, 5.0, True, 0.01)  # no time left for it


def test_idempotency_per_adapter_method() -> None:
    def of(protocol: str, method: str, payload: dict[str, object]) -> bool:
        return idempotent(ADAPTERS[protocol], dataclasses.replace(call("x"), method=method, payload=payload))

    assert of("openai", "chat.completions", {}) and of("openai", "embeddings", {})
    assert of("anthropic", "messages", {})
    assert of("chroma", "query", {}) and of("chroma", "upsert", {"ids": ["a", "b"]})
    assert not of("chroma", "add", {"documents": ["x"]}) and not of("chroma", "upsert", {"ids": []})
    assert not of("chroma", "collections.create", {"name": "c"})
    assert of("pinecone", "upsert", {"vectors": [{"id": "v1", "values": [0.1]}]})
    assert not of("pinecone", "upsert", {"vectors": [{"values": [0.1]}]})
    assert not of("graphrag", "index", {}) and of("graphrag", "query", {})
    assert of("http_json", "request", {"method": "GET"}) and not of("http_json", "request", {"method": "POST"})


def test_policy_settings_are_validated() -> None:
    from switchgear.controlplane.model import Settings
    from switchgear.controlplane.validate import _check_policies

    def problems(**kw: object) -> list[str]:
        policy = CategoryPolicy(**kw)  # type: ignore[arg-type]
        return [p.path for p in _check_policies(Settings(category_policies=(("llm", policy),)))]

    assert problems(attempt_timeout_floor_s=1.0, attempt_timeout_ceiling_s=10.0, attempt_timeout_factor=3.0,
                    hedge_min_priority=8) == []
    assert problems(attempt_timeout_factor=0.5) == ["category_policies[llm].attempt_timeout_factor"]
    assert problems(hedge_min_priority=12) == ["category_policies[llm].hedge_min_priority"]
    assert problems(attempt_timeout_floor_s=5.0, attempt_timeout_ceiling_s=2.0) == [
        "category_policies[llm].attempt_timeout_ceiling_s"]


# --- the request path ------------------------------------------------------------------------


@pytest.fixture
async def emulators() -> AsyncIterator[EmulatorGroup]:
    async with await start_instances([InstanceSpec("a"), InstanceSpec("b")]) as group:
        yield group


@dataclasses.dataclass
class Rig:
    invoker: Invoker
    streamer: Streamer
    recorder: Recorder
    stats: LiveStats
    pool: ClientPool
    snap: AgentSnapshot


def rig(urls: list[str], policy: SchedulingPolicy) -> Rig:
    service = view("chat", "openai", urls, model="gpt-4o-mini")
    snap = AgentSnapshot("1.test", MappingProxyType({"chat": service}),
                         AgentSettings(retry=RetrySettings(max_retries=2),
                                       category_policies=MappingProxyType({"llm": policy})))
    stats, recorder, pool = LiveStats(), Recorder(), ClientPool()
    resilience = Resilience(stats=stats)
    resilience.apply(snap)
    picker = FirstUntried(resilience.gate.unavailable)
    observers = [recorder, stats]
    invoker = Invoker(ADAPTERS, pool, SecretResolver({}), picker, observers=observers,  # type: ignore[arg-type]
                      resilience=resilience)
    streamer = Streamer(ADAPTERS, pool, SecretResolver({}), picker.pick, observers=observers, resilience=resilience)
    return Rig(invoker, streamer, recorder, stats, pool, snap)


def prime(stats: LiveStats, endpoint: str, latency_s: float, n: int = 30, ttft: bool = False) -> None:
    """n answers of `latency_s` from chat/<endpoint>: what a warm agent knows of it."""
    for i in range(n):
        stats.attempt_ended(AttemptEnd(f"warm{i}", "chat", "llm", endpoint, 1, latency_s,
                                       ttft_s=latency_s if ttft else None))


async def wait_for(predicate: object, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_hung_endpoint_costs_its_attempt_timeout_then_the_call_fails_over(emulators: EmulatorGroup) -> None:
    emulators.set_faults("a", Faults(hang=True))
    r = rig([emulators.urls["a"], emulators.urls["b"]], SchedulingPolicy(attempt_timeout_floor_s=0.3))
    prime(r.stats, "e0", 0.01)
    start = time.monotonic()
    result = await r.invoker.invoke(call("chat", timeout_s=9.0), r.snap)
    elapsed = time.monotonic() - start
    assert result.endpoint == "e1" and result.attempts == 2
    assert 0.3 <= elapsed < 0.3 + 0.5, elapsed  # the attempt timeout plus one healthy attempt, not 9 s
    counters = r.invoker.resilience.counters()[("chat", "e0")]
    assert counters["attempt_timeouts"] == 1 and counters["failovers"] == 1
    assert r.recorder.ended[0].error is ErrorKind.TIMEOUT  # the endpoint's fault: it counts against e0
    await wait_for(lambda: emulators.stats("a")["disconnects"] == 1, "the abandoned attempt's connection to close")
    await r.pool.close()


async def test_without_samples_the_attempt_may_use_the_whole_deadline(emulators: EmulatorGroup) -> None:
    emulators.set_faults("a", Faults(hang=True))
    r = rig([emulators.urls["a"], emulators.urls["b"]], SchedulingPolicy(attempt_timeout_floor_s=0.3))
    start = time.monotonic()
    with pytest.raises(CallFailed) as info:  # no adaptive bound before min_samples: the deadline holds
        await r.invoker.invoke(call("chat", timeout_s=0.6), r.snap)
    assert time.monotonic() - start >= 0.55 and info.value.error.kind is ErrorKind.TIMEOUT
    assert "deadline" in info.value.error.message
    await r.pool.close()


async def test_a_stream_gets_a_first_token_timeout(emulators: EmulatorGroup) -> None:
    emulators.set_faults("a", Faults(hang=True))
    r = rig([emulators.urls["a"], emulators.urls["b"]], SchedulingPolicy(attempt_timeout_floor_s=0.3))
    prime(r.stats, "e0", 0.01, ttft=True)
    start = time.monotonic()
    items = [i async for i in r.streamer.stream(dataclasses.replace(call("chat", timeout_s=9.0)), r.snap)]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.endpoint == "e1" and end.error is None
    assert time.monotonic() - start < 0.3 + 0.5
    assert r.invoker.resilience.counters()[("chat", "e0")]["attempt_timeouts"] == 1
    await r.pool.close()


async def test_a_hedge_answers_first_and_the_loser_is_cancelled_upstream(emulators: EmulatorGroup) -> None:
    emulators.set_faults("a", Faults(latency_ms=1500))
    r = rig([emulators.urls["a"], emulators.urls["b"]], SchedulingPolicy(hedge_min_priority=8))
    prime(r.stats, "e0", 0.02)
    prime(r.stats, "e1", 0.02)
    start = time.monotonic()
    result = await r.invoker.invoke(dataclasses.replace(call("chat", timeout_s=9.0), priority=9), r.snap)
    elapsed = time.monotonic() - start
    assert result.endpoint == "e1" and elapsed < 0.75, elapsed  # p95 (20 ms) + b's answer, not a's 1.5 s
    await wait_for(lambda: emulators.stats("a")["disconnects"] == 1, "a to see the loser's connection close")
    counters = r.invoker.resilience.counters()
    assert counters[("chat", "e0")]["hedges"] == 1 and counters[("chat", "e1")]["hedge_wins"] == 1
    lost = [e for e in r.recorder.ended if e.endpoint == "e0"]
    assert len(lost) == 1 and lost[0].cancelled  # charged nowhere:
    assert lost[0].usage.output_tokens == 0 and lost[0].cost_usd == 0
    won = [e for e in r.recorder.ended if e.endpoint == "e1"]
    assert len(won) == 1 and result.usage == won[0].usage and result.cost_usd == won[0].cost_usd
    assert not r.stats.get("chat/e0").outstanding  # no in-flight leak for the cancelled attempt
    assert r.stats.get("chat/e0").failed == 0  # a lost race says nothing against the endpoint
    await r.pool.close()


async def test_a_low_priority_call_is_not_hedged(emulators: EmulatorGroup) -> None:
    emulators.set_faults("a", Faults(latency_ms=300))
    r = rig([emulators.urls["a"], emulators.urls["b"]], SchedulingPolicy(hedge_min_priority=8))
    prime(r.stats, "e0", 0.02)
    result = await r.invoker.invoke(dataclasses.replace(call("chat", timeout_s=9.0), priority=5), r.snap)
    assert result.endpoint == "e0" and emulators.stats("b")["total"] == 0
    await r.pool.close()


async def test_a_stream_is_hedged_on_its_first_token(emulators: EmulatorGroup) -> None:
    emulators.set_faults("a", Faults(latency_ms=1500))
    r = rig([emulators.urls["a"], emulators.urls["b"]], SchedulingPolicy(hedge_min_priority=8))
    prime(r.stats, "e0", 0.02, ttft=True)
    start = time.monotonic()
    items = [i async for i in r.streamer.stream(dataclasses.replace(call("chat", timeout_s=9.0), priority=9), r.snap)]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.endpoint == "e1" and time.monotonic() - start < 0.75
    await wait_for(lambda: emulators.stats("a")["disconnects"] == 1, "a to see the loser's connection close")
    await r.pool.close()


# --- the emulator ------------------------------------------------------------------------------


async def test_emulator_refuses_connections_for_refuse_s_then_serves_again() -> None:
    async with await start_instances([InstanceSpec("a")]) as group:
        port = group.ports["a"]
        group.set_faults("a", Faults(refuse_s=0.3))
        assert group.faults("a").refuse_s == 0.0  # one-shot
        await asyncio.sleep(0.05)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.4)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
        with pytest.raises(ValueError, match="refuse_s"):
            Faults().merged({"refuse_s": -1})


def test_policy_keys_travel_from_the_yaml_to_the_agent_s_attempts() -> None:
    """Every accepted key takes effect: YAML -> control-plane model -> snapshot proto -> agent."""
    from switchgear.controlplane.config import load_config
    from switchgear.controlplane.convert import settings_to_proto
    from switchgear.dataplane.convert import _settings

    yaml = """
external_services:
  coordination:
    scheduling_policies:
      llm_services: {attempt_timeout_floor: 1.5, attempt_timeout_ceiling: 20s, attempt_timeout_factor: 3,
                     hedge_min_priority: 6}
      document_processing: {hedge_min_priority: 11}
"""
    state = load_config(yaml, env={})
    agent = _settings(settings_to_proto(state.settings))
    llm = agent.category_policies["llm"]
    assert (llm.attempt_timeout_floor_s, llm.attempt_timeout_ceiling_s, llm.attempt_timeout_factor,
            llm.hedge_min_priority) == (1.5, 20.0, 3.0, 6)
    resilience = Resilience()
    resilience.apply(AgentSnapshot("1", MappingProxyType({}), agent))
    timeouts, hedging = resilience.tuning("llm")
    assert (timeouts.floor_s, timeouts.ceiling_s, timeouts.factor, hedging.min_priority) == (1.5, 20.0, 3.0, 6)
    assert resilience.tuning("document")[1].min_priority == NEVER
    assert resilience.tuning("embedding")[0] == timeouts_for("embedding")  # no policy: the defaults


async def test_a_non_idempotent_call_is_never_hedged(emulators: EmulatorGroup) -> None:
    """http_json by verb: a POST is sent once however slow; a GET of the same service is hedged."""
    emulators.set_faults("a", Faults(latency_ms=400))
    r = rig([emulators.urls["a"], emulators.urls["b"]], SchedulingPolicy(hedge_min_priority=1))
    service = view("raw", "http_json", [emulators.urls["a"], emulators.urls["b"]])
    snap = dataclasses.replace(r.snap, services=MappingProxyType({"raw": service}))
    r.invoker.resilience.apply(snap)
    for endpoint in ("e0", "e1"):
        for i in range(30):
            r.stats.attempt_ended(AttemptEnd(f"w{i}", "raw", "llm", endpoint, 1, 0.02))
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    post = dataclasses.replace(call("raw", timeout_s=9.0), method="request", priority=9,
                               payload={"method": "POST", "path": "/chat/completions", "json": chat})
    result = await r.invoker.invoke(post, snap)
    assert result.endpoint == "e0" and emulators.stats("b")["total"] == 0  # waited for a: no second POST
    get = dataclasses.replace(post, payload={"method": "GET", "path": "/models"}, request_id="r2")
    result = await r.invoker.invoke(get, snap)
    assert result.endpoint == "e1"  # a GET may be sent twice: hedged, b answered first
    await r.pool.close()


async def test_a_committed_stream_that_goes_silent_ends_after_its_gap_timeout(emulators: EmulatorGroup) -> None:
    emulators.set_faults("a", Faults(token_delay_ms=1000))
    r = rig([emulators.urls["a"]], SchedulingPolicy())
    resilience = r.invoker.resilience
    resilience._tuning["llm"] = (dataclasses.replace(timeouts_for("llm"), gap_s=0.2), hedging_for("llm"))
    start = time.monotonic()
    items = [i async for i in r.streamer.stream(call("chat", timeout_s=9.0), r.snap)]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.error is not None and end.error.kind is ErrorKind.TIMEOUT
    assert "went silent" in end.error.message and time.monotonic() - start < 1.0  # not the 9 s deadline
    await r.pool.close()
