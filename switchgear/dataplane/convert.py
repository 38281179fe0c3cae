"""The agent's edge to the wire: switchgear.v1 messages -> the agent's frozen dataclasses.

`convert_snapshot` is where an agent decides what of a snapshot it applies, per service as
delta xDS acknowledges per resource: every service that passes the shared checks
(`switchgear.wire.checks`, which the control plane runs too before it commits a change) is
taken; a rejected one keeps its last good definition, and is reported in the ACK, so one bad
service cannot block every later change. The version and the settings are checked whole: a
problem there raises SnapshotError naming the field path (a NACK). A service whose protocol
this agent has no adapter for is accepted and marked unsupported (like an optional xDS
extension), so one new kind of service cannot stop an older agent from taking every other update.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

from switchgear.adapters.base import Adapter
from switchgear.dataplane.scheduling.model import user_type_of
from switchgear.dataplane.snapshot import (
    AgentSettings,
    AgentSnapshot,
    EndpointView,
    Pricing,
    RetrySettings,
    SchedulingPolicy,
    SecretRef,
    ServiceView,
    TargetView,
)
from switchgear.v1 import common_pb2, discovery_pb2, gateway_pb2
from switchgear.wire import checks
from switchgear.wire.checks import MAX_TIMEOUT_S as MAX_TIMEOUT_S  # re-exported: the agent knows it from here
from switchgear.wire.checks import SnapshotError as SnapshotError  # re-exported too
from switchgear.wire.lean import lean
from switchgear.wire.names import CAPABILITY_NAME, CAPABILITY_RULE

_NO_SERVICES: Mapping[str, ServiceView] = MappingProxyType({})
log = logging.getLogger("switchgear.dataplane.convert")

#: How deep a request's JSON may nest, counting the top-level object as 1. A deeper request is
#: refused (INVALID_ARGUMENT / HTTP 400 naming the field) before any work: real chat,
#: embedding and tool-schema payloads stay far below it, and every later step (the cache key,
#: adapters, usage estimates) may then walk a payload recursively without nearing Python's
#: recursion limit.
MAX_JSON_DEPTH = 64


class RequestError(ValueError):
    """A malformed InvokeRequest. `path` names the field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


#: At most this many capabilities a request may require; each name 1..64 characters of
#: [a-z0-9_.:-] (InvokeRequest.required_capabilities, `x-switchgear-require`, /v1/invoke's field).
MAX_REQUIRED_CAPABILITIES = 16
NO_CAPABILITIES: frozenset[str] = frozenset()


def required_capabilities(names: Sequence[object], path: str) -> frozenset[str]:
    """The capabilities a request requires, checked: RequestError naming `path` (and the item's
    index, never its value) for more than MAX_REQUIRED_CAPABILITIES or a malformed name."""
    if not names:
        return NO_CAPABILITIES
    if len(names) > MAX_REQUIRED_CAPABILITIES:
        raise RequestError(path, f"at most {MAX_REQUIRED_CAPABILITIES} capabilities, got {len(names)}")
    for index, name in enumerate(names):
        if not isinstance(name, str) or not CAPABILITY_NAME.fullmatch(name):
            raise RequestError(f"{path}[{index}]", f"must be a capability name, {CAPABILITY_RULE}")
    return frozenset(names)  # type: ignore[arg-type]  # (every item checked a str above)


def capabilities_header(values: Sequence[str], name: str) -> frozenset[str]:
    """A comma-list header's capabilities (every line of it, as HTTP joins repeated headers;
    blanks around items are ignored; a wholly blank header requires nothing): `required_capabilities`
    with the header's `name` as the path. The item count is checked before the text is split."""
    text = ",".join(values)
    if not text.strip(" \t"):
        return NO_CAPABILITIES
    if text.count(",") >= MAX_REQUIRED_CAPABILITIES:
        raise RequestError(name, f"at most {MAX_REQUIRED_CAPABILITIES} capabilities, comma-separated")
    return required_capabilities([item.strip(" \t") for item in text.split(",")], name)


