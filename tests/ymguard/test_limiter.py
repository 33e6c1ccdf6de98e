"""Flow rules on both stores: QPS windows, concurrency, origins, refunds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from ymguard import Blocked, Context, FlowLimited, FlowRule, Guard, limiter
from ymguard._model import rule_ids
from ymguard.storage import MemoryStore, Store


@pytest.fixture
def storage_uri(storage_uri_with_cluster: str) -> str:
    """Parity on memory, Redis and a Redis Cluster (``redis+cluster://``)."""
    return storage_uri_with_cluster


def guard_with(store: Store, flow: list[dict[str, Any]], resource: str = "GET /r") -> Guard:
    return Guard({"resources": {resource: {"flow": flow}}}, storage=store)


async def attempt(guard: Guard, resource: str = "GET /r", origin: str = "") -> bool:
    """Enter and immediately exit; True if admitted."""
    chain = guard.chain(resource)
    ctx = Context(resource, origin)
    try:
        tokens = await chain.enter(ctx)
    except Blocked:
        return False
    await chain.exit(ctx, tokens)
    return True


async def test_qps_admits_exactly_the_limit_of_a_concurrent_burst(store: Store) -> None:
    guard = guard_with(store, [{"qps": 10}])
    results = await asyncio.gather(*(attempt(guard) for _ in range(40)))
    assert sum(results) == 10


async def test_a_refusal_says_when_to_retry_and_what_the_quota_is(store: Store) -> None:
    guard = guard_with(store, [{"qps": 2, "name": "kill"}])
    chain = guard.chain("GET /r")
    assert await attempt(guard) and await attempt(guard)
    with pytest.raises(FlowLimited) as info:
        await chain.enter(Context("GET /r"))
    exc = info.value
    assert exc.resource == "GET /r" and exc.rule == "flow[0] qps=2"
    assert exc.retry_after is not None and 0 < exc.retry_after <= 1.0
    assert exc.quota is not None
    assert (exc.quota.name, exc.quota.limit, exc.quota.window_seconds, exc.quota.remaining) == (
        "kill",
        2,
        1.0,
        0,
    )


async def test_the_window_slides_and_admits_again(store: Store) -> None:
    guard = guard_with(store, [{"qps": 3}])
    assert sum(await asyncio.gather(*(attempt(guard) for _ in range(6)))) == 3
    await asyncio.sleep(1.1)
    assert sum(await asyncio.gather(*(attempt(guard) for _ in range(6)))) == 3


async def test_qps_zero_blocks_everything(store: Store) -> None:
    guard = guard_with(store, [{"qps": 0}])
    assert not await attempt(guard)


async def test_a_call_blocked_by_a_later_rule_spends_no_quota(store: Store) -> None:
    guard = guard_with(store, [{"qps": 5}, {"concurrency": 0}])
    assert sum(await asyncio.gather(*(attempt(guard) for _ in range(20)))) == 0
    # The same first rule alone: its window is untouched, so all 5 are still there.
    guard.reload({"resources": {"GET /r": {"flow": [{"qps": 5}]}}})
    assert sum(await asyncio.gather(*(attempt(guard) for _ in range(8)))) == 5


async def test_concurrency_counts_calls_in_flight(store: Store) -> None:
    guard = guard_with(store, [{"concurrency": 3}])
    chain = guard.chain("GET /r")
    held = []
    for _ in range(3):
        ctx = Context("GET /r")
        held.append((ctx, await chain.enter(ctx)))
    with pytest.raises(FlowLimited):
        await chain.enter(Context("GET /r"))
    ctx, tokens = held.pop()
    await chain.exit(ctx, tokens)
    ctx2 = Context("GET /r")
    tokens2 = await chain.enter(ctx2)
    await chain.exit(ctx2, tokens2)
    for ctx, tokens in held:
        await chain.exit(ctx, tokens)
    assert guard.stats("GET /r").inflight == 0


async def test_concurrency_never_exceeds_the_limit_under_load(store: Store) -> None:
    guard = guard_with(store, [{"concurrency": 4}])
    running = peak = 0

    async def call() -> None:
        nonlocal running, peak
        chain = guard.chain("GET /r")
        ctx = Context("GET /r")
        try:
            tokens = await chain.enter(ctx)
        except Blocked:
            return
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        await chain.exit(ctx, tokens)

    for _ in range(5):
        await asyncio.gather(*(call() for _ in range(50)))
    assert 1 <= peak <= 4


async def test_a_holder_that_never_exits_frees_its_count_after_the_lease(store: Store) -> None:
    guard = guard_with(store, [{"concurrency": 1, "lease_seconds": 0.3}])
    await guard.chain("GET /r").enter(Context("GET /r"))  # a crashed holder: no exit
    assert not await attempt(guard)
    await asyncio.sleep(0.45)
    assert await attempt(guard)


async def test_origin_default_counts_everyone_together(store: Store) -> None:
    guard = guard_with(store, [{"qps": 2}])
    assert [await attempt(guard, origin=o) for o in ("a", "b", "c")] == [True, True, False]


async def test_origin_name_limits_only_that_caller(store: Store) -> None:
    guard = guard_with(store, [{"qps": 1, "origin": "crawler"}])
    assert [await attempt(guard, origin="crawler") for _ in range(2)] == [True, False]
    assert all([await attempt(guard, origin="app") for _ in range(3)])


async def test_origin_other_gives_each_unnamed_caller_its_own_limit(store: Store) -> None:
    guard = guard_with(store, [{"qps": 5, "origin": "vip"}, {"qps": 1, "origin": "other"}])
    assert [await attempt(guard, origin="a") for _ in range(2)] == [True, False]
    assert [await attempt(guard, origin="b") for _ in range(2)] == [True, False]
    assert all([await attempt(guard, origin="vip") for _ in range(3)])  # named: not "other"
    assert all([await attempt(guard, origin="") for _ in range(3)])  # unknown: not "other"


async def test_statistics_count_pass_and_block(store: Store) -> None:
    guard = guard_with(store, [{"qps": 3}])
    await asyncio.gather(*(attempt(guard) for _ in range(5)))
    counts = guard.stats("GET /r").counts()
    assert (counts.passed, counts.blocked, counts.success) == (3, 2, 3)


async def test_redis_keys_carry_the_prefix_and_one_hash_tag(redis_url: str, prefix: str) -> None:
    guard = Guard(
        {"key_prefix": prefix, "resources": {"POST /kill/{id}": {"flow": [{"qps": 5}]}}},
        storage=redis_url,
    )
    assert await attempt(guard, "POST /kill/{id}")
    client = aioredis.Redis.from_url(redis_url)
    keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}:*")]
    await client.aclose()
    await guard.aclose()
    (rule_id,) = rule_ids([FlowRule(qps=5)])
    assert keys == [f"{prefix}:{{flow:POST /kill/%7Bid%7D#{rule_id}}}"]  # braces escaped


