"""Leased permits: a count of holders whose permits expire if the holder dies.

The primitive behind semaphores and the ``concurrency`` grade of flow rules. On Redis the
holders are a sorted set scored by lease expiry (server time); acquire, release and renew
are each one Lua script (``permit_*.lua``) that first reclaims expired leases. Waiters
stand in a line (a second sorted set, by arrival) and are woken by a release through
pub/sub (a channel per permit set, on the store's one pub/sub connection:
:mod:`ymguard.storage.pubsub`). The memory store keeps the same structures in process.
One :class:`LeaseKeeper` task per store and event loop renews the leases of long holders.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import math
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol
from weakref import ref

from ..errors import StorageUnavailable
from ..storage.pubsub import close_pubsub, pubsub_for, pubsub_of
from ..storage.redis import ScriptCall, new_call
from ..storage.tasks import stopped
from ._lua import lua

if TYPE_CHECKING:
    from ..storage.base import Store
    from ..storage.memory import MemoryStore
    from ..storage.redis import RedisStore

log = logging.getLogger("ymguard.semaphore")

#: How long a waiter waits for its subscription to be confirmed before it falls back to naps.
_SUBSCRIBE_TIMEOUT = 1.0


def _new_prefix() -> None:
    global _prefix, _serial
    _prefix = os.urandom(8).hex() + "-"
    _serial = itertools.count(1)


_prefix = ""
_serial = itertools.count(1)
_new_prefix()
os.register_at_fork(after_in_child=_new_prefix)  # a forked worker draws its own prefix


def new_permit_id() -> str:
    """A permit's id, unique across processes and hosts: 64 random bits drawn once per
    process (again after a fork), then a counter in decimal. Ids are never shown to
    clients; this costs a sixth of ``secrets.token_hex(8)`` per call (a hex counter, a
    third: formatting with ``:x`` costs three times ``str``), and a request takes two."""
    return f"{_prefix}{next(_serial)}"


class AcquireResult:
    """What one acquire attempt found (a plain class: two are built per guarded request).

    Attributes:
        acquired: whether a permit was taken.
        expires_at: the new lease's expiry (store clock, seconds) when acquired.
        retry_after: when not acquired, seconds until a lease expiry could let this caller
            in (-1: no expiry will; only a release or more permits can).
        waiting: when not acquired, how many waiters stand in line.
    """

    __slots__ = ("acquired", "expires_at", "retry_after", "waiting")

    def __init__(
        self,
        acquired: bool,
        expires_at: float = 0.0,
        retry_after: float = -1.0,
        waiting: int = 0,
    ) -> None:
        self.acquired = acquired
        self.expires_at = expires_at
        self.retry_after = retry_after
        self.waiting = waiting

    def __repr__(self) -> str:
        return (
            f"AcquireResult(acquired={self.acquired}, expires_at={self.expires_at}, "
            f"retry_after={self.retry_after}, waiting={self.waiting})"
        )


@dataclass(frozen=True, slots=True)
class PermitKeys:
    holders: str
    permits: str
    line: str
    places: str
    channel: str

    #: The four keys every permit script takes, in order (one tuple, made once).
    all: tuple[str, str, str, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "all", (self.holders, self.permits, self.line, self.places))


class Permits(Protocol):
    """Leased permits called one name on one store (memory or Redis)."""

    keys: PermitKeys
    #: The lease keeper of its store, once a lease was kept (see :func:`keeper_of`).
    keeper: LeaseKeeper | None

    @property
    def store(self) -> Store:
        """The store the permits live on."""

    async def acquire(
        self, permit_id: str, permits: int, lease: float, place: float = 0.0
    ) -> AcquireResult:
        """Take a permit; ``place`` > 0 joins the line for that long if none is free."""

    async def release(self, permit_id: str) -> bool:
        """Give a permit back (or leave the line); whether it was still held."""

    async def renew_many(self, permit_ids: Sequence[str], lease: float) -> list[float]:
        """Extend leases from now; per id the new expiry, or 0.0 if it had expired."""

    async def renew(self, permit_id: str, lease: float) -> float:
        """Extend one lease from now; the new expiry, or 0.0 if it had expired."""

    async def state(self, permits: int) -> tuple[int, int, int]:
        """``(held, permits, waiting)`` now."""

    async def held(self) -> int:
        """How many unexpired permits are held now."""

    async def set_permits(self, mode: Literal["set", "add"], n: int, permits: int) -> int:
        """Set (or add to) the shared permit count; returns the new count."""

    def listening(self) -> bool:
        """Whether wake-ups already reach this process."""

    async def listen(
        self, permit_id: str, deadline: float = math.inf
    ) -> tuple[asyncio.Event, bool]:
        """The event that wakes ``permit_id``, and whether wake-ups are reliable now."""

    def unlisten(self, permit_id: str) -> None:
        """Forget a waiter's event."""

    def busy(self) -> bool:
        """Whether this process knows of holders or waiters (in process only)."""

    def forget(self) -> None:
        """Drop the in-process state (a no-op where keys expire)."""


