"""Leased permits: a distributed semaphore whose permits expire if their holder dies.

Redisson's ``RPermitExpirableSemaphore``, done for asyncio. On Redis, the holders are a
sorted set scored by lease expiry (server time); acquire, release and renew are each one
Lua script that first reclaims expired leases, so a crashed holder frees its permit when
its lease passes and ``available()`` is right without a background job. The memory store
keeps the same structures in process.

Waiters stand in a line (a second sorted set, by arrival) and are served first come, first
served: a newcomer never takes a permit that someone in line is entitled to. A waiter does
not poll. It sleeps until it is woken by a release (the script PUBLISHes the ids of the
waiters a free permit lets in, on a channel of the semaphore's hash tag; one pub/sub
connection per store and event loop carries every semaphore's wake-ups), by the lease
expiry that would let it in, or by the time to refresh its place in line (a waiter that
died loses its place the same way a holder that died loses its permit).

The ``semaphore:`` rule holds a permit for the whole request; one :class:`LeaseKeeper`
task per store and event loop renews the leases of requests older than a third of their lease, so
a slow but alive request keeps its permit and a dead one loses it. The ``concurrency``
grade of flow rules counts in-flight requests with the same permits and the same keeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import secrets
import weakref
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field

from ._model import RuleModel
from .chain import Context
from .errors import SemaphoreFull, StorageBlocked, StorageUnavailable
from .lua import lua
from .storage import MemoryStore, RedisStore, Store, store_from_uri
from .storage.redis import OUTAGE_ERRORS, Unanswered

log = logging.getLogger("ymguard.semaphore")

T = TypeVar("T")

#: A waiter's place in line outlives its wait by this much, so that its last try still has it.
_PLACE_GRACE = 0.5
#: Below this many seconds left, a waiter makes its last try (timers may fire a hair early).
_EPSILON = 0.001
#: Without pub/sub (Redis Cluster's asyncio client, or while resubscribing) waiters look again
#: at least this often: a degraded mode that polls, never the normal one.
_DEGRADED_NAP = 0.25
#: How long a pub/sub connection with no waiters stays subscribed before it is closed.
_LINGER = 2.0
#: How long a waiter waits for its subscription to be confirmed before it falls back to naps.
_SUBSCRIBE_TIMEOUT = 1.0

_background: set[asyncio.Task[Any]] = set()


class SemaphoreRule(RuleModel):
    """The ``semaphore`` rule of a resource (see ``RULES.md``)."""

    permits: int = Field(ge=0, description="how many calls may hold a permit at once")
    lease_seconds: float = Field(
        5, gt=0, description="a holder that dies frees its permit after this"
    )
    wait_ms: int = Field(0, ge=0, description="wait this long for a permit before blocking")
    name: str | None = Field(
        None, min_length=1, description="resources naming one semaphore share it"
    )


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """What one acquire attempt found.

    Attributes:
        acquired: whether a permit was taken.
        expires_at: the new lease's expiry (store clock, seconds) when acquired.
        retry_after: when not acquired, seconds until a lease expiry could let this caller
            in (-1: no expiry will; only a release or more permits can).
        waiting: when not acquired, how many waiters stand in line.
    """

    acquired: bool
    expires_at: float = 0.0
    retry_after: float = -1.0
    waiting: int = 0


def _forget(task: asyncio.Task[Any]) -> None:
    """Done callback of a background clean-up: drop it, and retrieve what it raised."""
    _background.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        if not isinstance(exc, StorageUnavailable):
            log.error("ymguard: a background clean-up failed", exc_info=exc)


async def _finish(aw: Awaitable[T]) -> T:
    """Run a clean-up to its end even if the task is cancelled (again) meanwhile."""
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        _background.add(task)  # the clean-up goes on in its own task
        task.add_done_callback(_forget)
        raise


def _in_background(aw: Awaitable[Any]) -> None:
    """Run a clean-up in a task of its own, which nobody waits for."""
    task = asyncio.ensure_future(aw)
    _background.add(task)
    task.add_done_callback(_forget)


async def _stopped(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks``; wait for those of the running loop to end, cancel the others'."""
    here = asyncio.get_running_loop()
    mine = []
    for task in tasks:
        if task.done():
            continue
        loop = task.get_loop()
        if loop is here:
            task.cancel()
            mine.append(task)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
    if mine:
        await asyncio.wait(mine)


