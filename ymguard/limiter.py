"""Flow rules: QPS and concurrency limits (Sentinel's ``FlowRule``).

``qps`` counts admitted calls in a sliding window of buckets (the last second, cut in ten)
kept on the store: on Redis one Lua script reads the window, drops stale buckets and
counts the call, with the server's clock. ``concurrency`` counts calls in flight with
leased permits (``semaphore.py``), so a process that dies mid-request frees its count
when the lease passes.

Origins follow Sentinel's ``limitApp``: ``default`` counts every caller together, a name
counts only that origin, and ``other`` gives each origin that no other rule of the
resource names a limit of its own.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from typing import Any, Literal, NamedTuple

from pydantic import Field, field_validator, model_validator

from ._model import RuleModel
from .chain import Context
from .errors import FlowLimited, Quota, StorageBlocked, StorageUnavailable
from .lua import lua
from .semaphore import keep_lease, permits_backend
from .storage import MemoryStore, RedisStore, Store

BUCKETS = 10
#: Per-origin objects a check keeps at most (``other`` rules see client-chosen origins).
ORIGIN_CACHE_MAX = 10_000


class FlowRule(RuleModel):
    """One ``flow`` rule of a resource (see ``RULES.md``)."""

    qps: int | None = Field(None, ge=0, description="calls admitted per second")
    concurrency: int | None = Field(None, ge=0, description="calls in flight at once")
    behavior: Literal["reject", "warm_up", "queue", "warm_up_queue"] = "reject"
    warm_up_seconds: float = Field(10, gt=0)
    cold_factor: float = Field(3, gt=1)
    max_queue_ms: int = Field(500, ge=0)
    origin: str = Field("default", min_length=1)
    name: str | None = Field(None, description="policy name in the RateLimit headers")
    lease_seconds: float = Field(
        30, gt=0, description="concurrency: a dead process's count is freed after this"
    )

    @field_validator("behavior")
    @classmethod
    def _only_reject(cls, value: str) -> str:
        if value != "reject":
            raise ValueError(f"behavior {value!r} is not supported yet; use 'reject'")
        return value

    @model_validator(mode="after")
    def _one_grade(self) -> FlowRule:
        if (self.qps is None) == (self.concurrency is None):
            raise ValueError("set exactly one of qps or concurrency")
        return self


# -- the sliding window, on each store -----------------------------------------------


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


class _MemoryWindow:
    """The sliding window in process: ``{slot: count}`` under the key."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def acquire_now(self, key: str, limit: int, window: float, n: int = 1) -> WindowResult:
        """:meth:`acquire` without the coroutine: the memory window never waits."""
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

    async def acquire(self, key: str, limit: int, window: float, n: int = 1) -> WindowResult:
        """Count ``n`` calls in the window ending now if ``limit`` allows."""
        return self.acquire_now(key, limit, window, n)

    async def refund(self, key: str, slot: int | bytes, n: int = 1) -> None:
        """Give back ``n`` calls counted in ``slot`` (if it is still in the window)."""
        counts: dict[int, int] | None = self.store.data.get(key)
        if counts and slot in counts:
            counts[slot] -= n


