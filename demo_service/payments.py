"""Payments: the pay order, the cashier page, Alipay's async notify, and what follows it.

- A pay order per order, created idempotently (``order_no`` is unique) by the
  ``order.created`` consumer, or by ``POST /pay/{order_no}`` if that comes first.
- ``POST /pay/{order_no}`` asks Alipay (the sandbox) for a cashier page through
  ``@guard.resource("alipay.page_pay")``: its breaker answers 503 at once while the
  provider is failing, instead of piling requests up behind it.
- ``POST /pay/notify/alipay`` believes nothing until the RSA2 signature, ``app_id``,
  ``out_trade_no`` and ``total_amount`` check out; then ONE transaction moves the pay order
  to PAID with a conditional update, writes the pay flow and a ``pay.finished`` message.
  A duplicate notify finds the pay order PAID and only answers ``success``.
- The ``pay.finished`` consumer marks the order PAID and grants its courses; if the
  payment timeout cancelled the order first, the money is refunded (once, by
  ``out_request_no``) and the pay order becomes REFUNDED.
"""

from __future__ import annotations

import secrets
import time
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from . import messaging
from .accounts import CurrentUser
from .alipay_client import AlipayClient, is_success
from .alipay_sign import load_or_create_keys
from .errors import InvalidRequest, NotFound, ServiceUnavailable
from .forms import read_form
from .messaging import Message, enqueue
from .models import FlowKind, Order, OrderStatus, PayFlow, PayOrder, PayStatus, utcnow
from .openapi import problems
from .orders import ORDER_CREATED, PAY_FINISHED, grant_paid_order

SUCCESS = "success"
#: A notify is a few hundred bytes; anything far larger is not Alipay's.
MAX_NOTIFY_BYTES = 64 * 1024
FAILURE = "failure"

router = APIRouter(tags=["payments"], responses=problems(400, 401, 404, 409, 422, 429, 503))


class RetryLater(Exception):
    """A consumer met a state another process is still changing; the message is retried."""


def new_pay_order_no() -> str:
    """A unique, unguessable pay order number."""
    return f"P{int(time.time() * 1000):013d}{secrets.token_hex(6)}"


def _money(value: Decimal) -> str:
    return f"{value:.2f}"


#: The made-up origin of the in-process client: URLs the sandbox answers with it are moved
#: to the origin the caller used (a browser cannot reach ``http://shop``).
IN_PROCESS_BASE = "http://shop"


def public_url(url: str, base: str) -> str:
    """``url`` as the caller can reach it: the in-process origin replaced by ``base``."""
    if url.startswith(IN_PROCESS_BASE + "/"):
        return base + url[len(IN_PROCESS_BASE) :]
    return url


def alipay_client(app: Any) -> AlipayClient:
    """The shop's Alipay client (``app.state.alipay_client``), made on first use.

    Unless something else set one, it talks to the sandbox mounted in this very app,
    in process (no socket), with the keys under ``ALIPAY_KEYS_DIR`` (``var/alipay``).
    """
    client: AlipayClient | None = getattr(app.state, "alipay_client", None)
    if client is None:
        settings = app.state.settings
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=IN_PROCESS_BASE, timeout=10.0
        )
        app.state.alipay_http = http
        client = AlipayClient(
            f"{IN_PROCESS_BASE}/sandbox/alipay/gateway.do",
            settings.alipay_app_id,
            load_or_create_keys(settings.alipay_keys_path),
            http,
        )
        app.state.alipay_client = client
    return client


async def ensure_pay_order(session: AsyncSession, order_no: str, amount: Decimal) -> PayOrder:
    """The pay order of ``order_no``, created (TO_PAY) if missing; safe when raced."""
    pay = await session.scalar(select(PayOrder).where(PayOrder.order_no == order_no))
    if pay is not None:
        return pay
    try:
        async with session.begin_nested():
            pay = PayOrder(
                pay_order_no=new_pay_order_no(),
                order_no=order_no,
                amount=amount,
                status=PayStatus.TO_PAY.value,
                created_at=utcnow(),
            )
            session.add(pay)
    except IntegrityError:
        pay = await session.scalar(select(PayOrder).where(PayOrder.order_no == order_no))
        if pay is None:
            raise
    return pay


