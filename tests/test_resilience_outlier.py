"""Outlier ejection: tables with an explicit clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from switchgear.adapters.base import ErrorKind
from switchgear.dataplane.resilience.outlier import OutlierDetector, OutlierSettings

E = ErrorKind
S = OutlierSettings(consecutive_5xx=3, consecutive_gateway_failure=2, interval_s=10.0, base_ejection_s=30.0,
                    max_ejection_s=100.0, max_ejection_percent=50.0, failure_percentage_threshold=80.0,
                    failure_percentage_request_volume=5, failure_percentage_minimum_hosts=2)


def detector(*ids: str, settings: OutlierSettings = S) -> tuple[OutlierDetector, list[str]]:
    ejections: list[str] = []
    d = OutlierDetector(settings, on_eject=lambda s, e, now: ejections.append(e), now=0.0)
    d.sync("svc", ids)
    return d, ejections


def feed(d: OutlierDetector, now: float, endpoint: str, outcomes: list[ErrorKind | None]) -> None:
    for outcome in outcomes:
        d.record(now, "svc", endpoint, outcome)


@pytest.mark.parametrize(
    ("outcomes", "ejected"),
    [
        ([E.RETRYABLE] * 2, False),
        ([E.RETRYABLE] * 3, True),
        ([E.RETRYABLE, E.RETRYABLE, None, E.RETRYABLE], False),  # a success resets
        ([E.RETRYABLE, E.CLIENT, E.RETRYABLE, E.RETRYABLE], True),  # a caller's 4xx neither resets...
        ([E.CLIENT, E.CONTEXT_LENGTH] * 10, False),  # ...nor counts
        ([E.CONNECT, E.TIMEOUT], True),  # gateway failures have their own, lower threshold
        ([E.CONNECT, E.RETRYABLE, E.TIMEOUT], True),  # ...and also count as 5xx (3 in a row)
        ([E.CONNECT, E.RETRYABLE], False),
        ([E.RATE_LIMITED] * 10, False),  # 429 is not an outlier signal
        ([E.AUTH] * 10, False),
    ],
)
def test_consecutive_detectors(outcomes: list[ErrorKind | None], ejected: bool) -> None:
    d, _ = detector("a", "b", "c")
    feed(d, 1.0, "a", outcomes)
    assert ("a" in d.ejected("svc", 1.0)) is ejected


@pytest.mark.parametrize(
    ("n", "percent", "allowed"),
    [(1, 50, 0), (2, 50, 1), (3, 10, 1), (3, 50, 1), (4, 50, 2), (4, 100, 3), (10, 20, 2), (2, 100, 1)],
)
def test_max_ejected_share(n: int, percent: float, allowed: int) -> None:
    assert OutlierSettings(max_ejection_percent=percent).allowed(n) == allowed


def test_never_ejects_the_last_endpoint_nor_more_than_the_share() -> None:
    d, ejections = detector("a", "b", "c", "d")
    for endpoint in "abcd":
        feed(d, 1.0, endpoint, [E.RETRYABLE] * 3)
    assert ejections == ["a", "b"]  # 50 % of 4
    single, none = detector("only")
    feed(single, 1.0, "only", [E.CONNECT] * 20)
    assert none == [] and single.ejected("svc", 1.0) == frozenset()


@pytest.mark.parametrize(
    ("times", "duration"), [(1, 30.0), (2, 60.0), (3, 90.0), (4, 100.0), (9, 100.0)],
)
def test_ejection_time_grows_and_is_capped(times: int, duration: float) -> None:
    assert S.eject_s(times) == duration


def test_ejection_expires_and_repeat_ejection_is_longer() -> None:
    d, _ = detector("a", "b")
    feed(d, 1.0, "a", [E.RETRYABLE] * 3)
    assert d.ejected("svc", 30.9) == {"a"}
    assert d.ejected("svc", 31.0) == frozenset()
    feed(d, 31.0, "a", [E.RETRYABLE] * 3)  # ejected a second time before decay
    assert d.ejected("svc", 31.0 + 59.9) == {"a"}
    assert d.ejected("svc", 31.0 + 60.0) == frozenset()


def test_multiplier_decays_while_healthy() -> None:
    d, _ = detector("a", "b")
    feed(d, 1.0, "a", [E.RETRYABLE] * 3)  # times = 1, until 31
    for t in range(40, 80, 10):  # intervals pass with "a" back in service: times -> 0
        d.ejected("svc", float(t))
    feed(d, 80.0, "a", [E.RETRYABLE] * 3)
    assert d.ejected("svc", 80.0 + 29.9) == {"a"} and d.ejected("svc", 110.0) == frozenset()


PERCENT_ONLY = replace(S, consecutive_5xx=1000, consecutive_gateway_failure=1000)
F = E.RETRYABLE


@pytest.mark.parametrize(
    ("a_outcomes", "ejected"),
    [
        ([F] * 6 + [None] * 4, False),  # 60 % < 80 %
        ([F] * 7 + [None] * 3, False),  # 70 %
        ([F] * 8 + [None] * 2, True),  # 80 % over volume 10: ejected at the interval
        ([F] * 4, False),  # 100 % but volume 4 < 5
        ([F] * 4 + [None], True),  # 80 % of 5
        ([E.RATE_LIMITED] * 10 + [None], False),  # 429s are not counted at all
    ],
)
def test_failure_percentage_at_interval(a_outcomes: list[ErrorKind | None], ejected: bool) -> None:
    d, _ = detector("a", "b", settings=PERCENT_ONLY)
    feed(d, 1.0, "a", a_outcomes)
    feed(d, 1.0, "b", [None] * 10)
    assert d.ejected("svc", 9.0) == frozenset()  # not before the interval
    assert ("a" in d.ejected("svc", 10.0)) is ejected


def test_failure_percentage_needs_minimum_hosts_and_resets_each_interval() -> None:
    d, _ = detector("a", "b", settings=replace(PERCENT_ONLY, failure_percentage_minimum_hosts=3))
    feed(d, 1.0, "a", [F] * 10)
    assert d.ejected("svc", 10.0) == frozenset()
    d2, _ = detector("a", "b", settings=PERCENT_ONLY)
    feed(d2, 1.0, "a", [F] * 3)  # interval 1: volume 3, too few
    assert d2.ejected("svc", 10.0) == frozenset()
    feed(d2, 11.0, "a", [F] * 3)  # interval 2 starts from zero: still 3
    assert d2.ejected("svc", 20.0) == frozenset()


def test_sync_keeps_state_and_forget_drops_services() -> None:
    d, _ = detector("a", "b")
    feed(d, 1.0, "a", [E.RETRYABLE] * 2)
    d.sync("svc", ["a", "b", "c"])
    feed(d, 1.0, "a", [E.RETRYABLE])
    assert d.ejected("svc", 1.0) == {"a"}
    d.forget([])
    assert d.ejected("svc", 1.0) == frozenset()
