"""The request path: resolve the service, then run the call through the attempt controller.

Per call: service lookup -> method check -> deadline -> `attempts.AttemptController` (pick
among endpoints the breakers and outlier ejection allow -> admission slot -> adapter attempt
bounded by the remaining deadline -> retry decision, retry budget and backoff -> fallback
chain). A result says whether it was a fallback and what served it (`fallback_source`:
"service", "local_model", "preset_response" or "task_queue").

Terminal fallback steps answered here: a preset response (service metadata
`preset_response`: the exact response body, JSON text recommended; else the config's
`communication.fallback.preset_responses.<category>` text, shaped as the method answers:
dataplane/presets.py) and, for document calls,
QUEUE_FOR_LATER: the call is handed to the task queue through `defer` (the agent passes
`TasksClient.defer`) and the answer is the task's id (`Deferred.fallback_body()`). A task
worker's own call is never deferred again, and without a task client the call fails
UNAVAILABLE with the reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import orjson

from switchgear.adapters.base import Adapter, AdapterRequest, ErrorKind, Target, TokenUsage, UpstreamError
from switchgear.dataplane.afterward import later
from switchgear.dataplane.assemble import streamable, tell_first_token, whole_answer
from switchgear.dataplane.attempts import Attempt, AttemptController, CallFailed, Resilience
from switchgear.dataplane.convert import Call, RequestError, check_overrides
from switchgear.dataplane.deadlines import Deadlines
from switchgear.dataplane.events import AttemptEnd, AttemptObserver, AttemptStart, FirstToken
from switchgear.dataplane.outcome import ServiceNotFound, Unsupported
from switchgear.dataplane.presets import preset_body, preset_chunk
from switchgear.dataplane.quota import QuotaExceeded
from switchgear.dataplane.scheduling.model import candidate_key
from switchgear.dataplane.service_rules import check_request
from switchgear.dataplane.snapshot import AgentSnapshot, EndpointView, ServiceView, TargetView
from switchgear.dataplane.target_limits import TargetLimits
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.wire.attempt_policy import call_timeout
from switchgear.wire.lean import lean


class Picker(Protocol):
    """What the invoker needs of a router (dataplane.router.Router)."""

    def pick(self, service: ServiceView, exclude: Any = (), call: Any = None,
             settings: Any = None) -> EndpointView | None: ...


class Deferred(Protocol):
    def fallback_body(self) -> dict[str, Any]: ...


#: Retry-After of a call the task queue refused for its tenant's task quota (tasks take a while).
DEFER_QUOTA_RETRY_S = 5.0
#: The task queue hook: defer(call, reason) -> Deferred (dataplane.worker.TasksClient.defer).
Defer = Callable[[Call, str], Awaitable[Deferred]]


@lean
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
    fallback: bool = False
    fallback_source: str = ""  # "service", "local_model", "preset_response", "task_queue"
    target: TargetView | None = None  # the route target that served (None: no upstream answered)


class Invoker:
    def __init__(
        self,
        adapters: Mapping[str, Adapter],
        pool: ClientPool,
        secrets: SecretResolver,
        router: Picker,
        clock: Callable[[], float] = time.monotonic,
        observers: Sequence[AttemptObserver] = (),
        resilience: Resilience | None = None,
        defer: Defer | None = None,
        limits: TargetLimits | None = None,
    ) -> None:
        self._adapters = adapters
        self._limits = limits or TargetLimits(clock)
        self._pool = pool
        self._secrets = secrets
        self._router = router
        self._clock = clock
        self._observers = tuple(observers)
        # A success's end: these before the answer is written, the counting ones after it (afterward.py)
        self._at_answer = tuple(o for o in self._observers if not getattr(o, "after_answer", False))
        self._after_answer = tuple(o for o in self._observers if getattr(o, "after_answer", False))
        self.resilience = resilience or Resilience(clock=clock)
        self._defer = defer
        self._deadlines = Deadlines()  # the attempts' time limits

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
            raise RequestError("method",
                               f"{call.method!r} is not served by protocol {service.protocol} (known: {known})")
        check_overrides(call, service, snapshot.settings)
        check_request(service, call.method, call.payload)  # the config's limits, before any upstream
        return service, adapter

    def _serves(self, call: Call) -> Callable[[ServiceView], bool]:
        adapters = self._adapters
        return lambda s: s.protocol in adapters and call.method in adapters[s.protocol].methods

    async def invoke(self, call: Call, snapshot: AgentSnapshot) -> Result:
        service, adapter = self._resolve(call, snapshot)
        if call.method in getattr(adapter, "direct_methods", ()):
            return await self.once(call, snapshot, service, adapter)
        start = self._clock()
        policy = snapshot.settings.category_policies.get(service.category)
        deadline = start + call_timeout(call.timeout_s, service.timeout_s, policy.timeout_s if policy else 0.0,
                                        snapshot.settings.default_timeout_s)
        ctl = self.resilience.controller(self._router.pick, call, service, snapshot, deadline,
                                         serves=self._serves(call), idempotent=idempotent(adapter, call))
        won = await ctl.first_answer(lambda attempt: self._attempt(call, snapshot, attempt, start, ctl))
        if won is not None:
            attempt, result = won
            await ctl.succeeded(attempt)
            return result
        if ctl.terminal is not None:
            return await self._terminal(call, snapshot, ctl, start)
        raise ctl.failure()

    async def once(self, call: Call, snapshot: AgentSnapshot, service: ServiceView, adapter: Adapter) -> Result:
        """A direct method (an adapter's `direct_methods`: a cheap read such as a token count):
        the service's endpoints in their order, skipping those the breakers or outlier ejection
        hold and those whose protocol lacks the method, one try each within the call's deadline,
        the first answer wins. No observer hears it: its latency and outcome would say nothing
        about the service's real calls (routing statistics, adaptive timeouts, breakers, load
        reports), and it costs nothing. A caller's mistake (CLIENT) ends it at once."""
        start = self._clock()
        policy = snapshot.settings.category_policies.get(service.category)
        deadline = start + call_timeout(call.timeout_s, service.timeout_s, policy.timeout_s if policy else 0.0,
                                        snapshot.settings.default_timeout_s)
        failure = UpstreamError(ErrorKind.RETRYABLE,
                                f"service {service.name!r}: no endpoint may serve {call.method} now")
        tried = 0
        for endpoint in service.endpoints:
            effective = service.target(endpoint)
            direct = self._adapters.get(effective.protocol)
            remaining = deadline - self._clock()
            if (direct is None or call.method not in getattr(direct, "direct_methods", ())
                    or self.resilience.gate.unavailable(candidate_key(service.name, endpoint.id))):
                continue
            if remaining <= 0:
                failure = UpstreamError(ErrorKind.TIMEOUT, f"service {service.name!r}: no answer within the deadline")
                break
            tried += 1
            client = self._pool.get(service.name, endpoint.id, endpoint.url, effective.limits)
            try:
                target = Target(base_url=endpoint.url, model=effective.model,  # (a missing secret: CONFIG)
                                api_key=self._secrets.resolve(effective.api_key), options=effective.options)
                async with self._deadlines.within(remaining):
                    response = await direct.invoke(client, target, AdapterRequest(call.method, call.payload,
                                                                                  remaining, call.request_id,
                                                                                  tenant=call.tenant))
            except TimeoutError:
                failure = UpstreamError(ErrorKind.TIMEOUT, f"endpoint {endpoint.id}: no answer within the deadline")
                continue
            except UpstreamError as exc:
                if exc.kind is ErrorKind.CLIENT:
                    raise CallFailed(exc, tried, service.name, endpoint.id) from None
                failure = exc
                continue
            return Result(body=response.body, service=service.name, endpoint=endpoint.id, attempts=tried,
                          latency_s=self._clock() - start, usage=response.usage, cost_usd=0.0,
                          version=snapshot.version, target=effective)
        raise CallFailed(failure, tried, service.name)

    async def _attempt(self, call: Call, snapshot: AgentSnapshot, attempt: Attempt, start: float,
                       ctl: AttemptController) -> Result:
        """One adapter call; raises UpstreamError (a timeout becomes ErrorKind.TIMEOUT). With the
        category policy's `stream_upstream`, a call that can be assembled (assemble.streamable)
        is streamed from the upstream and its first token told to the observers."""
        service, endpoint, number = attempt.service, attempt.endpoint, attempt.number
        effective = service.target(endpoint)  # the route target: its protocol, key, model, prices
        adapter = self._adapters[effective.protocol]
        api_key = self._secrets.resolve(effective.api_key)  # UpstreamError(CONFIG) when missing
        target = Target(base_url=endpoint.url, model=effective.model, api_key=api_key, options=effective.options)
        payload = capped(call.payload, effective.max_tokens) if effective.max_tokens else call.payload
        request = AdapterRequest(call.method, payload, attempt.remaining_s, call.request_id, tenant=call.tenant)
        client = self._pool.get(service.name, endpoint.id, endpoint.url, effective.limits)
        if effective.rpm_limit or effective.tpm_limit:  # UpstreamError(RATE_LIMITED) when used up
            self._limits.admit(service.name, endpoint.id, effective)
        policy = snapshot.settings.category_policies.get(service.category)
        streamed = (policy is not None and policy.stream_upstream
                    and streamable(effective.protocol, call.method, payload) and hasattr(adapter, "stream"))
        self._started(AttemptStart(call.request_id, service.name, service.category, endpoint.id, number, call.priority,
                                   streamed=streamed))
        attempt_start = self._clock()
        first = _FirstToken()
        try:
            async with self._deadlines.within(attempt.remaining_s):  # (one timer shared by all calls)
                if streamed:
                    response = await self._whole_from_stream(adapter, client, target, request, ctl, attempt, first,
                                                             openai=effective.protocol == "openai",
                                                             limit=effective.limits.max_decoded_bytes)
                else:
                    response = await adapter.invoke(client, target, request)
        except TimeoutError:
            within = f"its attempt timeout ({attempt.remaining_s:.3g} s)" if attempt.capped else "the deadline"
            error = UpstreamError(ErrorKind.TIMEOUT, f"endpoint {endpoint.id}: no answer within {within}")
            callers = ctl.callers_timeout(service, error.kind)  # the caller's own deadline: no outcome
            self._ended(AttemptEnd(call.request_id, service.name, service.category, endpoint.id, number,
                                   self._clock() - attempt_start, None if callers else error.kind, cancelled=callers,
                                   ttft_s=first.s, unary=streamed))
            raise error from None
        except UpstreamError as exc:
            callers = ctl.callers_timeout(service, exc.kind)
            self._ended(AttemptEnd(call.request_id, service.name, service.category, endpoint.id, number,
                                   self._clock() - attempt_start, None if callers else exc.kind, cancelled=callers,
                                   ttft_s=first.s, unary=streamed))
            raise
        except asyncio.CancelledError:  # a hedge that lost, or the caller went away: no outcome
            self._ended(AttemptEnd(call.request_id, service.name, service.category, endpoint.id, number,
                                   self._clock() - attempt_start, cancelled=True, ttft_s=first.s, unary=streamed))
            raise
        usage = response.usage
        cost = effective.pricing.charge(usage)
        if effective.tpm_limit:
            self._limits.used(service.name, endpoint.id, usage.input_tokens + usage.output_tokens)
        now = self._clock()
        self._answered(AttemptEnd(call.request_id, service.name, service.category, endpoint.id, number,
                                  now - attempt_start, None, usage, cost, answer=response.body,
                                  ttft_s=first.s, unary=streamed))
        return Result(
            body=response.body,
            service=service.name,
            endpoint=endpoint.id,
            attempts=number,
            latency_s=now - start,
            usage=usage,
            cost_usd=cost,
            version=snapshot.version,
            fallback=attempt.fallback,
            fallback_source=attempt.source,
            target=effective,
        )

    async def _whole_from_stream(self, adapter: Any, client: Any, target: Target, request: AdapterRequest,
                                 ctl: AttemptController, attempt: Attempt, first: _FirstToken, *,
                                 openai: bool, limit: int) -> Any:
        """The whole answer of one attempt read as a stream (dataplane/assemble.py): its first
        token within the stream attempt timeout, told to the observers, then no stall longer
        than the stream path's; the assembled answer at most `limit` bytes, as a unary one."""
        call_id, name, endpoint, number = request.request_id, attempt.service.name, attempt.endpoint.id, attempt.number

        wait = self.resilience.waits.waiting(candidate_key(name, endpoint), endpoint)  # (abandon.py)

        def on_first(seconds: float) -> None:
            first.s = seconds
            wait.answered()
            tell_first_token(self._observers, FirstToken(call_id, name, endpoint, number, seconds))

        first_s = ctl.first_token_s(attempt)
        try:
            async with wait:
                return await whole_answer(adapter.stream(client, target, request), openai=openai, limit=limit,
                                          first_s=first_s, gap_s=ctl.stream_gap_s(attempt), clock=self._clock,
                                          on_first=on_first, endpoint=endpoint, within=self._deadlines.within)
        except UpstreamError as exc:
            if exc.kind is ErrorKind.TIMEOUT and first.s is None and (wait.abandoned or first_s < attempt.remaining_s):
                attempt.capped = True  # its first-token timeout (or judged silent): an attempt timeout, counted as one
            raise

    async def _terminal(self, call: Call, snapshot: AgentSnapshot, ctl: AttemptController, start: float) -> Result:
        """Answer a PRESET or QUEUE_FOR_LATER step of the fallback plan. A task worker's call
        gets neither: a canned answer must not become a task's result, and the task retries."""
        step = ctl.terminal
        assert step is not None
        if call.from_task:
            raise ctl.failure()
        if ctl.fallback_source == "preset_response":
            body = terminal_body(call, snapshot, step.body, step.shaped, stream=False)
        else:
            body = await deferred_body(self._defer, call, ctl, self._clock)
        return Result(body=body, service=call.service, endpoint="", attempts=ctl.attempts,
                      latency_s=self._clock() - start, usage=TokenUsage(), cost_usd=0.0, version=snapshot.version,
                      fallback=True, fallback_source=ctl.fallback_source)

    def _started(self, event: AttemptStart) -> None:
        for observer in self._observers:
            observer.attempt_started(event)

    def _ended(self, event: AttemptEnd) -> None:
        for observer in self._observers:
            observer.attempt_ended(event)

    def _answered(self, event: AttemptEnd) -> None:
        for observer in self._at_answer:
            observer.attempt_ended(event)
        for observer in self._after_answer:
            later(observer.attempt_ended, event)


