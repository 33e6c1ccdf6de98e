"""The per-store primitives: the same answers from the memory and the Redis implementation."""

from __future__ import annotations

import secrets

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