async def _nap(event: asyncio.Event, seconds: float) -> None:
    """Sleep until ``event`` is set or ``seconds`` pass."""
    if event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(seconds, _EPSILON)):
            await event.wait()


# -- the permits, on each store ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Keys:
    holders: str
    permits: str
    line: str
    places: str
    channel: str

    @property
    def all(self) -> tuple[str, str, str, str]:
        return (self.holders, self.permits, self.line, self.places)


class _MemoryPermits:
    """Leased permits in process, with the same line and wake-ups as on Redis.

    Under the store keys: ``{permit id: expiry}`` (holders), a heap of ``(expiry, id)`` to
    find lapsed leases without a scan, ``{waiter id: place lapses at}`` in arrival order
    (the line), and ``{waiter id: asyncio.Event}`` (the listeners, the in-process pub/sub).
    """

    def __init__(self, store: MemoryStore, keys: _Keys) -> None:
        self.store = store
        self.keys = keys
        self.permits = 0
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
        self.permits = permits
        now, reclaimed = self._reclaim()
        free = self._count(permits) - len(self._holders)
        rank = self._rank(permit_id)
        queued = len(self._line)
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
        _, reclaimed = self._reclaim()
        held = self._holders.pop(permit_id, None) is not None
        left = self._line.pop(permit_id, None) is not None
        if held or left or reclaimed:
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


