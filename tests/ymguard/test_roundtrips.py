"""The chain on Redis: one round trip in and one out, refusals give back, clusters too.

Round trips are counted as writes on the store's pipelined connection (one write carries
every command issued in one event-loop turn).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ymguard import Blocked, Context, Guard
from ymguard.chain import Chain
from ymguard.storage import RedisStore, store_from_uri, tasks
from ymguard.storage.pubsub import pubsub_of

FULL = {
    "flow": [{"qps": 1000}, {"concurrency": 5}],
    "semaphore": {"permits": 3},
    "breaker": [{"strategy": "error_ratio", "threshold": 0.5}],
}


@pytest.fixture(params=["redis", "cluster"])
async def redis_store(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[RedisStore]:
    """The shared Redis and a Redis Cluster."""
    name = "redis_url" if request.param == "redis" else "redis_cluster_url"
    store = store_from_uri(str(request.getfixturevalue(name)), key_prefix=prefix)
    assert isinstance(store, RedisStore)
    yield store
    await store.close_tasks()
    await store.aclose()


async def settled(store: RedisStore) -> None:
    """Wait until the breakers' subscriber has subscribed and read their state back: its
    resync would otherwise be a write of its own in the middle of the one counted."""
    for _ in range(600):
        service = pubsub_of(store)
        if service is not None and service.ready:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the pub/sub service did not become ready")


class Writes:
    """Counts the writes on a store's pipelined connection."""

    def __init__(self, store: RedisStore) -> None:
        assert store._pipe is not None and store._pipe._protocol is not None
        transport = store._pipe._protocol.transport
        self.count = 0
        write = transport.write

        def counted(data: Any) -> None:
            self.count += 1
            write(data)

        transport.write = counted


async def call(chain: Chain, status: int = 200) -> bool:
    ctx = Context(chain.resource)
    try:
        tokens = await chain.enter(ctx)
    except Blocked:
        return False
    ctx.status = status
    await chain.exit(ctx, tokens)
    return True


async def held(guard: Guard, resource: str) -> tuple[int, int]:
    """(concurrency count, semaphore permits) held now."""
    checks = {type(check).__name__: check for check in guard.chain(resource).checks}
    conc = checks["ConcurrencyCheck"]._backend("")  # type: ignore[attr-defined]
    sem = checks["SemaphoreCheck"].semaphore  # type: ignore[attr-defined]
    return await conc.held(), await sem.held()


async def test_the_full_chain_is_one_round_trip_in_and_one_out(redis_url: str, prefix: str) -> None:
    store = store_from_uri(redis_url, key_prefix=prefix)
    assert isinstance(store, RedisStore)
    guard = Guard({"resources": {"GET /r": FULL}}, storage=store)
    chain = guard.chain("GET /r")
    assert await call(chain)  # connects, reads the breaker's state
    await settled(store)
    writes = Writes(store)
    ctx = Context("GET /r")
    tokens = await chain.enter(ctx)
    assert writes.count == 1
    assert await held(guard, "GET /r") == (1, 1)
    writes.count = 0
    ctx.status = 200
    await chain.exit(ctx, tokens)  # returns at once: the releases' replies are not awaited
    assert writes.count == 0
    await asyncio.sleep(0)  # the end of this event-loop turn: the write goes out
    assert writes.count == 1
    await store.settle()  # their replies are in
    assert await held(guard, "GET /r") == (0, 0)
    await guard.aclose()


async def test_a_call_waiting_on_redis_holds_few_objects(redis_url: str, prefix: str) -> None:
    """What a waiting call keeps alive, the garbage collector's young collections find
    alive and move up, until a full collection walks the whole heap (the p99 of a
    Redis-guarded route). The full chain's call holds about 26 container objects while it
    waits (the task and its coroutine included); with a closure per staged permit it held 48.
    """
    store = store_from_uri(redis_url, key_prefix=prefix)
    assert isinstance(store, RedisStore)
    rules = {**FULL, "flow": [{"qps": 1000}, {"concurrency": 50}], "semaphore": {"permits": 50}}
    guard = Guard({"resources": {"GET /r": rules}}, storage=store)
    chain = guard.chain("GET /r")
    waiting = 16
    for _ in range(3):  # connected, scripts loaded, the breaker's state read
        assert all(await asyncio.gather(*(call(chain) for _ in range(waiting))))
    await settled(store)
    gc.collect()
    gc.disable()
    try:
        before = {id(o) for o in gc.get_objects()}
        calls = [asyncio.ensure_future(call(chain)) for _ in range(waiting)]
        await asyncio.sleep(0)  # each call ran up to its await on Redis; nothing sent yet
        alive = [o for o in gc.get_objects() if id(o) not in before]
        assert all(await asyncio.gather(*calls))
    finally:
        gc.enable()
    assert len(alive) / waiting <= 32, collections.Counter(type(o).__name__ for o in alive)
    assert await held(guard, "GET /r") == (0, 0)
    await guard.aclose()


