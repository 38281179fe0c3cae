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
    # the per-call figures were read in both windows (the probe in the agent answered)
    for w in (report.start, report.end):
        assert w.cpu_ms_per_call > 0 and w.live_objects > 0 and w.load1 >= 0 and w.median_minute_p99_ms > 0
    # objects left behind by calls: in the second half of the run no type grows by as many as
    # 0.8 per call (the cache's entries, still filling, grow by 0.5: one per chat miss or embedding)
    assert report.late_calls > 50 and not report.probe_error
    assert all(n < 0.8 * report.late_calls for _, n in report.grown_late), report.grown_late
