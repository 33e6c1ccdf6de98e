"""The per-resource sliding window that breakers, metrics and the system rule read."""

from __future__ import annotations

import pytest

from ymguard.stats import ResourceStats


def test_counts_pass_block_success_error_and_rt() -> None:
    stats = ResourceStats()
    for _ in range(3):
        stats.on_pass()
    stats.on_block()
    stats.on_exit(10.0, error=False)
    stats.on_exit(30.0, error=True)
    counts = stats.counts()
    assert (counts.passed, counts.blocked, counts.success, counts.errors) == (3, 1, 1, 1)
    assert counts.avg_rt_ms == pytest.approx(20.0)
    assert stats.inflight == 1


def test_slow_calls_are_counted_per_registered_threshold() -> None:
    stats = ResourceStats()
    fast, slow = stats.track_slow(50), stats.track_slow(200)
    assert stats.track_slow(50) == fast
    for rt in (10, 60, 250):
        stats.on_pass()
        stats.on_exit(rt, error=False)
    counts = stats.counts()
    assert counts.slow[fast] == 2 and counts.slow[slow] == 1


def test_old_buckets_leave_the_window() -> None:
    # Instants given, not slept: 4 buckets of 50 ms, a call at t=100 s.
    stats = ResourceStats(window_seconds=0.2, buckets=4)
    stats.on_pass(now=100.0)
    assert stats.counts(now=100.0).passed == 1
    assert stats.counts(now=100.19).passed == 1
    assert stats.counts(now=100.25).passed == 0


def test_since_leaves_out_what_came_before_a_reset() -> None:
    stats = ResourceStats(window_seconds=1.0, buckets=10)
    stats.on_pass(now=100.0)
    stats.on_exit(1.0, error=True, now=100.0)
    reset_at = 100.12
    stats.on_pass(now=100.24)
    stats.on_exit(1.0, error=False, now=100.24)
    counts = stats.counts(since=reset_at, now=100.24)
    assert (counts.errors, counts.success) == (0, 1)
    assert stats.counts(now=100.24).errors == 1


def test_widen_keeps_longer_history() -> None:
    stats = ResourceStats()
    stats.widen(10.0)
    assert stats.window_seconds == 10.0
    stats.widen(2.0)
    assert stats.window_seconds == 10.0


def test_a_context_no_chain_ran_is_counted_now() -> None:
    """The observer methods take the chain's reading (``ctx.now``) when there is one; a
    context made by hand has none (0.0) and is counted at the statistics' own clock."""
    from ymguard.chain import Context

    stats = ResourceStats()
    ctx = Context("r")
    stats.passed(ctx)
    stats.finished(ctx, 5.0, "success")
    counts = stats.counts()
    assert (counts.passed, counts.success, stats.inflight) == (1, 1, 0)
