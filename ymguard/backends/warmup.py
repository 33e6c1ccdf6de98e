"""Sentinel's warm-up token bucket (``WarmUpController``), on the memory store and Redis.

The primitive behind ``behavior: warm_up`` (and, with :mod:`.pacer`, ``warm_up_queue``).
A resource that has been idle is *cold*: it starts at ``qps / cold_factor`` and rises to
``qps`` over ``warm_up_seconds`` of traffic, with Sentinel's formulas::

    warning = T * count / (cf - 1)
    max     = warning + 2 * T * count / (1 + cf)
    slope   = (cf - 1) / count / (max - warning)

The stored tokens start full (``max``: cold). Once a second they refill by
``elapsed * count`` (above the warning line only while the previous second passed fewer
than ``count / cf``) and lose the previous second's passes. Above the warning line a call
passes iff ``passQps + 1 <= 1 / ((stored - warning) * slope + 1 / count)``, below it iff
``passQps + 1 <= count`` (``passQps``: the calls passed in the last second).

On Redis the state is one hash per rule (and origin) and each decision is one script
(``warmup_acquire.lua``, with the shared prelude ``warmup_lib.lua``) on the server's clock,
so every process warms one curve. The memory store keeps the same state in process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ._lua import lua

if TYPE_CHECKING:
    from ..storage.base import Store
    from ..storage.memory import MemoryStore
    from ..storage.redis import RedisStore

#: Length of a pass-count bucket in ms; the last second is 10 of them.
BUCKET_MS = 100
# Buckets kept: the last two seconds (the sliding second and the previous whole one).
_KEPT = 20


@dataclass(frozen=True, slots=True)
class WarmUpCurve:
    """The constants of one warm-up rule (Sentinel's ``WarmUpController`` fields).

    Attributes:
        count: the rule's qps (the warm rate).
        warm_up_seconds: T, how long the rise from ``count / cold_factor`` takes.
        cold_factor: cf, how much slower a cold resource starts (> 1).
        warning: the warning token line.
        max_tokens: the stored tokens of a cold resource.
        slope: how the allowed rate falls with the tokens above the warning line.
    """

    count: float
    warm_up_seconds: float
    cold_factor: float
    warning: float = field(init=False)
    max_tokens: float = field(init=False)
    slope: float = field(init=False)

    def __post_init__(self) -> None:
        if self.count <= 0 or self.cold_factor <= 1 or self.warm_up_seconds <= 0:
            raise ValueError("warm-up needs count > 0, cold_factor > 1, warm_up_seconds > 0")
        t, count, cf = self.warm_up_seconds, self.count, self.cold_factor
        warning = t * count / (cf - 1)
        max_tokens = warning + 2 * t * count / (1 + cf)
        object.__setattr__(self, "warning", warning)
        object.__setattr__(self, "max_tokens", max_tokens)
        object.__setattr__(self, "slope", (cf - 1) / count / (max_tokens - warning))

    @property
    def ttl_ms(self) -> int:
        """How long the state is worth keeping: idle this long, the resource is cold anyway.

        From empty, tokens refill at ``count`` a second, so after ``max / count`` seconds
        of idleness they are full whatever they were; two more seconds cover the kept
        pass counts. A key that expires therefore changes no answer.
        """
        return math.ceil(self.max_tokens / self.count * 1000) + 2000

    def args(self) -> tuple[str, str, str, str]:
        """``warning, max_tokens, slope, cold_factor`` as exact script arguments."""
        return (repr(self.warning), repr(self.max_tokens), repr(self.slope), repr(self.cold_factor))

    def rate(self, tokens: float) -> float:
        """The rate the stored tokens allow now (``count`` once warm)."""
        if tokens >= self.warning:
            return 1 / ((tokens - self.warning) * self.slope + 1 / self.count) * (1 + 1e-12)
        return self.count


class WarmUpResult(NamedTuple):
    """One warm-up decision.

    Attributes:
        admitted: whether the call passed (and was counted).
        bucket: the bucket it was counted in, for a refund.
        wait_seconds: when refused, seconds until the oldest pass leaves the window.
    """

    admitted: bool
    bucket: int
    wait_seconds: float


@dataclass(slots=True)
class ShapedState:
    """What one shaped rule keeps in process (memory store), as the Redis hash does.

    Attributes:
        tokens: the warm-up's stored tokens.
        filled: when they were last filled (ms, a whole second).
        latest: the pacer's latest slot handed out (ms).
        holes: the pacer's slots freed by waiters that left: slot ms -> cost ms.
        buckets: calls passed per 100 ms bucket, for the last two seconds.
    """

    tokens: float = 0.0
    filled: int = 0
    latest: int = 0
    holes: dict[int, int] = field(default_factory=dict)
    buckets: dict[int, int] = field(default_factory=dict)

    def prune(self, now: int) -> int:
        """Drop old buckets and past holes (as ``warmup_lib.lua`` does); the bucket of now."""
        slot = now // BUCKET_MS
        first = slot - _KEPT + 1
        # Buckets are mostly made in time order: the oldest made is usually the oldest.
        if self.buckets and next(iter(self.buckets)) < first:
            for b in [b for b in self.buckets if b < first]:
                del self.buckets[b]
        if self.holes:
            for at in [at for at in self.holes if at < now]:
                del self.holes[at]
        return slot

    def passed(self, first: int, last: int) -> int:
        """Calls passed in the buckets ``first..last``."""
        return sum(c for b, c in self.buckets.items() if first <= b <= last)

    def count_pass(self, at: int, n: int) -> None:
        """Count ``n`` passes at ``at`` (ms)."""
        b = at // BUCKET_MS
        self.buckets[b] = self.buckets.get(b, 0) + n

    def sync(self, now: int, curve: WarmUpCurve) -> float:
        """Sentinel's ``syncToken``: refill once a second; returns the stored tokens."""
        sec = now - now % 1000
        if sec <= self.filled:
            return self.tokens
        prev = self.passed(sec // BUCKET_MS - 10, sec // BUCKET_MS - 1)
        old = new = self.tokens
        if old < curve.warning or (
            old > curve.warning and prev < math.floor(curve.count) / curve.cold_factor
        ):
            new = old + (sec - self.filled) * curve.count / 1000
        new = max(0.0, min(new, curve.max_tokens) - prev)
        self.tokens, self.filled = new, sec
        return new


def memory_state(store: MemoryStore, key: str) -> ShapedState:
    """The in-process state under ``key`` (made on first use)."""
    state: ShapedState | None = store.data.get(key)
    if state is None:
        state = store.data[key] = ShapedState()
    return state


class WarmUp(Protocol):
    """Warm-up token buckets on one store."""

    async def acquire(self, key: str, curve: WarmUpCurve, n: int = 1) -> WarmUpResult:
        """Pass ``n`` calls if the warm-up curve allows it now."""

    async def refund(self, key: str, bucket: int, n: int = 1) -> None:
        """Give back ``n`` passes counted in ``bucket`` (a later check blocked them)."""

    def forget(self, key: str) -> None:
        """Drop the in-process state under ``key`` (a no-op where keys expire)."""


class MemoryWarmUp:
    """The warm-up in process (mirrors ``warmup_acquire.lua``)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def decide(self, key: str, curve: WarmUpCurve, n: int = 1) -> WarmUpResult:
        """:meth:`acquire` without the coroutine."""
        state = memory_state(self.store, key)
        now = int(self.store.now() * 1000)
        slot = state.prune(now)
        tokens = state.sync(now, curve)
        if state.passed(slot - 9, slot) + n <= curve.rate(tokens):
            state.count_pass(now, n)
            return WarmUpResult(True, slot, 0.0)
        live = [b for b, c in state.buckets.items() if c > 0 and slot - 9 <= b < slot]
        oldest = min(live, default=slot)
        return WarmUpResult(False, slot, ((oldest + 10) * BUCKET_MS - now) / 1000.0)

    async def acquire(self, key: str, curve: WarmUpCurve, n: int = 1) -> WarmUpResult:
        """Pass ``n`` calls if the warm-up curve allows it now."""
        return self.decide(key, curve, n)

    async def refund(self, key: str, bucket: int, n: int = 1) -> None:
        """Give back ``n`` passes counted in ``bucket``."""
        state: ShapedState | None = self.store.data.get(key)
        if state is not None and bucket in state.buckets:
            state.buckets[bucket] -= n

    def forget(self, key: str) -> None:
        """Drop the state under ``key``."""
        self.store.data.pop(key, None)


class RedisWarmUp:
    """The warm-up on Redis: one ``warmup_acquire.lua`` call per decision."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._acquire = store.script(lua("warmup_acquire", "warmup_lib"))
        self._refund = store.script(lua("warmup_refund"))

    async def acquire(self, key: str, curve: WarmUpCurve, n: int = 1) -> WarmUpResult:
        """Pass ``n`` calls if the warm-up curve allows it now (server time)."""
        warning, max_tokens, slope, cold_factor = curve.args()
        args = (repr(curve.count), warning, max_tokens, slope, cold_factor, n, curve.ttl_ms)
        admitted, value = await self.store.run(self._acquire, (key,), args)
        if int(admitted):
            return WarmUpResult(True, int(value), 0.0)
        return WarmUpResult(False, 0, int(value) / 1000.0)

    async def refund(self, key: str, bucket: int, n: int = 1) -> None:
        """Give back ``n`` passes counted in ``bucket`` (tried even in an outage)."""
        await self.store.run(self._refund, (key,), (bucket, n), always_try=True)

    def forget(self, key: str) -> None:
        """Keys on Redis expire by themselves."""


def warmup_for(store: Store) -> WarmUp:
    """The warm-up primitive of ``store`` (memory or Redis)."""
    if store.kind == "memory":
        return MemoryWarmUp(store)  # type: ignore[arg-type]
    return RedisWarmUp(store)  # type: ignore[arg-type]


__all__ = [
    "BUCKET_MS",
    "MemoryWarmUp",
    "RedisWarmUp",
    "ShapedState",
    "WarmUp",
    "WarmUpCurve",
    "WarmUpResult",
    "memory_state",
    "warmup_for",
]