class _RedisWaker:
    """One pub/sub connection per Redis store and event loop, shared by every waiter.

    Pub/sub rather than a list with BLPOP: BLPOP parks one pooled connection per waiting
    task (200 waiters, 200 connections), and a token pushed for a waiter that died stays
    in the list. Here one connection carries every semaphore's channel, a message names
    the waiters it is for, and a lost message costs no more than a nap: every waiter also
    wakes at the lease expiry that would let it in and to refresh its place.

    A subscription that fails or is cancelled midway (a waiter cancelled, or out of time)
    is forgotten at once, so the next waiter subscribes afresh instead of waiting for a
    confirmation that will never come. The waker keeps the store's client, not the store:
    the map of wakers is keyed weakly by store, and a value referencing its key would keep
    both forever.
    """

    _wakers: ClassVar[weakref.WeakKeyDictionary[RedisStore, _RedisWaker]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, store: RedisStore) -> None:
        self.client: Any = store.client
        self.loop = asyncio.get_running_loop()
        self.pubsub: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.listeners: dict[str, dict[str, asyncio.Event]] = {}
        self.ready: dict[str, asyncio.Event] = {}
        self.unsupported = False
        self.closed = False

    @classmethod
    def of(cls, store: RedisStore) -> _RedisWaker:
        """The waker of ``store`` in the running event loop (a new one if the loop changed)."""
        waker = cls._wakers.get(store)
        if waker is None or waker.loop is not asyncio.get_running_loop():
            waker = cls._wakers[store] = cls(store)
        return waker

    def listening(self, channel: str) -> bool:
        """Whether ``channel``'s subscription is confirmed now."""
        ready = self.ready.get(channel)
        return ready is not None and ready.is_set()

    async def listen(
        self, channel: str, waiter: str, deadline: float
    ) -> tuple[asyncio.Event, bool]:
        """Register a waiter; returns its event and whether the subscription is confirmed.

        Waits for the confirmation until ``deadline`` (event-loop clock), at most
        ``_SUBSCRIBE_TIMEOUT``.
        """
        waiters = self.listeners.setdefault(channel, {})
        event = waiters.get(waiter)
        if event is None:
            event = waiters[waiter] = asyncio.Event()
        return event, await self._subscribe(channel, deadline)

    def unlisten(self, channel: str, waiter: str) -> None:
        """Forget a waiter (the reader unsubscribes once no one has listened for a while)."""
        waiters = self.listeners.get(channel)
        if waiters is not None:
            waiters.pop(waiter, None)
            if not waiters:
                del self.listeners[channel]

    async def _subscribe(self, channel: str, deadline: float) -> bool:
        if self.unsupported or self.closed:
            return False
        if self.listening(channel):
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(min(deadline, self.loop.time() + _SUBSCRIBE_TIMEOUT)):
                ready = self.ready.get(channel)
                if ready is None:
                    ready = self.ready[channel] = asyncio.Event()
                    await self._send_subscribe(channel, ready)
                await ready.wait()
        return self.listening(channel)

    async def _send_subscribe(self, channel: str, ready: asyncio.Event) -> None:
        try:
            if self.pubsub is None:
                self.pubsub = self.client.pubsub()
            pubsub = self.pubsub
            await pubsub.subscribe(channel)
        except BaseException as exc:
            # Forget this attempt; whoever waits on ``ready`` wakes and finds no subscription.
            if self.ready.get(channel) is ready:
                del self.ready[channel]
            ready.set()
            if self.reader is None or self.reader.done():
                self._reset()  # nobody reads that connection, and it may be half-written
            if isinstance(exc, AttributeError | NotImplementedError):
                self.unsupported = True  # e.g. the asyncio cluster client has no pub/sub
            elif not isinstance(exc, OUTAGE_ERRORS):
                raise
            return
        if self.pubsub is pubsub and not self.closed:  # else it was dropped meanwhile
            self._start_reader()

    def _start_reader(self) -> None:
        if self.reader is None or self.reader.done():
            self.reader = self.loop.create_task(self._read(self.pubsub))

    def _reset(self) -> None:
        """Drop the connection and every subscription on it: waiters subscribe afresh."""
        pubsub, self.pubsub = self.pubsub, None
        ready, self.ready = self.ready, {}
        for event in ready.values():
            event.set()
        if pubsub is not None:
            task = self.loop.create_task(_close_pubsub(pubsub))
            _background.add(task)
            task.add_done_callback(_forget)

    async def aclose(self) -> None:
        """Stop the reader and close the connection; waiters wake and look again."""
        self.closed = True
        if self.loop is not asyncio.get_running_loop():
            if self.reader is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.reader.cancel)
            return
        if self.reader is not None:
            await _stopped([self.reader])
            self.reader = None
        pubsub, self.pubsub = self.pubsub, None
        self._wake_all()
        if pubsub is not None:
            await _close_pubsub(pubsub)

    def _wake_all(self) -> None:
        ready, self.ready = self.ready, {}
        for event in ready.values():
            event.set()
        for waiters in self.listeners.values():
            for event in waiters.values():
                event.set()

    async def _read(self, pubsub: Any) -> None:
        idle_since: float | None = None
        try:
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is None:
                    if self.listeners:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = self.loop.time()
                    elif self.loop.time() - idle_since >= _LINGER:
                        return
                    continue
                channel = _text(msg["channel"])
                if msg["type"] == "subscribe":
                    ready = self.ready.get(channel)
                    if ready is not None:
                        ready.set()
                elif msg["type"] == "message":
                    waiters = self.listeners.get(channel)
                    if waiters:
                        for waiter in _text(msg["data"]).split():
                            event = waiters.get(waiter)
                            if event is not None:
                                event.set()
        except Exception as exc:  # the connection broke: waiters re-subscribe and look again
            log.debug("ymguard: semaphore wake-up connection lost: %r", exc)
        finally:
            # Synchronously, before any await: a waiter arriving now subscribes afresh.
            if self.reader is asyncio.current_task():
                self.reader = None
            if self.pubsub is pubsub:
                self.pubsub = None
                self._wake_all()
            await _close_pubsub(pubsub)


