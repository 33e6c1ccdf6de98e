"""Payment timeout: an unpaid order is cancelled and its stock comes back exactly once.

Runs on SQLite and PostgreSQL and the shared Redis, with a one-second payment timeout.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select

from demo_service.alipay_sandbox import AlipaySandbox
from demo_service.models import Outbox, PayFlow, PayOrder
from demo_service.orders import CHECK_PAYMENT, KILL_ORDER_CHECK
from demo_service.seckill import ALREADY_RETURNED, course_keys, return_stock
from demo_service.settings import Settings
from demo_service.timeouts import (
    cancel_unpaid,
    expire_kill_order,
    sweep,
)
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
    await sweep(shop.app)
    assert await stock_left(shop, activity) == 3
    # sold + left == initial, and the buyer may buy again.
    again = await shop.client.post(f"/kill/{kc}", headers=alice)
    assert again.status_code == 200, again.text
    assert await stock_left(shop, activity) == 2


#: Trials of pay racing the timeout, per backend (the issue's figure is 100:
#: ``DEMO_RACE_TRIALS=100 pytest tests/demo_service/test_timeouts.py``).
RACE_TRIALS = int(os.environ.get("DEMO_RACE_TRIALS", "30"))


def sandbox_of(shop: Shop) -> AlipaySandbox:
    sandbox: AlipaySandbox = shop.app.state.alipay_sandbox.state.sandbox
    return sandbox


async def refunds_at_sandbox(shop: Shop, order_no: str) -> dict[str, str]:
    """The sandbox's refunds of a trade: out_request_no -> "cents:ms"."""
    sandbox = sandbox_of(shop)
    raw = await sandbox.redis.hgetall(sandbox._refund_key(order_no))
    return {k.decode() if isinstance(k, bytes) else k: str(v) for k, v in raw.items()}


async def buyers_count(shop: Shop, kc: int, user: dict[str, str]) -> int:
    user_id = shop.app.state.tokens.read(user["Authorization"].split()[1]).id
    held = await shop.redis.hget(course_keys(shop.settings.redis_prefix, kc)["buyers"], user_id)
    return int(held or 0)


async def test_pay_racing_the_timeout_never_both_and_stock_is_conserved(shop: Shop) -> None:
    """Trials of a payment at about the timeout: PAID xor TIMEOUT_CANCEL, stock returned
    once per cancelled order, and every payment that reached a cancelled order refunded."""
    trials = RACE_TRIALS
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
    sandbox = sandbox_of(shop)

    async def settled() -> list[tuple[dict[str, object], dict[str, str]]]:
        done = []
        for b, o in orders:
            state, trade = await order_of(shop, b, o), await sandbox.trade(o)
            money_came = "gmt_payment" in trade
            if state["status"] == "PAID" and state["pay_status"] == "PAID":
                done.append((state, trade))
            elif state["status"] == "TIMEOUT_CANCEL" and (
                state["pay_status"] == "REFUNDED" if money_came else state["pay_status"] != "PAID"
            ):
                done.append((state, trade))
            else:
                return []
        return done

    states = await eventually(settled, "every order settled", seconds=60)
    paid = cancelled = refunded = 0
    for (state, trade), (_, order_no) in zip(states, orders, strict=True):
        assert state["status"] in ("PAID", "TIMEOUT_CANCEL")
        refunds = await refunds_at_sandbox(shop, order_no)
        if state["status"] == "PAID":
            paid += 1
            assert state["pay_status"] == "PAID" and not refunds
        else:
            cancelled += 1
            assert state["pay_status"] != "PAID"
            if "gmt_payment" in trade:  # the money came after all: refunded, once, in full
                refunded += 1
                assert state["pay_status"] == "REFUNDED"
                assert len(refunds) == 1 and trade["refunded"] == trade["total"]
            else:
                assert not refunds
    assert paid + cancelled == trials
    # Never returned twice: one entry per cancelled kill order, buyers' counts match.
    returned = course_keys(shop.settings.redis_prefix, kc)["returned"]

    async def conserved() -> bool:
        return await stock_left(shop, activity) == trials - paid

    await eventually(conserved, "sold + left == initial")
    assert await shop.redis.hlen(returned) == cancelled
    counts = [await buyers_count(shop, kc, b) for b, _ in orders]
    assert sum(counts) == paid and max(counts) <= 1
    print(f"race trials={trials} paid={paid} cancelled={cancelled} refunded={refunded}")


