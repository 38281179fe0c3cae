"""How a call that gets no answer is refused: one mapping for both front doors. Pure.

Every failure a front door can meet becomes one frozen `Refusal`; the gRPC Gateway renders it
as a status code and trailers, the HTTP front door as OpenAI's error JSON and headers. Neither
door decides a status of its own, so the same failure reads the same through either door.

| failure                              | gRPC status          | HTTP | OpenAI type / code                          |
| ------------------------------------ | -------------------- | ---- | ------------------------------------------- |
| Unauthenticated                      | UNAUTHENTICATED      | 401  | invalid_request_error / invalid_api_key     |
| PermissionDenied                     | PERMISSION_DENIED    | 403  | invalid_request_error / permission_denied   |
| RequestError (names the field)       | INVALID_ARGUMENT     | 400  | invalid_request_error / invalid_value       |
| ServiceNotFound                      | NOT_FOUND            | 404  | invalid_request_error / model_not_found     |
| NoTargetFits (capabilities)          | FAILED_PRECONDITION  | 400  | invalid_request_error / capability_not_offered |
| NoTargetFits (context window)        | FAILED_PRECONDITION  | 400  | invalid_request_error / context_length_exceeded |
| Unsupported                          | UNIMPLEMENTED        | 501  | server_error / unsupported                  |
| QuotaExceeded                        | RESOURCE_EXHAUSTED   | 429  | requests / rate_limit_exceeded              |
| TenantBusy (tenant's in-flight cap)  | RESOURCE_EXHAUSTED   | 429  | requests / tenant_in_flight_limit           |
| Shed (queue full / wait ran out)     | RESOURCE_EXHAUSTED   | 429  | rate_limit_error / overloaded               |
| Shed (deadline passed while queued)  | DEADLINE_EXCEEDED    | 504  | timeout_error / queue_timeout               |
| CallFailed, by the upstream's kind   | `BY_KIND` below      |      |                                             |

Refusals that say when to come back carry `retry_after_s`; both doors send it as whole
seconds, at least 1 (`retry-after` trailer / `Retry-After` header). `details` are named
values a door adds as metadata (`switchgear-<name>` trailers, `x-switchgear-<name>` headers).

Public messages name the service, the endpoint id and the failure's kind, never where the
upstream lives: `public_text` removes URLs, host:port pairs, addresses and paths from upstream
text (adapters already remove the key they sent).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from switchgear.adapters.base import ErrorKind, UpstreamError
from switchgear.dataplane.attempts import CallFailed
from switchgear.dataplane.convert import NoTargetFits, RequestError
from switchgear.dataplane.governance import PermissionDenied, TenantBusy, Unauthenticated
from switchgear.dataplane.quota import QuotaExceeded
from switchgear.dataplane.resilience.admission import ShedReason
from switchgear.dataplane.resilience.admission_edge import Shed


class ServiceNotFound(LookupError):
    """The call names no service in the snapshot."""


class Unsupported(RuntimeError):
    """The service exists but this agent cannot serve it (its protocol is unknown here)."""


@dataclass(frozen=True)
class Refusal:
    """One refused call, as both doors render it. `grpc_status` is a `grpc.StatusCode` name
    (this module imports no grpc); `message` is safe to show the caller."""

    kind: str
    grpc_status: str
    http_status: int
    message: str
    error_type: str
    code: str | None = None
    param: str | None = None
    retry_after_s: float | None = None
    details: tuple[tuple[str, str], ...] = ()

    @property
    def retry_after(self) -> str | None:
        """`retry_after_s` as the header value: whole seconds, at least 1."""
        return None if self.retry_after_s is None else str(max(1, math.ceil(self.retry_after_s)))


@dataclass(frozen=True)
class _ByKind:
    grpc_status: str
    http_status: int
    error_type: str
    code: str


#: How a final upstream failure surfaces, by the adapter's classification.
BY_KIND: Mapping[ErrorKind, _ByKind] = MappingProxyType({
    ErrorKind.RATE_LIMITED: _ByKind("RESOURCE_EXHAUSTED", 429, "rate_limit_error", "rate_limit_exceeded"),
    ErrorKind.RETRYABLE: _ByKind("UNAVAILABLE", 503, "server_error", "upstream_unavailable"),
    ErrorKind.CONNECT: _ByKind("UNAVAILABLE", 503, "server_error", "upstream_unavailable"),
    ErrorKind.TIMEOUT: _ByKind("DEADLINE_EXCEEDED", 504, "timeout_error", "upstream_timeout"),
    ErrorKind.CLIENT: _ByKind("INVALID_ARGUMENT", 400, "invalid_request_error", "upstream_rejected"),
    ErrorKind.CONTEXT_LENGTH: _ByKind("INVALID_ARGUMENT", 400, "invalid_request_error", "context_length_exceeded"),
    ErrorKind.AUTH: _ByKind("FAILED_PRECONDITION", 502, "upstream_auth_error", "upstream_auth_failed"),
    ErrorKind.CONFIG: _ByKind("FAILED_PRECONDITION", 500, "server_error", "agent_misconfigured"),
})

#: Failures a door refuses before any answer (the `except` clause of both doors).
REFUSED: tuple[type[Exception], ...] = (
    Unauthenticated, PermissionDenied, RequestError, ServiceNotFound, Unsupported, QuotaExceeded, TenantBusy, Shed,
    CallFailed, NoTargetFits,
)

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>)]*")
_SOCKET = re.compile(r"\(\s*'[^']*'\s*,\s*\d+[^)]*\)")  # ('127.0.0.1', 8080) in OS errors
_HOST_PORT = re.compile(r"(?:\[[0-9a-fA-F:]+\]|(?=[\w.-]*[A-Za-z.])[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*):\d{2,5}\b")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_PATH = re.compile(r"(?<![\w.])/[\w.~%-]+(?:/[\w.~%-]*)*")


def public_text(text: str) -> str:
    """Upstream text with every URL, host:port, IP address and absolute path replaced by
    `<upstream>`, so a caller learns what went wrong but not where the upstream lives."""
    for pattern in (_URL, _SOCKET, _HOST_PORT, _IPV4, _PATH):
        text = pattern.sub("<upstream>", text)
    return text


def refusal(exc: Exception) -> Refusal:
    """The refusal for any exception in `REFUSED`. Raises TypeError for anything else."""
    if isinstance(exc, CallFailed):
        return failed(exc.error, exc.attempts, exc.service, exc.endpoint)
    if isinstance(exc, Shed):
        return _shed(exc)
    if isinstance(exc, QuotaExceeded):
        return Refusal("quota", "RESOURCE_EXHAUSTED", 429, f"quota: {exc.reason}", "requests",
                       "rate_limit_exceeded", retry_after_s=exc.retry_after_s)
    if isinstance(exc, TenantBusy):
        return Refusal("tenant_in_flight", "RESOURCE_EXHAUSTED", 429, str(exc), "requests",
                       "tenant_in_flight_limit", retry_after_s=1.0)
    if isinstance(exc, RequestError):
        return Refusal("invalid_request", "INVALID_ARGUMENT", 400, str(exc), "invalid_request_error",
                       "invalid_value", param=exc.path)
    if isinstance(exc, Unauthenticated):
        return Refusal("unauthenticated", "UNAUTHENTICATED", 401, str(exc), "invalid_request_error",
                       "invalid_api_key")
    if isinstance(exc, PermissionDenied):
        return Refusal("permission_denied", "PERMISSION_DENIED", 403, str(exc), "invalid_request_error",
                       "permission_denied", param="model" if exc.path == "service" else exc.path)
    if isinstance(exc, ServiceNotFound):
        return Refusal("not_found", "NOT_FOUND", 404, str(exc), "invalid_request_error", "model_not_found",
                       param="model")
    if isinstance(exc, Unsupported):
        return Refusal("unsupported", "UNIMPLEMENTED", 501, str(exc), "server_error", "unsupported")
    if isinstance(exc, NoTargetFits):
        return _unfit(exc)
    raise TypeError(f"not a refusal: {type(exc).__name__}")


def failed(error: UpstreamError, attempts: int, service: str = "", endpoint: str = "",
           *, interrupted: bool = False) -> Refusal:
    """A call whose attempts all failed (or, `interrupted`, a stream that failed after its
    first token). An upstream 4xx the adapter classed CLIENT keeps its own status (404, 413,
    422, ...) over HTTP."""
    by = BY_KIND[error.kind]
    status = by.http_status
    if error.kind is ErrorKind.CLIENT and error.status is not None and 400 <= error.status < 500:
        status = error.status
    where = " ".join(part for part in (f"service {service}" if service else "",
                                       f"endpoint {endpoint}" if endpoint else "") if part)
    prefix = "stream interrupted after the first token (no failover possible): " if interrupted else ""
    message = f"{prefix}{where + ': ' if where else ''}{error.kind.value} after {attempts} attempt(s): " \
              f"{public_text(error.message)}"
    details = [("attempts", str(attempts)), ("error-kind", error.kind.value)]
    if error.status is not None:
        details.append(("upstream-status", str(error.status)))
    if endpoint:
        details.append(("endpoint", endpoint))
    return Refusal(f"upstream_{error.kind.value}", by.grpc_status, status, message, by.error_type, by.code,
                   param="messages" if error.kind is ErrorKind.CONTEXT_LENGTH else _payload_field(error),
                   retry_after_s=error.retry_after_s, details=tuple(details))


_PAYLOAD_FIELD = re.compile(r"(payload(?:\.[A-Za-z0-9_]+)*): ")


def _payload_field(error: UpstreamError) -> str | None:
    """The payload field an adapter's own refusal names ("payload.namespace: ..."), for the
    HTTP error's `param`; None for anything else (an upstream's 4xx is the upstream's word)."""
    if error.kind is not ErrorKind.CLIENT or error.status is not None:
        return None
    found = _PAYLOAD_FIELD.match(error.message)
    return found.group(1) if found else None


def _unfit(exc: NoTargetFits) -> Refusal:
    """The caller's requirement no target meets: FAILED_PRECONDITION (the same call can succeed
    once the registry offers such a target; retrying as is cannot), HTTP 400."""
    if exc.missing:
        return Refusal("not_offered", "FAILED_PRECONDITION", 400, str(exc), "invalid_request_error",
                       "capability_not_offered", param="required_capabilities",
                       details=(("missing-capabilities", ",".join(exc.missing)),))
    return Refusal("context_too_long", "FAILED_PRECONDITION", 400, str(exc), "invalid_request_error",
                   "context_length_exceeded", param="messages")


def _shed(shed: Shed) -> Refusal:
    details = (("shed", shed.reason.value),)
    if shed.reason is ShedReason.DEADLINE:
        return Refusal("shed", "DEADLINE_EXCEEDED", 504, f"deadline passed while queued for admission: {shed}",
                       "timeout_error", "queue_timeout", retry_after_s=shed.retry_after_s, details=details)
    return Refusal("shed", "RESOURCE_EXHAUSTED", 429, f"overloaded, request shed: {shed}", "rate_limit_error",
                   "overloaded", retry_after_s=shed.retry_after_s, details=details)