class LeaseHolder(Protocol):
    """What the keeper updates after a renewal (a :class:`~ymguard.semaphore.Permit`)."""

    expires_at: float


class MemoryPermits:
    """Leased permits in process, with the same line and wake-ups as on Redis.

    Under the store keys: ``{permit id: expiry}`` (holders), a heap of ``(expiry, id)`` to
    find lapsed leases without a scan, ``{waiter id: place lapses at}`` in arrival order
    (the line), and ``{waiter id: asyncio.Event}`` (the listeners, the in-process pub/sub).
    """

    def __init__(self, store: MemoryStore, keys: PermitKeys) -> None:
        self.store = store
        self.keys = keys
        self.permits = 0
        self.keeper: LeaseKeeper | None = None
        data = store.data
        self._holders: dict[str, float] = data.setdefault(keys.holders, {})
        self._heap: list[tuple[float, str]] = data.setdefault(keys.holders + ":heap", [])
        self._line: dict[str, float] = data.setdefault(keys.line, {})
        self._listeners: dict[str, asyncio.Event] = data.setdefault(keys.channel, {})

    def _reclaim(self) -> tuple[float, int]:
        now = self.store.now()
        holders, heap, reclaimed = self._holders, self._heap, 0
        while heap and heap[0][0] <= now:
            expiry, pid = heapq.heappop(heap)
            if holders.get(pid) == expiry:
                del holders[pid]
                reclaimed += 1
        if len(heap) > 4 * len(holders) + 64:  # renewals and releases leave stale entries
            heap[:] = [(exp, pid) for pid, exp in holders.items()]
            heapq.heapify(heap)
        if self._line:
            for pid in [p for p, lapse in self._line.items() if lapse <= now]:
                del self._line[pid]
                reclaimed += 1
        return now, reclaimed

    def _count(self, default: int) -> int:
        return int(self.store.data.get(self.keys.permits, default))

    def _hold(self, pid: str, expiry: float) -> None:
        self._holders[pid] = expiry
        heapq.heappush(self._heap, (expiry, pid))

    def _wake(self, free: int) -> None:
        if free <= 0 or not self._line:
            return
        for i, pid in enumerate(self._line):
            if i >= free:
                break
            event = self._listeners.get(pid)
            if event is not None:
                event.set()

    def _rank(self, pid: str) -> int | None:
        if pid not in self._line:
            return None
        for i, other in enumerate(self._line):
            if other == pid:
                return i
        return None  # pragma: no cover - it is in the line

    async def acquire(
        self, permit_id: str, permits: int, lease: float, place: float = 0.0
    ) -> AcquireResult:
        """Take a permit (see ``permit_acquire.lua``, which this mirrors)."""
        return self.acquire_now(permit_id, permits, lease, place)

    def take_now(self, permit_id: str, permits: int, lease: float) -> AcquireResult | None:
        """Take a permit without standing in line: None when it was taken, else the
        refusal (what :meth:`acquire_now` found). For a check, on every request.

        The usual case (no line, no lease lapsed, a permit free) costs a clock read, a
        dict and a heap entry: no reclaim, no result built.
        """
        heap = self._heap
        holders = self._holders
        if not self._line and len(heap) <= 4 * len(holders) + 64:  # (see _reclaim)
            now = self.store.now()
            if (not heap or heap[0][0] > now) and len(holders) < self.store.data.get(
                self.keys.permits, permits
            ):
                self.permits = permits
                expiry = holders[permit_id] = now + lease
                heapq.heappush(heap, (expiry, permit_id))
                return None
        result = self.acquire_now(permit_id, permits, lease)
        return None if result.acquired else result

    def acquire_now(
        self, permit_id: str, permits: int, lease: float, place: float = 0.0
    ) -> AcquireResult:
        """:meth:`acquire` without a coroutine (in process, nothing waits)."""
        self.permits = permits
        now, reclaimed = self._reclaim()
        free = self._count(permits) - len(self._holders)
        line = self._line
        rank = self._rank(permit_id) if line else None
        queued = len(line)
        pos = queued if rank is None else rank
        if pos < free:
            self._hold(permit_id, now + lease)
            if rank is not None:
                del self._line[permit_id]
            if reclaimed:
                self._wake(free - 1)
            return AcquireResult(True, now + lease)
        if place > 0:
            if rank is None:
                queued += 1
            self._line[permit_id] = now + place  # an update keeps its place in the order
        elif rank is not None:
            del self._line[permit_id]
            queued -= 1
            reclaimed += 1
        if reclaimed:
            self._wake(free)
        idx = pos - free
        if idx >= len(self._holders):
            return AcquireResult(False, retry_after=-1.0, waiting=queued)
        lease_end = heapq.nsmallest(idx + 1, self._holders.values())[-1]
        return AcquireResult(False, retry_after=lease_end - now, waiting=queued)

    async def release(self, permit_id: str) -> bool:
        """Give a permit back (or leave the line); whether it was still held."""
        return self.release_now(permit_id)

    def release_now(self, permit_id: str) -> bool:
        """:meth:`release` without a coroutine."""
        now = self.store.now()
        expiry = self._holders.pop(permit_id, None)
        held = expiry is not None and expiry > now  # a lapsed lease was no longer held
        heap = self._heap
        # Reclaiming and waking only when there is something to: waiters in line, or a
        # lease that has lapsed (the usual release has neither: a pop and a clock read).
        if self._line or (heap and heap[0][0] <= now):
            _, reclaimed = self._reclaim()
            left = self._line.pop(permit_id, None) is not None
            if expiry is not None or left or reclaimed:
                self._wake(self._count(self.permits) - len(self._holders))
        return held

    async def renew_many(self, permit_ids: Sequence[str], lease: float) -> list[float]:
        """Extend leases from now; per id the new expiry, or 0.0 if it had expired."""
        now, reclaimed = self._reclaim()
        out: list[float] = []
        for pid in permit_ids:
            if pid in self._holders:
                self._hold(pid, now + lease)
                out.append(now + lease)
            else:
                out.append(0.0)
        if reclaimed:
            self._wake(self._count(self.permits) - len(self._holders))
        return out

    async def renew(self, permit_id: str, lease: float) -> float:
        """Extend one lease from now; the new expiry, or 0.0 if it had expired."""
        return (await self.renew_many([permit_id], lease))[0]

    async def state(self, permits: int) -> tuple[int, int, int]:
        """``(held, permits, waiting)`` now."""
        self.permits = permits
        _, reclaimed = self._reclaim()
        count = self._count(permits)
        if reclaimed:
            self._wake(count - len(self._holders))
        return len(self._holders), count, len(self._line)

    async def held(self) -> int:
        """How many unexpired permits are held now."""
        return (await self.state(self.permits))[0]

    async def set_permits(self, mode: Literal["set", "add"], n: int, permits: int) -> int:
        """Set (or add to) the shared permit count; returns the new count."""
        self.permits = permits
        self._reclaim()
        count = max(0, n + (self._count(permits) if mode == "add" else 0))
        self.store.data[self.keys.permits] = count
        self._wake(count - len(self._holders))
        return count

    def listening(self) -> bool:
        """Whether a waiter may join the line at once (in process: always)."""
        return True

    async def listen(
        self, permit_id: str, deadline: float = math.inf
    ) -> tuple[asyncio.Event, bool]:
        """The event that wakes ``permit_id``, and whether wake-ups are reliable."""
        event = self._listeners.get(permit_id)
        if event is None:
            event = self._listeners[permit_id] = asyncio.Event()
        return event, True

    def unlisten(self, permit_id: str) -> None:
        """Forget a waiter's event."""
        self._listeners.pop(permit_id, None)

    def busy(self) -> bool:
        """Whether permits are held or waited for in this process."""
        return bool(self._holders or self._line)

    def forget(self) -> None:
        """Drop every structure kept under the keys."""
        keys = self.keys
        for key in (*keys.all, keys.holders + ":heap", keys.channel):
            self.store.data.pop(key, None)


