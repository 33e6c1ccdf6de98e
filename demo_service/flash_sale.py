"""``python -m demo_service.flash_sale``: run a whole flash sale through the shop's public API.

::

    python -m demo_service.flash_sale --buyers 2000 --stock 200 [--url URL] [--json]

Without ``--url`` it starts a shop of its own (``python -m demo_service`` in a temporary
directory: SQLite and an embedded Redis, short timeouts so that abandoned purchases time out
during the run) and stops it afterwards. With ``--url`` it drives a running shop; the admin
password comes from ``--admin-password`` or ``DEMO_ADMIN_PASSWORD``.

The run: the admin creates a course and an ongoing activity with ``--stock`` units and
publishes it; then ``--buyers`` buyers rush ``POST /kill/{id}`` at once (httpx, one bounded
connection pool). Each winner goes on through ``GET /orders/submit-token``, ``POST /orders``,
``POST /pay/{order_no}`` and the sandbox cashier (``action=pay``), except a share who abandon
their purchase after the seckill (the kill order expires) or after the order (the payment
timeout cancels it). Finally the runner waits until every purchase it knows of is settled
(PAID, cancelled or expired) and the stock adds up, and reports: requests and statuses per
step, sold, paid, timed out, oversold (must be 0), stock conservation, p50/p99 latency per
step and throughput. ``--json`` prints the report as one JSON object (for machines).

Buyers: registering thousands of accounts over ``POST /auth/register`` would spend minutes
hashing passwords (Argon2id, on purpose slow). When the runner knows the shop's database and
token secret (``DATABASE_URL`` and ``DEMO_TOKEN_SECRET``, as the shop it starts does), it
inserts the buyers straight into the database with one shared password hash and signs their
bearer tokens itself; otherwise it registers and logs them in over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import math
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

#: Steps of a buyer's journey, in order (the report's ``steps`` keys).
STEPS = ("seckill", "submit_token", "order", "pay", "cashier", "order_status", "kill_status")
#: Statuses worth asking again for: the guards' "not now", a store away, the network.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: Answers of ``GET /orders/{no}`` and ``GET /kill/orders/{no}`` that end a purchase.
ORDER_FINAL = frozenset({"PAID", "TIMEOUT_CANCEL", "REFUNDED"})
KILL_ORDER_FINAL = frozenset({"EXPIRED", "CANCELLED"})


class FlashSaleError(RuntimeError):
    """The run could not be set up (the shop does not answer, the admin cannot log in...)."""


# -- measurements -------------------------------------------------------------------------


@dataclass
class StepStats:
    """Requests of one step: how many, their statuses, their latencies (seconds)."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def record(self, status: str, seconds: float) -> None:
        """Count one answer (``"200"``, ``"409 sold-out"``, ``"error ConnectError"``...)."""
        self.statuses[status] += 1
        self.latencies.append(seconds)

    def summary(self) -> dict[str, Any]:
        """``{"requests", "statuses", "p50_ms", "p99_ms"}``."""
        return {
            "requests": sum(self.statuses.values()),
            "statuses": dict(sorted(self.statuses.items())),
            "p50_ms": _ms(percentile(self.latencies, 50)),
            "p99_ms": _ms(percentile(self.latencies, 99)),
        }


def percentile(values: list[float], pct: float) -> float | None:
    """The ``pct``-th percentile of ``values`` (nearest rank); None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _label(response: httpx.Response) -> str:
    """``"<status>"``, or ``"<status> <problem code>"`` for a problem+json answer."""
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        with contextlib.suppress(ValueError, AttributeError):
            code = str(response.json().get("type", "")).rstrip("/").rsplit("/", 1)[-1]
            if code:
                return f"{response.status_code} {code}"
    return str(response.status_code)


#: Which waiting request goes first (lower first): a purchase nearer its end.
_PRIORITY = {"cashier": 0, "pay": 1, "order": 2, "submit_token": 3, "seckill": 9}


class PriorityGate:
    """At most ``capacity`` holders at once; waiters are let in by priority, then in order."""

    def __init__(self, capacity: int) -> None:
        self.free = capacity
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = 0

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        """Hold one place while the block runs."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
        else:
            self._seq += 1
            waiter = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (priority, self._seq, waiter))
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # the place was handed over just now: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)  # the place goes straight to the waiter
                return
        self.free += 1


