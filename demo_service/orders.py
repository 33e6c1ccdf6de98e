"""Orders: submit tokens, placing an order, reading it, and what the buyer owns.

``POST /orders`` writes the order, its items, an ``order.created`` message (the payment
side makes the pay order from it) and a delayed ``order.check-payment`` message (due at
``ORDER_PAY_TIMEOUT_SECONDS``: the payment timeout) in ONE database transaction: the outbox
(:mod:`demo_service.messaging`) stands for RocketMQ's transactional half-message, and an
outbox row with a due time for its delayed message.

Submit tokens (the seed's ``checkRepeatSubmit``, made atomic) are bound to the user AND to
what is bought. ``GET /orders/submit-token?kill_order_no=K..`` (or ``?course_ids=1,2``)
issues a token for the scope *user + purchase*; ``POST /orders`` spends it for the scope
*user + the purchase its JSON body names*, by ymguard's one compare-and-delete
(``guard.submit_tokens.consume``). So a token issued for kill order A cannot place kill
order B, one issued to user X cannot be spent by Y, and of any number of concurrent
submits with one token exactly one gets past it; anything else is 409
``duplicate-submission``. The handler spends the token, not the guard middleware, because
a rule's scope can name the user (``state:user``), headers, the query and path parameters
but not a JSON body. The rule itself stays in ``rules.yaml`` on the code resource
``orders.submit`` (a code resource: the middleware never spends its tokens) and gives the
header, the lifetime and the user part of the scope; the purchase is appended here in an
injective encoding (a JSON array). One live token per scope: a second token for the same
purchase replaces the first (a resubmitted form), while tokens for different purchases
live side by side.

Consumers here: the pre-order stream of :mod:`demo_service.seckill` becomes ``kill_orders``
rows (``CREATED``, with a delayed ``kill-order.check`` that expires it when no order is
placed in time), and ``pay.finished`` marks an order ``PAID`` and grants its courses, or,
when the timeout won the race, has the money refunded.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ymguard.errors import DuplicateSubmission, StorageUnavailable

from . import messaging
from .accounts import CurrentUser
from .errors import AlreadyPurchased, InvalidRequest, NotFound, ServiceUnavailable
from .messaging import Message, enqueue
from .models import (
    Course,
    KillCourse,
    KillOrder,
    KillOrderStatus,
    Order,
    OrderItem,
    OrderStatus,
    PayOrder,
    UserCourse,
    utcnow,
)
from .openapi import problems
from .seckill import course_keys, kill_course_of, preorder_stream

#: Topics of the shop's messages.
ORDER_CREATED = "order.created"
CHECK_PAYMENT = "order.check-payment"
PAY_FINISHED = "pay.finished"
KILL_ORDER_CHECK = "kill-order.check"
STOCK_RETURN = "stock.return"

#: The code resource whose ``submit_token`` rule (``rules.yaml``) the tokens follow.
SUBMIT_RESOURCE = "orders.submit"
MAX_COURSES_PER_ORDER = 20

router = APIRouter(tags=["orders"], responses=problems(400, 401, 404, 409, 422, 429, 503))


def new_order_no() -> str:
    """A unique, time-ordered, unguessable order number (also Alipay's ``out_trade_no``)."""
    return f"O{int(time.time() * 1000):013d}{secrets.token_hex(6)}"


def _sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    return sessions


def _money(value: Decimal) -> str:
    return f"{value:.2f}"


def _purchase(kill_order_no: str | None, course_ids: list[int] | None) -> list[Any]:
    """What is bought, canonical: ``["kill", no]`` or ``["courses", sorted ids]``."""
    if (kill_order_no is None) == (not course_ids):
        raise InvalidRequest("give either kill_order_no or course_ids")
    if kill_order_no is not None:
        return ["kill", kill_order_no]
    return ["courses", sorted(set(course_ids or []))]


def _parse_course_ids(raw: str) -> list[int]:
    parts = raw.split(",")
    if len(parts) > MAX_COURSES_PER_ORDER or not all(
        p.strip().isdigit() and len(p.strip()) <= 10 for p in parts
    ):
        raise InvalidRequest(
            f"course_ids: up to {MAX_COURSES_PER_ORDER} comma-separated course ids"
        )
    return [int(p) for p in parts]


def _token_scope(request: Request, purchase: list[Any]) -> str:
    """The scope of a submit token: the rule's (the user) and what is bought, injectively."""
    tokens = request.app.state.guard.submit_tokens
    user_scope: str = tokens.scope_for(request, SUBMIT_RESOURCE)
    return json.dumps([user_scope, purchase], separators=(",", ":"))


def _submit_rule(request: Request) -> Any:
    return request.app.state.guard.rules.resources[SUBMIT_RESOURCE].submit_token


@router.get("/orders/submit-token")
async def submit_token(
    request: Request,
    user: CurrentUser,
    kill_order_no: Annotated[str | None, Query(max_length=64)] = None,
    course_ids: Annotated[str | None, Query(max_length=256)] = None,
) -> dict[str, Any]:
    """A one-time token for ``POST /orders`` of this user and this purchase."""
    ids = _parse_course_ids(course_ids) if course_ids is not None else None
    purchase = _purchase(kill_order_no, ids)
    rule = _submit_rule(request)
    try:
        token = await request.app.state.guard.submit_tokens.issue(
            _token_scope(request, purchase), rule.ttl_seconds
        )
    except StorageUnavailable as exc:
        raise ServiceUnavailable("the token store did not answer; try again") from exc
    return {"token": token, "expires_in": int(rule.ttl_seconds)}


async def spend_submit_token(request: Request, purchase: list[Any]) -> None:
    """Spend the request's submit token for this user and ``purchase``, or raise 409."""
    rule = _submit_rule(request)
    values = request.headers.getlist(rule.header)
    if len(values) != 1 or not values[0].strip():
        raise DuplicateSubmission(
            SUBMIT_RESOURCE, "submit_token", detail=f"{rule.header} is missing"
        )
    try:
        spent = await request.app.state.guard.submit_tokens.consume(
            _token_scope(request, purchase), values[0].strip()
        )
    except StorageUnavailable as exc:
        raise ServiceUnavailable("the token store did not answer; try again") from exc
    if not spent:
        raise DuplicateSubmission(
            SUBMIT_RESOURCE,
            "submit_token",
            detail=f"{rule.header} was already used, expired, or is not for this user and "
            "this purchase",
        )


class PlaceOrder(BaseModel):
    """``POST /orders``: a kill order, or courses at their regular price."""

    kill_order_no: str | None = Field(None, max_length=64)
    course_ids: list[int] | None = Field(None, max_length=MAX_COURSES_PER_ORDER)
    pay_type: str = "alipay"


async def _pending_owner(app: Any, kill_order_no: str) -> int | None:
    """The buyer of a kill order still PENDING in Redis (read before any transaction)."""
    kill_course_id = kill_course_of(kill_order_no)
    if kill_course_id is None:
        raise NotFound("no such kill order")
    prefix = app.state.settings.redis_prefix
    owner = await app.state.redis.hget(
        course_keys(prefix, kill_course_id)["pending"], kill_order_no
    )
    return None if owner is None else int(owner)


async def _kill_items(
    session: AsyncSession, user_id: int, kill_order_no: str, pending_owner: int | None
) -> list[tuple[int, Decimal]]:
    """Take the caller's kill order (CREATED, or PENDING in Redis) to ORDERED.

    ``pending_owner`` was read from Redis before the transaction began: no network call
    waits while this transaction holds a connection (or, on SQLite, the write lock). It
    is consistent with the row read here because the consumer commits the row before it
    removes the pending entry.
    """
    kill_course_id = kill_course_of(kill_order_no)
    if kill_course_id is None:
        raise NotFound("no such kill order")
    kill_course = await session.get(KillCourse, kill_course_id)
    if kill_course is None:
        raise NotFound("no such kill order")
    row = await session.scalar(select(KillOrder).where(KillOrder.kill_order_no == kill_order_no))
    if row is None:
        # Still only in Redis (the consumer has not written it yet): the pending entry
        # proves the admission and its owner; the row is written here, already ORDERED.
        if pending_owner != user_id:
            raise NotFound("no such kill order")
        session.add(
            KillOrder(
                kill_order_no=kill_order_no,
                user_id=user_id,
                kill_course_id=kill_course_id,
                status=KillOrderStatus.ORDERED.value,
                created_at=utcnow(),
            )
        )
        await session.flush()
    else:
        if row.user_id != user_id:
            raise NotFound("no such kill order")
        moved = await session.execute(
            update(KillOrder)
            .where(KillOrder.id == row.id, KillOrder.status == KillOrderStatus.CREATED.value)
            .values(status=KillOrderStatus.ORDERED.value)
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            # Read the status again: the row read above may predate a concurrent submit.
            status = await session.scalar(select(KillOrder.status).where(KillOrder.id == row.id))
            if status == KillOrderStatus.ORDERED.value:
                raise AlreadyPurchased("this kill order already has an order")
            raise NotFound(f"the kill order is {str(status).lower()}")
    return [(kill_course.course_id, kill_course.kill_price)]


async def _course_items(
    session: AsyncSession, user_id: int, course_ids: list[int]
) -> list[tuple[int, Decimal]]:
    wanted = sorted(set(course_ids))
    courses = (await session.scalars(select(Course).where(Course.id.in_(wanted)))).all()
    if len(courses) != len(wanted):
        raise NotFound("no such course")
    owned = await session.scalar(
        select(UserCourse).where(UserCourse.user_id == user_id, UserCourse.course_id.in_(wanted))
    )
    if owned is not None:
        raise AlreadyPurchased(f"course {owned.course_id} is already yours")
    return [(c.id, c.price) for c in courses]


async def create_order(
    app: Any,
    user_id: int,
    *,
    kill_order_no: str | None = None,
    course_ids: list[int] | None = None,
) -> Order:
    """Create an order (TO_PAY), its items and its two messages in ONE transaction.

    Raises:
        AlreadyPurchased: the kill order already has an order (or a course is owned).
        NotFound: no such kill order of this user, or no such course.
    """
    settings = app.state.settings
    sessions: async_sessionmaker[AsyncSession] = app.state.sessionmaker
    pending_owner = None
    if kill_order_no is not None:
        pending_owner = await _pending_owner(app, kill_order_no)
    for attempt in range(3):
        try:
            async with sessions() as session, session.begin():
                if kill_order_no is not None:
                    items = await _kill_items(session, user_id, kill_order_no, pending_owner)
                else:
                    items = await _course_items(session, user_id, course_ids or [])
                now = utcnow()
                amount = sum((price for _, price in items), Decimal("0.00"))
                order = Order(
                    order_no=new_order_no(),
                    user_id=user_id,
                    status=OrderStatus.TO_PAY.value,
                    amount=amount,
                    kill_order_no=kill_order_no,
                    created_at=now,
                    expires_at=now + timedelta(seconds=settings.order_pay_timeout_seconds),
                )
                session.add(order)
                await session.flush()
                for course_id, price in items:
                    session.add(OrderItem(order_id=order.id, course_id=course_id, price=price))
                enqueue(
                    session,
                    ORDER_CREATED,
                    {"order_no": order.order_no, "amount": _money(amount), "user_id": user_id},
                )
                enqueue(
                    session,
                    CHECK_PAYMENT,
                    {"order_no": order.order_no},
                    delay_seconds=settings.order_pay_timeout_seconds,
                )
            break
        except IntegrityError:
            # The kill order's row was written meanwhile by the stream consumer (or a
            # concurrent submit placed the order): read again.
            if attempt == 2:
                raise AlreadyPurchased("this kill order already has an order") from None
    messaging.relay_of(app).wake()
    return order


@router.post("/orders", status_code=201)
async def place_order(body: PlaceOrder, request: Request, user: CurrentUser) -> dict[str, Any]:
    """Create an order (TO_PAY) with its messages in one transaction.

    The submit token is spent first (see the module docstring), for what the body buys.
    """
    purchase = _purchase(body.kill_order_no, body.course_ids)
    if body.pay_type != "alipay":
        raise InvalidRequest("pay_type must be alipay")
    await spend_submit_token(request, purchase)
    order = await create_order(
        request.app, user.id, kill_order_no=body.kill_order_no, course_ids=body.course_ids
    )
    return {
        "order_no": order.order_no,
        "status": order.status,
        "amount": _money(order.amount),
        "expires_at": order.expires_at.isoformat(),
    }


@router.get("/orders/{order_no}")
async def get_order(order_no: str, request: Request, user: CurrentUser) -> dict[str, Any]:
    """The caller's order: status, amount, items, pay status (others' → 404)."""
    async with _sessions(request)() as session:
        order = await session.scalar(select(Order).where(Order.order_no == order_no))
        if order is None or order.user_id != user.id:
            raise NotFound("no such order")
        items = (
            await session.scalars(select(OrderItem).where(OrderItem.order_id == order.id))
        ).all()
        pay = await session.scalar(select(PayOrder).where(PayOrder.order_no == order_no))
    return {
        "order_no": order.order_no,
        "status": order.status,
        "amount": _money(order.amount),
        "items": [{"course_id": i.course_id, "price": _money(i.price)} for i in items],
        "pay_status": pay.status if pay is not None else None,
        "pay_order_no": pay.pay_order_no if pay is not None else None,
        "kill_order_no": order.kill_order_no,
        "created_at": order.created_at.isoformat(),
        "expires_at": order.expires_at.isoformat(),
        "paid_at": order.paid_at.isoformat() if order.paid_at else None,
    }


@router.get("/me/courses")
async def my_courses(request: Request, user: CurrentUser) -> dict[str, Any]:
    """The courses the caller owns, each once."""
    async with _sessions(request)() as session:
        rows = await session.execute(
            select(UserCourse.course_id, Course.name, UserCourse.order_no)
            .join(Course, Course.id == UserCourse.course_id)
            .where(UserCourse.user_id == user.id)
            .order_by(UserCourse.course_id)
        )
        return {
            "courses": [
                {"course_id": cid, "name": name, "order_no": no} for cid, name, no in rows.all()
            ]
        }


# -- consumers -------------------------------------------------------------------------


def persist_preorder(kill_order_timeout_seconds: float) -> messaging.Handler:
    """The pre-order consumer's effect: a CREATED ``kill_orders`` row and its expiry check."""

    async def handle(session: AsyncSession, message: Message) -> None:
        no = message.fields["kill_order_no"]
        exists = await session.scalar(select(KillOrder.id).where(KillOrder.kill_order_no == no))
        if exists is not None:  # POST /orders wrote it first
            return
        now = utcnow()
        session.add(
            KillOrder(
                kill_order_no=no,
                user_id=int(message.fields["user_id"]),
                kill_course_id=int(message.fields["kill_course_id"]),
                status=KillOrderStatus.CREATED.value,
                created_at=now,
                expires_at=now + timedelta(seconds=kill_order_timeout_seconds),
            )
        )
        enqueue(
            session,
            KILL_ORDER_CHECK,
            {"kill_order_no": no},
            delay_seconds=kill_order_timeout_seconds,
        )

    return handle


async def grant_paid_order(session: AsyncSession, order_no: str) -> str:
    """Mark the order PAID (from TO_PAY) and grant its courses; returns the order's status."""
    order = await session.scalar(select(Order).where(Order.order_no == order_no))
    if order is None:
        raise LookupError(f"order {order_no} not found")
    moved = await session.execute(
        update(Order)
        .where(Order.id == order.id, Order.status == OrderStatus.TO_PAY.value)
        .values(status=OrderStatus.PAID.value, paid_at=utcnow())
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        await session.refresh(order)
        return order.status
    items = (await session.scalars(select(OrderItem).where(OrderItem.order_id == order.id))).all()
    for item in items:
        owned = await session.get(UserCourse, (order.user_id, item.course_id))
        if owned is None:
            session.add(
                UserCourse(user_id=order.user_id, course_id=item.course_id, order_no=order_no)
            )
    return OrderStatus.PAID.value


async def start(app: FastAPI) -> None:
    """Start the pre-order consumer of this process."""
    settings = app.state.settings
    redis = app.state.redis
    prefix = settings.redis_prefix

    async def forget_pending(message: Message) -> None:
        # The row exists now; the pending entry only served GET /kill/orders meanwhile.
        kc = int(message.fields["kill_course_id"])
        await redis.hdel(course_keys(prefix, kc)["pending"], message.fields["kill_order_no"])

    consumer = messaging.consumer_for(
        app,
        "kill-orders",
        "preorders",
        persist_preorder(settings.kill_order_timeout_seconds),
        stream=preorder_stream(prefix),
        after=forget_pending,
    )
    messaging.workers_of(app).spawn(consumer.run(), "consumer:kill-orders")


__all__ = [
    "CHECK_PAYMENT",
    "KILL_ORDER_CHECK",
    "ORDER_CREATED",
    "PAY_FINISHED",
    "STOCK_RETURN",
    "grant_paid_order",
    "new_order_no",
    "persist_preorder",
    "router",
    "start",
]
