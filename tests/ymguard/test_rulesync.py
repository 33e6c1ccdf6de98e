"""Rules at run time: pushed versions, their validation, the version in force, reload.

The processes test runs ``ymguard push`` against two uvicorn processes on one Redis and a
third started afterwards; the rest runs guards in this process on both stores.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.routing import Route

from tests.helpers import ROOT, RedisServer, Uvicorn, running
from ymguard import Blocked, Context, Guard, GuardMiddleware, RulesError
from ymguard.backends.rules_feed import VersionConflict, rules_feed
from ymguard.rulesync import rules_digest
from ymguard.storage import MemoryStore, Store, store_from_uri
from ymguard.storage.pubsub import pubsub_of

#: Liveness bound: how long a swap may take before the test gives up (never a timing claim).
WITHIN = 30.0


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until ``check()`` is true, for up to :data:`WITHIN` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WITHIN
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {WITHIN} s: {what}")
        await asyncio.sleep(0.05)


def own_rules(qps: int = 1000) -> dict[str, Any]:
    return {"resources": {"GET /items": {"flow": [{"qps": qps}]}}}


def qps_of(guard: Guard) -> int | None:
    return guard.rules.resources["GET /items"].flow[0].qps


@pytest.fixture
async def guards(storage_uri: str, prefix: str) -> AsyncIterator[list[Guard]]:
    """Two started guards on one store: two Redis clients, or one memory store shared."""
    if storage_uri == "memory://":
        shared = MemoryStore(key_prefix=prefix)
        stores: list[Store] = [shared, shared]
    else:
        stores = [store_from_uri(storage_uri, key_prefix=prefix) for _ in range(2)]
    made = [Guard(own_rules(), storage=store) for store in stores]
    for guard in made:
        await guard.start()
    yield made
    for guard in made:
        await guard.aclose()
    for store in set(stores):
        await store.aclose()


# -- publish_rules on both stores ------------------------------------------------------------


async def test_publish_rules_swaps_every_guard_on_the_store(guards: list[Guard]) -> None:
    first, second = guards
    assert first.rules_version == second.rules_version == rules_digest(first.rules)[:19]
    version = await first.publish_rules(own_rules(qps=2), source="stricter.yaml")
    assert version == 1
    assert (first.rules_version, qps_of(first)) == ("1", 2)  # the publisher swapped at once

    async def second_swapped() -> bool:
        return second.rules_version == "1"

    await eventually(second_swapped, "the other guard swaps to the pushed version")
    assert qps_of(second) == 2
    assert first.rules_digest == second.rules_digest


async def test_a_guard_started_later_begins_with_the_newest_pushed_version(
    guards: list[Guard],
) -> None:
    first, _ = guards
    await first.publish_rules(own_rules(qps=3))
    await first.publish_rules(own_rules(qps=4))
    late = Guard(own_rules(qps=1000), storage=first.store)
    try:
        assert late.rules_version.startswith("sha256:")  # its own rules, until it starts
        await late.start()
        assert (late.rules_version, qps_of(late)) == ("2", 4)
    finally:
        await late.aclose()


async def test_pushed_rules_cannot_carry_errors_and_a_bad_push_changes_nothing(
    guards: list[Guard],
) -> None:
    first, second = guards
    before = first.rules_version
    with_errors = own_rules() | {"errors": {"builtins:KeyError": {"status": 404, "title": "No"}}}
    with pytest.raises(RulesError, match="errors: not allowed here: errors: imports code"):
        await first.publish_rules(with_errors)
    text = 'resources:\n  "GET /items":\n    flow:\n      - qps: -1\n'
    with pytest.raises(RulesError) as bad:
        await first.publish_rules(text, source="bad.yaml")
    assert str(bad.value).startswith("bad.yaml:4: resources.")
    with pytest.raises(RulesError, match="key_prefix: is 'elsewhere'"):
        await first.publish_rules(own_rules() | {"key_prefix": "elsewhere"})
    assert await rules_feed(first.store).latest() is None  # nothing was stored
    assert first.rules_version == second.rules_version == before
    assert qps_of(first) == qps_of(second) == 1000


async def test_a_bad_version_in_the_store_is_refused_by_every_receiver(
    guards: list[Guard], caplog: pytest.LogCaptureFixture
) -> None:
    # Written past the pusher's validation (an old client, a hand-made key): each process
    # validates what it reads again, logs why it refuses it, and keeps its rules.
    first, second = guards
    await first.publish_rules(own_rules(qps=5))

    async def both_swapped() -> bool:
        return first.rules_version == second.rules_version == "1"

    await eventually(both_swapped, "both guards run version 1")
    caplog.set_level(logging.ERROR, logger="ymguard")
    text = 'resources:\n  "GET /items": {}\nerrors:\n  "os:error": {status: 500, title: x}\n'
    await rules_feed(first.store).push(text, "sha256:x", "sneaky.yaml", None)

    async def both_refused() -> bool:
        return first._runtime.seen == second._runtime.seen == 2

    await eventually(both_refused, "both guards read version 2")
    assert first.rules_version == second.rules_version == "1"
    assert qps_of(first) == qps_of(second) == 5
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals and all("sneaky.yaml:3: errors: not allowed here" in m for m in refusals)
    assert first._runtime.refused is not None


async def test_expected_version_refuses_a_push_over_another(guards: list[Guard]) -> None:
    first, second = guards
    assert await first.publish_rules(own_rules(qps=7), expected_version=0) == 1
    with pytest.raises(VersionConflict):
        await second.publish_rules(own_rules(qps=8), expected_version=0)
    assert await second.publish_rules(own_rules(qps=8), expected_version=1) == 2


async def test_the_apps_own_errors_mapping_stays_after_a_push(guards: list[Guard]) -> None:
    store = guards[0].store
    mapped = own_rules() | {"errors": {"builtins:KeyError": {"status": 404, "title": "Gone"}}}
    guard = Guard(mapped, storage=store)

    async def items(request: Any) -> Any:
        raise KeyError("course 7")

    app = Starlette(routes=[Route("/items", items)])
    guard.install(app)
    wrapped = GuardMiddleware(app, guard=guard)
    try:
        await guard.start()
        await guard.publish_rules(own_rules(qps=50))
        assert guard.rules_version == "1" and not guard.rules.errors
        transport = httpx.ASGITransport(app=wrapped)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            response = await c.get("/items")
        assert response.status_code == 404
        assert response.json()["title"] == "Gone"
    finally:
        await guard.aclose()


async def test_a_call_in_flight_finishes_under_the_rules_it_entered_with(
    guards: list[Guard],
) -> None:
    first, second = guards
    held = {"resources": {"GET /items": {"flow": [{"concurrency": 1}]}}}
    await first.publish_rules(held)

    async def swapped() -> bool:
        return second.rules_version == "1"

    await eventually(swapped, "the other guard runs version 1")
    old = second.chain("GET /items")
    ctx = Context("GET /items")
    tokens = await old.enter(ctx)  # in flight, holding the one slot
    with pytest.raises(Blocked):
        await old.enter(Context("GET /items"))
    await first.publish_rules({"resources": {"GET /items": {"flow": [{"concurrency": 2}]}}})

    async def swapped_again() -> bool:
        return second.rules_version == "2"

    await eventually(swapped_again, "the other guard runs version 2")
    assert second.chain("GET /items") is not old
    ctx.status = 200
    await old.exit(ctx, tokens)  # finishes on the chain it entered, giving its slot back
    again = Context("GET /items")
    again.status = 200
    await old.exit(again, await old.enter(again))  # the slot it held is free again


# -- the version and reload ------------------------------------------------------------------


def test_the_digest_is_of_what_rules_mean_not_how_they_are_written() -> None:
    terse = Guard({"resources": {"GET /a": {"flow": [{"qps": 5}]}}})
    spelled_out = Guard({"storage": "memory://", "resources": {"GET /a": {"flow": [{"qps": 5}]}}})
    other = Guard({"resources": {"GET /a": {"flow": [{"qps": 6}]}}})
    assert terse.rules_digest == spelled_out.rules_digest != other.rules_digest
    assert terse.rules_digest.startswith("sha256:") and len(terse.rules_digest) == 71
    assert terse.rules_version == terse.rules_digest[:19]
    terse.reload({"resources": {"GET /a": {"flow": [{"qps": 6}]}}})
    assert terse.rules_digest == other.rules_digest


def test_a_reload_with_any_problem_is_refused_whole() -> None:
    guard = Guard({"resources": {"GET /a": {"flow": [{"qps": 5}]}}})
    chain, version = guard.chain("GET /a"), guard.rules_version
    bad = {"resources": {"GET /a": {"flow": [{"qps": 1}]}, "GET /b": {"flow": [{"qps": -1}]}}}
    with pytest.raises(RulesError, match="resources"):
        guard.reload(bad)
    with pytest.raises(RulesError, match="storage: is 'redis://elsewhere:6379/0'"):
        guard.reload({"storage": "redis://elsewhere:6379/0", "resources": {}})
    assert guard.chain("GET /a") is chain and guard.rules_version == version


async def test_on_storage_error_of_a_reload_applies_to_the_store() -> None:
    guard = Guard({"resources": {}})
    guard.reload({"on_storage_error": "closed", "resources": {}})
    assert guard.store.on_storage_error == "closed"


async def test_a_missed_push_is_read_when_the_pubsub_reconnects(
    private_redis: RedisServer,
) -> None:
    guard = Guard(own_rules(), storage=private_redis.url + "?socket_timeout=2")
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        await guard.start()
        feed = rules_feed(guard.store)
        service = pubsub_of(guard.store)
        assert service is not None

        async def subscribed() -> bool:
            return service.ready

        await eventually(subscribed, "the guard listens for pushes")
        # A push nobody hears: the hash is written, the nudge never sent.
        text = 'resources:\n  "GET /items":\n    flow: [{qps: 9}]\n'
        fields = {"version": 1, "text": text, "digest": "d", "source": "s", "pushed_ms": 0}
        await client.hset(feed.key, mapping=fields)  # type: ignore[arg-type]
        # (No assertion that it is unheard yet: while its pub/sub is not confirmed, the
        # follower rereads each second, and a loaded machine can get there first.)
        await client.client_kill_filter(_type="pubsub")  # the connection breaks

        async def swapped() -> bool:
            return guard.rules_version == "1"

        await eventually(swapped, "the resync after the reconnection reads version 1")
        assert qps_of(guard) == 9
    finally:
        await guard.aclose()
        await client.aclose()


# -- two processes, ymguard push, and a third process ----------------------------------------


async def ymguard(*args: str) -> tuple[int, str, str]:
    """Run the ``ymguard`` command as an operator would (another process)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ymguard.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def app_env(redis_url: str, prefix: str) -> dict[str, str]:
    return {"YMGUARD_TEST_REDIS": redis_url, "YMGUARD_TEST_PREFIX": prefix}


