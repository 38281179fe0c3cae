"""The agent's edge to the wire: switchgear.v1 messages -> the agent's frozen dataclasses.

`snapshot_from_proto` is where an agent decides to ACK or NACK: anything it cannot apply
raises SnapshotError naming the field path. A service whose protocol this agent has no adapter
for is accepted and marked unsupported (like an optional xDS extension), so one new kind of
service cannot stop an older agent from taking every other update.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import orjson

from switchgear.adapters.base import Adapter, OptionsError
from switchgear.dataplane.scheduling.model import user_type_of
from switchgear.dataplane.snapshot import (
    CATEGORIES,
    AgentSettings,
    AgentSnapshot,
    EndpointView,
    Pricing,
    RetrySettings,
    SchedulingPolicy,
    SecretRef,
    ServiceView,
)
from switchgear.v1 import common_pb2, discovery_pb2, gateway_pb2

log = logging.getLogger("switchgear.dataplane.convert")

MAX_TIMEOUT_S = 3600.0
#: How deep a request's JSON may nest, counting the top-level object as 1. A deeper request is
#: refused (INVALID_ARGUMENT / HTTP 400 naming the field) before any work: real chat,
#: embedding and tool-schema payloads stay far below it, and every later step (the cache key,
#: adapters, usage estimates) may then walk a payload recursively without nearing Python's
#: recursion limit.
MAX_JSON_DEPTH = 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class SnapshotError(ValueError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class RequestError(ValueError):
    """A malformed InvokeRequest. `path` names the field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def _seconds(d: Any) -> float:
    return float(d.ToNanoseconds()) / 1e9


def _category(value: int, path: str) -> str:
    try:
        name = str(common_pb2.ServiceCategory.Name(value))
    except ValueError:
        raise SnapshotError(path, f"unknown category {value}") from None
    category = name.removeprefix("SERVICE_CATEGORY_").lower()
    if category not in CATEGORIES:
        raise SnapshotError(path, "required")
    return category


def _health(value: int) -> str:
    name = str(common_pb2.HealthState.Name(value)) if value in common_pb2.HealthState.values() else ""
    return name.removeprefix("HEALTH_STATE_").lower() if value else "healthy"