class NoTargetFits(Exception):
    """No target of the service can serve the call as asked: none offers `missing` (the
    capabilities the call requires that no target has), or none's context window holds the
    call's `tokens` (estimated prompt + asked answer). The caller's requirement, not an outage:
    refused before any attempt, so it counts against no breaker, health score or alert."""

    def __init__(self, service: str, missing: frozenset[str] = NO_CAPABILITIES,
                 together: frozenset[str] = NO_CAPABILITIES, tokens: int = 0, largest: int = 0) -> None:
        self.service, self.tokens, self.largest = service, tokens, largest
        # (`together`: required capabilities each offered somewhere, but by no one target)
        self.missing = tuple(sorted(missing or together))
        if missing:
            text = f"no target of {service!r} offers {list(self.missing)}"
        elif together:
            text = f"no one target of {service!r} offers all of {list(self.missing)}"
        else:
            text = (f"no target of {service!r} has a context window for ~{tokens} tokens "
                    f"(estimated prompt + asked output; the largest is {largest})")
        super().__init__(text)


_seconds = checks.seconds


def _health(value: int) -> str:
    name = str(common_pb2.HealthState.Name(value)) if value in common_pb2.HealthState.values() else ""
    return name.removeprefix("HEALTH_STATE_").lower() if value else "healthy"


def _pricing(p: common_pb2.Pricing) -> Pricing:
    return Pricing(p.cost_per_1k_tokens, p.input_cost_per_1k_tokens, p.output_cost_per_1k_tokens,
                   p.cost_per_request, p.cache_read_input_cost_per_1k_tokens, p.cache_write_input_cost_per_1k_tokens,
                   p.web_search_cost_per_1k_requests)


def _secret(msg: common_pb2.Endpoint | common_pb2.Service) -> SecretRef | None:
    return SecretRef(env=msg.api_key.env, file=msg.api_key.file) if msg.HasField("api_key") else None


def _endpoint(msg: common_pb2.Endpoint) -> EndpointView:
    return EndpointView(
        id=msg.id, url=msg.url, weight=msg.weight, priority=msg.priority,
        health=_health(msg.health), max_concurrency=msg.max_concurrency,
        protocol=msg.protocol, api_key=_secret(msg), model=msg.model,
        pricing=_pricing(msg.pricing) if msg.HasField("pricing") else None,
        max_tokens=msg.max_tokens, rpm_limit=msg.rpm_limit, tpm_limit=msg.tpm_limit,
        tags=MappingProxyType(dict(msg.tags)), provider=msg.provider, source_service=msg.source_service,
        context_window=msg.context_window, capabilities=tuple(msg.capabilities),
    )


def _targets(service: ServiceView, options: checks.ParsedOptions,
             adapters: Mapping[str, Adapter]) -> tuple[tuple[EndpointView, ...], dict[str, TargetView]]:
    """Each endpoint's effective target (target field > service field), and the endpoints this
    agent can serve: a target whose protocol it has no adapter for is left out (logged), as a
    service it cannot serve is marked unsupported."""
    served: list[EndpointView] = []
    targets: dict[str, TargetView] = {}
    parsed = options.targets or (None,) * len(service.endpoints)
    for endpoint, own in zip(service.endpoints, parsed, strict=True):
        protocol = endpoint.protocol or service.protocol
        if protocol not in adapters:
            log.warning("service %s: endpoint %s left out: this agent has no adapter for protocol %r",
                        service.name, endpoint.id, protocol[:64])
            continue
        served.append(endpoint)
        targets[endpoint.id] = service.resolve(endpoint, (own.adapter, own.limits) if own is not None else None)
    return tuple(served), targets


def _service(msg: common_pb2.Service, options: checks.ParsedOptions, adapters: Mapping[str, Adapter]) -> ServiceView:
    """The view of a service that passed `checks.check_service` (`options` is what it parsed)."""
    view = _service_alone(msg, options, adapters)
    if view.unsupported:
        return view
    endpoints, targets = _targets(view, options, adapters)
    unsupported = ""
    if not endpoints:
        unsupported = "this agent has no adapter for the protocol of any of its targets"
    return dataclasses.replace(view, endpoints=endpoints, targets=MappingProxyType(targets), unsupported=unsupported)


