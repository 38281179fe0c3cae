"""A route target's provider limits (`rpm_limit`, `tpm_limit`), kept by each agent.

Per target and per agent, in fixed one-minute windows: an attempt on a target that has used its
requests (or tokens) of the current window is not sent; it fails RATE_LIMITED with Retry-After
= the rest of the window, which the attempt controller treats as a provider's own 429 (the
call moves to another target at once; the breaker holds the target out until the window ends
and never trips for it). Tokens are counted from each answer's usage, so the call that crosses
the limit is served and the next one waits. With N agents a provider may see up to N times
the limit: set it to the provider's limit divided by the agents (docs/concepts/routes.md).

Memory: one entry per target with a limit that was called; past MAX_ENTRIES, entries whose
window ended are dropped (a target no longer in any snapshot is never called again).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from switchgear.adapters.base import ErrorKind, UpstreamError
from switchgear.dataplane.snapshot import TargetView

WINDOW_S = 60.0
MAX_ENTRIES = 65_536


@dataclass
class _Window:
    start: float
    requests: int = 0
    tokens: int = 0


class TargetLimits:
    """Not thread-safe: the agent's event loop only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}

    def _window(self, key: tuple[str, str], now: float) -> _Window:
        window = self._windows.get(key)
        if window is None or now - window.start >= WINDOW_S:
            if window is None and len(self._windows) >= MAX_ENTRIES:
                self._windows = {k: w for k, w in self._windows.items() if now - w.start < WINDOW_S}
            window = self._windows[key] = _Window(now)
        return window

    def admit(self, service: str, endpoint: str, target: TargetView) -> None:
        """Count one attempt, or raise UpstreamError(RATE_LIMITED) when the target is at a limit."""
        now = self._clock()
        window = self._window((service, endpoint), now)
        over = ""
        if target.rpm_limit and window.requests >= target.rpm_limit:
            over = f"its rpm_limit of {target.rpm_limit}"
        elif target.tpm_limit and window.tokens >= target.tpm_limit:
            over = f"its tpm_limit of {target.tpm_limit} tokens"
        if over:
            wait = max(0.0, window.start + WINDOW_S - now)
            raise UpstreamError(ErrorKind.RATE_LIMITED, f"target {endpoint}: {over} a minute is used on this agent",
                                retry_after_s=wait)
        window.requests += 1

    def used(self, service: str, endpoint: str, tokens: int) -> None:
        """Count an answer's tokens against the target's tpm_limit."""
        window = self._windows.get((service, endpoint))
        if window is not None:
            window.tokens += tokens
