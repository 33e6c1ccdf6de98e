"""Seckill: the flow over HTTP, 500 concurrent buyers on stock 50, and every refusal.

Runs on SQLite and on PostgreSQL (``database_url``), on the shared Redis under prefixes of
its own. The script's own behaviour (stream entry, returns) is also checked directly on a
:class:`Seckill` of its own prefix, where no consumer can take the stream's entries away.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from demo_service import db
from demo_service import seckill as seckill_module
from demo_service.accounts import Principal, TokenCodec
from demo_service.errors import ActivityNotOngoing, AlreadyPurchased, NotFound, SoldOut
from demo_service.models import KillOrder, User
from demo_service.seckill import (
    ALREADY_RETURNED,
    NOT_PUBLISHED,
    NOTHING_HELD,
    RETURNED,
    Seckill,
    course_keys,
    kill_course_of,
    preorder_stream,
    return_stock,
    warm_course,
)
from tests.conftest import require_redis
from tests.demo_service.conftest import (
    ADMIN_PASSWORD,
    TOKEN_SECRET,
    Shop,
    delete_prefixed,
    temp_postgres,
)
from tests.demo_service.test_start import Demo
from tests.helpers import unique_prefix
from ymguard.errors import PROBLEM_BASE


def code(response: httpx.Response) -> str:
    """The problem code of an error response ("" for a success)."""
    if response.status_code < 400:
        return ""
    return str(response.json()["type"]).removeprefix(PROBLEM_BASE)


async def buy(shop: Shop, headers: dict[str, str], kill_course_id: int) -> httpx.Response:
    """One buyer's attempt, retried like a browser would while the guards say "later"."""
    for _ in range(200):
        response = await shop.client.post(f"/kill/{kill_course_id}", headers=headers)
        if response.status_code not in (429, 503):
            return response
        await asyncio.sleep(0.01)
    pytest.fail(f"still refused by the guards after 200 tries: {response.text}")


async def test_the_flow_over_http_register_login_publish_seckill(shop: Shop) -> None:
    register = await shop.client.post(
        "/auth/register", json={"username": "alice", "password": "correct horse"}
    )
    assert register.status_code == 201, register.text
    login = await shop.client.post(
        "/auth/login", json={"username": "alice", "password": "correct horse"}
    )
    assert login.status_code == 200, login.text
    assert login.json()["user_id"] == register.json()["user_id"]
    alice = shop.auth(login.json()["token"])

    activity = await shop.activity(kill_count=3)
    kc = activity["courses"][0]["kill_course_id"]
    listed = (await shop.client.get(f"/activities/{activity['activity_id']}")).json()
    assert listed["status"] == "ongoing"
    assert listed["courses"][0]["stock_left"] == 3

    bought = await shop.client.post(f"/kill/{kc}", headers=alice)
    assert bought.status_code == 200, bought.text
    kill_order_no = bought.json()["kill_order_no"]
    assert kill_course_of(kill_order_no) == kc

    status = await shop.client.get(f"/kill/orders/{kill_order_no}", headers=alice)
    assert status.status_code == 200, status.text
    assert status.json()["kill_order_no"] == kill_order_no
    assert status.json()["kill_course_id"] == kc
    assert status.json()["status"] in ("PENDING", "CREATED")  # FLOW's consumer may be quick
    listed = (await shop.client.get(f"/activities/{activity['activity_id']}")).json()
    assert listed["courses"][0]["stock_left"] == 2

    (bob,) = await shop.users(1)
    other = await shop.client.get(f"/kill/orders/{kill_order_no}", headers=bob)
    assert (other.status_code, code(other)) == (404, "not-found")
    anonymous = await shop.client.post(f"/kill/{kc}")
    assert (anonymous.status_code, code(anonymous)) == (401, "unauthorized")