def _service_alone(msg: common_pb2.Service, options: checks.ParsedOptions,
                   adapters: Mapping[str, Adapter]) -> ServiceView:
    return ServiceView(
        name=msg.name,
        category=checks.category_name(msg.category, "category"),
        protocol=msg.protocol,
        endpoints=tuple(_endpoint(e) for e in msg.endpoints),
        api_key=_secret(msg),
        model=msg.model,
        max_tokens=msg.max_tokens,
        pricing=_pricing(msg.pricing),
        capabilities=tuple(msg.capabilities),
        priority=msg.priority,
        strategy=msg.strategy,
        timeout_s=_seconds(msg.timeout),
        options=options.adapter,
        limits=options.limits,
        fallbacks=tuple(msg.fallbacks),
        metadata=MappingProxyType(dict(msg.metadata)),
        context_window=msg.context_window,
        unsupported="" if msg.protocol in adapters else f"this agent has no adapter for protocol {msg.protocol!r}",
    )


def _settings(msg: discovery_pb2.DataPlaneSettings) -> AgentSettings:
    checks.check_settings(msg)
    defaults = AgentSettings()
    r = msg.retry_policy
    retry = RetrySettings(
        max_retries=r.max_retries,
        backoff_strategy=r.backoff_strategy or defaults.retry.backoff_strategy,
        base_delay_s=_seconds(r.base_delay),  # 0: not set, the category's default applies
        max_delay_s=_seconds(r.max_delay),
    ) if msg.HasField("retry_policy") else defaults.retry
    return AgentSettings(
        default_strategy=msg.default_strategy or defaults.default_strategy,
        default_timeout_s=_seconds(msg.default_timeout) or defaults.default_timeout_s,
        retry=retry,
        breaker_failure_threshold=msg.circuit_breaker.failure_threshold
        or defaults.breaker_failure_threshold,
        category_policies=MappingProxyType({k: _policy(v) for k, v in sorted(msg.category_policies.items())}),
        cache_enabled=msg.cache.enabled,
        cache_ttl_s=MappingProxyType({kind: _seconds(ttl) for kind, ttl in sorted(msg.cache.ttl.items())}),
        preset_responses=MappingProxyType(dict(sorted(msg.preset_responses.items()))),
        discovery_cache_ttl_s=_seconds(msg.discovery_cache_ttl),
    )


def settings_from_proto(msg: discovery_pb2.DataPlaneSettings) -> AgentSettings:
    """The settings an agent runs with, from the snapshot's (what `config validate` prints from)."""
    return _settings(msg)


def _policy(msg: discovery_pb2.CategoryPolicy) -> SchedulingPolicy:
    return SchedulingPolicy(
        strategy=msg.strategy,
        max_cost_per_request=msg.max_cost_per_request,
        min_success_rate=msg.min_success_rate,
        max_queue_size=msg.max_queue_size,
        timeout_s=_seconds(msg.timeout),
        attempt_timeout_floor_s=_seconds(msg.attempt_timeout_floor),
        attempt_timeout_ceiling_s=_seconds(msg.attempt_timeout_ceiling),
        attempt_timeout_factor=msg.attempt_timeout_factor,
        hedge_min_priority=msg.hedge_min_priority,
        overload_threshold=msg.overload_threshold,
        underload_threshold=msg.underload_threshold,
        stream_upstream=msg.stream_upstream,
    )


@dataclass(frozen=True)
class Rejection:
    """A service of a snapshot the agent did not apply, and why."""

    service: str
    error: SnapshotError