async def _close_pubsub(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _RedisPermits:
    """Leased permits on Redis: one Lua call per state change (``permit_*.lua``)."""

    def __init__(self, store: RedisStore, keys: _Keys) -> None:
        self.store = store
        self.keys = keys
        self.permits = 0
        self._acquire = store.script(lua("permit_acquire", "permit_lib"))
        self._release = store.script(lua("permit_release", "permit_lib"))
        self._renew = store.script(lua("permit_renew", "permit_lib"))
        self._state = store.script(lua("permit_state", "permit_lib"))
        self._set = store.script(lua("permit_set", "permit_lib"))

    async def acquire(
        self, permit_id: str, permits: int, lease: float, place: float = 0.0
    ) -> AcquireResult:
        """Take a permit; ``place`` > 0 joins the line for that long if none is free."""
        self.permits = permits
        reply = await self.store.run(
            self._acquire,
            self.keys.all,
            (
                permits,
                math.ceil(lease * 1000),
                permit_id,
                math.ceil(place * 1000),
                self.keys.channel,
            ),
        )
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
        return _RedisWaker.of(self.store).listening(self.keys.channel)

    async def listen(
        self, permit_id: str, deadline: float = math.inf
    ) -> tuple[asyncio.Event, bool]:
        """The event that wakes ``permit_id``, and whether wake-ups are reliable now.

        Waits for the subscription until ``deadline`` (event-loop clock) at most.
        """
        return await _RedisWaker.of(self.store).listen(self.keys.channel, permit_id, deadline)

    def unlisten(self, permit_id: str) -> None:
        """Forget a waiter's event."""
        waker = _RedisWaker._wakers.get(self.store)
        if waker is not None:
            waker.unlisten(self.keys.channel, permit_id)


Permits = _MemoryPermits | _RedisPermits


def permits_backend(store: Store, name: str, kind: str = "sem") -> Permits:
    """The leased-permit implementation for a store (memory or Redis)."""
    keys = _Keys(
        holders=store.key(kind, name, "holders"),
        permits=store.key(kind, name, "permits"),
        line=store.key(kind, name, "line"),
        places=store.key(kind, name, "places"),
        channel=store.key(kind, name, "wake"),
    )
    if isinstance(store, RedisStore):
        return _RedisPermits(store, keys)
    assert isinstance(store, MemoryStore)
    return _MemoryPermits(store, keys)


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
    permit: weakref.ref[Permit] | None = None
    lost: bool = False

    def stop(self) -> None:
        """Stop renewing (call it before releasing the permit)."""
        self.keeper.drop(self)


class LeaseKeeper:
    """Renews the leases of long holders: one task per store and event loop, started lazily.

    A holder registers with :meth:`keep` and leaves with :meth:`drop`, two set operations.
    The task wakes when the oldest lease reaches a third of its length, renews every lease
    that old (one script per semaphore for all of them), and ends when nothing is kept.
    Most requests end long before a third of their lease and cost the keeper nothing.

    The keeper holds its leases weakly: a lease whose holder (a :class:`Permit`, a chain
    token) is no longer referenced anywhere can never be released, so, like a holder whose
    process died, it is left to expire. :func:`close_store_tasks` stops it.
    """

    #: By store, weakly; a keeper references neither its store nor its leases' holders.
    _keepers: ClassVar[weakref.WeakKeyDictionary[Store, LeaseKeeper]] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.renewals = 0
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
        return len(self._kept)

    def keep(
        self, backend: Permits, permit_id: str, lease_seconds: float, permit: Permit | None = None
    ) -> KeptLease:
        """Renew ``permit_id``'s lease every ``lease_seconds / 3`` until dropped."""
        due = self.loop.time() + lease_seconds / 3
        ref = None if permit is None else weakref.ref(permit)
        kept = KeptLease(self, backend, permit_id, lease_seconds, due, ref)
        self._kept.add(kept)
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._run())
        elif kept.due < self._next_due:
            self._changed.set()
        return kept

    def drop(self, kept: KeptLease) -> None:
        """Stop renewing a lease."""
        self._kept.discard(kept)

    async def aclose(self) -> None:
        """Stop renewing every lease and end the task (the leases are left to expire)."""
        self._kept.clear()
        if self._task is not None:
            await _stopped([self._task])
            self._task = None

    async def _run(self) -> None:
        try:
            while (next_due := await self._renew_due()) is not None:
                self._next_due = next_due
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(next_due):
                        await self._changed.wait()
        finally:
            self._task = None
            self._next_due = math.inf

    async def _renew_due(self) -> float | None:
        """Renew the leases that are due; returns when to look again (None: nothing kept).

        A method of its own so that no lease is referenced from a frame while the keeper
        sleeps (it holds them weakly).
        """
        kept_now = list(self._kept)
        now = self.loop.time()
        groups: dict[tuple[Permits, float], list[KeptLease]] = {}
        for kept in kept_now:
            if kept.due <= now:
                groups.setdefault((kept.backend, kept.lease_seconds), []).append(kept)
        if groups:
            await asyncio.gather(*(self._renew(group) for group in groups.values()))
            kept_now = list(self._kept)
        if not kept_now:
            return None
        # Sleep to the next due lease, but at least a sixth of the shortest lease, so that
        # leases come due in batches: a lease is renewed between 1/3 and 1/2 of its length.
        shortest = min(k.lease_seconds for k in kept_now)
        return max(min(k.due for k in kept_now), self.loop.time() + shortest / 6)

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


