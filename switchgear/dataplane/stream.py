"""Streamed calls (LLM tokens): the request path of InvokeStream and the HTTP front door's SSE.

Same steps as `invoke.Invoker` — resolve the service, pick an endpoint not yet tried, one
adapter attempt bounded by the remaining deadline, observers told of every attempt — with
one rule of its own: an attempt's chunks are held back until its first *content* chunk (the
first token). A failure before it fails over to the next endpoint and nothing of the failed
attempt reaches the caller; once the first token is out the stream is committed to that
endpoint, and a later failure ends the stream with `StreamEnd.error` set (no failover).

Endpoints are chosen by the same per-call attempt controller as Invoker
(`attempts.AttemptController`: breakers, outlier ejection, admission slots, retry decision,
budget and backoff, then the fallback chain's services), sharing the agent's `Resilience`.
The admission slot is held until the stream ends. A chain that ends in a preset or the task
queue streams that answer as one chunk (a preset shaped as the method's chunk:
dataplane/presets.py; the queued task's answer as is) and a StreamEnd marked as the fallback;
a task worker's own call gets neither. The time to first token is reported to observers as
`AttemptEnd.ttft_s`.

A `Meter` passed to `stream` records what went out, so the call can be charged whether or not
the caller reads to the end (`Pipeline.stream` charges it in a `finally`). A stream the caller
abandons also ends its attempt for the observers (no error: the endpoint did its part), with
the metered usage, so load reports count its tokens and its in-flight slot.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from switchgear.adapters.base import AdapterRequest, ErrorKind, StreamChunk, Target, TokenUsage, UpstreamError
from switchgear.dataplane.abandon import NO_WAIT
from switchgear.dataplane.assemble import tell_first_token
from switchgear.dataplane.attempts import Attempt, Resilience, deadline_passed
from switchgear.dataplane.convert import Call, RequestError, check_overrides
from switchgear.dataplane.events import AttemptEnd, AttemptObserver, AttemptStart, FirstToken
from switchgear.dataplane.invoke import (
    Defer,
    ServiceNotFound,
    Unsupported,
    capped,
    deferred_body,
    idempotent,
    terminal_body,
)
from switchgear.dataplane.scheduling.model import candidate_key
from switchgear.dataplane.service_rules import check_request
from switchgear.dataplane.snapshot import AgentSnapshot, EndpointView, ServiceView, TargetView
from switchgear.dataplane.target_limits import TargetLimits
from switchgear.dataplane.upstreams import ClientPool, SecretResolver
from switchgear.wire.attempt_policy import call_timeout

#: The agent's endpoint pick, called as pick(service, exclude=tried, call=call, settings=settings)
#: (dataplane.router.Router.pick).
Pick = Callable[..., EndpointView | None]


@dataclass(frozen=True)
class StreamEnd:
    """The last item of a stream. `error` is set only for a failure after the first token
    (earlier failures fail over, or raise CallFailed when every attempt failed)."""

    service: str
    endpoint: str
    attempts: int
    latency_s: float
    ttft_s: float
    usage: TokenUsage
    cost_usd: float
    failover: bool
    version: str
    finish_reason: str = ""
    error: UpstreamError | None = None
    fallback: bool = False
    fallback_source: str = ""  # "service", "local_model", "preset_response", "task_queue" (see invoke.Result)
    target: TargetView | None = None  # the route target that served


class FallbackChunk(bytes):
    """A stream's one chunk when a preset or the task queue answered: the HTTP door names
    `source` in its `x-switchgear-fallback` header, which goes out before the first chunk."""

    source: str = ""


def fallback_chunk(data: bytes, source: str) -> FallbackChunk:
    chunk = FallbackChunk(data)
    chunk.source = source
    return chunk


StreamItem = bytes | StreamEnd
_NO_USAGE = TokenUsage()
CHARS_PER_TOKEN = 4  # as the OpenAI adapter estimates when an upstream reports no usage


def _text_chars(value: Any) -> int:
    """Characters of text: a string, the strings of a list (prompts, inputs, parts), and a
    message's `content` or a part's `text`. (Depth is bounded: front doors refuse deep JSON.)"""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    if isinstance(value, dict):
        return _text_chars(value.get("content")) + _text_chars(value.get("text"))
    return 0


def prompt_chars(payload: Mapping[str, Any]) -> int:
    """Text characters of a call's prompt (`messages`, `prompt` or `input`)."""
    return sum(_text_chars(payload.get(key)) for key in ("messages", "prompt", "input"))


