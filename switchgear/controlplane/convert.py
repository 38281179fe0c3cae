"""The control plane's edge to the wire: model dataclasses <-> switchgear.v1 messages.

The only control-plane module besides the servicers' wiring that imports generated code.
Conversions from the wire raise ConvertError naming the field path; semantic checks are
validate.py's job.
"""

from __future__ import annotations

import functools

from switchgear.controlplane.agents import AgentStatus, NodeInfo, Rejection
from switchgear.controlplane.convert_base import (  # re-exported: callers name them convert.*
    ConvertError,
    category_from_proto,
    category_to_proto,
    duration,
    seconds,
    timestamp,
)
from switchgear.controlplane.convert_governance import governance_for_snapshot
from switchgear.controlplane.model import (
    CategoryPolicy,
    EndpointSpec,
    Pricing,
    RetryPolicy,
    SecretRef,
    ServiceSpec,
    Settings,
    canonical_strategy,
)
from switchgear.controlplane.snapshot import EMPTY_OVERLAY, Changes, Snapshot
from switchgear.controlplane.snapshot import Overlay as OverlayType
from switchgear.v1 import admin_pb2, common_pb2, discovery_pb2


def service_to_proto(spec: ServiceSpec) -> common_pb2.Service:
    msg = common_pb2.Service(
        name=spec.name,
        category=category_to_proto(spec.category),  # type: ignore[arg-type]
        protocol=spec.protocol,
        endpoints=[endpoint_to_proto(e) for e in spec.endpoints],
        model=spec.model,
        max_tokens=spec.max_tokens,
        pricing=_pricing_to_proto(spec.pricing),
        capabilities=spec.capabilities,
        priority=spec.priority,
        strategy=spec.strategy,
        options_json=spec.options_json,
        metadata=dict(spec.metadata),
        fallbacks=spec.fallbacks,
        context_window=spec.context_window,
    )
    if spec.timeout_s:
        msg.timeout.CopyFrom(duration(spec.timeout_s))
    _secret_to_proto(spec.api_key, msg.api_key)
    return msg


def _pricing_to_proto(p: Pricing) -> common_pb2.Pricing:
    return common_pb2.Pricing(
        cost_per_1k_tokens=p.cost_per_1k_tokens,
        input_cost_per_1k_tokens=p.input_cost_per_1k_tokens,
        output_cost_per_1k_tokens=p.output_cost_per_1k_tokens,
        cost_per_request=p.cost_per_request,
        cache_read_input_cost_per_1k_tokens=p.cache_read_input_cost_per_1k_tokens,
        cache_write_input_cost_per_1k_tokens=p.cache_write_input_cost_per_1k_tokens,
        web_search_cost_per_1k_requests=p.web_search_cost_per_1k_requests,
    )


def _pricing_from_proto(p: common_pb2.Pricing) -> Pricing:
    return Pricing(
        cost_per_1k_tokens=p.cost_per_1k_tokens,
        input_cost_per_1k_tokens=p.input_cost_per_1k_tokens,
        output_cost_per_1k_tokens=p.output_cost_per_1k_tokens,
        cost_per_request=p.cost_per_request,
        cache_read_input_cost_per_1k_tokens=p.cache_read_input_cost_per_1k_tokens,
        cache_write_input_cost_per_1k_tokens=p.cache_write_input_cost_per_1k_tokens,
        web_search_cost_per_1k_requests=p.web_search_cost_per_1k_requests,
    )


def _secret_to_proto(ref: SecretRef | None, out: common_pb2.SecretRef) -> None:
    """Only the reference (a variable name or a path) ever travels, never a value."""
    if ref is not None:
        if ref.env:
            out.env = ref.env
        else:
            out.file = ref.file


def _secret_from_proto(msg: common_pb2.Service | common_pb2.Endpoint, path: str) -> SecretRef | None:
    which = msg.api_key.WhichOneof("source") if msg.HasField("api_key") else None
    if which == "env":
        return SecretRef(env=msg.api_key.env)
    if which == "file":
        return SecretRef(file=msg.api_key.file)
    if msg.HasField("api_key"):
        raise ConvertError(f"{path}.api_key", "set env or file")
    return None


def endpoint_to_proto(e: EndpointSpec) -> common_pb2.Endpoint:
    """An endpoint (a route target) as agents get it: its own fields only where it sets them."""
    msg = common_pb2.Endpoint(
        id=e.id, url=e.url, weight=e.weight, priority=e.priority,
        max_concurrency=e.max_concurrency, health=common_pb2.HEALTH_STATE_HEALTHY,
        protocol=e.protocol, model=e.model, max_tokens=e.max_tokens, options_json=e.options_json,
        rpm_limit=e.rpm_limit, tpm_limit=e.tpm_limit, tags=dict(e.tags), provider=e.provider,
        source_service=e.source_service, context_window=e.context_window, capabilities=e.capabilities,
    )
    if e.pricing is not None:
        msg.pricing.CopyFrom(_pricing_to_proto(e.pricing))
    _secret_to_proto(e.api_key, msg.api_key)
    return msg