class RedisPermits:
    """Leased permits on Redis: one Lua call per state change (``permit_*.lua``)."""

    def __init__(self, store: RedisStore, keys: PermitKeys) -> None:
        self.store = store
        self.keys = keys
        self.permits = 0
        self.keeper: LeaseKeeper | None = None
        self._acquire = store.script(lua("permit_acquire", "permit_lib"))
        self._release = store.script(lua("permit_release", "permit_lib"))
        self._renew = store.script(lua("permit_renew", "permit_lib"))
        self._state = store.script(lua("permit_state", "permit_lib"))
        self._set = store.script(lua("permit_set", "permit_lib"))
        # Acquire and release run on every request of a chain: their command, sha and
        # keys packed once (None on a cluster: its client packs).
        acquire = store.packer(self._acquire, keys.all, 5)
        release = store.packer(self._release, keys.all, 3)
        self._pack_acquire = None if acquire is None else acquire.pack
        self._pack_release = None if release is None else release.pack

    async def acquire(
        self, permit_id: str, permits: int, lease: float, place: float = 0.0
    ) -> AcquireResult:
        """Take a permit; ``place`` > 0 joins the line for that long if none is free."""
        call = self.acquire_call(permit_id, permits, lease, place)
        return self.acquired(await self.store.run(call.script, call.keys, call.args))

    def acquire_call(
        self, permit_id: str, permits: int, lease: float, place: float = 0.0
    ) -> ScriptCall:
        """:meth:`acquire` as a call for ``RedisStore.run_many`` (reply: :meth:`acquired`)."""
        self.permits = permits
        keys = self.keys
        args = (permits, math.ceil(lease * 1000), permit_id, math.ceil(place * 1000), keys.channel)
        packer = self._pack_acquire
        packed = None if packer is None else packer(args)
        return new_call(ScriptCall, (self._acquire, keys.all, args, packed))

    def release_call(self, permit_id: str) -> ScriptCall:
        """:meth:`release` as a call for ``RedisStore.run_many`` (always tried)."""
        keys = self.keys
        args = (permit_id, self.permits, keys.channel)
        packer = self._pack_release
        packed = None if packer is None else packer(args)
        return new_call(ScriptCall, (self._release, keys.all, args, packed))

    @staticmethod
    def acquired(reply: Any) -> AcquireResult:
        """The :class:`AcquireResult` of an acquire's reply."""
        if int(reply[0]):
            return AcquireResult(True, int(reply[1]) / 1000.0)
        wait_ms = int(reply[1])
        return AcquireResult(
            False, retry_after=wait_ms / 1000.0 if wait_ms >= 0 else -1.0, waiting=int(reply[2])
        )

    async def release(self, permit_id: str) -> bool:
        """Give a permit back (or leave the line); whether it was still held.

        It is sent even while the store fails fast after an outage: a release skipped
        would leave the permit held until its lease ends.
        """
        held = await self.store.run(
            self._release,
            self.keys.all,
            (permit_id, self.permits, self.keys.channel),
            always_try=True,
        )
        return bool(held)

    async def renew_many(self, permit_ids: Sequence[str], lease: float) -> list[float]:
        """Extend leases from now; per id the new expiry, or 0.0 if it had expired."""
        reply = await self.store.run(
            self._renew,
            self.keys.all,
            (math.ceil(lease * 1000), self.permits, self.keys.channel, *permit_ids),
        )
        return [int(expiry) / 1000.0 for expiry in reply]

    async def renew(self, permit_id: str, lease: float) -> float:
        """Extend one lease from now; the new expiry, or 0.0 if it had expired."""
        return (await self.renew_many([permit_id], lease))[0]

    async def state(self, permits: int) -> tuple[int, int, int]:
        """``(held, permits, waiting)`` now."""
        self.permits = permits
        held, count, waiting = await self.store.run(
            self._state, self.keys.all, (permits, self.keys.channel)
        )
        return int(held), int(count), int(waiting)

    async def held(self) -> int:
        """How many unexpired permits are held now."""
        return (await self.state(self.permits))[0]

    async def set_permits(self, mode: Literal["set", "add"], n: int, permits: int) -> int:
        """Set (or add to) the shared permit count; returns the new count."""
        self.permits = permits
        return int(
            await self.store.run(self._set, self.keys.all, (mode, n, permits, self.keys.channel))
        )

    def listening(self) -> bool:
        """Whether this process already has a confirmed subscription to the wake-ups."""
        return pubsub_for(self.store).listening(self.keys.channel)

    async def listen(
        self, permit_id: str, deadline: float = math.inf
    ) -> tuple[asyncio.Event, bool]:
        """The event that wakes ``permit_id``, and whether wake-ups are reliable now.

        Waits for the subscription until ``deadline`` (event-loop clock) at most.
        """
        service = pubsub_for(self.store)
        # Bounded on its own too: a long wait must not sit out a subscription that hangs.
        deadline = min(deadline, service.loop.time() + _SUBSCRIBE_TIMEOUT)
        return await service.listen(self.keys.channel, permit_id, deadline)

    def unlisten(self, permit_id: str) -> None:
        """Forget a waiter's event."""
        service = pubsub_of(self.store)
        if service is not None:
            service.unlisten(self.keys.channel, permit_id)

    def busy(self) -> bool:
        """Holders and waiters live on Redis: nothing in process to keep."""
        return False

    def forget(self) -> None:
        """Keys on Redis expire by themselves."""


