"""Messaging: a transactional outbox, its relay to Redis Streams, and exactly-once consumers.

This stands in for the seed's RocketMQ transactional and delayed messages:

- **Outbox** (:func:`enqueue`): a message is a row written in the same database
  transaction as the business rows it announces, so it exists if and only if they do (the
  transactional half-message, without the check-back). A ``deliver_at`` in the future makes
  it a delayed message (RocketMQ's delay levels, but any delay).
- **Relay** (:class:`Relay`): publishes due rows to one Redis Stream per topic and marks
  them published in the same transaction that selected them. Many workers may run it: on
  PostgreSQL each takes its rows with ``FOR UPDATE SKIP LOCKED``; elsewhere (SQLite) one
  relay at a time holds a Redis lock. A relay that dies between ``XADD`` and its commit
  publishes the rows again later: delivery is at least once, consumers make it exactly once.
- **Consumers** (:class:`Consumer`): one consumer group per consumer, one consumer name
  per process. A message's effect and a ``processed_messages`` row (consumer, message id)
  commit in ONE transaction, and only then is the message ``XACK``-ed: a duplicate (the
  relay's, or a redelivery after a crash between commit and ack) finds the row and is only
  acked. Messages a dead consumer left pending are taken over with ``XAUTOCLAIM`` once idle
  for ``claim_idle_seconds``; a message delivered ``max_deliveries`` times without success
  is moved to the topic's dead-letter stream (``<stream>:dlq``) with the reason, by one Lua
  script that acks and appends together.

Why redis.asyncio and not FastStream's Redis broker: the consumers need ack-after-commit,
the delivery count of each message, ``XAUTOCLAIM`` and a dead-letter move that is atomic
with the ack; these are a few commands each, while the parts no broker provides (the
outbox, delays, the processed-ids table) are the bulk of the work either way.

Key layout: the stream of topic ``T`` is ``<prefix>:mq:{T}`` and its dead letters
``<prefix>:mq:{T}:dlq``; the hash tag keeps both in one cluster slot, so the dead-letter
script is cluster-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .models import Outbox, ProcessedMessage, utcnow

log = logging.getLogger("demo_service.messaging")

#: Streams are trimmed (approximately) to this many entries so that they stay bounded.
STREAM_MAXLEN = 100_000

# Ack the message and append it to the dead-letter stream, or neither: a message two
# consumers try to dead-letter at once lands there once (XACK answers 1 only for the first).
_DEAD_LETTER_LUA = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  local entry = {'source_id', ARGV[2], 'reason', ARGV[3], 'group', ARGV[1]}
  for i = 4, #ARGV do entry[#entry + 1] = ARGV[i] end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', unpack(entry))
end
return acked
"""

# Compare-and-delete: only the holder frees the relay lock.
_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def stream_key(prefix: str, topic: str) -> str:
    """The Redis Stream of ``topic`` under ``prefix``."""
    return f"{prefix}:mq:{{{topic}}}"


def dead_letter_key(stream: str) -> str:
    """The dead-letter stream of ``stream`` (same hash tag when the stream has one)."""
    return f"{stream}:dlq"


def enqueue(
    session: AsyncSession,
    topic: str,
    payload: Mapping[str, Any],
    *,
    delay_seconds: float = 0.0,
) -> Outbox:
    """Add a message to the outbox in ``session``'s transaction.

    It is published when that transaction commits and ``delay_seconds`` have passed (a
    delayed message), and never if it rolls back.
    """
    row = Outbox(
        topic=topic,
        payload=json.dumps(dict(payload), separators=(",", ":"), default=str),
        deliver_at=utcnow() + timedelta(seconds=max(0.0, delay_seconds)),
        attempts=0,
    )
    session.add(row)
    return row


