"""Category routes: the name of a model category ("llm", "embedding") as a route over every
service of that category (README "Routes").

A route is a service whose endpoints may override service fields (model.EndpointSpec). The
seed's config, as written, declares gpt-4, gpt-3.5-turbo and claude-3-sonnet as services of
the llm category; the snapshot then also carries a route named `llm` whose targets are those
services' endpoints, each keeping its own service's protocol, key reference, model, prices,
max_tokens, options and priority (`source_service` names where it came from). Such a route is
derived, never stored: it follows the services it gathers, and the operator's registry holds
only what was configured. A service may not take the name of a category route
(validate.py refuses the clash), so a caller asking for `llm` always means the whole category.

Pure.
"""

from __future__ import annotations

import functools

from switchgear.controlplane.model import ROUTE_CATEGORIES, ROUTE_MIN_SERVICES, EndpointSpec, ServiceSpec

__all__ = ["ROUTE_CATEGORIES", "category_routes", "route_names", "target_id"]

# Every target sets protocol, key, model, prices and options itself: the route's own fields
# are empty, so nothing of one service leaks to another's target (a keyless local model stays
# keyless).


def route_names(services: tuple[ServiceSpec, ...]) -> frozenset[str]:
    """The names of the category routes `services` give."""
    return frozenset(route.name for route in category_routes(services))


@functools.lru_cache(maxsize=64)
def category_routes(services: tuple[ServiceSpec, ...]) -> tuple[ServiceSpec, ...]:
    """One route per category of ROUTE_CATEGORIES with at least ROUTE_MIN_SERVICES services (sorted
    by name), none for a category a same-named service already claims (validation refuses
    that state; a stored one keeps serving the service)."""
    names = {s.name for s in services}
    routes: list[ServiceSpec] = []
    for category in ROUTE_CATEGORIES:
        members = sorted((s for s in services if s.category == category and s.name != category.value),
                         key=lambda s: s.name)
        if len(members) < ROUTE_MIN_SERVICES or category.value in names:
            continue
        capabilities = set(members[0].capabilities).intersection(*(s.capabilities for s in members[1:]))
        routes.append(ServiceSpec(
            name=category.value, category=category, protocol=members[0].protocol,
            endpoints=tuple(_target(s, e) for s in members for e in s.endpoints),
            capabilities=tuple(sorted(capabilities)),
        ))
    return tuple(routes)


def target_id(service: str, endpoint: str) -> str:
    """A category route's id for a service's endpoint."""
    return f"{service}.{endpoint}"


def _target(service: ServiceSpec, e: EndpointSpec) -> EndpointSpec:
    return EndpointSpec(
        id=target_id(service.name, e.id), url=e.url, weight=e.weight, priority=e.priority or service.priority,
        max_concurrency=e.max_concurrency, protocol=e.protocol or service.protocol,
        api_key=e.api_key if e.api_key is not None else service.api_key, model=e.model or service.model,
        pricing=e.pricing if e.pricing is not None else service.pricing,
        max_tokens=e.max_tokens or service.max_tokens,
        options_json=e.options_json or service.options_json, rpm_limit=e.rpm_limit, tpm_limit=e.tpm_limit,
        tags=e.tags, provider=e.provider or service.name, source_service=service.name,
    )
