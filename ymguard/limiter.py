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
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Literal, NoReturn, TypeVar

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ._kind import Env, Kind
from ._model import Rule, rule_ids
from .backends.permits import (
    MemoryPermits,
    Permits,
    RedisPermits,
    keep_lease,
    keeper_of,
    new_permit_id,
)
from .backends.prefetch import PrefetchWindow
from .backends.window import (
    BUCKETS,
    MemoryWindow,
    RedisWindow,
    Window,
    WindowResult,
)
from .chain import AWAIT, NOTHING, CheckStatus, Context, Stage, cap_origin
from .errors import FlowLimited, Quota, StorageBlocked, StorageUnavailable
from .storage import MemoryStore, RedisStore, Store
from .storage.redis import ScriptCall
from .storage.tasks import in_background

#: Origins one check keeps state for at most (``other`` rules see client-chosen origins).
ORIGIN_CACHE_MAX = 10_000
# How many least-recently-used entries a full table looks at for one that holds nothing
# (a concurrency count with calls in flight is kept if another entry can go instead).
_EVICT_SCAN = 8

T = TypeVar("T")


class FlowRule(Rule):
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

    strategy: Literal["direct", "relate", "chain"] = Field(
        "direct",
        description="direct: this resource's calls; relate: count ref_resource's traffic; "
        "chain: only calls entered from ref_resource",
    )
    ref_resource: str | None = Field(
        None,
        min_length=1,
        validate_default=True,
        description="the resource relate counts, or the one chain's calls enter from",
    )
    prefetch: bool = Field(
        False,
        description="qps on Redis: take permits a few at a time and admit most calls "
        "without a round trip (never more than the limit; unused permits held back "
        "from other processes until their 100 ms bucket ends)",
    )

    @field_validator("behavior")
    @classmethod
    def _behavior_fits(cls, value: str, info: ValidationInfo) -> str:
        if value == "reject":
            return value
        if info.data.get("concurrency") is not None and value != "queue":
            raise ValueError(f"concurrency takes behavior reject or queue, not {value!r}")
        if info.data.get("qps") == 0:
            raise ValueError(f"{value} needs qps >= 1 (qps: 0 blocks every call: use reject)")
        return value

    @field_validator("strategy")
    @classmethod
    def _strategy_fits(cls, value: str, info: ValidationInfo) -> str:
        if value == "relate" and info.data.get("qps") is None:
            raise ValueError("relate counts ref_resource's calls per second: use qps")
        if value == "relate" and info.data.get("behavior", "reject") != "reject":
            raise ValueError("relate takes behavior reject (ref_resource's traffic decides)")
        return value

    @field_validator("ref_resource")
    @classmethod
    def _ref_fits(cls, value: str | None, info: ValidationInfo) -> str | None:
        strategy = info.data.get("strategy")
        if strategy is None:  # the strategy itself was refused
            return value
        if strategy == "direct":
            if value is not None:
                raise ValueError("only strategy relate or chain uses ref_resource")
            return value
        if value is None:
            raise ValueError(f"strategy {strategy} needs ref_resource (a resource name)")
        if value != value.strip() or not value.isprintable():
            raise ValueError("a resource name is printable text without leading or trailing spaces")
        return value

    @field_validator("prefetch")
    @classmethod
    def _prefetch_fits(cls, value: bool, info: ValidationInfo) -> bool:
        if not value:
            return value
        if info.data.get("concurrency") is not None:
            raise ValueError("prefetch takes permits of a qps window, not concurrency")
        if info.data.get("behavior", "reject") != "reject":
            raise ValueError("prefetch takes behavior reject")
        if info.data.get("strategy", "direct") == "relate":
            raise ValueError("prefetch takes strategy direct or chain")
        return value

    @model_validator(mode="after")
    def _one_grade(self) -> FlowRule:
        if (self.qps is None) == (self.concurrency is None):
            raise ValueError("set exactly one of qps or concurrency")
        return self


# -- per-origin state -----------------------------------------------------------------


