"""Leased semaphores: on both stores, across processes, and as the ``semaphore:`` rule.

Every behaviour runs on the memory store and on a real Redis. Tests assert what holds
under concurrency (how many hold at once, who is served first, what is left held); they
never assert on wall-clock durations. Waiting in a test (``asyncio.sleep``) only lets
leases pass.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import signal
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import require_redis
from tests.helpers import ROOT, RedisServer, Uvicorn, running, unique_prefix
from ymguard import Guard, GuardMiddleware, Semaphore, SemaphoreFull
from ymguard.backends.permits import LeaseKeeper, close_store_tasks
from ymguard.chain import Chain, Context
from ymguard.errors import PROBLEM_BASE, FlowLimited, StorageUnavailable
from ymguard.semaphore import SemaphoreCheck, SemaphoreRule
from ymguard.stats import ResourceStats
from ymguard.storage import RedisStore, Store, store_from_uri
from ymguard.storage.pubsub import pubsub_of


@pytest.fixture
def storage_uri(storage_uri_with_cluster: str) -> str:
    """Parity on memory, Redis and a Redis Cluster (``redis+cluster://``)."""
    return storage_uri_with_cluster


# -- helpers -------------------------------------------------------------------------


async def until(condition: Callable[[], Awaitable[bool]], tries: int = 400) -> None:
    """Wait (briefly, in steps of 10 ms) until ``condition`` holds; fail if it never does."""
    for _ in range(tries):
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def queued(sem: Semaphore, n: int) -> None:
    """Wait until ``n`` waiters stand in ``sem``'s line."""

    async def check() -> bool:
        return await sem.waiting() == n

    await until(check)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


# -- permits ---------------------------------------------------------------------------


async def test_permits_are_counted_and_shared_by_name(store: Store) -> None:
    a = Semaphore("s", 2, 5, store)
    b = Semaphore("s", 2, 5, store)
    p1 = await a.acquire()
    p2 = await b.try_acquire()
    assert p2 is not None
    assert await a.try_acquire() is None
    assert (await a.held(), await b.available()) == (2, 0)
    assert await p1.release() is True
    assert await p1.release() is False  # idempotent
    assert await b.available() == 1
    await p2.release()
    assert await a.available() == 2


async def test_full_raises_semaphore_full_and_leaves_no_place_in_line(store: Store) -> None:
    sem = Semaphore("s", 1, 5, store)
    held = await sem.acquire()
    with pytest.raises(SemaphoreFull) as info:
        await sem.acquire(timeout=0.05)
    assert info.value.code == "concurrency-limited"
    assert info.value.retry_after is not None and info.value.retry_after > 0
    assert (await sem.waiting(), await sem.held()) == (0, 1)
    await held.release()


async def test_release_of_an_expired_permit_does_not_free_someone_elses(store: Store) -> None:
    sem = Semaphore("s", 1, 0.2, store)
    first = await sem.acquire()
    await asyncio.sleep(0.3)  # its lease passes
    second = await sem.acquire()  # the reclaimed permit goes to someone else
    assert await first.release() is False  # says it had expired ...
    assert await sem.held() == 1  # ... and frees nothing
    assert await sem.try_acquire() is None
    assert await second.release() is True
    assert await first.renew() is False


async def test_renew_keeps_a_slow_holder(store: Store) -> None:
    sem = Semaphore("s", 1, 0.3, store)
    slow = await sem.acquire()
    for _ in range(4):  # 0.6 s in all, twice the 0.3 s lease
        await asyncio.sleep(0.15)
        assert await slow.renew() is True
        assert await sem.try_acquire() is None
    assert await slow.release() is True
    assert await sem.available() == 1


async def test_hold_keeps_its_lease_alive_and_releases_at_the_end(store: Store) -> None:
    sem = Semaphore("s", 1, 0.3, store)
    async with sem.hold() as permit:
        for _ in range(3):  # 0.6 s without renewing by hand: the keeper does it
            await asyncio.sleep(0.2)
            assert await sem.try_acquire() is None
        assert not permit.lost
    assert permit.released
    assert await sem.held() == 0
    assert len(LeaseKeeper.of(store)) == 0


async def test_abandoned_permits_come_back_when_the_lease_passes(store: Store) -> None:
    sem = Semaphore("s", 3, 0.3, store)
    for _ in range(3):
        await sem.acquire()  # and never released: the holder "died"
    assert await sem.available() == 0
    # Waiters are woken by the soonest lease expiry: no release ever comes.
    permits = [await sem.acquire(timeout=5) for _ in range(3)]
    assert await sem.held() == 3
    for p in permits:
        assert await p.release() is True
    assert await sem.available() == 3


async def test_the_keeper_lets_go_of_a_permit_nobody_references(store: Store) -> None:
    sem = Semaphore("s", 1, 0.3, store)
    permit = await sem.acquire()
    permit.keep_alive()
    del permit  # nothing can release it now: like a holder that died, its lease runs out
    again = await sem.acquire(timeout=5)
    assert await again.release() is True
    assert len(LeaseKeeper.of(store)) == 0


async def test_short_holders_one_after_another_share_one_keeper_task(store: Store) -> None:
    # Each lease is dropped before it is due (a call that holds a permit for less than a
    # step of the loop, the usual one): the keeper's task sleeps until the first is due
    # instead of looking at once, finding nothing and ending (a task per call or burst).
    sem = Semaphore("s", 1, 30, store)
    keeper = LeaseKeeper.of(store)
    tasks = set()
    for i in range(5):
        keeper.keep(sem._backend, f"p{i}", 30).stop()
        assert keeper._task is not None
        tasks.add(keeper._task)
        for _ in range(5):  # steps of the loop, for the task to run
            await asyncio.sleep(0)
    assert len(tasks) == 1 and not keeper._task.done() and len(keeper) == 0
    # A shorter lease, due before the sleeping task would wake (10 s), wakes it: it is
    # renewed in time (every 0.2 s), so it is still held after its 0.6 s.
    held = await sem.acquire()
    kept = keeper.keep(sem._backend, held.id, 0.6)
    await asyncio.sleep(0.9)
    kept.stop()
    assert not kept.lost
    assert await held.release() is True  # still held: it did not expire
    await close_store_tasks(store)
    assert keeper._task is None


async def test_set_and_add_permits_are_shared_and_wake_waiters(store: Store) -> None:
    a = Semaphore("s", 1, 5, store)
    b = Semaphore("s", 1, 5, store)
    held = await a.acquire()
    waiter = asyncio.create_task(b.acquire(timeout=5))
    await queued(a, 1)
    await a.add_permits(1)  # a larger count lets the waiter in
    second = await waiter
    assert (await b.available(), await b.held()) == (0, 2)
    await b.set_permits(5)
    assert await a.available() == 3
    await a.set_permits(1)  # fewer than held: nobody new gets in until two leave
    assert await a.available() == 0
    await held.release()
    assert await b.try_acquire() is None
    await second.release()
    assert await b.available() == 1
    with pytest.raises(ValueError):
        await a.set_permits(-1)


# -- waiters ---------------------------------------------------------------------------


async def test_waiters_are_served_first_come_first_served(store: Store) -> None:
    sem = Semaphore("s", 1, 5, store)
    holder = await sem.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        async with sem.hold(timeout=10):
            order.append(i)

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(waiter(i)))
        await queued(sem, i + 1)
    await holder.release()
    await asyncio.gather(*tasks)
    assert order == list(range(6))


