"""Payment timeout, kill-order expiry, stock returns, and the sweeper behind them.

- ``order.check-payment`` (delayed to ``ORDER_PAY_TIMEOUT_SECONDS``): close the trade at
  Alipay first; if the close fails because the trade is paid, the order is left to the
  notify. Otherwise a conditional update moves the order TO_PAY → TIMEOUT_CANCEL (so a
  payment that won keeps it PAID), cancels its kill order and writes a ``stock.return``
  message, all in one transaction.
- ``kill-order.check`` (delayed to ``KILL_ORDER_TIMEOUT_SECONDS``): a kill order still
  CREATED (no order placed) becomes EXPIRED and writes a ``stock.return`` message.
- ``stock.return``: gives the unit and the buyer's count back in Redis with
  :func:`demo_service.seckill.return_stock`, ONE script that also records the kill order
  number in the course's ``returned`` hash: a redelivered message (say, after a crash
  between the script and the commit) finds it and returns nothing, so each purchase comes
  back exactly once.
- The sweeper (every ``SWEEPER_INTERVAL_SECONDS``, one process at a time under a Redis
  lock) does the same for orders and kill orders whose delayed message was lost (the
  seed's XXL-Job fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

from fastapi import FastAPI
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from . import messaging
from .alipay_client import is_success
from .messaging import Message, enqueue
from .models import KillOrder, KillOrderStatus, Order, OrderStatus, PayOrder, PayStatus, utcnow
from .orders import CHECK_PAYMENT, KILL_ORDER_CHECK, STOCK_RETURN
from .seckill import NOT_PUBLISHED, return_stock

log = logging.getLogger("demo_service.timeouts")

#: Rows one sweep handles at most (the next sweep takes the rest).
SWEEP_BATCH = 100

_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


async def _kill_order_gone(session: AsyncSession, kill_order_no: str, status: str) -> None:
    """Move the kill order to ``status`` and announce its stock return (same transaction)."""
    kill = await session.scalar(select(KillOrder).where(KillOrder.kill_order_no == kill_order_no))
    if kill is None:
        return
    kill.status = status
    enqueue(
        session,
        STOCK_RETURN,
        {
            "kill_order_no": kill.kill_order_no,
            "kill_course_id": kill.kill_course_id,
            "user_id": kill.user_id,
        },
    )


async def cancel_unpaid(app: Any, order_no: str) -> str:
    """The payment timeout of one order; returns its status afterwards."""
    sessions: async_sessionmaker[AsyncSession] = app.state.sessionmaker
    async with sessions() as session:
        order = await session.scalar(select(Order).where(Order.order_no == order_no))
        pay = await session.scalar(select(PayOrder).where(PayOrder.order_no == order_no))
    if order is None:
        raise LookupError(f"order {order_no} not found")
    if order.status != OrderStatus.TO_PAY.value:
        return order.status
    if pay is not None:
        # Close first: once closed, the trade can no longer be paid, so cancelling the
        # order after it cannot lose a payment. A paid trade refuses to close.
        answer = await app.state.alipay_close(out_trade_no=order_no)
        if not is_success(answer):
            sub_code = answer.get("sub_code")
            if sub_code == "ACQ.TRADE_STATUS_ERROR":
                trade = await app.state.alipay_query(out_trade_no=order_no)
                if trade.get("trade_status") in ("TRADE_SUCCESS", "TRADE_FINISHED"):
                    return OrderStatus.TO_PAY.value  # paid: the notify settles it
            elif sub_code != "ACQ.TRADE_NOT_EXIST":
                raise RuntimeError(f"closing trade {order_no} failed: {answer}")
    async with sessions() as session, session.begin():
        moved = await session.execute(
            update(Order)
            .where(Order.order_no == order_no, Order.status == OrderStatus.TO_PAY.value)
            .values(status=OrderStatus.TIMEOUT_CANCEL.value)
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            return (
                await session.scalar(select(Order.status).where(Order.order_no == order_no))
            ) or ""
        await session.execute(
            update(PayOrder)
            .where(PayOrder.order_no == order_no, PayOrder.status == PayStatus.TO_PAY.value)
            .values(status=PayStatus.CLOSED.value)
        )
        if order.kill_order_no is not None:
            await _kill_order_gone(session, order.kill_order_no, KillOrderStatus.CANCELLED.value)
    messaging.relay_of(app).wake()
    return OrderStatus.TIMEOUT_CANCEL.value


async def expire_kill_order(session: AsyncSession, kill_order_no: str) -> bool:
    """Expire a kill order still CREATED past its ``expires_at``; True if it did."""
    moved = await session.execute(
        update(KillOrder)
        .where(
            KillOrder.kill_order_no == kill_order_no,
            KillOrder.status == KillOrderStatus.CREATED.value,
            KillOrder.expires_at <= utcnow(),
        )
        .values(status=KillOrderStatus.EXPIRED.value)
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        return False
    await _kill_order_gone(session, kill_order_no, KillOrderStatus.EXPIRED.value)
    return True


async def sweep(app: Any) -> int:
    """One sweep: overdue unpaid orders and kill orders; returns how many were handled."""
    sessions: async_sessionmaker[AsyncSession] = app.state.sessionmaker
    now = utcnow()
    async with sessions() as session:
        order_nos = (
            await session.scalars(
                select(Order.order_no)
                .where(Order.status == OrderStatus.TO_PAY.value, Order.expires_at <= now)
                .order_by(Order.expires_at)
                .limit(SWEEP_BATCH)
            )
        ).all()
        kill_nos = (
            await session.scalars(
                select(KillOrder.kill_order_no)
                .where(
                    KillOrder.status == KillOrderStatus.CREATED.value,
                    KillOrder.expires_at <= now,
                )
                .limit(SWEEP_BATCH)
            )
        ).all()
    handled = 0
    for order_no in order_nos:
        try:
            if await cancel_unpaid(app, order_no) == OrderStatus.TIMEOUT_CANCEL.value:
                handled += 1
        except Exception as exc:
            log.warning("sweeper: order %s not cancelled yet: %r", order_no, exc)
    for kill_order_no in kill_nos:
        async with sessions() as session, session.begin():
            handled += await expire_kill_order(session, kill_order_no)
    if handled:
        messaging.relay_of(app).wake()
    return handled


async def run_sweeper(app: Any) -> None:
    """Sweep every ``SWEEPER_INTERVAL_SECONDS``; one process at a time (a Redis lock)."""
    settings = app.state.settings
    redis: Redis = app.state.redis
    lock = f"{settings.redis_prefix}:sweeper-lock"
    unlock = redis.register_script(_UNLOCK_LUA)
    interval = float(settings.sweeper_interval_seconds)
    while True:
        messaging.raise_if_cancelled()
        await asyncio.sleep(interval)
        token = secrets.token_hex(8)
        try:
            # The lock outlives a sweep so a second process skips this round entirely.
            if not await redis.set(lock, token, nx=True, px=max(1000, int(interval * 900))):
                continue
            try:
                await sweep(app)
            finally:
                with contextlib.suppress(RedisError):
                    await unlock(keys=[lock], args=[token])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sweeper failed; retrying next round")


def handlers(app: Any) -> dict[str, tuple[messaging.Prepare | None, messaging.Handler]]:
    """The consumers of this module: topic → (prepare, handler)."""
    prefix = app.state.settings.redis_prefix

    async def check_payment(message: Message) -> None:
        await cancel_unpaid(app, message.payload["order_no"])

    async def nothing(session: AsyncSession, message: Message) -> None:
        return None

    async def kill_order_check(session: AsyncSession, message: Message) -> None:
        await expire_kill_order(session, message.payload["kill_order_no"])

    async def stock_return(session: AsyncSession, message: Message) -> None:
        result = await return_stock(
            app.state.redis,
            int(message.payload["kill_course_id"]),
            int(message.payload["user_id"]),
            str(message.payload["kill_order_no"]),
            prefix=prefix,
        )
        if result == NOT_PUBLISHED:
            raise RuntimeError("the kill course is not in Redis (not published?)")

    return {
        CHECK_PAYMENT: (check_payment, nothing),
        KILL_ORDER_CHECK: (None, kill_order_check),
        STOCK_RETURN: (None, stock_return),
    }


async def start(app: FastAPI) -> None:
    """Start the timeout consumers and the sweeper of this process."""
    workers = messaging.workers_of(app)
    for topic, (prepare, handler) in handlers(app).items():
        group = "timeouts-" + topic.replace(".", "-")
        consumer = messaging.consumer_for(app, group, topic, handler, prepare=prepare)
        workers.spawn(consumer.run(), f"consumer:{group}")
    workers.spawn(run_sweeper(app), "sweeper")


__all__ = [
    "cancel_unpaid",
    "expire_kill_order",
    "handlers",
    "run_sweeper",
    "start",
    "sweep",
]