class OriginTable(Generic[T]):
    """A check's per-origin state: at most ``max_entries`` origins, idle ones swept.

    Origins are client input, so a check may not keep one entry per origin forever. The
    table is a least-recently-used map: when a new origin arrives, entries idle for
    ``idle_seconds`` (their state has lapsed, dropping them changes no answer) are swept
    from the old end, and if it is still full the least recently used entry goes
    (preferring one that holds nothing). ``drop`` is told of every entry that leaves, so
    that the memory store frees the state kept under its keys; on Redis the keys expire.

    Args:
        make: builds the entry of an origin suffix.
        drop: frees an entry's state when it leaves.
        idle_seconds: after this long unused, an entry is swept.
        busy: whether an entry holds something (calls in flight) and should stay.
        max_entries: the bound (default :data:`ORIGIN_CACHE_MAX`).
    """

    __slots__ = ("_busy", "_drop", "_entries", "_make", "idle_seconds", "max_entries")

    def __init__(
        self,
        make: Callable[[str], T],
        drop: Callable[[T], None],
        idle_seconds: float,
        busy: Callable[[T], bool] | None = None,
        max_entries: int | None = None,
    ) -> None:
        self._make = make
        self._drop = drop
        self._busy = busy
        self.idle_seconds = idle_seconds
        self.max_entries = max_entries if max_entries is not None else ORIGIN_CACHE_MAX
        # suffix -> [entry, last used (monotonic)], least recently used first.
        self._entries: OrderedDict[str, list[Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, suffix: str) -> T:
        """The entry of ``suffix``, made (and the table swept) if it is new."""
        now = time.monotonic()
        item = self._entries.get(suffix)
        if item is not None:
            item[1] = now
            self._entries.move_to_end(suffix)
            return item[0]  # type: ignore[no-any-return]
        self._sweep(now)
        entry = self._make(suffix)
        self._entries[suffix] = [entry, now]
        return entry

    def _sweep(self, now: float) -> None:
        entries = self._entries
        idle_before = now - self.idle_seconds
        kept = 0
        while entries:
            suffix, item = next(iter(entries.items()))
            if item[1] > idle_before:
                break
            if self._busy is not None and self._busy(item[0]):
                if kept >= _EVICT_SCAN:
                    break
                kept += 1  # in use: it counts as used now, and the sweep goes on past it
                item[1] = now
                entries.move_to_end(suffix)
                continue
            del entries[suffix]
            self._drop(item[0])
        if len(entries) < self.max_entries:
            return
        victim = next(iter(entries))
        if self._busy is not None:
            for i, suffix in enumerate(entries):
                if i >= _EVICT_SCAN:
                    break
                if not self._busy(entries[suffix][0]):
                    victim = suffix
                    break
        self._drop(entries.pop(victim)[0])

    def clear(self) -> None:
        """Drop every entry."""
        while self._entries:
            self._drop(self._entries.popitem(last=False)[1][0])


# -- checks ----------------------------------------------------------------------------


class _OriginScope:
    """Whether a rule applies to an origin, and the key suffix its counter uses."""

    __slots__ = ("named", "origin")

    def __init__(self, origin: str, named: frozenset[str]) -> None:
        # Callers' origins are capped (``cap_origin``): a rule's names are compared capped.
        self.origin = origin if origin in ("default", "other") else cap_origin(origin)
        self.named = frozenset(cap_origin(name) for name in named)

    def key_for(self, origin: str) -> str | None:
        """The counter suffix for a caller, or ``None`` when the rule does not apply."""
        if self.origin == "default":
            return ""
        if self.origin == "other":
            return origin if origin and origin not in self.named else None
        return origin if origin == self.origin else None


class _FlowCheckBase:
    """What the QPS and concurrency checks share: identity, origin scope, the fallback."""

    limit: int
    _origins: OriginTable[Any]

    def __init__(
        self,
        store: Store,
        resource: str,
        index: int,
        rule: FlowRule,
        named: frozenset[str],
        identity: str | None = None,
    ):
        self.store = store
        self.resource = resource
        self.index = index
        self.rule = rule
        self.scope = _OriginScope(rule.origin, named)
        # State is keyed by the rule's identity (``rule_ids``), not its place in the list.
        self.key_base = f"{resource}#{identity if identity is not None else index}"
        self.policy_name = rule.name or ("flow" if index == 0 else f"flow-{index}")
        grade = f"qps={rule.qps}" if rule.qps is not None else f"concurrency={rule.concurrency}"
        origin = "" if rule.origin == "default" else f" origin={rule.origin}"
        self.description = f"flow[{index}] {grade}{origin}"

    def _on_outage(self) -> Literal["open", "local"]:
        """The store's policy for a call it could not serve (``closed`` raises here)."""
        return self.store.on_outage(
            StorageBlocked(self.resource, self.description, retry_after=1.0)
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resource!r}, {self.description!r})"

    def status(self) -> CheckStatus:
        """The limit, and how many origins the check keeps state for."""
        grade = "qps" if self.rule.qps is not None else "concurrency"
        state = {grade: self.limit, "origins": len(self._origins)}
        return CheckStatus("flow", self.resource, self.description, state)