def keep_lease(backend: Permits, permit_id: str, lease_seconds: float) -> KeptLease:
    """Have the store's :class:`LeaseKeeper` renew a permit until ``stop()``."""
    return LeaseKeeper.of(backend.store).keep(backend, permit_id, lease_seconds)


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
    if isinstance(store, RedisStore):
        waker = _RedisWaker._wakers.pop(store, None)
        if waker is not None:
            await waker.aclose()


# -- the public objects --------------------------------------------------------------


@dataclass(eq=False)
class Permit:
    """One held permit. Release it exactly once; releasing again is harmless.

    Attributes:
        semaphore: the semaphore it belongs to.
        id: the permit's unique id (the member in Redis).
        expires_at: the lease's expiry on the store's clock, in seconds.
        released: whether :meth:`release` was called.
    """

    semaphore: Semaphore
    id: str
    expires_at: float
    released: bool = field(default=False)
    _backend: Permits | None = field(default=None, repr=False)
    _kept: KeptLease | None = field(default=None, repr=False)

    async def release(self) -> bool:
        """Give the permit back.

        Returns:
            True if it was still held; False if its lease had expired (someone else may
            hold that permit now, and keeps it), if it was already released, or if the
            store could not be reached (the lease then frees it).
        """
        if self.released:
            return False
        self.released = True
        if self._kept is not None:
            self._kept.stop()
            self._kept = None
        if self._backend is None:  # given without a store (on_storage_error: open)
            return False
        try:
            return await self._backend.release(self.id)
        except StorageUnavailable:
            return False

    async def renew(self, lease_seconds: float | None = None) -> bool:
        """Extend the lease from now; returns False if it had already expired.

        Args:
            lease_seconds: the new lease; the semaphore's ``lease_seconds`` by default.

        Raises:
            StorageUnavailable: the store could not be reached.
        """
        if self.released or self._backend is None:
            return False
        lease = lease_seconds if lease_seconds is not None else self.semaphore.lease_seconds
        expiry = await self._backend.renew(self.id, lease)
        if expiry:
            self.expires_at = expiry
        return bool(expiry)

    def keep_alive(self) -> None:
        """Renew the lease in the background (the loop's :class:`LeaseKeeper`) until release."""
        if self._kept is None and not self.released and self._backend is not None:
            self._kept = LeaseKeeper.of(self._backend.store).keep(
                self._backend, self.id, self.semaphore.lease_seconds, self
            )

    @property
    def lost(self) -> bool:
        """Whether the keeper found the lease expired (the permit is no longer held)."""
        return self._kept is not None and self._kept.lost