@dataclass
class Meter:
    """What a stream sent its caller: what to charge whether or not the caller reads to the end.

    A stream that ended is charged its `StreamEnd` usage (the upstream's report, or the
    adapter's estimate; for one the upstream broke after its first token, this same estimate of
    what was forwarded). A stream cut short is charged for what was forwarded: the upstream's
    usage if it already reported one, else an estimate (`estimated=True`) of one token per
    CHARS_PER_TOKEN characters, rounded up, over the prompt's text (the upstream read it all)
    and the text of the content chunks passed on. Nothing is charged when nothing was sent."""

    service: ServiceView | None = None  # set once an attempt committed (its first token went out)
    endpoint: EndpointView | None = None  # and the endpoint (route target) it committed to
    prompt_chars: int = 0
    sent_chars: int = 0
    searches: int = 0  # web searches the provider ran so far (StreamChunk.searches): billed once run
    reported: TokenUsage | None = None
    end: StreamEnd | None = None

    def committed(self) -> tuple[str, TargetView] | None:
        """(endpoint id, route target) the stream committed to; None before it did."""
        if self.service is None or self.endpoint is None:
            return None
        return self.endpoint.id, self.service.target(self.endpoint)

    def usage(self) -> TokenUsage:
        if self.end is not None:
            return self.end.usage
        if self.reported is not None:
            if self.reported.web_search_requests < self.searches:
                return replace(self.reported, web_search_requests=self.searches)
            return self.reported
        if self.service is None:
            return _NO_USAGE
        return TokenUsage(math.ceil(self.prompt_chars / CHARS_PER_TOKEN), math.ceil(self.sent_chars / CHARS_PER_TOKEN),
                          estimated=True, web_search_requests=self.searches)

    def charge(self) -> tuple[TokenUsage, float]:
        """(usage, cost in USD) to count against the caller's quotas."""
        if self.end is not None:
            return self.end.usage, self.end.cost_usd
        usage = self.usage()
        if self.service is None:
            return usage, 0.0
        pricing = self.service.target(self.endpoint).pricing if self.endpoint else self.service.pricing
        cost = pricing.charge(usage)
        return usage, cost