# -- one buyer ----------------------------------------------------------------------------


@dataclass
class Purchase:
    """What one buyer got, as far as the runner could see."""

    kill_order_no: str | None = None
    order_no: str | None = None
    #: "kill" (after the seckill), "order" (after placing the order) or None.
    abandoned: str | None = None
    #: The cashier accepted the payment.
    paid_at_cashier: bool = False
    #: The last status seen: the order's, else the kill order's.
    status: str | None = None


class Runner:
    """One flash sale against the shop at ``url`` (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        buyers: int,
        stock: int,
        admin_password: str,
        abandon_kill: float = 0.1,
        abandon_order: float = 0.1,
        connections: int = 100,
        retries: int = 5,
        settle_seconds: float = 120.0,
        seed: int | None = None,
        progress: Callable[[str], None] | None = None,
        database_url: str | None = None,
        token_secret: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if buyers < 1 or stock < 1:
            raise ValueError("buyers and stock must be at least 1")
        if not (0 <= abandon_kill <= 1 and 0 <= abandon_order <= 1):
            raise ValueError("abandon shares must lie between 0 and 1")
        self.url = url.rstrip("/")
        self.buyers = buyers
        self.stock = stock
        self.admin_password = admin_password
        self.abandon_kill = abandon_kill
        self.abandon_order = abandon_order
        self.connections = connections
        self.retries = retries
        self.settle_seconds = settle_seconds
        self.random = random.Random(seed)
        self.progress = progress
        self.database_url = database_url
        self.token_secret = token_secret
        #: httpx's transport (tests pass an ``ASGITransport`` to run the shop in process).
        self.transport = transport
        self.steps: dict[str, StepStats] = {s: StepStats() for s in ("setup", "activity", *STEPS)}
        self.purchases: list[Purchase] = []
        self.done = 0
        self.sold = 0
        self.kill_course_id = 0
        self.activity_id = 0
        self.client: httpx.AsyncClient | None = None
        #: At most ``connections`` requests in flight: the rest wait here, not in httpx's
        #: pool (whose queue of waiters gets slow when it holds thousands), and a winner's
        #: next step goes before the crowd still pressing "buy" (else, on a slow machine,
        #: winners queue behind the crowd until their kill orders expire, the units come
        #: back, more winners queue...).
        self._gate = PriorityGate(connections)

    # -- HTTP --

    async def call(
        self, step: str, method: str, path: str, *, retry: bool = True, **kwargs: Any
    ) -> httpx.Response | None:
        """One request of ``step``, measured; retried on 429/5xx-unavailable/network errors.

        Returns the last answer, or None when the network failed every attempt.
        """
        assert self.client is not None
        attempts = self.retries + 1 if retry else 1
        response: httpx.Response | None = None
        for attempt in range(attempts):
            started = time.perf_counter()
            try:
                async with self._gate.slot(_PRIORITY.get(step, 0)):
                    started = time.perf_counter()
                    response = await self.client.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                self.steps[step].record(
                    f"error {type(exc).__name__}", time.perf_counter() - started
                )
                response = None
            else:
                self.steps[step].record(_label(response), time.perf_counter() - started)
                if response.status_code not in RETRY_STATUSES:
                    return response
            if attempt + 1 < attempts:
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + self.random.random()))
        return response

    # -- set-up --

    async def login_admin(self) -> dict[str, str]:
        """The admin's auth header."""
        assert self.client is not None
        response = await self.client.post(
            "/auth/login", json={"username": "admin", "password": self.admin_password}
        )
        if response.status_code != 200:
            raise FlashSaleError(f"the admin cannot log in: {response.status_code} {response.text}")
        return {"Authorization": f"Bearer {response.json()['token']}"}

    async def create_sale(self, admin: dict[str, str]) -> None:
        """A course, an ongoing activity with ``stock`` units, published."""
        assert self.client is not None
        course = await self.client.post(
            "/admin/courses",
            json={"name": f"Flash sale course {uuid.uuid4().hex[:6]}", "price": "199.00"},
            headers=admin,
        )
        if course.status_code != 201:
            raise FlashSaleError(f"creating the course failed: {course.text}")
        start = datetime.now(UTC) - timedelta(minutes=1)
        activity = await self.client.post(
            "/admin/activities",
            json={
                "name": "Flash sale",
                "start_time": start.isoformat(),
                "end_time": (start + timedelta(hours=2)).isoformat(),
                "courses": [
                    {
                        "course_id": course.json()["course_id"],
                        "kill_price": "9.90",
                        "kill_count": self.stock,
                        "kill_limit": 1,
                    }
                ],
            },
            headers=admin,
        )
        if activity.status_code != 201:
            raise FlashSaleError(f"creating the activity failed: {activity.text}")
        body = activity.json()
        self.activity_id = int(body["activity_id"])
        self.kill_course_id = int(body["courses"][0]["kill_course_id"])
        published = await self.client.post(
            f"/admin/activities/{self.activity_id}/publish", headers=admin
        )
        if published.status_code != 200:
            raise FlashSaleError(f"publishing the activity failed: {published.text}")

    async def make_buyers(self) -> list[dict[str, str]]:
        """``buyers`` auth headers: straight in the database when possible, else over HTTP."""
        if self.database_url and self.token_secret:
            return await buyers_in_database(self.database_url, self.token_secret, self.buyers)
        return await self._register_buyers()

    async def _register_buyers(self) -> list[dict[str, str]]:
        run = uuid.uuid4().hex[:8]
        password = secrets.token_urlsafe(12)
        gate = asyncio.Semaphore(8)  # hashing is slow on purpose: do not flood it

        async def one(i: int) -> dict[str, str]:
            name = f"buyer-{run}-{i}"
            async with gate:
                for path in ("/auth/register", "/auth/login"):
                    response = await self.call(
                        "setup", "POST", path, json={"username": name, "password": password}
                    )
                    if response is None or response.status_code not in (200, 201):
                        raise FlashSaleError(f"{path} for {name} failed")
            assert response is not None
            return {"Authorization": f"Bearer {response.json()['token']}"}

        return list(await asyncio.gather(*(one(i) for i in range(self.buyers))))

    # -- the journey --

    async def buyer(self, headers: dict[str, str]) -> None:
        """One buyer: seckill, then (unless abandoning) token, order, pay, cashier, wait."""
        purchase = Purchase()
        self.purchases.append(purchase)
        try:
            await self._journey(purchase, headers)
        finally:
            self.done += 1

    async def _journey(self, purchase: Purchase, headers: dict[str, str]) -> None:
        kill = await self.call("seckill", "POST", f"/kill/{self.kill_course_id}", headers=headers)
        if kill is None or kill.status_code != 200:
            return
        self.sold += 1
        kill_order_no = str(kill.json()["kill_order_no"])
        purchase.kill_order_no = kill_order_no
        roll = self.random.random()
        if roll < self.abandon_kill:
            purchase.abandoned = "kill"
            return
        order_no = await self._place_order(kill_order_no, headers)
        if order_no is None:
            return
        purchase.order_no = order_no
        if roll < self.abandon_kill + self.abandon_order:
            purchase.abandoned = "order"
            return
        purchase.paid_at_cashier = await self._pay(order_no, headers)

    async def _place_order(self, kill_order_no: str, headers: dict[str, str]) -> str | None:
        for _ in range(self.retries + 1):
            token = await self.call(
                "submit_token",
                "GET",
                "/orders/submit-token",
                params={"kill_order_no": kill_order_no},
                headers=headers,
            )
            if token is None or token.status_code != 200:
                return None
            # Not retried as such: a retry needs a fresh token (the first one may be spent).
            order = await self.call(
                "order",
                "POST",
                "/orders",
                retry=False,
                json={"kill_order_no": kill_order_no, "pay_type": "alipay"},
                headers={**headers, "X-Submit-Token": token.json()["token"]},
            )
            if order is not None and order.status_code == 201:
                return str(order.json()["order_no"])
            if order is not None and order.status_code not in RETRY_STATUSES:
                return None  # e.g. 409: the lost answer of an earlier try placed it
            await asyncio.sleep(0.2 + self.random.random() * 0.3)
        return None

    async def _pay(self, order_no: str, headers: dict[str, str]) -> bool:
        pay = await self.call(
            "pay",
            "POST",
            f"/pay/{order_no}",
            headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
        )
        if pay is None or pay.status_code != 200:
            return False
        pay_url = str(pay.json()["pay_url"])
        cashier = await self.call(
            "cashier",
            "POST",
            pay_url,
            data={"action": "pay"},
            follow_redirects=False,
        )
        if cashier is None:
            return False
        if 300 <= cashier.status_code < 400 or cashier.status_code == 200:
            return True
        if cashier.status_code == 409:
            # Already paid (an earlier attempt's answer was lost) or closed by the timeout.
            status = await self._status("order_status", f"/orders/{order_no}", headers)
            return status == "PAID"
        return False

    async def _status(self, step: str, path: str, headers: dict[str, str]) -> str | None:
        response = await self.call(step, "GET", path, headers=headers)
        if response is None or response.status_code != 200:
            return None
        return str(response.json().get("status"))

    # -- settling --

    async def settle(self, headers_of: Mapping[int, dict[str, str]]) -> float:
        """Wait until every known purchase is final and the stock adds up; seconds waited."""
        started = time.monotonic()
        deadline = started + self.settle_seconds
        open_ = [i for i, p in enumerate(self.purchases) if p.kill_order_no is not None]
        while True:
            still: list[int] = []
            for chunk in _chunks(open_, self.connections):
                statuses = await asyncio.gather(
                    *(self._final_status(self.purchases[i], headers_of[i]) for i in chunk)
                )
                still += [i for i, final in zip(chunk, statuses, strict=True) if not final]
            open_ = still
            stock_left = await self.stock_left()
            paid = sum(p.status == "PAID" for p in self.purchases)
            if not open_ and stock_left is not None and stock_left + paid == self.stock:
                break
            if time.monotonic() >= deadline:
                break
            self._say(f"settling: {len(open_)} purchases open, stock left {stock_left}")
            await asyncio.sleep(1.0)
        return time.monotonic() - started

    async def _final_status(self, purchase: Purchase, headers: dict[str, str]) -> bool:
        if purchase.order_no is not None:
            status = await self._status("order_status", f"/orders/{purchase.order_no}", headers)
            purchase.status = status or purchase.status
            return status in ORDER_FINAL
        status = await self._status(
            "kill_status", f"/kill/orders/{purchase.kill_order_no}", headers
        )
        purchase.status = status or purchase.status
        # ORDERED without an order the runner knows: its order's answer was lost; that order
        # times out, and the kill order becomes CANCELLED.
        return status in KILL_ORDER_FINAL

    async def stock_left(self) -> int | None:
        """Units left, as ``GET /activities/{id}`` says."""
        response = await self.call("activity", "GET", f"/activities/{self.activity_id}")
        if response is None or response.status_code != 200:
            return None
        return int(response.json()["courses"][0]["stock_left"])

    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    # -- the whole run --

    async def run(self) -> dict[str, Any]:
        """Set up, run the sale, settle; the report (see :func:`format_report`)."""
        limits = httpx.Limits(
            max_connections=self.connections, max_keepalive_connections=self.connections
        )
        timeout = httpx.Timeout(30.0, pool=None)  # waiting for a pooled connection is a queue
        async with httpx.AsyncClient(
            base_url=self.url, limits=limits, timeout=timeout, transport=self.transport
        ) as client:
            self.client = client
            await self.create_sale(await self.login_admin())
            headers = await self.make_buyers()
            self._say(f"{self.buyers} buyers ready; activity {self.activity_id} on sale")
            started = time.perf_counter()
            ticker = asyncio.create_task(self._tick())
            try:
                await asyncio.gather(*(self.buyer(h) for h in headers))
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            sale_seconds = time.perf_counter() - started
            self._bar(final=True)
            settle_seconds = await self.settle(dict(enumerate(headers)))
            stock_left = await self.stock_left()
        self.client = None
        return self.report(sale_seconds, settle_seconds, stock_left)

    async def _tick(self) -> None:
        while True:
            self._bar()
            await asyncio.sleep(0.25)

    def _bar(self, final: bool = False) -> None:
        if self.progress is None:
            return
        width = 30
        filled = int(width * self.done / self.buyers)
        self.progress(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.buyers} buyers, "
            f"{self.sold} sold" + ("\n" if final else "")
        )

    def report(
        self, sale_seconds: float, settle_seconds: float, stock_left: int | None
    ) -> dict[str, Any]:
        """The run's figures as a JSON-ready dict."""
        statuses = Counter(p.status for p in self.purchases if p.kill_order_no is not None)
        paid = statuses["PAID"]
        timed_out_orders = statuses["TIMEOUT_CANCEL"] + statuses["REFUNDED"]
        expired = statuses["EXPIRED"] + statuses["CANCELLED"]
        unsettled = sum(
            1
            for p in self.purchases
            if p.kill_order_no is not None and p.status not in ORDER_FINAL | KILL_ORDER_FINAL
        )
        requests = sum(sum(s.statuses.values()) for s in self.steps.values())
        sale_requests = sum(
            sum(self.steps[s].statuses.values())
            for s in ("seckill", "submit_token", "order", "pay", "cashier")
        )
        return {
            "url": self.url,
            "buyers": self.buyers,
            "stock": self.stock,
            "activity_id": self.activity_id,
            "kill_course_id": self.kill_course_id,
            "steps": {name: s.summary() for name, s in self.steps.items() if s.statuses},
            "sold": self.sold,
            "ordered": sum(p.order_no is not None for p in self.purchases),
            "abandoned_after_seckill": sum(p.abandoned == "kill" for p in self.purchases),
            "abandoned_after_order": sum(p.abandoned == "order" for p in self.purchases),
            "paid_at_cashier": sum(p.paid_at_cashier for p in self.purchases),
            "paid": paid,
            "timed_out": {"orders": timed_out_orders, "kill_orders": expired},
            "refunded": statuses["REFUNDED"],
            "unsettled": unsettled,
            "oversold": max(0, paid - self.stock),
            "stock_left": stock_left,
            "stock_conserved": stock_left is not None and stock_left + paid == self.stock,
            "paid_orders": sorted(
                p.order_no for p in self.purchases if p.status == "PAID" and p.order_no
            ),
            "cashier_paid_orders": sorted(
                p.order_no for p in self.purchases if p.paid_at_cashier and p.order_no
            ),
            "sale_seconds": round(sale_seconds, 2),
            "settle_seconds": round(settle_seconds, 2),
            "requests": requests,
            "throughput_rps": round(sale_requests / sale_seconds, 1) if sale_seconds else None,
            "seckill_rps": round(sum(self.steps["seckill"].statuses.values()) / sale_seconds, 1)
            if sale_seconds
            else None,
        }


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + size]


