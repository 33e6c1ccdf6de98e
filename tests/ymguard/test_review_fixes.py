"""Failure paths found in review: probes that never ran, replies that mean 'unavailable'."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from tests.helpers import RedisServer
from ymguard import Blocked, Context, Guard
from ymguard.chain import Chain
from ymguard.storage import Store

from .test_middleware import client, shop

RULE = {
    "strategy": "error_count",
    "threshold": 0,
    "min_requests": 1,
    "open_seconds": 0.3,
    "window_seconds": 1,
}


class Boom:
    """A check whose enter fails with a bug, not a refusal."""

    async def enter(self, ctx: Context) -> Any:
        raise RuntimeError("a bug in a later check")

    async def exit(self, ctx: Context, token: Any) -> None:
        return None


async def trip(guard: Guard, resource: str) -> None:
    chain = guard.chain(resource)
    ctx = Context(resource)
    tokens = await chain.enter(ctx)
    ctx.error = ValueError("backend down")
    await chain.exit(ctx, tokens)
    assert [b.state for b in guard.breakers()] == ["open"]


async def test_a_probe_that_dies_in_a_later_check_reopens_the_breaker(store: Store) -> None:
    guard = Guard({"resources": {"call": {"breaker": [RULE]}}}, storage=store)
    await trip(guard, "call")
    await asyncio.sleep(0.4)
    chain = guard.chain("call")
    broken = Chain("call", [*chain.checks, Boom()], chain.stats)
    with pytest.raises(RuntimeError):
        await broken.enter(Context("call"))
    await asyncio.sleep(0.05)  # the Redis copy is fresh by pub/sub
    assert [b.state for b in guard.breakers()] == ["open"]


async def test_a_replay_is_no_probe_success(store: Store) -> None:
    from starlette.responses import Response

    from ymguard.chain import ShortCircuit

    class Replay:
        async def enter(self, ctx: Context) -> Any:
            raise ShortCircuit(Response("stored", status_code=201), 201)

        async def exit(self, ctx: Context, token: Any) -> None:
            return None

    guard = Guard({"resources": {"call": {"breaker": [RULE]}}}, storage=store)
    await trip(guard, "call")
    await asyncio.sleep(0.4)
    chain = guard.chain("call")
    replaying = Chain("call", [*chain.checks, Replay()], chain.stats)
    with pytest.raises(ShortCircuit):
        await replaying.enter(Context("call"))
    await asyncio.sleep(0.05)
    assert [b.state for b in guard.breakers()] == ["open"]
    with pytest.raises(Blocked):  # and it stays open until the next real probe
        await guard.chain("call").enter(Context("call"))


async def test_a_read_only_redis_is_an_outage_not_a_500(private_redis: RedisServer) -> None:
    rules = {
        "on_storage_error": "open",
        "resources": {"GET /items/{item_id}": {"flow": [{"qps": 3}]}},
    }
    guard = Guard(rules, storage=private_redis.url)
    async with client(shop(guard)) as c:
        assert (await c.get("/items/1")).status_code == 200
        # A failover left us on a replica: every script write answers READONLY.
        redis.Redis.from_url(private_redis.url).replicaof("127.0.0.1", "1")
        statuses = [(await c.get(f"/items/{i}")).status_code for i in range(6)]
        assert statuses == [200] * 6
        assert not guard.store.available
    await guard.aclose()


async def test_a_wrong_password_is_an_outage_and_leaks_no_sockets(
    private_redis: RedisServer,
) -> None:
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("requirepass", "right")
    admin = redis.Redis.from_url(private_redis.url, password="right")
    rules = {
        "on_storage_error": "open",
        "resources": {"GET /items/{item_id}": {"flow": [{"qps": 1}]}},
    }
    url = f"redis://:wrong@127.0.0.1:{private_redis.port}/0"
    guard = Guard(rules, storage=url)
    async with client(shop(guard)) as c:
        for i in range(5):
            assert (await c.get(f"/items/{i}")).status_code == 200  # open: traffic passes
            await asyncio.sleep(1.05)  # past the fail-fast second: it tries again
    await guard.aclose()
    clients = admin.client_list()
    assert len(clients) <= 2  # this admin connection, and none left by the retries


async def test_a_sync_resource_runs_its_body_in_the_callers_thread(
    redis_url: str, prefix: str
) -> None:
    import threading

    guard = Guard(
        {"key_prefix": prefix, "resources": {"sync": {"flow": [{"qps": 5}]}}}, storage=redis_url
    )
    guard._loop = asyncio.get_running_loop()

    @guard.resource("sync")
    def body() -> str:
        return threading.current_thread().name

    assert await asyncio.to_thread(body) != threading.main_thread().name
    assert guard.stats("sync").inflight == 0
    await guard.aclose()


def test_a_sync_resource_on_redis_without_a_loop_refuses_before_spending(
    redis_url: str, prefix: str
) -> None:
    guard = Guard(
        {"key_prefix": prefix, "resources": {"sync": {"flow": [{"qps": 1}]}}}, storage=redis_url
    )

    @guard.resource("sync")
    def body() -> str:
        return "ran"

    with pytest.raises(RuntimeError, match="worker thread"):
        body()
    assert guard.stats("sync").counts().passed == 0


async def test_guard_limit_leaves_nothing_in_flight() -> None:
    guard = Guard()
    limit = guard.limit("5/second")

    @limit
    async def endpoint() -> str:
        return "ok"

    for _ in range(3):
        await endpoint()
    (chain,) = limit._chains.values()
    assert chain.stats.inflight == 0 and chain.stats.counts().passed == 3


async def test_aclose_stops_every_background_task_of_the_store(redis_url: str, prefix: str) -> None:
    rules = {
        "key_prefix": prefix,
        "resources": {
            "held": {"semaphore": {"permits": 1, "lease_seconds": 0.6}},
            "guarded": {"breaker": [RULE]},
        },
    }
    guard = Guard(rules, storage=redis_url)
    before = {t for t in asyncio.all_tasks() if not t.done()}

    @guard.resource("held")
    async def held() -> None:
        await asyncio.sleep(0.3)  # longer than a third of the lease: the keeper runs

    await held()
    await guard.chain("guarded").enter(Context("guarded"))
    await guard.aclose()
    await asyncio.sleep(0.05)
    left = {t for t in asyncio.all_tasks() if not t.done()} - before
    assert left == set()