async def test_a_newcomer_does_not_take_a_permit_a_waiter_is_entitled_to(store: Store) -> None:
    sem = Semaphore("s", 1, 5, store)
    holder = await sem.acquire()
    waiter = asyncio.create_task(sem.acquire(timeout=10))
    await queued(sem, 1)
    await holder.release()
    assert await sem.try_acquire() is None  # the waiter is first in line
    permit = await waiter
    assert await permit.release() is True


async def test_a_task_cancelled_while_waiting_holds_nothing(store: Store) -> None:
    sem = Semaphore("s", 1, 5, store)
    holder = await sem.acquire()
    doomed = asyncio.create_task(sem.acquire(timeout=10))
    await queued(sem, 1)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await until(lambda: _equals(sem.waiting(), 0))
    assert await sem.held() == 1
    nxt = asyncio.create_task(sem.acquire(timeout=10))
    await queued(sem, 1)
    await holder.release()
    assert await (await nxt).release() is True  # the cancelled one blocked no one
    assert await sem.available() == 1


async def test_a_task_cancelled_while_holding_releases(store: Store) -> None:
    sem = Semaphore("s", 1, 5, store)
    inside = asyncio.Event()

    async def slow() -> None:
        async with sem.hold():
            inside.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(slow())
    await inside.wait()
    assert await sem.held() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: _equals(sem.held(), 0))


