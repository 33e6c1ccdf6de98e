"""The per-store primitives: the same answers from the memory and the Redis implementation."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from ymguard.backends.permits import LeaseKeeper, MemoryPermits
from ymguard.backends.responses import KeptResponse
from ymguard.storage import MemoryStore, RedisStore, Store


async def test_the_window_counts_to_its_limit_and_refunds(store: Store) -> None:
    window = store.window()
    key = store.key("flow", f"w-{secrets.token_hex(4)}")
    results = [await window.acquire(key, 2, 60.0) for _ in range(3)]
    assert [r.admitted for r in results] == [True, True, False]
    assert results[2].wait_seconds > 0
    await window.refund(key, results[1].slot)
    assert (await window.acquire(key, 2, 60.0)).admitted


async def test_permits_are_leased_and_given_back(store: Store) -> None:
    permits = store.permits(f"p-{secrets.token_hex(4)}")
    first = await permits.acquire("a", 1, 30.0)
    second = await permits.acquire("b", 1, 30.0)
    assert first.acquired and not second.acquired
    assert await permits.held() == 1
    assert await permits.release("a")
    assert (await permits.acquire("b", 1, 30.0)).acquired


async def test_a_token_is_spent_once(store: Store) -> None:
    tokens = store.tokens()
    key = store.key("submit", secrets.token_hex(4))
    await tokens.issue(key, "t1", 60.0)
    assert not await tokens.consume(key, "other")
    assert await tokens.consume(key, "t1")
    assert not await tokens.consume(key, "t1")


async def test_a_kept_response_is_found_by_the_next_begin(store: Store) -> None:
    responses = store.responses()
    key = store.key("idem", secrets.token_hex(4))
    assert (await responses.begin(key, "fp", "lease-1", 30.0)).state == "new"
    assert (await responses.begin(key, "fp", "lease-2", 30.0)).state == "in_flight"
    assert (await responses.begin(key, "other", "lease-2", 30.0)).state == "mismatch"
    kept = KeptResponse(201, [(b"content-type", b"text/plain")], b"made")
    assert await responses.complete(key, "lease-1", "fp", kept, 60.0)
    done = await responses.begin(key, "fp", "lease-3", 30.0)
    assert done.state == "done" and done.response == kept


async def test_a_breakers_state_starts_closed_and_is_shared_by_name(store: Store) -> None:
    name = f"b-{secrets.token_hex(4)}"
    first, second = store.breaker(name), store.breaker(name)
    assert first.copy is second.copy
    assert first.copy.state.value == "closed"
    assert first.remote == (not isinstance(store, MemoryStore))
    await store.close_tasks()


async def test_one_local_fallback_per_store() -> None:
    store = MemoryStore()
    assert store.local is store
    redis_store = RedisStore("redis://127.0.0.1:1")
    assert redis_store.local is redis_store.local
    assert redis_store.local.key_prefix == redis_store.key_prefix
    await redis_store.aclose()


async def test_a_memory_take_without_a_line_follows_the_acquire() -> None:
    """``take_now`` (the checks' way in) decides as ``acquire_now`` does: a lapsed lease is
    reclaimed, a caller in line keeps its place, and the expiry heap stays bounded."""
    store = MemoryStore()
    permits = store.permits("take")
    assert isinstance(permits, MemoryPermits)
    assert permits.take_now("a", 1, 30.0) is None
    refused = permits.take_now("b", 1, 30.0)
    assert refused is not None and not refused.acquired and refused.retry_after > 0
    # A lapsed lease is reclaimed by the next take.
    assert permits.take_now("c", 2, -1.0) is None  # lapsed as soon as taken
    assert permits.take_now("d", 2, 30.0) is None
    assert await permits.held() == 2  # "a" and "d"
    # A waiter in line comes first: a take without a place in line is refused.
    assert permits.release_now("a") and permits.release_now("d")
    assert permits.take_now("e", 1, 30.0) is None
    assert not permits.acquire_now("w", 1, 30.0, place=60.0).acquired
    assert permits.release_now("e")
    assert permits.take_now("x", 1, 30.0) is not None
    assert permits.acquire_now("w", 1, 30.0, place=60.0).acquired
    # Takes and releases without end leave at most a few stale heap entries per holder.
    for i in range(10_000):
        assert permits.take_now(f"n{i}", 2, 30.0) is None
        assert permits.release_now(f"n{i}")
    assert len(permits._heap) <= 4 * len(permits._holders) + 65


def test_the_memory_stores_clock_follows_a_patched_monotonic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tests that fake ``time.monotonic`` (freezegun, ``mock.patch``) move the store's
    clock, so a window they step over has passed."""
    monkeypatch.setattr(time, "monotonic", lambda: 12345.0)
    assert MemoryStore().now() == 12345.0


async def test_the_lease_keeper_follows_the_loops_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop whose clock a test replaced (a virtual clock) keeps leases on that clock:
    the keeper sleeps on the loop's timers."""
    loop = asyncio.get_running_loop()
    real = loop.time
    monkeypatch.setattr(loop, "time", lambda: real() + 1000.0)
    store = MemoryStore()
    permits = store.permits("clock")
    keeper = LeaseKeeper.of(store)
    kept = keeper.keep(permits, "p", 3.0)
    assert kept.due >= real() + 1000.0
    kept.stop()
    await keeper.aclose()


def test_a_store_subclass_may_answer_available_with_a_property() -> None:
    """``Store.available`` is a plain attribute for speed (every staged check reads it per
    call), but a store of one's own (a test double) may still compute it."""

    class Flaky(MemoryStore):
        up = True

        @property
        def available(self) -> bool:  # type: ignore[override]
            return self.up

    store = Flaky()
    assert store.available
    store.up = False
    assert not store.available
    assert MemoryStore().available