@pytest.fixture
def two_servers(app_env: dict[str, str]) -> Iterator[list[Uvicorn]]:
    # One starts the guard in its lifespan, the other leaves it to GuardMiddleware.
    servers = [
        Uvicorn("tests.apps.rules_app:app", env=app_env),
        Uvicorn("tests.apps.rules_app:app", env=app_env | {"YMGUARD_TEST_START": "middleware"}),
    ]
    with running(servers):
        yield servers


async def rules_of(c: httpx.AsyncClient, server: Uvicorn) -> dict[str, Any]:
    return dict((await c.get(server.url + "/rules")).json())


async def refusals_from(c: httpx.AsyncClient, server: Uvicorn) -> int:
    """How many of 12 concurrent calls of ``GET /items`` the server refuses."""
    calls = await asyncio.gather(*(c.get(server.url + "/items") for _ in range(12)))
    return sum(r.status_code == 429 for r in calls)


async def test_ymguard_push_applies_in_both_processes_and_in_one_started_afterwards(
    two_servers: list[Uvicorn],
    app_env: dict[str, str],
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(
        f"storage: {redis_url}\nkey_prefix: {prefix}\n"
        'resources:\n  "GET /items":\n    flow:\n      - qps: 1\n'
    )
    async with httpx.AsyncClient(timeout=30) as c:
        for server in two_servers:
            await rules_of(c, server)  # the middleware's first call starts the second guard
            assert await refusals_from(c, server) == 0  # qps 1000
        code, out, err = await ymguard("push", str(stricter))
        assert code == 0, err
        assert "as version 1" in out

        for server in two_servers:

            async def swapped(server: Uvicorn = server) -> bool:
                return (await rules_of(c, server))["version"] == "1"

            await eventually(swapped, f"{server.url} runs version 1")
            assert (await rules_of(c, server))["qps"] == 1
            assert await refusals_from(c, server) > 0

        digests = {(await rules_of(c, server))["digest"] for server in two_servers}
        assert len(digests) == 1
        with running([Uvicorn("tests.apps.rules_app:app", env=app_env)]) as (late,):
            # It awaited guard.start() in its lifespan: version 1 from its first request.
            assert (await rules_of(c, late))["version"] == "1"
            assert await refusals_from(c, late) > 0

        # A bad push is refused by the command, and nothing changes anywhere.
        bad = tmp_path / "bad.yaml"
        bad.write_text(
            f"storage: {redis_url}\nkey_prefix: {prefix}\n"
            'resources:\n  "GET /items":\n    flow:\n      - qps: 1\n'
            'errors:\n  "os:error": {status: 500, title: boom}\n'
        )
        code, out, err = await ymguard("push", str(bad))
        assert code == 2
        assert f"{bad}:7: errors: not allowed here" in err
        assert "nothing was pushed" in err
        code, out, err = await ymguard("rules", str(stricter))
        assert code == 0, err
        assert out.startswith(f"# version 1 in force on {redis_url}")
        assert "qps: 1" in out
        await asyncio.sleep(0.5)  # a (wrong) swap would have time to show
        for server in two_servers:
            assert (await rules_of(c, server))["version"] == "1"
