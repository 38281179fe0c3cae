"""`switchgear config validate`'s summary of a loaded config: the CLI's side of the config loader.

What it prints about behaviour is computed the way an agent computes it: the settings go
through the snapshot's wire form (controlplane.convert -> dataplane.convert) and then through
the agent's own pure functions (strategy precedence, retry backoff), so the summary cannot
drift from what agents do.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Callable
from typing import Any

import orjson

from switchgear.adapters import chroma, pinecone
from switchgear.adapters.base import RESPONSE_LIMIT_OPTIONS, OptionsError, split_response_limits
from switchgear.controlplane.config.read import size_text
from switchgear.controlplane.convert import settings_to_proto
from switchgear.controlplane.model import (
    ROUTE_CATEGORIES,
    ROUTE_MIN_SERVICES,
    Category,
    CategoryPolicy,
    EndpointSpec,
    Pricing,
    RegistryState,
    ResourceAllocationSettings,
    ServiceDiscoverySettings,
    ServiceSpec,
    Settings,
)
from switchgear.controlplane.tasks import allocator
from switchgear.dataplane.convert import settings_from_proto
from switchgear.dataplane.resilience.backoff import policy_for
from switchgear.dataplane.scheduling import STRATEGIES
from switchgear.dataplane.scheduling.policy import choose_strategy
from switchgear.dataplane.service_rules import ENFORCED
from switchgear.dataplane.snapshot import AgentSettings
from switchgear.wire.attempt_policy import NEVER, call_timeout, hedging_for, timeouts_for

#: The priorities `config validate` shows a strategy for: the default and a high one (> 7).
SHOWN_PRIORITIES = (5, 9)


def describe(state: RegistryState) -> str:
    """A human summary: one line per service, then the settings. Secrets appear only as
    references ("env:NAME"); URLs are shown without any user:password part."""
    lines = [f"{len(state.services)} services:"]
    agent = agent_settings(state.settings)
    rows = [_service_row(spec, agent) for spec in state.services]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    for row in rows:
        head = "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        lines.append(f"  {head}  {'  '.join(row[3:])}")
    lines.extend(f"  {line}" for line in _route_lines(state))
    lines.append("settings:")
    lines.extend(f"  {line}" for line in _settings_lines(state.settings, agent))
    return "\n".join(lines)


def agent_settings(settings: Settings) -> AgentSettings:
    """The settings as an agent receives them (through the snapshot's wire form)."""
    return settings_from_proto(settings_to_proto(settings))


def strategy_for(spec: ServiceSpec, agent: AgentSettings, priority: int) -> str:
    """The strategy an agent uses for a call to `spec` at `priority` (scheduling/policy.py)."""
    return choose_strategy(service_strategy=spec.strategy, category=_category(spec), priority=priority,
                           policies=agent.category_policies, default_strategy=agent.default_strategy,
                           known=STRATEGIES)


def timeout_for(spec: ServiceSpec, agent: AgentSettings) -> float:
    """The deadline (s) of a call to `spec` that sets none itself (wire/attempt_policy.py::call_timeout)."""
    policy = agent.category_policies.get(_category(spec))
    return call_timeout(0.0, spec.timeout_s, policy.timeout_s if policy else 0.0, agent.default_timeout_s)


def _category(spec: ServiceSpec) -> str:
    return spec.category.value if isinstance(spec.category, Category) else str(spec.category)


def backoff_for(category: str, agent: AgentSettings) -> tuple[float, float]:
    """(base, cap) seconds of the retry backoff an agent uses for a call in `category`."""
    policy = policy_for(category, agent.retry)
    return policy.base_delay_s, policy.max_delay_s


def _service_row(spec: ServiceSpec, agent: AgentSettings) -> list[str]:
    endpoints = ", ".join(f"{e.id}={_safe_url(e.url)}{_target_text(e)}" for e in spec.endpoints) or "-"
    key = spec.api_key.describe() if spec.api_key is not None else "-"
    category = _category(spec)
    return [
        spec.name,
        category,
        spec.protocol,
        f"model={spec.model or '-'}",
        f"price={_price(spec.pricing)}",
        f"priority={spec.priority}",
        "strategy " + " ".join(f"p{p}={strategy_for(spec, agent, p)}" for p in SHOWN_PRIORITIES),
        f"timeout={_seconds(timeout_for(spec, agent))}",
        f"key={key}",
        f"capabilities={','.join(spec.capabilities) or '-'}",
        f"context_window={spec.context_window or 'unknown'}",
        *_limit_cells(spec),
        *_index_cells(spec),
        *_scope_cells(spec),
        *_enforced_cells(spec),
        f"endpoints={endpoints}" if spec.managed is None else _managed_cell(spec),
    ]


def _target_text(e: EndpointSpec) -> str:
    """What a route target sets over its service's fields (docs/concepts/routes.md), "" when nothing."""
    cells = [e.protocol, f"model={e.model}" if e.model else "", f"key={e.api_key.describe()}" if e.api_key else "",
             f"price={_price(e.pricing)}" if e.pricing is not None else "",
             f"max_tokens={e.max_tokens}" if e.max_tokens else "",
             f"context_window={e.context_window}" if e.context_window else "",
             f"capabilities={','.join(e.capabilities)}" if e.capabilities else "",
             "own options" if e.options_json else "",
             f"rpm={e.rpm_limit}" if e.rpm_limit else "", f"tpm={e.tpm_limit}" if e.tpm_limit else "",
             f"provider={e.provider}" if e.provider else "", *(f"{k}={v}" for k, v in e.tags)]
    shown = " ".join(cell for cell in cells if cell)
    return f" [{shown}]" if shown else ""


def _route_lines(state: RegistryState) -> list[str]:
    """The category routes agents derive (dataplane/convert.py `category_routes`)."""
    lines = []
    names = {s.name for s in state.services}
    for category in ROUTE_CATEGORIES:
        members = sorted(s.name for s in state.services if s.category == category)
        if len(members) >= ROUTE_MIN_SERVICES and category.value not in names:
            lines.append(f"category route {category.value}: the endpoints of " + ", ".join(members))
    return lines


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


def _options(spec: ServiceSpec) -> dict[str, Any]:
    try:
        options = orjson.loads(spec.options_json or "{}")
    except orjson.JSONDecodeError:
        return {}
    return options if isinstance(options, dict) else {}


def _limit_cells(spec: ServiceSpec) -> list[str]:
    """The answer caps the service sets (the agent's defaults apply to the others)."""
    options = _options(spec)
    return [f"{key}={size_text(options[key])}" for key in RESPONSE_LIMIT_OPTIONS if isinstance(options.get(key), int)]


#: The protocols whose data scope `config validate` prints, and their option parsers.
_SCOPED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "chroma": chroma.parse_options, "pinecone": pinecone.parse_options}