async def test_calls_cancelled_anywhere_give_everything_back(redis_store: RedisStore) -> None:
    """Four calls at a time on 3 semaphore permits (one is refused and gives back what it
    took), cancelled at random points: in their entry, in a refusal's give-back, anywhere.
    Whatever was taken comes back (the exits of admitted calls are never cancelled)."""
    guard = Guard({"resources": {"GET /r": FULL}}, storage=redis_store)
    chain = guard.chain("GET /r")
    assert await call(chain)
    rnd = random.Random(7)
    exits: list[asyncio.Future[None]] = []

    async def one() -> None:
        ctx = Context("GET /r")
        tokens = await chain.enter(ctx)
        ctx.status = 200
        exits.append(asyncio.ensure_future(chain.exit(ctx, tokens)))

    for _ in range(60):
        calls = [asyncio.ensure_future(one()) for _ in range(4)]
        for _ in range(rnd.randrange(0, 6)):
            await asyncio.sleep(0)
        if rnd.random() < 0.5:
            await asyncio.sleep(rnd.random() * 0.003)
        for c in calls:
            c.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    await asyncio.gather(*exits)
    for _ in range(200):  # the give-backs of cancelled calls run in tasks of their own
        if await held(guard, "GET /r") == (0, 0):
            break
        await asyncio.sleep(0.05)
    assert await held(guard, "GET /r") == (0, 0)
    await guard.aclose()


def running_here() -> list[asyncio.Task[Any]]:
    """The give-backs still running in tasks of their own on this test's event loop (one
    left by an earlier test, on a loop now closed, can never end: waiting for it hung a CI
    run)."""
    loop = asyncio.get_running_loop()
    return [t for t in tasks._background if not t.done() and t.get_loop() is loop]


async def drained() -> None:
    """Wait for the give-backs running in tasks of their own (and those they start)."""
    while pending := running_here():
        await asyncio.wait(pending)


