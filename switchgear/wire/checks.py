"""Pure checks of snapshot messages, run by agents (apply or reject) and by the control plane
(refuse a change agents would reject). Each failure is a SnapshotError naming the field path
inside the snapshot, e.g. "services[chat].options_json.chat_path".

Per resource, as delta xDS acknowledges: `check_services` splits a snapshot's services into
the ones an agent can apply and the ones it rejects, with why; the version, the settings and
the governance part are each checked whole.
"""

from __future__ import annotations

import math
import re
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
from google.protobuf import duration_pb2

from switchgear.adapters.base import OptionsError, ResponseLimits, split_response_limits
from switchgear.v1 import common_pb2, discovery_pb2, governance_pb2

MAX_TIMEOUT_S = 3600.0
MAX_TTL_S = 366 * 86400.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
#: Service categories by their snapshot names ("llm", "document", ...), in enum order.
CATEGORIES = tuple(
    str(name).removeprefix("SERVICE_CATEGORY_").lower() for name, value in common_pb2.ServiceCategory.items() if value
)
_USER_TYPES = frozenset(governance_pb2.UserType.values())
#: Categories whose name is a route over all their services (docs/concepts/routes.md), when at least
#: ROUTE_MIN_SERVICES of them are served; the control plane refuses a service of that name.
ROUTE_CATEGORIES = ("llm", "embedding")
ROUTE_MIN_SERVICES = 2