class QpsCheck(_FlowCheckBase):
    """``qps``: at most ``qps`` calls admitted in any one-second sliding window."""

    kind = "flow"

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
        identity: str | None = None,
    ):
        super().__init__(store, resource, index, rule, named, identity)
        assert rule.qps is not None
        self.limit = rule.qps
        self.window_seconds = window_seconds
        self.window: Window = store.window()
        # The memory window never waits: it is called without a coroutine.
        self._memory = self.window if isinstance(self.window, MemoryWindow) else None
        self._local: Window | None = None
        # Per origin suffix: the key and, on Redis, the call packed once. Every caller
        # shares one entry unless the rule is per origin; then the table bounds them (a
        # window idle for a whole window is empty: dropping it changes no answer).
        self._default = self._key("")
        self._origins: OriginTable[_QpsKey] = OriginTable(
            self._key, self._drop_key, idle_seconds=window_seconds * (1 + 1 / BUCKETS)
        )
        # ``prefetch`` on Redis: permits taken a few at a time, most calls admitted in
        # process without a coroutine (``enter_fast``), the others through ``enter``.
        self._prefetch: PrefetchWindow | None = None
        if rule.prefetch and isinstance(self.window, RedisWindow):
            self._prefetch = PrefetchWindow(self.window, self.limit, window_seconds)
        # On Redis the chain sends the window's script with its neighbours' (one round trip);
        # a prefetched permit joins their batch without a call of its own.
        self.stage_enter: Callable[[Context], Stage | None] | None = None
        if self._prefetch is not None:
            self.stage_enter = self._stage_prefetched
        elif isinstance(self.window, RedisWindow):
            self.stage_enter = self._stage_enter
        # A window that never waits lets the chain enter without a coroutine.
        self.enter_now: Callable[[Context], Any] | None = (
            self._enter_now if self._memory is not None else None
        )
        self.enter_fast: Callable[[Context], Any] | None = (
            self._enter_prefetched if self._prefetch is not None else None
        )

    def _local_window(self) -> Window:
        if self._local is None:
            self._local = self.store.local.window()
        return self._local

    def _key(self, suffix: str) -> _QpsKey:
        key = self.store.key("flow", self.key_base, suffix)
        packed = self.window.pack(key, self.limit, self.window_seconds)
        window = self.window
        if not isinstance(window, RedisWindow):
            return (key, packed, None)

        def decide(reply: Any) -> Any:
            # (admitted, remaining, wait_ms, slot): a result object only for a refusal.
            if reply[0] != 1:
                self._refuse(window.result(reply))
            return (window, key, reply[3])

        # The key's stage is the same for every call: made once, not per request.
        call = window.acquire_call(key, self.limit, self.window_seconds, 1, packed)
        return (key, packed, Stage(self.store, call, decide))

    def _drop_key(self, entry: _QpsKey) -> None:
        self.window.forget(entry[0])
        if self._prefetch is not None:
            self._prefetch.forget(entry[0])
        if self._local is not None:
            self._local.forget(entry[0])

    async def enter(self, ctx: Context) -> Any:
        if self._memory is not None:  # the memory window decides without awaiting
            return self._enter_now(ctx)
        suffix = self.scope.key_for(ctx.origin)
        if suffix is None:
            return None
        key, packed, _ = self._origins.get(suffix) if suffix else self._default
        window = self.window
        try:
            if self._prefetch is not None:
                result = await self._prefetch.acquire(key)
            else:
                result = await window.acquire(key, self.limit, self.window_seconds, packed=packed)
        except StorageUnavailable:
            if self._on_outage() == "open":
                return None
            window = self._local_window()
            result = await window.acquire(key, self.limit, self.window_seconds)
        if not result.admitted:
            self._refuse(result)
        return (window, key, result.slot)

    def _enter_now(self, ctx: Context) -> Any:
        """``enter`` without a coroutine, on a window that never waits (memory)."""
        scope = self.scope
        if scope.origin == "default":  # every caller shares one counter
            key = self._default[0]
        else:
            suffix = scope.key_for(ctx.origin)
            if suffix is None:
                return None
            key = (self._origins.get(suffix) if suffix else self._default)[0]
        memory = self._memory
        assert memory is not None
        slot = memory.take(key, self.limit, self.window_seconds)  # no result built
        if slot is None:
            self._refuse(memory.refusal(key, self.limit, self.window_seconds))
        return (memory, key, slot)

    def _prefetch_key(self, ctx: Context) -> str | None:
        """The key of the caller's count, or None where the rule does not apply."""
        scope = self.scope
        if scope.origin == "default":
            return self._default[0]
        suffix = scope.key_for(ctx.origin)
        if suffix is None:
            return None
        return (self._origins.get(suffix) if suffix else self._default)[0]

    def _enter_prefetched(self, ctx: Context) -> Any:
        """``enter`` from the prefetched permits in process, or AWAIT (then ``enter``)."""
        key = self._prefetch_key(ctx)
        if key is None:
            return None
        prefetch = self._prefetch
        assert prefetch is not None
        slot = prefetch.take_now(key)
        if slot is None:
            return AWAIT
        return (self.window, key, slot)

    def _stage_prefetched(self, ctx: Context) -> Stage | None:
        """A prefetched permit, decided in its place in a batch of its neighbours' calls
        (no call of its own; given back if the batch is cancelled). When the stock is
        empty, a fetch rides in the batch instead (its reply stocks the permits); in an
        outage, None: the plain ``enter``."""
        store = self.store
        key = self._prefetch_key(ctx)
        if key is None:
            return Stage(store, None, _no_token)
        prefetch = self._prefetch
        assert prefetch is not None
        slot = prefetch.take_now(key)
        if slot is not None:
            return _PrefetchedStage(self, (self.window, key, slot))
        fetch = prefetch.fetch_call(key) if store.available else None
        if fetch is None:
            return None  # another fetch is on its way (or an outage): the plain enter
        return _FetchStage(self, prefetch, key, *fetch)

    async def _give_back(self, token: Any) -> None:
        """Give back the permit of a call that did not run: to the stock while its bucket
        runs (prefetched), else to the window."""
        window, key, slot = token
        prefetch = self._prefetch
        if window is self.window and prefetch is not None and prefetch.give_back(key, slot):
            return
        try:
            await window.refund(key, slot)
        except StorageUnavailable:
            pass

    def _stage_enter(self, ctx: Context) -> Stage | None:
        """``enter``'s script for the chain to send (None in an outage: plain ``enter``)."""
        store = self.store
        if not store.available:
            return None
        if self.scope.origin == "default":  # every caller shares one counter
            return self._default[2]
        suffix = self.scope.key_for(ctx.origin)
        if suffix is None:
            return Stage(store, None, _no_token)
        return (self._origins.get(suffix) if suffix else self._default)[2]

    def status(self) -> CheckStatus:
        """The limit, the origins kept, and with ``prefetch`` the permits held here."""
        found = super().status()
        if self._prefetch is None:
            return found
        state = {**found.state, "prefetched": self._prefetch.held()}
        return CheckStatus(found.kind, found.resource, found.rule, state)

    def _refuse(self, result: WindowResult) -> NoReturn:
        quota = Quota(self.policy_name, self.limit, self.window_seconds, 0, result.wait_seconds)
        raise FlowLimited(
            self.resource, self.description, retry_after=result.wait_seconds, quota=quota
        )

    async def exit(self, ctx: Context, token: Any) -> None:
        if token is not None and ctx.blocked is not None:
            await self._give_back(token)