async def test_a_refusal_cancelled_while_giving_back_gives_back_everything(
    redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qps refuses first in the batch, after the concurrency and semaphore permits of the
    same round trip were taken; the call is cancelled while it gives them back (a client
    leaving). Before, the first give-back awaited was the last: a concurrency permit
    stayed held for its whole lease. Found by review."""
    rules = {"flow": [{"qps": 0}, {"concurrency": 5}], "semaphore": {"permits": 3}}
    guard = Guard({"resources": {"GET /r": rules}}, storage=redis_store)
    chain = guard.chain("GET /r")
    giving_back = asyncio.Event()
    run, run_many = redis_store.run, redis_store.run_many

    # Releases are the calls tried even while the store fails fast: the give-back awaits
    # Redis once one is sent, batched or alone.
    async def watched_many(calls: Any, *, always_try: bool = False) -> list[Any]:
        if always_try:
            giving_back.set()
        return await run_many(calls, always_try=always_try)

    async def watched(*args: Any, always_try: bool = False) -> Any:
        if always_try:
            giving_back.set()
        return await run(*args, always_try=always_try)

    monkeypatch.setattr(redis_store, "run_many", watched_many)
    monkeypatch.setattr(redis_store, "run", watched)
    # On one server the give-backs go out without waiting for their replies: nothing to
    # cancel. Here they are awaited, as on a cluster or while the connection opens.
    monkeypatch.setattr(redis_store, "send_many_detached", lambda calls: False)
    refused = asyncio.ensure_future(chain.enter(Context("GET /r")))
    # A refusal that ends without giving back fails here rather than hanging the run.
    started = asyncio.ensure_future(giving_back.wait())
    await asyncio.wait({refused, started}, return_when=asyncio.FIRST_COMPLETED)
    assert started.done(), refused
    refused.cancel()
    with pytest.raises(asyncio.CancelledError):
        await refused
    monkeypatch.undo()
    await drained()
    assert await held(guard, "GET /r") == (0, 0)
    await guard.aclose()


async def test_refused_calls_cancelled_at_random_give_everything_back(
    redis_store: RedisStore,
) -> None:
    """qps refuses every call after the later checks of its batch took their permits;
    each call is cancelled after a random number of event-loop steps."""
    rules = {"flow": [{"qps": 0}, {"concurrency": 50}], "semaphore": {"permits": 50}}
    guard = Guard({"resources": {"GET /r": rules}}, storage=redis_store)
    chain = guard.chain("GET /r")
    rnd = random.Random(3)
    for _ in range(100):
        refused = asyncio.ensure_future(call(chain))
        for _ in range(rnd.randrange(0, 12)):
            await asyncio.sleep(0)
        refused.cancel()
        await asyncio.gather(refused, return_exceptions=True)
    await drained()
    assert await held(guard, "GET /r") == (0, 0)
    await guard.aclose()


async def test_a_refusal_gives_back_what_the_others_took(redis_store: RedisStore) -> None:
    # The semaphore (third) refuses: the QPS count is refunded, the concurrency permit
    # (taken in the same round trip) released, and the breaker hears of no call.
    rules = {**FULL, "flow": [{"qps": 3}, {"concurrency": 5}], "semaphore": {"permits": 0}}
    guard = Guard({"resources": {"GET /r": rules}}, storage=redis_store)
    chain = guard.chain("GET /r")
    assert [await call(chain) for _ in range(5)] == [False] * 5
    assert await held(guard, "GET /r") == (0, 0)
    (sem,) = [c for c in chain.checks if c.kind == "semaphore"]
    await sem.semaphore.set_permits(2)  # type: ignore[attr-defined]
    # Nothing of the refused calls was spent: the QPS rule still admits its three.
    assert [await call(chain) for _ in range(4)] == [True, True, True, False]
    assert await held(guard, "GET /r") == (0, 0)
    await guard.aclose()


async def test_concurrent_calls_never_hold_more_than_the_limit(redis_store: RedisStore) -> None:
    rules = {**FULL, "flow": [{"qps": 10_000}, {"concurrency": 4}], "semaphore": {"permits": 3}}
    guard = Guard({"resources": {"GET /r": rules}}, storage=redis_store)
    chain = guard.chain("GET /r")
    inside = peak = 0

    async def one() -> bool:
        nonlocal inside, peak
        ctx = Context("GET /r")
        try:
            tokens = await chain.enter(ctx)
        except Blocked:
            return False
        inside += 1
        peak = max(peak, inside)
        await asyncio.sleep(0.01)
        inside -= 1
        ctx.status = 200
        await chain.exit(ctx, tokens)
        return True

    results = await asyncio.gather(*(one() for _ in range(60)))
    assert 3 <= sum(results) < 60 and peak <= 3
    assert await held(guard, "GET /r") == (0, 0)
    await guard.aclose()


async def test_a_cancelled_call_gives_its_permits_back(redis_store: RedisStore) -> None:
    guard = Guard({"resources": {"GET /r": FULL}}, storage=redis_store)
    chain = guard.chain("GET /r")
    assert await call(chain)
    for _ in range(5):
        task = asyncio.ensure_future(chain.enter(Context("GET /r")))
        await asyncio.sleep(0)  # the scripts are on their way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def given_back() -> bool:
        return await held(guard, "GET /r") == (0, 0)

    for _ in range(300):
        if await given_back():
            break
        await asyncio.sleep(0.1)
    assert await given_back()
    await guard.aclose()


async def test_a_breaker_before_the_semaphore_shares_its_round_trip(
    redis_url: str, prefix: str
) -> None:
    # A closed breaker decides without Redis: it rides in the batch of the checks around it
    # (a per-origin flow rule that does not apply to this caller does the same).
    rules = {
        "flow": [{"qps": 5, "origin": "someone-else"}],
        "breaker": [{"strategy": "error_count", "threshold": 3}],
        "semaphore": {"permits": 1},
    }
    store = store_from_uri(redis_url, key_prefix=prefix)
    assert isinstance(store, RedisStore)
    guard = Guard({"resources": {"GET /r": rules}}, storage=store)
    chain = guard.chain("GET /r")
    assert await call(chain)
    await settled(store)
    writes = Writes(store)
    ctx = Context("GET /r")
    tokens = await chain.enter(ctx)
    assert writes.count == 1
    assert not await call(chain)  # the one permit is held
    writes.count = 0
    ctx.status = 200
    await chain.exit(ctx, tokens)  # the release goes out at the end of this turn
    await asyncio.sleep(0)
    assert writes.count == 1
    assert await call(chain)  # sent after the release, on the same connection: it is back
    await guard.aclose()


async def test_aclose_waits_for_the_give_backs_of_cancelled_calls(
    redis_url: str, prefix: str
) -> None:
    """Calls cancelled in their entry give back in tasks of their own; a guard closed
    right after (an app shutting down) waits for them: nothing stays held until its lease
    ends. Before, the store closed under them (and a task could be left pending)."""
    rules = {"flow": [{"qps": 0}, {"concurrency": 50}], "semaphore": {"permits": 50}}
    store = store_from_uri(redis_url, key_prefix=prefix)
    guard = Guard({"resources": {"GET /r": rules}}, storage=store)
    chain = guard.chain("GET /r")
    assert not await call(chain)  # connected, scripts loaded: qps 0 refuses every call
    refused = [asyncio.ensure_future(call(chain)) for _ in range(20)]
    for _ in range(3):  # their batches are sent; the refusals' give-backs not yet done
        await asyncio.sleep(0)
    for c in refused:
        c.cancel()
    await asyncio.gather(*refused, return_exceptions=True)
    await guard.aclose()
    assert not running_here()
    checker = Guard(
        {"resources": {"GET /r": rules}}, storage=store_from_uri(redis_url, key_prefix=prefix)
    )
    try:
        assert await held(checker, "GET /r") == (0, 0)
    finally:
        await checker.aclose()
