"""The outbox, its relay and the consumers: at-least-once transport, exactly-once effects.

Each test runs on SQLite and on PostgreSQL (a schema of its own in database ``test``), and
on the shared Redis under stream names of its own (``database_url`` comes from conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from demo_service import db
from demo_service.messaging import Consumer, Message, Relay, enqueue, stream_key
from demo_service.models import Outbox, ProcessedMessage
from tests.helpers import REQUIRE_REDIS, ROOT, SHARED_REDIS_URL, unique_prefix


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = db.make_engine(database_url)
    await db.create_schema(eng)
    async with eng.begin() as conn:
        await conn.execute(text("CREATE TABLE t_effects (message_id VARCHAR(100))"))
    yield eng
    await eng.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return db.make_sessionmaker(engine)


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(SHARED_REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        if REQUIRE_REDIS:
            pytest.fail(f"Redis does not answer: {exc}")
        pytest.skip(f"Redis does not answer: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    """A stream prefix of this test's own; its keys are deleted afterwards."""
    p = unique_prefix()
    yield p
    keys = [k async for k in redis.scan_iter(match=f"{p}:*")]
    if keys:
        await redis.delete(*keys)


async def record_effect(session: AsyncSession, message: Message) -> None:
    """The effect under test: one row per handling (duplicates would show as rows)."""
    await session.execute(
        text("INSERT INTO t_effects (message_id) VALUES (:m)"), {"m": message.message_id}
    )


async def effects(sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    async with sessions() as session:
        rows = await session.execute(text("SELECT message_id FROM t_effects ORDER BY 1"))
        return [r[0] for r in rows]


def consumer(
    sessions: async_sessionmaker[AsyncSession], redis: Redis, prefix: str, **kw: Any
) -> Consumer:
    options: dict[str, Any] = {
        "group": "effects",
        "stream": stream_key(prefix, "things"),
        "redis": redis,
        "sessionmaker": sessions,
        "handler": record_effect,
        "claim_idle_seconds": 0.2,
        "block_seconds": 0.05,
    }
    options.update(kw)
    return Consumer(**options)


async def drain(c: Consumer, until: Any, seconds: float = 20.0) -> None:
    """Run ``c`` until ``until()`` is true; fail (not hang) past ``seconds``."""
    task = asyncio.create_task(c.run())
    try:
        deadline = time.monotonic() + seconds
        while not await until():
            if time.monotonic() > deadline:
                pytest.fail(f"{c!r} did not get there within {seconds} s")
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=10)
        if not task.done():
            task.print_stack()
            pytest.fail(f"{c!r} did not stop within 10 s of its cancellation")
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_outbox_rows_reach_the_stream_once_and_effects_happen_once(
    sessions: async_sessionmaker[AsyncSession], redis: Redis, prefix: str
) -> None:
    async with sessions() as session, session.begin():
        for i in range(3):
            enqueue(session, "things", {"n": i})
    relay = Relay(sessions, redis, prefix=prefix)
    assert await relay.run_once() == 3
    assert await relay.run_once() == 0
    # A relay that died after XADD and before its commit publishes the rows again.
    async with sessions() as session, session.begin():
        await session.execute(update(Outbox).values(published_at=None))
    assert await relay.run_once() == 3
    assert await redis.xlen(stream_key(prefix, "things")) == 6

    c = consumer(sessions, redis, prefix)
    await c.ensure_group()

    async def acked_all() -> bool:
        info = await redis.xpending(c.stream, c.group)
        done = await effects(sessions)
        return len(done) >= 3 and int(info["pending"]) == 0

    await drain(c, acked_all)
    done = await effects(sessions)
    assert len(done) == 3 and len(set(done)) == 3
    async with sessions() as session:
        marks = await session.scalar(select(func.count()).select_from(ProcessedMessage))
    assert marks == 3


async def test_a_rolled_back_transaction_publishes_nothing(
    sessions: async_sessionmaker[AsyncSession], redis: Redis, prefix: str
) -> None:
    with pytest.raises(RuntimeError):
        async with sessions() as session, session.begin():
            enqueue(session, "things", {"n": 1})
            await session.flush()
            raise RuntimeError("the business transaction failed")
    assert await Relay(sessions, redis, prefix=prefix).run_once() == 0
    assert await redis.xlen(stream_key(prefix, "things")) == 0


async def test_a_delayed_message_waits_for_its_due_time(
    sessions: async_sessionmaker[AsyncSession], redis: Redis, prefix: str
) -> None:
    async with sessions() as session, session.begin():
        enqueue(session, "things", {"n": "later"}, delay_seconds=3600)
        enqueue(session, "things", {"n": "now"})
    relay = Relay(sessions, redis, prefix=prefix)
    assert await relay.run_once() == 1
    assert await relay.run_once() == 0
    async with sessions() as session, session.begin():  # an hour passes
        row = await session.scalar(select(Outbox).where(Outbox.published_at.is_(None)))
        assert row is not None
        row.deliver_at = row.deliver_at.replace(year=2000)
    assert await relay.run_once() == 1