class _PrefetchedStage(Stage):
    """A prefetched permit in a batch: decided without a call of its own, given back if
    the batch is cancelled (``decide`` and ``undo`` are methods: one object per call, see
    :class:`~ymguard.chain.Stage`)."""

    __slots__ = ("check", "token")

    def __init__(self, check: QpsCheck, token: tuple[Any, str, Any]) -> None:
        self.store = check.store
        self.call = None
        self.check = check
        self.token = token

    def decide(self, reply: Any) -> Any:
        return self.token

    def undo(self) -> Awaitable[None]:
        return self.check._give_back(self.token)


class _FetchStage(Stage):
    """A prefetch's fetch riding in a batch: its reply stocks the permits and admits this
    call, or refuses it (``decide`` is a method: see :class:`~ymguard.chain.Stage`)."""

    __slots__ = ("check", "key", "prefetch", "sent_at", "stock", "window")

    def __init__(
        self,
        check: QpsCheck,
        prefetch: PrefetchWindow,
        key: str,
        call: ScriptCall,
        stock: Any,  # the prefetch's stock of the key
        sent_at: float,
    ) -> None:
        window = check.window
        assert isinstance(window, RedisWindow)
        self.store = check.store
        self.call = call
        self.undo = None
        self.check = check
        self.prefetch = prefetch
        self.window = window
        self.key = key
        self.stock = stock
        self.sent_at = sent_at

    def decide(self, reply: Any) -> Any:
        got = self.window.prefetched(reply)
        slot = self.prefetch.stocked(self.key, self.stock, got, self.sent_at)
        if slot is None:
            self.check._refuse(WindowResult(False, got.remaining, got.wait_seconds, got.slot))
        return (self.window, self.key, slot)

    def late(self, reply: Any) -> None:
        """The reply after its caller was cancelled: the permits it brought are stocked for
        the other calls, the caller's own one too (else they would count, unused, until
        their bucket leaves the window)."""
        got = self.window.prefetched(reply)
        slot = self.prefetch.stocked(self.key, self.stock, got, self.sent_at)
        if slot is not None and not self.prefetch.give_back(self.key, slot):
            in_background(self.window.refund(self.key, slot, 1))


