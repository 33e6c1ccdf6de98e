"""Redis outages: no 500s, no hangs, ``on_storage_error`` honoured, one log line, recovery.

Every test here runs its own redis-server (``private_redis``) and stops or pauses it; the
machine's shared Redis is never touched.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
import redis

from tests.helpers import RedisServer
from ymguard import Blocked, Context, Guard, GuardMiddleware
from ymguard.errors import StorageUnavailable
from ymguard.storage import RedisStore

from .test_middleware import client, shop

RESOURCE = "GET /items/{item_id}"


def guard_for(server: RedisServer, policy: str, flow: list[dict[str, int]] | None = None) -> Guard:
    rules = {
        "on_storage_error": policy,
        "resources": {RESOURCE: {"flow": flow or [{"qps": 3}]}},
    }
    return Guard(rules, storage=server.url + "?socket_timeout=0.3&socket_connect_timeout=0.3")


async def burst(c: httpx.AsyncClient, n: int) -> list[int]:
    # A hang would trip this wait_for; it is a liveness bound, not a timing assertion.
    responses = await asyncio.wait_for(
        asyncio.gather(*(c.get(f"/items/{i}") for i in range(n))), timeout=10
    )
    return sorted(r.status_code for r in responses)


async def wait_until_redis_decides(
    c: httpx.AsyncClient, server: RedisServer, guard: Guard | None = None
) -> None:
    """Poll until requests are counted in Redis again (keys appear, the store is up)."""
    plain = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        await c.get("/items/0")
        if plain.keys("ymguard:*") and (guard is None or guard.store.available):
            return
        await asyncio.sleep(0.2)
    raise AssertionError("ymguard did not go back to Redis within 8 s of its return")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("local", {200: 3, 429: 7}), ("open", {200: 10}), ("closed", {503: 10})],
)
async def test_redis_stopped_mid_test_follows_on_storage_error(
    private_redis: RedisServer, policy: str, expected: dict[int, int]
) -> None:
    guard = guard_for(private_redis, policy)
    async with client(shop(guard)) as c:
        assert await burst(c, 5) == [200, 200, 200, 429, 429]
        private_redis.stop()
        statuses = await burst(c, 10)
        assert {s: statuses.count(s) for s in set(statuses)} == expected
        if policy == "closed":
            response = await c.get("/items/1")
            assert response.json()["type"].endswith("/storage-unavailable")
        private_redis.start()
        await wait_until_redis_decides(c, private_redis)
    await guard.aclose()


async def test_a_hung_redis_costs_a_bounded_wait_then_fails_fast(
    private_redis: RedisServer,
) -> None:
    guard = guard_for(private_redis, "open")
    async with client(shop(guard)) as c:
        assert await burst(c, 2) == [200, 200]
        private_redis.pause()
        try:
            assert await burst(c, 20) == [200] * 20
            assert not guard.store.available
        finally:
            private_redis.resume()
        await wait_until_redis_decides(c, private_redis, guard)
        assert guard.store.available
    await guard.aclose()


async def test_concurrency_counts_fall_back_and_recover(private_redis: RedisServer) -> None:
    guard = guard_for(private_redis, "local", [{"concurrency": 2}])
    async with client(shop(guard)) as c:
        private_redis.stop()
        assert set(await burst(c, 5)) == {200}  # sequential-ish requests never exceed 2
        private_redis.start()
        deadline = time.monotonic() + 8
        while not guard.store.available:
            await c.get("/items/1")
            if time.monotonic() > deadline:  # a liveness bound, not a timing
                pytest.fail("no recovery within 8 s")
            await asyncio.sleep(0.2)
    await guard.aclose()


async def test_an_outage_is_logged_once_and_its_end_once(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ymguard.storage")
    guard = guard_for(private_redis, "local")
    async with client(shop(guard)) as c:
        await burst(c, 2)
        assert guard.store.available
        private_redis.stop()
        for _ in range(3):
            await burst(c, 10)
            await asyncio.sleep(0.4)
        assert not guard.store.available  # what every staged check reads, per call
        private_redis.start()
        await wait_until_redis_decides(c, private_redis)
        assert guard.store.available
    await guard.aclose()
    messages = [r.getMessage() for r in caplog.records if r.name == "ymguard.storage"]
    assert len([m for m in messages if "unavailable" in m]) == 1
    assert len([m for m in messages if "is back" in m]) == 1


async def test_unix_socket_storage() -> None:
    server = RedisServer(unix_socket=True).start()
    try:
        guard = Guard(
            {"resources": {RESOURCE: {"flow": [{"qps": 1}]}}},
            storage=f"redis+unix://{server.unix_socket}",
        )
        assert isinstance(guard.store, RedisStore)
        async with client(shop(guard)) as c:
            assert await burst(c, 3) == [200, 429, 429]
        await guard.aclose()
    finally:
        server.close()


def test_cluster_and_sentinel_uris_build_their_clients() -> None:
    from redis.asyncio.cluster import RedisCluster

    from ymguard.storage.redis import make_client

    assert isinstance(make_client("redis+cluster://127.0.0.1:7000"), RedisCluster)
    sentinel_client = make_client("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster")
    assert type(sentinel_client).__name__ == "Redis"


def test_guard_middleware_is_exported() -> None:
    assert GuardMiddleware.__module__ == "ymguard.middleware"


@pytest.mark.parametrize(("policy", "status"), [("local", 200), ("open", 200), ("closed", 503)])
async def test_semaphore_requests_during_a_hang_never_wait_on_the_hung_redis(
    private_redis: RedisServer, policy: str, status: int
) -> None:
    # Once the store has seen the outage it fails fast; a semaphore acquire that failed
    # fast took nothing, so it must neither release against the hung server (a whole
    # socket timeout per request) nor wait beyond its own wait_ms.
    rules = {
        "on_storage_error": policy,
        "resources": {RESOURCE: {"semaphore": {"permits": 2, "wait_ms": 100, "lease_seconds": 1}}},
    }
    guard = Guard(rules, storage=private_redis.url + "?socket_timeout=0.3")
    async with client(shop(guard)) as c:
        assert await burst(c, 2) == [200, 200]
        private_redis.pause()
        try:
            first = await asyncio.wait_for(c.get("/items/0"), timeout=10)  # sees the hang
            assert first.status_code == status
            assert not guard.store.available
            statuses: list[int] = []
            try:
                # Sequential: on a hung Redis each request would cost >= 0.3 s (9 s for 30).
                async with asyncio.timeout(5):  # a liveness bound, not a timing
                    for i in range(30):
                        statuses.append((await c.get(f"/items/{i}")).status_code)
            except TimeoutError:
                pytest.fail(f"only {len(statuses)} of 30 requests answered during the hang")
            assert statuses == [status] * 30
            if policy == "closed":
                problem = (await c.get("/items/1")).json()
                assert problem["type"].endswith("/storage-unavailable")
        finally:
            private_redis.resume()
        deadline = time.monotonic() + 8
        while not guard.store.available:
            await c.get("/items/1")
            if time.monotonic() > deadline:  # a liveness bound, not a timing
                pytest.fail("no recovery within 8 s")
            await asyncio.sleep(0.1)
        # The try that saw the hang may run when Redis resumes, and its release (sent on
        # another connection) before it: then its lease frees it. Nothing stays held.
        sem = guard.semaphore(RESOURCE)
        while await sem.held():
            if time.monotonic() > deadline + 5:  # a liveness bound, not a timing
                pytest.fail("a permit taken during the hang was never freed")
            await asyncio.sleep(0.1)
        assert await burst(c, 2) == [200, 200]  # decided on Redis again
    await guard.aclose()


# -- error replies that mean the store cannot serve ----------------------------------------


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


async def test_the_local_fallback_belongs_to_the_store_and_survives_a_reload() -> None:
    # Nothing listens on port 1: every call is refused at once, the checks count locally.
    rules = {"on_storage_error": "local", "resources": {"GET /r": {"flow": [{"qps": 2}]}}}
    # A window forgets its counts after a second: each try must fit in one (0.8 s).
    for attempt in range(5):
        guard = Guard(rules, storage=RedisStore("redis://127.0.0.1:1", key_prefix=f"t{attempt}"))
        start = time.monotonic()
        before = [await _admitted(guard, "GET /r") for _ in range(2)]
        guard.reload(rules)
        after = await _admitted(guard, "GET /r")
        await guard.aclose()
        if time.monotonic() - start < 0.8:
            assert before == [True, True]
            assert not after  # the reloaded check counts on the same local window
            return
    pytest.fail("five tries each took longer than the window (the machine is too slow)")


async def _admitted(guard: Guard, resource: str) -> bool:
    chain = guard.chain(resource)
    ctx = Context(resource)
    try:
        tokens = await chain.enter(ctx)
    except Blocked:
        return False
    await chain.exit(ctx, tokens)
    return True


@pytest.mark.parametrize(
    "uri",
    [
        "redis://:s3cret-pw@127.0.0.1:1/0?socket_timeout=0.2&socket_connect_timeout=0.2",
        "redis+cluster://user:s3cret-pw@127.0.0.1:1?socket_timeout=0.2&socket_connect_timeout=0.2",
    ],
    ids=["redis", "cluster"],
)
async def test_a_password_in_the_uri_is_in_no_log_error_or_repr(
    uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage names the store in its warning and its errors: without the password
    (nothing listens on port 1)."""
    store = RedisStore(uri, key_prefix="pw")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(StorageUnavailable) as raised:
            await store.call("PING")
        with pytest.raises(StorageUnavailable) as fast:
            await store.call("PING")  # failed fast, named too
    said = [caplog.text, str(raised.value), str(fast.value), repr(store)]
    assert "127.0.0.1:1" in str(raised.value) and "***" in str(raised.value)
    assert not [text for text in said if "s3cret-pw" in text]
    await store.aclose()


async def test_permits_given_back_on_a_new_or_flushed_server_are_free_for_the_next_call(
    private_redis: RedisServer,
) -> None:
    """A semaphore of one permit serves sequential requests on a server that has never
    seen its scripts, and after the server lost them (SCRIPT FLUSH): each release runs
    before the next request's acquire, rather than meeting NOSCRIPT and being sent again
    a round trip late (a spurious 429)."""
    guard = Guard(
        {"resources": {RESOURCE: {"semaphore": {"permits": 1}, "flow": [{"concurrency": 1}]}}},
        storage=private_redis.url,
    )
    async with client(shop(guard)) as c:
        assert [(await c.get(f"/items/{i}")).status_code for i in range(4)] == [200] * 4
        redis.Redis(port=private_redis.port).script_flush()
        assert [(await c.get(f"/items/{i}")).status_code for i in range(4)] == [200] * 4
    await guard.aclose()
