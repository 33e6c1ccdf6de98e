"""Pacing (a leaky bucket): Sentinel's ``RateLimiterController``, on memory and Redis.

The primitive behind ``behavior: queue`` and, with a :class:`~.warmup.WarmUpCurve`,
``warm_up_queue`` (Sentinel's ``WarmUpRateLimiterController``). Calls pass
``cost = round(n * 1000 / rate)`` ms apart; one whose slot would be more than
``max_queue_ms`` away is refused. ``reserve`` hands out the slot and the wait until it at
once (on Redis one script, ``pacer_acquire.lua``, on the server's clock): the caller
``await``\\ s the wait, so the spacing holds across every process, and no thread sleeps.

A slot whose waiter leaves (cancelled, its client gone) or whose call a later check
blocked is given back with ``release``: the latest slot rolls the line back, an earlier
one still to come is kept for the next caller (the spacing around it holds already), so
a waiter that left holds nothing afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

from ._lua import lua
from .warmup import WarmUpCurve, memory_state

if TYPE_CHECKING:
    from ..storage.base import Store
    from ..storage.memory import MemoryStore
    from ..storage.redis import RedisStore

# Kept after the last slot: the pass counts of the previous second and some slack.
_TTL_SLACK_MS = 2000


class Reservation(NamedTuple):
    """One attempt to get a slot.

    Attributes:
        admitted: whether a slot was reserved.
        wait_seconds: when admitted, how long to wait for the slot; when refused, how long
            until the queue could take the call.
        slot: the slot (store clock, ms), for ``release``.
        cost: the slot's spacing in ms.
    """

    admitted: bool
    wait_seconds: float
    slot: int = 0
    cost: int = 0


def ttl_ms(qps: int, max_queue_ms: int, curve: WarmUpCurve | None) -> int:
    """How long a rule's state is worth keeping after its last use."""
    ttl = max_queue_ms + 1000 // max(qps, 1) + _TTL_SLACK_MS
    return max(ttl, curve.ttl_ms) if curve is not None else ttl


class Pacer(Protocol):
    """Leaky buckets on one store."""

    async def reserve(
        self, key: str, qps: int, max_queue_ms: int, curve: WarmUpCurve | None = None, n: int = 1
    ) -> Reservation:
        """Reserve the next slot ``n`` calls may pass at, or refuse if it is too far."""

    async def release(self, key: str, slot: int, cost: int, warm: bool, n: int = 1) -> bool:
        """Give a reserved slot back; whether another caller can use it."""

    def forget(self, key: str) -> None:
        """Drop the in-process state under ``key`` (a no-op where keys expire)."""


class MemoryPacer:
    """The leaky bucket in process (mirrors ``pacer_acquire.lua`` and ``pacer_release.lua``)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def decide(
        self, key: str, qps: int, max_queue_ms: int, curve: WarmUpCurve | None = None, n: int = 1
    ) -> Reservation:
        """:meth:`reserve` without the coroutine."""
        state = memory_state(self.store, key)
        now = int(self.store.now() * 1000)
        state.prune(now)
        rate = float(qps)
        if curve is not None:
            rate = curve.rate(state.sync(now, curve))
        cost = int(n * 1000 / rate + 0.5)
        if state.holes:
            at = min(state.holes)
            del state.holes[at]
            if curve is not None:
                state.count_pass(at, n)
            return Reservation(True, (at - now) / 1000.0, at, cost)
        at = state.latest + cost
        if at <= now:
            at = now
        elif at - now > max_queue_ms:
            return Reservation(False, (at - now - max_queue_ms) / 1000.0)
        state.latest = at
        if curve is not None:
            state.count_pass(at, n)
        return Reservation(True, (at - now) / 1000.0, at, cost)

    async def reserve(
        self, key: str, qps: int, max_queue_ms: int, curve: WarmUpCurve | None = None, n: int = 1
    ) -> Reservation:
        """Reserve the next slot ``n`` calls may pass at, or refuse if it is too far."""
        return self.decide(key, qps, max_queue_ms, curve, n)

    async def release(self, key: str, slot: int, cost: int, warm: bool, n: int = 1) -> bool:
        """Give a reserved slot back; whether another caller can use it."""
        state = self.store.data.get(key)
        if state is None:
            return False
        if warm:
            b = slot // 100
            if b in state.buckets:
                state.buckets[b] -= n
        if slot == state.latest:
            state.latest = slot - cost
            return True
        if slot > int(self.store.now() * 1000):
            state.holes[slot] = cost
            return True
        return False

    def forget(self, key: str) -> None:
        """Drop the state under ``key``."""
        self.store.data.pop(key, None)


class RedisPacer:
    """The leaky bucket on Redis: one script per reservation, one per release."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._reserve = store.script(lua("pacer_acquire", "warmup_lib"))
        self._release = store.script(lua("pacer_release"))

    async def reserve(
        self, key: str, qps: int, max_queue_ms: int, curve: WarmUpCurve | None = None, n: int = 1
    ) -> Reservation:
        """Reserve the next slot (server time) ``n`` calls may pass at, or refuse."""
        warm: tuple[str, ...] = curve.args() if curve is not None else ("-1", "0", "0", "0")
        ttl = ttl_ms(qps, max_queue_ms, curve)
        reply = await self.store.run(self._reserve, (key,), (qps, max_queue_ms, n, ttl, *warm))
        if int(reply[0]):
            return Reservation(True, int(reply[1]) / 1000.0, int(reply[2]), int(reply[3]))
        return Reservation(False, int(reply[1]) / 1000.0)

    async def release(self, key: str, slot: int, cost: int, warm: bool, n: int = 1) -> bool:
        """Give a reserved slot back (tried even in an outage); whether it is reusable."""
        args = (slot, cost, n, 1 if warm else 0)
        return bool(await self.store.run(self._release, (key,), args, always_try=True))

    def forget(self, key: str) -> None:
        """Keys on Redis expire by themselves."""


def pacer_for(store: Store) -> Pacer:
    """The pacing primitive of ``store`` (memory or Redis)."""
    if store.kind == "memory":
        return MemoryPacer(store)  # type: ignore[arg-type]
    return RedisPacer(store)  # type: ignore[arg-type]


__all__ = ["MemoryPacer", "Pacer", "RedisPacer", "Reservation", "pacer_for", "ttl_ms"]