@dataclass(frozen=True)
class Converted:
    """What an agent applies of a snapshot, and the services it rejected (snapshot order).

    For a later delta: `own` is the snapshot's services without the category routes built over
    them, and `candidates` the views of rejected services that passed their own checks and were
    rejected only for a fallback absent at this version (taken when it comes back)."""

    snapshot: AgentSnapshot
    rejections: tuple[Rejection, ...] = ()
    own: Mapping[str, ServiceView] = field(default_factory=lambda: _NO_SERVICES)
    candidates: Mapping[str, ServiceView] = field(default_factory=lambda: _NO_SERVICES)
    routes: Routes = field(default_factory=lambda: MappingProxyType({}))


def convert_snapshot(
    msg: discovery_pb2.Snapshot, version: str, adapters: Mapping[str, Adapter],
    previous: Mapping[str, ServiceView] = _NO_SERVICES,
) -> Converted:
    """Per service: each service that passes the checks is taken; a rejected one keeps its
    definition in `previous` (the snapshot being served: a bad update of a running service must
    not take it down; static stability), or is left out when it has none. A service whose
    fallback ends up absent is rejected in turn. Raises SnapshotError for the version and
    settings (whole); never half-applies those."""
    checks.check_version(msg, version)
    checked = checks.check_services(msg.services, adapters)
    services = {name: _service(svc, options, adapters) for name, (svc, options) in checked.accepted.items()}
    fresh = dict(services)
    rejected = dict(checked.rejected)
    services.update({name: previous[name] for name in rejected if name in previous and name not in services})
    return _assembled(version, services, fresh, rejected, previous, _settings(msg.settings))


def convert_delta(msg: discovery_pb2.SnapshotDelta, version: str, adapters: Mapping[str, Adapter],
                  base: AgentSnapshot, held: Converted) -> Converted:
    """A delta applied onto `base`, the snapshot `held` describes: the result `convert_snapshot`
    gives for the whole snapshot of `version` with `base` as the previous one. Changed services
    are checked one by one as there; an unchanged one keeps its view (the same checks would
    pass it again), a rejection for its content stands until it changes or goes, and one for
    an absent fallback is decided again. Raises SnapshotError for the version, the base
    ("base_version": not the version held, so the delta cannot apply) and the settings."""
    if not version:
        raise SnapshotError("version_info", "required")
    if msg.version and msg.version != version:
        raise SnapshotError("delta.version", f"{msg.version!r} differs from version_info {version!r}")
    if msg.base_version != base.version or held.snapshot is not base:
        raise SnapshotError("base_version", f"the delta applies onto {msg.base_version[:200]!r}, "
                            f"not the version held {base.version[:200]!r}")
    settings = _settings(msg.settings) if msg.HasField("settings") else base.settings
    checked = checks.check_services(msg.services, adapters)
    removed = frozenset(msg.removed_services)
    touched = {*checked.accepted, *checked.rejected, *removed}
    held_rejected = {r.service: r.error for r in held.rejections}
    services = {name: view for name, view in held.own.items() if name not in removed}
    fresh = {name: view for name, view in services.items() if name not in held_rejected}
    fresh.update((name, view) for name, view in held.candidates.items() if name not in touched)
    fresh.update({name: _service(svc, options, adapters) for name, (svc, options) in checked.accepted.items()})
    fresh = {name: view for name, view in fresh.items() if name not in checked.rejected}
    services.update(fresh)
    rejected = {name: error for name, error in held_rejected.items() if name not in touched and name not in fresh}
    rejected.update(checked.rejected)
    for name in checked.rejected:  # kept as it was in the base, where it was (else absent)
        services.pop(name, None)
        if name in base.services:
            services[name] = base.services[name]
    converted = _assembled(version, services, fresh, rejected, base.services, settings, held.routes)
    return dataclasses.replace(converted, snapshot=dataclasses.replace(converted.snapshot, governance=base.governance))