class _AcquireStage(Stage):
    """A concurrency permit's acquire in the chain's batch (``decide`` and ``undo`` are
    methods: one object per call, see :class:`~ymguard.chain.Stage`)."""

    __slots__ = ("backend", "check", "permit_id")

    def __init__(self, check: ConcurrencyCheck, backend: RedisPermits, permit_id: str) -> None:
        self.store = check.store
        self.call = backend.acquire_call(permit_id, check.limit, check.rule.lease_seconds)
        self.check = check
        self.backend = backend
        self.permit_id = permit_id

    def decide(self, reply: Any) -> Any:
        backend, permit_id, check = self.backend, self.permit_id, self.check
        if not int(reply[0]):  # (acquired, ...): no AcquireResult needed to refuse
            raise FlowLimited(check.resource, check.description, retry_after=1.0)
        return keep_lease(backend, permit_id, check.rule.lease_seconds)

    def undo(self) -> Awaitable[bool]:
        return self.backend.release(self.permit_id)


class ConcurrencyCheck(_FlowCheckBase):
    """``concurrency``: at most this many calls in flight, counted with leased permits."""

    kind = "flow"

    def __init__(
        self,
        store: Store,
        resource: str,
        index: int,
        rule: FlowRule,
        named: frozenset[str],
        identity: str | None = None,
    ):
        super().__init__(store, resource, index, rule, named, identity)
        assert rule.concurrency is not None
        self.limit = rule.concurrency
        # Per origin suffix: the store's permits and the local fallback's (made on
        # demand). A count with calls in flight stays; one without holds no state at all,
        # so a second unused is idle enough (a returning caller reuses its entry).
        self._default: _Count | None = None
        self._origins: OriginTable[_Count] = OriginTable(
            self._entry, _Count.forget, idle_seconds=1.0, busy=_Count.busy
        )
        # On Redis the chain sends acquire and release with the other checks' scripts.
        staged = isinstance(store, RedisStore)
        self.stage_enter: Callable[[Context], Stage | None] | None = (
            self._stage_enter if staged else None
        )
        self.stage_exit: Callable[[Context, Any], Any] | None = self._stage_exit if staged else None
        # In process nothing waits: the chain enters and exits without a coroutine.
        memory = isinstance(store, MemoryStore)
        self.enter_now: Callable[[Context], Any] | None = self._enter_now if memory else None
        self.exit_now: Callable[[Context, Any], None] | None = self._exit_now if memory else None

    def _entry(self, suffix: str) -> _Count:
        return _Count(self.store.permits(self._name(suffix), "conc"))

    def _name(self, suffix: str) -> str:
        return f"{self.key_base}:{suffix}" if suffix else self.key_base

    def _backend(self, suffix: str, local: bool = False) -> Permits:
        if suffix:
            entry = self._origins.get(suffix)
        else:
            entry = self._default = self._default or self._entry("")
        if not local:
            return entry.permits
        if entry.local is None:
            entry.local = self.store.local.permits(self._name(suffix), "conc")
        return entry.local

    def _permits_for(self, origin: str) -> Permits | None:
        """The store's permits that count a caller, or None where the rule does not apply
        to it. A rule for every caller (one count) finds them without ``key_for`` and
        ``_backend``: every request of a concurrency rule asks, as the qps check does."""
        count = self._default
        if count is not None and self.scope.origin == "default":
            return count.permits
        suffix = self.scope.key_for(origin)
        return None if suffix is None else self._backend(suffix)

    async def enter(self, ctx: Context) -> Any:
        if self.enter_now is not None:
            return self.enter_now(ctx)
        suffix = self.scope.key_for(ctx.origin)
        if suffix is None:
            return None
        backend = self._backend(suffix)
        permit_id = new_permit_id()
        try:
            result = await backend.acquire(permit_id, self.limit, self.rule.lease_seconds)
        except StorageUnavailable:
            if self._on_outage() == "open":
                return None
            backend = self._backend(suffix, local=True)
            result = await backend.acquire(permit_id, self.limit, self.rule.lease_seconds)
        except asyncio.CancelledError:
            # The script may have run although its reply will never be read: give the
            # permit back by its id rather than hold it until the lease ends.
            in_background(backend.release(permit_id))
            raise
        if not result.acquired:
            raise FlowLimited(self.resource, self.description, retry_after=1.0)
        # A call longer than a third of the lease has it renewed, so it keeps its count.
        # The token is the kept lease (it names the backend and the permit).
        return keep_lease(backend, permit_id, self.rule.lease_seconds)

    def _enter_now(self, ctx: Context) -> Any:
        """``enter`` without a coroutine, on the memory store."""
        backend = self._permits_for(ctx.origin)
        if backend is None:
            return None
        assert isinstance(backend, MemoryPermits)
        # The keeper first: without a running loop (sync code run at once) it raises
        # before a permit is taken, not after (the permit would leak).
        keeper = keeper_of(backend)
        permit_id = new_permit_id()
        lease = self.rule.lease_seconds
        if backend.take_now(permit_id, self.limit, lease) is not None:
            raise FlowLimited(self.resource, self.description, retry_after=1.0)
        return keeper.keep(backend, permit_id, lease)

    def _stage_enter(self, ctx: Context) -> Stage | None:
        """``enter``'s script for the chain to send (None in an outage: plain ``enter``)."""
        store = self.store
        if not store.available:
            return None
        backend = self._permits_for(ctx.origin)
        if backend is None:
            return Stage(store, None, _no_token)
        assert isinstance(backend, RedisPermits)
        return _AcquireStage(self, backend, new_permit_id())

    def _stage_exit(self, ctx: Context, token: Any) -> Any:
        """``exit``'s release for the chain to send with the others."""
        if token is None:
            return NOTHING
        backend = token.backend
        if not isinstance(backend, RedisPermits):
            return None  # admitted by the local fallback: its plain exit
        token.stop()
        return Stage(self.store, backend.release_call(token.permit_id))

    def _exit_now(self, ctx: Context, token: Any) -> None:
        """``exit`` without a coroutine, on the memory store."""
        if token is not None:
            token.stop()
            token.backend.release_now(token.permit_id)

    async def exit(self, ctx: Context, token: Any) -> None:
        if self.exit_now is not None:
            self.exit_now(ctx, token)
        elif token is not None:
            token.stop()
            try:
                await token.backend.release(token.permit_id)
            except StorageUnavailable:
                pass  # the lease frees it