async def test_concurrent_relays_publish_each_row_once(
    sessions: async_sessionmaker[AsyncSession], redis: Redis, prefix: str
) -> None:
    async with sessions() as session, session.begin():
        for i in range(300):
            enqueue(session, "things", {"n": i})
    relays = [Relay(sessions, redis, prefix=prefix, batch=20) for _ in range(4)]

    async def left() -> int:
        async with sessions() as session:
            query = select(func.count()).where(Outbox.published_at.is_(None))
            return int(await session.scalar(query) or 0)

    async def work(relay: Relay) -> int:
        total = 0
        deadline = time.monotonic() + 30
        while await left():
            if time.monotonic() > deadline:
                pytest.fail("the relays did not publish everything within 30 s")
            total += await relay.run_once()
            await asyncio.sleep(0.001)
        return total

    published = await asyncio.gather(*(work(r) for r in relays))
    assert sum(published) == 300
    assert await redis.xlen(stream_key(prefix, "things")) == 300


async def test_a_message_that_always_fails_lands_in_the_dead_letter_stream(
    sessions: async_sessionmaker[AsyncSession], redis: Redis, prefix: str
) -> None:
    async def broken(session: AsyncSession, message: Message) -> None:
        await record_effect(session, message)  # rolled back with the failure
        raise ValueError("poison")

    async with sessions() as session, session.begin():
        enqueue(session, "things", {"n": "poison"})
        enqueue(session, "things", {"n": "fine"})
    await Relay(sessions, redis, prefix=prefix).run_once()

    async def handler(session: AsyncSession, message: Message) -> None:
        if message.payload["n"] == "poison":
            await broken(session, message)
        await record_effect(session, message)

    c = consumer(sessions, redis, prefix, handler=handler, max_deliveries=3)
    await c.ensure_group()

    async def dead() -> bool:
        return bool(await redis.xlen(c.dlq))

    await drain(c, dead)
    [(_, fields)] = await redis.xrange(c.dlq)
    assert fields[b"reason"] == b"ValueError: poison"
    assert b'"poison"' in fields[b"payload"]
    assert int((await redis.xpending(c.stream, c.group))["pending"]) == 0
    assert len(await effects(sessions)) == 1  # only "fine"


async def test_a_message_redelivered_too_often_is_dead_lettered_without_running(
    sessions: async_sessionmaker[AsyncSession], redis: Redis, prefix: str
) -> None:
    """A message whose handling keeps killing its consumer must not kill the next ones."""
    c = consumer(sessions, redis, prefix, max_deliveries=2)
    await c.ensure_group()
    await redis.xadd(c.stream, {"id": "m1", "payload": "{}"})
    for _ in range(2):  # two consumers read it and die
        await redis.xreadgroup(c.group, "dead", {c.stream: "0" if _ else ">"}, count=1)
    await redis.xclaim(c.stream, c.group, "dead", 0, [(await redis.xrange(c.stream))[0][0]])

    async def dead() -> bool:
        return bool(await redis.xlen(c.dlq))

    await drain(c, dead)
    [(_, fields)] = await redis.xrange(c.dlq)
    assert b"without being acknowledged" in fields[b"reason"]
    assert await effects(sessions) == []


@pytest.mark.parametrize("where", ["in-handler", "before-ack"])
async def test_a_consumer_sigkilled_mid_message_is_processed_once_after_reclaim(
    database_url: str,
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    redis: Redis,
    prefix: str,
    tmp_path: Path,
    where: str,
) -> None:
    async with sessions() as session, session.begin():
        enqueue(session, "things", {"n": 1})
    await Relay(sessions, redis, prefix=prefix).run_once()
    flag = tmp_path / "stuck"
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tests.demo_service.test_messaging"),
        *(database_url, prefix, where, str(flag)),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(flag.exists):
            if proc.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"the worker never got stuck (exit status {proc.returncode})")
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    c = consumer(sessions, redis, prefix)

    async def acked() -> bool:
        return int((await redis.xpending(c.stream, c.group))["pending"]) == 0

    await drain(c, acked)
    assert await effects(sessions) == ["outbox-1"]


async def _stuck_worker(database_url: str, prefix: str, where: str, flag: Path) -> None:
    """The child of the SIGKILL test: consumes one message and hangs at ``where``."""
    engine = db.make_engine(database_url)
    sessions = db.make_sessionmaker(engine)
    redis = Redis.from_url(SHARED_REDIS_URL)

    async def hang() -> None:
        await asyncio.to_thread(flag.touch)
        await asyncio.sleep(3600)

    async def handler(session: AsyncSession, message: Message) -> None:
        await record_effect(session, message)
        if where == "in-handler":
            await session.flush()
            await hang()

    c = consumer(sessions, redis, prefix, handler=handler)
    if where == "before-ack":

        async def xack(*args: Any) -> int:
            await hang()
            return 0

        c.redis = Redis.from_url(SHARED_REDIS_URL)
        c.redis.xack = xack  # type: ignore[method-assign]
    await c.ensure_group()
    await c.run()


def _main(argv: list[str]) -> None:
    asyncio.run(_stuck_worker(argv[0], argv[1], argv[2], Path(argv[3])))


if __name__ == "__main__":
    _main(sys.argv[1:])