def permit_keys(store: Store, name: str, kind: str = "sem") -> PermitKeys:
    """The keys of the permits called ``name`` (``kind``: ``sem`` or ``conc``) on a store."""
    return PermitKeys(
        holders=store.key(kind, name, "holders"),
        permits=store.key(kind, name, "permits"),
        line=store.key(kind, name, "line"),
        places=store.key(kind, name, "places"),
        channel=store.key(kind, name, "wake"),
    )


# -- the lease keeper ----------------------------------------------------------------


@dataclass(eq=False, slots=True, weakref_slot=True)
class KeptLease:
    """One lease the keeper renews until :meth:`stop`, or until nothing references it.

    Attributes:
        permit_id: the permit whose lease is kept.
        lease_seconds: the lease each renewal grants.
        due: when (event-loop clock) the next renewal is due.
        lost: True once a renewal found the lease already expired (it is no longer kept).
    """

    keeper: LeaseKeeper
    backend: Permits
    permit_id: str
    lease_seconds: float
    due: float
    permit: weakref.ref[LeaseHolder] | None = None
    lost: bool = False
    dropped: bool = False  # stopped (it may still sit among the keeper's young leases)
    old: bool = False  # among the keeper's weakly held leases (it was once due)

    def stop(self) -> None:
        """Stop renewing (call it before releasing the permit)."""
        # The keeper's drop is done here (LeaseKeeper.drop calls this), not in a call of
        # the keeper's: a request stops a lease per permit it held.
        self.dropped = True
        keeper = self.keeper
        if self.old:
            keeper._kept.discard(self)
            return
        young = keeper._young
        while young and young[0].dropped:  # ended leases leave from the head (the oldest)
            young.popleft()