class Streamer:
    """Runs streamed calls. Shares the agent's adapters, client pool, secrets and observers."""

    def __init__(
        self,
        adapters: Mapping[str, Any],
        pool: ClientPool,
        secrets: SecretResolver,
        pick: Pick,
        clock: Callable[[], float] = time.monotonic,
        observers: Sequence[AttemptObserver] = (),
        resilience: Resilience | None = None,
        limits: TargetLimits | None = None,
        defer: Defer | None = None,
    ) -> None:
        self._adapters = adapters
        self._limits = limits or TargetLimits(clock)
        self._pool = pool
        self._secrets = secrets
        self._pick = pick
        self._defer = defer  # the task queue, for a chain that ends in QUEUE_FOR_LATER
        self._clock = clock
        self._observers = observers  # the agent's list, read at each event (subscribers may come later)
        self.resilience = resilience or Resilience(clock=clock)

    def _serves(self, call: Call) -> Callable[[ServiceView], bool]:
        adapters = self._adapters
        return lambda s: s.protocol in adapters and call.method in getattr(adapters[s.protocol], "stream_methods", ())

    def resolve(self, call: Call, snapshot: AgentSnapshot) -> tuple[ServiceView, Any]:
        """The service and its streaming adapter; raises like Invoker (plus RequestError for a
        method that cannot stream)."""
        service = snapshot.services.get(call.service)
        if service is None:
            raise ServiceNotFound(f"service: no service named {call.service!r}")
        if call.category and call.category != service.category:
            raise RequestError("category", f"service {service.name!r} is {service.category}, not {call.category}")
        if service.unsupported:
            raise Unsupported(f"service {service.name!r}: {service.unsupported}")
        adapter = self._adapters[service.protocol]
        streams: frozenset[str] = getattr(adapter, "stream_methods", frozenset())
        if call.method not in streams:
            known = ", ".join(sorted(streams)) or "none"
            raise RequestError(
                "method", f"{call.method!r} cannot stream on protocol {service.protocol} (streaming: {known})"
            )
        check_overrides(call, service, snapshot.settings)
        check_request(service, call.method, call.payload)  # the config's limits, before any upstream
        return service, adapter

    async def stream(self, call: Call, snapshot: AgentSnapshot,
                     meter: Meter | None = None) -> AsyncGenerator[StreamItem, None]:
        """Yield chunk bytes, then one StreamEnd. Raises (before anything is yielded) ServiceNotFound,
        RequestError, Unsupported, or CallFailed when no attempt reached its first token.
        `meter` (module docstring) learns what goes out."""
        meter = meter if meter is not None else Meter()
        service, adapter = self.resolve(call, snapshot)
        start = self._clock()
        policy = snapshot.settings.category_policies.get(service.category)
        deadline = start + call_timeout(call.timeout_s, service.timeout_s, policy.timeout_s if policy else 0.0,
                                        snapshot.settings.default_timeout_s)
        ctl = self.resilience.controller(self._pick, call, service, snapshot, deadline, serves=self._serves(call),
                                         idempotent=idempotent(adapter, call), stream=True)
        won = await ctl.first_answer(
            lambda lease: self._until_first_token(call, lease, deadline, ctl.stream_gap_s(lease),
                                                  ctl.callers_deadline(lease.service)), _discard)
        if won is not None:
            lease, (chunks, attempt, held) = won
            error: UpstreamError | None = None
            finished = False
            meter.service, meter.endpoint = lease.service, lease.endpoint
            meter.prompt_chars = prompt_chars(call.payload)
            attempt.meter = meter
            if attempt.final is not None:  # usage reported before the first token
                meter.reported = attempt.final.usage
            rest = attempt.rest(chunks, start, failover=lease.number > 1, version=snapshot.version, source=lease.source)
            try:
                meter.sent_chars += attempt.held_chars
                meter.searches = max(meter.searches, attempt.held_searches)
                for data in held:
                    yield data
                async for item in rest:
                    if isinstance(item, StreamEnd):
                        error, finished = item.error, True
                        meter.end = item
                    yield item
            finally:  # also when the caller goes away mid-stream: release the upstream connection
                await rest.aclose()
                await _close(chunks)
                if finished:
                    await ctl.finish(lease, error)  # committed: no retry after the first token
                else:
                    attempt.abandoned()
                    await ctl.abandon(lease)
            return
        if ctl.terminal is not None and not call.from_task:
            step = ctl.terminal
            if ctl.fallback_source == "preset_response":
                data = terminal_body(call, snapshot, step.body, step.shaped, stream=True)
            else:
                data = await deferred_body(self._defer, call, ctl, self._clock)
            yield fallback_chunk(data, ctl.fallback_source)
            yield StreamEnd(service=call.service, endpoint="", attempts=ctl.attempts, latency_s=self._clock() - start,
                            ttft_s=0.0, usage=_NO_USAGE, cost_usd=0.0, failover=ctl.attempts > 0,
                            version=snapshot.version, finish_reason="stop", fallback=True,
                            fallback_source=ctl.fallback_source)
            return
        raise ctl.failure()

    async def _until_first_token(
        self, call: Call, lease: Attempt, deadline: float, gap_s: float, callers_deadline: bool = False
    ) -> tuple[AsyncIterator[StreamChunk], _Attempt, list[bytes]]:
        """Start the attempt and read up to its first token (within `lease.remaining_s`, its
        attempt timeout); raises UpstreamError before it. Later chunks may be `gap_s` apart."""
        service, endpoint = lease.service, lease.endpoint
        effective = service.target(endpoint)  # the route target: its protocol, key, model, prices
        api_key = self._secrets.resolve(effective.api_key)  # UpstreamError(CONFIG) when missing
        if effective.rpm_limit or effective.tpm_limit:  # UpstreamError(RATE_LIMITED) when used up
            self._limits.admit(service.name, endpoint.id, effective)
        attempt = _Attempt(self, call, service, endpoint, lease.number, deadline)
        attempt.callers_deadline = callers_deadline
        attempt.first_by, attempt.capped, attempt.gap_s = attempt.started + lease.remaining_s, lease.capped, gap_s
        target = Target(base_url=endpoint.url, model=effective.model, api_key=api_key, options=effective.options)
        # The adapter's own read timeout must not be shorter than either bound `_next` applies.
        read_s = max(lease.remaining_s, min(gap_s, deadline - attempt.started))
        payload = capped(call.payload, effective.max_tokens) if effective.max_tokens else call.payload
        request = AdapterRequest(call.method, payload, read_s, call.request_id, tenant=call.tenant)
        client = self._pool.get(service.name, endpoint.id, endpoint.url, effective.limits)
        chunks = self._adapters[effective.protocol].stream(client, target, request)
        attempt.wait = self.resilience.waits.waiting(candidate_key(service.name, endpoint.id), endpoint.id)
        try:
            held = await attempt.until_first_token(chunks)
        except BaseException:
            if attempt.wait.abandoned:
                lease.capped = True  # judged silent: an attempt timeout, counted as one
            await _close(chunks)
            raise
        return chunks, attempt, held

    def _emit(self, event: AttemptStart | AttemptEnd) -> None:
        for observer in self._observers:
            if isinstance(event, AttemptStart):
                observer.attempt_started(event)
            else:
                observer.attempt_ended(event)

    def _first_token(self, event: FirstToken) -> None:
        """To the observers that follow first tokens (routing statistics: events.FirstToken)."""
        tell_first_token(self._observers, event)


