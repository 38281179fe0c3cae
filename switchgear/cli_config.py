"""`switchgear config validate`'s summary of a loaded config: the CLI's side of the config loader."""

from __future__ import annotations

import math
import urllib.parse

import orjson

from switchgear.adapters.base import RESPONSE_LIMIT_OPTIONS
from switchgear.controlplane.config.read import size_text
from switchgear.controlplane.model import (
    Category,
    CategoryPolicy,
    Pricing,
    RegistryState,
    ResourceAllocationSettings,
    ServiceDiscoverySettings,
    ServiceSpec,
    Settings,
)
from switchgear.wire.attempt_policy import NEVER, hedging_for, timeouts_for


def describe(state: RegistryState) -> str:
    """A human summary: one line per service, then the settings. Secrets appear only as
    references ("env:NAME"); URLs are shown without any user:password part."""
    lines = [f"{len(state.services)} services:"]
    rows = [_service_row(spec) for spec in state.services]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    for row in rows:
        head = "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        lines.append(f"  {head}  {'  '.join(row[3:])}")
    lines.append("settings:")
    lines.extend(f"  {line}" for line in _settings_lines(state.settings))
    return "\n".join(lines)


def _service_row(spec: ServiceSpec) -> list[str]:
    endpoints = ", ".join(f"{e.id}={_safe_url(e.url)}" for e in spec.endpoints) or "-"
    key = spec.api_key.describe() if spec.api_key is not None else "-"
    category = spec.category.value if isinstance(spec.category, Category) else str(spec.category)
    return [
        spec.name,
        category,
        spec.protocol,
        f"model={spec.model or '-'}",
        f"price={_price(spec.pricing)}",
        f"priority={spec.priority}",
        f"timeout={_seconds(spec.timeout_s) if spec.timeout_s else 'default'}",
        f"key={key}",
        *_limit_cells(spec),
        f"endpoints={endpoints}" if spec.managed is None else _managed_cell(spec),
    ]


def _managed_cell(spec: ServiceSpec) -> str:
    """What agents will run for a managed service (its endpoints are its ready replicas)."""
    m = spec.managed
    assert m is not None
    port = str(m.port) if m.port else "assigned"
    scaling = (f"scale out above {m.scale_up_utilization:g} for {_seconds(m.scale_up_window_s)}, in below "
               f"{m.scale_down_utilization:g} for {_seconds(m.scale_down_window_s)} (concurrency {m.concurrency})"
               if m.max_replicas > m.min_replicas else "fixed")
    what = f"{m.image} ({len(m.command)} args)" if m.backend == "docker" else \
        f"{m.command[0]} (+{len(m.command) - 1} args)"
    return (f"managed={m.backend}:{what} port={port} "
            f"replicas={m.min_replicas}..{m.max_replicas} {scaling}; cpu={m.cpu:g} "
            f"memory={size_text(m.memory_bytes) if m.memory_bytes else '-'} gpu={m.gpu:g}; "
            f"restart {_seconds(m.restart_backoff_s)}..{_seconds(m.restart_max_backoff_s)}, failed after "
            f"{m.max_crashes} crashes in {_seconds(m.crash_window_s)}")


def _limit_cells(spec: ServiceSpec) -> list[str]:
    """The answer caps the service sets (the agent's defaults apply to the others)."""
    try:
        options = orjson.loads(spec.options_json or "{}")
    except orjson.JSONDecodeError:
        return []
    if not isinstance(options, dict):
        return []
    return [f"{key}={size_text(options[key])}" for key in RESPONSE_LIMIT_OPTIONS if isinstance(options.get(key), int)]


