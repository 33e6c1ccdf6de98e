"""The shop's tables (SQLAlchemy 2 declarative), created at startup with ``create_all``.

Every timestamp is timezone-aware UTC (:class:`UTCDateTime` keeps it so on SQLite too,
which stores no offset); money is ``Numeric(10, 2)``. The same schema runs on SQLite and
PostgreSQL. Tables by capability:

- accounts: ``users``;
- catalogue and seckill: ``courses``, ``kill_activities``, ``kill_courses``, ``kill_orders``;
- orders: ``orders``, ``order_items``, ``user_courses`` (what a user owns, each course once);
- messaging: ``outbox`` (the transactional outbox; ``deliver_at`` makes a delayed message),
  ``processed_messages`` (a consumer's effect happens once per message id);
- payments: ``pay_orders`` (one per order), ``pay_flows`` (every money movement).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Money columns: two decimals, up to 99 999 999.99.
Money = Numeric(10, 2, asdecimal=True)


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and read back timezone-aware (UTC) on every backend.

    Naive datetimes are refused on the way in: a naive time in a shop that runs on
    several hosts is a bug waiting for a daylight-saving change.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the shop stores timezone-aware UTC only")
        value = value.astimezone(UTC)
        # SQLite keeps no offset; store the UTC wall time and re-attach UTC when reading.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """The declarative base of every table of the shop."""


class KillOrderStatus(enum.StrEnum):
    """Where a kill order (a seckill admission) is."""

    PENDING = "PENDING"  # admitted in Redis, not yet in the database (never stored)
    CREATED = "CREATED"
    ORDERED = "ORDERED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"


class OrderStatus(enum.StrEnum):
    """Where an order is."""

    TO_PAY = "TO_PAY"
    PAID = "PAID"
    TIMEOUT_CANCEL = "TIMEOUT_CANCEL"
    REFUNDED = "REFUNDED"


class PayStatus(enum.StrEnum):
    """Where a pay order (the trade at the payment provider) is."""

    TO_PAY = "TO_PAY"
    PAID = "PAID"
    CLOSED = "CLOSED"
    REFUNDED = "REFUNDED"


class FlowKind(enum.StrEnum):
    """Which way money moved."""

    PAY = "PAY"
    REFUND = "REFUND"


class User(Base):
    """A shop account; ``admin`` has ``is_admin``."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Course(Base):
    """A course on sale at its regular price."""

    __tablename__ = "courses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    price: Mapped[Decimal] = mapped_column(Money)


class KillActivity(Base):
    """A flash sale: a time window and its kill courses; ``published`` once warmed up."""

    __tablename__ = "kill_activities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    start_time: Mapped[datetime] = mapped_column(UTCDateTime)
    end_time: Mapped[datetime] = mapped_column(UTCDateTime)
    published: Mapped[bool] = mapped_column(Boolean, default=False)


class KillCourse(Base):
    """A course in an activity: its kill price, stock (``kill_count``) and per-user cap."""

    __tablename__ = "kill_courses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    activity_id: Mapped[int] = mapped_column(ForeignKey("kill_activities.id"), index=True)
    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id"))
    kill_price: Mapped[Decimal] = mapped_column(Money)
    kill_count: Mapped[int] = mapped_column(Integer)
    kill_limit: Mapped[int] = mapped_column(Integer, default=1)


class KillOrder(Base):
    """A seckill admission persisted from the pre-order stream (status of KillOrderStatus)."""

    __tablename__ = "kill_orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kill_order_no: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kill_course_id: Mapped[int] = mapped_column(ForeignKey("kill_courses.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=KillOrderStatus.CREATED.value)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Order(Base):
    """An order (status of OrderStatus); from a kill order or from courses at full price."""

    __tablename__ = "orders"
    __table_args__ = (Index("ix_orders_status_expires", "status", "expires_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_no: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=OrderStatus.TO_PAY.value)
    amount: Mapped[Decimal] = mapped_column(Money)
    kill_order_no: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class OrderItem(Base):
    """One course of an order, at the price paid for it."""

    __tablename__ = "order_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id"))
    price: Mapped[Decimal] = mapped_column(Money)


class UserCourse(Base):
    """A course a user owns (granted once, by the order that paid for it)."""

    __tablename__ = "user_courses"
    __table_args__ = (UniqueConstraint("user_id", "course_id", name="uq_user_courses"),)

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id"), primary_key=True)
    order_no: Mapped[str] = mapped_column(String(64))


class Outbox(Base):
    """A message committed with the business rows; the relay publishes it at ``deliver_at``."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_due", "published_at", "deliver_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    topic: Mapped[str] = mapped_column(String(100))
    payload: Mapped[str] = mapped_column(Text)  # JSON text
    deliver_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class ProcessedMessage(Base):
    """A message a consumer has handled: inserted in the same transaction as its effect."""

    __tablename__ = "processed_messages"

    consumer: Mapped[str] = mapped_column(String(100), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(100), primary_key=True)


class PayOrder(Base):
    """The trade at the payment provider for one order (status of PayStatus)."""

    __tablename__ = "pay_orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pay_order_no: Mapped[str] = mapped_column(String(64), unique=True)
    order_no: Mapped[str] = mapped_column(String(64), unique=True)
    amount: Mapped[Decimal] = mapped_column(Money)
    status: Mapped[str] = mapped_column(String(16), default=PayStatus.TO_PAY.value)
    trade_no: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class PayFlow(Base):
    """One money movement reported by the provider (a payment or a refund)."""

    __tablename__ = "pay_flows"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pay_order_no: Mapped[str] = mapped_column(String(64), index=True)
    trade_no: Mapped[str | None] = mapped_column(String(64), nullable=True)
    notify_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    amount: Mapped[Decimal] = mapped_column(Money)
    kind: Mapped[str] = mapped_column(String(8), default=FlowKind.PAY.value)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ShopSecret(Base):
    """A secret every worker and host of one shop shares (the token signing key).

    Kept in the database, the shop's durable store: created once by whichever worker
    starts first, read by all others.
    """

    __tablename__ = "shop_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


__all__ = [
    "Base",
    "Course",
    "FlowKind",
    "KillActivity",
    "KillCourse",
    "KillOrder",
    "KillOrderStatus",
    "Money",
    "Order",
    "OrderItem",
    "OrderStatus",
    "Outbox",
    "PayFlow",
    "PayOrder",
    "PayStatus",
    "ProcessedMessage",
    "ShopSecret",
    "UTCDateTime",
    "User",
    "UserCourse",
    "utcnow",
]