async def buyers_in_database(
    database_url: str, token_secret: str, count: int
) -> list[dict[str, str]]:
    """``count`` new users inserted straight into the shop's database (one password hash for
    all), with bearer tokens signed by the shop's secret."""
    from sqlalchemy import insert, select

    from .accounts import Principal, TokenCodec, hash_password
    from .db import make_engine
    from .models import User

    engine = make_engine(database_url)
    try:
        password_hash = await hash_password(secrets.token_urlsafe(12))
        run = uuid.uuid4().hex[:8]
        names = [f"buyer-{run}-{i}" for i in range(count)]
        async with engine.begin() as conn:
            await conn.execute(
                insert(User),
                [{"username": n, "password_hash": password_hash, "is_admin": False} for n in names],
            )
            rows = (
                await conn.execute(
                    select(User.id, User.username).where(User.username.like(f"buyer-{run}-%"))
                )
            ).all()
    finally:
        await engine.dispose()
    codec = TokenCodec(token_secret)
    return [
        {"Authorization": f"Bearer {codec.issue(Principal(int(r.id), r.username, False))}"}
        for r in rows
    ]


# -- a shop of its own --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: The timeouts of the shop the runner starts: short, so that abandoned purchases time out
#: while the runner waits.
OWN_SHOP_ENV = {
    "KILL_ORDER_TIMEOUT_SECONDS": "15",
    "ORDER_PAY_TIMEOUT_SECONDS": "20",
    "SWEEPER_INTERVAL_SECONDS": "1",
    "DEMO_CLAIM_IDLE_SECONDS": "3",
    "ALIPAY_NOTIFY_DELAYS": "0,1,2,5,10",
}