class _Count:
    """A concurrency count of one origin suffix: the store's permits, and the fallback's."""

    __slots__ = ("local", "permits")

    def __init__(self, permits: Permits) -> None:
        self.permits = permits
        self.local: Permits | None = None

    def busy(self) -> bool:
        """Whether the count has calls in flight (or waiting) in process."""
        return self.permits.busy() or (self.local is not None and self.local.busy())

    def forget(self) -> None:
        """Free the count's in-process state (on Redis its keys expire)."""
        self.permits.forget()
        if self.local is not None:
            self.local.forget()


FlowCheck = QpsCheck | ConcurrencyCheck


#: A QPS rule's key, its call packed once (Redis) and its stage for the chain (Redis).
_QpsKey = tuple[str, bytes | None, Stage | None]


def _no_token(reply: Any) -> None:
    """The decision of a rule that does not apply to the caller: admitted, nothing taken."""
    return None


def _build(env: Env, resource: str, rules: list[FlowRule]) -> list[Any]:
    return build_flow_checks(env.store, resource, rules)


#: The ``flow`` kind's registry entry.
KIND = Kind("flow", 40, FlowRule, _build)


def build_flow_checks(store: Store, resource: str, rules: list[FlowRule]) -> list[Any]:
    """The checks for a resource's ``flow`` rules, in file order.

    A reject rule of strategy ``direct`` is a :class:`QpsCheck` or
    :class:`ConcurrencyCheck`; the other behaviours and strategies are the checks of
    ``shaping.py``. A resource that ``relate`` rules name counts its calls first.
    """
    from .shaping import build_shaped_check, recorder_for

    named = frozenset(r.origin for r in rules if r.origin not in ("default", "other"))
    checks: list[Any] = []
    recorder = recorder_for(store, resource)  # relate rules of other resources count us
    if recorder is not None:
        checks.append(recorder)
    for index, (rule, identity) in enumerate(zip(rules, rule_ids(rules), strict=True)):
        direct: FlowCheck | None = None
        if rule.behavior == "reject" and rule.strategy != "relate":
            if rule.qps is not None:
                direct = QpsCheck(store, resource, index, rule, named, identity=identity)
            else:
                direct = ConcurrencyCheck(store, resource, index, rule, named, identity)
            if rule.strategy == "direct":
                checks.append(direct)
                continue
        checks.append(build_shaped_check(store, resource, index, rule, named, identity, direct))
    return checks


__all__ = [
    "KIND",
    "ConcurrencyCheck",
    "FlowRule",
    "QpsCheck",
    "WindowResult",
    "build_flow_checks",
]