class _FirstToken:
    """When an attempt streamed from its upstream sent its first token (s after its start)."""

    __slots__ = ("s",)

    def __init__(self) -> None:
        self.s: float | None = None


_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens")


def capped(payload: Mapping[str, Any], max_tokens: int) -> Mapping[str, Any]:
    """The payload with an output-token ask above the target's `max_tokens` lowered to it (a
    copy; the payload itself when nothing is above), so a route's targets with smaller limits
    answer a call rather than refuse it (the answer says finish_reason "length")."""
    over = [key for key in _OUTPUT_LIMITS
            if isinstance(payload.get(key), int) and not isinstance(payload.get(key), bool)
            and payload[key] > max_tokens]
    if not over:
        return payload
    return {**payload, **dict.fromkeys(over, max_tokens)}


def terminal_body(call: Call, snapshot: AgentSnapshot, body: str, shaped: bool, stream: bool) -> bytes:
    """A PRESET step's answer: the service's exact body, or the config's text shaped as the
    call's method answers (dataplane/presets.py); `stream`: as its one stream chunk."""
    if not shaped:
        return body.encode()
    service = snapshot.services.get(call.service)
    model = service.model if service is not None else ""
    shape = preset_chunk if stream else preset_body
    return shape(call.method, body, model, call.request_id, int(time.time()))