@contextlib.asynccontextmanager
async def own_shop(workers: int = 1, start_timeout: float = 120.0) -> AsyncIterator[dict[str, str]]:
    """``python -m demo_service`` in a temporary directory (SQLite, embedded Redis); yields
    ``{"url", "admin_password", "database_url", "token_secret"}`` and stops it afterwards."""
    with tempfile.TemporaryDirectory(prefix="flash-sale-") as tmp:
        port = _free_port()
        info = {
            "url": f"http://127.0.0.1:{port}",
            "admin_password": "admin-" + secrets.token_urlsafe(12),
            "database_url": f"sqlite+aiosqlite:///{Path(tmp) / 'var' / 'demo.db'}",
            "token_secret": secrets.token_urlsafe(48),
        }
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("REDIS_URL", "YMGUARD_STORAGE", "YMGUARD_KEY_PREFIX", "YMGUARD_RULES")
        }
        env.update(OWN_SHOP_ENV)
        env.update(
            HOST="127.0.0.1",
            PORT=str(port),
            WORKERS=str(workers),
            DATABASE_URL=info["database_url"],
            DEMO_ADMIN_PASSWORD=info["admin_password"],
            DEMO_TOKEN_SECRET=info["token_secret"],
        )
        log_path = Path(tmp) / "shop.log"
        proc = await asyncio.to_thread(_spawn_shop, tmp, env, log_path)
        try:
            await _wait_healthy(info["url"], proc, start_timeout)
            yield info
        except FlashSaleError:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise FlashSaleError(f"the shop did not start:\n{tail}") from None
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait)