async def test_500_concurrent_buyers_on_stock_50_get_exactly_50(shop: Shop) -> None:
    activity = await shop.activity(kill_count=50, kill_limit=1)
    kc = activity["courses"][0]["kill_course_id"]
    buyers = await shop.users(500)

    responses = await asyncio.gather(*(buy(shop, h, kc) for h in buyers))

    outcomes = Counter(code(r) for r in responses)
    assert outcomes == {"": 50, "sold-out": 450}, outcomes
    numbers = [r.json()["kill_order_no"] for r in responses if r.status_code == 200]
    assert len(set(numbers)) == 50
    keys = course_keys(shop.settings.redis_prefix, kc)
    assert int(await shop.redis.get(keys["stock"])) == 0  # never below: nothing oversold
    holdings = {int(v) for v in (await shop.redis.hgetall(keys["buyers"])).values()}
    assert holdings == {1}  # nobody over kill_limit
    assert await shop.redis.hlen(keys["buyers"]) == 50
    # The winners are 50 different buyers, each answered with their own kill order.
    winners = [h["Authorization"] for h, r in zip(buyers, responses, strict=True) if r.is_success]
    assert len(set(winners)) == 50


async def test_a_buyer_gets_kill_limit_units_then_already_purchased(shop: Shop) -> None:
    activity = await shop.activity(kill_count=10, kill_limit=2)
    kc = activity["courses"][0]["kill_course_id"]
    (alice,) = await shop.users(1)

    answers = [await shop.client.post(f"/kill/{kc}", headers=alice) for _ in range(3)]

    assert [r.status_code for r in answers] == [200, 200, 409]
    assert code(answers[2]) == "already-purchased"
    listed = (await shop.client.get(f"/activities/{activity['activity_id']}")).json()
    assert listed["courses"][0]["stock_left"] == 8


@pytest.mark.parametrize(
    ("start", "status"),
    [(timedelta(hours=1), "not_started"), (timedelta(hours=-2), "ended")],
    ids=["not-started", "ended"],
)
async def test_outside_the_window_is_activity_not_ongoing(
    shop: Shop, start: timedelta, status: str
) -> None:
    activity = await shop.activity(start=start, length=timedelta(hours=1))
    kc = activity["courses"][0]["kill_course_id"]
    (alice,) = await shop.users(1)

    response = await shop.client.post(f"/kill/{kc}", headers=alice)

    assert (response.status_code, code(response)) == (409, "activity-not-ongoing")
    listed = (await shop.client.get(f"/activities/{activity['activity_id']}")).json()
    assert listed["status"] == status
    assert listed["courses"][0]["stock_left"] == 10  # nothing taken


async def test_unknown_or_unpublished_kill_course_is_not_found(shop: Shop) -> None:
    activity = await shop.activity(publish=False)
    kc = activity["courses"][0]["kill_course_id"]
    (alice,) = await shop.users(1)

    unpublished = await shop.client.post(f"/kill/{kc}", headers=alice)
    unknown = await shop.client.post("/kill/999999", headers=alice)
    huge = await shop.client.post(f"/kill/{2**40}", headers=alice)

    assert (unpublished.status_code, code(unpublished)) == (404, "not-found")
    assert (unknown.status_code, code(unknown)) == (404, "not-found")
    assert huge.status_code == 422
    bogus = await shop.client.get("/kill/orders/K1-nope", headers=alice)
    assert (bogus.status_code, code(bogus)) == (404, "not-found")


async def test_kill_order_status_comes_from_the_database_once_written(shop: Shop) -> None:
    activity = await shop.activity()
    kc = activity["courses"][0]["kill_course_id"]
    alice, bob = await shop.users(2)
    kill_order_no = (await shop.client.post(f"/kill/{kc}", headers=alice)).json()["kill_order_no"]
    alice_id = shop.app.state.tokens.read(alice["Authorization"].split()[1]).id
    async with shop.app.state.sessionmaker() as session:
        # What FLOW's consumer writes. It may write it first, also between a look and
        # this insert: then its row stands, and only who may read it is checked.
        expected: str | None = "CANCELLED"
        try:
            await session.execute(
                insert(KillOrder).values(
                    kill_order_no=kill_order_no,
                    user_id=alice_id,
                    kill_course_id=kc,
                    status="CANCELLED",
                )
            )
            await session.commit()
        except IntegrityError:
            await session.rollback()
            expected = None

    mine = await shop.client.get(f"/kill/orders/{kill_order_no}", headers=alice)
    theirs = await shop.client.get(f"/kill/orders/{kill_order_no}", headers=bob)

    assert mine.status_code == 200
    if expected is not None:
        assert mine.json()["status"] == expected
    assert theirs.status_code == 404


