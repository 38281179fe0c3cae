"""The request path: resolve the service, pick an endpoint, call its adapter, fail over.

Per call: service lookup -> method check -> deadline -> pick (the policy's strategy over endpoints
not yet tried) -> adapter attempt bounded by the remaining deadline -> on a retryable failure,
the next untried endpoint, at most `retry.max_retries` times. A non-retryable failure ends the
call at once. (Backoff, retry budgets, breakers and fallbacks come with the resilience issue.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from switchgear.adapters.base import Adapter, AdapterRequest, ErrorKind, Target, TokenUsage, UpstreamError
from switchgear.dataplane.convert import Call, RequestError
from switchgear.dataplane.events import AttemptEnd, AttemptObserver, AttemptStart
from switchgear.dataplane.router import Router
from switchgear.dataplane.snapshot import AgentSnapshot, ServiceView
from switchgear.dataplane.upstreams import ClientPool, SecretResolver


class ServiceNotFound(LookupError):
    pass


class Unsupported(RuntimeError):
    pass


class CallFailed(RuntimeError):
    """Every attempt failed; `error` is the last upstream failure."""

    def __init__(self, error: UpstreamError, attempts: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.attempts = attempts


@dataclass(frozen=True)
class Result:
    body: bytes
    service: str
    endpoint: str
    attempts: int
    latency_s: float
    usage: TokenUsage
    cost_usd: float
    version: str


class Invoker:
    def __init__(
        self,
        adapters: Mapping[str, Adapter],
        pool: ClientPool,
        secrets: SecretResolver,
        router: Router,
        clock: Callable[[], float] = time.monotonic,
        observers: Sequence[AttemptObserver] = (),
    ) -> None:
        self._adapters = adapters
        self._pool = pool
        self._secrets = secrets
        self._router = router
        self._clock = clock
        self._observers = tuple(observers)

    def _resolve(self, call: Call, snapshot: AgentSnapshot) -> tuple[ServiceView, Adapter]:
        service = snapshot.services.get(call.service)
        if service is None:
            raise ServiceNotFound(f"service: no service named {call.service!r}")
        if call.category and call.category != service.category:
            raise RequestError("category", f"service {service.name!r} is {service.category}, not {call.category}")
        if service.unsupported:
            raise Unsupported(f"service {service.name!r}: {service.unsupported}")
        adapter = self._adapters[service.protocol]
        if call.method not in adapter.methods:
            known = ", ".join(sorted(adapter.methods))
            raise RequestError("method", f"{call.method!r} is not served by protocol {service.protocol} (known: {known})")
        return service, adapter

    async def invoke(self, call: Call, snapshot: AgentSnapshot) -> Result:
        service, adapter = self._resolve(call, snapshot)
        start = self._clock()
        deadline = start + (call.timeout_s or service.timeout_s or snapshot.settings.default_timeout_s)
        max_attempts = 1 + snapshot.settings.retry.max_retries
        try:
            api_key = self._secrets.resolve(service.api_key)
        except UpstreamError as exc:
            raise CallFailed(exc, 0) from None
        tried: list[str] = []
        last: UpstreamError | None = None
        while len(tried) < max_attempts:
            endpoint = self._router.pick(service, exclude=tried, call=call, settings=snapshot.settings)
            remaining = deadline - self._clock()
            if endpoint is None or remaining <= 0:
                break
            tried.append(endpoint.id)
            target = Target(base_url=endpoint.url, model=service.model, api_key=api_key, options=service.options)
            request = AdapterRequest(call.method, call.payload, remaining, call.request_id)
            client = self._pool.get(service.name, endpoint.id, endpoint.url)
            self._started(AttemptStart(call.request_id, service.name, service.category, endpoint.id, len(tried), call.priority))
            attempt_start = self._clock()
            try:
                async with asyncio.timeout(remaining):
                    response = await adapter.invoke(client, target, request)
            except TimeoutError:
                last = UpstreamError(ErrorKind.TIMEOUT, f"endpoint {endpoint.id}: no answer within the deadline")
            except UpstreamError as exc:
                last = exc
            else:
                usage = response.usage
                cost = service.pricing.cost(usage.input_tokens, usage.output_tokens)
                now = self._clock()
                self._ended(AttemptEnd(call.request_id, service.name, service.category, endpoint.id, len(tried),
                                       now - attempt_start, None, usage, cost))
                return Result(
                    body=response.body,
                    service=service.name,
                    endpoint=endpoint.id,
                    attempts=len(tried),
                    latency_s=now - start,
                    usage=usage,
                    cost_usd=cost,
                    version=snapshot.version,
                )
            self._ended(AttemptEnd(call.request_id, service.name, service.category, endpoint.id, len(tried),
                                   self._clock() - attempt_start, last.kind))
            if not last.kind.retryable:
                raise CallFailed(last, len(tried))
        if last is None:
            last = UpstreamError(ErrorKind.TIMEOUT, "deadline exceeded before any attempt")
        raise CallFailed(last, len(tried))

    def _started(self, event: AttemptStart) -> None:
        for observer in self._observers:
            observer.attempt_started(event)

    def _ended(self, event: AttemptEnd) -> None:
        for observer in self._observers:
            observer.attempt_ended(event)