def _spawn_shop(cwd: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "demo_service"],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _wait_healthy(url: str, proc: subprocess.Popen[bytes], within: float) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FlashSaleError(f"the shop exited with status {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url + "/health")).status_code == 200:
                    return
            await asyncio.sleep(0.3)
    raise FlashSaleError(f"the shop did not answer /health within {within:.0f} s")


# -- the report -----------------------------------------------------------------------------


def format_report(report: Mapping[str, Any]) -> str:
    """The report as text for a person."""
    lines = [
        f"Flash sale: {report['buyers']} buyers, stock {report['stock']} "
        f"(activity {report['activity_id']}, kill course {report['kill_course_id']}, "
        f"{report['url']})",
        "",
        f"{'step':<14}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}  statuses",
    ]
    for name, step in report["steps"].items():
        statuses = ", ".join(f"{k}: {v}" for k, v in step["statuses"].items())
        lines.append(
            f"{name:<14}{step['requests']:>9}{_num(step['p50_ms']):>9}{_num(step['p99_ms']):>9}"
            f"  {statuses}"
        )
    timed_out = report["timed_out"]
    lines += [
        "",
        f"sold (seckill 200)     {report['sold']}",
        f"ordered                {report['ordered']}",
        f"abandoned              {report['abandoned_after_seckill']} after the seckill, "
        f"{report['abandoned_after_order']} after the order",
        f"paid                   {report['paid']}",
        f"timed out              {timed_out['orders']} orders (payment timeout), "
        f"{timed_out['kill_orders']} kill orders (never ordered: expired)",
        f"unsettled              {report['unsettled']}",
        f"oversold               {report['oversold']}",
        f"stock                  {report['stock_left']} left + {report['paid']} paid = "
        f"{(report['stock_left'] or 0) + report['paid']} of {report['stock']}: "
        + ("conserved" if report["stock_conserved"] else "NOT CONSERVED"),
        f"sale                   {report['sale_seconds']} s, {report['throughput_rps']} req/s "
        f"({report['seckill_rps']} seckill req/s); settled in {report['settle_seconds']} s",
    ]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# -- the command line -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m demo_service.flash_sale",
        description="Run a whole flash sale through the demo shop's public API and report.",
    )
    parser.add_argument("--buyers", type=int, required=True, help="concurrent buyers")
    parser.add_argument("--stock", type=int, required=True, help="units on sale")
    parser.add_argument("--url", help="a running shop (default: start one of its own)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--admin-password", help="the running shop's admin password (or DEMO_ADMIN_PASSWORD)"
    )
    parser.add_argument("--workers", type=int, default=1, help="workers of the shop it starts")
    parser.add_argument(
        "--abandon-kill", type=float, default=0.1, help="share of winners who never order"
    )
    parser.add_argument(
        "--abandon-order", type=float, default=0.1, help="share of winners who never pay"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=100,
        help="requests in flight at once (a buyer's later steps go before the crowd's seckill)",
    )
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=120.0,
        help="longest wait for purchases to be paid, cancelled or expired",
    )
    parser.add_argument("--seed", type=int, help="seed of who abandons (repeatable runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if args.buyers < 1 or args.stock < 1:
        parser.error("--buyers and --stock must be at least 1")
    if args.connections < 1:
        parser.error("--connections must be at least 1")
    return args


_last_line = [0.0]


def _stderr(text: str) -> None:
    if not text.startswith("\r"):
        text += "\n"
    elif not sys.stderr.isatty():
        # A log file gets a line every few seconds, not hundreds of carriage returns.
        now = time.monotonic()
        if not text.endswith("\n") and now - _last_line[0] < 5.0:
            return
        _last_line[0] = now
        text = text[1:].rstrip("\n") + "\n"
    sys.stderr.write(text)
    sys.stderr.flush()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the flash sale the arguments describe; the report."""
    progress = None if args.quiet else _stderr

    async def against(info: Mapping[str, str | None]) -> dict[str, Any]:
        password = info.get("admin_password")
        if not password:
            raise FlashSaleError("--admin-password (or DEMO_ADMIN_PASSWORD) is required with --url")
        runner = Runner(
            str(info["url"]),
            buyers=args.buyers,
            stock=args.stock,
            admin_password=password,
            abandon_kill=args.abandon_kill,
            abandon_order=args.abandon_order,
            connections=args.connections,
            settle_seconds=args.settle_seconds,
            seed=args.seed,
            progress=progress,
            database_url=info.get("database_url"),
            token_secret=info.get("token_secret"),
        )
        return await runner.run()

    if args.url:
        return await against(
            {
                "url": args.url,
                "admin_password": args.admin_password or os.environ.get("DEMO_ADMIN_PASSWORD"),
                "database_url": os.environ.get("DATABASE_URL"),
                "token_secret": os.environ.get("DEMO_TOKEN_SECRET"),
            }
        )
    if progress is not None:
        progress(f"starting a shop of its own ({args.workers} worker(s))...")
    async with own_shop(args.workers) as info:
        return await against(info)


def main(argv: list[str] | None = None) -> int:
    """Run and print the report; 0 when nothing was oversold and the stock adds up."""
    args = parse_args(argv)
    try:
        report = asyncio.run(run(args))
    except (FlashSaleError, ValueError) as exc:
        print(f"flash_sale: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"flash_sale: the shop does not answer: {exc!r}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["oversold"] == 0 and report["stock_conserved"] else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "OWN_SHOP_ENV",
    "STEPS",
    "FlashSaleError",
    "PriorityGate",
    "Purchase",
    "Runner",
    "StepStats",
    "buyers_in_database",
    "format_report",
    "main",
    "own_shop",
    "parse_args",
    "percentile",
    "run",
]
