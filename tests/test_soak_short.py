"""The short soak (bench/soak) in the suite: 25 s of mixed traffic through a real agent and control
plane (unary, streamed, embeddings, cache hits, a tenant over its quota, one upstream flapping),
with loose bounds on growth: a leak of a descriptor or a task per call would cross them."""

from __future__ import annotations

import pytest

from bench.soak.run import check, fmt, parse, run

pytestmark = pytest.mark.timeout(120)


def test_short_soak_holds_steady() -> None:
    report = run(parse(["--seconds", "25", "--rate", "15", "--warmup", "4", "--window", "6", "--sample", "1",
                        "--flap-period", "8", "--flap-down", "3", "--limited-rpm", "5"]))
    print(fmt(report))
    assert check(report, rss_growth=0.5, fd_growth=10, task_growth=25) == []
    kinds = {kind for kind, by in report.statuses.items() if by.get("200")}
    assert kinds == {"chat", "cached", "stream", "embed", "limited"}
    assert report.upstream["flappy"].get("ok") and len(report.upstream["flappy"]) > 1  # it flapped, and served
    assert report.start.agent_tasks > 0 and report.end.p99_ms > 0