class _RedisWindow:
    """The sliding window on Redis (``window_acquire.lua``, ``window_refund.lua``)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._acquire = store.script(lua("window_acquire"))
        self._refund = store.script(lua("window_refund"))

    def pack(self, key: str, limit: int, window: float, n: int = 1) -> bytes | None:
        """The packed call for a key whose arguments never change (see ``RedisStore.pack``)."""
        return self.store.pack(self._acquire, (key,), self._args(limit, window, n))

    @staticmethod
    def _args(limit: int, window: float, n: int) -> tuple[int, int, int, int]:
        return (limit, math.ceil(window * 1000), BUCKETS, n)

    async def acquire(
        self, key: str, limit: int, window: float, n: int = 1, packed: bytes | None = None
    ) -> WindowResult:
        """Count ``n`` calls in the window ending now (server time) if ``limit`` allows."""
        admitted, remaining, wait_ms, slot = await self.store.run(
            self._acquire, (key,), self._args(limit, window, n), packed
        )
        return WindowResult(admitted == 1, remaining, wait_ms / 1000.0, slot)

    async def refund(self, key: str, slot: int | bytes, n: int = 1) -> None:
        """Give back ``n`` calls counted in ``slot`` (if it is still in the window)."""
        await self.store.run(self._refund, (key,), (slot, n), always_try=True)


Window = _MemoryWindow | _RedisWindow


def window_backend(store: Store) -> Window:
    """The sliding-window implementation for a store."""
    if isinstance(store, RedisStore):
        return _RedisWindow(store)
    assert isinstance(store, MemoryStore)
    return _MemoryWindow(store)


# -- checks ----------------------------------------------------------------------------


class _OriginScope:
    """Whether a rule applies to an origin, and the key suffix its counter uses."""

    __slots__ = ("named", "origin")

    def __init__(self, origin: str, named: frozenset[str]) -> None:
        self.origin = origin
        self.named = named

    def key_for(self, origin: str) -> str | None:
        """The counter suffix for a caller, or ``None`` when the rule does not apply."""
        if self.origin == "default":
            return ""
        if self.origin == "other":
            return origin if origin and origin not in self.named else None
        return origin if origin == self.origin else None


class _FlowCheckBase:
    """What the QPS and concurrency checks share: identity, origin scope, the fallback."""

    def __init__(
        self, store: Store, resource: str, index: int, rule: FlowRule, named: frozenset[str]
    ):
        self.store = store
        self.resource = resource
        self.index = index
        self.rule = rule
        self.scope = _OriginScope(rule.origin, named)
        self.key_base = f"{resource}#{index}"
        self.policy_name = rule.name or ("flow" if index == 0 else f"flow-{index}")
        grade = f"qps={rule.qps}" if rule.qps is not None else f"concurrency={rule.concurrency}"
        origin = "" if rule.origin == "default" else f" origin={rule.origin}"
        self.description = f"flow[{index}] {grade}{origin}"

    def _unavailable(self) -> StorageBlocked | None:
        """Apply ``on_storage_error``: an error to raise (closed), or None (open/local)."""
        if self.store.on_storage_error == "closed":
            return StorageBlocked(self.resource, self.description, retry_after=1.0)
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resource!r}, {self.description!r})"


class QpsCheck(_FlowCheckBase):
    """``qps``: at most ``qps`` calls admitted in any one-second sliding window."""

    #: A QPS window only gives back when a later check blocks: a finished call has
    #: nothing to return, so the chain skips this check's exit then.
    exit_after_call = False

    def __init__(
        self,
        store: Store,
        resource: str,
        index: int,
        rule: FlowRule,
        named: frozenset[str],
        window_seconds: float = 1.0,
    ):
        super().__init__(store, resource, index, rule, named)
        assert rule.qps is not None
        self.limit = rule.qps
        self.window_seconds = window_seconds
        self.window = window_backend(store)
        self._memory = self.window if isinstance(self.window, _MemoryWindow) else None
        self._redis = self.window if isinstance(self.window, _RedisWindow) else None
        self._local: _MemoryWindow | None = None
        # Per origin suffix: the key and, on Redis, the call packed once.
        self._keys: dict[str, tuple[str, bytes | None]] = {}

    def _local_window(self) -> _MemoryWindow:
        if self._local is None:
            self._local = _MemoryWindow(MemoryStore(key_prefix=self.store.key_prefix))
        return self._local

    def _key(self, suffix: str) -> tuple[str, bytes | None]:
        key = self.store.key("flow", self.key_base, suffix)
        packed = None
        if self._redis is not None:
            packed = self._redis.pack(key, self.limit, self.window_seconds)
        if len(self._keys) >= ORIGIN_CACHE_MAX:  # origins come from clients: stay bounded
            self._keys.clear()
        entry = self._keys[suffix] = (key, packed)
        return entry

    async def enter(self, ctx: Context) -> Any:
        suffix = self.scope.key_for(ctx.origin)
        if suffix is None:
            return None
        key, packed = self._keys.get(suffix) or self._key(suffix)
        window: Window
        if self._redis is None:
            assert self._memory is not None
            window = self._memory
            result = window.acquire_now(key, self.limit, self.window_seconds)
        else:
            window = self._redis
            try:
                result = await self._redis.acquire(
                    key, self.limit, self.window_seconds, packed=packed
                )
            except StorageUnavailable:
                if (error := self._unavailable()) is not None:
                    raise error from None
                if self.store.on_storage_error == "open":
                    return None
                window = self._local_window()
                result = window.acquire_now(key, self.limit, self.window_seconds)
        if not result.admitted:
            quota = Quota(self.policy_name, self.limit, self.window_seconds, 0, result.wait_seconds)
            raise FlowLimited(
                self.resource, self.description, retry_after=result.wait_seconds, quota=quota
            )
        return (window, key, result.slot)

    async def exit(self, ctx: Context, token: Any) -> None:
        if token is not None and ctx.blocked is not None:
            window, key, slot = token
            try:
                await window.refund(key, slot)
            except StorageUnavailable:
                pass


class ConcurrencyCheck(_FlowCheckBase):
    """``concurrency``: at most this many calls in flight, counted with leased permits."""

    def __init__(
        self, store: Store, resource: str, index: int, rule: FlowRule, named: frozenset[str]
    ):
        super().__init__(store, resource, index, rule, named)
        assert rule.concurrency is not None
        self.limit = rule.concurrency
        self._backends: dict[str, Any] = {}
        self._local_store: MemoryStore | None = None

    def _backend(self, suffix: str, local: bool = False) -> Any:
        cache_key = ("local:" if local else "") + suffix
        backend = self._backends.get(cache_key)
        if backend is None:
            store: Store = self.store
            if local:
                if self._local_store is None:
                    self._local_store = MemoryStore(key_prefix=self.store.key_prefix)
                store = self._local_store
            name = f"{self.key_base}:{suffix}" if suffix else self.key_base
            if len(self._backends) >= ORIGIN_CACHE_MAX:  # origins come from clients
                self._backends.clear()
            backend = self._backends[cache_key] = permits_backend(store, name, "conc")
        return backend

    async def enter(self, ctx: Context) -> Any:
        suffix = self.scope.key_for(ctx.origin)
        if suffix is None:
            return None
        backend = self._backend(suffix)
        permit_id = secrets.token_hex(8)
        try:
            result = await backend.acquire(permit_id, self.limit, self.rule.lease_seconds)
        except StorageUnavailable:
            if (error := self._unavailable()) is not None:
                raise error from None
            if self.store.on_storage_error == "open":
                return None
            backend = self._backend(suffix, local=True)
            result = await backend.acquire(permit_id, self.limit, self.rule.lease_seconds)
        except asyncio.CancelledError:
            # The script may have run although its reply will never be read: give the
            # permit back by its id rather than hold it until the lease ends.
            _release_later(backend, permit_id)
            raise
        if not result.acquired:
            raise FlowLimited(self.resource, self.description, retry_after=1.0)
        # A call longer than a third of the lease has it renewed, so it keeps its count.
        return (backend, permit_id, keep_lease(backend, permit_id, self.rule.lease_seconds))

    async def exit(self, ctx: Context, token: Any) -> None:
        if token is not None:
            backend, permit_id, kept = token
            kept.stop()
            try:
                await backend.release(permit_id)
            except StorageUnavailable:
                pass  # the lease frees it


FlowCheck = QpsCheck | ConcurrencyCheck

_background: set[asyncio.Task[Any]] = set()


def _release_later(backend: Any, permit_id: str) -> None:
    async def release() -> None:
        try:
            await backend.release(permit_id)
        except StorageUnavailable:
            pass  # the lease frees it

    task = asyncio.ensure_future(release())
    _background.add(task)
    task.add_done_callback(_background.discard)


def build_flow_checks(store: Store, resource: str, rules: list[FlowRule]) -> list[FlowCheck]:
    """The checks for a resource's ``flow`` rules, in file order."""
    named = frozenset(r.origin for r in rules if r.origin not in ("default", "other"))
    checks: list[FlowCheck] = []
    for index, rule in enumerate(rules):
        cls = QpsCheck if rule.qps is not None else ConcurrencyCheck
        checks.append(cls(store, resource, index, rule, named))
    return checks


__all__ = [
    "ConcurrencyCheck",
    "FlowRule",
    "QpsCheck",
    "WindowResult",
    "build_flow_checks",
    "window_backend",
]