async def test_sold_out_is_answered_locally_until_stock_comes_back(shop: Shop) -> None:
    activity = await shop.activity(kill_count=1)
    kc = activity["courses"][0]["kill_course_id"]
    alice, bob = await shop.users(2)
    keys = course_keys(shop.settings.redis_prefix, kc)
    bought = await shop.client.post(f"/kill/{kc}", headers=alice)
    assert bought.status_code == 200, bought.text
    assert code(await shop.client.post(f"/kill/{kc}", headers=bob)) == "sold-out"

    # Stock appears behind the shop's back (no "stock returned" message): this process
    # still answers sold-out without asking Redis, until its flag lapses.
    await shop.redis.set(keys["stock"], 1)
    assert code(await shop.client.post(f"/kill/{kc}", headers=bob)) == "sold-out"

    # A real return announces itself: the flag clears and bob gets the unit.
    await shop.redis.set(keys["stock"], 0)
    alice_id = shop.app.state.tokens.read(alice["Authorization"].split()[1]).id
    returned = await return_stock(
        shop.redis,
        kc,
        alice_id,
        bought.json()["kill_order_no"],
        prefix=shop.settings.redis_prefix,
    )
    assert returned == RETURNED
    deadline = time.monotonic() + 10
    while (response := await shop.client.post(f"/kill/{kc}", headers=bob)).status_code != 200:
        assert code(response) == "sold-out"
        if time.monotonic() > deadline:
            pytest.fail("the stock-returned message never cleared the sold-out flag")
        await asyncio.sleep(0.02)
    assert int(await shop.redis.get(keys["stock"])) == 0


# -- the script on its own (no app, no consumer) --------------------------------------------