def endpoint_from_proto(e: common_pb2.Endpoint, path: str) -> EndpointSpec:
    return EndpointSpec(
        id=e.id, url=e.url, weight=e.weight or 1, priority=e.priority, max_concurrency=e.max_concurrency,
        protocol=e.protocol, api_key=_secret_from_proto(e, path), model=e.model,
        pricing=_pricing_from_proto(e.pricing) if e.HasField("pricing") else None,
        max_tokens=e.max_tokens, options_json=e.options_json, rpm_limit=e.rpm_limit, tpm_limit=e.tpm_limit,
        tags=tuple(sorted(e.tags.items())), provider=e.provider, source_service=e.source_service,
        context_window=e.context_window, capabilities=tuple(e.capabilities),
    )


def service_from_proto(msg: common_pb2.Service, path: str = "service") -> ServiceSpec:
    return ServiceSpec(
        name=msg.name,
        category=category_from_proto(msg.category, f"{path}.category"),
        protocol=msg.protocol,
        endpoints=tuple(endpoint_from_proto(e, f"{path}.endpoints[{i}]") for i, e in enumerate(msg.endpoints)),
        api_key=_secret_from_proto(msg, path),
        model=msg.model,
        max_tokens=msg.max_tokens,
        pricing=_pricing_from_proto(msg.pricing),
        capabilities=tuple(msg.capabilities),
        priority=msg.priority,
        strategy=canonical_strategy(msg.strategy),
        timeout_s=seconds(msg.timeout),
        options_json=msg.options_json or "{}",
        metadata=tuple(sorted(msg.metadata.items())),
        fallbacks=tuple(msg.fallbacks),
        context_window=msg.context_window,
    )


def _retry_to_proto(policy: RetryPolicy) -> discovery_pb2.RetryPolicy:
    return discovery_pb2.RetryPolicy(
        max_retries=policy.max_retries,
        backoff_strategy=policy.backoff_strategy,
        base_delay=duration(policy.base_delay_s),
        max_delay=duration(policy.max_delay_s),
    )


def _policy_to_proto(policy: CategoryPolicy) -> discovery_pb2.CategoryPolicy:
    return discovery_pb2.CategoryPolicy(
        strategy=policy.strategy,
        max_cost_per_request=policy.max_cost_per_request,
        min_success_rate=policy.min_success_rate,
        max_queue_size=policy.max_queue_size,
        timeout=duration(policy.timeout_s),
        attempt_timeout_floor=duration(policy.attempt_timeout_floor_s),
        attempt_timeout_ceiling=duration(policy.attempt_timeout_ceiling_s),
        attempt_timeout_factor=policy.attempt_timeout_factor,
        hedge_min_priority=policy.hedge_min_priority,
        overload_threshold=policy.overload_threshold,
        underload_threshold=policy.underload_threshold,
        stream_upstream=policy.stream_upstream,
    )


def settings_to_proto(settings: Settings) -> discovery_pb2.DataPlaneSettings:
    return discovery_pb2.DataPlaneSettings(
        default_strategy=settings.default_strategy,
        retry_policy=_retry_to_proto(settings.retry_policy),
        circuit_breaker=discovery_pb2.CircuitBreakerSettings(
            failure_threshold=settings.circuit_breaker.failure_threshold
        ),
        cache=discovery_pb2.CacheSettings(
            enabled=settings.cache.enabled,
            ttl={kind: duration(ttl) for kind, ttl in settings.cache.ttl_s},
        ),
        health_check_timeout=duration(settings.health_check_timeout_s),
        category_policies={k: _policy_to_proto(v) for k, v in settings.category_policies},
        default_timeout=duration(settings.default_timeout_s),
        preset_responses={category: text for category, text in settings.fallback.preset_responses if text},
        discovery_cache_ttl=duration(settings.service_discovery.cache_ttl_s),
    )


def snapshot_to_proto(snapshot: Snapshot) -> discovery_pb2.Snapshot:
    """The snapshot as agents get it: the registry with the overlay's adjustments applied."""
    overlay = snapshot.overlay
    msg = discovery_pb2.Snapshot(
        version=snapshot.version,
        # A managed service with no ready replica yet has no endpoint: not served until it has.
        services=[_cached_service_proto(s) for s in snapshot.state.services if s.endpoints],
        settings=_served_settings(snapshot),
    )
    if overlay != EMPTY_OVERLAY:
        for service in msg.services:  # the snapshot's own copies: the cached messages stay clean
            _served(service, overlay)
    tenants, keys = governance_for_snapshot(snapshot.state)
    msg.tenants.extend(tenants)
    msg.keys.extend(keys)
    return msg