#: Young leases kept before the ended ones among them are swept out (then twice the live).
_COMPACT_AT = 4096


class LeaseKeeper:
    """Renews the leases of long holders: one task per store and event loop, started lazily.

    A holder registers with :meth:`keep` and leaves with :meth:`drop`: an append to a
    queue and a flag, on every request that holds a permit. The task wakes when the oldest
    lease reaches a third of its length, renews every lease that old (one script per
    semaphore for all of them), and ends when it finds nothing kept. Most requests end
    long before a third of their lease and cost the keeper nothing more: not a look, not
    a wake-up, not a task (it sleeps from its start until its first lease is due).

    Leases come in young: held in a queue until they are first due (dropped ones leave it
    from its head, or when the task looks). The task then moves those still kept among the
    old ones, which it holds weakly: a lease whose holder (a :class:`Permit`, a chain
    token) is no longer referenced anywhere can never be released, so, like a holder whose
    process died, it is left to expire (at most a third of its lease later than if it had
    been held weakly from the start: never renewed). A weak reference per lease costs some
    thousands of instructions (a set insert, a removal, a callback when it dies); the
    queue costs an append. :func:`close_store_tasks` stops it.
    """

    #: By store, weakly; a keeper references neither its store nor its leases' holders.
    _keepers: ClassVar[weakref.WeakKeyDictionary[Store, LeaseKeeper]] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._time = loop.time
        self.renewals = 0
        self.closed = False  # by :meth:`aclose` (:func:`close_store_tasks`)
        self._young: collections.deque[KeptLease] = collections.deque()
        self._compact_at = _COMPACT_AT
        self._kept: weakref.WeakSet[KeptLease] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._next_due = math.inf

    @classmethod
    def of(cls, store: Store) -> LeaseKeeper:
        """The keeper of ``store`` in the running event loop (a new one if the loop changed)."""
        loop = asyncio.get_running_loop()
        keeper = cls._keepers.get(store)
        if keeper is None or keeper.loop is not loop:
            keeper = cls._keepers[store] = cls(loop)
        return keeper

    def __len__(self) -> int:
        """How many leases are kept now."""
        return len(self._kept) + sum(1 for kept in self._young if not kept.dropped)

    def keep(
        self,
        backend: Permits,
        permit_id: str,
        lease_seconds: float,
        permit: LeaseHolder | None = None,
    ) -> KeptLease:
        """Renew ``permit_id``'s lease every ``lease_seconds / 3`` until dropped."""
        due = self._time() + lease_seconds / 3
        kept = KeptLease(
            self, backend, permit_id, lease_seconds, due, None if permit is None else ref(permit)
        )
        young = self._young
        young.append(kept)
        if len(young) >= self._compact_at:  # a long holder at the head keeps ended ones in
            young = self._young = collections.deque(k for k in young if not k.dropped)
            self._compact_at = max(_COMPACT_AT, 2 * len(young))
        task = self._task
        if task is None or task.done():
            # It first sleeps until this lease is due: most are dropped before.
            self._next_due = due
            self._task = self.loop.create_task(self._run())
        elif due < self._next_due:  # due before the task wakes: wake it to look
            self._next_due = due
            self._changed.set()
        return kept

    def drop(self, kept: KeptLease) -> None:
        """Stop renewing a lease (:meth:`KeptLease.stop`)."""
        kept.stop()

    async def aclose(self) -> None:
        """Stop renewing every lease and end the task (the leases are left to expire).

        The keeper is closed for good: the store's next lease starts another.
        """
        self.closed = True
        for kept in self._young:
            kept.dropped = True
        self._young.clear()
        self._kept.clear()
        if self._task is not None:
            await stopped([self._task])
            self._task = None

    async def _run(self) -> None:
        # Asleep until the soonest lease can be due (``_next_due``, which :meth:`keep`
        # sets when it starts the task, and moves earlier for a shorter lease: then it
        # wakes the task, which sleeps again until then), then a look. Never a look
        # before: leases are usually kept and dropped by calls that end within a step of
        # the loop (a burst of them together), and a task that looked early would find
        # them gone and end, to be started again by the next burst (a task per burst).
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(self._next_due):
                        await self._changed.wait()
                if self._changed.is_set():  # woken: the wake-up moved earlier
                    self._changed.clear()
                    continue
                next_due = await self._renew_due()
                if next_due is None:
                    return
                self._next_due = next_due
        finally:
            self._task = None
            self._next_due = math.inf

    async def _renew_due(self) -> float | None:
        """Renew the leases that are due; returns when to look again (None: nothing kept).

        A method of its own so that no lease is referenced from a frame while the keeper
        sleeps (it holds them weakly).
        """
        now = self.loop.time()
        self._age(now)
        kept_now = list(self._kept)
        groups: dict[tuple[Permits, float], list[KeptLease]] = {}
        for kept in kept_now:
            if kept.due <= now:
                groups.setdefault((kept.backend, kept.lease_seconds), []).append(kept)
        if groups:
            await asyncio.gather(*(self._renew(group) for group in groups.values()))
            kept_now = list(self._kept)
        kept_now += [kept for kept in self._young if not kept.dropped]
        if not kept_now:
            return None
        # Sleep to the next due lease, but at least a sixth of the shortest lease, so that
        # leases come due in batches: a lease is renewed between 1/3 and 1/2 of its length.
        shortest = min(k.lease_seconds for k in kept_now)
        return max(min(k.due for k in kept_now), self.loop.time() + shortest / 6)

    def _age(self, now: float) -> None:
        """Move the young leases that are due among the old ones (held weakly from now on:
        one whose holder is gone goes at once, unrenewed); forget the dropped ones."""
        young: collections.deque[KeptLease] = collections.deque()
        while self._young:
            kept = self._young.popleft()
            if kept.dropped:
                continue
            if kept.due <= now:
                kept.old = True
                self._kept.add(kept)
            else:
                young.append(kept)
        self._young = young

    async def _renew(self, group: list[KeptLease]) -> None:
        backend, lease = group[0].backend, group[0].lease_seconds
        started = self.loop.time()
        try:
            expiries = await backend.renew_many([k.permit_id for k in group], lease)
        except Exception as exc:
            # An outage (or a bug): try again soon, while two thirds of the lease remain.
            if not isinstance(exc, StorageUnavailable):
                log.exception("ymguard: renewing %d leases failed", len(group))
            for kept in group:
                kept.due = started + lease / 6
            return
        self.renewals += 1
        for kept, expiry in zip(group, expiries, strict=True):
            if expiry:
                kept.due = started + lease / 3
                permit = kept.permit() if kept.permit is not None else None
                if permit is not None:
                    permit.expires_at = expiry
            elif kept in self._kept:
                kept.lost = True
                self.drop(kept)
                log.warning(
                    "ymguard: the lease of permit %s expired before it could be renewed",
                    kept.permit_id,
                )