@pytest.fixture
async def seckill() -> AsyncIterator[Seckill]:
    """A :class:`Seckill` on the shared Redis under a prefix of its own, listening."""
    redis = Redis.from_url(require_redis())
    prefix = unique_prefix()
    s = Seckill(redis, prefix)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()
        keys = [k async for k in redis.scan_iter(match=prefix + "*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def _warm(s: Seckill, kc: int, count: int, limit: int = 1, *, start_ms: int = 0) -> None:
    await warm_course(
        s.redis,
        s.prefix,
        kill_course_id=kc,
        activity_id=1,
        kill_count=count,
        kill_limit=limit,
        start_ms=start_ms,
        end_ms=2**50,
    )


async def test_the_script_appends_the_pre_order_to_the_stream(seckill: Seckill) -> None:
    await _warm(seckill, 7, 5)

    kill_order_no = await seckill.kill(42, 7)

    entries = await seckill.redis.xrange(preorder_stream(seckill.prefix))
    assert len(entries) == 1
    fields: dict[bytes, Any] = entries[0][1]
    assert fields[b"kill_order_no"].decode() == kill_order_no
    assert fields[b"user_id"] == b"42"
    assert fields[b"kill_course_id"] == b"7"
    assert int(fields[b"ts"]) > 0
    keys = course_keys(seckill.prefix, 7)
    assert await seckill.redis.hget(keys["pending"], kill_order_no) == b"42"
    assert await seckill.redis.hget(keys["buyers"], "42") == b"1"


async def test_each_refusal_changes_nothing(seckill: Seckill) -> None:
    await _warm(seckill, 1, 2)
    await _warm(seckill, 2, 5, start_ms=2**49)  # starts in the far future
    await seckill.kill(1, 1)

    with pytest.raises(AlreadyPurchased):
        await seckill.kill(1, 1)
    await seckill.kill(2, 1)
    with pytest.raises(SoldOut):
        await seckill.kill(3, 1)
    with pytest.raises(ActivityNotOngoing):
        await seckill.kill(1, 2)
    with pytest.raises(NotFound):
        await seckill.kill(1, 3)

    assert await seckill.redis.xlen(preorder_stream(seckill.prefix)) == 2
    assert await seckill.redis.get(course_keys(seckill.prefix, 1)["stock"]) == b"0"
    assert await seckill.redis.get(course_keys(seckill.prefix, 2)["stock"]) == b"5"


async def test_return_stock_gives_back_once_per_kill_order_and_unit_held(
    seckill: Seckill,
) -> None:
    await _warm(seckill, 9, 1)
    kill_order_no = await seckill.kill(5, 9)

    first = await return_stock(seckill.redis, 9, 5, kill_order_no, prefix=seckill.prefix)
    again = await asyncio.gather(
        *(return_stock(seckill.redis, 9, 5, kill_order_no, prefix=seckill.prefix) for _ in range(5))
    )
    other = await return_stock(seckill.redis, 9, 5, kill_order_no + "0", prefix=seckill.prefix)
    stranger = await return_stock(seckill.redis, 9, 6, "K9-x", prefix=seckill.prefix)
    unknown = await return_stock(seckill.redis, 10, 5, "K10-x", prefix=seckill.prefix)

    assert first == RETURNED and again == [ALREADY_RETURNED] * 5
    assert (other, stranger, unknown) == (NOTHING_HELD, NOTHING_HELD, NOT_PUBLISHED)
    keys = course_keys(seckill.prefix, 9)
    assert await seckill.redis.get(keys["stock"]) == b"1"  # never more than the offer
    assert await seckill.redis.hget(keys["buyers"], "5") is None
    # The buyer's count came back too: the same buyer may buy again (once this process
    # has heard that stock came back: its sold-out flag was set by the last unit).
    deadline = time.monotonic() + 10
    while seckill.sold_out(9):
        if time.monotonic() > deadline:
            pytest.fail("the stock-returned message never cleared the sold-out flag")
        await asyncio.sleep(0.01)
    assert kill_course_of(await seckill.kill(5, 9)) == 9


async def test_publish_warm_up_never_resets_sold_stock(seckill: Seckill) -> None:
    await _warm(seckill, 4, 3)
    await seckill.kill(1, 4)
    await _warm(seckill, 4, 3)  # a retried publish
    assert await seckill.redis.get(course_keys(seckill.prefix, 4)["stock"]) == b"2"


def test_kill_order_numbers_name_their_course_and_nothing_else_parses() -> None:
    number = seckill_module.new_kill_order_no(123)
    assert kill_course_of(number) == 123
    for bogus in [
        "",
        "K",
        "K0-1",
        "K1-",
        "X1-" + "0" * 25,
        number + "0",
        "K99999999999-" + "0" * 25,
    ]:
        assert kill_course_of(bogus) is None


async def test_the_kill_semaphore_stands_in_front_of_the_script(shop: Shop) -> None:
    activity = await shop.activity(kill_count=5)
    kc = activity["courses"][0]["kill_course_id"]
    (alice,) = await shop.users(1)
    kill_sem = shop.app.state.guard.semaphore("killSem")
    held = [await kill_sem.acquire() for _ in range(kill_sem.permits)]
    try:
        refused = await shop.client.post(f"/kill/{kc}", headers=alice)
    finally:
        for permit in held:
            await permit.release()
    admitted = await shop.client.post(f"/kill/{kc}", headers=alice)

    assert (refused.status_code, code(refused)) == (429, "concurrency-limited")
    assert refused.json()["resource"] == "POST /kill/{kill_course_id}"
    assert admitted.status_code == 200
    keys = course_keys(shop.settings.redis_prefix, kc)
    assert await shop.redis.get(keys["stock"]) == b"4"  # the refused call took nothing


async def test_500_buyers_on_two_workers_and_postgresql_get_exactly_50(tmp_path: Path) -> None:
    """The real front door: ``python -m demo_service`` with WORKERS=2 on PostgreSQL."""
    redis_url = require_redis()
    async with AsyncExitStack() as stack:
        database_url = await stack.enter_async_context(temp_postgres())
        redis_prefix, key_prefix = unique_prefix(), unique_prefix()
        demo = Demo(
            tmp_path,
            WORKERS="2",
            DATABASE_URL=database_url,
            REDIS_URL=redis_url.split("?")[0],
            YMGUARD_KEY_PREFIX=key_prefix,
            DEMO_REDIS_PREFIX=redis_prefix,
            DEMO_ADMIN_PASSWORD=ADMIN_PASSWORD,
            DEMO_TOKEN_SECRET=TOKEN_SECRET,
        )
        stack.callback(demo.close)
        stack.push_async_callback(delete_prefixed, redis_url, redis_prefix, key_prefix)
        await asyncio.to_thread(demo.wait_ready)
        client = httpx.AsyncClient(
            base_url=demo.url, timeout=60, limits=httpx.Limits(max_connections=100)
        )
        stack.push_async_callback(client.aclose)
        await wait_healthy(client, demo)

        login = await client.post(
            "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        admin = Shop.auth(login.json()["token"])
        course = await client.post(
            "/admin/courses", json={"name": "Go", "price": "99.00"}, headers=admin
        )
        start = datetime.now(UTC) - timedelta(minutes=1)
        activity = await client.post(
            "/admin/activities",
            json={
                "name": "Two workers",
                "start_time": start.isoformat(),
                "end_time": (start + timedelta(hours=1)).isoformat(),
                "courses": [
                    {
                        "course_id": course.json()["course_id"],
                        "kill_price": "1.00",
                        "kill_count": 50,
                    }
                ],
            },
            headers=admin,
        )
        kc = activity.json()["courses"][0]["kill_course_id"]
        published = await client.post(
            f"/admin/activities/{activity.json()['activity_id']}/publish", headers=admin
        )
        assert published.status_code == 200, published.text

        # 500 buyers, straight into the database (hashing 500 passwords is not the test).
        engine = db.make_engine(database_url)
        stack.push_async_callback(engine.dispose)
        async with engine.begin() as conn:
            await conn.execute(
                insert(User),
                [{"username": f"b{i}", "password_hash": "x"} for i in range(500)],
            )
            ids = (await conn.execute(select(User.id).where(User.username.like("b%")))).scalars()
            codec = TokenCodec(TOKEN_SECRET)
            buyers = [Shop.auth(codec.issue(Principal(i, "b", False))) for i in ids]
        assert len(buyers) == 500

        async def attempt(headers: dict[str, str]) -> httpx.Response:
            for _ in range(200):
                response = await client.post(f"/kill/{kc}", headers=headers)
                if response.status_code not in (429, 503):
                    return response
                await asyncio.sleep(0.01)
            pytest.fail(f"still refused by the guards after 200 tries: {response.text}")

        responses = await asyncio.gather(*(attempt(h) for h in buyers))

        outcomes = Counter(code(r) for r in responses)
        assert outcomes == {"": 50, "sold-out": 450}, outcomes
        redis = Redis.from_url(redis_url)
        stack.push_async_callback(redis.aclose)
        keys = course_keys(redis_prefix, kc)
        assert await redis.get(keys["stock"]) == b"0"
        holdings = [int(v) for v in (await redis.hgetall(keys["buyers"])).values()]
        assert sorted(holdings) == [1] * 50


async def wait_healthy(client: httpx.AsyncClient, demo: Demo) -> None:
    """Wait until the shop answers /health 200 (both workers have started their lifespan)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the shop never became healthy:\n{demo.output()}")
        await asyncio.sleep(0.1)


async def test_a_sold_out_course_is_answered_before_the_guards(shop: Shop) -> None:
    activity = await shop.activity(kill_count=1)
    kc = activity["courses"][0]["kill_course_id"]
    alice, bob = await shop.users(2)
    assert (await shop.client.post(f"/kill/{kc}", headers=alice)).status_code == 200
    kill_sem = shop.app.state.guard.semaphore("killSem")
    held = [await kill_sem.acquire() for _ in range(kill_sem.permits)]
    try:
        # Every permit is taken, yet late buyers learn at once that nothing is left: the
        # process's flag answers without a permit, a flow count or a script call.
        late = await shop.client.post(f"/kill/{kc}", headers=bob)
        other = await shop.client.post(f"/kill/{kc + 1}", headers=bob)
    finally:
        for permit in held:
            await permit.release()

    assert (late.status_code, code(late)) == (409, "sold-out")
    assert late.json()["resource"] == "POST /kill/{kill_course_id}"
    assert late.headers["content-type"] == "application/problem+json"
    assert (other.status_code, code(other)) == (429, "concurrency-limited")