@dataclass(frozen=True)
class Message:
    """One delivery of a stream entry to a consumer."""

    #: The Redis Stream entry id (what XACK takes).
    entry_id: str
    #: The stable id effects are deduplicated by (the outbox row, or the entry's own).
    message_id: str
    topic: str
    payload: dict[str, Any]
    #: How many times the group has delivered this entry, this delivery included.
    deliveries: int = 1
    fields: dict[str, str] = field(default_factory=dict)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_entry(entry_id: Any, raw: Mapping[Any, Any], deliveries: int, topic: str) -> Message:
    """A :class:`Message` from a stream entry (outbox entries carry ``id`` and ``payload``)."""
    fields = {_text(k): _text(v) for k, v in raw.items()}
    eid = _text(entry_id)
    if "payload" in fields:
        try:
            loaded = json.loads(fields["payload"])
        except ValueError:
            loaded = None
        payload: dict[str, Any] = loaded if isinstance(loaded, dict) else {"raw": fields["payload"]}
    else:
        payload = dict(fields)
    return Message(
        entry_id=eid,
        message_id=fields.get("id") or eid,
        topic=fields.get("topic", topic),
        payload=payload,
        deliveries=deliveries,
        fields=fields,
    )


def raise_if_cancelled() -> None:
    """Stop a loop whose task was cancelled even if a library swallowed the cancellation.

    (A cancellation that lands inside a redis-py command can be absorbed by its retry
    logic; the task then stays "cancelling" and a plain ``while True`` never ends.)
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Relay:
    """Publishes due outbox rows to their streams (see the module docstring)."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        redis: Redis,
        *,
        prefix: str,
        interval_seconds: float = 0.2,
        batch: int = 200,
        lock_seconds: float = 10.0,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.redis = redis
        self.prefix = prefix
        self.interval = interval_seconds
        self.batch = batch
        self.lock_ms = int(lock_seconds * 1000)
        self.lock_key = f"{prefix}:mq:relay-lock"
        self._wake = asyncio.Event()
        self._unlock = redis.register_script(_UNLOCK_LUA)

    def wake(self) -> None:
        """Publish now rather than at the next tick (after a commit that added messages)."""
        self._wake.set()

    def _skip_locked(self, session: AsyncSession) -> bool:
        return session.bind is not None and session.bind.dialect.name == "postgresql"

    async def run_once(self) -> int:
        """Publish what is due now; returns how many rows were published."""
        async with self.sessionmaker() as session:
            if self._skip_locked(session):
                return await self._publish(session, skip_locked=True)
        # No row locks (SQLite): one relay at a time, by a lock that a dead holder's TTL frees.
        token = secrets.token_hex(8)
        if not await self.redis.set(self.lock_key, token, nx=True, px=self.lock_ms):
            return 0
        try:
            async with self.sessionmaker() as session:
                return await self._publish(session, skip_locked=False)
        finally:
            with contextlib.suppress(RedisError):
                await self._unlock(keys=[self.lock_key], args=[token])

    async def _publish(self, session: AsyncSession, *, skip_locked: bool) -> int:
        async with session.begin():
            now = utcnow()
            query = (
                select(Outbox)
                .where(Outbox.published_at.is_(None), Outbox.deliver_at <= now)
                .order_by(Outbox.deliver_at, Outbox.id)
                .limit(self.batch)
            )
            if skip_locked:
                query = query.with_for_update(skip_locked=True)
            rows = list((await session.scalars(query)).all())
            if not rows:
                return 0
            pipe = self.redis.pipeline(transaction=False)
            for row in rows:
                pipe.xadd(
                    stream_key(self.prefix, row.topic),
                    {"id": f"outbox-{row.id}", "topic": row.topic, "payload": row.payload},
                    maxlen=STREAM_MAXLEN,
                    approximate=True,
                )
            # If this raises, the transaction rolls back and the rows stay due: a later
            # run publishes them again and consumers drop the copies already delivered.
            await pipe.execute()
            for row in rows:
                row.published_at = now
                row.attempts += 1
        return len(rows)

    async def run(self) -> None:
        """Publish due rows until cancelled; errors are logged and retried next tick."""
        while True:
            raise_if_cancelled()
            try:
                while await self.run_once() >= self.batch:
                    pass  # a backlog: keep going without waiting
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay failed; retrying")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)