async def deferred_body(defer: Defer | None, call: Call, ctl: AttemptController,
                        clock: Callable[[], float]) -> bytes:
    """Hand the call to the task queue; the answer names the task. Raises CallFailed
    (UNAVAILABLE, keeping a CONNECT kind) when it cannot be queued, saying why, and
    QuotaExceeded (429 to this tenant only) when the tenant holds its task quota."""
    error = ctl.last_error
    why = f"{error.kind.value}: {error.message}"
    if defer is None:
        raise _unavailable(ctl, f"{error.message}; not queued for later: no task queue is configured")
    try:
        async with asyncio.timeout(max(0.5, ctl.deadline - clock())):
            deferred = await defer(call, why)
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:  # the tenant's task quota: its own to wait out
            raise QuotaExceeded(f"not queued for later: {exc.details()}", DEFER_QUOTA_RETRY_S) from None
        raise _unavailable(ctl, f"{error.message}; queueing for later failed: {exc.details()}") from None
    except (grpc.RpcError, TimeoutError) as exc:
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else "the task queue did not answer in time"
        raise _unavailable(ctl, f"{error.message}; queueing for later failed: {detail}") from None
    return orjson.dumps(deferred.fallback_body())


def idempotent(adapter: Any, call: Call) -> bool:
    """Whether repeating the call is harmless (it may be hedged): the adapter's own
    `idempotent(method, payload)`; an adapter that does not say is taken as not idempotent."""
    check = getattr(adapter, "idempotent", None)
    return bool(check(call.method, call.payload)) if check is not None else False


def _unavailable(ctl: AttemptController, message: str) -> CallFailed:
    error = ctl.last_error
    kind = error.kind if error.kind in (ErrorKind.CONNECT, ErrorKind.RETRYABLE) else ErrorKind.RETRYABLE
    return ctl.failure_as(UpstreamError(kind, message, status=error.status))


__all__ = ["CallFailed", "Defer", "Invoker", "Result", "ServiceNotFound", "Unsupported"]
