"""The services section: provider groups, well-known providers' defaults, models, endpoints.

What a well-known provider key implies (its protocol, URL and key variable) is the only
default this loader adds; everything else the file leaves out takes the model's defaults.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import orjson

from switchgear.adapters.base import RESPONSE_LIMIT_OPTIONS
from switchgear.controlplane.config.managed import read_managed
from switchgear.controlplane.config.parse import Node
from switchgear.controlplane.config.read import (
    Context,
    Leaf,
    Reader,
    join_path,
    read_bool,
    read_duration,
    read_float,
    read_int,
    read_leaves,
    read_members,
    read_metadata,
    read_options,
    read_response_limit,
    read_secret,
    read_size,
    read_str,
    read_str_tuple,
    read_strategy,
    section,
    shown,
)
from switchgear.controlplane.model import (
    Category,
    EndpointSpec,
    Pricing,
    SecretRef,
    ServiceSpec,
)


@dataclass(frozen=True)
class _Provider:
    """What a well-known provider key under a service group implies."""

    protocol: str
    url: str = ""
    key_env: str = ""


_PROVIDERS = MappingProxyType(
    {
        "openai": _Provider("openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
        "anthropic": _Provider("anthropic", "https://api.anthropic.com", "ANTHROPIC_API_KEY"),
        "local_models": _Provider("openai"),  # OpenAI-compatible servers, no key
        "unstructured": _Provider("unstructured"),
        "graphrag": _Provider("graphrag"),
        "chroma": _Provider("chroma"),
        "pinecone": _Provider("pinecone", "https://api.pinecone.io", "PINECONE_API_KEY"),
    }
)
_NO_PROVIDER = _Provider("")

_GROUPS = MappingProxyType(
    {
        "llm_services": Category.LLM,
        "document_services": Category.DOCUMENT,
        "knowledge_graph": Category.KNOWLEDGE_GRAPH,
        "vector_databases": Category.VECTOR_DB,
        "embedding_services": Category.EMBEDDING,
    }
)
_MODEL_CATEGORIES = frozenset({Category.LLM, Category.EMBEDDING})

#: Keys a provider passes down to each of its models (innermost wins; options merge).
_INHERITED = frozenset({"protocol", "endpoint", "endpoints", "api_key", "options", "timeout"})
_PROVIDER_KEYS = _INHERITED | {"enabled", "models"}
_SERVICE_LEAVES = (
    Leaf("model", "model", read_str),
    Leaf("max_tokens", "max_tokens", read_int),
    Leaf("context_window", "context_window", read_int),
    Leaf("priority", "priority", read_int),
    Leaf("strategy", "strategy", read_strategy),
    Leaf("timeout", "timeout_s", read_duration),
    Leaf("capabilities", "capabilities", read_str_tuple),
    Leaf("fallbacks", "fallbacks", read_str_tuple),
)
_PRICE_LEAVES = tuple(
    Leaf(key, f"pricing.{key}", read_float)
    for key in (
        "cost_per_1k_tokens",
        "input_cost_per_1k_tokens",
        "output_cost_per_1k_tokens",
        "cost_per_request",
        "cache_read_input_cost_per_1k_tokens",
        "cache_write_input_cost_per_1k_tokens",
        "web_search_cost_per_1k_requests",
    )
)
_ENTRY_KEYS = (
    _INHERITED
    | {"name", "enabled", "metadata", "managed"}
    | {leaf.key for leaf in _SERVICE_LEAVES}
    | {leaf.key for leaf in _PRICE_LEAVES}
)
_ENDPOINT_LEAVES = (
    Leaf("id", "id", read_str),
    Leaf("url", "url", read_str),
    Leaf("weight", "weight", read_int),
    Leaf("priority", "priority", read_int),
    Leaf("max_concurrency", "max_concurrency", read_int),
    # A route target's own settings (docs/concepts/routes.md): each overrides the service's.
    Leaf("protocol", "protocol", read_str),
    Leaf("model", "model", read_str),
    Leaf("max_tokens", "max_tokens", read_int),
    Leaf("context_window", "context_window", read_int),
    Leaf("capabilities", "capabilities", read_str_tuple),
    Leaf("rpm_limit", "rpm_limit", read_int),
    Leaf("tpm_limit", "tpm_limit", read_int),
    Leaf("provider", "provider", read_str),
    Leaf("tags", "tags", read_metadata),
    *_PRICE_LEAVES,
)
#: Target keys read apart from the leaves: the key reference and the adapter options.
_TARGET_KEYS = ("api_key", "options")

#: Protocol-specific descriptive keys: (protocol, YAML key, how it is kept).
#: "size" and "list" and "count" go to metadata as strings; "option" goes to options_json.
_EXTRAS: tuple[tuple[str, str, str], ...] = (
    ("unstructured", "max_file_size", "size"),
    ("unstructured", "supported_formats", "list"),
    ("graphrag", "max_documents", "count"),
    ("chroma", "collections", "list"),
    ("pinecone", "environment", "option"),
    ("pinecone", "index_name", "option"),
)


def _extra_keys(protocol: str) -> frozenset[str]:
    return frozenset(key for proto, key, _ in _EXTRAS if proto == protocol)


def _read_extra(ctx: Context, node: Node, key: str, kind: str) -> dict[str, str] | None:
    """One descriptive key as metadata entries (a size also gives `<key>size_text`)."""
    if kind == "size":
        size = ctx.read(node, "metadata", read_size)
        return None if size is None else {key: ctx.text(node), f"{key}_bytes": str(size)}
    reader: Reader[Any] = {"list": read_str_tuple, "count": read_int, "option": read_str}[kind]
    value = ctx.read(node, "options_json" if kind == "option" else "metadata", reader)
    if value is None:
        return None
    return {key: ",".join(value) if kind == "list" else str(value)}


@dataclass(frozen=True)
class _Built:
    """A service read from the file, with its context (locations relative to the service)."""

    spec: ServiceSpec
    ctx: Context
    where: Node


class _ServiceReader:
    """Reads one service from its layers: provider mapping, then model entry; innermost wins."""

    def __init__(
        self, ctx: Context, category: Category, provider: _Provider, layers: tuple[Node, ...]
    ) -> None:
        self.ctx = ctx
        self.category = category
        self.provider = provider
        self.layers = layers

    @property
    def entry(self) -> Node:
        return self.layers[-1]

    def pick(self, key: str) -> Node | None:
        for layer in reversed(self.layers):
            if isinstance(layer.value, dict) and key in layer.value:
                return layer.value[key]
        return None

    def build(self, default_name: str | None) -> ServiceSpec | None:
        protocol = self.protocol()
        read_members(self.ctx, self.entry, _ENTRY_KEYS | _extra_keys(protocol))
        name = self.name(default_name)
        if name is None or not protocol:
            return None
        self.ctx.locate("", self.entry)
        fields: dict[str, Any] = {"name": name, "category": self.category, "protocol": protocol}
        fields |= self.leaves(_SERVICE_LEAVES)
        if "model" not in fields and self.category in _MODEL_CATEGORIES:
            fields["model"] = name
        fields["pricing"] = Pricing(**section(self.leaves(_PRICE_LEAVES), "pricing"))
        fields["endpoints"] = self.endpoints()
        fields |= self.managed(fields["endpoints"])
        fields["api_key"] = self.api_key()
        metadata, options = self.extras(protocol)
        fields |= self.options_json(options) | self.metadata(metadata)
        return ServiceSpec(**fields)

    def protocol(self) -> str:
        """The `protocol:` key, else the provider's; "" (with a problem) when neither says."""
        node = self.pick("protocol")
        if node is None:
            if not self.provider.protocol:
                self.ctx.problem(self.layers[0], _unknown_provider(self.layers[0]))
            return self.provider.protocol
        return self.ctx.read(node, "protocol", read_str) or ""

    def name(self, default: str | None) -> str | None:
        node = self.entry.value.get("name") if isinstance(self.entry.value, dict) else None
        if node is None:
            if default is None:
                self.ctx.problem(self.entry, "missing required key 'name'")
            return default
        return self.ctx.read(node, "name", read_str)

    def leaves(self, leaves: tuple[Leaf, ...]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for leaf in leaves:
            node = self.pick(leaf.key)
            value = None if node is None else self.ctx.read(node, leaf.target, leaf.read)
            if value is not None:
                values[leaf.target] = value
        return values

    def endpoints(self) -> tuple[EndpointSpec, ...]:
        """`endpoint: URL` (id "default"), `endpoints: [...]` (ids e0, e1, ...), or the provider's URL."""
        layer = next((x for x in reversed(self.layers) if _has_any(x, ("endpoint", "endpoints"))), None)
        if layer is None:
            return (EndpointSpec("default", self.provider.url),) if self.provider.url else ()
        assert isinstance(layer.value, dict)
        single, many = layer.value.get("endpoint"), layer.value.get("endpoints")
        if single is not None and many is not None:
            self.ctx.problem(many, "set endpoint or endpoints, not both")
            self.ctx.poisoned.add("endpoints")
        if single is not None:
            return self.single_endpoint(single)
        assert many is not None
        return self.endpoint_list(many)

    def single_endpoint(self, node: Node) -> tuple[EndpointSpec, ...]:
        for path in ("endpoints", "endpoints[0]", "endpoints[0].id"):
            self.ctx.locate(path, node)
        url = self.ctx.read(node, "endpoints[0].url", read_str)
        return () if url is None else (EndpointSpec("default", url),)

    def endpoint_list(self, node: Node) -> tuple[EndpointSpec, ...]:
        self.ctx.locate("endpoints", node)
        if not isinstance(node.value, list):
            self.ctx.problem(node, f"expected a list of endpoints, got {shown(node)}")
            self.ctx.poisoned.add("endpoints")
            return ()
        built = (self.list_endpoint(index, item) for index, item in enumerate(node.value))
        return tuple(endpoint for endpoint in built if endpoint is not None)

    def list_endpoint(self, index: int, node: Node) -> EndpointSpec | None:
        """One `endpoints:` item: a URL string, or {id, url, weight, priority, max_concurrency}."""
        path = f"endpoints[{index}]"
        self.ctx.locate(path, node)
        if isinstance(node.value, str):
            url = self.ctx.read(node, f"{path}.url", read_str)
            return None if url is None else EndpointSpec(f"e{index}", url)
        values, members = read_leaves(self.ctx, node, _ENDPOINT_LEAVES, f"{path}.", also=_TARGET_KEYS)
        if "url" not in members and isinstance(node.value, dict):
            self.ctx.problem(node, "missing required key 'url'")
        if "url" not in values:
            self.ctx.poisoned.add(path)
            return None
        prices = section(values, "pricing")
        values = {k: v for k, v in values.items() if not k.startswith("pricing.")}
        if prices:
            values["pricing"] = Pricing(**prices)
        if "tags" in values:
            values["tags"] = tuple(sorted(values["tags"].items()))
        key = members.get("api_key")
        if key is not None and key.value is not None:
            values["api_key"] = self.ctx.read(key, f"{path}.api_key", read_secret)
        options = members.get("options")
        if options is not None:
            values |= self.target_options(options, path)
        return EndpointSpec(**{"id": f"e{index}", **values})

    def target_options(self, node: Node, path: str) -> dict[str, str]:
        """A target's `options:` (they replace the service's as a whole) as options_json."""
        options = self.ctx.read(node, f"{path}.options_json", read_options)
        if options is None:
            return {}
        if isinstance(node.value, dict):
            options |= self.response_limits(node.value)
        try:
            return {"options_json": orjson.dumps(options, option=orjson.OPT_SORT_KEYS).decode()}
        except TypeError:
            self.ctx.problem(node, "options cannot be written as JSON (integers must fit in 64 bits)")
            return {}

    def managed(self, endpoints: tuple[EndpointSpec, ...]) -> dict[str, Any]:
        """`managed:` (config/managed.py): the model server Switchgear runs; its replicas are the
        endpoints, so the entry itself names none."""
        node = self.entry.value.get("managed") if isinstance(self.entry.value, dict) else None
        if node is None:
            return {}
        if endpoints and _has_any(self.entry, ("endpoint", "endpoints")):
            self.ctx.problem(node, "a managed service's endpoints are its replicas: remove endpoint/endpoints")
        spec = read_managed(self.ctx, node)
        return {} if spec is None else {"managed": spec, "endpoints": ()}

    def api_key(self) -> SecretRef | None:
        """`api_key:` (null means none), else the provider's usual key variable."""
        node = self.pick("api_key")
        if node is None:
            return SecretRef(env=self.provider.key_env) if self.provider.key_env else None
        self.ctx.locate("api_key", node)
        return None if node.value is None else self.ctx.read(node, "api_key", read_secret)

    def extras(self, protocol: str) -> tuple[dict[str, str], dict[str, str]]:
        """The protocol's descriptive keys: (metadata, options)."""
        metadata: dict[str, str] = {}
        options: dict[str, str] = {}
        for proto, key, kind in _EXTRAS:
            node = self.pick(key) if proto == protocol else None
            entries = None if node is None else _read_extra(self.ctx, node, key, kind)
            if entries:
                (options if kind == "option" else metadata).update(entries)
        return metadata, options

    def options_json(self, extra: dict[str, str]) -> dict[str, str]:
        """Provider options, overridden key by key by the model's, then the protocol's keys.
        The answer caps every protocol accepts (max_response_bytes, ...) take sizes ("16Mi")."""
        merged: dict[str, Any] = {}
        for layer in self.layers:
            node = layer.value.get("options") if isinstance(layer.value, dict) else None
            options = None if node is None else self.ctx.read(node, "options_json", read_options)
            merged |= options or {}
            if options is not None and isinstance(node, Node) and isinstance(node.value, dict):
                merged |= self.response_limits(node.value)
        merged |= extra
        if not merged:
            return {}
        try:
            return {"options_json": orjson.dumps(merged, option=orjson.OPT_SORT_KEYS).decode()}
        except TypeError:  # orjson.JSONEncodeError, e.g. an integer beyond 64 bits
            self.ctx.problem(self.entry, "options cannot be written as JSON (integers must fit in 64 bits)")
            return {}

    def response_limits(self, options: dict[str, Node]) -> dict[str, int]:
        """The options that cap an upstream answer, as bytes; a bad one is a problem at its line
        (and is left out, so the agent's default applies only if the config is fixed)."""
        limits: dict[str, int] = {}
        for key in RESPONSE_LIMIT_OPTIONS:
            node = options.get(key)
            value = None if node is None else self.ctx.read(node, f"options_json.{key}", read_response_limit)
            if value is not None:
                limits[key] = value
        return limits

    def metadata(self, extra: dict[str, str]) -> dict[str, tuple[tuple[str, str], ...]]:
        node = self.pick("metadata")
        given = None if node is None else self.ctx.read(node, "metadata", read_metadata)
        merged = extra | (given or {})
        entries = tuple(sorted(merged.items()))
        if node is not None and isinstance(node.value, dict):
            for index, (key, _) in enumerate(entries):  # a problem with one key points at its line
                if key in node.value:
                    self.ctx.locate(f"metadata[{index}]", node.value[key])
        return {"metadata": entries} if merged else {}


def _unknown_provider(node: Node) -> str:
    """The provider key is not a built-in one and no `protocol:` says how to call it."""
    key = node.path.rsplit(".", 1)[-1].split("[", 1)[0]
    close = difflib.get_close_matches(key, sorted(_PROVIDERS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown provider {key!r}; {hint}a provider that is not built in must set protocol:"


def _has_any(node: Node, keys: Iterable[str]) -> bool:
    return isinstance(node.value, dict) and any(key in node.value for key in keys)


def _enabled(ctx: Context, layers: tuple[Node, ...]) -> bool:
    """False when any layer says `enabled: false` (an unreadable value counts as true)."""
    for layer in layers:
        node = layer.value.get("enabled") if isinstance(layer.value, dict) else None
        if node is not None and ctx.read(node, "enabled", read_bool) is False:
            return False
    return True


def _read_service(
    ctx: Context,
    category: Category,
    provider: _Provider,
    layers: tuple[Node, ...],
    default_name: str | None,
) -> _Built | None:
    """One service, or None when disabled or unnamed. A disabled service is still read (so
    its typos are reported) but with unset variables allowed, and is not registered."""
    entry = layers[-1]
    if not isinstance(entry.value, dict):
        ctx.problem(entry, f"expected a mapping describing a service, got {shown(entry)}")
        return None
    scope = ctx.child(strict_env=True)
    enabled = scope.strict_env = _enabled(scope, layers)
    spec = _ServiceReader(scope, category, provider, layers).build(default_name)
    if spec is None or not enabled:
        return None
    name_node = entry.value.get("name", entry)
    return _Built(spec, scope, name_node)


def _model_entry(node: Node) -> Node:
    """A model list item; a bare string is shorthand for {name: ...}."""
    if isinstance(node.value, str):
        return Node({"name": node}, node.path, node.line)
    return node


def _read_provider(ctx: Context, key: str, node: Node, category: Category) -> Iterator[_Built]:
    """A provider: a list of models, a mapping with `models:`, or a mapping that is one service."""
    provider = _PROVIDERS.get(key, _NO_PROVIDER)
    if isinstance(node.value, list):
        layers: tuple[Node, ...] = ()
        models: Node | None = node
    elif isinstance(node.value, dict):
        layers, models = (node,), node.value.get("models")
    else:
        ctx.problem(node, f"expected a mapping or a list of models, got {shown(node)}")
        return
    if models is None:
        built = _read_service(ctx, category, provider, layers, key)
        yield from (built,) if built is not None else ()
        return
    yield from _read_models(ctx, provider, layers, models, category)


def _read_models(
    ctx: Context, provider: _Provider, layers: tuple[Node, ...], models: Node, category: Category
) -> Iterator[_Built]:
    if layers:  # the provider mapping's own keys, checked once rather than once per model
        read_members(ctx, layers[0], _PROVIDER_KEYS | _extra_keys(_written_protocol(layers[0], provider)))
    if not isinstance(models.value, list):
        ctx.problem(models, f"expected a list of models, got {shown(models)}")
        return
    for item in models.value:
        built = _read_service(ctx, category, provider, (*layers, _model_entry(item)), None)
        if built is not None:
            yield built


def _written_protocol(node: Node, provider: _Provider) -> str:
    """The protocol a mapping names as plain text, else the provider's (only to pick allowed keys)."""
    written = node.value.get("protocol") if isinstance(node.value, dict) else None
    return written.value if written is not None and isinstance(written.value, str) else provider.protocol


def _register(ctx: Context, registered: dict[str, _Built], built: _Built) -> None:
    """Add a service, refusing a second one with the same name; adopt its locations."""
    name = built.spec.name
    first = registered.get(name)
    if first is not None:
        message = (
            f"duplicate service name {name!r}; first defined at {first.where.path} (line {first.where.line})"
        )
        ctx.problem(built.where, message)
        return
    registered[name] = built
    prefix = f"services[{name}]"
    for path, where in built.ctx.locations.items():
        ctx.locations[join_path(prefix, path)] = where
    ctx.poisoned.update(join_path(prefix, path) for path in built.ctx.poisoned if path)


def read_services(ctx: Context, node: Node | None) -> tuple[ServiceSpec, ...]:
    registered: dict[str, _Built] = {}
    for group, group_node in read_members(ctx, node, tuple(_GROUPS)).items():
        for key, provider_node in read_members(ctx, group_node, None).items():
            for built in _read_provider(ctx, key, provider_node, _GROUPS[group]):
                _register(ctx, registered, built)
    return tuple(registered[name].spec for name in sorted(registered))