async def test_a_payment_after_the_order_was_cancelled_is_refunded_once(shop: Shop) -> None:
    """The timeout cancels the order while POST /pay is between its pay order and the
    cashier request (the close finds no trade yet); the buyer then pays: refunded once."""
    activity = await shop.activity(kill_count=2)
    kc = activity["courses"][0]["kill_course_id"]
    (alice,) = await shop.users(1)
    kill_order_no = await seckill(shop, alice, kc)
    placed = await place(shop, alice, kill_order_no)
    assert placed.status_code == 201, placed.text
    order_no = placed.json()["order_no"]
    page_pay = shop.app.state.alipay_page_pay

    async def timeout_first(**kwargs: Any) -> Any:
        # The race, made certain: the timeout runs in POST /pay's window.
        assert await cancel_unpaid(shop.app, kwargs["out_trade_no"]) == "TIMEOUT_CANCEL"
        return await page_pay(**kwargs)

    shop.app.state.alipay_page_pay = timeout_first
    pay = await shop.client.post(f"/pay/{order_no}", headers=alice)
    assert pay.status_code == 200, pay.text
    shop.app.state.alipay_page_pay = page_pay
    assert (await order_of(shop, alice, order_no))["status"] == "TIMEOUT_CANCEL"
    cashier = await shop.client.post(
        httpx.URL(pay.json()["pay_url"]).raw_path.decode(), data={"action": "pay"}
    )
    assert cashier.status_code in (200, 303), cashier.text

    async def refunded() -> bool:
        return (await order_of(shop, alice, order_no))["pay_status"] == "REFUNDED"

    await eventually(refunded, "the payment for the cancelled order was refunded")
    state = await order_of(shop, alice, order_no)
    assert state["status"] == "TIMEOUT_CANCEL"
    refunds = await refunds_at_sandbox(shop, order_no)
    trade = await sandbox_of(shop).trade(order_no)
    assert len(refunds) == 1 and trade["refunded"] == trade["total"]
    async with shop.app.state.sessionmaker() as session:
        kinds = (
            await session.scalars(
                select(PayFlow.kind)
                .join(PayOrder, PayOrder.pay_order_no == PayFlow.pay_order_no)
                .where(PayOrder.order_no == order_no)
                .order_by(PayFlow.id)
            )
        ).all()
    assert list(kinds) == ["PAY", "REFUND"]
    # Nothing is granted, and the unit came back once.
    assert (await shop.client.get("/me/courses", headers=alice)).json()["courses"] == []

    async def returned() -> bool:
        return await stock_left(shop, activity) == 2

    await eventually(returned, "the stock came back")
    assert await buyers_count(shop, kc, alice) == 0


@pytest.mark.parametrize("lose_the_delayed_message", [False, True], ids=["message", "sweeper"])
async def test_a_kill_order_never_ordered_expires_and_its_stock_comes_back_once(
    shop_settings: Settings, lose_the_delayed_message: bool
) -> None:
    settings = replace(
        shop_settings,
        kill_order_timeout_seconds=1,
        claim_idle_seconds=1.0,
        sweeper_interval_seconds=0.5,
    )
    async with started_shop(settings) as shop:
        activity = await shop.activity(kill_count=1, kill_limit=1)
        kc = activity["courses"][0]["kill_course_id"]
        (alice, bob) = await shop.users(2)
        kill_order_no = await seckill(shop, alice, kc)
        assert await stock_left(shop, activity) == 0
        assert await buyers_count(shop, kc, alice) == 1
        limit = await shop.client.post(f"/kill/{kc}", headers=alice)
        assert limit.status_code == 409

        async def status() -> str:
            r = await shop.client.get(f"/kill/orders/{kill_order_no}", headers=alice)
            return str(r.json()["status"])

        async def created() -> bool:
            return await status() == "CREATED"

        await eventually(created, "the pre-order consumer wrote the kill order")
        if lose_the_delayed_message:
            async with shop.app.state.sessionmaker() as session, session.begin():
                await session.execute(delete(Outbox).where(Outbox.topic == KILL_ORDER_CHECK))

        async def expired() -> bool:
            return await status() == "EXPIRED"

        await eventually(expired, "the kill order expired")

        async def returned() -> bool:
            return await stock_left(shop, activity) == 1

        await eventually(returned, "the stock came back")
        assert await buyers_count(shop, kc, alice) == 0
        # Once: a sweep, and the expiry handled again, return nothing more.
        await sweep(shop.app)
        async with shop.app.state.sessionmaker() as session, session.begin():
            assert not await expire_kill_order(session, kill_order_no)
        user_id = shop.app.state.tokens.read(alice["Authorization"].split()[1]).id
        again = await return_stock(
            shop.redis, kc, user_id, kill_order_no, prefix=settings.redis_prefix
        )
        assert again == ALREADY_RETURNED
        assert await stock_left(shop, activity) == 1
        assert await shop.redis.hlen(course_keys(settings.redis_prefix, kc)["returned"]) == 1
        # An expired kill order cannot be ordered.
        late = await place(shop, alice, kill_order_no)
        assert late.status_code == 404, late.text
        # The unit is on sale again: Alice may buy again (her count came back), Bob not.
        again = await seckill(shop, alice, kc)
        assert again != kill_order_no
        sold_out = await shop.client.post(f"/kill/{kc}", headers=bob)
        assert sold_out.status_code == 409
        assert await stock_left(shop, activity) == 0
