"""A flash sale under fire: four workers, one Redis, PostgreSQL, and a fault mid-sale.

Each scenario starts ``python -m demo_service`` with ``WORKERS=4`` on a schema of its own in
the PostgreSQL test database and on a private ``redis-server`` (persistent: an append-only
file, as a production Redis would keep), then drives a flash sale of 2,000 buyers on 200
units with the runner (``python -m demo_service.flash_sale --url ... --json``) while:

(a) one worker is SIGKILLed mid-sale (uvicorn starts another);
(b) Redis is restarted mid-sale;
(c) the sandbox posts notifies slowly and loses the first attempts of each
    (``ALIPAY_NOTIFY_SLOW_SECONDS``, ``ALIPAY_NOTIFY_FAIL_FIRST``).

Afterwards the runner's report and the database and Redis are checked directly: nothing
oversold, the stock conserved, no order or payment lost, every paid order PAID, every
timed-out one cancelled and its unit returned once, and no message left pending anywhere
except in a dead-letter stream, with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil  # type: ignore[import-untyped]
import pytest
from redis.asyncio import Redis

from demo_service.seckill import course_keys, preorder_stream
from demo_service.settings import Settings, SettingsError
from tests.demo_service.conftest import ADMIN_PASSWORD, PG_DSN, TOKEN_SECRET, temp_postgres
from tests.helpers import ROOT, RedisServer, free_port, redis_answers, wait_for_port

BUYERS = 2000
STOCK = 200
PREFIX = "shop"

#: Short timeouts, so that abandoned purchases time out while the runner waits.
SHOP_ENV = {
    "WORKERS": "4",
    "KILL_ORDER_TIMEOUT_SECONDS": "20",
    "ORDER_PAY_TIMEOUT_SECONDS": "25",
    "SWEEPER_INTERVAL_SECONDS": "1",
    "DEMO_CLAIM_IDLE_SECONDS": "3",
    "ALIPAY_NOTIFY_DELAYS": "0,1,2,3,5,8,13",
}


class PersistentRedis(RedisServer):
    """A private redis-server that keeps its data across a restart (AOF, fsync always)."""

    def start(self) -> PersistentRedis:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            self.dir,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout=30)
        if not redis_answers(self.url, within=30):
            raise TimeoutError("private redis-server did not answer")
        return self


class FaultShop:
    """``python -m demo_service`` with four workers, as a process group of its own."""

    def __init__(self, database_url: str, redis: RedisServer, **env: str) -> None:
        self.port = free_port()
        self.redis = redis
        self.database_url = database_url
        self.dir = Path(tempfile.mkdtemp(prefix="fault-shop-"))
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DEMO_", "YMGUARD_", "ALIPAY_")) and k != "REDIS_URL"
        }
        self.env.update(SHOP_ENV)
        self.env.update(
            PYTHONPATH=str(ROOT),
            HOST="127.0.0.1",
            PORT=str(self.port),
            DATABASE_URL=database_url,
            REDIS_URL=redis.url,
            DEMO_REDIS_PREFIX=PREFIX,
            YMGUARD_KEY_PREFIX="guards",
            DEMO_ADMIN_PASSWORD=ADMIN_PASSWORD,
            DEMO_TOKEN_SECRET=TOKEN_SECRET,
            **env,
        )
        self.log = open(self.dir / "shop.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "demo_service"],
            cwd=self.dir,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self, tail: int = 6000) -> str:
        self.log.flush()
        return (self.dir / "shop.log").read_text(errors="replace")[-tail:]

    def workers(self) -> list[psutil.Process]:
        return [
            p
            for p in psutil.Process(self.proc.pid).children()
            if "spawn_main" in " ".join(p.cmdline())
        ]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 300  # four workers on a loaded 2-core machine
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the shop exited:\n{self.output()}")
            if len(self.workers()) == 4:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return
            time.sleep(0.5)
        raise AssertionError(f"the shop did not start:\n{self.output()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def fault_shop(**env: str) -> AsyncIterator[tuple[FaultShop, RedisServer, str]]:
    """A four-worker shop on a fresh PostgreSQL schema and a private persistent Redis."""
    async with temp_postgres() as database_url:
        redis = PersistentRedis().start()
        shop: FaultShop | None = None
        try:
            shop = FaultShop(database_url, redis, **env)
            await asyncio.to_thread(shop.wait_ready)
            yield shop, redis, database_url
        finally:
            if shop is not None:
                await asyncio.to_thread(shop.close)
            redis.close()


class RunnerProcess:
    """``python -m demo_service.flash_sale --url ... --json`` against the shop."""

    def __init__(self, shop: FaultShop) -> None:
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        env = dict(shop.env)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "demo_service.flash_sale",
                "--url",
                shop.url,
                "--buyers",
                str(BUYERS),
                "--stock",
                str(STOCK),
                "--json",
                "--seed",
                "12",
                "--connections",
                "16",
                "--settle-seconds",
                "150",
            ],
            env=env,
            stdout=self.out,
            stderr=self.err,
        )

    async def report(self) -> dict[str, Any]:
        try:
            await asyncio.to_thread(self.proc.wait, 900)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.out.seek(0)
        self.err.seek(0)
        out, err = self.out.read().decode(), self.err.read().decode()
        assert out.strip(), f"the runner printed no report (status {self.proc.returncode}):\n{err}"
        report: dict[str, Any] = json.loads(out)
        report["_stderr"] = err[-3000:]
        return report


async def wait_for_sales(redis_url: str, at_least: int, within: float = 120.0) -> None:
    """Wait until ``at_least`` buyers are admitted (the pre-order stream's length)."""
    client = Redis.from_url(redis_url, socket_timeout=2)
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if await client.xlen(preorder_stream(PREFIX)) >= at_least:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"fewer than {at_least} sales within {within} s")
    finally:
        await client.aclose()


