"""The sliding window: count calls in the last ``window`` seconds, cut in buckets.

The primitive behind ``flow`` QPS rules and ``guard.limit`` (and, next, hot parameters).
On Redis one Lua script (``window_acquire.lua``) reads the window, drops stale buckets and
counts the call, with the server's clock; the memory store keeps ``{slot: count}`` under
the same key.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ..storage.redis import ScriptCall
from ._lua import lua

if TYPE_CHECKING:
    from ..storage.memory import MemoryStore
    from ..storage.redis import RedisStore

#: Buckets per window.
BUCKETS = 10


class WindowResult(NamedTuple):
    """One attempt to count calls in a window (a tuple: it is built on every request).

    Attributes:
        admitted: whether the calls were counted (and so may proceed).
        remaining: permits left in the window after this attempt.
        wait_seconds: when refused, seconds until this attempt could succeed (0 when
            admitted: nothing reads it then, so neither store computes it).
        slot: the bucket the calls were counted in, for a refund.
    """

    admitted: bool
    remaining: int
    wait_seconds: float
    slot: int | bytes


class Prefetched(NamedTuple):
    """Permits taken ahead from a Redis window (:meth:`RedisWindow.prefetch`).

    Attributes:
        admitted: whether any permit was taken.
        remaining: permits left in the window after this call.
        wait_seconds: when none was taken, seconds until one could be.
        slot: the bucket the permits were counted in.
        taken: how many were taken (0 when refused).
        seconds_left: how long the bucket ``slot`` still runs, by the server's clock.
    """

    admitted: bool
    remaining: int
    wait_seconds: float
    slot: int | bytes
    taken: int
    seconds_left: float


#: ``acquire`` as a plain function, for a window that never waits (the memory store).
AcquireNow = Callable[[str, int, float], WindowResult]


class Window(Protocol):
    """A sliding window on one store."""

    def pack(self, key: str, limit: int, window: float, n: int = 1) -> bytes | None:
        """The call for a key whose arguments never change, prepared once (or None)."""

    def acquire_now(self) -> AcquireNow | None:
        """``acquire`` as a plain function if it never waits (memory), else None."""

    async def acquire(
        self, key: str, limit: int, window: float, n: int = 1, packed: bytes | None = None
    ) -> WindowResult:
        """Count ``n`` calls in the window ending now if ``limit`` allows."""

    async def refund(self, key: str, slot: int | bytes, n: int = 1) -> None:
        """Give back ``n`` calls counted in ``slot`` (if it is still in the window)."""

    def forget(self, key: str) -> None:
        """Drop the in-process state under ``key`` (a no-op where keys expire)."""


class _Buckets:
    """One key's window in process: ``{slot: count}``, their total and the oldest slot."""

    __slots__ = ("counts", "oldest", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.oldest = 1 << 62  # no slot yet

    def expire(self, first: int) -> None:
        """Drop the buckets older than slot ``first``."""
        counts = self.counts
        for old in [s for s in counts if s < first]:
            self.total -= counts.pop(old)
        self.oldest = min(counts, default=1 << 62)


class MemoryWindow:
    """The sliding window in process: ``{slot: count}`` and their running total per key."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def pack(self, key: str, limit: int, window: float, n: int = 1) -> bytes | None:
        """Nothing to prepare in process."""
        return None

    def acquire_now(self) -> AcquireNow | None:
        """The memory window never waits: :meth:`count` is ``acquire`` without a coroutine."""
        return self.count

    def _now(self, state: _Buckets, window: float) -> tuple[float, float, int]:
        """The store's clock, the bucket length and the current slot; stale buckets dropped."""
        now = self.store.now()
        blen = window / BUCKETS
        slot = int(now / blen)
        if state.oldest <= slot - BUCKETS:
            state.expire(slot - BUCKETS + 1)
        return now, blen, slot

    def take(self, key: str, limit: int, window: float, n: int = 1) -> int | None:
        """Count ``n`` calls if ``limit`` allows: their slot, or None (:meth:`refusal`
        then says how long to wait). :meth:`count` without building a result."""
        store = self.store
        state: _Buckets | None = store.data.get(key)
        if state is None:
            state = store.data[key] = _Buckets()
        slot = int(store.now() / (window / BUCKETS))  # :meth:`_now`, inlined: every call
        if state.oldest <= slot - BUCKETS:
            state.expire(slot - BUCKETS + 1)
        if state.total + n > limit:
            return None
        counts = state.counts
        counts[slot] = counts.get(slot, 0) + n
        state.total += n
        if slot < state.oldest:
            state.oldest = slot
        return slot

    def refusal(self, key: str, limit: int, window: float, n: int = 1) -> WindowResult:
        """What :meth:`count` answers a refused call now, without counting anything."""
        state: _Buckets = self.store.data.get(key) or _Buckets()
        now, blen, slot = self._now(state, window)
        total = state.total
        wait, freed = 0.0 if total + n <= limit else window, 0
        if wait:
            counts = state.counts
            for s in sorted(counts):
                freed += counts[s]
                if total - freed + n <= limit:
                    wait = (s + BUCKETS) * blen - now
                    break
        return WindowResult(False, max(0, limit - total), wait, slot)

    def count(self, key: str, limit: int, window: float, n: int = 1) -> WindowResult:
        """:meth:`acquire` without the coroutine."""
        slot = self.take(key, limit, window, n)
        if slot is None:
            return self.refusal(key, limit, window, n)
        return WindowResult(True, limit - self.store.data[key].total, 0.0, slot)

    async def acquire(
        self, key: str, limit: int, window: float, n: int = 1, packed: bytes | None = None
    ) -> WindowResult:
        """Count ``n`` calls in the window ending now if ``limit`` allows."""
        return self.count(key, limit, window, n)

    async def refund(self, key: str, slot: int | bytes, n: int = 1) -> None:
        """Give back ``n`` calls counted in ``slot`` (if it is still in the window)."""
        state: _Buckets | None = self.store.data.get(key)
        if state is not None and slot in state.counts:
            assert isinstance(slot, int)
            state.counts[slot] -= n
            state.total -= n

    def forget(self, key: str) -> None:
        """Drop the counts under ``key``."""
        self.store.data.pop(key, None)


class RedisWindow:
    """The sliding window on Redis (``window_acquire.lua``, ``window_refund.lua``)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._acquire = store.script(lua("window_acquire"))
        self._refund = store.script(lua("window_refund"))

    def pack(self, key: str, limit: int, window: float, n: int = 1) -> bytes | None:
        """The packed call for a key whose arguments never change (see ``RedisStore.pack``)."""
        return self.store.pack(self._acquire, (key,), self._args(limit, window, n))

    def acquire_now(self) -> AcquireNow | None:
        """Redis always waits for its answer."""
        return None

    @staticmethod
    def _args(limit: int, window: float, n: int) -> tuple[int, int, int, int]:
        return (limit, math.ceil(window * 1000), BUCKETS, n)

    async def acquire(
        self, key: str, limit: int, window: float, n: int = 1, packed: bytes | None = None
    ) -> WindowResult:
        """Count ``n`` calls in the window ending now (server time) if ``limit`` allows."""
        reply = await self.store.run(self._acquire, (key,), self._args(limit, window, n), packed)
        return self.result(reply)

    def acquire_call(
        self, key: str, limit: int, window: float, n: int = 1, packed: bytes | None = None
    ) -> ScriptCall:
        """:meth:`acquire` as a call for ``RedisStore.run_many`` (reply: :meth:`result`)."""
        return ScriptCall(self._acquire, (key,), self._args(limit, window, n), packed)

    @staticmethod
    def result(reply: Any) -> WindowResult:
        """The :class:`WindowResult` of an acquire's reply."""
        admitted, remaining, wait_ms, slot = reply
        return WindowResult(admitted == 1, remaining, wait_ms / 1000.0, slot)

    async def prefetch(self, key: str, limit: int, window: float, want: int) -> Prefetched:
        """Count up to ``want`` calls now: what fits, at most half of what is left, at
        least one if any is left (``window_acquire.lua`` with its partial flag)."""
        call = self.prefetch_call(key, limit, window, want)
        return self.prefetched(await self.store.run(call.script, call.keys, call.args))

    def prefetch_call(self, key: str, limit: int, window: float, want: int) -> ScriptCall:
        """:meth:`prefetch` as a call for ``RedisStore.run_many`` (reply: :meth:`prefetched`)."""
        return ScriptCall(self._acquire, (key,), (*self._args(limit, window, want), 1))

    @staticmethod
    def prefetched(reply: Any) -> Prefetched:
        """The :class:`Prefetched` of a prefetch's reply."""
        admitted, remaining, wait_ms, slot, taken, us_left = reply
        return Prefetched(
            admitted == 1, remaining, wait_ms / 1000.0, slot, taken, us_left / 1_000_000
        )

    async def refund(self, key: str, slot: int | bytes, n: int = 1) -> None:
        """Give back ``n`` calls counted in ``slot`` (if it is still in the window)."""
        await self.store.run(self._refund, (key,), (slot, n), always_try=True)

    def forget(self, key: str) -> None:
        """Keys on Redis expire by themselves."""


__all__ = [
    "BUCKETS",
    "AcquireNow",
    "MemoryWindow",
    "Prefetched",
    "RedisWindow",
    "Window",
    "WindowResult",
]
