"""Leased permits: a distributed semaphore whose permits expire if their holder dies.

Redisson's ``RPermitExpirableSemaphore``, done for asyncio. On Redis, the holders are a
sorted set scored by lease expiry (server time); acquire, release and renew are each one
Lua script that first reclaims expired leases, so a crashed holder frees its permit when
its lease passes and ``available()`` is right without a background job. The memory store
keeps the same structure in process.

The ``concurrency`` grade of flow rules counts in-flight requests with the same permits.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from dataclasses import dataclass, field

from .errors import SemaphoreFull
from .lua import lua
from .storage import MemoryStore, RedisStore, Store, store_from_uri


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """What one acquire attempt found.

    Attributes:
        acquired: whether a permit was taken.
        expires_at: the new lease's expiry (store clock, seconds) when acquired.
        retry_after: seconds until the soonest lease expires when not acquired (-1: none).
    """

    acquired: bool
    expires_at: float = 0.0
    retry_after: float = -1.0


class _MemoryPermits:
    """Leased permits in process: ``{permit id: expiry}`` under the store key."""

    def __init__(self, store: MemoryStore, key: str, count_key: str) -> None:
        self.store = store
        self.key = key
        self.count_key = count_key

    def _holders(self) -> dict[str, float]:
        holders: dict[str, float] = self.store.data.setdefault(self.key, {})
        now = self.store.now()
        for pid in [p for p, exp in holders.items() if exp <= now]:
            del holders[pid]
        return holders

    def _permits(self, default: int) -> int:
        return int(self.store.data.get(self.count_key, default))

    async def acquire(self, permit_id: str, permits: int, lease: float) -> AcquireResult:
        holders = self._holders()
        now = self.store.now()
        if len(holders) < self._permits(permits):
            holders[permit_id] = now + lease
            return AcquireResult(True, now + lease)
        soonest = min(holders.values(), default=None)
        return AcquireResult(False, retry_after=-1.0 if soonest is None else soonest - now)

    async def release(self, permit_id: str) -> bool:
        return self._holders().pop(permit_id, None) is not None

    async def renew(self, permit_id: str, lease: float) -> float:
        holders = self._holders()
        if permit_id not in holders:
            return 0.0
        holders[permit_id] = expiry = self.store.now() + lease
        return expiry

    async def held(self) -> int:
        return len(self._holders())

    async def set_permits(self, permits: int) -> None:
        self.store.data[self.count_key] = permits


class _RedisPermits:
    """Leased permits on Redis: one Lua call per state change."""

    def __init__(self, store: RedisStore, key: str, count_key: str) -> None:
        self.store = store
        self.keys = (key, count_key)
        self._acquire = store.script(lua("permit_acquire"))
        self._release = store.script(lua("permit_release"))
        self._renew = store.script(lua("permit_renew"))
        self._count = store.script(lua("permit_count"))

    async def acquire(self, permit_id: str, permits: int, lease: float) -> AcquireResult:
        taken, value = await self.store.run(
            self._acquire, self.keys, (permits, math.ceil(lease * 1000), permit_id)
        )
        if taken:
            return AcquireResult(True, int(value) / 1000.0)
        return AcquireResult(False, retry_after=int(value) / 1000.0 if int(value) >= 0 else -1.0)

    async def release(self, permit_id: str) -> bool:
        return bool(await self.store.run(self._release, self.keys[:1], (permit_id,)))

    async def renew(self, permit_id: str, lease: float) -> float:
        expiry = await self.store.run(
            self._renew, self.keys[:1], (permit_id, math.ceil(lease * 1000))
        )
        return int(expiry) / 1000.0

    async def held(self) -> int:
        return int(await self.store.run(self._count, self.keys[:1], ()))

    async def set_permits(self, permits: int) -> None:
        await self.store.call("SET", self.keys[1], permits)


def permits_backend(store: Store, name: str, kind: str = "sem") -> _MemoryPermits | _RedisPermits:
    """The leased-permit implementation for a store (memory or Redis)."""
    key = store.key(kind, name, "holders")
    count_key = store.key(kind, name, "permits")
    if isinstance(store, RedisStore):
        return _RedisPermits(store, key, count_key)
    assert isinstance(store, MemoryStore)
    return _MemoryPermits(store, key, count_key)


@dataclass(eq=False)
class Permit:
    """One held permit. Release it exactly once; releasing again is harmless.

    Attributes:
        id: the permit's unique id (the member in Redis).
        expires_at: the lease's expiry on the store's clock, in seconds.
    """

    semaphore: Semaphore
    id: str
    expires_at: float
    released: bool = field(default=False)

    async def release(self) -> bool:
        """Give the permit back; returns whether it was still held (False if it had expired)."""
        if self.released:
            return False
        self.released = True
        return await self.semaphore._backend.release(self.id)

    async def renew(self, lease_seconds: float | None = None) -> bool:
        """Extend the lease from now; returns False if it had already expired."""
        lease = lease_seconds if lease_seconds is not None else self.semaphore.lease_seconds
        expiry = await self.semaphore._backend.renew(self.id, lease)
        if expiry:
            self.expires_at = expiry
        return bool(expiry)


class Semaphore:
    """A semaphore of ``permits`` leased permits, shared by every holder of one store.

    Args:
        name: the semaphore's name; objects with one name on one store share permits.
        permits: how many permits exist (``set_permits`` can change it at run time).
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

    def __repr__(self) -> str:
        return (
            f"Semaphore({self.name!r}, permits={self.permits}, lease_seconds={self.lease_seconds})"
        )

    async def try_acquire(self) -> Permit | None:
        """Take a permit if one is free now; ``None`` otherwise."""
        permit_id = secrets.token_hex(8)
        result = await self._backend.acquire(permit_id, self.permits, self.lease_seconds)
        return Permit(self, permit_id, result.expires_at) if result.acquired else None

    async def acquire(self, timeout: float = 0.0) -> Permit:  # noqa: ASYNC109
        """Take a permit, waiting up to ``timeout`` seconds; raises :class:`SemaphoreFull`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        permit_id = secrets.token_hex(8)
        while True:
            result = await self._backend.acquire(permit_id, self.permits, self.lease_seconds)
            if result.acquired:
                return Permit(self, permit_id, result.expires_at)
            left = deadline - loop.time()
            if left <= 0:
                raise SemaphoreFull(
                    self.name,
                    f"semaphore {self.name} permits={self.permits}",
                    retry_after=result.retry_after if result.retry_after > 0 else 1.0,
                )
            await asyncio.sleep(min(left, 0.05))

    async def held(self) -> int:
        """How many unexpired permits are held now."""
        return await self._backend.held()

    async def available(self) -> int:
        """How many permits are free now."""
        return max(0, self.permits - await self.held())


__all__ = ["AcquireResult", "Permit", "Semaphore", "permits_backend"]