# -- checks afterwards ----------------------------------------------------------------------


async def query(database_url: str, sql: str) -> list[asyncpg.Record]:
    schema = database_url.rsplit("search_path%3D", 1)[1]
    conn = await asyncpg.connect(PG_DSN, timeout=10, server_settings={"search_path": schema})
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def quiet(database_url: str, redis_url: str, within: float = 90.0) -> dict[str, Any]:
    """Wait until every outbox row is published and no stream has a pending or unread
    message; returns what the streams look like (dead letters included)."""
    client = Redis.from_url(redis_url, socket_timeout=5, decode_responses=True)
    try:
        deadline = time.monotonic() + within
        while True:
            unpublished = await query(
                database_url, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL"
            )
            streams = [k async for k in client.scan_iter(match=f"{PREFIX}:*", _type="stream")]
            busy: dict[str, Any] = {}
            dead: dict[str, list[dict[str, str]]] = {}
            for stream in streams:
                if stream.endswith(":dlq"):
                    dead[stream] = [fields for _, fields in await client.xrange(stream)]
                    continue
                for group in await client.xinfo_groups(stream):
                    if group["pending"] or group.get("lag"):
                        busy[f"{stream} {group['name']}"] = (group["pending"], group.get("lag"))
            if unpublished[0]["n"] == 0 and not busy:
                return {"streams": streams, "dead": dead}
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"messages still pending after {within} s: outbox "
                    f"{unpublished[0]['n']} unpublished, streams {busy}"
                )
            await asyncio.sleep(1.0)
    finally:
        await client.aclose()


async def check_the_books(report: dict[str, Any], database_url: str, redis_url: str) -> None:
    """Everything the issue lists under "Afterwards", from the database and Redis."""
    explain = json.dumps(
        {k: v for k, v in report.items() if not k.endswith(("_orders", "_stderr"))}, indent=1
    )
    assert report["oversold"] == 0, explain
    assert report["unsettled"] == 0, explain
    assert report["stock_conserved"], explain
    assert report["paid"] > 0, explain

    streams = await quiet(database_url, redis_url)
    for stream, entries in streams["dead"].items():
        for fields in entries:
            assert fields.get("reason"), f"dead letter without a reason in {stream}: {fields}"

    kc = int(report["kill_course_id"])
    kill_orders = await query(database_url, "SELECT kill_order_no, status FROM kill_orders")
    orders = await query(
        database_url,
        "SELECT o.order_no, o.status, o.kill_order_no, p.status AS pay_status, "
        "(SELECT count(*) FROM pay_flows f WHERE f.pay_order_no = p.pay_order_no "
        "AND f.kind = 'PAY') AS pays FROM orders o "
        "LEFT JOIN pay_orders p ON p.order_no = o.order_no",
    )
    client = Redis.from_url(redis_url, socket_timeout=5, decode_responses=True)
    try:
        keys = course_keys(PREFIX, kc)
        stock_left = int(await client.get(keys["stock"]) or 0)
        returned = set(await client.hkeys(keys["returned"]))
        admitted = await client.xlen(preorder_stream(PREFIX))
    finally:
        await client.aclose()

    by_status: dict[str, int] = {}
    for row in kill_orders:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    order_of = {row["kill_order_no"]: row for row in orders}
    paid = [row for row in orders if row["status"] == "PAID"]
    facts = f"kill orders {by_status}, orders {len(orders)}, paid {len(paid)}, " + explain

    # Every admission reached the database, once; every purchase is settled.
    assert len(kill_orders) == admitted, facts
    assert set(by_status) <= {"ORDERED", "EXPIRED", "CANCELLED"}, facts
    # Nothing oversold; the stock is conserved in Redis and in the database.
    assert len(paid) <= STOCK, facts
    assert stock_left + len(paid) == STOCK, facts
    assert stock_left == report["stock_left"], facts
    # Every unit that came back came back once: exactly the expired and cancelled ones.
    gone = {r["kill_order_no"] for r in kill_orders if r["status"] in ("EXPIRED", "CANCELLED")}
    assert returned == gone, facts
    for row in kill_orders:
        order = order_of.get(row["kill_order_no"])
        if row["status"] == "ORDERED":
            assert order is not None and order["status"] == "PAID", (row, order)
        elif row["status"] == "CANCELLED":
            assert order is not None and order["status"] == "TIMEOUT_CANCEL", (row, order)
        else:
            assert order is None, (row, order)
    # Every order is paid or cancelled; a paid one has its payment (once), a cancelled one
    # no payment at all (nothing here paid late, so nothing to refund).
    for order in orders:
        assert order["status"] in ("PAID", "TIMEOUT_CANCEL"), order
        if order["status"] == "PAID":
            assert (order["pay_status"], order["pays"]) == ("PAID", 1), order
        else:
            assert order["pay_status"] in (None, "CLOSED"), order
    # No payment lost: every order the cashier took money for is PAID, and so is every
    # order the runner saw PAID.
    statuses = {row["order_no"]: row["status"] for row in orders}
    for order_no in report["cashier_paid_orders"] + report["paid_orders"]:
        assert statuses.get(order_no) == "PAID", order_no