def delta_to_proto(snapshot: Snapshot, base: str, changes: Changes) -> discovery_pb2.SnapshotDelta:
    """What an agent at version `base` needs to reach `snapshot` (discovery.proto SnapshotDelta):
    the changed services as served (sorted by name), the removed ones by name, and the settings
    and governance only when they changed."""
    overlay = snapshot.overlay
    specs = {s.name: s for s in snapshot.state.services if s.name in changes.changed}
    msg = discovery_pb2.SnapshotDelta(version=snapshot.version, base_version=base,
                                      services=[_cached_service_proto(specs[n]) for n in sorted(specs)],
                                      removed_services=sorted(changes.removed))
    if overlay != EMPTY_OVERLAY:
        for service in msg.services:  # the delta's own copies: the cached messages stay clean
            _served(service, overlay)
    if changes.settings:
        msg.settings.CopyFrom(_served_settings(snapshot))
    if changes.governance:
        tenants, keys = governance_for_snapshot(snapshot.state)
        msg.governance.SetInParent()
        msg.governance.tenants.extend(tenants)
        msg.governance.keys.extend(keys)
    return msg


def _served_settings(snapshot: Snapshot) -> discovery_pb2.DataPlaneSettings:
    msg = settings_to_proto(snapshot.state.settings)
    if snapshot.overlay.breaker_failure_threshold:
        msg.circuit_breaker.failure_threshold = snapshot.overlay.breaker_failure_threshold
    return msg


# Sized for a 10,000-service registry: a smaller cache than the registry re-converts every
# service for each whole snapshot (least recently used goes first, and a whole snapshot walks all).
@functools.lru_cache(maxsize=32768)
def _cached_service_proto(spec: ServiceSpec) -> common_pb2.Service:
    """service_to_proto, memoised per (immutable, hashable) spec: a new version re-converts only
    the services that changed. The snapshot message copies it; never mutate the result."""
    return service_to_proto(spec)


_HEALTH = {
    "healthy": common_pb2.HEALTH_STATE_HEALTHY,
    "degraded": common_pb2.HEALTH_STATE_DEGRADED,
    "ejected": common_pb2.HEALTH_STATE_EJECTED,
    "draining": common_pb2.HEALTH_STATE_DRAINING,
}


def health_to_proto(health: str) -> int:
    return int(_HEALTH.get(health, common_pb2.HEALTH_STATE_UNSPECIFIED))


def _served(msg: common_pb2.Service, overlay: OverlayType) -> common_pb2.Service:
    if overlay == EMPTY_OVERLAY:
        return msg
    for endpoint in msg.endpoints:
        override = overlay.endpoint(msg.name, endpoint.id)
        if override is not None:
            endpoint.weight = override.weight
            endpoint.health = health_to_proto(override.health)
    service = overlay.service(msg.name)
    if service is not None:
        if service.strategy:
            msg.strategy = service.strategy
        if service.fallbacks is not None:
            del msg.fallbacks[:]
            msg.fallbacks.extend(service.fallbacks)
        if service.prefer:
            top = max((e.priority for e in msg.endpoints), default=0) + 1
            for endpoint in msg.endpoints:
                if endpoint.id in service.prefer:
                    endpoint.priority = top
    return msg


def node_from_proto(msg: discovery_pb2.Node) -> NodeInfo:
    return NodeInfo(
        id=msg.id,
        zone=msg.zone,
        build_version=msg.build_version,
        protocols=tuple(msg.protocols),
        metadata=tuple(sorted(msg.metadata.items())),
    )


def node_to_proto(node: NodeInfo) -> discovery_pb2.Node:
    return discovery_pb2.Node(
        id=node.id, zone=node.zone, build_version=node.build_version,
        protocols=node.protocols, metadata=dict(node.metadata),
    )


def agent_to_proto(status: AgentStatus) -> admin_pb2.AgentStatus:
    msg = admin_pb2.AgentStatus(
        node=node_to_proto(status.node),
        connected=status.connected,
        peer=status.peer,
        acked_version=status.acked_version,
        nacked_version=status.nacked_version,
        pending_version=status.pending_version,
        connected_at=timestamp(status.connected_at),
        last_seen=timestamp(status.last_seen),
        replica=status.replica,
        rejected_services=[rejection_to_proto(r) for r in status.rejections],
        snapshot_delivery=status.delivery,
    )
    if status.last_nack is not None:
        msg.last_nack.CopyFrom(
            discovery_pb2.NackDetail(
                field_path=status.last_nack.field_path, message=status.last_nack.message
            )
        )
    return msg


def rejection_to_proto(rejection: Rejection) -> discovery_pb2.ServiceRejection:
    return discovery_pb2.ServiceRejection(
        service=rejection.service,
        error_detail=discovery_pb2.NackDetail(field_path=rejection.field_path, message=rejection.message),
    )
