"""The console's sessions: a bounded table of logged-in operators, and a bound on failed logins.

A login presents the admin token (role "admin") or a viewer token (role "viewer", read-only)
once; the browser then holds only a random session id in an HttpOnly, SameSite=Strict cookie.
Each session carries its own CSRF token, which every state-changing request must echo.

Bounds: at most `max_sessions` sessions (a new login evicts the oldest: only holders of a
token can log in, so eviction cannot be forced by an outsider), each expiring `ttl_s` after the
login; at most `max_failures` failed logins per minute from one address (then its logins answer
429 until the window moves on), so the token cannot be guessed at line rate.

Not thread-safe: used on the event loop only. Time is injected (`clock`, seconds).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Session:
    id: str
    role: str  # "admin" or "viewer"
    csrf: str
    expires_at: float  # on `clock`'s scale

    @property
    def can_change(self) -> bool:
        return self.role == "admin"


class Sessions:
    def __init__(self, *, max_sessions: int = 64, ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_sessions < 1 or ttl_s <= 0:
            raise ValueError("max_sessions must be >= 1 and ttl_s > 0")
        self._max = max_sessions
        self._ttl_s = ttl_s
        self._clock = clock
        self._table: OrderedDict[str, Session] = OrderedDict()  # oldest login first

    def __len__(self) -> int:
        return len(self._table)

    def create(self, role: str) -> Session:
        self._expire()
        while len(self._table) >= self._max:
            self._table.popitem(last=False)
        session = Session(secrets.token_urlsafe(32), role, secrets.token_urlsafe(32), self._clock() + self._ttl_s)
        self._table[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id; None for no id, an unknown one or an expired one."""
        if not session_id:
            return None
        session = self._table.get(session_id)
        if session is None:
            return None
        if self._clock() >= session.expires_at:
            del self._table[session_id]
            return None
        return session

    def drop(self, session_id: str) -> None:
        self._table.pop(session_id, None)

    def _expire(self) -> None:
        now = self._clock()
        for sid in [sid for sid, s in self._table.items() if now >= s.expires_at]:
            del self._table[sid]


def csrf_matches(session: Session, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), session.csrf.encode())


class LoginGuard:
    """Counts failed logins per remote address in a sliding window; `allowed(remote)` is False once
    that address has `max_failures` in it. Per address, so one guesser cannot lock operators
    elsewhere out; at most `max_addresses` are tracked (the oldest is forgotten first)."""

    def __init__(self, *, max_failures: int = 20, window_s: float = 60.0, max_addresses: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_failures
        self._window_s = window_s
        self._max_addresses = max_addresses
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def allowed(self, remote: str) -> bool:
        failures = self._failures.get(remote)
        if failures is None:
            return True
        cutoff = self._clock() - self._window_s
        while failures and failures[0] <= cutoff:
            failures.popleft()
        if not failures:
            del self._failures[remote]
        return len(failures) < self._max

    def failed(self, remote: str) -> None:
        failures = self._failures.pop(remote, None) or deque(maxlen=self._max)
        failures.append(self._clock())
        self._failures[remote] = failures  # most recent last
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)


def role_of(presented: str, tokens: dict[str, str]) -> str | None:
    """The role whose token `presented` is (constant-time comparisons, every role checked)."""
    found = None
    for role, token in tokens.items():
        if token and hmac.compare_digest(presented.encode(), token.encode()):
            found = role
    return found
