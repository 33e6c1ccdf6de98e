"""``prefetch: true`` on qps rules: permits taken from Redis a few at a time.

Never more than the limit, across processes (guards with stores of their own stand for
processes); unused permits go back when their bucket ends; most calls make no round trip;
outages follow ``on_storage_error``; the same answers as without it on every store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import select
import time
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.helpers import RedisServer
from ymguard import Context, FlowLimited, Guard, RulesError
from ymguard._model import rule_ids
from ymguard.backends._lua import lua
from ymguard.backends.permits import RedisPermits
from ymguard.backends.prefetch import PrefetchWindow
from ymguard.backends.window import Prefetched, RedisWindow
from ymguard.chain import Chain, CheckStatus
from ymguard.errors import StorageBlocked
from ymguard.limiter import ConcurrencyCheck, QpsCheck
from ymguard.rules import load_rules_text
from ymguard.storage import RedisStore, Store, store_from_uri
from ymguard.storage.tasks import drain

from .test_limiter import attempt
from .test_middleware import client, shop
from .test_roundtrips import Writes

RESOURCE = "GET /r"


@pytest.fixture
def storage_uri(storage_uri_with_cluster: str) -> str:
    """Parity on memory, Redis and a Redis Cluster (``redis+cluster://``)."""
    return storage_uri_with_cluster


def prefetching(storage: Any, qps: int, prefix: str | None = None, **rule: Any) -> Guard:
    rules: dict[str, Any] = {
        "resources": {RESOURCE: {"flow": [{"qps": qps, "prefetch": True, **rule}]}}
    }
    if prefix is not None:
        rules["key_prefix"] = prefix
    return Guard(rules, storage=storage)


def stock_of(guard: Guard) -> PrefetchWindow | None:
    found = [c._prefetch for c in guard.chain(RESOURCE).checks if isinstance(c, QpsCheck)]
    return next((p for p in found if p is not None), None)


def stock_of_check(check: object) -> PrefetchWindow:
    assert isinstance(check, QpsCheck) and check._prefetch is not None
    return check._prefetch


def permits_of(chain: Chain) -> RedisPermits:
    """The Redis permits of ``chain``'s concurrency check (every caller's count)."""
    conc = next(c for c in chain.checks if isinstance(c, ConcurrencyCheck))
    backend = conc._backend("")
    assert isinstance(backend, RedisPermits)
    return backend


async def stock_up(chain: Chain, stock: PrefetchWindow, held: int) -> None:
    """Pass calls through ``chain`` until its batches have grown and ``stock`` holds
    ``held`` permits."""
    for _ in range(200):
        ctx = Context(RESOURCE)
        await chain.exit(ctx, await chain.enter(ctx))
        if stock.held() >= held:
            return
    raise AssertionError(f"the stock holds {stock.held()} permits after 200 calls, not {held}")


def chained(
    redis_url: str, prefix: str, permits: int
) -> tuple[RedisStore, Guard, Chain, PrefetchWindow]:
    """A guard whose prefetched qps rule sits between two staged checks (concurrency,
    semaphore), as on the demo's seckill: its store, the chain and the qps rule's stock."""
    rules = {
        "flow": [{"concurrency": permits}, {"qps": 100_000, "prefetch": True}],
        "semaphore": {"permits": permits},
    }
    store = store_from_uri(redis_url, key_prefix=prefix)
    assert isinstance(store, RedisStore)
    guard = Guard({"resources": {RESOURCE: rules}}, storage=store)
    chain = guard.chain(RESOURCE)
    assert [type(c).__name__ for c in chain.checks] == [
        "ConcurrencyCheck",
        "QpsCheck",
        "SemaphoreCheck",
    ]
    return store, guard, chain, stock_of_check(chain.checks[1])


async def through(chain: Chain) -> None:
    """One call through ``chain``, admitted (entered and left)."""
    ctx = Context(chain.resource)
    await chain.exit(ctx, await chain.enter(ctx))


async def counted(redis_url: str, prefix: str) -> int:
    """The permits the Redis windows under ``prefix`` count now."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        total = 0
        async for key in client.scan_iter(f"{prefix}:*"):
            total += sum(int(v) for v in (await client.hgetall(key)).values())
        return total
    finally:
        await client.aclose()


async def until_given_back(guards: list[Guard]) -> None:
    """Wait until no guard holds prefetched permits (their buckets have ended)."""
    for _ in range(100):  # buckets are 100 ms: this ends within a few
        await asyncio.sleep(0.05)
        if all((s := stock_of(g)) is None or s.held() == 0 for g in guards):
            await asyncio.sleep(0.05)  # the refunds are on their way: let them land
            return
    raise AssertionError("prefetched permits were never given back")


# -- the same answers on every store -------------------------------------------------------


async def test_a_burst_admits_exactly_the_limit(store: Store) -> None:
    guard = Guard(
        {"resources": {RESOURCE: {"flow": [{"qps": 10, "prefetch": True}]}}}, storage=store
    )
    admitted = sum(await asyncio.gather(*(attempt(guard) for _ in range(40))))
    # Exactly the limit, but for a permit fetched just before a bucket ended: it is
    # given back a moment later (the batches of qps 10 are one permit).
    assert 9 <= admitted <= 10


async def test_a_refusal_says_when_to_retry(store: Store) -> None:
    guard = Guard(
        {"resources": {RESOURCE: {"flow": [{"qps": 2, "prefetch": True}]}}}, storage=store
    )
    assert await attempt(guard) and await attempt(guard)
    with pytest.raises(FlowLimited) as info:
        await guard.chain(RESOURCE).enter(Context(RESOURCE))
    # Rendered like any window's refusal: when to retry, the policy and what is left.
    response = guard.problem_for(info.value)
    assert response is not None and response.status_code == 429
    assert "retry-after" in response.headers
    assert response.headers["ratelimit-policy"] == '"flow";q=2;w=1'
    assert response.headers["ratelimit"].startswith('"flow";r=0;')


async def test_a_call_blocked_by_a_later_rule_spends_no_permit(store: Store) -> None:
    flow = [{"qps": 5, "prefetch": True}, {"qps": 1}]
    guard = Guard({"resources": {RESOURCE: {"flow": flow}}}, storage=store)
    assert sum([await attempt(guard) for _ in range(8)]) == 1
    # The first rule gave back the 7 the second refused (to its stock, then to the
    # window): another process's first rule passes 4 more.
    await until_given_back([guard])
    other = Guard({"resources": {RESOURCE: {"flow": flow[:1]}}}, storage=store)
    assert sum([await attempt(other) for _ in range(8)]) == 4


async def test_origins_count_apart(store: Store) -> None:
    guard = Guard(
        {"resources": {RESOURCE: {"flow": [{"qps": 2, "prefetch": True, "origin": "other"}]}}},
        storage=store,
    )
    results = {o: sum([await attempt(guard, origin=o) for _ in range(4)]) for o in ("a", "b", "")}
    assert results == {"a": 2, "b": 2, "": 4}  # no origin: the rule does not apply


# -- across processes, on Redis --------------------------------------------------------------


async def test_processes_together_never_pass_the_limit_and_unused_permits_go_back(
    redis_url: str, prefix: str
) -> None:
    guards = [prefetching(redis_url, 300, prefix) for _ in range(3)]
    try:
        admitted = sum(await asyncio.gather(*(attempt(g) for _ in range(200) for g in guards)))
        # Never more than the limit. Permits a process held when its bucket ended were
        # kept from the others for that bucket: at most a batch (30) each short.
        assert 300 - 3 * 30 <= admitted <= 300
        await until_given_back(guards)
        assert await counted(redis_url, prefix) == admitted  # none lost, none extra
    finally:
        for guard in guards:
            await guard.aclose()


async def test_most_calls_make_no_round_trip(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetches = 0
    real = RedisWindow.prefetch

    async def counting(self: RedisWindow, *args: Any) -> Any:
        nonlocal fetches
        fetches += 1
        return await real(self, *args)

    monkeypatch.setattr(RedisWindow, "prefetch", counting)
    guard = prefetching(redis_url, 100_000, prefix)
    try:
        assert sum(await asyncio.gather(*(attempt(guard) for _ in range(1000)))) == 1000
        # Batches double while they run out (1, 2, 4, ... up to 10,000): a few dozen
        # fetches at most, even if the calls straddle several 100 ms buckets.
        assert fetches <= 100
        await until_given_back([guard])
        assert await counted(redis_url, prefix) == 1000
    finally:
        await guard.aclose()


async def test_cancelled_callers_leave_nothing_behind(redis_url: str, prefix: str) -> None:
    guards = [prefetching(redis_url, 200, prefix) for _ in range(2)]
    rng = random.Random(7)
    try:
        tasks = [asyncio.ensure_future(attempt(g)) for _ in range(300) for g in guards]
        await asyncio.sleep(0)
        for task in rng.sample(tasks, 150):  # some wait for a fetch when they are cancelled
            task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        admitted = sum(1 for r in done if r is True)
        assert admitted <= 200
        await until_given_back(guards)
        assert await counted(redis_url, prefix) == admitted
    finally:
        for guard in guards:
            await guard.aclose()


@pytest.mark.parametrize(("policy", "expected"), [("local", 3), ("open", 10), ("closed", 0)])
async def test_an_outage_follows_on_storage_error(
    private_redis: RedisServer, policy: str, expected: int
) -> None:
    rules = {
        "on_storage_error": policy,
        "resources": {"GET /items/{item_id}": {"flow": [{"qps": 3, "prefetch": True}]}},
    }
    guard = Guard(rules, storage=private_redis.url + "?socket_timeout=0.3")
    async with client(shop(guard)) as c:
        statuses = [(await c.get(f"/items/{i}")).status_code for i in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        private_redis.stop()
        # A liveness bound, not a timing: an outage must not hang the calls.
        responses = await asyncio.wait_for(
            asyncio.gather(*(c.get(f"/items/{i}") for i in range(10))), timeout=10
        )
        assert sum(r.status_code == 200 for r in responses) == expected
        assert all(r.status_code in (200, 429, 503) for r in responses)
    await guard.aclose()


async def test_over_http_the_headers_are_those_of_any_qps_refusal(
    redis_url: str, prefix: str
) -> None:
    guard = Guard(
        {
            "key_prefix": prefix,
            "resources": {"GET /items/{item_id}": {"flow": [{"qps": 1, "prefetch": True}]}},
        },
        storage=redis_url,
    )
    async with client(shop(guard)) as c:
        assert (await c.get("/items/1")).status_code == 200
        refused: httpx.Response = await c.get("/items/2")
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["retry-after"]) >= 1
        assert "ratelimit-policy" in refused.headers
    await guard.aclose()


# -- the rules file ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "why"),
    [
        ("concurrency: 5", "not concurrency"),
        ("qps: 5\n        behavior: queue", "behavior reject"),
        ("qps: 5\n        strategy: relate\n        ref_resource: GET /x", "strategy direct"),
    ],
)
def test_prefetch_only_where_it_means_something(rule: str, why: str) -> None:
    text = f"""
resources:
  GET /r:
    flow:
      - {rule}
        prefetch: true
"""
    with pytest.raises(RulesError) as info:
        load_rules_text(text)
    message = str(info.value)
    assert "prefetch" in message and why in message


def test_prefetch_keeps_the_rules_identity() -> None:
    # The same window either way: toggling it keeps the counts (and a rule written
    # before the field existed keeps its key).
    plain = load_rules_text("resources:\n  GET /r:\n    flow:\n      - qps: 5\n")
    fetched = load_rules_text(
        "resources:\n  GET /r:\n    flow:\n      - qps: 5\n        prefetch: true\n"
    )

    assert rule_ids(plain.resources["GET /r"].flow) == rule_ids(fetched.resources["GET /r"].flow)


async def test_the_dashboard_status_shows_the_permits_held(redis_url: str, prefix: str) -> None:
    guard = prefetching(redis_url, 1000, prefix)
    try:
        for _ in range(4):  # batches of 1, 2, 4 (and 8): some are left in hand
            assert await attempt(guard)
        (status,) = [s for s in guard.status() if getattr(s, "kind", "") == "flow"]
        assert isinstance(status, CheckStatus)
        held = stock_of(guard)
        assert held is not None and status.state["prefetched"] == held.held() >= 0
        assert status.state["qps"] == 1000
    finally:
        await guard.aclose()


async def test_the_bucket_end_is_read_to_the_microsecond(redis_url: str, prefix: str) -> None:
    # The script replies with the microseconds left in its bucket (from TIME's two parts,
    # not a whole-ms clock that says up to 1 ms too much: permits would outlive their
    # bucket), and the reply is read to the microsecond.
    assert RedisWindow.prefetched([1, 7, 0, b"42", 3, 12_345]) == Prefetched(
        True, 7, 0.0, b"42", 3, 0.012345
    )
    source = lua("window_acquire")
    assert "tonumber(t[1]) * 1000000 + tonumber(t[2])" in source
    guard = prefetching(redis_url, 1000, prefix)
    try:
        check = guard.chain(RESOURCE).checks[0]
        assert isinstance(check, QpsCheck) and isinstance(check.window, RedisWindow)
        got = await check.window.prefetch(f"{prefix}:{{w}}", 1000, 1.0, 1)
        assert (got.admitted, got.taken) == (True, 1)
    finally:
        await guard.aclose()


async def test_a_stalled_loop_never_hangs_a_call(redis_url: str, prefix: str) -> None:
    # A handler that blocks the loop longer than a bucket: a fetched batch reaches its
    # callers after its bucket ended. They ask for their own permits (two round trips
    # at most), as without prefetching, instead of fetching again and again.
    guard = prefetching(redis_url, 1000, prefix)
    stop = False

    async def blocking_handler() -> None:
        while not stop:
            time.sleep(0.105)  # noqa: ASYNC251 - the point: sync work in an async app
            await asyncio.sleep(0)

    try:
        busy = asyncio.ensure_future(blocking_handler())
        await asyncio.sleep(0)
        # A liveness bound, not a timing: without the fallback these calls never end.
        results = await asyncio.wait_for(asyncio.gather(*(attempt(guard) for _ in range(5))), 20)
        stop = True
        await busy
        assert results == [True] * 5
        await until_given_back([guard])  # the late batches were given back
        assert await counted(redis_url, prefix) <= 5
    finally:
        stop = True
        await guard.aclose()


async def test_a_forgotten_origin_is_not_brought_back_by_its_fetch(
    redis_url: str, prefix: str
) -> None:
    # An origin that leaves the check's table while its fetch is in flight: the fetch's
    # callers still get their permits, but its stock does not come back (per-origin
    # state stays bounded by the table).
    guard = Guard(
        {
            "key_prefix": prefix,
            "resources": {RESOURCE: {"flow": [{"qps": 100, "prefetch": True, "origin": "other"}]}},
        },
        storage=redis_url,
    )
    try:
        assert await attempt(guard, origin="warm")  # connected
        stocks = stock_of(guard)
        assert stocks is not None
        calls = [asyncio.ensure_future(attempt(guard, origin="gone")) for _ in range(3)]
        for _ in range(3):  # the fetch is sent
            await asyncio.sleep(0)
        (key,) = [k for k in stocks._stocks if "gone" in k]
        stocks.forget(key)  # what the origin table does when it drops the origin
        assert await asyncio.gather(*calls) == [True] * 3
        assert all("gone" not in k for k in stocks._stocks)
        await until_given_back([guard])
        assert await counted(redis_url, prefix) == 4
    finally:
        await guard.aclose()


async def test_the_full_chain_stays_one_round_trip_in(redis_url: str, prefix: str) -> None:
    # A prefetched permit is decided in its place among its neighbours' staged calls:
    # concurrency, qps (from the stock) and the semaphore still go out in one write.
    store, guard, chain, stock = chained(redis_url, prefix, 5)

    async def one() -> int:
        """Enter and exit a call; the writes its way in took."""
        ctx = Context(RESOURCE)
        writes.count = 0
        tokens = await chain.enter(ctx)
        entered_with = writes.count
        await chain.exit(ctx, tokens)
        return entered_with

    try:
        assert await attempt(guard)  # connected
        writes = Writes(store)
        for _ in range(50):  # until a call finds permits in the stock (not at a bucket's end)
            for _ in range(4):
                await one()  # the batches grow: 1, 2, 4, ...
            held = stock.held()
            entered_with = await one()
            if held and stock.held() == held - 1:  # the qps permit came from the stock
                assert entered_with == 1
                return
        raise AssertionError("no call found a permit in the stock")
    finally:
        await guard.aclose()


async def test_a_miss_in_a_chain_fetches_in_the_chains_round_trip(
    redis_url: str, prefix: str
) -> None:
    # With the stock empty, the fetch rides in the batch of the checks around it: still
    # one write on the way in (not a batch, a fetch and another batch).
    store, guard, chain, _ = chained(redis_url, prefix, 5)
    try:
        await through(chain)  # connected
        await until_given_back([guard])  # the stock is empty again
        writes = Writes(store)
        ctx = Context(RESOURCE)
        tokens = await chain.enter(ctx)
        assert writes.count == 1
        await chain.exit(ctx, tokens)
        await until_given_back([guard])
        assert await counted(redis_url, prefix) == 2
    finally:
        await guard.aclose()


async def test_a_cancelled_batch_gives_back_its_prefetched_permits(
    redis_url: str, prefix: str
) -> None:
    _, guard, chain, stock = chained(redis_url, prefix, 50)
    admitted = 0
    try:
        for _ in range(50):  # until 5 calls all take their permit from the stock
            await through(chain)
            admitted += 1
            held = stock.held()
            if held < 5:
                continue
            calls = [asyncio.ensure_future(chain.enter(Context(RESOURCE))) for _ in range(5)]
            await asyncio.sleep(0)  # each took a permit; their batch is on its way
            took_from_stock = stock.held() == held - 5
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            if took_from_stock:
                break
            await until_given_back([guard])  # a bucket ended meanwhile: start over
            await asyncio.sleep(1.1)  # and let the window pass
            admitted = 0
        else:
            raise AssertionError("the stock never held 5 permits")
        await until_given_back([guard])
        assert stock.held() == 0
        assert await counted(redis_url, prefix) == admitted  # the cancelled ones came back
    finally:
        await guard.aclose()


async def test_an_outage_met_by_a_batch_takes_one_permit_per_call(
    private_redis: RedisServer,
) -> None:
    # Redis dies with permits in the stock: the batch's round trip fails, and each check
    # with a call meets the outage on its own; the prefetched check keeps the one permit
    # it took (entering it again would take a second).
    rules = {"flow": [{"qps": 100_000, "prefetch": True}, {"concurrency": 100}]}
    guard = Guard(
        {"on_storage_error": "local", "resources": {RESOURCE: rules}},
        storage=private_redis.url + "?socket_timeout=5",
    )
    chain = guard.chain(RESOURCE)
    stock = stock_of_check(chain.checks[0])
    await stock_up(chain, stock, 10)
    private_redis.stop()
    # The test's own clock: the stock's bucket runs on (stopping Redis may outlast it).
    for kept in stock._stocks.values():
        kept.until = time.monotonic() + 60
    held = stock.held()
    results = await asyncio.gather(*(chain.enter(Context(RESOURCE)) for _ in range(5)))
    assert len(results) == 5  # all admitted (local counts)
    assert held - stock.held() == 5  # one permit per call
    await guard.aclose()


async def test_a_batch_refused_in_an_outage_gives_back_a_later_prefetched_permit(
    redis_url: str, prefix: str
) -> None:
    # [concurrency (a call), qps prefetched (a permit of the stock, no call)] in one batch;
    # the connection is lost before the reply and on_storage_error is closed: the
    # concurrency check refuses, and the permit the qps check took goes back to the stock.
    rules = {"flow": [{"concurrency": 100}, {"qps": 100_000, "prefetch": True}]}
    guard = Guard(
        {"key_prefix": prefix, "on_storage_error": "closed", "resources": {RESOURCE: rules}},
        storage=redis_url,
    )
    chain = guard.chain(RESOURCE)
    stock = stock_of_check(chain.checks[1])
    await stock_up(chain, stock, 3)
    for kept in stock._stocks.values():  # the test's own clock: the bucket runs on
        kept.until = time.monotonic() + 60
    held = stock.held()
    entering = asyncio.ensure_future(chain.enter(Context(RESOURCE)))
    await asyncio.sleep(0)  # the batch is queued...
    store = guard.store
    assert isinstance(store, RedisStore) and store._pipe is not None
    store._pipe._protocol.transport.abort()  # ...and its connection lost
    with pytest.raises(StorageBlocked):
        await entering
    for _ in range(20):  # the give-back runs in the background: loop steps
        await asyncio.sleep(0)
    assert stock.held() == held
    await guard.aclose()


async def test_closing_gives_back_the_stocked_permits(redis_url: str, prefix: str) -> None:
    # What the stock holds goes back when the guard closes, not when its bucket ends:
    # then the bucket's end has nothing to give back and opens no connection again.
    guard = prefetching(redis_url, 1000, prefix)
    chain = guard.chain(RESOURCE)
    stock = stock_of(guard)
    assert stock is not None
    calls = 0
    while calls < 50 and not stock.held():  # the batches grow: one leaves some over
        ctx = Context(RESOURCE)
        await chain.exit(ctx, await chain.enter(ctx))
        calls += 1
    assert stock.held() > 0
    await guard.aclose()
    assert stock.held() == 0
    assert await counted(redis_url, prefix) == calls  # the calls' own permits only


async def fetching_chain(
    redis_url: str, prefix: str, concurrency: int = 100, *, flush_scripts: bool = False
) -> tuple[Guard, Chain, Any]:
    """A chain whose next call's batch carries a fetch (its stock emptied), and the stock.

    ``flush_scripts``: the server then forgets every script (SCRIPT FLUSH, as a restarted
    one): the next batch meets NOSCRIPT and is mended.
    """
    rules = {"flow": [{"qps": 1000, "prefetch": True}, {"concurrency": concurrency}]}
    guard = Guard({"key_prefix": prefix, "resources": {RESOURCE: rules}}, storage=redis_url)
    chain = guard.chain(RESOURCE)
    check = chain.checks[0]
    assert isinstance(check, QpsCheck) and check._default is not None
    ctx = Context(RESOURCE)
    await chain.exit(ctx, await chain.enter(ctx))  # connected, scripts loaded
    store = guard.store
    assert isinstance(store, RedisStore)
    await store.settle()  # its release answered too: nothing is on the way
    kept = stock_of_check(check)._stock(check._default[0])
    kept.left = 0
    if flush_scripts:
        await store.client.script_flush()
    return guard, chain, kept


@pytest.mark.parametrize("when", ["before its reply", "in its reply's turn"])
async def test_a_fetch_whose_caller_was_cancelled_stocks_its_permits(
    redis_url: str, prefix: str, when: str
) -> None:
    # The fetch rides in its chain's batch, and its caller is cancelled before the reply
    # is read: the reply, when it comes, still reaches the stock (the permits it took are
    # the other calls', not left counted in the window unused until it passes). Also when
    # the cancel comes from another callback of the loop turn that reads the reply, and
    # runs before the read (a task group, a disconnect watcher): the connection used to
    # drop that reply as a cancelled caller's.
    guard, chain, kept = await fetching_chain(redis_url, prefix)
    store = guard.store
    assert isinstance(store, RedisStore) and store._pipe is not None
    entering = asyncio.ensure_future(chain.enter(Context(RESOURCE)))
    await asyncio.sleep(0)  # the batch is queued; it is written at the end of this turn
    assert kept.staged > 0
    if when == "before its reply":
        entering.cancel()
    else:
        protocol = store._pipe._protocol
        assert protocol is not None
        sock = protocol.transport.get_extra_info("socket")
        loop = asyncio.get_running_loop()

        def cancel_in_the_reply_turn() -> None:
            # Runs after the write: wait (blocking) until the reply is in the socket,
            # then queue the cancel, which the next turn runs before it reads the socket.
            assert select.select([sock], [], [], 5.0)[0], "Redis did not answer"
            loop.call_soon(entering.cancel)

        loop.call_soon(cancel_in_the_reply_turn)
    with pytest.raises(asyncio.CancelledError):
        await entering
    await store.settle()  # every reply has come
    assert kept.staged == -math.inf  # the fetch's reply was stocked
    await guard.aclose()


async def test_a_fetch_whose_reply_comes_as_the_guard_closes_is_given_back(
    redis_url: str, prefix: str
) -> None:
    # Its caller cancelled (a client gone just before shutdown), the fetch's reply comes
    # while the guard closes (the close waits for the replies on their way): what it
    # stocked is given back before the connection closes, not by a bucket's end after.
    guard = prefetching(redis_url, 1000, prefix)  # no other rule's clean-up to wait for
    chain = guard.chain(RESOURCE)
    ctx = Context(RESOURCE)
    await chain.exit(ctx, await chain.enter(ctx))
    stock = stock_of(guard)
    assert stock is not None and stock._stocks
    (kept,) = stock._stocks.values()
    kept.left = 0  # the next call's batch carries a fetch
    entering = asyncio.ensure_future(chain.enter(Context(RESOURCE)))
    await asyncio.sleep(0)  # the batch is queued, its reply not read
    entering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await entering
    await guard.aclose()
    assert kept.staged == -math.inf and kept.left == 0
    assert await counted(redis_url, prefix) == 1  # the one admitted call's permit


async def test_closing_waits_for_what_a_late_reply_gives_back(
    private_redis: RedisServer,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A cancelled caller's fetch answered while the guard closes (Redis hangs until the
    # close waits for the replies on their way), after its bucket ended: the caller's own
    # permit cannot go back to the stock and is refunded in the background. The close
    # waits for that refund (it cut it off, and logged a false outage).
    url = private_redis.url
    guard = prefetching(url, 1000, prefix)
    chain = guard.chain(RESOURCE)
    ctx = Context(RESOURCE)
    await chain.exit(ctx, await chain.enter(ctx))
    stock = stock_of(guard)
    store = guard.store
    assert stock is not None and isinstance(store, RedisStore)
    (kept,) = stock._stocks.values()
    kept.left, kept.size, kept.until = 0, 1, -math.inf  # the next batch fetches 1 permit
    monkeypatch.setattr(stock, "give_back", lambda key, slot: False)  # its bucket ended
    settle = store.settle

    async def settle_resumed(seconds: float = 2.0) -> None:
        private_redis.resume()  # the reply comes while the close waits for it
        await settle(seconds)

    monkeypatch.setattr(store, "settle", settle_resumed)
    entering = asyncio.ensure_future(chain.enter(Context(RESOURCE)))
    await asyncio.sleep(0)  # the batch is written, its reply not read
    private_redis.pause()
    try:
        entering.cancel()
        with pytest.raises(asyncio.CancelledError):
            await entering
        with caplog.at_level(logging.WARNING, logger="ymguard"):
            await guard.aclose()
    finally:
        private_redis.resume()
    assert kept.staged == -math.inf and kept.left == 0
    assert await counted(url, prefix) == 1  # the one admitted call's permit
    assert "unavailable" not in caplog.text


async def test_a_bug_met_while_a_batch_is_mended_gives_its_permits_back(
    private_redis: RedisServer, prefix: str
) -> None:
    # Not an outage and not a cancel: an error raised after the batch's scripts ran. The
    # batch's concurrency permit is given back (held until its lease ended before).
    guard, chain, _ = await fetching_chain(
        private_redis.url, prefix, concurrency=1, flush_scripts=True
    )
    store = guard.store
    assert isinstance(store, RedisStore)
    mended = store.mended

    async def mended_then_a_bug(calls: Any, replies: list[Any]) -> list[Any]:
        await mended(calls, replies)
        raise TypeError("a bug")

    store.mended = mended_then_a_bug  # type: ignore[method-assign]
    with pytest.raises(TypeError):
        await chain.enter(Context(RESOURCE))
    store.mended = mended  # type: ignore[method-assign]
    async with asyncio.timeout(5):
        await drain()
    backend = permits_of(chain)
    assert await backend.held() == 0
    await guard.aclose()


async def test_a_fetch_cancelled_while_its_lost_script_is_sent_again_stocks_its_permits(
    private_redis: RedisServer, prefix: str
) -> None:
    # The fetch meets NOSCRIPT (Redis restarted, or SCRIPT FLUSH) and its caller is
    # cancelled while the script is sent again: that reply reaches the stock. The
    # concurrency permit of the batch, taken by its script sent again, is given back after
    # it (not before: it would be held until its lease ends, and the limit is 1).
    guard, chain, kept = await fetching_chain(
        private_redis.url, prefix, concurrency=1, flush_scripts=True
    )
    store = guard.store
    assert isinstance(store, RedisStore)
    backend = permits_of(chain)
    await store.client.script_load(backend._release.script)  # loaded again by another call
    mending: list[asyncio.Task[Any]] = []
    seen = asyncio.Event()
    mended = store.mended

    async def mended_seen(calls: Any, replies: list[Any]) -> list[Any]:
        task = asyncio.current_task()
        assert task is not None
        mending.append(task)
        seen.set()
        return await mended(calls, replies)

    store.mended = mended_seen  # type: ignore[method-assign]
    entering = asyncio.ensure_future(chain.enter(Context(RESOURCE)))
    async with asyncio.timeout(5):
        await seen.wait()  # the batch is being mended
    entering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await entering
    async with asyncio.timeout(5):
        await asyncio.wait(mending)  # the scripts sent again have their replies
    await drain()  # its end handed them over and gave the permit back (in the background)
    await store.settle()
    assert kept.staged == -math.inf  # the fetch's reply was stocked
    assert await backend.held() == 0
    ctx = Context(RESOURCE)
    await chain.exit(ctx, await chain.enter(ctx))  # the one permit is free
    await guard.aclose()


async def test_a_fetch_whose_caller_was_cancelled_as_it_connected_stocks_its_permits(
    redis_url: str, prefix: str
) -> None:
    # The first call's batch carries a fetch and goes out once the connection is open
    # (run_many's path); its caller is cancelled before the reply: the reply is stocked.
    rules = {"flow": [{"qps": 1000, "prefetch": True}]}
    guard = Guard({"key_prefix": prefix, "resources": {RESOURCE: rules}}, storage=redis_url)
    chain = guard.chain(RESOURCE)
    check = chain.checks[0]
    store = guard.store
    assert isinstance(check, QpsCheck) and isinstance(store, RedisStore)
    pipe = store._pipe
    assert pipe is not None and pipe._protocol is None  # not connected yet
    queued = asyncio.Event()
    send_many = pipe.send_many

    async def send_many_seen(packed: list[bytes]) -> Any:
        future = await send_many(packed)
        queued.set()
        return future

    pipe.send_many = send_many_seen  # type: ignore[method-assign]
    entering = asyncio.ensure_future(chain.enter(Context(RESOURCE)))
    async with asyncio.timeout(5):
        await queued.wait()  # connected, the batch queued, its reply not read
    entering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await entering
    async with asyncio.timeout(5):
        await drain()  # the batch runs on in a task of its own, to its end
    assert check._default is not None
    assert stock_of_check(check)._stock(check._default[0]).staged == -math.inf
    await guard.aclose()


async def test_a_fetch_cancelled_as_it_connected_while_its_script_is_sent_again_stocks(
    private_redis: RedisServer, prefix: str
) -> None:
    # The first batch goes out as the connection opens (run_many), on a server that does
    # not have the fetch's script (a connection loads the scripts registered so far
    # first: here none, as if the server lost them as it connected): its caller is
    # cancelled while it is sent again. The fetch's reply is stocked, and the concurrency
    # permit given back after its script ran.
    rules = {"flow": [{"qps": 1000, "prefetch": True}, {"concurrency": 1}]}
    guard = Guard({"key_prefix": prefix, "resources": {RESOURCE: rules}}, storage=private_redis.url)
    chain = guard.chain(RESOURCE)
    check = chain.checks[0]
    store = guard.store
    assert isinstance(check, QpsCheck)
    assert isinstance(store, RedisStore) and store._pipe is not None
    pipe = store._pipe
    pipe._scripts.clear()  # those registered so far: not loaded as it connects
    execute = pipe.execute
    resending = asyncio.Event()

    async def execute_seen(*args: Any) -> Any:
        resending.set()
        return await execute(*args)

    pipe.execute = execute_seen  # type: ignore[method-assign]
    entering = asyncio.ensure_future(chain.enter(Context(RESOURCE)))
    async with asyncio.timeout(5):
        await resending.wait()  # a lost script is being sent again (EVAL)
    entering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await entering
    async with asyncio.timeout(5):
        await drain()
    await store.settle()
    assert check._default is not None
    assert stock_of_check(check)._stock(check._default[0]).staged == -math.inf
    backend = permits_of(chain)
    assert await backend.held() == 0
    ctx = Context(RESOURCE)
    await chain.exit(ctx, await chain.enter(ctx))  # the one permit is free
    await guard.aclose()


@pytest.mark.parametrize("cancel", [False, True])
async def test_a_fetch_answered_in_a_batch_that_met_an_outage_stocks_its_permits(
    private_redis: RedisServer, prefix: str, cancel: bool
) -> None:
    # The fetch's script ran, the concurrency acquire's was lost (NOSCRIPT), and Redis
    # hangs while that one is sent again (the connection times out): the fetch's reply,
    # read already, is stocked, whether its caller then meets the outage or was cancelled.
    guard, chain, kept = await fetching_chain(private_redis.url, prefix, flush_scripts=True)
    store = guard.store
    check = chain.checks[0]
    assert isinstance(store, RedisStore) and store._pipe is not None
    assert isinstance(check, QpsCheck) and isinstance(check.window, RedisWindow)
    await store.client.script_load(check.window._acquire.script)  # only the fetch's
    pipe = store._pipe
    execute = pipe.execute
    mending = asyncio.Event()

    async def hung_execute(*args: Any) -> Any:
        mending.set()
        private_redis.pause()
        try:
            return await execute(*args)
        finally:
            private_redis.resume()

    pipe.execute = hung_execute  # type: ignore[method-assign]
    ctx = Context(RESOURCE)
    entering = asyncio.ensure_future(chain.enter(ctx))
    async with asyncio.timeout(5):
        await mending.wait()
    if cancel:
        entering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.timeout(5):
            tokens = await entering
        await chain.exit(ctx, tokens)  # on_storage_error: local admitted it
    assert cancel == entering.cancelled()
    async with asyncio.timeout(5):
        await drain()
    pipe.execute = execute  # type: ignore[method-assign]
    assert kept.staged == -math.inf  # the fetch's reply was stocked
    await guard.aclose()


class HeldWindow:
    """A Redis window's stand-in whose fetches wait for ``gate``, then bring ``taken``
    permits (or raise ``error``)."""

    def __init__(self, taken: int, error: BaseException | None = None) -> None:
        self.gate = asyncio.Event()
        self.fetches = 0
        self.taken = taken
        self.error = error
        self.refunded = 0

    async def refund(self, key: str, slot: Any, n: int) -> None:
        self.refunded += n

    async def prefetch(self, key: str, limit: int, window: float, want: int) -> Prefetched:
        self.fetches += 1
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return Prefetched(True, 100, 0.0, 7, self.taken, 0.1)


async def test_callers_waiting_for_one_fetch_each_leave_it_to_the_others() -> None:
    """The caller that started the fetch is cancelled: the fetch goes on (once) and the
    others take its permits; a cancelled caller takes none."""
    window = HeldWindow(taken=3)
    stock = PrefetchWindow(window, 1000)  # type: ignore[arg-type]
    callers = [asyncio.ensure_future(stock.acquire("k")) for _ in range(3)]
    await asyncio.sleep(0)  # all three wait for the one fetch
    callers[0].cancel()
    window.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await callers[0]
    results = [await c for c in callers[1:]]
    assert [r.admitted for r in results] == [True, True] and window.fetches == 1
    assert stock.held() == 1  # three brought, two taken
    stock.forget("k")


async def test_a_failed_fetch_reaches_every_caller_waiting_for_it() -> None:
    from ymguard.errors import StorageUnavailable

    window = HeldWindow(taken=3, error=StorageUnavailable("down"))
    stock = PrefetchWindow(window, 1000)  # type: ignore[arg-type]
    callers = [asyncio.ensure_future(stock.acquire("k")) for _ in range(3)]
    await asyncio.sleep(0)
    window.gate.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(o, StorageUnavailable) for o in outcomes) and window.fetches == 1
    # The next miss fetches again.
    window.error = None
    assert (await stock.acquire("k")).admitted and window.fetches == 2
    stock.forget("k")


async def test_a_fetch_cancelled_before_it_ran_answers_its_callers() -> None:
    """A fetch task cancelled before its first step (its coroutine never entered, so no
    code of its own runs): its callers are cancelled too, not left waiting, and the
    stock fetches again on the next miss."""
    window = HeldWindow(taken=3)
    stock = PrefetchWindow(window, 1000)  # type: ignore[arg-type]
    callers = [asyncio.ensure_future(stock.acquire("k")) for _ in range(2)]
    await asyncio.sleep(0)  # both callers wait; the fetch task has not run a step yet
    fetch = stock._stocks["k"].fetching
    assert fetch is not None and window.fetches == 0
    fetch.cancel()
    async with asyncio.timeout(10):  # a bound, not a measure: before f47f246 they hung
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert window.fetches == 0 and stock._stocks["k"].fetching is None
    window.gate.set()
    assert (await stock.acquire("k")).admitted and window.fetches == 1
    stock.forget("k")
