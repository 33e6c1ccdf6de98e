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


class MemoryWindow:
    """The sliding window in process: ``{slot: count}`` under the key."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def pack(self, key: str, limit: int, window: float, n: int = 1) -> bytes | None:
        """Nothing to prepare in process."""
        return None

    def acquire_now(self) -> AcquireNow | None:
        """The memory window never waits: :meth:`count` is ``acquire`` without a coroutine."""
        return self.count

    def count(self, key: str, limit: int, window: float, n: int = 1) -> WindowResult:
        """:meth:`acquire` without the coroutine."""
        counts: dict[int, int] = self.store.data.setdefault(key, {})
        now = self.store.now()
        blen = window / BUCKETS
        slot = int(now / blen)
        if len(counts) > BUCKETS or (counts and next(iter(counts)) <= slot - BUCKETS):
            first = slot - BUCKETS + 1
            for old in [s for s in counts if s < first]:
                del counts[old]
        total = sum(counts.values())
        if total + n <= limit:
            counts[slot] = counts.get(slot, 0) + n
            return WindowResult(True, limit - total - n, 0.0, slot)
        wait, freed = window, 0
        for s in sorted(counts):
            freed += counts[s]
            if total - freed + n <= limit:
                wait = (s + BUCKETS) * blen - now
                break
        return WindowResult(False, max(0, limit - total), wait, slot)

    async def acquire(
        self, key: str, limit: int, window: float, n: int = 1, packed: bytes | None = None
    ) -> WindowResult:
        """Count ``n`` calls in the window ending now if ``limit`` allows."""
        return self.count(key, limit, window, n)

    async def refund(self, key: str, slot: int | bytes, n: int = 1) -> None:
        """Give back ``n`` calls counted in ``slot`` (if it is still in the window)."""
        counts: dict[int, int] | None = self.store.data.get(key)
        if counts and slot in counts:
            counts[slot] -= n

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

    async def refund(self, key: str, slot: int | bytes, n: int = 1) -> None:
        """Give back ``n`` calls counted in ``slot`` (if it is still in the window)."""
        await self.store.run(self._refund, (key,), (slot, n), always_try=True)

    def forget(self, key: str) -> None:
        """Keys on Redis expire by themselves."""


__all__ = ["BUCKETS", "AcquireNow", "MemoryWindow", "RedisWindow", "Window", "WindowResult"]
