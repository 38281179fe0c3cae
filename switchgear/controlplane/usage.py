"""Per-tenant usage as agents report it, in UTC-aligned minute, hour and day windows. Pure.

Agents send deltas (requests admitted and rejected, tokens, cost) with their load reports; the
book adds them up so `GetUsage` can say what a tenant used this minute, hour and day.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0


@dataclass(frozen=True)
class UsageDelta:
    tenant: str
    requests: int = 0
    rejected: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True)
class TenantUsage:
    tenant: str
    requests_this_minute: int = 0
    tokens_this_minute: int = 0
    cost_this_hour_usd: float = 0.0
    cost_this_day_usd: float = 0.0
    requests_total: int = 0
    rejected_total: int = 0
    cost_total_usd: float = 0.0


@dataclass
class _Book:
    minute: dict[int, tuple[int, int]] = field(default_factory=dict)  # window -> (requests, tokens)
    hour: dict[int, float] = field(default_factory=dict)
    day: dict[int, float] = field(default_factory=dict)
    requests: int = 0
    rejected: int = 0
    cost: float = 0.0


def window(now: float, width: float) -> int:
    """Index of the UTC-aligned window of `width` seconds that contains `now` (epoch seconds)."""
    return int(now // width)


class UsageBook:
    """Per-tenant usage. `dump`/`load` let the control plane keep it across restarts."""

    def __init__(self) -> None:
        self._books: defaultdict[str, _Book] = defaultdict(_Book)

    def dump(self, tenant: str) -> str:
        book = self._books[tenant]
        return json.dumps({
            "minute": [[k, *v] for k, v in book.minute.items()], "hour": list(book.hour.items()),
            "day": list(book.day.items()), "requests": book.requests, "rejected": book.rejected, "cost": book.cost,
        })

    def load(self, tenant: str, text: str) -> None:
        data = json.loads(text)
        self._books[tenant] = _Book(
            minute={int(k): (int(r), int(t)) for k, r, t in data["minute"]},
            hour={int(k): float(v) for k, v in data["hour"]}, day={int(k): float(v) for k, v in data["day"]},
            requests=int(data["requests"]), rejected=int(data["rejected"]), cost=float(data["cost"]),
        )

    def add(self, delta: UsageDelta, now: float) -> None:
        book = self._books[delta.tenant]
        m, h, d = window(now, MINUTE), window(now, HOUR), window(now, DAY)
        requests, tokens = book.minute.get(m, (0, 0))
        book.minute = {m: (requests + delta.requests, tokens + delta.tokens)}  # older minutes are done
        book.hour = {h: book.hour.get(h, 0.0) + delta.cost_usd}
        book.day = {d: book.day.get(d, 0.0) + delta.cost_usd}
        book.requests += delta.requests
        book.rejected += delta.rejected
        book.cost += delta.cost_usd

    def usage(self, tenant: str, now: float) -> TenantUsage:
        book = self._books.get(tenant)
        if book is None:
            return TenantUsage(tenant)
        requests, tokens = book.minute.get(window(now, MINUTE), (0, 0))
        return TenantUsage(
            tenant=tenant,
            requests_this_minute=requests,
            tokens_this_minute=tokens,
            cost_this_hour_usd=book.hour.get(window(now, HOUR), 0.0),
            cost_this_day_usd=book.day.get(window(now, DAY), 0.0),
            requests_total=book.requests,
            rejected_total=book.rejected,
            cost_total_usd=book.cost,
        )