#: A consumer's effect: runs in the transaction that records the message as processed.
Handler = Callable[[AsyncSession, Message], Awaitable[None]]
#: Work done before that transaction (e.g. an idempotent call to the payment provider).
Prepare = Callable[[Message], Awaitable[None]]


class Consumer:
    """One consumer group on one stream, with exactly-once effects in the database."""

    def __init__(
        self,
        *,
        group: str,
        stream: str,
        redis: Redis,
        sessionmaker: async_sessionmaker[AsyncSession],
        handler: Handler,
        prepare: Prepare | None = None,
        after: Prepare | None = None,
        topic: str = "",
        max_deliveries: int = 5,
        claim_idle_seconds: float = 10.0,
        block_seconds: float = 1.0,
        batch: int = 16,
        name: str | None = None,
    ) -> None:
        self.group = group
        self.stream = stream
        self.dlq = dead_letter_key(stream)
        self.redis = redis
        self.sessionmaker = sessionmaker
        self.handler = handler
        self.prepare = prepare
        self.after = after
        self.topic = topic or stream
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = max(1, int(claim_idle_seconds * 1000))
        self.block_ms = max(1, int(block_seconds * 1000))
        self.batch = batch
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._dead_letter = redis.register_script(_DEAD_LETTER_LUA)
        self._group_ready = False

    def __repr__(self) -> str:
        return f"Consumer({self.group!r} on {self.stream!r} as {self.name!r})"

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; from the stream's start."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _deliveries(self, entry_id: str) -> int:
        rows = await self.redis.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
        return int(rows[0]["times_delivered"]) if rows else 1

    async def reclaim(self) -> int:
        """Take over and handle messages idle longer than ``claim_idle_seconds``."""
        handled = 0
        start = "0-0"
        while True:
            reply: Any = await self.redis.xautoclaim(
                self.stream, self.group, self.name, self.claim_idle_ms, start, count=self.batch
            )
            start = _text(reply[0])
            for entry_id, raw in reply[1]:
                if raw is None:  # trimmed away while pending
                    await self.redis.xack(self.stream, self.group, entry_id)
                    continue
                eid = _text(entry_id)
                message = parse_entry(eid, raw, await self._deliveries(eid), self.topic)
                await self.process(message)
                handled += 1
            if start == "0-0":
                return handled

    async def read_new(self) -> int:
        """Handle new messages; with none, wait ``block_seconds`` and return 0.

        The wait is a local sleep, not ``XREADGROUP BLOCK``: a blocked read outlives the
        client's socket timeout and does not end promptly when its task is cancelled.
        """
        reply: Any = await self.redis.xreadgroup(
            self.group, self.name, {self.stream: ">"}, count=self.batch
        )
        if not reply:
            await asyncio.sleep(self.block_ms / 1000)
            return 0
        handled = 0
        for _stream, entries in reply or ():
            for entry_id, raw in entries:
                await self.process(parse_entry(entry_id, raw, 1, self.topic))
                handled += 1
        return handled

    async def _already_processed(self, message_id: str) -> bool:
        async with self.sessionmaker() as session:
            found = await session.get(ProcessedMessage, (self.group, message_id))
            return found is not None

    async def process(self, message: Message) -> bool:
        """Handle one message exactly once; returns whether it is done (acked or dead)."""
        if message.deliveries > self.max_deliveries:
            await self.dead_letter(
                message, f"delivered {message.deliveries} times without being acknowledged"
            )
            return True
        try:
            if await self._already_processed(message.message_id):
                await self.redis.xack(self.stream, self.group, message.entry_id)
                return True
            if self.prepare is not None:
                await self.prepare(message)
            async with self.sessionmaker() as session, session.begin():
                session.add(ProcessedMessage(consumer=self.group, message_id=message.message_id))
                try:
                    await session.flush()
                except IntegrityError:
                    # Another consumer committed this message meanwhile: nothing to do.
                    await session.rollback()
                    await self.redis.xack(self.stream, self.group, message.entry_id)
                    return True
                await self.handler(session, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if message.deliveries >= self.max_deliveries:
                await self.dead_letter(message, f"{type(exc).__name__}: {exc}"[:500])
                return True
            log.warning(
                "%s: message %s failed (delivery %d of %d), retried after %d ms: %r",
                self.group,
                message.message_id,
                message.deliveries,
                self.max_deliveries,
                self.claim_idle_ms,
                exc,
            )
            return False
        if self.after is not None:  # clean-up that may be lost (e.g. a cache entry)
            with contextlib.suppress(Exception):
                await self.after(message)
        # Only now, after the commit: a crash before this line redelivers, and the
        # processed row turns the redelivery into a plain ack.
        await self.redis.xack(self.stream, self.group, message.entry_id)
        return True

    async def dead_letter(self, message: Message, reason: str) -> None:
        """Move ``message`` to the dead-letter stream with ``reason`` (ack included)."""
        args: list[str] = [self.group, message.entry_id, reason]
        for key, value in message.fields.items():
            if key not in ("source_id", "reason", "group"):
                args += [key, value]
        log.error("%s: message %s dead-lettered: %s", self.group, message.message_id, reason)
        await self._dead_letter(keys=[self.stream, self.dlq], args=args)

    async def run(self) -> None:
        """Consume until cancelled: reclaim what is idle, then read what is new."""
        loop = asyncio.get_running_loop()
        next_claim = 0.0
        while True:
            raise_if_cancelled()
            try:
                if not self._group_ready:
                    await self.ensure_group()
                if loop.time() >= next_claim:
                    await self.reclaim()
                    next_claim = loop.time() + self.claim_idle_ms / 2000
                await self.read_new()
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # the stream was deleted: create it again
                    self._group_ready = False
                else:
                    log.exception("%s: consumer failed; retrying", self.group)
                    await asyncio.sleep(1.0)
            except Exception:
                log.exception("%s: consumer failed; retrying", self.group)
                await asyncio.sleep(1.0)


def relay_of(app: Any) -> Relay:
    """The process's relay (``app.state.relay``), created on first use."""
    relay: Relay | None = getattr(app.state, "relay", None)
    if relay is None:
        relay = Relay(
            app.state.sessionmaker, app.state.redis, prefix=app.state.settings.redis_prefix
        )
        app.state.relay = relay
    return relay


def workers_of(app: Any) -> Workers:
    """The process's background tasks (``app.state.flow_workers``), created on first use."""
    workers: Workers | None = getattr(app.state, "flow_workers", None)
    if workers is None:
        workers = Workers()
        app.state.flow_workers = workers
    return workers


def consumer_for(app: Any, group: str, topic: str, handler: Handler, **kw: Any) -> Consumer:
    """A consumer of ``topic`` on the app's Redis and database, with the app's settings."""
    settings = app.state.settings
    return Consumer(
        group=group,
        stream=kw.pop("stream", None) or stream_key(settings.redis_prefix, topic),
        redis=app.state.redis,
        sessionmaker=app.state.sessionmaker,
        handler=handler,
        topic=topic,
        claim_idle_seconds=settings.claim_idle_seconds,
        block_seconds=0.1,
        **kw,
    )


async def start(app: Any) -> None:
    """Start the relay of this process (consumers are started by their modules)."""
    relay = relay_of(app)
    workers_of(app).spawn(relay.run(), "outbox-relay")


async def stop(app: Any) -> None:
    """Stop the relay and every consumer and sweeper of this process."""
    await workers_of(app).stop()


class Workers:
    """Background tasks of a process (relay, consumers, sweeper), started and stopped together."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        """Run ``coro`` in the background until :meth:`stop`."""

        async def wrapped() -> None:
            await coro

        self.tasks.append(asyncio.create_task(wrapped(), name=name))

    async def stop(self) -> None:
        """Cancel every task and wait for them."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()


__all__ = [
    "STREAM_MAXLEN",
    "Consumer",
    "Handler",
    "Message",
    "Prepare",
    "Relay",
    "Workers",
    "consumer_for",
    "dead_letter_key",
    "enqueue",
    "parse_entry",
    "raise_if_cancelled",
    "relay_of",
    "start",
    "stop",
    "stream_key",
    "workers_of",
]