class _Attempt:
    """One endpoint's stream: hold chunks until the first token, then pass them through."""

    def __init__(
        self, streamer: Streamer, call: Call, service: ServiceView, endpoint: EndpointView, number: int, deadline: float
    ) -> None:
        self.s, self.call, self.service, self.endpoint, self.number = streamer, call, service, endpoint, number
        self.target = service.target(endpoint)
        self.deadline = deadline
        self.started = streamer._clock()
        self.callers_deadline = False  # the deadline is one the caller chose shorter than the route's
        self.first_by = deadline  # the first token's attempt timeout (absolute), then
        self.gap_s = math.inf  # the longest wait for each later chunk
        self.capped = False  # first_by is the attempt timeout, before the deadline
        self.ttft_s: float | None = None
        self.final: StreamChunk | None = None
        self.opening = b""  # the first chunk passed on (its id and model: the attempt's trace span)
        self.held_chars = 0  # text of the chunks held back until the first token
        self.held_searches = 0  # web searches run by then (StreamChunk.searches)
        self.meter = Meter()  # the call's, once the attempt is committed
        self.wait = NO_WAIT  # its wait for the first token (dataplane/abandon.py), set by the streamer
        streamer._emit(
            AttemptStart(call.request_id, service.name, service.category, endpoint.id, number, call.priority,
                         streamed=True)
        )

    async def _next(self, chunks: AsyncIterator[StreamChunk]) -> StreamChunk | None:
        """The next chunk within the deadline (and before the first token, the attempt timeout;
        after it, within `gap_s`); None at the end of the stream."""
        now = self.s._clock()
        remaining = self.deadline - now
        bound = self.first_by - now if self.ttft_s is None else self.gap_s
        try:
            async with asyncio.timeout(max(min(remaining, bound), 0.0)):
                return await anext(chunks)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if bound >= remaining:
                why = "exceeded the deadline"
            elif self.ttft_s is None:
                why = "sent no first token within its attempt timeout"
            else:
                why = f"went silent for {self.gap_s:.3g} s"
            raise UpstreamError(ErrorKind.TIMEOUT, f"endpoint {self.endpoint.id}: stream {why}") from None

    async def until_first_token(self, chunks: AsyncIterator[StreamChunk]) -> list[bytes]:
        """Chunks up to and including the first content chunk (or the whole stream if none
        has content). On failure: the iterator is closed, the attempt reported, and it raises."""
        held: list[bytes] = []
        try:
            async with self.wait:  # abandoned when its endpoint is judged silent (dataplane/abandon.py)
                while True:
                    chunk = await self._next(chunks)
                    if chunk is None:
                        return held
                    if chunk.usage is not None:
                        self.final = chunk
                        continue
                    self.held_searches = max(self.held_searches, chunk.searches)
                    if chunk.data:
                        held.append(chunk.data)
                        self.opening = self.opening or chunk.data
                        self.held_chars += len(chunk.text)
                    if chunk.content:
                        self.ttft_s = self.s._clock() - self.started
                        self.s._first_token(FirstToken(self.call.request_id, self.service.name, self.endpoint.id,
                                                       self.number, self.ttft_s))
                        return held
        except UpstreamError as exc:
            await _close(chunks)
            self._end(exc.kind)
            raise
        except asyncio.CancelledError:  # a hedge that lost, or the caller went away: no outcome
            await _close(chunks)
            self._end(None, cancelled=True)
            raise

    async def rest(
        self, chunks: AsyncIterator[StreamChunk], call_start: float, *, failover: bool, version: str, source: str = ""
    ) -> AsyncGenerator[StreamItem, None]:
        error: UpstreamError | None = None
        try:
            while self.final is None:
                chunk = await self._next(chunks)
                if chunk is None:
                    break
                if chunk.usage is not None:
                    self.final = chunk
                    self.meter.reported = chunk.usage
                    continue
                self.meter.searches = max(self.meter.searches, chunk.searches)
                if chunk.data:
                    self.meter.sent_chars += len(chunk.text)
                    yield chunk.data
        except UpstreamError as exc:
            error = exc
        finally:
            await _close(chunks)
        if self.final is not None and self.final.usage is not None:
            usage = self.final.usage
        elif error is not None:  # broken by the upstream after the first token: what was forwarded, as a cut
            usage = self.meter.usage()
        else:
            usage = TokenUsage(estimated=True)
        cost = self.target.pricing.charge(usage)
        reason = self.final.finish_reason if self.final is not None and error is None else None
        self._end(error.kind if error else None, usage, cost, answer=self.opening if error is None else b"",
                  finish_reason=reason or "")
        now = self.s._clock()
        yield StreamEnd(
            service=self.service.name,
            endpoint=self.endpoint.id,
            attempts=self.number,
            latency_s=now - call_start,
            ttft_s=self.ttft_s or 0.0,
            usage=usage,
            cost_usd=cost,
            failover=failover,
            version=version,
            finish_reason=(self.final.finish_reason or "") if self.final else "",
            error=error,
            fallback=bool(source),
            fallback_source=source,
            target=self.target,
        )

    def abandoned(self) -> None:
        """The caller went away after the first token: end the attempt for the observers with
        what was metered (no error: the endpoint did its part)."""
        usage, cost = self.meter.charge()
        self._end(None, usage, cost)

    def _end(self, error: ErrorKind | None, usage: TokenUsage = _NO_USAGE, cost: float = 0.0,
             cancelled: bool = False, answer: bytes = b"", finish_reason: str = "") -> None:
        if self.target.tpm_limit and usage.input_tokens + usage.output_tokens:
            self.s._limits.used(self.service.name, self.endpoint.id, usage.input_tokens + usage.output_tokens)
        if error is ErrorKind.TIMEOUT and self.callers_deadline and deadline_passed(self.s._clock(), self.deadline):
            error, cancelled = None, True  # the caller's own deadline ran out: no outcome (AttemptController)
        self.s._emit(
            AttemptEnd(
                self.call.request_id,
                self.service.name,
                self.service.category,
                self.endpoint.id,
                self.number,
                self.s._clock() - self.started,
                error,
                usage,
                cost,
                self.ttft_s,
                cancelled,
                answer,
                finish_reason,
            )
        )


async def _discard(won: tuple[AsyncIterator[StreamChunk], _Attempt, list[bytes]]) -> None:
    """A stream attempt reached its first token in the same instant as the winner: close it."""
    chunks, attempt, _ = won
    await _close(chunks)
    attempt.abandoned()


async def _close(chunks: AsyncIterator[StreamChunk]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
