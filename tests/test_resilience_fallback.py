"""Fallback chain planning: tables over small service maps."""

from __future__ import annotations

import pytest

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.resilience.fallback import (
    FallbackSettings,
    StepKind,
    is_local_model,
    is_private_host,
    plan,
    should_fall_back,
)
from switchgear.dataplane.snapshot import EndpointView, Pricing, ServiceView

PAID = Pricing(cost_per_1k_tokens=0.03)


def svc(name: str, category: str = "llm", *, url: str = "https://api.example.com/v1", fallbacks: tuple[str, ...] = (),
        pricing: Pricing = PAID, capabilities: tuple[str, ...] = (), priority: int = 0, unsupported: str = "",
        protocol: str = "openai") -> ServiceView:
    return ServiceView(name, category, protocol, (EndpointView(f"{name}-1", url),), pricing=pricing,
                       capabilities=capabilities, priority=priority, fallbacks=fallbacks, unsupported=unsupported)


def services(*views: ServiceView) -> dict[str, ServiceView]:
    return {v.name: v for v in views}


WORLD = services(
    svc("gpt4", fallbacks=("claude", "gpt35")),
    svc("claude", fallbacks=("gpt4", "haiku"), protocol="anthropic"),
    svc("gpt35"),
    svc("haiku", unsupported="this agent has no adapter for protocol 'anthropic'"),
    svc("llama", url="http://local-llm:8080", pricing=Pricing(), priority=3),
    svc("ollama", url="http://127.0.0.1:11434/v1", pricing=Pricing(), priority=3),
    svc("vllm-gpu", url="https://gpu.example.com/v1", capabilities=("local",), priority=7),
    svc("embed", "embedding"),
    svc("wrongcat", fallbacks=("embed",)),
    svc("unstructured", "document", fallbacks=("unstructured2",)),
    svc("unstructured2", "document"),
    svc("chroma", "vector_db", fallbacks=("pinecone",)),
    svc("pinecone", "vector_db"),
)


@pytest.mark.parametrize(
    ("requested", "services_", "terminal"),
    [
        # same service, its fallbacks depth-first (claude's back-edge to gpt4 is a cycle; haiku is unsupported),
        # then local models by priority then name
        ("gpt4", ["gpt4", "claude", "gpt35", "vllm-gpu", "llama", "ollama"], StepKind.UNAVAILABLE),
        ("llama", ["llama", "vllm-gpu", "ollama"], StepKind.UNAVAILABLE),
        ("wrongcat", ["wrongcat", "vllm-gpu", "llama", "ollama"], StepKind.UNAVAILABLE),  # embed: other category
        ("unstructured", ["unstructured", "unstructured2"], StepKind.QUEUE_FOR_LATER),
        ("chroma", ["chroma", "pinecone"], StepKind.UNAVAILABLE),
        ("nope", [], StepKind.UNAVAILABLE),
    ],
)
def test_plan_order(requested: str, services_: list[str], terminal: StepKind) -> None:
    p = plan(requested, WORLD)
    assert list(p.services) == services_
    assert p.steps[-1].kind is terminal and p.steps[-1].terminal
    assert all(not s.terminal for s in p.steps[:-1])


def test_skips_are_explained() -> None:
    p = plan("gpt4", WORLD)
    reasons = dict(p.skipped)
    assert reasons["gpt4"].startswith("already planned")
    assert "no adapter" in reasons["haiku"]
    assert "category embedding" in dict(plan("wrongcat", WORLD).skipped)["embed"]
    assert "haiku" in p.steps[-1].reason


def test_usable_and_serves_filters() -> None:
    p = plan("gpt4", WORLD, usable=lambda n: n not in {"gpt4", "llama"}, serves=lambda s: s.protocol == "openai")
    assert list(p.services) == ["gpt35", "vllm-gpu", "ollama"]  # claude speaks anthropic
    assert ("gpt4", "no usable endpoint") in p.skipped
    assert [s.service for s in p.fallbacks][:1] == ["gpt35"]
    assert [s.service for s in plan("gpt4", WORLD).fallbacks][:1] == ["claude"]


@pytest.mark.parametrize(
    ("settings", "metadata", "kind", "body"),
    [
        (FallbackSettings(), {}, StepKind.UNAVAILABLE, ""),  # never invented
        (FallbackSettings(preset_responses={"llm": "busy, try later"}), {}, StepKind.PRESET, "busy, try later"),
        (FallbackSettings(preset_responses={"llm": "global"}), {"gpt35": {"preset_response": "own"}},
         StepKind.PRESET, "own"),
        (FallbackSettings(preset_responses={"document": "x"}), {}, StepKind.UNAVAILABLE, ""),
    ],
)
def test_preset_only_when_configured(settings: FallbackSettings, metadata: dict[str, dict[str, str]],
                                     kind: StepKind, body: str) -> None:
    last = plan("gpt35", WORLD, settings, metadata=metadata).steps[-1]
    assert (last.kind, last.body) == (kind, body)


def test_depth_limit() -> None:
    chain = services(*(svc(f"s{i}", fallbacks=(f"s{i + 1}",)) for i in range(10)), svc("s10"))
    assert plan("s0", chain, FallbackSettings(max_fallback_depth=2)).services == ("s0", "s1", "s2")


@pytest.mark.parametrize(
    ("host", "private"),
    [("127.0.0.1", True), ("10.1.2.3", True), ("192.168.0.9", True), ("169.254.1.1", True), ("::1", True),
     ("fd00::1", True), ("localhost", True), ("local-llm", True), ("llm.internal", True),
     ("ollama.default.svc.cluster.local", True), ("8.8.8.8", False), ("api.openai.com", False)],
)
def test_private_hosts(host: str, private: bool) -> None:
    assert is_private_host(host) is private


@pytest.mark.parametrize(
    ("view", "metadata", "local"),
    [
        (svc("x", url="http://local-llm:8080", pricing=Pricing()), {}, True),  # the seed's local_models entry
        (svc("x", url="http://local-llm:8080"), {}, False),  # private but paid
        (svc("x", url="https://api.example.com", pricing=Pricing()), {}, False),  # free but public
        (svc("x", capabilities=("local",)), {}, True),
        (svc("x"), {"fallback": "local"}, True),
        (svc("x", "embedding", capabilities=("local",)), {}, False),
        (svc("x", capabilities=("local",), unsupported="no adapter"), {}, False),
    ],
)
def test_local_model_rule(view: ServiceView, metadata: dict[str, str], local: bool) -> None:
    assert is_local_model(view, metadata) is local


@pytest.mark.parametrize(
    ("error", "falls_back"),
    [(None, True), (ErrorKind.RETRYABLE, True), (ErrorKind.CONTEXT_LENGTH, True), (ErrorKind.AUTH, True),
     (ErrorKind.RATE_LIMITED, True), (ErrorKind.CLIENT, False)],
)
def test_should_fall_back(error: ErrorKind | None, falls_back: bool) -> None:
    assert should_fall_back(error) is falls_back
