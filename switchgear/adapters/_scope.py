"""Whose data a vector-store call reaches: the scope options Chroma and Pinecone share.

A client key of one Switchgear tenant that may call a vector service must reach only the data
the operator gave that service, and, when the service is scoped per tenant, only its own
tenant's part of it. So the scope (Chroma's tenant and database, Pinecone's index and
namespace) comes from the service's options and the caller's tenant, never from the payload:
a payload may repeat the scope's value (clients that always send it keep working) and is
refused, as the caller's own mistake, when it names another.

Options (validated by each adapter's `parse_options`):
- `<what>_scope`: "service" (default: the service's configured value for every caller) or
  "tenant" (the value is derived from the caller's tenant, `<scope_prefix><tenant>`; a call
  without a tenant — auth off, the operator — uses the configured value).
- `scope_prefix`: what the derived value starts with (default "").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from switchgear.adapters.base import ErrorKind, OptionsError, UpstreamError

SCOPES = ("service", "tenant")
MAX_PREFIX_CHARS = 64


def scope_option(options: Mapping[str, Any], key: str) -> bool:
    """Whether option `key` ("service" or "tenant", default "service") asks for a per-tenant scope."""
    value = options.get(key, "service")
    if value not in SCOPES:
        raise OptionsError(key, f"must be one of {', '.join(SCOPES)}, got {str(value)[:40]!r}")
    return bool(value == "tenant")


def prefix_option(options: Mapping[str, Any], scoped: bool, scope_key: str, pattern: Any = None) -> str:
    """The `scope_prefix` option: a single-line string of at most 64 characters (matching
    `pattern` when given), and only with `<scope_key>: tenant`, where it takes effect."""
    value = options.get("scope_prefix", "")
    if not isinstance(value, str) or len(value) > MAX_PREFIX_CHARS or "\n" in value or "\r" in value \
            or (pattern is not None and value and not pattern.fullmatch(value)):
        rule = f" matching {pattern.pattern}" if pattern is not None else ""
        raise OptionsError("scope_prefix", f"must be a single-line string of at most {MAX_PREFIX_CHARS} "
                                           f"characters{rule}")
    if value and not scoped:
        raise OptionsError("scope_prefix", f"takes effect only with {scope_key}: tenant")
    return value


def bool_option(options: Mapping[str, Any], key: str) -> bool:
    value = options.get(key, False)
    if not isinstance(value, bool):
        raise OptionsError(key, f"must be true or false, got {str(value)[:40]!r}")
    return value


def pinned(payload: dict[str, Any], key: str, effective: str, what: str) -> None:
    """Drop `payload[key]` when it repeats `effective`; refuse it (CLIENT, naming the field)
    when it names anything else. `what` says where the value comes from, for the message."""
    if key not in payload:
        return
    value = payload.pop(key)
    if value != effective:
        raise UpstreamError(
            ErrorKind.CLIENT,
            f"payload.{key}: this service's {key} is {what}; leave it out or repeat it (a call cannot choose another)",
        )