class SnapshotError(ValueError):
    """Something an agent cannot apply; `path` names the field inside the snapshot."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class OptionParser(Protocol):
    """The part of an adapter the checks use: `parse_options` raises OptionsError naming the key."""

    def parse_options(self, options: Mapping[str, Any]) -> Any: ...


def seconds(d: duration_pb2.Duration) -> float:
    return float(d.ToNanoseconds()) / 1e9


def check_version(msg: discovery_pb2.Snapshot, version: str) -> None:
    if not version:
        raise SnapshotError("version_info", "required")
    if msg.version and msg.version != version:
        raise SnapshotError("snapshot.version", f"{msg.version!r} differs from version_info {version!r}")


def category_name(value: int, path: str) -> str:
    """The snapshot name of a ServiceCategory value ("llm", ...); UNSPECIFIED is an error."""
    try:
        name = str(common_pb2.ServiceCategory.Name(value))
    except ValueError:
        raise SnapshotError(path, f"unknown category {value}") from None
    category = name.removeprefix("SERVICE_CATEGORY_").lower()
    if category not in CATEGORIES:
        raise SnapshotError(path, "required")
    return category


def check_endpoint(msg: common_pb2.Endpoint, path: str) -> None:
    if not NAME_RE.match(msg.id):
        raise SnapshotError(f"{path}.id", f"invalid endpoint id {msg.id!r}")
    try:
        parts = urlsplit(msg.url)
        host = parts.hostname
    except ValueError:
        host = None
    if host is None or parts.scheme not in ("http", "https"):
        raise SnapshotError(f"{path}.url", "not an http(s) URL")
    if msg.weight < 1:
        raise SnapshotError(f"{path}.weight", "must be at least 1")
    _check_secret_and_prices(msg, path)


def _check_secret_and_prices(msg: common_pb2.Service | common_pb2.Endpoint, path: str) -> None:
    if msg.HasField("api_key") and not (msg.api_key.env or msg.api_key.file):
        raise SnapshotError(f"{path}.api_key", "set env or file")
    p = msg.pricing
    prices = [value for _, value in p.ListFields()]  # every price set (all are doubles; unset ones are 0)
    if any(not math.isfinite(x) or x < 0 for x in prices):
        raise SnapshotError(f"{path}.pricing", "prices must be finite and non-negative")


def _check_endpoints(msg: common_pb2.Service, path: str) -> None:
    if not msg.endpoints:
        raise SnapshotError(f"{path}.endpoints", "at least one endpoint is required")
    for i, endpoint in enumerate(msg.endpoints):
        check_endpoint(endpoint, f"{path}.endpoints[{i}]")
    seen: set[str] = set()
    for i, endpoint in enumerate(msg.endpoints):
        if endpoint.id in seen:
            raise SnapshotError(f"{path}.endpoints[{i}].id", f"duplicate endpoint id {endpoint.id!r}")
        seen.add(endpoint.id)


@dataclass(frozen=True)
class ParsedOptions:
    """A service's options_json read: the answer limits every protocol accepts
    (`max_response_bytes`, `max_decoded_bytes`) and what its adapter parsed of the rest (None
    when this agent has no adapter for the protocol)."""

    limits: ResponseLimits
    adapter: Any
    # Per endpoint (route target), in order: its own parsed options when it sets options_json
    # or a protocol other than the service's (then an empty options_json means the protocol's
    # defaults); None = the service's.
    targets: tuple[ParsedOptions | None, ...] = ()


def parse_options(msg: common_pb2.Service | common_pb2.Endpoint, parser: OptionParser | None,
                  path: str) -> ParsedOptions:
    """The service's options: the answer limits, then the rest as `parser` parses them (a
    protocol this agent has no adapter for is served as unsupported, not rejected)."""
    try:
        raw = orjson.loads(msg.options_json or "{}")
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"{path}.options_json", f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise SnapshotError(f"{path}.options_json", "must be a JSON object")
    try:
        limits, rest = split_response_limits(raw)
        return ParsedOptions(limits, None if parser is None else parser.parse_options(rest))
    except OptionsError as exc:
        sub = f".{exc.path}" if exc.path else ""
        raise SnapshotError(f"{path}.options_json{sub}", exc.message) from None


def check_service(msg: common_pb2.Service, parsers: Mapping[str, OptionParser], path: str) -> ParsedOptions:
    """Everything but the name and fallbacks of one service; returns its parsed options."""
    _check_endpoints(msg, path)
    if not (0 <= seconds(msg.timeout) <= MAX_TIMEOUT_S):
        raise SnapshotError(f"{path}.timeout", f"must be within 0..{MAX_TIMEOUT_S:g} s")
    _check_secret_and_prices(msg, path)
    category_name(msg.category, f"{path}.category")
    options = parse_options(msg, parsers.get(msg.protocol), path)
    targets = tuple(_target_options(msg, e, parsers, f"{path}.endpoints[{i}]") for i, e in enumerate(msg.endpoints))
    if msg.metadata.get("cache.shared", "").lower() == "true" and any(
            getattr(o.adapter, "tenant_scoped", False) for o in (options, *targets) if o is not None):
        # A cache entry shared by every tenant would serve one tenant's data to another.
        raise SnapshotError(f"{path}.metadata[cache.shared]", "a service whose data is scoped per tenant "
                                                              "(options database_scope/namespace_scope: tenant) "
                                                              "cannot share its cached answers between tenants")
    if any(t is not None for t in targets):
        return ParsedOptions(options.limits, options.adapter, targets)
    return options


def _target_options(service: common_pb2.Service, e: common_pb2.Endpoint, parsers: Mapping[str, OptionParser],
                    path: str) -> ParsedOptions | None:
    """A route target's own options (see ParsedOptions.targets)."""
    if not e.options_json and (not e.protocol or e.protocol == service.protocol):
        return None
    if e.protocol and not NAME_RE.match(e.protocol):
        raise SnapshotError(f"{path}.protocol", "invalid protocol name")
    return parse_options(e, parsers.get(e.protocol or service.protocol), path)


@dataclass(frozen=True)
class ServiceChecks:
    """A snapshot's services split per resource. `accepted` maps each name to its message and
    parsed options; `rejected` maps each name to the first problem found. Both keep the
    snapshot's order. A name may be in both (a duplicate: the first definition is accepted)."""

    accepted: Mapping[str, tuple[common_pb2.Service, ParsedOptions]]
    rejected: Mapping[str, SnapshotError]


def check_services(services: Sequence[common_pb2.Service], parsers: Mapping[str, OptionParser]) -> ServiceChecks:
    """Check each service on its own (fallbacks aside: see `fallback_problem`)."""
    accepted: dict[str, tuple[common_pb2.Service, ParsedOptions]] = {}
    rejected: dict[str, SnapshotError] = {}
    for i, svc in enumerate(services):
        path = f"services[{svc.name or i}]"
        try:
            if not NAME_RE.match(svc.name):
                raise SnapshotError(f"{path}.name", f"invalid service name {svc.name!r}")
            if svc.name in accepted or svc.name in rejected:
                raise SnapshotError(f"{path}.name", "duplicate service name")
            accepted[svc.name] = (svc, check_service(svc, parsers, path))
        except SnapshotError as exc:
            rejected.setdefault(svc.name, exc)
    return ServiceChecks(accepted, rejected)


