"""Orders over HTTP: submit token, one transaction with its messages, pay, PAID, courses.

Runs on SQLite and PostgreSQL (``database_url`` of conftest) and the shared Redis. The
Alipay sandbox is mounted in the app (unless the app mounts it already) and its notifier
delivers to the app in process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from demo_service import seckill as seckill_module
from demo_service.errors import AlreadyPurchased
from demo_service.models import Order, Outbox
from demo_service.orders import CHECK_PAYMENT, ORDER_CREATED, create_order
from demo_service.settings import Settings
from tests.demo_service.conftest import Shop, delete_prefixed
from ymguard.errors import PROBLEM_BASE


def code(response: httpx.Response) -> str:
    if response.status_code < 400:
        return ""
    return str(response.json()["type"]).removeprefix(PROBLEM_BASE)


async def eventually(check: Callable[[], Awaitable[Any]], what: str, seconds: float = 30) -> Any:
    """Poll ``check`` until it returns something truthy; fail past ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {seconds} s")
        await asyncio.sleep(0.05)


def notify_in_process(shop: Shop) -> None:
    """Have the sandbox deliver its notifies to the app in process (no socket)."""
    app = shop.app
    app.state.alipay_sandbox.state.http_client_factory = lambda: httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://shop", timeout=10
    )


@pytest.fixture
def flow_settings(shop_settings: Settings) -> Settings:
    """Fast messaging: quick reclaim; a long payment timeout unless a test shortens it."""
    return replace(
        shop_settings,
        claim_idle_seconds=1.0,
        sweeper_interval_seconds=0.5,
        alipay_notify_delays=(0.0, 0.5, 1.0),
    )


@contextlib.asynccontextmanager
async def started_shop(settings: Settings) -> AsyncIterator[Shop]:
    s = Shop(settings)
    notify_in_process(s)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(s.app.router.lifespan_context(s.app))
        stack.push_async_callback(s.client.aclose)
        yield s
    assert settings.redis_url is not None
    await delete_prefixed(settings.redis_url, settings.key_prefix or "", settings.redis_prefix)


@pytest.fixture
async def shop(flow_settings: Settings) -> AsyncIterator[Shop]:
    async with started_shop(flow_settings) as s:
        yield s


async def seckill(shop: Shop, user: dict[str, str], kc: int) -> str:
    response = await shop.client.post(f"/kill/{kc}", headers=user)
    assert response.status_code == 200, response.text
    return str(response.json()["kill_order_no"])


async def place(shop: Shop, user: dict[str, str], kill_order_no: str) -> httpx.Response:
    token = await shop.client.get(
        "/orders/submit-token", params={"kill_order_no": kill_order_no}, headers=user
    )
    assert token.status_code == 200, token.text
    return await shop.client.post(
        "/orders",
        json={"kill_order_no": kill_order_no, "pay_type": "alipay"},
        headers={**user, "X-Submit-Token": token.json()["token"]},
    )


async def pay_on_cashier(shop: Shop, user: dict[str, str], order_no: str) -> httpx.Response:
    """POST /pay, then press Pay on the cashier page; answers the cashier's response."""
    pay = await shop.client.post(f"/pay/{order_no}", headers=user)
    assert pay.status_code == 200, pay.text
    url = httpx.URL(pay.json()["pay_url"])
    assert (url.scheme, url.host) == (shop.client.base_url.scheme, shop.client.base_url.host)
    return await shop.client.post(url.raw_path.decode(), data={"action": "pay"})