@router.post("/pay/{order_no}")
async def pay(order_no: str, request: Request, user: CurrentUser) -> dict[str, Any]:
    """The cashier page of the caller's unpaid order: ``{"pay_url", "pay_order_no"}``."""
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with sessions() as session, session.begin():
        order = await session.scalar(select(Order).where(Order.order_no == order_no))
        if order is None or order.user_id != user.id:
            raise NotFound("no such order")
        if order.status != OrderStatus.TO_PAY.value:
            raise InvalidRequest(f"the order is {order.status}, not TO_PAY")
        pay_order = await ensure_pay_order(session, order.order_no, order.amount)
    base = str(request.base_url).rstrip("/")
    page_pay = request.app.state.alipay_page_pay
    pay_url = await page_pay(
        out_trade_no=order.order_no,
        total_amount=_money(order.amount),
        subject=f"ymguard demo order {order.order_no}",
        notify_url=f"{base}/pay/notify/alipay",
        return_url=f"{base}/orders/{order.order_no}",
    )
    return {"pay_url": public_url(pay_url, base), "pay_order_no": pay_order.pay_order_no}


def _amount(raw: str | None) -> Decimal | None:
    try:
        value = Decimal(raw or "")
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


@router.post("/pay/notify/alipay", response_class=PlainTextResponse)
async def notify(request: Request) -> PlainTextResponse:
    """Alipay's async notify: ``success`` when accepted or already handled."""
    form = await read_form(request, MAX_NOTIFY_BYTES)
    client = alipay_client(request.app)
    if form is None or not client.verify_notify(form):
        return PlainTextResponse(FAILURE)
    if form.get("trade_status") not in ("TRADE_SUCCESS", "TRADE_FINISHED"):
        return PlainTextResponse(SUCCESS)  # e.g. TRADE_CLOSED: nothing for the shop to do
    order_no = form.get("out_trade_no", "")
    amount = _amount(form.get("total_amount"))
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with sessions() as session, session.begin():
        order = await session.scalar(select(Order).where(Order.order_no == order_no))
        if order is None or amount is None or amount != order.amount:
            return PlainTextResponse(FAILURE)
        pay_order = await ensure_pay_order(session, order.order_no, order.amount)
        if pay_order.amount != amount:
            return PlainTextResponse(FAILURE)
        moved = await session.execute(
            update(PayOrder)
            .where(
                PayOrder.id == pay_order.id,
                PayOrder.status.in_([PayStatus.TO_PAY.value, PayStatus.CLOSED.value]),
            )
            .values(status=PayStatus.PAID.value, trade_no=form.get("trade_no"), paid_at=utcnow())
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            return PlainTextResponse(SUCCESS)  # a duplicate: the first one did it all
        session.add(
            PayFlow(
                pay_order_no=pay_order.pay_order_no,
                trade_no=form.get("trade_no"),
                notify_id=form.get("notify_id"),
                amount=amount,
                kind=FlowKind.PAY.value,
                created_at=utcnow(),
            )
        )
        enqueue(
            session,
            PAY_FINISHED,
            {
                "order_no": order.order_no,
                "pay_order_no": pay_order.pay_order_no,
                "amount": _money(amount),
                "trade_no": form.get("trade_no", ""),
            },
        )
    messaging.relay_of(request.app).wake()
    return PlainTextResponse(SUCCESS)


# -- consumers -------------------------------------------------------------------------


async def create_pay_order(session: AsyncSession, message: Message) -> None:
    """``order.created``: the order's pay order (TO_PAY), once."""
    await ensure_pay_order(session, message.payload["order_no"], Decimal(message.payload["amount"]))


def refund_request_no(pay_order_no: str) -> str:
    """The ``out_request_no`` of the one refund a pay order may get (idempotent at Alipay)."""
    return f"R{pay_order_no}"


def pay_finished(app: Any) -> tuple[messaging.Prepare, messaging.Handler]:
    """The ``pay.finished`` consumer: refund first if the order was cancelled, then record."""

    async def prepare(message: Message) -> None:
        sessions: async_sessionmaker[AsyncSession] = app.state.sessionmaker
        async with sessions() as session:
            order = await session.scalar(
                select(Order).where(Order.order_no == message.payload["order_no"])
            )
        if order is None or order.status != OrderStatus.TIMEOUT_CANCEL.value:
            return
        answer = await app.state.alipay_refund(
            out_trade_no=order.order_no,
            refund_amount=message.payload["amount"],
            out_request_no=refund_request_no(message.payload["pay_order_no"]),
        )
        if not is_success(answer):
            raise RetryLater(f"refund of {order.order_no} refused: {answer}")

    async def handle(session: AsyncSession, message: Message) -> None:
        status = await grant_paid_order(session, message.payload["order_no"])
        if status != OrderStatus.TIMEOUT_CANCEL.value:
            return
        # The timeout won: prepare() has refunded (or the order was cancelled after it
        # looked, and the message must come back to refund).
        answer = await app.state.alipay_refund(
            out_trade_no=message.payload["order_no"],
            refund_amount=message.payload["amount"],
            out_request_no=refund_request_no(message.payload["pay_order_no"]),
        )
        if not is_success(answer):
            raise RetryLater("the refund is not confirmed yet")
        moved = await session.execute(
            update(PayOrder)
            .where(
                PayOrder.pay_order_no == message.payload["pay_order_no"],
                PayOrder.status == PayStatus.PAID.value,
            )
            .values(status=PayStatus.REFUNDED.value)
        )
        if moved.rowcount == 1:  # type: ignore[attr-defined]
            session.add(
                PayFlow(
                    pay_order_no=message.payload["pay_order_no"],
                    trade_no=message.payload.get("trade_no") or None,
                    amount=Decimal(message.payload["amount"]),
                    kind=FlowKind.REFUND.value,
                    created_at=utcnow(),
                )
            )

    return prepare, handle


async def start(app: FastAPI) -> None:
    """Guard the Alipay calls and start the payment consumers of this process."""
    guard = app.state.guard
    client = alipay_client(app)

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise ServiceUnavailable("the payment provider is unavailable; try again shortly")

    app.state.alipay_page_pay = guard.resource("alipay.page_pay", fallback=unavailable)(
        client.page_pay
    )
    app.state.alipay_close = guard.resource("alipay.close")(client.close)
    app.state.alipay_query = guard.resource("alipay.query")(client.query)
    app.state.alipay_refund = guard.resource("alipay.refund")(client.refund)
    workers = messaging.workers_of(app)
    workers.spawn(
        messaging.consumer_for(app, "pay-orders", ORDER_CREATED, create_pay_order).run(),
        "consumer:pay-orders",
    )
    prepare, handle = pay_finished(app)
    workers.spawn(
        messaging.consumer_for(app, "orders-paid", PAY_FINISHED, handle, prepare=prepare).run(),
        "consumer:orders-paid",
    )


async def stop(app: FastAPI) -> None:
    """Close the in-process HTTP client of the Alipay client, if this module made it."""
    http: httpx.AsyncClient | None = getattr(app.state, "alipay_http", None)
    if http is not None:
        await http.aclose()


__all__ = [
    "RetryLater",
    "alipay_client",
    "create_pay_order",
    "ensure_pay_order",
    "new_pay_order_no",
    "pay_finished",
    "refund_request_no",
    "router",
    "start",
    "stop",
]