def fallback_problem(name: str, fallbacks: Sequence[str], known: Container[str]) -> SnapshotError | None:
    """The first of a service's fallbacks that is not among the `known` services, if any."""
    for j, fallback in enumerate(fallbacks):
        if fallback not in known:
            return SnapshotError(f"services[{name}].fallbacks[{j}]", f"unknown service {fallback!r}")
    return None


#: The longest preset response an agent takes (the control plane's config check says the same).
MAX_PRESET_CHARS = 16_384


def check_settings(msg: discovery_pb2.DataPlaneSettings) -> None:
    timeout = seconds(msg.default_timeout)  # 0 = the agent's default
    if timeout and not (0 < timeout <= MAX_TIMEOUT_S):
        raise SnapshotError("settings.default_timeout", f"must be within 0..{MAX_TIMEOUT_S:g} s")
    for category, policy in sorted(msg.category_policies.items()):
        _check_policy(category, policy, f"settings.category_policies[{category}]")
    for kind, ttl in sorted(msg.cache.ttl.items()):
        if not (0 <= seconds(ttl) <= MAX_TTL_S):
            raise SnapshotError(f"settings.cache.ttl[{kind}]", "must be within 0 s .. 366 days")
    if not (0 <= seconds(msg.discovery_cache_ttl) <= MAX_TTL_S):
        raise SnapshotError("settings.discovery_cache_ttl", "must be within 0 s .. 366 days")
    for category, text in sorted(msg.preset_responses.items()):
        if category not in CATEGORIES or len(text) > MAX_PRESET_CHARS:
            raise SnapshotError(f"settings.preset_responses[{category}]",
                                f"a known category and at most {MAX_PRESET_CHARS} characters")


def _check_policy(category: str, msg: discovery_pb2.CategoryPolicy, path: str) -> None:
    """A category's scheduling policy. The strategy name is not checked: routing falls back past
    names it does not know (dataplane/scheduling/policy.py)."""
    if category not in CATEGORIES:
        raise SnapshotError(path, f"unknown category (known: {', '.join(CATEGORIES)})")
    if not (math.isfinite(msg.max_cost_per_request) and msg.max_cost_per_request >= 0):
        raise SnapshotError(f"{path}.max_cost_per_request", "must be finite and non-negative")
    if not (0.0 <= msg.min_success_rate <= 1.0):
        raise SnapshotError(f"{path}.min_success_rate", "must be within 0..1")
    if not (0 <= seconds(msg.timeout) <= MAX_TIMEOUT_S):
        raise SnapshotError(f"{path}.timeout", f"must be within 0..{MAX_TIMEOUT_S:g} s")
    for name in ("overload_threshold", "underload_threshold"):
        if not (0.0 <= getattr(msg, name) <= 1.0):
            raise SnapshotError(f"{path}.{name}", "must be within 0..1")
    if msg.stream_upstream and category != "llm":
        raise SnapshotError(f"{path}.stream_upstream", "only llm calls can be streamed from their upstream")


def _claim_id(ident: str, seen: set[str], path: str, what: str) -> None:
    if not ident or ident in seen:
        raise SnapshotError(f"{path}.id", f"missing or duplicate {what} id")
    seen.add(ident)


def check_governance(tenants: Sequence[governance_pb2.Tenant], keys: Sequence[governance_pb2.KeyDigest]) -> None:
    ids: set[str] = set()
    for i, tenant in enumerate(tenants):
        path = f"tenants[{tenant.id or i}]"
        _claim_id(tenant.id, ids, path, "tenant")
        if tenant.user_type not in _USER_TYPES:
            raise SnapshotError(f"{path}.user_type", f"unknown user type {tenant.user_type}")
        for j, category in enumerate(tenant.policy.allowed_categories):
            if category == 0 or category not in common_pb2.ServiceCategory.values():
                raise SnapshotError(f"{path}.policy.allowed_categories[{j}]", f"unknown category {category}")
    key_ids: set[str] = set()
    for i, key in enumerate(keys):
        _claim_id(key.id, key_ids, f"keys[{key.id or i}]", "key")
        if key.tenant not in ids:
            raise SnapshotError(f"keys[{key.id}].tenant", f"no tenant {key.tenant!r} in the snapshot")
        if len(key.sha256) != 32:
            raise SnapshotError(f"keys[{key.id}].sha256", "must be 32 bytes")