def _index_cells(spec: ServiceSpec) -> list[str]:
    """A Pinecone service's index, and the environment it must be in (adapters/pinecone.py)."""
    if spec.protocol != "pinecone":
        return []
    options = _options(spec)
    cells = [f"index={options['index_name']}"] if isinstance(options.get("index_name"), str) else []
    if isinstance(options.get("environment"), str) and options["environment"]:
        cells.append(f"environment={options['environment']} (the index must be there)")
    return cells


def _scope_cells(spec: ServiceSpec) -> list[str]:
    """Whose data a vector service's calls reach (adapters/_scope.py): what agents derive from
    the options, never from a payload."""
    parse = _SCOPED.get(spec.protocol)
    if parse is None:
        return []
    try:
        return [parse(split_response_limits(_options(spec))[1]).describe_scope()]
    except OptionsError as exc:  # (validation names it; this line only says what agents do)
        return [f"scope=refused ({exc})"]


def _enforced_cells(spec: ServiceSpec) -> list[str]:
    """The service's limits agents enforce before the upstream (dataplane/service_rules.py)."""
    metadata = dict(spec.metadata)
    return [f"{key}={metadata[key]}" for key in ENFORCED if metadata.get(key)]


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
    if parts or pricing.cache_read_input_cost_per_1k_tokens or pricing.cache_write_input_cost_per_1k_tokens:
        parts.append(_cache_price(pricing))
    if pricing.cost_per_request:
        parts.append(f"${_num(pricing.cost_per_request)}/request")
    if pricing.web_search_cost_per_1k_requests:
        parts.append(f"${_num(pricing.web_search_cost_per_1k_requests)}/1k web searches")
    return ", ".join(parts) or "$0"


def _cache_price(pricing: Pricing) -> str:
    """Prompt-cache prices as charged: an unset one is the input price."""
    read, write = pricing.cache_read_input_cost_per_1k_tokens, pricing.cache_write_input_cost_per_1k_tokens
    if not read and not write:
        return "cache reads/writes at the input price"
    shown = [f"${_num(price)}" if price else "input price" for price in (read, write)]
    return f"cache read {shown[0]} / write {shown[1]} per 1k tokens"


