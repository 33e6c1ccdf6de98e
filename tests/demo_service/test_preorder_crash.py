"""A seckill answered 200 is never lost, even if its worker dies right after.

A shop process (a child of the test) admits a buyer (200 and a kill order number: the
script has taken the unit and appended the pre-order to the stream in one step) and is
then SIGKILLed before the pre-order reaches the database: either its pre-order consumer
holds the message mid-transaction, or it never read it. Another shop process on the same
database and Redis then takes the message over (``XAUTOCLAIM`` after
``claim_idle_seconds``, or a plain read), and the kill order reaches ``CREATED`` well
within DEMO-API's 30 s, once; the buyer can place the order.

Runs on SQLite and PostgreSQL and the shared Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from demo_service import orders
from demo_service.app import create_app
from demo_service.messaging import Message
from demo_service.models import KillOrder
from demo_service.settings import Settings
from tests.demo_service.conftest import Shop, delete_prefixed
from tests.demo_service.test_orders import eventually, notify_in_process, place
from tests.helpers import ROOT


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Shop]:
    """The shop started in this process; its Redis keys stay (another process follows)."""
    s = Shop(settings)
    notify_in_process(s)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(s.app.router.lifespan_context(s.app))
        stack.push_async_callback(s.client.aclose)
        yield s


async def kill_order_rows(shop: Shop, kill_order_no: str) -> int:
    async with shop.app.state.sessionmaker() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(KillOrder)
            .where(KillOrder.kill_order_no == kill_order_no)
        )
    return int(count or 0)


@pytest.mark.parametrize("where", ["mid-transaction", "unread"])
async def test_a_seckill_answered_200_survives_its_worker_being_sigkilled(
    shop_settings: Settings, tmp_path: Path, where: str
) -> None:
    settings = replace(shop_settings, claim_idle_seconds=1.0, sweeper_interval_seconds=0.5)
    assert settings.redis_url is not None
    try:
        async with running(settings) as shop:  # schema, the activity, a buyer
            activity = await shop.activity(kill_count=3)
            kc = activity["courses"][0]["kill_course_id"]
            (alice,) = await shop.users(1)
        answer, stuck = tmp_path / "answer.json", tmp_path / "stuck"
        fields = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tests.demo_service.test_preorder_crash"),
            *(json.dumps(fields), alice["Authorization"], str(kc), where),
            *(str(answer), str(stuck)),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            deadline = time.monotonic() + 60
            ready = [answer, stuck] if where == "mid-transaction" else [answer]
            while not all(await asyncio.to_thread(lambda: [p.exists() for p in ready])):
                if proc.returncode is not None or time.monotonic() > deadline:
                    pytest.fail(f"the worker never got there (exit status {proc.returncode})")
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        status, body = json.loads(answer.read_text())
        assert status == 200, body
        kill_order_no = body["kill_order_no"]
        if where == "mid-transaction":
            assert stuck.read_text() == kill_order_no

        async with running(settings) as shop:
            assert await kill_order_rows(shop, kill_order_no) == 0  # the death lost the write

            async def created() -> bool:
                r = await shop.client.get(f"/kill/orders/{kill_order_no}", headers=alice)
                return bool(r.json()["status"] == "CREATED")

            await eventually(created, "the pre-order reached CREATED", seconds=30)
            assert await kill_order_rows(shop, kill_order_no) == 1
            listed = (await shop.client.get(f"/activities/{activity['activity_id']}")).json()
            assert listed["courses"][0]["stock_left"] == 2
            placed = await place(shop, alice, kill_order_no)
            assert placed.status_code == 201, placed.text
    finally:
        await delete_prefixed(settings.redis_url, settings.key_prefix or "", settings.redis_prefix)


# -- the child: a shop worker that answers one seckill and is then killed ---------------


async def _worker(raw: str, auth: str, kc: int, where: str, answer: Path, stuck: Path) -> None:
    fields: dict[str, Any] = json.loads(raw)
    for name in ("rules_path", "var_dir", "alipay_keys_dir"):
        if fields.get(name) is not None:
            fields[name] = Path(fields[name])
    fields["alipay_notify_delays"] = tuple(fields["alipay_notify_delays"])
    settings = Settings(**fields)
    persist = orders.persist_preorder

    def persist_then_hang(timeout: float) -> Any:
        handle = persist(timeout)

        async def hanging(session: AsyncSession, message: Message) -> None:
            await handle(session, message)
            await session.flush()  # written, not committed: the kill comes now
            await asyncio.to_thread(stuck.write_text, message.fields["kill_order_no"])
            await asyncio.sleep(3600)

        return hanging

    async def no_consumer(app: Any) -> None:
        return None

    if where == "mid-transaction":
        orders.persist_preorder = persist_then_hang
    else:
        orders.start = no_consumer  # type: ignore[assignment]
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as c,
    ):
        response = await c.post(f"/kill/{kc}", headers={"Authorization": auth})
        await asyncio.to_thread(
            answer.write_text, json.dumps([response.status_code, response.json()])
        )
        await asyncio.sleep(3600)


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(_worker(a[0], a[1], int(a[2]), a[3], Path(a[4]), Path(a[5])))