def _assembled(version: str, services: dict[str, ServiceView], fresh: Mapping[str, ServiceView],
               rejected: dict[str, SnapshotError], previous: Mapping[str, ServiceView],
               settings: AgentSettings, reuse: Routes | None = None) -> Converted:
    """The applied services (fallbacks checked; `fresh`: the views that passed their own checks),
    their category routes (`reuse`: the base's, see _routes), and the rejections."""
    _drop_dangling_fallbacks(services, rejected, previous)
    own = MappingProxyType(dict(services))
    routes = _routes(services, reuse)
    services.update({category: route for category, (_, route, _) in routes.items()})
    return Converted(AgentSnapshot(version=version, services=MappingProxyType(services), settings=settings),
                     tuple(Rejection(name, error) for name, error in rejected.items()), own,
                     MappingProxyType({name: fresh[name] for name in rejected if name in fresh}),
                     MappingProxyType(routes))


def category_routes(services: Mapping[str, ServiceView]) -> dict[str, ServiceView]:
    """Each route category's name as a route over every endpoint of its servable services
    (docs/concepts/routes.md), built from their views: each target keeps its service's effective
    protocol, key reference, model, prices, options and limits (the member's TargetView itself),
    and its endpoint's health and priority (else the service's); its id is "<service>.<endpoint>"
    and `source_service` names the service. None for a
    category with fewer than ROUTE_MIN_SERVICES such services, or whose name a service takes."""
    return {category: route for category, (_, route, _) in _routes(services).items()}


#: One member's part of a category route: its endpoints as route targets, and their target views.
_Part = tuple[tuple[EndpointView, ...], tuple[tuple[str, TargetView], ...]]
#: A category route as built: its member views, the route, and each member's part by name (with
#: the member view it was made from), for the next delta to reuse.
Route = tuple[tuple[ServiceView, ...], ServiceView, Mapping[str, tuple[ServiceView, _Part]]]
Routes = Mapping[str, Route]


def _routes(services: Mapping[str, ServiceView], reuse: Routes | None = None) -> dict[str, Route]:
    """category_routes, built with what `reuse` (the base snapshot's routes) already holds: a
    route whose member views are all the very ones it was built from is taken as it was, and a
    member whose view is unchanged keeps its part (rebuilding the "llm" route over 10,000
    services was most of a one-service delta's apply)."""
    routes: dict[str, Route] = {}
    for category in checks.ROUTE_CATEGORIES:
        members = tuple(sorted((s for s in services.values() if s.category == category and not s.unsupported),
                               key=lambda s: s.name))
        if len(members) < checks.ROUTE_MIN_SERVICES or category in services:
            continue
        old = reuse.get(category) if reuse else None
        if old is not None and len(old[0]) == len(members) and all(
                a is b for a, b in zip(old[0], members, strict=True)):
            routes[category] = old
            continue
        routes[category] = _route(category, members, old[2] if old is not None else {})
    return routes


def _route(category: str, members: tuple[ServiceView, ...], parts: Mapping[str, tuple[ServiceView, _Part]]) -> Route:
    endpoints: list[EndpointView] = []
    targets: dict[str, TargetView] = {}
    built: dict[str, tuple[ServiceView, _Part]] = {}
    for member in members:
        hit = parts.get(member.name)
        part = hit[1] if hit is not None and hit[0] is member else _part(member)
        built[member.name] = (member, part)
        endpoints.extend(part[0])
        targets.update(part[1])
    shared = frozenset(members[0].capabilities).intersection(*(m.capabilities for m in members[1:]))
    route = ServiceView(name=category, category=category, protocol=members[0].protocol,
                        endpoints=tuple(endpoints), capabilities=tuple(sorted(shared)),
                        targets=MappingProxyType(targets))
    return members, route, MappingProxyType(built)


def _part(member: ServiceView) -> _Part:
    endpoints: list[EndpointView] = []
    targets: list[tuple[str, TargetView]] = []
    for e in member.endpoints:
        ident = f"{member.name}.{e.id}"
        endpoints.append(EndpointView(
            id=ident, url=e.url, weight=e.weight, priority=e.priority or member.priority, health=e.health,
            max_concurrency=e.max_concurrency, protocol=e.protocol, api_key=e.api_key, model=e.model,
            pricing=e.pricing, max_tokens=e.max_tokens, rpm_limit=e.rpm_limit, tpm_limit=e.tpm_limit,
            tags=e.tags, provider=e.provider, source_service=member.name, context_window=e.context_window,
            capabilities=e.capabilities))
        targets.append((ident, member.target(e)))  # the member's own view, shared
    return tuple(endpoints), tuple(targets)