async def order_of(shop: Shop, user: dict[str, str], order_no: str) -> dict[str, Any]:
    response = await shop.client.get(f"/orders/{order_no}", headers=user)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_the_whole_flow_seckill_token_order_pay_notify_paid_courses(shop: Shop) -> None:
    activity = await shop.activity(kill_count=5)
    kc = activity["courses"][0]["kill_course_id"]
    (alice,) = await shop.users(1)
    kill_order_no = await seckill(shop, alice, kc)

    placed = await place(shop, alice, kill_order_no)
    assert placed.status_code == 201, placed.text
    body = placed.json()
    assert body["status"] == "TO_PAY" and body["amount"] == "9.90"
    order_no = body["order_no"]

    # One transaction wrote the order and both messages (the check is a delayed one).
    async with shop.app.state.sessionmaker() as session:
        topics = (await session.scalars(select(Outbox.topic).order_by(Outbox.id))).all()
    assert ORDER_CREATED in topics and CHECK_PAYMENT in topics

    # The token is spent: the same submit again is a duplicate.
    again = await shop.client.post(
        "/orders",
        json={"kill_order_no": kill_order_no, "pay_type": "alipay"},
        headers={**alice, "X-Submit-Token": "used-or-made-up"},
    )
    assert (again.status_code, code(again)) == (409, "duplicate-submission")

    async def pay_order_made() -> bool:
        return (await order_of(shop, alice, order_no))["pay_status"] == "TO_PAY"

    await eventually(pay_order_made, "the order.created consumer made the pay order")
    cashier = await pay_on_cashier(shop, alice, order_no)
    assert cashier.status_code in (200, 303), cashier.text

    async def paid() -> bool:
        return (await order_of(shop, alice, order_no))["status"] == "PAID"

    await eventually(paid, "the notify and the pay.finished consumer marked the order PAID")
    assert (await order_of(shop, alice, order_no))["pay_status"] == "PAID"
    courses = (await shop.client.get("/me/courses", headers=alice)).json()["courses"]
    assert [c["course_id"] for c in courses] == [activity["courses"][0]["course_id"]]
    assert courses[0]["order_no"] == order_no

    kill = (await shop.client.get(f"/kill/orders/{kill_order_no}", headers=alice)).json()
    assert kill["status"] == "ORDERED"


