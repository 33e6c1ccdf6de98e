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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from ._kind import Env, Kind
from ._model import Rule
from .backends.permits import (
    AcquireResult,
    KeptLease,
    MemoryPermits,
    Permits,
    RedisPermits,
    keep_lease,
    keeper_of,
    new_permit_id,
)
from .chain import NOTHING, CheckStatus, Context, Stage, WaitResult, report_wait
from .errors import SemaphoreFull, StorageBlocked, StorageUnavailable
from .storage import Store, store_from_uri
from .storage.redis import Unanswered
from .storage.tasks import EPSILON as _EPSILON
from .storage.tasks import finish as _finish
from .storage.tasks import in_background as _in_background
from .storage.tasks import nap as _nap

#: A waiter's place in line outlives its wait by this much, so that its last try still has it.
_PLACE_GRACE = 0.5
#: Without pub/sub (Redis Cluster's asyncio client, or while resubscribing) waiters look again
#: at least this often: a degraded mode that polls, never the normal one.
_DEGRADED_NAP = 0.25


class SemaphoreRule(Rule):
    """The ``semaphore`` rule of a resource (see ``RULES.md``)."""

    permits: int = Field(ge=0, description="how many calls may hold a permit at once")
    lease_seconds: float = Field(
        5, gt=0, description="a holder that dies frees its permit after this"
    )
    wait_ms: int = Field(0, ge=0, description="wait this long for a permit before blocking")
    name: str | None = Field(
        None, min_length=1, description="resources naming one semaphore share it"
    )


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
        backend = self._let_go()
        if backend is None:
            return False
        try:
            return await backend.release(self.id)
        except StorageUnavailable:
            return False

    def _let_go(self) -> Permits | None:
        """Mark the permit released and stop its lease's renewals; the backend to give it
        back to, or None (released already, or given without a store)."""
        if self.released:
            return None
        self.released = True
        if self._kept is not None:
            self._kept.stop()
            self._kept = None
        return self._backend  # None: given without a store (on_storage_error: open)

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
            self._kept = keeper_of(self._backend).keep(
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
        self._backend = self.store.permits(name)
        self._local: Permits | None = None

    def __repr__(self) -> str:
        return (
            f"Semaphore({self.name!r}, permits={self.permits}, lease_seconds={self.lease_seconds})"
        )

    def _local_backend(self) -> Permits:
        if self._local is None:
            self._local = self.store.local.permits(self.name)
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
        except StorageUnavailable as exc:
            if self.store.on_outage(exc) == "open":
                return Permit(self, new_permit_id(), 0.0)
            return await self._acquire_on(self._local_backend(), deadline)

    async def _acquire_on(self, backend: Permits, deadline: float) -> Permit:
        loop = asyncio.get_running_loop()
        permit_id = new_permit_id()
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


class _AcquireStage(Stage):
    """A semaphore permit's try in the chain's batch (``decide`` and ``undo`` are methods:
    one object per call, see :class:`~ymguard.chain.Stage`)."""

    __slots__ = ("backend", "check", "ctx", "permit_id")

    def __init__(
        self, check: SemaphoreCheck, ctx: Context, backend: RedisPermits, permit_id: str
    ) -> None:
        sem = check.semaphore
        self.store = sem.store
        self.call = backend.acquire_call(permit_id, sem.permits, sem.lease_seconds)
        self.check = check
        self.ctx = ctx
        self.backend = backend
        self.permit_id = permit_id

    def decide(self, reply: Any) -> KeptLease:
        backend = self.backend
        if int(reply[0]):  # acquired: no AcquireResult needed (it only says why not)
            return keep_lease(backend, self.permit_id, self.check.semaphore.lease_seconds)
        raise self.check._refuse(self.ctx, backend.acquired(reply))

    def undo(self) -> Awaitable[bool]:
        return self.backend.release(self.permit_id)


class SemaphoreCheck:
    """``semaphore``: each call holds one permit of a (possibly shared) semaphore.

    ``enter`` waits up to ``wait_ms`` for a permit and hands it to the lease keeper, so a
    call longer than a third of the lease keeps it; ``exit`` releases it, also when a later
    check blocked the call. Full: :class:`SemaphoreFull` (429 ``concurrency-limited``).
    """

    kind = "semaphore"
    #: The middleware cancels a call whose client went away, so its permit comes back.
    release_on_disconnect = True

    def __init__(self, resource: str, rule: SemaphoreRule, semaphore: Semaphore) -> None:
        self.resource = resource
        self.rule = rule
        self.semaphore = semaphore
        self.wait_seconds = rule.wait_ms / 1000.0
        self.description = f"semaphore {semaphore.name} permits={rule.permits}"
        # On Redis the chain sends acquire and release with the other checks' scripts; a
        # rule that waits for a permit takes the plain path (it may stand in line).
        remote = isinstance(semaphore._backend, RedisPermits)
        self.stage_enter: Callable[[Context], Stage | None] | None = (
            self._stage_enter if remote and self.wait_seconds == 0 else None
        )
        self.stage_exit: Callable[[Context, Any], Any] | None = self._stage_exit if remote else None
        # In process a try that does not wait, and every release, run without a coroutine.
        memory = isinstance(semaphore._backend, MemoryPermits)
        self.enter_now: Callable[[Context], Any] | None = (
            self._enter_now if memory and self.wait_seconds == 0 else None
        )
        self.exit_now: Callable[[Context, Any], None] | None = self._exit_now if memory else None

    def __repr__(self) -> str:
        return f"SemaphoreCheck({self.resource!r}, {self.description!r})"

    def status(self) -> CheckStatus:
        """The semaphore's name, permits and lease (held counts need the store)."""
        sem = self.semaphore
        state = {"name": sem.name, "permits": sem.permits, "lease_seconds": sem.lease_seconds}
        return CheckStatus("semaphore", self.resource, self.description, state)

    async def enter(self, ctx: Context) -> KeptLease | None:
        """Take a permit or raise :class:`SemaphoreFull` (or ``StorageBlocked``).

        With ``wait_ms``, the time waited is reported to the observers (``report_wait``).
        The token is the permit's kept lease (it names the backend and the permit; no
        :class:`Permit` per call): None for a permit that holds nothing (the store is
        down and ``on_storage_error`` is ``open``).
        """
        started = time.perf_counter() if self.wait_seconds else 0.0
        result: WaitResult = "rejected"
        try:
            permit = await self.semaphore.acquire(self.wait_seconds)
            result = "acquired"
        except SemaphoreFull as exc:
            raise SemaphoreFull(
                ctx.resource, self.description, retry_after=exc.retry_after
            ) from None
        except StorageUnavailable:
            raise StorageBlocked(ctx.resource, self.description, retry_after=1.0) from None
        except asyncio.CancelledError:
            result = "cancelled"
            raise
        finally:
            if started:
                report_wait(ctx, self, time.perf_counter() - started, result)
        backend = permit._backend
        if backend is None:  # given without a store (on_storage_error: open)
            return None
        return keep_lease(backend, permit.id, self.semaphore.lease_seconds)

    def _refuse(self, ctx: Context, result: AcquireResult) -> SemaphoreFull:
        retry = result.retry_after if result.retry_after > 0 else 1.0
        return SemaphoreFull(ctx.resource, self.description, retry_after=retry)

    def _enter_now(self, ctx: Context) -> KeptLease:
        """``enter`` without a coroutine: in process, with no ``wait_ms``."""
        sem = self.semaphore
        backend = sem._backend
        assert isinstance(backend, MemoryPermits)
        # The keeper first: without a running loop (sync code run at once) it raises
        # before a permit is taken, not after (the permit would leak).
        keeper = keeper_of(backend)
        permit_id = new_permit_id()
        lease = sem.lease_seconds
        refused = backend.take_now(permit_id, sem.permits, lease)
        if refused is not None:
            raise self._refuse(ctx, refused)
        return keeper.keep(backend, permit_id, lease)

    def _exit_now(self, ctx: Context, token: Any) -> None:
        """``exit`` without a coroutine, in process."""
        if token is not None:
            token.stop()
            token.backend.release_now(token.permit_id)

    def _stage_enter(self, ctx: Context) -> Stage | None:
        """``enter``'s try for a free permit, for the chain to send (None: plain ``enter``)."""
        sem = self.semaphore
        backend = sem._backend
        if not sem.store.available:
            return None
        assert isinstance(backend, RedisPermits)
        return _AcquireStage(self, ctx, backend, new_permit_id())

    def _stage_exit(self, ctx: Context, token: Any) -> Any:
        """``exit``'s release for the chain to send with the others."""
        if token is None:
            return NOTHING
        backend = token.backend
        if not isinstance(backend, RedisPermits):
            return None  # the local fallback's permit: its plain exit
        token.stop()
        return Stage(self.semaphore.store, backend.release_call(token.permit_id))

    async def exit(self, ctx: Context, token: Any) -> None:
        """Release the permit (the call finished, failed, or a later check blocked it)."""
        if token is not None:
            token.stop()
            with contextlib.suppress(StorageUnavailable):  # the lease frees it
                await token.backend.release(token.permit_id)


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


def _build(env: Env, resource: str, rule: SemaphoreRule | None) -> list[SemaphoreCheck]:
    return build_semaphore_checks(env.store, resource, rule, env.semaphores)


#: The ``semaphore`` kind's registry entry.
KIND = Kind("semaphore", 60, SemaphoreRule, _build)


def build_semaphore_checks(
    store: Store, resource: str, rule: SemaphoreRule | None, registry: dict[str, Semaphore]
) -> list[SemaphoreCheck]:
    """The check for a resource's ``semaphore`` rule (none when it has no such rule)."""
    if rule is None:
        return []
    return [SemaphoreCheck(resource, rule, semaphore_for_rule(store, resource, rule, registry))]


__all__ = [
    "KIND",
    "AcquireResult",
    "Permit",
    "Semaphore",
    "SemaphoreCheck",
    "SemaphoreRule",
    "build_semaphore_checks",
    "semaphore_for_rule",
]