def keeper_of(backend: Permits) -> LeaseKeeper:
    """The :class:`LeaseKeeper` of ``backend``'s store in the running event loop.

    The backend remembers it (``backend.keeper``): :meth:`LeaseKeeper.of` looks a store up
    in a weak dictionary, which makes a weak reference on every call, and a request that
    holds permits asks once per permit.
    """
    loop = asyncio.get_running_loop()
    keeper = getattr(backend, "keeper", None)  # a third party's Permits may not have it
    if keeper is None or keeper.loop is not loop or keeper.closed:
        keeper = LeaseKeeper.of(backend.store)
        with contextlib.suppress(AttributeError):
            backend.keeper = keeper
    return keeper


def keep_lease(backend: Permits, permit_id: str, lease_seconds: float) -> KeptLease:
    """Have the store's :class:`LeaseKeeper` renew a permit until ``stop()``."""
    # keeper_of's usual case inline: a request holding permits asks once per permit.
    keeper = getattr(backend, "keeper", None)
    if keeper is None or keeper.closed or keeper.loop is not asyncio.get_running_loop():
        keeper = keeper_of(backend)
    return keeper.keep(backend, permit_id, lease_seconds)


async def close_store_tasks(store: Store) -> None:
    """Stop the background tasks tied to ``store``: its lease keeper and its wake-ups.

    Call it when closing the store (``Guard.aclose`` does): the keeper stops renewing (the
    leases it kept are left to expire), and the pub/sub connection of the semaphores'
    wake-ups is closed (waiters still waiting wake, and look again). Using the store again
    afterwards starts them afresh. Safe to call more than once, and on any store.
    """
    keeper = LeaseKeeper._keepers.pop(store, None)
    if keeper is not None:
        await keeper.aclose()
    await close_pubsub(store)


__all__ = [
    "AcquireResult",
    "KeptLease",
    "LeaseHolder",
    "LeaseKeeper",
    "MemoryPermits",
    "PermitKeys",
    "Permits",
    "RedisPermits",
    "close_store_tasks",
    "keep_lease",
    "keeper_of",
    "new_permit_id",
    "permit_keys",
]