class Semaphore:
    """A semaphore of ``permits`` leased permits, shared by every holder of one store.

    Waiters are served first come, first served, and sleep until a release or a lease
    expiry lets them in. On a store outage it follows the store's ``on_storage_error``:
    ``local`` falls back to an in-process semaphore of the same size, ``open`` hands out
    permits that hold nothing, ``closed`` raises :class:`StorageUnavailable`.

    Args:
        name: the semaphore's name; objects with one name on one store share permits.
        permits: how many permits exist until ``set_permits`` stores a shared count.
        lease_seconds: a permit not renewed or released within this is reclaimed.
        storage: a storage URI or a :class:`Store`.
    """

    def __init__(
        self,
        name: str,
        permits: int,
        lease_seconds: float = 30.0,
        storage: str | Store = "memory://",
    ) -> None:
        if permits < 0:
            raise ValueError("permits must be >= 0")
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be > 0")
        self.name = name
        self.permits = permits
        self.lease_seconds = lease_seconds
        self.store = store_from_uri(storage) if isinstance(storage, str) else storage
        self._backend = permits_backend(self.store, name)
        self._local: _MemoryPermits | None = None

    def __repr__(self) -> str:
        return (
            f"Semaphore({self.name!r}, permits={self.permits}, lease_seconds={self.lease_seconds})"
        )

    def _local_backend(self) -> _MemoryPermits:
        if self._local is None:
            store = MemoryStore(key_prefix=self.store.key_prefix)
            self._local = _MemoryPermits(store, self._backend.keys)
        return self._local

    async def try_acquire(self) -> Permit | None:
        """Take a permit if one is free now (and no one waits for it); ``None`` otherwise."""
        try:
            return await self.acquire(0.0)
        except SemaphoreFull:
            return None

    async def acquire(self, timeout: float = 0.0) -> Permit:  # noqa: ASYNC109
        """Take a permit, waiting up to ``timeout`` seconds in line.

        Raises:
            SemaphoreFull: no permit came free in time (``retry_after`` says when one may).
            StorageUnavailable: the store is down and ``on_storage_error`` is ``closed``.
        """
        deadline = asyncio.get_running_loop().time() + max(0.0, timeout)
        try:
            return await self._acquire_on(self._backend, deadline)
        except StorageUnavailable:
            policy = self.store.on_storage_error
            if policy == "closed":
                raise
            if policy == "open":
                return Permit(self, secrets.token_hex(8), 0.0)
            return await self._acquire_on(self._local_backend(), deadline)

    async def _acquire_on(self, backend: Permits, deadline: float) -> Permit:
        loop = asyncio.get_running_loop()
        permit_id = secrets.token_hex(8)
        event: asyncio.Event | None = None
        reliable = True
        # True while the store may hold a permit or a place for this id that we may not keep.
        dirty = False
        try:
            if deadline - loop.time() > _EPSILON and backend.listening():
                event, reliable = await backend.listen(permit_id, deadline)
            while True:
                left = deadline - loop.time()
                joining = event is not None and left > _EPSILON
                if event is not None:
                    if joining and not reliable:  # the subscription broke: make a new one
                        event, reliable = await backend.listen(permit_id, deadline)
                    event.clear()  # before the try: a wake-up during it must not be lost
                place = min(self.lease_seconds, left) + _PLACE_GRACE if joining else 0.0
                placed, dirty = dirty, True  # placed: an earlier try left a place in line
                try:
                    result = await backend.acquire(
                        permit_id, self.permits, self.lease_seconds, place
                    )
                except StorageUnavailable as exc:
                    # A try Redis never ran (the store fails fast, or refused it) took
                    # nothing: only an earlier try's place is left to give back. A try
                    # that got no answer may have run, so it is given back too.
                    dirty = placed or isinstance(exc, Unanswered)
                    raise
                dirty = joining and not result.acquired
                if result.acquired:
                    return Permit(self, permit_id, result.expires_at, _backend=backend)
                if not joining and (event is not None or left <= _EPSILON):
                    raise SemaphoreFull(
                        self.name,
                        f"semaphore {self.name} permits={self.permits}",
                        retry_after=result.retry_after if result.retry_after > 0 else 1.0,
                    )
                if event is None:
                    # Listen before joining the line, so no wake-up can come before we do.
                    event, reliable = await backend.listen(permit_id, deadline)
                    continue
                # Sleep until woken, until a lease expiry could let us in, or until our
                # place in line needs refreshing (it lapses if we die), whichever is first.
                nap = min(deadline - loop.time(), self.lease_seconds)
                if result.retry_after >= 0:
                    nap = min(nap, result.retry_after)
                if not reliable:
                    nap = min(nap, _DEGRADED_NAP)
                await _nap(event, nap)
                reliable = backend.listening()
        finally:
            backend.unlisten(permit_id)  # also when cancelled while listening (event unset)
            if dirty:  # cancelled or failed mid-way: give back whatever the store gave us
                if backend.store.available:
                    with contextlib.suppress(StorageUnavailable):
                        await _finish(backend.release(permit_id))
                else:
                    # In an outage the caller must not wait on the store (the release may
                    # hang for a whole socket timeout); if it cannot land, the lease (or
                    # the place's own expiry) frees what it would have.
                    _in_background(backend.release(permit_id))

    @contextlib.asynccontextmanager
    async def hold(
        self,
        timeout: float = 0.0,  # noqa: ASYNC109
        *,
        keep_alive: bool = True,
    ) -> AsyncIterator[Permit]:
        """``async with sem.hold(timeout=...) as permit:`` acquire, and release at the end.

        Args:
            timeout: seconds to wait for a permit (raises :class:`SemaphoreFull` after).
            keep_alive: renew the lease in the background while the block runs, so a slow
                block keeps its permit; if the process dies, the lease frees it.
        """
        permit = await self.acquire(timeout)
        if keep_alive:
            permit.keep_alive()
        try:
            yield permit
        finally:
            await _finish(permit.release())

    async def held(self) -> int:
        """How many unexpired permits are held now (raises :class:`StorageUnavailable`)."""
        return (await self._backend.state(self.permits))[0]

    async def available(self) -> int:
        """How many permits are free now, by the shared count (raises on an outage)."""
        held, permits, _ = await self._backend.state(self.permits)
        return max(0, permits - held)

    async def waiting(self) -> int:
        """How many waiters stand in line now, in every process."""
        return (await self._backend.state(self.permits))[2]

    async def set_permits(self, permits: int) -> None:
        """Store ``permits`` as the shared count (every object of this name uses it)."""
        if permits < 0:
            raise ValueError("permits must be >= 0")
        self.permits = await self._backend.set_permits("set", permits, self.permits)

    async def add_permits(self, n: int) -> None:
        """Grow (or, with ``n`` < 0, shrink) the shared count; it never drops below 0."""
        self.permits = await self._backend.set_permits("add", n, self.permits)


