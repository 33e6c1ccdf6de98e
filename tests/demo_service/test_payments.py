"""Alipay notifies: only a verified one for the right app, order and amount changes anything.

Runs on SQLite and PostgreSQL and the shared Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from sqlalchemy import func, select

from demo_service.alipay_sign import load_or_create_keys, sign
from demo_service.models import PayFlow
from demo_service.settings import Settings
from tests.demo_service.conftest import Shop
from tests.demo_service.test_orders import eventually, order_of, place, seckill, started_shop


@pytest.fixture
async def shop(shop_settings: Settings) -> AsyncIterator[Shop]:
    settings = replace(shop_settings, claim_idle_seconds=1.0, alipay_notify_delays=(3600.0,))
    async with started_shop(settings) as s:
        yield s


def notify_form(shop: Shop, order_no: str, amount: str, **changes: str) -> dict[str, str]:
    settings = shop.settings
    keys = load_or_create_keys(settings.alipay_keys_path)
    form = {
        "notify_time": "2026-01-01 00:00:00",
        "notify_type": "trade_status_sync",
        "notify_id": uuid.uuid4().hex,
        "app_id": settings.alipay_app_id,
        "charset": "utf-8",
        "version": "1.0",
        "sign_type": "RSA2",
        "trade_no": "2026" + uuid.uuid4().hex[:20],
        "out_trade_no": order_no,
        "total_amount": amount,
        "receipt_amount": amount,
        "buyer_pay_amount": amount,
        "subject": "order",
        "trade_status": "TRADE_SUCCESS",
        "gmt_create": "2026-01-01 00:00:00",
        "gmt_payment": "2026-01-01 00:00:00",
        "seller_id": "2088000000000000",
    }
    key = keys.app_private if changes.pop("forge", "") else keys.alipay_private
    form.update(changes)
    form["sign"] = sign(form, key)
    return form


async def test_forged_wrong_amount_wrong_app_change_nothing_duplicates_pay_once(
    shop: Shop,
) -> None:
    activity = await shop.activity(kill_count=3)
    kc = activity["courses"][0]["kill_course_id"]
    (alice,) = await shop.users(1)
    placed = await place(shop, alice, await seckill(shop, alice, kc))
    order_no = placed.json()["order_no"]
    pay = await shop.client.post(f"/pay/{order_no}", headers=alice)
    assert pay.status_code == 200, pay.text

    for bad in (
        notify_form(shop, order_no, "9.90", forge="yes"),
        notify_form(shop, order_no, "0.01"),
        notify_form(shop, order_no, "9.90", app_id="2021999999999999"),
        notify_form(shop, "O-not-an-order", "9.90"),
    ):
        response = await shop.client.post("/pay/notify/alipay", data=bad)
        assert response.text != "success"
    assert (await order_of(shop, alice, order_no))["pay_status"] == "TO_PAY"

    good = notify_form(shop, order_no, "9.90")
    answers = await asyncio.gather(
        *(shop.client.post("/pay/notify/alipay", data=good) for _ in range(10))
    )
    assert [a.text for a in answers] == ["success"] * 10

    async def paid() -> bool:
        return (await order_of(shop, alice, order_no))["status"] == "PAID"

    await eventually(paid, "the order became PAID")
    async with shop.app.state.sessionmaker() as session:
        flows = await session.scalar(select(func.count()).select_from(PayFlow))
    assert flows == 1
    courses = (await shop.client.get("/me/courses", headers=alice)).json()["courses"]
    assert len(courses) == 1