def _endpoint(msg: common_pb2.Endpoint, path: str) -> EndpointView:
    if not _NAME.match(msg.id):
        raise SnapshotError(f"{path}.id", f"invalid endpoint id {msg.id!r}")
    parts = urlsplit(msg.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SnapshotError(f"{path}.url", f"not an http(s) URL: {msg.url!r}")
    if msg.weight < 1:
        raise SnapshotError(f"{path}.weight", "must be at least 1")
    return EndpointView(
        id=msg.id, url=msg.url, weight=msg.weight, priority=msg.priority,
        health=_health(msg.health), max_concurrency=msg.max_concurrency,
    )


def _options(msg: common_pb2.Service, adapter: Adapter | None, path: str) -> Any:
    try:
        raw = orjson.loads(msg.options_json or "{}")
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"{path}.options_json", f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise SnapshotError(f"{path}.options_json", "must be a JSON object")
    if adapter is None:
        return None
    try:
        return adapter.parse_options(raw)
    except OptionsError as exc:
        sub = f".{exc.path}" if exc.path else ""
        raise SnapshotError(f"{path}.options_json{sub}", exc.message) from None


def _service(msg: common_pb2.Service, adapters: Mapping[str, Adapter], path: str) -> ServiceView:
    if not msg.endpoints:
        raise SnapshotError(f"{path}.endpoints", "at least one endpoint is required")
    endpoints = tuple(_endpoint(e, f"{path}.endpoints[{i}]") for i, e in enumerate(msg.endpoints))
    seen: set[str] = set()
    for i, e in enumerate(endpoints):
        if e.id in seen:
            raise SnapshotError(f"{path}.endpoints[{i}].id", f"duplicate endpoint id {e.id!r}")
        seen.add(e.id)
    timeout_s = _seconds(msg.timeout)
    if not (0 <= timeout_s <= MAX_TIMEOUT_S):
        raise SnapshotError(f"{path}.timeout", f"must be within 0..{MAX_TIMEOUT_S:g} s")
    adapter = adapters.get(msg.protocol)
    key: SecretRef | None = None
    if msg.HasField("api_key"):
        key = SecretRef(env=msg.api_key.env, file=msg.api_key.file)
        if not (key.env or key.file):
            raise SnapshotError(f"{path}.api_key", "set env or file")
    p = msg.pricing
    prices = (p.cost_per_1k_tokens, p.input_cost_per_1k_tokens, p.output_cost_per_1k_tokens, p.cost_per_request)
    if any(not math.isfinite(x) or x < 0 for x in prices):
        raise SnapshotError(f"{path}.pricing", "prices must be finite and non-negative")
    return ServiceView(
        name=msg.name,
        category=_category(msg.category, f"{path}.category"),
        protocol=msg.protocol,
        endpoints=endpoints,
        api_key=key,
        model=msg.model,
        max_tokens=msg.max_tokens,
        pricing=Pricing(*prices),
        capabilities=tuple(msg.capabilities),
        priority=msg.priority,
        strategy=msg.strategy,
        timeout_s=timeout_s,
        options=_options(msg, adapter, path),
        fallbacks=tuple(msg.fallbacks),
        metadata=MappingProxyType(dict(msg.metadata)),
        unsupported="" if adapter else f"this agent has no adapter for protocol {msg.protocol!r}",
    )


def _settings(msg: discovery_pb2.DataPlaneSettings) -> AgentSettings:
    defaults = AgentSettings()
    r = msg.retry_policy
    retry = RetrySettings(
        max_retries=r.max_retries,
        backoff_strategy=r.backoff_strategy or defaults.retry.backoff_strategy,
        base_delay_s=_seconds(r.base_delay) or defaults.retry.base_delay_s,
        max_delay_s=_seconds(r.max_delay) or defaults.retry.max_delay_s,
    ) if msg.HasField("retry_policy") else defaults.retry
    default_timeout = _seconds(msg.default_timeout) or defaults.default_timeout_s
    if not (0 < default_timeout <= MAX_TIMEOUT_S):
        raise SnapshotError("settings.default_timeout", f"must be within 0..{MAX_TIMEOUT_S:g} s")
    return AgentSettings(
        default_strategy=msg.default_strategy or defaults.default_strategy,
        default_timeout_s=default_timeout,
        retry=retry,
        breaker_failure_threshold=msg.circuit_breaker.failure_threshold
        or defaults.breaker_failure_threshold,
        category_policies=MappingProxyType(
            {k: _policy(v, f"settings.category_policies[{k}]") for k, v in sorted(msg.category_policies.items())}
        ),
        cache_enabled=msg.cache.enabled,
        cache_ttl_s=_ttls(msg.cache),
    )


def _ttls(msg: discovery_pb2.CacheSettings) -> Mapping[str, float]:
    ttls = {kind: _seconds(ttl) for kind, ttl in sorted(msg.ttl.items())}
    for kind, seconds in ttls.items():
        if not (0 <= seconds <= 366 * 86400):
            raise SnapshotError(f"settings.cache.ttl[{kind}]", "must be within 0 s .. 366 days")
    return MappingProxyType(ttls)


def _policy(msg: discovery_pb2.CategoryPolicy, path: str) -> SchedulingPolicy:
    """A category's scheduling policy. The strategy name is not checked here: routing falls
    back past names it does not know (dataplane/scheduling/policy.py)."""
    if path.rsplit("[", 1)[1].rstrip("]") not in CATEGORIES:
        raise SnapshotError(path, f"unknown category (known: {', '.join(CATEGORIES)})")
    if not (math.isfinite(msg.max_cost_per_request) and msg.max_cost_per_request >= 0):
        raise SnapshotError(f"{path}.max_cost_per_request", "must be finite and non-negative")
    if not (0.0 <= msg.min_success_rate <= 1.0):
        raise SnapshotError(f"{path}.min_success_rate", "must be within 0..1")
    timeout_s = _seconds(msg.timeout)
    if not (0 <= timeout_s <= MAX_TIMEOUT_S):
        raise SnapshotError(f"{path}.timeout", f"must be within 0..{MAX_TIMEOUT_S:g} s")
    return SchedulingPolicy(
        strategy=msg.strategy,
        max_cost_per_request=msg.max_cost_per_request,
        min_success_rate=msg.min_success_rate,
        max_queue_size=msg.max_queue_size,
        timeout_s=timeout_s,
    )


def snapshot_from_proto(
    msg: discovery_pb2.Snapshot, version: str, adapters: Mapping[str, Adapter]
) -> AgentSnapshot:
    """Validate and convert a whole snapshot, or raise SnapshotError; never half-applies."""
    if not version:
        raise SnapshotError("version_info", "required")
    if msg.version and msg.version != version:
        raise SnapshotError("snapshot.version", f"{msg.version!r} differs from version_info {version!r}")
    services: dict[str, ServiceView] = {}
    for i, svc in enumerate(msg.services):
        path = f"services[{svc.name or i}]"
        if not _NAME.match(svc.name):
            raise SnapshotError(f"{path}.name", f"invalid service name {svc.name!r}")
        if svc.name in services:
            raise SnapshotError(f"{path}.name", "duplicate service name")
        services[svc.name] = _service(svc, adapters, path)
    for name, view in services.items():
        for j, fallback in enumerate(view.fallbacks):
            if fallback not in services:
                raise SnapshotError(f"services[{name}].fallbacks[{j}]", f"unknown service {fallback!r}")
    return AgentSnapshot(
        version=version, services=MappingProxyType(services), settings=_settings(msg.settings)
    )


@dataclass(frozen=True)
class Call:
    """One validated application request."""

    request_id: str
    category: str  # "" = any
    service: str
    method: str
    payload: Mapping[str, Any]
    priority: int
    timeout_s: float  # 0 = the service's (or default) timeout
    user_id: str
    session_id: str
    # "standard" or "premium" (the seed's user types, for intelligent scheduling). There is no
    # auth yet, so the convention is the user id: "premium:<id>" names a premium user.
    user_type: str = "standard"


def check_depth(value: Any, limit: int = MAX_JSON_DEPTH, path: str = "", raw: bytes | None = None) -> None:
    """Raise RequestError when `value` (parsed JSON) nests objects and arrays deeper than
    `limit`; the error names the top-level field under `path`. Iterative, so the check itself
    cannot hit the recursion limit; it visits containers only.

    `raw`, the JSON text `value` was parsed from, makes the usual case free: every level opens
    with `[` or `{`, so a text with at most `limit` of them (strings' brackets only add to the
    count) cannot be too deep, and two byte counts answer without walking the value."""
    if raw is not None and raw.count(b"[") + raw.count(b"{") <= limit:
        return
    stack: list[tuple[Any, int, str]] = [(value, 1, path)]
    while stack:
        node, depth, field = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth == 1 and isinstance(node, dict):
            pairs = ((f"{path}.{k}" if path else str(k))[:80] for k in node)
            stack.extend((v, 2, p) for p, v in zip(pairs, children, strict=True) if isinstance(v, dict | list))
            continue
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    where = field or path or "body"
                    log.info("request refused: %s nests JSON deeper than %d levels", where, limit)
                    raise RequestError(where, f"JSON nested deeper than {limit} levels")
                stack.append((child, depth + 1, field))


def new_request_id() -> str:
    """32 random hex digits for a call that brought no id (uuid4().hex cost 5x as much)."""
    return os.urandom(16).hex()


def call_from_proto(msg: gateway_pb2.InvokeRequest, max_depth: int = MAX_JSON_DEPTH) -> Call:
    if not msg.service:
        raise RequestError("service", "required")
    if not msg.method:
        raise RequestError("method", "required")
    if msg.priority > 10:
        raise RequestError("priority", f"must be within 1..10 (0 = default 5), got {msg.priority}")
    timeout_s = _seconds(msg.timeout)
    if timeout_s < 0 or timeout_s > MAX_TIMEOUT_S:
        raise RequestError("timeout", f"must be within 0..{MAX_TIMEOUT_S:g} s")
    category = ""
    if msg.category:
        try:
            category = _category(msg.category, "category")
        except SnapshotError as exc:
            raise RequestError("category", exc.message) from None
    try:
        payload = orjson.loads(msg.payload) if msg.payload else {}
    except orjson.JSONDecodeError as exc:
        raise RequestError("payload", f"not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise RequestError("payload", f"must be a JSON object, got {type(payload).__name__}")
    check_depth(payload, max_depth, "payload", msg.payload)
    return Call(
        request_id=msg.request_id or new_request_id(),
        category=category,
        service=msg.service,
        method=msg.method,
        payload=payload,
        priority=msg.priority or 5,
        timeout_s=timeout_s,
        user_id=msg.user_id,
        session_id=msg.session_id,
        user_type=user_type_of(msg.user_id),
    )