# -- the check -----------------------------------------------------------------------


class SemaphoreCheck:
    """``semaphore``: each call holds one permit of a (possibly shared) semaphore.

    ``enter`` waits up to ``wait_ms`` for a permit and hands it to the lease keeper, so a
    call longer than a third of the lease keeps it; ``exit`` releases it, also when a later
    check blocked the call. Full: :class:`SemaphoreFull` (429 ``concurrency-limited``).
    """

    #: The middleware cancels a call whose client went away, so its permit comes back.
    release_on_disconnect = True

    def __init__(self, resource: str, rule: SemaphoreRule, semaphore: Semaphore) -> None:
        self.resource = resource
        self.rule = rule
        self.semaphore = semaphore
        self.wait_seconds = rule.wait_ms / 1000.0
        self.description = f"semaphore {semaphore.name} permits={rule.permits}"

    def __repr__(self) -> str:
        return f"SemaphoreCheck({self.resource!r}, {self.description!r})"

    async def enter(self, ctx: Context) -> Permit:
        """Take a permit or raise :class:`SemaphoreFull` (or ``StorageBlocked``)."""
        try:
            permit = await self.semaphore.acquire(self.wait_seconds)
        except SemaphoreFull as exc:
            raise SemaphoreFull(
                ctx.resource, self.description, retry_after=exc.retry_after
            ) from None
        except StorageUnavailable:
            raise StorageBlocked(ctx.resource, self.description, retry_after=1.0) from None
        permit.keep_alive()
        return permit

    async def exit(self, ctx: Context, token: Any) -> None:
        """Release the permit (the call finished, failed, or a later check blocked it)."""
        if token is not None:
            await token.release()


def semaphore_for_rule(
    store: Store, resource: str, rule: SemaphoreRule, registry: dict[str, Semaphore]
) -> Semaphore:
    """The semaphore a resource's rule names (``name``, else the resource), from ``registry``.

    Resources naming one semaphore share one object; the rule compiled last sets its
    ``permits`` and ``lease_seconds`` (they should agree).
    """
    name = rule.name or resource
    sem = registry.get(name)
    if sem is None:
        sem = registry[name] = Semaphore(name, rule.permits, rule.lease_seconds, store)
    else:
        sem.permits = rule.permits
        sem.lease_seconds = rule.lease_seconds
    return sem


def build_semaphore_checks(
    store: Store, resource: str, rule: SemaphoreRule | None, registry: dict[str, Semaphore]
) -> list[SemaphoreCheck]:
    """The check for a resource's ``semaphore`` rule (none when it has no such rule)."""
    if rule is None:
        return []
    return [SemaphoreCheck(resource, rule, semaphore_for_rule(store, resource, rule, registry))]


__all__ = [
    "AcquireResult",
    "KeptLease",
    "LeaseKeeper",
    "Permit",
    "Semaphore",
    "SemaphoreCheck",
    "SemaphoreRule",
    "build_semaphore_checks",
    "close_store_tasks",
    "keep_lease",
    "permits_backend",
    "semaphore_for_rule",
]
