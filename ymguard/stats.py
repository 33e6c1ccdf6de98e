"""Per-resource statistics: one in-process sliding window of buckets (Sentinel's LeapArray).

Breakers, the system rule, metrics and the dashboard read these counts; nothing else
keeps counters of its own. A window is ``buckets`` buckets of ``window_seconds /
buckets`` each; a bucket whose slot comes round again is reset lazily, so recording is a
few list operations and no background task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .chain import Check, Context, Outcome
    from .errors import Blocked

#: Whether the chain's clock (``Context.now``, ``time.perf_counter``) is this module's
#: (``time.monotonic``): then an observer reads the instant the chain read, not a clock of
#: its own. On Linux and macOS both are the same monotonic clock; elsewhere (Windows,
#: before Python 3.13) they differ, and the statistics read their own.
SHARED_CLOCK = (
    time.get_clock_info("perf_counter").implementation
    == time.get_clock_info("monotonic").implementation
)

# Column layout of one bucket.
PASS, BLOCK, SUCCESS, ERROR, RT = 0, 1, 2, 3, 4
_FIXED = 5


@dataclass(frozen=True, slots=True)
class Counts:
    """Totals over part of a window.

    Attributes:
        passed: calls admitted by every check.
        blocked: calls a check refused.
        success: admitted calls that finished without error.
        errors: admitted calls that finished with an error.
        rt_total_ms: the sum of response times of finished calls.
        slow: per registered slow threshold, finished calls slower than it.
    """

    passed: int
    blocked: int
    success: int
    errors: int
    rt_total_ms: float
    slow: tuple[int, ...] = ()

    @property
    def completed(self) -> int:
        """Calls that finished (success + errors)."""
        return self.success + self.errors

    @property
    def avg_rt_ms(self) -> float:
        """Mean response time of finished calls, 0 if none."""
        return self.rt_total_ms / self.completed if self.completed else 0.0


class ResourceStats:
    """The sliding window of one resource, plus its in-flight count.

    Args:
        window_seconds: how much history the window keeps.
        buckets: how many buckets it is cut into (the resolution of ``counts``).
    """

    __slots__ = (
        "_current",
        "_data",
        "_len",
        "_stamps",
        "_until",
        "buckets",
        "inflight",
        "slow_ms",
        "window_seconds",
    )

    def __init__(self, window_seconds: float = 1.0, buckets: int = 10) -> None:
        self.window_seconds = window_seconds
        self.buckets = buckets
        self._len = window_seconds / buckets
        self._stamps = [-1] * buckets
        self.slow_ms: tuple[float, ...] = ()
        self._data = [[0.0] * _FIXED for _ in range(buckets)]
        self.inflight = 0
        # The bucket calls are counted in now, and when it ends: a call in the same bucket
        # as the one before (nearly every call) costs one comparison to find its row.
        self._current = self._data[0]
        self._until = float("-inf")

    def track_slow(self, threshold_ms: float) -> int:
        """Count calls slower than ``threshold_ms`` too; returns the index into ``Counts.slow``."""
        if threshold_ms in self.slow_ms:
            return self.slow_ms.index(threshold_ms)
        self.slow_ms = (*self.slow_ms, threshold_ms)
        for row in self._data:
            row.append(0.0)
        return len(self.slow_ms) - 1

    def widen(self, window_seconds: float) -> None:
        """Keep at least ``window_seconds`` of history (a breaker with a longer window)."""
        if window_seconds > self.window_seconds:
            self.window_seconds = window_seconds
            self._len = window_seconds / self.buckets
            self._stamps = [-1] * self.buckets
            self._until = float("-inf")

    def _row(self, now: float) -> list[float]:
        if now < self._until:  # the current bucket (monotonic time never goes back)
            return self._current
        slot = int(now / self._len)
        pos = slot % self.buckets
        row = self._data[pos]
        if self._stamps[pos] != slot:
            self._stamps[pos] = slot
            for i in range(len(row)):
                row[i] = 0.0
        self._current = row
        self._until = (slot + 1) * self._len
        return row

    def on_pass(self, now: float | None = None) -> None:
        """An admitted call starts (at ``now``, a ``time.monotonic()`` instant; default: now)."""
        self._row(time.monotonic() if now is None else now)[PASS] += 1
        self.inflight += 1

    def on_block(self) -> None:
        """A call was refused by a check."""
        self._row(time.monotonic())[BLOCK] += 1

    def on_exit(self, rt_ms: float, error: bool, now: float | None = None) -> None:
        """An admitted call finished after ``rt_ms`` milliseconds, with or without error
        (at ``now``, as :meth:`on_pass`)."""
        row = self._row(time.monotonic() if now is None else now)
        row[ERROR if error else SUCCESS] += 1
        row[RT] += rt_ms
        for i, threshold in enumerate(self.slow_ms):
            if rt_ms > threshold:
                row[_FIXED + i] += 1
        self.inflight -= 1

    # -- the chain's observer: statistics subscribe to every chain of their resource --------

    def passed(self, ctx: Context) -> None:
        """The chain admitted a call (:meth:`on_pass`, inlined: it runs on every call).

        At ``ctx.now``, where the chain's clock is this module's (a context no chain has
        run has none: 0.0, then the clock is read here); a ``now`` before the current
        bucket (a clock read a little earlier) counts in it.
        """
        now = ctx.now
        if not (SHARED_CLOCK and now):
            now = time.monotonic()
        row = self._current if now < self._until else self._row(now)
        row[0] += 1  # PASS
        self.inflight += 1

    def blocked(self, ctx: Context, error: Blocked, check: Check) -> None:
        """A check refused a call."""
        self.on_block()

    def finished(self, ctx: Context, rt_ms: float, outcome: Outcome) -> None:
        """An admitted call finished: an outcome is counted, the others only leave."""
        if outcome == "success" or outcome == "error":
            # :meth:`on_exit`, inlined: it runs on every call.
            now = ctx.now
            if not (SHARED_CLOCK and now):  # as in passed
                now = time.monotonic()
            row = self._current if now < self._until else self._row(now)
            row[3 if outcome == "error" else 2] += 1  # ERROR, SUCCESS
            row[4] += rt_ms  # RT
            if self.slow_ms:
                for i, threshold in enumerate(self.slow_ms):
                    if rt_ms > threshold:
                        row[_FIXED + i] += 1
        self.inflight -= 1

    def counts(
        self, seconds: float | None = None, *, since: float | None = None, now: float | None = None
    ) -> Counts:
        """Totals over the last ``seconds`` (default: the whole window).

        Args:
            seconds: how far back to sum, at bucket resolution.
            now: the ``time.monotonic()`` instant to sum at (default: now).
            since: a ``time.monotonic()`` instant; buckets that started before it are
                left out (a breaker that reset its statistics).
        """
        now = time.monotonic() if now is None else now
        slot = int(now / self._len)
        span = self.buckets if seconds is None else max(1, round(seconds / self._len))
        first = slot - min(span, self.buckets) + 1
        if since is not None:
            first = max(first, int(since / self._len))
        totals = [0.0] * (_FIXED + len(self.slow_ms))
        for pos, stamp in enumerate(self._stamps):
            if stamp >= first and stamp <= slot:
                for i, value in enumerate(self._data[pos]):
                    totals[i] += value
        return Counts(
            passed=int(totals[PASS]),
            blocked=int(totals[BLOCK]),
            success=int(totals[SUCCESS]),
            errors=int(totals[ERROR]),
            rt_total_ms=totals[RT],
            slow=tuple(int(v) for v in totals[_FIXED:]),
        )
