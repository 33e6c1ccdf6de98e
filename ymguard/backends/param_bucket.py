"""Hot parameters: a token bucket (or a pacing schedule) per distinct value of a parameter.

The primitive behind ``param_flow`` rules, after Sentinel's ``ParamFlowChecker``:

* **bucket** (``behavior: reject``): a value starts with ``threshold + burst`` tokens and each
  call spends one. Once a whole ``duration`` has passed since the last refill, a call
  refills ``elapsed * threshold / duration`` tokens (never past ``threshold + burst``).
* **pacing** (``behavior: queue``, Sentinel's ``passThrottleLocalCheck``): the calls of one
  value are spaced ``duration / threshold`` ms apart (rounded to the ms, as Sentinel does); a
  call whose slot is more than ``max_queue_ms`` away is refused, the others are told how
  long to wait for their slot.

On Redis each value is one hash key ``prefix:{param:RULE}:VALUE`` (the value encoded by
``Store.key``: long or odd values hashed, never two values in one key, all keys of a rule
in one hash-tag slot) with a TTL of the time after which its state no longer matters; each
decision is one Lua script on the server's clock (``param_bucket_acquire.lua``). The memory
store keeps one least-recently-used table per rule, of at most ``max_values`` values
whatever clients send.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ._lua import lua

if TYPE_CHECKING:
    from ..storage import Store
    from ..storage.memory import MemoryStore
    from ..storage.redis import RedisStore

#: Token bucket (``behavior: reject``).
BUCKET = 0
#: Pacing (``behavior: queue``).
PACING = 1


class BucketSpec(NamedTuple):
    """How one value is limited (the rule's numbers, or an ``items`` override).

    Attributes:
        mode: :data:`BUCKET` or :data:`PACING`.
        threshold: tokens per duration (> 0: a value whose threshold is 0 never gets here).
        burst: extra tokens a full bucket holds.
        duration_ms: the duration in milliseconds.
        max_queue_ms: pacing: the longest wait for a slot.
    """

    mode: int
    threshold: int
    burst: int
    duration_ms: float
    max_queue_ms: float


class ParamResult(NamedTuple):
    """One decision for one value.

    Attributes:
        admitted: whether the call may go (after ``wait_seconds`` when pacing).
        wait_seconds: admitted: how long to wait for the slot (pacing, else 0);
            refused: after how long a retry could pass.
        remaining: tokens left for the value (bucket mode).
        slot: what a refund needs (the refill time, or the reserved pass time: a float
            in process, its text on Redis).
    """

    admitted: bool
    wait_seconds: float
    remaining: int
    slot: str | float


class ParamBuckets(Protocol):
    """The per-value state of one ``param_flow`` rule on one store."""

    async def acquire(self, value: str, spec: BucketSpec) -> ParamResult:
        """Decide one call with parameter value ``value``."""

    async def refund(self, value: str, spec: BucketSpec, slot: str | float) -> None:
        """Give back what :meth:`acquire` granted a call that did not go ahead."""


#: A value's state in process: the last reserved pass (pacing), or (last refill, tokens).
_State = float | tuple[float, int]


def _pacing_cost(spec: BucketSpec) -> float:
    return math.floor(spec.duration_ms / spec.threshold + 0.5)


class MemoryParamBuckets:
    """The per-value state in process: a bounded LRU table of ``value -> state``.

    State is a float (the last reserved pass, pacing) or a tuple ``(last refill ms,
    tokens)`` (bucket). The table lives in ``store.data`` under the rule's key, so the
    checks of one rule (before and after a reload) share it; past ``max_values`` the least
    recently used value is dropped (it starts again with a full bucket).
    """

    def __init__(self, store: MemoryStore, name: str, max_values: int) -> None:
        self.store = store
        self.table_key = store.key("param", name)
        self.max_values = max_values

    @property
    def table(self) -> OrderedDict[str, _State]:
        """The rule's table of values (made at first use)."""
        table: OrderedDict[str, _State] | None = self.store.data.get(self.table_key)
        if table is None:
            table = self.store.data[self.table_key] = OrderedDict()
        return table

    def __len__(self) -> int:
        return len(self.table)

    def decide(self, value: str, spec: BucketSpec) -> ParamResult:
        """:meth:`acquire` without the coroutine (the memory store never waits)."""
        table = self.table
        now = self.store.now() * 1000.0
        state = table.get(value)
        if state is None:
            if len(table) >= self.max_values:
                table.popitem(last=False)
        else:
            table.move_to_end(value)
        if spec.mode == PACING:
            cost = _pacing_cost(spec)
            if not isinstance(state, float) or state + cost <= now:
                table[value] = now
                return ParamResult(True, 0.0, 0, now)
            expected = state + cost
            wait = expected - now
            if wait <= spec.max_queue_ms:
                table[value] = expected
                return ParamResult(True, wait / 1000.0, 0, expected)
            return ParamResult(False, (wait - spec.max_queue_ms) / 1000.0, 0, 0.0)
        full = spec.threshold + spec.burst
        if not isinstance(state, tuple):
            table[value] = (now, full - 1)
            return ParamResult(True, 0.0, full - 1, now)
        last, rest = state
        passed = now - last
        if passed > spec.duration_ms:
            add = math.floor(passed * spec.threshold / spec.duration_ms)
            left = full - 1 if add + rest > full else rest + add - 1
            table[value] = (now, left)
            return ParamResult(True, 0.0, left, now)
        if rest >= 1:
            table[value] = (last, rest - 1)
            return ParamResult(True, 0.0, rest - 1, last)
        return ParamResult(False, (last + spec.duration_ms - now + 1) / 1000.0, 0, last)

    async def acquire(self, value: str, spec: BucketSpec) -> ParamResult:
        """Decide one call with parameter value ``value``."""
        return self.decide(value, spec)

    async def refund(self, value: str, spec: BucketSpec, slot: str | float) -> None:
        """Give back what :meth:`acquire` granted a call that did not go ahead."""
        table = self.table
        state = table.get(value)
        if isinstance(slot, str):
            return
        if spec.mode == PACING:
            # Only the last slot goes back: one with later slots after it stays taken, or
            # the next caller would get a slot a waiter holds (two calls at once).
            if isinstance(state, float) and state == slot:
                table[value] = state - _pacing_cost(spec)
            return
        if isinstance(state, tuple):
            last, rest = state
            if last == slot and rest < spec.threshold + spec.burst:
                table[value] = (last, rest + 1)

    def forget(self) -> None:
        """Drop the rule's table."""
        self.store.data.pop(self.table_key, None)


class RedisParamBuckets:
    """The per-value state on Redis: one hash per value, one script per decision."""

    def __init__(self, store: RedisStore, name: str) -> None:
        self.store = store
        self.name = name
        self._acquire = store.script(lua("param_bucket_acquire"))
        self._refund = store.script(lua("param_bucket_refund"))

    def key(self, value: str) -> str:
        """The Redis key of one value (in the rule's hash-tag slot)."""
        return self.store.key("param", self.name, value)

    async def acquire(self, value: str, spec: BucketSpec) -> ParamResult:
        """Decide one call with parameter value ``value`` (server time)."""
        admitted, wait_ms, remaining, slot = await self.store.run(
            self._acquire,
            (self.key(value),),
            (spec.mode, spec.threshold, spec.burst, spec.duration_ms, spec.max_queue_ms),
        )
        slot = slot.decode() if isinstance(slot, bytes) else str(slot)
        return ParamResult(admitted == 1, float(wait_ms) / 1000.0, int(remaining), slot)

    async def refund(self, value: str, spec: BucketSpec, slot: str | float) -> None:
        """Give back what :meth:`acquire` granted a call that did not go ahead."""
        if not slot or not isinstance(slot, str):
            return
        await self.store.run(
            self._refund,
            (self.key(value),),
            (spec.mode, slot, spec.threshold, spec.burst, spec.duration_ms),
            always_try=True,
        )

    def forget(self) -> None:
        """Keys on Redis expire by themselves."""


def param_buckets(store: Store, name: str, max_values: int) -> ParamBuckets:
    """The per-value state of the rule called ``name`` on ``store``.

    Args:
        store: the guard's store.
        name: the rule's identity (``resource#rule id``), which its keys are named after.
        max_values: the memory store's bound on the values it keeps state for.
    """
    from ..storage.redis import RedisStore

    if isinstance(store, RedisStore):
        return RedisParamBuckets(store, name)
    from ..storage.memory import MemoryStore

    assert isinstance(store, MemoryStore)
    return MemoryParamBuckets(store, name, max_values)


__all__ = [
    "BUCKET",
    "PACING",
    "BucketSpec",
    "MemoryParamBuckets",
    "ParamBuckets",
    "ParamResult",
    "RedisParamBuckets",
    "param_buckets",
]