async def test_a_kill_order_written_between_its_two_reads_is_found(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GET /kill/orders reads the row, then the pending entry. Another worker's consumer
    # may write the row and drop the entry between the two reads: the row is read again
    # (it answered 404, seen with two workers in test_start).
    activity = await shop.activity(kill_count=1)
    kc = activity["courses"][0]["kill_course_id"]
    (bob,) = await shop.users(1)
    kill_order_no = await seckill(shop, bob, kc)

    async def created() -> bool:
        r = await shop.client.get(f"/kill/orders/{kill_order_no}", headers=bob)
        return bool(r.json()["status"] == "CREATED")

    await eventually(created, "the pre-order consumer wrote the kill order")
    real = seckill_module.kill_order_row
    reads: list[str] = []

    async def not_written_at_first_read(sessions: Any, no: str) -> Any:
        reads.append(no)
        return None if len(reads) == 1 else await real(sessions, no)

    monkeypatch.setattr(seckill_module, "kill_order_row", not_written_at_first_read)
    r = await shop.client.get(f"/kill/orders/{kill_order_no}", headers=bob)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "CREATED" and len(reads) == 2


async def test_a_kill_order_reaches_created_and_an_order_of_it_is_placed_once(shop: Shop) -> None:
    activity = await shop.activity(kill_count=5)
    kc = activity["courses"][0]["kill_course_id"]
    (bob, eve) = await shop.users(2)
    kill_order_no = await seckill(shop, bob, kc)

    async def created() -> bool:
        r = await shop.client.get(f"/kill/orders/{kill_order_no}", headers=bob)
        return bool(r.json()["status"] == "CREATED")

    await eventually(created, "the pre-order consumer wrote the kill order")
    stolen = await place(shop, eve, kill_order_no)
    assert (stolen.status_code, code(stolen)) == (404, "not-found")
    first = await place(shop, bob, kill_order_no)
    assert first.status_code == 201, first.text
    second = await place(shop, bob, kill_order_no)
    assert (second.status_code, code(second)) == (409, "already-purchased")
    async with shop.app.state.sessionmaker() as session:
        count = await session.scalar(select(func.count()).select_from(Order))
    assert count == 1


async def test_someone_elses_order_is_not_found(shop: Shop) -> None:
    activity = await shop.activity(kill_count=5)
    kc = activity["courses"][0]["kill_course_id"]
    (bob, eve) = await shop.users(2)
    placed = await place(shop, bob, await seckill(shop, bob, kc))
    order_no = placed.json()["order_no"]
    other = await shop.client.get(f"/orders/{order_no}", headers=eve)
    assert (other.status_code, code(other)) == (404, "not-found")
    pay = await shop.client.post(f"/pay/{order_no}", headers=eve)
    assert (pay.status_code, code(pay)) == (404, "not-found")


#: Concurrent submits of one kill order (a double click, a retry storm).
SUBMITS = 8


async def within(seconds: float, what: str, aw: Awaitable[Any]) -> Any:
    """``aw``, or a test failure if it takes longer than ``seconds`` (a hang fails fast)."""
    try:
        return await asyncio.wait_for(aw, seconds)
    except TimeoutError:
        pytest.fail(f"{what}: not done within {seconds} s (a hang)")


async def orders_of_kill_order(shop: Shop, kill_order_no: str) -> int:
    async with shop.app.state.sessionmaker() as session:
        count = await session.scalar(
            select(func.count()).select_from(Order).where(Order.kill_order_no == kill_order_no)
        )
    return int(count or 0)


async def kill_order_created(shop: Shop, user: dict[str, str], kill_order_no: str) -> None:
    async def created() -> bool:
        r = await shop.client.get(f"/kill/orders/{kill_order_no}", headers=user)
        return bool(r.json()["status"] == "CREATED")

    await eventually(created, "the pre-order consumer wrote the kill order")


@pytest.mark.parametrize("state", ["pending", "created"])
async def test_concurrent_submits_with_one_token_place_one_order(shop: Shop, state: str) -> None:
    activity = await shop.activity(kill_count=5)
    kc = activity["courses"][0]["kill_course_id"]
    (alice,) = await shop.users(1)
    kill_order_no = await seckill(shop, alice, kc)
    if state == "created":
        await kill_order_created(shop, alice, kill_order_no)
    token = await shop.client.get(
        "/orders/submit-token", params={"kill_order_no": kill_order_no}, headers=alice
    )
    headers = {**alice, "X-Submit-Token": token.json()["token"]}

    async def submit() -> httpx.Response:
        return await shop.client.post(
            "/orders", json={"kill_order_no": kill_order_no, "pay_type": "alipay"}, headers=headers
        )

    answers = await within(
        30, "concurrent submits", asyncio.gather(*(submit() for _ in range(SUBMITS)))
    )
    outcomes = sorted((r.status_code, code(r)) for r in answers)
    assert outcomes == [(201, "")] + [(409, "duplicate-submission")] * (SUBMITS - 1)
    assert await orders_of_kill_order(shop, kill_order_no) == 1


@pytest.mark.parametrize("state", ["pending", "created"])
async def test_concurrent_submits_each_with_a_fresh_token_place_one_order(
    shop: Shop, state: str
) -> None:
    activity = await shop.activity(kill_count=5)
    kc = activity["courses"][0]["kill_course_id"]
    (alice,) = await shop.users(1)
    kill_order_no = await seckill(shop, alice, kc)
    if state == "created":
        await kill_order_created(shop, alice, kill_order_no)
    answers = await within(
        30,
        "concurrent token-and-submit",
        asyncio.gather(*(place(shop, alice, kill_order_no) for _ in range(SUBMITS))),
    )
    outcomes = [(r.status_code, code(r)) for r in answers]
    assert outcomes.count((201, "")) == 1, outcomes
    for outcome in outcomes:
        assert outcome in ((201, ""), (409, "duplicate-submission"), (409, "already-purchased"))
    assert await orders_of_kill_order(shop, kill_order_no) == 1


@pytest.mark.parametrize("state", ["pending", "created"])
async def test_concurrent_order_transactions_of_one_kill_order_make_one_order(
    shop: Shop, state: str
) -> None:
    """Past the token (each submit its own): the database decides, one order, no hang."""
    activity = await shop.activity(kill_count=5)
    kc = activity["courses"][0]["kill_course_id"]
    (alice,) = await shop.users(1)
    kill_order_no = await seckill(shop, alice, kc)
    if state == "created":
        await kill_order_created(shop, alice, kill_order_no)
    user_id = shop.app.state.tokens.read(alice["Authorization"].split()[1]).id

    async def one() -> str:
        try:
            await create_order(shop.app, user_id, kill_order_no=kill_order_no)
        except AlreadyPurchased:
            return "already-purchased"
        return "placed"

    results = await within(
        30, "concurrent order transactions", asyncio.gather(*(one() for _ in range(SUBMITS)))
    )
    assert sorted(results) == ["already-purchased"] * (SUBMITS - 1) + ["placed"]
    assert await orders_of_kill_order(shop, kill_order_no) == 1


async def test_a_submit_token_is_bound_to_its_user_and_to_what_is_bought(shop: Shop) -> None:
    activity = await shop.activity(kill_count=5)
    kc = activity["courses"][0]["kill_course_id"]
    (alice, bob) = await shop.users(2)
    order_a = await seckill(shop, alice, kc)
    course = await shop.course("Rust", "99.00")

    async def token(user: dict[str, str], **params: Any) -> str:
        response = await shop.client.get("/orders/submit-token", params=params, headers=user)
        assert response.status_code == 200, response.text
        return str(response.json()["token"])

    async def submit(user: dict[str, str], tok: str, body: dict[str, Any]) -> httpx.Response:
        return await shop.client.post(
            "/orders", json={**body, "pay_type": "alipay"}, headers={**user, "X-Submit-Token": tok}
        )

    # Alice's token for kill order A does not place kill order B (another of hers).
    (carol,) = await shop.users(1)
    activity_b = await shop.activity(kill_count=5)
    order_b = await seckill(shop, alice, activity_b["courses"][0]["kill_course_id"])
    for_a = await token(alice, kill_order_no=order_a)
    wrong_purchase = await submit(alice, for_a, {"kill_order_no": order_b})
    assert (wrong_purchase.status_code, code(wrong_purchase)) == (409, "duplicate-submission")
    # ... nor courses bought at their regular price.
    for_a = await token(alice, kill_order_no=order_a)
    as_courses = await submit(alice, for_a, {"course_ids": [course]})
    assert (as_courses.status_code, code(as_courses)) == (409, "duplicate-submission")

    # A token issued to Alice cannot be spent by Bob (nor Carol), even for her kill order.
    for_a = await token(alice, kill_order_no=order_a)
    for user in (bob, carol):
        stolen = await submit(user, for_a, {"kill_order_no": order_a})
        assert (stolen.status_code, code(stolen)) == (409, "duplicate-submission")
    # The refusals above did not spend it: Alice places kill order A with it, once.
    placed = await submit(alice, for_a, {"kill_order_no": order_a})
    assert placed.status_code == 201, placed.text
    again = await submit(alice, for_a, {"kill_order_no": order_a})
    assert (again.status_code, code(again)) == (409, "duplicate-submission")

    # Tokens of different purchases live side by side; course ids are one set.
    for_b = await token(alice, kill_order_no=order_b)
    for_course = await token(alice, course_ids=f"{course},{course}")
    assert (await submit(alice, for_course, {"course_ids": [course]})).status_code == 201
    assert (await submit(alice, for_b, {"kill_order_no": order_b})).status_code == 201
    missing = await shop.client.post(
        "/orders", json={"kill_order_no": order_b, "pay_type": "alipay"}, headers=alice
    )
    assert (missing.status_code, code(missing)) == (409, "duplicate-submission")
    bad = await shop.client.get("/orders/submit-token", params={"course_ids": "1,x"}, headers=alice)
    assert bad.status_code == 422
