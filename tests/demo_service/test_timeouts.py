"""Payment timeout: an unpaid order is cancelled and its stock comes back exactly once.

Runs on SQLite and PostgreSQL and the shared Redis, with a one-second payment timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from sqlalchemy import delete

from demo_service.models import Outbox
from demo_service.orders import CHECK_PAYMENT
from demo_service.settings import Settings
from tests.demo_service.conftest import Shop
from tests.demo_service.test_orders import eventually, order_of, place, seckill, started_shop


@pytest.fixture
async def shop(shop_settings: Settings) -> AsyncIterator[Shop]:
    settings = replace(
        shop_settings,
        order_pay_timeout_seconds=1,
        claim_idle_seconds=1.0,
        sweeper_interval_seconds=0.5,
        alipay_notify_delays=(0.0, 0.5, 1.0),
    )
    async with started_shop(settings) as s:
        yield s


async def stock_left(shop: Shop, activity: dict[str, object]) -> int:
    listed = (await shop.client.get(f"/activities/{activity['activity_id']}")).json()
    return int(listed["courses"][0]["stock_left"])


@pytest.mark.parametrize("lose_the_delayed_message", [False, True], ids=["message", "sweeper"])
async def test_an_unpaid_order_times_out_and_its_stock_comes_back_once(
    shop: Shop, lose_the_delayed_message: bool
) -> None:
    activity = await shop.activity(kill_count=3)
    kc = activity["courses"][0]["kill_course_id"]
    (alice,) = await shop.users(1)
    kill_order_no = await seckill(shop, alice, kc)
    placed = await place(shop, alice, kill_order_no)
    assert placed.status_code == 201, placed.text
    order_no = placed.json()["order_no"]
    if lose_the_delayed_message:
        async with shop.app.state.sessionmaker() as session, session.begin():
            await session.execute(delete(Outbox).where(Outbox.topic == CHECK_PAYMENT))
    assert await stock_left(shop, activity) == 2

    async def cancelled() -> bool:
        return (await order_of(shop, alice, order_no))["status"] == "TIMEOUT_CANCEL"

    await eventually(cancelled, "the unpaid order was cancelled")

    async def returned() -> bool:
        return await stock_left(shop, activity) == 3

    await eventually(returned, "the stock came back")
    kill = (await shop.client.get(f"/kill/orders/{kill_order_no}", headers=alice)).json()
    assert kill["status"] == "CANCELLED"
    # Once only: a sweep over everything again returns nothing more.
    from demo_service.timeouts import sweep

    await sweep(shop.app)
    assert await stock_left(shop, activity) == 3
    # sold + left == initial, and the buyer may buy again.
    again = await shop.client.post(f"/kill/{kc}", headers=alice)
    assert again.status_code == 200, again.text
    assert await stock_left(shop, activity) == 2


async def test_pay_racing_the_timeout_never_both_and_stock_is_conserved(shop: Shop) -> None:
    """Trials of a payment at about the timeout: PAID xor TIMEOUT_CANCEL, stock conserved."""
    import random

    trials = 6
    activity = await shop.activity(kill_count=trials)
    kc = activity["courses"][0]["kill_course_id"]
    buyers = await shop.users(trials)
    orders: list[tuple[dict[str, str], str]] = []
    for buyer in buyers:
        placed = await place(shop, buyer, await seckill(shop, buyer, kc))
        assert placed.status_code == 201, placed.text
        orders.append((buyer, placed.json()["order_no"]))

    async def race(buyer: dict[str, str], order_no: str) -> None:
        await asyncio.sleep(random.uniform(0.5, 1.5))
        pay = await shop.client.post(f"/pay/{order_no}", headers=buyer)
        if pay.status_code == 200:
            await shop.client.post(
                httpx.URL(pay.json()["pay_url"]).raw_path.decode(), data={"action": "pay"}
            )

    await asyncio.gather(*(race(b, o) for b, o in orders))

    async def settled() -> list[dict[str, object]]:
        states = [await order_of(shop, b, o) for b, o in orders]
        done = all(
            s["status"] == "PAID" or (s["status"] == "TIMEOUT_CANCEL" and s["pay_status"] != "PAID")
            for s in states
        )
        return states if done else []

    states = await eventually(settled, "every order settled")
    paid = sum(1 for s in states if s["status"] == "PAID")
    for s in states:
        assert s["status"] in ("PAID", "TIMEOUT_CANCEL")
        if s["status"] == "PAID":
            assert s["pay_status"] == "PAID"

    async def conserved() -> bool:
        return await stock_left(shop, activity) == trials - paid

    await eventually(conserved, "sold + left == initial")