async def test_cancelling_at_random_points_leaks_no_permit_and_no_place(store: Store) -> None:
    sem = Semaphore("s", 3, 5, store)
    rng = random.Random(7)

    async def user() -> None:
        async with sem.hold(timeout=5):
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(user()) for _ in range(60)]
    for task in tasks:
        await asyncio.sleep(rng.random() * 0.004)
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await until(lambda: _equals(sem.held(), 0))
    await until(lambda: _equals(sem.waiting(), 0))
    assert await sem.available() == 3


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_never_more_holders_than_permits_under_200_acquirers(store: Store) -> None:
    sem = Semaphore("crowd", 5, 5, store)
    running = peak = done = 0

    async def one() -> None:
        nonlocal running, peak, done
        async with sem.hold(timeout=30):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.002)
            running -= 1
            done += 1

    await asyncio.gather(*(one() for _ in range(200)))
    assert (peak, done) == (5, 200)
    assert (await sem.held(), await sem.waiting()) == (0, 0)


@pytest.fixture(params=["memory", "redis"])
async def counted(
    request: pytest.FixtureRequest, prefix: str
) -> AsyncIterator[tuple[Store, Callable[[], int]]]:
    """A store, and a count of the Redis commands its server has run (private server)."""
    if request.param == "memory":
        yield store_from_uri("memory://", key_prefix=prefix), lambda: 0
        return
    server: RedisServer = request.getfixturevalue("private_redis")
    probe = redis.Redis.from_url(server.url)

    def commands() -> int:
        stats = probe.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")

    s = store_from_uri(server.url, key_prefix=prefix)
    yield s, commands
    await s.aclose()
    probe.close()


async def test_waiters_wake_on_release_without_polling(
    counted: tuple[Store, Callable[[], int]],
) -> None:
    store, commands = counted
    sem = Semaphore("s", 1, 3600, store)  # no lease expiry and no place refresh can wake it
    tries = 0
    acquire = sem._backend.acquire

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal tries
        tries += 1
        return await acquire(*args, **kwargs)

    sem._backend.acquire = counting  # type: ignore[method-assign]
    holder = await sem.acquire()
    waiter = asyncio.create_task(sem.acquire(timeout=3600))
    await queued(sem, 1)
    tries_queued, before = tries, commands()
    await asyncio.sleep(0.6)  # the waiter waits: it must not touch the store meanwhile
    assert (tries, commands()) == (tries_queued, before)
    await holder.release()
    permit = await asyncio.wait_for(waiter, 10)  # only the release can have woken it
    assert tries - tries_queued == 1  # woken once, took the permit at the first try
    assert tries <= 4  # holder + first try + joining the line + after the wake-up
    await permit.release()