# -- per-origin state is bounded (origins are client input) ------------------------------


def flow_check(guard: Guard, resource: str = "GET /r") -> Any:
    (check,) = guard.chain(resource).checks
    return check


async def test_50000_origins_keep_at_most_10000_windows_in_memory(prefix: str) -> None:
    guard = Guard(
        {"key_prefix": prefix, "resources": {"GET /r": {"flow": [{"qps": 1, "origin": "other"}]}}}
    )
    for i in range(50_000):
        assert await attempt(guard, origin=f"caller-{i}")
    check = flow_check(guard)
    assert len(check._origins) == limiter.ORIGIN_CACHE_MAX == 10_000
    assert len(guard.store.data) == 10_000  # type: ignore[attr-defined]
    # The most recent callers kept their count.
    assert not await attempt(guard, origin="caller-49999")


async def test_per_origin_state_is_bounded_on_both_stores(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limiter, "ORIGIN_CACHE_MAX", 100)
    guard = guard_with(
        store, [{"qps": 1, "origin": "other"}, {"concurrency": 5, "origin": "other"}]
    )
    for batch in range(5):
        await asyncio.gather(*(attempt(guard, origin=f"c{batch}-{i}") for i in range(100)))
    qps, concurrency = guard.chain("GET /r").checks
    assert len(qps._origins) <= 100 and len(concurrency._origins) <= 100
    if isinstance(store, MemoryStore):
        # per kept origin: one window, and the four (empty) structures of its count
        assert len(store.data) <= 100 + 4 * 100


async def test_idle_origins_are_swept(store: Store) -> None:
    guard = guard_with(store, [{"qps": 1, "origin": "other"}])
    for i in range(50):
        assert await attempt(guard, origin=f"caller-{i}")
    await asyncio.sleep(1.2)  # past the window: the counts have lapsed
    assert await attempt(guard, origin="newcomer")
    assert len(flow_check(guard)._origins) == 1
    if isinstance(store, MemoryStore):
        assert len(store.data) == 1


async def test_an_origin_with_calls_in_flight_keeps_its_count(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limiter, "ORIGIN_CACHE_MAX", 20)
    guard = guard_with(store, [{"concurrency": 1, "origin": "other"}])
    chain = guard.chain("GET /r")
    held = Context("GET /r", "holder")
    tokens = await chain.enter(held)
    for i in range(100):  # many newer origins push the table past its bound
        assert await attempt(guard, origin=f"caller-{i}")
    assert not await attempt(guard, origin="holder")  # still at its limit of 1
    await chain.exit(held, tokens)
    assert await attempt(guard, origin="holder")


async def test_idle_concurrency_counts_are_swept(store: Store) -> None:
    guard = guard_with(store, [{"concurrency": 1, "origin": "other"}])
    for i in range(50):
        assert await attempt(guard, origin=f"caller-{i}")
    await asyncio.sleep(1.1)  # nothing in flight: their counts hold no state
    assert await attempt(guard, origin="newcomer")
    assert len(flow_check(guard)._origins) == 1
    if isinstance(store, MemoryStore):
        assert len(store.data) == 4  # the newcomer's (empty) count