def _safe_url(url: str) -> str:
    """The URL without any credentials (validation rejects them, but describe must not leak)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def _price(pricing: Pricing) -> str:
    parts = []
    if pricing.input_cost_per_1k_tokens or pricing.output_cost_per_1k_tokens:
        tokens_in, tokens_out = (
            _num(pricing.input_cost_per_1k_tokens),
            _num(pricing.output_cost_per_1k_tokens),
        )
        parts.append(f"${tokens_in} in / ${tokens_out} out per 1k tokens")
    elif pricing.cost_per_1k_tokens:
        parts.append(f"${_num(pricing.cost_per_1k_tokens)}/1k tokens")
    if pricing.cost_per_request:
        parts.append(f"${_num(pricing.cost_per_request)}/request")
    return ", ".join(parts) or "$0"


def _settings_lines(settings: Settings) -> list[str]:
    ttl = ", ".join(f"{kind}={_seconds(value)}" for kind, value in settings.cache.ttl_s) or "-"
    lines = [
        f"default strategy {settings.default_strategy}; "
        f"default timeout {_seconds(settings.default_timeout_s)}; "
        f"health check timeout {_seconds(settings.health_check_timeout_s)}",
        _retry_line(settings),
        f"cache: {'on' if settings.cache.enabled else 'off'}; ttl {ttl}",
        _discovery_line(settings.service_discovery),
        _resources_line(settings.resource_allocation),
    ]
    lines.extend(_policy_line(category, policy) for category, policy in settings.category_policies)
    return lines


def _retry_line(settings: Settings) -> str:
    retry = settings.retry_policy
    return (
        f"retry: up to {retry.max_retries}, {retry.backoff_strategy} backoff "
        f"{_seconds(retry.base_delay_s)}..{_seconds(retry.max_delay_s)}; "
        f"circuit breaker opens after {settings.circuit_breaker.failure_threshold} failures"
    )


def _discovery_line(discovery: ServiceDiscoverySettings) -> str:
    return (
        f"discovery: cache ttl {_seconds(discovery.cache_ttl_s)}, health check every "
        f"{_seconds(discovery.health_check_interval_s)}, "
        f"failover after {discovery.failover_threshold} failures"
    )


def _resources_line(resources: ResourceAllocationSettings) -> str:
    return (
        f"resources: cpu {_num(resources.default_cpu)}, memory {size_text(resources.default_memory_bytes)}, "
        f"max concurrent tasks {resources.max_concurrent_tasks}"
    )


def _policy_line(category: str, policy: CategoryPolicy) -> str:
    parts = [f"strategy {policy.strategy or 'default'}"]
    if policy.max_cost_per_request:
        parts.append(f"max cost ${_num(policy.max_cost_per_request)}/request")
    if policy.min_success_rate:
        parts.append(f"min success rate {_num(policy.min_success_rate)}")
    if policy.max_queue_size:
        parts.append(f"max queue {policy.max_queue_size}")
    if policy.timeout_s:
        parts.append(f"timeout {_seconds(policy.timeout_s)}")
    parts.append(_attempt_timeout_text(category, policy))
    parts.append(_hedging_text(category, policy))
    return f"policy {category}: {', '.join(parts)}"


def _attempt_timeout_text(category: str, policy: CategoryPolicy) -> str:
    """The attempt timeout in effect: the category's defaults with the policy's overrides."""
    t = timeouts_for(category, policy.attempt_timeout_floor_s, policy.attempt_timeout_ceiling_s,
                     policy.attempt_timeout_factor)
    return (f"attempt timeout {_num(t.factor)} x p99 within {_seconds(t.floor_s)}..{_seconds(t.ceiling_s)} "
            f"(after {t.min_samples} answers)")


def _hedging_text(category: str, policy: CategoryPolicy) -> str:
    hedging = hedging_for(category, policy.hedge_min_priority)
    if hedging.min_priority >= NEVER:
        return "no hedging"
    return f"hedging at priority >= {hedging.min_priority} after p95"


def _num(value: float) -> str:
    """A number without a pointless ".0"."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _seconds(value: float) -> str:
    return f"{_num(value)}s"
