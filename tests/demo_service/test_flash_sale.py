"""The flash-sale runner (``python -m demo_service.flash_sale``).

A small sale runs in process against the real shop (its lifespan, the shared Redis, SQLite
and PostgreSQL) with short timeouts so that abandoned purchases time out while the runner
waits; its report must add up and agree with the database. The command line and the
report's arithmetic are checked on their own. The big runs (2,000 buyers, four workers,
faults) are in ``test_faults.py``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace

import httpx
import pytest
from sqlalchemy import func, select

from demo_service.flash_sale import (
    PriorityGate,
    Runner,
    StepStats,
    format_report,
    parse_args,
    percentile,
)
from demo_service.models import KillOrder, Order
from demo_service.settings import Settings
from tests.demo_service.conftest import ADMIN_PASSWORD, TOKEN_SECRET
from tests.demo_service.test_orders import started_shop


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None
    stats = StepStats()
    stats.record("200", 0.010)
    stats.record("409 sold-out", 0.030)
    assert stats.summary() == {
        "requests": 2,
        "statuses": {"200": 1, "409 sold-out": 1},
        "p50_ms": 10.0,
        "p99_ms": 30.0,
    }


def test_the_command_line_refuses_what_makes_no_sale(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--buyers", "20", "--stock", "5", "--json"])
    assert (args.buyers, args.stock, args.json, args.url) == (20, 5, True, None)
    for bad in (["--buyers", "0", "--stock", "5"], ["--buyers", "5"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert "--stock" in capsys.readouterr().err


async def test_the_priority_gate_lets_later_steps_in_first() -> None:
    gate = PriorityGate(1)
    order: list[str] = []

    async def use(name: str, priority: int) -> None:
        async with gate.slot(priority):
            order.append(name)
            await asyncio.sleep(0)

    async with gate.slot(0):  # hold the only place while the others line up
        tasks = [asyncio.create_task(use(n, p)) for n, p in [("a", 9), ("b", 9), ("c", 1)]]
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert order == ["c", "a", "b"]
    assert gate.free == 1


@pytest.fixture
def sale_settings(shop_settings: Settings) -> Settings:
    """Timeouts short enough for abandoned purchases to time out during the test."""
    return replace(
        shop_settings,
        kill_order_timeout_seconds=2,
        order_pay_timeout_seconds=3,
        sweeper_interval_seconds=0.5,
        claim_idle_seconds=1.0,
        alipay_notify_delays=(0.0, 0.5, 1.0),
    )


async def test_a_small_flash_sale_adds_up(sale_settings: Settings) -> None:
    buyers, stock = 60, 12
    async with started_shop(sale_settings) as shop:
        runner = Runner(
            "http://shop",
            buyers=buyers,
            stock=stock,
            admin_password=ADMIN_PASSWORD,
            abandon_kill=0.25,
            abandon_order=0.25,
            connections=8,
            settle_seconds=60,
            seed=7,
            database_url=sale_settings.database_url,
            token_secret=TOKEN_SECRET,
            transport=httpx.ASGITransport(app=shop.app),
        )
        report = await runner.run()
        async with shop.app.state.sessionmaker() as session:
            orders = dict(
                (
                    await session.execute(select(Order.status, func.count()).group_by(Order.status))
                ).all()
            )
            kill_orders = Counter(
                dict(
                    (
                        await session.execute(
                            select(KillOrder.status, func.count()).group_by(KillOrder.status)
                        )
                    ).all()
                )
            )

    text = format_report(report)
    assert report["oversold"] == 0, text
    assert report["unsettled"] == 0, text
    assert report["stock_conserved"], text
    assert report["steps"]["seckill"]["requests"] >= buyers
    assert report["sold"] >= stock  # units that came back were sold again
    assert report["abandoned_after_seckill"] > 0 and report["abandoned_after_order"] > 0
    # The report agrees with the database.
    paid = orders.get("PAID", 0)
    assert report["paid"] == paid > 0, text
    assert report["timed_out"]["orders"] == orders.get("TIMEOUT_CANCEL", 0)
    # A kill order whose order timed out is CANCELLED, one never ordered EXPIRED.
    assert report["timed_out"]["kill_orders"] == kill_orders["EXPIRED"], text
    assert kill_orders["CANCELLED"] == orders.get("TIMEOUT_CANCEL", 0)
    assert report["stock_left"] + paid == stock
    assert report["paid_orders"] == report["cashier_paid_orders"]
    assert "oversold               0" in text and "conserved" in text