def _drop_dangling_fallbacks(
    services: dict[str, ServiceView], rejected: dict[str, SnapshotError], previous: Mapping[str, ServiceView]
) -> None:
    """Until every fallback names a service present: a service with a missing fallback falls
    back to its previous definition, then is dropped. Ends: each step replaces a new view by an
    old one or removes a service."""
    changed = True
    while changed:
        changed = False
        for name, view in list(services.items()):
            problem = checks.fallback_problem(name, view.fallbacks, services)
            if problem is None:
                continue
            rejected.setdefault(name, problem)
            old = previous.get(name)
            if old is not None and old is not view:
                services[name] = old
            else:
                del services[name]
            changed = True


def snapshot_from_proto(
    msg: discovery_pb2.Snapshot, version: str, adapters: Mapping[str, Adapter]
) -> AgentSnapshot:
    """The whole snapshot or SnapshotError (the first problem): `convert_snapshot` with no
    service left out."""
    converted = convert_snapshot(msg, version, adapters)
    if converted.rejections:
        raise converted.rejections[0].error
    return converted.snapshot


@lean
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
    # Per-request retry count (InvokeRequest.max_retries, x-switchgear-max-retries); None = the
    # route's retry policy. Bounded by it, as `timeout_s` is by the route's timeout (check_overrides).
    max_retries: int | None = None
    # The tenant whose key the call came with ("" with auth off): a door sets it, Pipeline.govern
    # makes sure of it. Never `user_id`, which the caller chooses freely. A deferred call's task
    # is this tenant's.
    tenant: str = ""
    # Capabilities every target that serves the call must offer: the caller's
    # (required_capabilities, x-switchgear-require) and, once governed, its tenant's.
    capabilities: frozenset[str] = NO_CAPABILITIES

    @property
    def from_task(self) -> bool:
        """Whether a task worker made this call (its failure must not become another task)."""
        return self.request_id.startswith(TASK_REQUEST_PREFIX)


#: Request ids of calls a task worker makes start with this. The document fallback must not
#: defer such a call again (the task itself retries); DeferInvoke refuses them too.
TASK_REQUEST_PREFIX = "sgtask:"


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


def call_from_proto(msg: gateway_pb2.InvokeRequest, max_depth: int = MAX_JSON_DEPTH, tenant: str = "") -> Call:
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
            category = checks.category_name(msg.category, "category")
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
        max_retries=msg.max_retries if msg.HasField("max_retries") else None,
        tenant=tenant,
        capabilities=required_capabilities(msg.required_capabilities, "required_capabilities"),
    )


def route_timeout_s(service: ServiceView, settings: AgentSettings) -> float:
    """The longest a call to `service` may run: its own timeout, else its category policy's,
    else the default. A caller may ask for less, never more."""
    if service.timeout_s:
        return service.timeout_s
    policy = settings.category_policies.get(service.category)
    return (policy.timeout_s if policy is not None else 0.0) or settings.default_timeout_s


def check_overrides(call: Call, service: ServiceView, settings: AgentSettings) -> None:
    """A call's own retry count and timeout stay within its route's policy (RequestError naming
    the field otherwise): never more retries than retry_policy.max_retries, never a longer
    timeout than the route's."""
    if call.max_retries is not None and call.max_retries > settings.retry.max_retries:
        raise RequestError("max_retries", f"must be at most the route's retry policy max_retries "
                                          f"({settings.retry.max_retries}), got {call.max_retries}")
    if call.timeout_s:
        limit = route_timeout_s(service, settings)
        if call.timeout_s > limit:
            raise RequestError("timeout",
                               f"must be at most the route's timeout ({limit:g} s), got {call.timeout_s:g} s")