async def test_a_waiter_cancelled_while_subscribing_leaves_wake_ups_working(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_from_uri(redis_url, key_prefix=prefix)
    assert isinstance(store, RedisStore)
    entered, hang = asyncio.Event(), asyncio.Event()
    pubsub = store.client.pubsub

    def first_subscribe_hangs() -> Any:
        ps = pubsub()
        subscribe = ps.subscribe

        async def hanging(*channels: Any) -> Any:
            if not entered.is_set():
                entered.set()
                await hang.wait()  # never set: the waiter is cancelled here
            return await subscribe(*channels)

        ps.subscribe = hanging
        return ps

    monkeypatch.setattr(store.client, "pubsub", first_subscribe_hangs)
    sem = Semaphore("s", 1, 3600, store)  # no lease expiry and no place refresh can wake it
    tries = 0
    acquire = sem._backend.acquire

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal tries
        tries += 1
        return await acquire(*args, **kwargs)

    sem._backend.acquire = counting  # type: ignore[method-assign]
    holder = await sem.acquire()
    first = asyncio.create_task(sem.acquire(timeout=3600))
    await entered.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    waker = pubsub_of(store)
    assert waker.listeners == {}  # the cancelled waiter's event is forgotten
    assert await sem.waiting() == 0

    # The next waiter subscribes afresh and sleeps until the release publishes its wake-up.
    waiter = asyncio.create_task(sem.acquire(timeout=3600))
    await queued(sem, 1)
    assert sem._backend.listening()
    tries_queued = tries
    await asyncio.sleep(0.6)  # without pub/sub it would poll (every 0.25 s) meanwhile
    assert tries == tries_queued
    await holder.release()
    permit = await asyncio.wait_for(waiter, 10)  # only the release can have woken it
    assert tries - tries_queued == 1
    await permit.release()
    assert waker.listeners == {}
    await close_store_tasks(store)
    await store.aclose()


async def test_a_short_wait_is_not_held_up_by_an_unconfirmed_subscription(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_from_uri(redis_url, key_prefix=prefix)
    assert isinstance(store, RedisStore)
    never = asyncio.Event()
    pubsub = store.client.pubsub

    def subscribe_hangs() -> Any:
        ps = pubsub()

        async def hanging(*channels: Any) -> Any:
            await never.wait()

        ps.subscribe = hanging
        return ps

    monkeypatch.setattr(store.client, "pubsub", subscribe_hangs)
    # Were the wait for a confirmation bounded by this alone, the acquires would hang.
    monkeypatch.setattr("ymguard.backends.permits._SUBSCRIBE_TIMEOUT", 3600.0)
    sem = Semaphore("s", 1, 3600, store)
    holder = await sem.acquire()
    async with asyncio.timeout(30):  # a guard against a hang, not a measure
        for _ in range(2):  # the second after the first gave up its subscription
            with pytest.raises(SemaphoreFull):
                await sem.acquire(timeout=0.1)
    assert pubsub_of(store).listeners == {}
    assert await sem.waiting() == 0
    await holder.release()
    await close_store_tasks(store)
    await store.aclose()


async def test_releases_are_sent_while_the_store_fails_fast(redis_url: str, prefix: str) -> None:
    store = store_from_uri(redis_url, key_prefix=prefix)
    assert isinstance(store, RedisStore)
    sem = Semaphore("s", 2, 3600, store)
    permit = await sem.acquire()
    store.retry_interval = 3600.0
    store._mark_down(OSError("a blip"))  # every other call now fails fast for an hour
    with pytest.raises(StorageUnavailable):
        await sem.held()
    assert await permit.release() is True  # a release is sent anyway, and gets through
    assert await sem.available() == 2  # ... and its success ended the outage
    await store.aclose()


async def test_close_store_tasks_stops_the_keeper_and_the_wake_ups(store: Store) -> None:
    sem = Semaphore("s", 1, 0.3, store)
    holder = await sem.acquire()
    holder.keep_alive()
    keeper = LeaseKeeper.of(store)
    waiter = asyncio.create_task(sem.acquire(timeout=10))
    await queued(sem, 1)
    waker = pubsub_of(store) if isinstance(store, RedisStore) else None
    assert keeper._task is not None and (waker is None or waker.task is not None)
    await close_store_tasks(store)
    assert keeper._task is None and len(keeper) == 0
    assert store not in LeaseKeeper._keepers
    if waker is not None:  # the waiter, woken, looks again with a waker of its own
        assert (waker.task, waker.pubsub) == (None, None)
        assert pubsub_of(store) is not waker
    # Nothing renews the holder's lease any more: when it ends, the waiter gets the permit.
    permit = await waiter
    assert await holder.release() is False
    assert await permit.release() is True
    await close_store_tasks(store)  # again: harmless
    assert store not in LeaseKeeper._keepers and pubsub_of(store) is None


async def test_releasing_a_permit_whose_lease_lapsed_says_it_was_not_held(store: Store) -> None:
    sem = Semaphore("s", 1, 0.1, store)
    permit = await sem.acquire()
    await asyncio.sleep(0.3)  # the lease lapses; nobody waits, nobody took it since
    assert await permit.release() is False
    assert await sem.held() == 0


async def test_a_lease_kept_after_close_store_tasks_has_a_new_keeper(store: Store) -> None:
    sem = Semaphore("s", 2, 30.0, store)
    first = await sem.acquire()
    first.keep_alive()
    closed = LeaseKeeper.of(store)
    await close_store_tasks(store)
    assert closed.closed
    # The backend remembered the closed keeper: the next lease must not go to it (nothing
    # would ever close its task again).
    second = await sem.acquire()
    second.keep_alive()
    keeper = LeaseKeeper._keepers.get(store)
    assert keeper is not None and keeper is not closed and len(keeper) == 1
    assert len(closed) == 0
    assert await second.release() and await first.release()
    await close_store_tasks(store)


async def test_the_tasks_of_a_store_do_not_keep_it_alive(storage_uri: str, prefix: str) -> None:
    store = store_from_uri(storage_uri, key_prefix=prefix)
    sem = Semaphore("s", 1, 0.3, store)
    holder = await sem.acquire()
    holder.keep_alive()
    waiter = asyncio.create_task(sem.acquire(timeout=10))
    await queued(sem, 1)
    await holder.release()
    await (await waiter).release()
    keeper = LeaseKeeper.of(store)
    waker = pubsub_of(store) if isinstance(store, RedisStore) else None
    ref = weakref.ref(store)
    await store.aclose()
    del store, sem, holder, waiter
    await asyncio.sleep(0)  # asyncio keeps the last task awaited (and its result) until then
    gc.collect()
    assert ref() is None
    await keeper.aclose()
    if waker is not None:
        await waker.aclose()


# -- across processes (Redis) ------------------------------------------------------------


async def _worker(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.apps.semaphore_worker",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )


async def _line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        return (await proc.stdout.readline()).decode().strip()


async def test_never_more_holders_than_permits_across_two_processes(
    redis_url: str, prefix: str
) -> None:
    workers = [await _worker("crowd", redis_url, prefix, "100", "5") for _ in range(2)]
    try:
        assert [await _line(w) for w in workers] == ["ready", "ready"]
        r = redis.Redis.from_url(redis_url)
        r.rpush(f"{prefix}:go", 1, 1)  # both start at once
        results = [json.loads(await _line(w)) for w in workers]
    finally:
        for w in workers:
            if w.returncode is None:
                w.kill()
            await w.wait()
    assert sum(res["acquired"] for res in results) == 200
    assert max(res["peak"] for res in results) <= 5
    assert int(r.get(f"{prefix}:running") or 0) == 0
    r.close()


async def test_a_process_killed_holding_3_permits_leaks_nothing_once_the_lease_passes(
    redis_url: str, prefix: str
) -> None:
    # A 2 s lease: long enough that "still leased right after the kill" holds on a
    # loaded machine, short enough to wait out.
    worker = await _worker("hold", redis_url, prefix, "3", "2")
    try:
        assert await _line(worker) == "held 3"
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    store = store_from_uri(redis_url, key_prefix=prefix)
    # The test's own permits get a lease far longer than its wait: with the dead worker's
    # 2 s, the two taken at once would expire as the fifth is taken (and be counted free).
    sem = Semaphore("doomed", 5, 60, store)
    assert await sem.held() == 3  # the dead process's permits are still leased ...
    # ... until their lease passes; these waiters are woken by those expiries.
    permits = [await sem.acquire(timeout=10) for _ in range(5)]
    assert (await sem.held(), await sem.available()) == (5, 0)
    for p in permits:
        assert await p.release() is True
    assert await sem.available() == 5
    await store.aclose()


# -- storage outages ---------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["local", "open", "closed"])
async def test_an_outage_follows_on_storage_error(
    private_redis: RedisServer, prefix: str, policy: Any
) -> None:
    store = store_from_uri(private_redis.url, key_prefix=prefix, on_storage_error=policy)
    sem = Semaphore("s", 1, 5, store)
    permit = await sem.acquire()
    private_redis.stop()
    if policy == "closed":
        with pytest.raises(StorageUnavailable):
            await sem.acquire()
    elif policy == "open":
        a, b = await sem.acquire(), await sem.acquire()  # both pass, holding nothing
        assert await a.release() is False and await b.release() is False
    else:  # an in-process semaphore of the same size stands in
        local = await sem.acquire()
        assert await sem.try_acquire() is None
        assert await local.release() is True
    assert await permit.release() is False  # unreachable: its lease will free it
    await store.aclose()


# -- the rule in the middleware ------------------------------------------------------------


class App:
    """A Starlette app behind GuardMiddleware whose endpoints count the calls inside.

    With a gate, calls wait inside until it opens, except ``?probe=1`` calls, so that a
    probe the guard wrongly admits fails its test instead of hanging it.
    """

    def __init__(self, guard: Guard, gate: asyncio.Event | None = None) -> None:
        self.running = self.peak = 0
        self.gate = gate
        routes = [Route(p, self.slow) for p in ("/slow", "/a", "/b", "/conc")]
        self.asgi = GuardMiddleware(Starlette(routes=routes), guard)

    async def slow(self, request: Request) -> JSONResponse:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if self.gate is not None and "probe" not in request.query_params:
                await self.gate.wait()
            else:
                await asyncio.sleep(0.05)
        finally:
            self.running -= 1
        return JSONResponse({"peak": self.peak})

    async def inside(self, n: int) -> None:
        """Wait until ``n`` calls are inside the endpoint."""

        async def check() -> bool:
            return self.running == n

        await until(check)


async def finished(tasks: list[asyncio.Task[httpx.Response]], n: int) -> None:
    """Wait until ``n`` of the requests have their answer."""

    async def check() -> bool:
        return sum(t.done() for t in tasks) == n

    await until(check)


async def test_rule_permits_2_never_runs_more_than_2_at_once(store: Store) -> None:
    rules = {"resources": {"GET /slow": {"semaphore": {"permits": 2, "lease_seconds": 1}}}}
    guard = Guard(rules, storage=store)
    app = App(guard, asyncio.Event())
    async with client(app.asgi) as c:
        tasks = [asyncio.create_task(c.get("/slow")) for _ in range(12)]
        await finished(tasks, 10)  # ten are refused while two are inside
        await app.inside(2)  # the two admitted may still be on their way to the endpoint
        assert app.gate is not None
        app.gate.set()
        responses = await asyncio.gather(*tasks)
    statuses = [r.status_code for r in responses]
    assert (statuses.count(200), statuses.count(429), app.peak) == (2, 10, 2)
    blocked = next(r for r in responses if r.status_code == 429)
    assert blocked.json()["type"] == PROBLEM_BASE + "concurrency-limited"
    assert blocked.json()["resource"] == "GET /slow"
    assert int(blocked.headers["Retry-After"]) >= 1
    assert await guard.semaphore("GET /slow").held() == 0


async def test_rule_wait_ms_queues_requests_instead_of_refusing(store: Store) -> None:
    rule = {"permits": 2, "lease_seconds": 1, "wait_ms": 5000}
    guard = Guard({"resources": {"GET /slow": {"semaphore": rule}}}, storage=store)
    app = App(guard)
    async with client(app.asgi) as c:
        responses = await asyncio.gather(*(c.get("/slow") for _ in range(10)))
    assert [r.status_code for r in responses] == [200] * 10
    assert 1 <= app.peak <= 2


async def test_resources_naming_one_semaphore_share_it(store: Store) -> None:
    sem_rule = {"permits": 1, "name": "killSem"}
    rules = {"resources": {"GET /a": {"semaphore": sem_rule}, "GET /b": {"semaphore": sem_rule}}}
    guard = Guard(rules, storage=store)
    gate = asyncio.Event()
    app = App(guard, gate)
    async with client(app.asgi) as c:
        first = asyncio.create_task(c.get("/a"))
        await app.inside(1)
        sem = guard.semaphore("killSem")
        assert await sem.held() == 1
        assert (await c.get("/b?probe=1")).status_code == 429
        gate.set()
        assert (await first).status_code == 200
        assert (await c.get("/b")).status_code == 200
    assert sem is guard.semaphore("killSem")
    assert await sem.available() == 1


async def test_a_slow_request_keeps_its_permit_past_the_lease(store: Store) -> None:
    rules = {"resources": {"GET /slow": {"semaphore": {"permits": 1, "lease_seconds": 0.3}}}}
    guard = Guard(rules, storage=store)
    gate = asyncio.Event()
    app = App(guard, gate)
    async with client(app.asgi) as c:
        slow = asyncio.create_task(c.get("/slow"))
        await app.inside(1)
        sem = guard.semaphore("GET /slow")
        for _ in range(3):  # 0.6 s: two leases
            await asyncio.sleep(0.2)
            assert (await c.get("/slow?probe=1")).status_code == 429
        gate.set()
        assert (await slow).status_code == 200
    assert await sem.held() == 0


async def test_a_slow_request_keeps_its_concurrency_count_past_the_lease(store: Store) -> None:
    rules = {"resources": {"GET /conc": {"flow": [{"concurrency": 1, "lease_seconds": 0.3}]}}}
    guard = Guard(rules, storage=store)
    gate = asyncio.Event()
    app = App(guard, gate)
    async with client(app.asgi) as c:
        slow = asyncio.create_task(c.get("/conc"))
        await app.inside(1)
        for _ in range(3):  # 0.6 s: two leases
            await asyncio.sleep(0.2)
            assert (await c.get("/conc?probe=1")).status_code == 429
        gate.set()
        assert (await slow).status_code == 200
        assert (await c.get("/conc")).status_code == 200


async def test_a_later_check_that_blocks_gets_the_permit_back(store: Store) -> None:
    sem = Semaphore("s", 1, 5, store)

    class Refuse:
        async def enter(self, ctx: Context) -> None:
            raise FlowLimited(ctx.resource, "after the semaphore")

        async def exit(self, ctx: Context, token: Any) -> None:
            pass

    check = SemaphoreCheck("r", SemaphoreRule(permits=1), sem)
    chain = Chain("r", [check, Refuse()], ResourceStats())
    with pytest.raises(FlowLimited):
        await chain.enter(Context("r"))
    assert await sem.held() == 0
    assert len(LeaseKeeper.of(store)) == 0


def test_the_rule_is_validated() -> None:
    with pytest.raises(Exception, match="permits"):
        Guard({"resources": {"GET /x": {"semaphore": {"permits": -1}}}})
    with pytest.raises(Exception, match="lease_seconds"):
        Guard({"resources": {"GET /x": {"semaphore": {"permits": 1, "lease_seconds": 0}}}})
    guard = Guard({"resources": {"GET /x": {"semaphore": {"permits": 3}}}})
    rule = guard.rules.resources["GET /x"].semaphore
    assert rule is not None and (rule.lease_seconds, rule.wait_ms, rule.name) == (5, 0, None)
    assert guard.semaphore("GET /x").permits == 3
    with pytest.raises(KeyError):
        guard.semaphore("nope")


@pytest.mark.parametrize("policy", ["local", "open", "closed"])
async def test_the_rule_follows_on_storage_error(
    private_redis: RedisServer, prefix: str, policy: str
) -> None:
    rules = {
        "key_prefix": prefix,
        "on_storage_error": policy,
        "resources": {"GET /slow": {"semaphore": {"permits": 1}}},
    }
    guard = Guard(rules, storage=private_redis.url)
    app = App(guard, asyncio.Event())
    private_redis.stop()
    async with client(app.asgi) as c:
        first = asyncio.create_task(c.get("/slow"))
        if policy != "closed":
            await app.inside(1)
        later = asyncio.create_task(c.get("/slow"))
        if policy == "open":
            await app.inside(2)
        else:
            await finished([first, later], 1 if policy == "local" else 2)
        assert app.gate is not None
        app.gate.set()
        first_status, second = (await first).status_code, await later
    if policy == "closed":
        assert (first_status, second.status_code) == (503, 503)
        assert second.json()["type"] == PROBLEM_BASE + "storage-unavailable"
    elif policy == "open":
        assert (first_status, second.status_code) == (200, 200)
    else:  # the in-process stand-in still allows 1 at once
        assert (first_status, second.status_code) == (200, 429)
    await guard.aclose()


# -- uvicorn -----------------------------------------------------------------------------


def _servers(storage: str, prefix: str, n: int, redis_url: str | None = None) -> list[Uvicorn]:
    env = {"YMGUARD_STORAGE": storage, "SEM_TEST_PREFIX": prefix}
    if redis_url:
        env["SEM_TEST_REDIS"] = redis_url
    return [Uvicorn("tests.apps.semaphore_app:app", env=env) for _ in range(n)]


@pytest.fixture(scope="module")
def two_servers() -> Any:
    """Two uvicorn processes on the shared Redis, for every test of this module."""
    redis_url = require_redis()
    servers = _servers(redis_url, unique_prefix(), 2, redis_url)
    with running(servers):
        yield servers


async def test_permits_2_never_runs_more_than_2_across_two_uvicorn_processes(
    two_servers: list[Uvicorn],
) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        pids = {(await c.get(s.url + "/health")).json()["pid"] for s in two_servers}
        assert len(pids) == 2
        responses = await asyncio.gather(
            *(c.get(f"{two_servers[i % 2].url}/slow") for i in range(30))
        )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 2
    assert max(r.json()["running"] for r in responses if r.status_code == 200) <= 2
    for r in responses:
        if r.status_code == 429:
            assert r.json()["type"] == PROBLEM_BASE + "concurrency-limited"
            assert "Retry-After" in r.headers


async def _disconnect_frees_the_permit(servers: list[Uvicorn]) -> None:
    streamer, other = servers[0], servers[-1]
    async with httpx.AsyncClient(timeout=15) as c:
        async with c.stream("GET", streamer.url + "/stream") as feed:
            # Keep the iterator referenced: a dropped async generator is finalized, which
            # closes the response, which is exactly the disconnect this test is about.
            chunks = feed.aiter_bytes()
            await anext(chunks)  # the feed has started: it holds the permit
            assert (await c.get(other.url + "/peek")).status_code == 429
            del chunks
        # The client went away mid-feed; a request waiting up to 8 s gets the permit.
        assert (await c.get(other.url + "/after")).status_code == 200


async def test_a_disconnecting_client_frees_its_permit_across_processes(
    two_servers: list[Uvicorn],
) -> None:
    await _disconnect_frees_the_permit(two_servers)


async def test_a_disconnecting_client_frees_its_permit_in_one_process(prefix: str) -> None:
    servers = _servers("memory://", prefix, 1)
    try:
        servers[0].start()
        await _disconnect_frees_the_permit(servers)
    finally:
        servers[0].stop()


async def test_a_plain_endpoint_is_cancelled_when_its_client_goes_away(prefix: str) -> None:
    servers = _servers("memory://", prefix, 1)
    try:
        server = servers[0].start()
        async with httpx.AsyncClient(timeout=10) as c:
            sleeper = asyncio.ensure_future(c.get(server.url + "/sleep"))
            for _ in range(100):  # until /sleep holds the only permit
                await asyncio.sleep(0.05)
                if (await c.get(server.url + "/bed")).status_code == 429:
                    break
            else:
                raise AssertionError("/sleep never took the permit")
            sleeper.cancel()  # the client hangs up; the endpoint would sleep a minute more
            for _ in range(100):
                await asyncio.sleep(0.05)
                if (await c.get(server.url + "/bed")).status_code == 200:
                    break
            else:
                raise AssertionError("the permit was not released when the client left")
    finally:
        servers[0].stop()


def test_permit_ids_are_unique_and_a_forked_process_draws_its_own() -> None:
    import os

    from ymguard.backends.permits import new_permit_id

    ids = {new_permit_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids must not repeat the parent's
        os.write(write, new_permit_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    os.close(write)
    assert child.split("-")[0] != new_permit_id().split("-")[0]


async def test_the_keeper_forgets_ended_leases_behind_a_long_holder(store: Store) -> None:
    # Leases come in young (an append per holder) and leave from the head when they end;
    # one long holder at the head must not keep every lease that ended behind it.
    sem = Semaphore("s", 10, 30, store)
    keeper = LeaseKeeper.of(store)
    long_holder = await sem.acquire()
    long_holder.keep_alive()
    for _ in range(20_000):
        kept = keeper.keep(sem._backend, "short", 30.0)
        kept.stop()
    assert len(keeper) == 1
    assert len(keeper._young) <= 2 * 4096
    assert await long_holder.release() is True
    assert len(keeper) == 0