async def check_notifies(redis_url: str, fail_first: int) -> None:
    """Every notify the sandbox sent was delivered, on the attempt after the lost ones."""
    client = Redis.from_url(redis_url, socket_timeout=5, decode_responses=True)
    try:
        notifies = [
            await client.hgetall(key)
            async for key in client.scan_iter(match=f"{PREFIX}:{{alipay}}:notify:*")
            if not key.endswith(":due")
        ]
    finally:
        await client.aclose()
    notifies = [n for n in notifies if n.get("out_trade_no")]
    assert notifies
    for notify in notifies:
        assert notify.get("state") == "delivered", notify
        assert int(notify["attempts"]) >= fail_first + 1, notify


async def flash_sale_under(
    fault: str, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], str]:
    async with fault_shop(**(env or {})) as (shop, redis, database_url):
        runner = RunnerProcess(shop)
        try:
            if fault == "sigkill":
                await wait_for_sales(redis.url, 40)
                victim = shop.workers()[0]
                victim.send_signal(signal.SIGKILL)
            elif fault == "redis-restart":
                await wait_for_sales(redis.url, 40)
                await asyncio.to_thread(redis.stop)
                await asyncio.sleep(1.0)
                await asyncio.to_thread(redis.start)
            report = await runner.report()
        finally:
            if runner.proc.poll() is None:
                runner.proc.kill()
                runner.proc.wait()
        try:
            await check_the_books(report, database_url, redis.url)
            if "ALIPAY_NOTIFY_FAIL_FIRST" in (env or {}):
                await check_notifies(redis.url, int((env or {})["ALIPAY_NOTIFY_FAIL_FIRST"]))
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\n--- runner:\n{report['_stderr']}\n--- shop:\n{shop.output()}"
            ) from None
        return report, shop.output()


@pytest.fixture(autouse=True)
def _needs_redis_server() -> Iterator[None]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    yield


async def test_a_worker_sigkilled_mid_sale_loses_nothing() -> None:
    await flash_sale_under("sigkill")


async def test_redis_restarted_mid_sale_loses_nothing() -> None:
    await flash_sale_under("redis-restart")


async def test_a_slow_and_failing_payment_provider_loses_nothing() -> None:
    await flash_sale_under(
        "slow-notifies",
        {"ALIPAY_NOTIFY_FAIL_FIRST": "2", "ALIPAY_NOTIFY_SLOW_SECONDS": "1"},
    )


def test_the_sandbox_fault_settings_are_read_and_checked() -> None:
    settings = Settings.from_env(
        {"ALIPAY_NOTIFY_FAIL_FIRST": "2", "ALIPAY_NOTIFY_SLOW_SECONDS": "0.5"}
    )
    assert (settings.alipay_notify_fail_first, settings.alipay_notify_slow_seconds) == (2, 0.5)
    assert (Settings().alipay_notify_fail_first, Settings().alipay_notify_slow_seconds) == (0, 0)
    for name, bad in [
        ("ALIPAY_NOTIFY_FAIL_FIRST", "-1"),
        ("ALIPAY_NOTIFY_FAIL_FIRST", "two"),
        ("ALIPAY_NOTIFY_SLOW_SECONDS", "-0.5"),
        ("ALIPAY_NOTIFY_SLOW_SECONDS", "inf"),
    ]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: bad})