def _settings_lines(settings: Settings, agent: AgentSettings) -> list[str]:
    ttl = ", ".join(f"{kind}={_seconds(value)}" for kind, value in settings.cache.ttl_s) or "-"
    lines = [
        f"default strategy {settings.default_strategy}; "
        f"default timeout {_seconds(settings.default_timeout_s)}; "
        f"health check timeout {_seconds(settings.health_check_timeout_s)}",
        _retry_line(settings, agent),
        f"cache: {'on' if settings.cache.enabled else 'off'}; ttl {ttl}",
        _discovery_line(settings.service_discovery),
        _resources_line(settings.resource_allocation),
        _task_store_line(settings.resource_allocation),
    ]
    lines.extend(_policy_line(category, policy) for category, policy in settings.category_policies)
    lines.append(_presets_line(agent))
    return lines


def _presets_line(agent: AgentSettings) -> str:
    """The preset answer each category's calls get when their whole fallback chain failed."""
    presets = [f"preset {c.value}: {_quoted(agent.preset_responses[c.value])}"
               if agent.preset_responses.get(c.value) else f"preset {c.value}: none" for c in Category]
    return "fallback: " + "; ".join(presets)


def _quoted(text: str) -> str:
    """A preset as a JSON string, cut at 80 characters (the config holds the whole of it)."""
    return orjson.dumps(text if len(text) <= 80 else text[:77] + "...").decode()


def _retry_line(settings: Settings, agent: AgentSettings) -> str:
    """Retries and the backoff each category's calls get (one range when all agree)."""
    delays = {c.value: backoff_for(c.value, agent) for c in Category}
    ranges = {c: f"{_seconds(base)}..{_seconds(cap)}" for c, (base, cap) in delays.items()}
    shown = (next(iter(ranges.values())) if len(set(ranges.values())) == 1
             else ", ".join(f"{c} {r}" for c, r in ranges.items()))
    return (
        f"retry: up to {agent.retry.max_retries}, {agent.retry.backoff_strategy} backoff {shown}; "
        f"circuit breaker opens after {settings.circuit_breaker.failure_threshold} failures"
    )


def _discovery_line(discovery: ServiceDiscoverySettings) -> str:
    return (
        f"discovery: cache ttl {_seconds(discovery.cache_ttl_s)} (an agent cut off from the control plane "
        "this long stops applying its health verdicts), health check every "
        f"{_seconds(discovery.health_check_interval_s)}, "
        f"failover after {discovery.failover_threshold} failures"
    )


def _resources_line(resources: ResourceAllocationSettings) -> str:
    """What a task of each category requests (default_cpu/default_memory: the categories without
    a row of their own in the seed's table), and what bounds the agents."""
    requests = []
    for category in Category:
        need = allocator.requirements(category.value, {}, resources)
        requests.append(f"{category.value} {_num(need.cpu)} cpu/{size_text(int(need.memory_bytes))}")
    return (
        f"resources: a task requests {', '.join(requests)} (service metadata resources.* overrides); "
        "an agent's pool is what it declares (--task-cpu, --task-memory; undeclared: not limited); "
        f"max concurrent tasks {resources.max_concurrent_tasks}"
    )


def _task_store_line(resources: ResourceAllocationSettings) -> str:
    """What the task store keeps, and what one tenant may hold in it."""
    def limit(value: int, text: str, what: str) -> str:
        return text if value else f"{what} not limited"

    days = resources.task_retention_s / 86400
    kept = f"{_num(days)} days" if days >= 1 else _seconds(resources.task_retention_s)
    per_tenant = ", ".join([
        limit(resources.max_tasks_per_tenant, f"{resources.max_tasks_per_tenant} unfinished tasks",
              "unfinished tasks"),
        limit(resources.max_blobs_per_tenant, f"{resources.max_blobs_per_tenant} blobs", "blobs"),
        limit(resources.max_blob_bytes_per_tenant, f"{size_text(resources.max_blob_bytes_per_tenant)} of blobs",
              "blob bytes"),
    ])
    kept_per_tenant = (f"; a tenant's finished tasks beyond its newest {resources.max_finished_tasks_per_tenant} "
                       "deleted sooner" if resources.max_finished_tasks_per_tenant else "")
    return (
        f"task store: finished tasks and their attempts deleted {kept} after they finish, blobs {kept} "
        f"after their last upload unless an unfinished task names them{kept_per_tenant} (the leader purges); "
        f"per tenant: {per_tenant} (a tenant key's submissions and uploads and its deferred calls; "
        "more are refused RESOURCE_EXHAUSTED naming the limit; operators are not limited)"
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
    parts.append(f"load shifting above {_num(policy.overload_threshold or 0.8)} "
                 f"to targets below {_num(policy.underload_threshold or 0.6)} utilisation")
    if policy.stream_upstream:
        parts.append("whole-answer chat calls streamed from the upstream (first token within the "
                     "stream attempt timeout, then the stall timeout between chunks)")
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
