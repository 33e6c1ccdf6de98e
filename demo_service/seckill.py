"""Seckill: ``POST /kill/{kill_course_id}`` and ``GET /kill/orders/{kill_order_no}``.

The seed's flow, made exact. The guards of ``rules.yaml`` (the ``killSem`` semaphore, the
flow limits) run first; then ONE Lua script (``lua/kill.lua``) does, atomically on the
Redis server's clock: activity window, the buyer's count against ``kill_limit``, stock,
then decrement, record the buyer and the kill order, and append the pre-order to a Redis
Stream. Distinct answers replace the seed's ambiguous ``-1``: admitted, sold out, limit
reached, not started, ended, not published.

Redis layout (``P`` = ``Settings.redis_prefix``, ``demo`` by default; the keys of one kill
course share the hash tag ``{kc:ID}``)::

    P:{kc:ID}:stock     string  units left (warmed at publish from kill_count)
    P:{kc:ID}:buyers    hash    user_id -> units this user holds
    P:{kc:ID}:meta      hash    start_ms, end_ms (epoch ms), limit, count, activity_id
    P:{kc:ID}:pending   hash    kill_order_no -> user_id (admitted kill orders)
    P:{kc:ID}:returned  hash    kill_order_no -> 1 (kill orders whose unit came back)
    P:stream:preorders  stream  one entry per admission: kill_order_no, user_id,
                                kill_course_id, ts (Redis time, epoch ms)
    P:stock-returned    channel a kill_course_id whose stock came back (pub/sub)

The pre-order stream has one fixed name (:func:`preorder_stream`) so that FLOW's consumer
group reads one stream. The script names it in ``KEYS`` but it lies outside the course's
hash tag: on a Redis Cluster that script would fail with CROSSSLOT. The shop's own Redis
client is a single-node one (the guards support clusters; the shop's keys do not yet); a
move to a cluster would give each kill course its own stream in its tag. Entries are never
trimmed by the script (that could lose an unconsumed admission): the consumer deletes or
trims what it has acknowledged.

Who does what with a kill order (agreed with FLOW):

- this module admits it (Redis: stock, buyers, pending, stream entry) and answers
  ``{"kill_order_no"}``; its status is ``PENDING`` while no ``kill_orders`` row exists;
- FLOW's stream consumer writes the ``kill_orders`` row (status ``CREATED``) and then may
  ``HDEL`` the pending entry; ``GET /kill/orders/{no}`` reads the row first, and falls back
  to the pending hash (``PENDING``) only when there is none;
- giving stock back (payment timeout, kill order expiry) is :func:`return_stock`, once per
  kill order by the script itself (the ``returned`` hash), whoever asks and however often;
  the script also refuses a return for a buyer who holds nothing here.

A kill order number is ``K<kill_course_id>-<13-digit ms><12 hex>``: unique, ordered by time,
unguessable, and it names its course so that the pending entry is found in its tag.

Every process keeps a sold-out flag per kill course: once the script says sold out, this
process answers ``sold-out`` without Redis, before the guards (:class:`SoldOutShortcut`).
A stock return publishes on the ``stock-returned`` channel and every process clears its
flag; flags also lapse after :data:`SOLD_OUT_FLAG_SECONDS` and are all cleared when the
subscription (re)connects, so a missed message costs seconds, never a sale.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import ASGIApp, Receive, Scope, Send

from ymguard.errors import ProblemResponse

from .accounts import CurrentUser
from .errors import ActivityNotOngoing, AlreadyPurchased, NotFound, ServiceUnavailable, SoldOut
from .models import KillOrder, KillOrderStatus
from .openapi import problems

log = logging.getLogger("demo_service.seckill")

_LUA = Path(__file__).resolve().parent / "lua"
#: Seconds a sold-out flag holds without Redis confirming it (a missed "stock returned"
#: message costs at most this long).
SOLD_OUT_FLAG_SECONDS = 5.0
#: Most kill courses one process keeps a flag for (flags are only set for real courses,
#: the cap is a second line against memory growth).
MAX_FLAGS = 10_000
#: The largest id a path may carry (ids are 32-bit in the database).
MAX_ID = 2**31 - 1

ADMITTED, SOLD_OUT, LIMIT_REACHED, NOT_STARTED, ENDED, NOT_PUBLISHED = 1, 0, -1, -2, -3, -4

_KILL_ORDER_NO = re.compile(r"^K([1-9][0-9]{0,9})-[0-9]{13}[0-9a-f]{12}$")


def course_keys(prefix: str, kill_course_id: int) -> dict[str, str]:
    """The Redis keys of one kill course (all in the hash tag ``{kc:ID}``)."""
    base = f"{prefix}:{{kc:{int(kill_course_id)}}}"
    return {
        "stock": f"{base}:stock",
        "buyers": f"{base}:buyers",
        "meta": f"{base}:meta",
        "pending": f"{base}:pending",
        "returned": f"{base}:returned",
    }


def preorder_stream(prefix: str) -> str:
    """The stream every admission is appended to (FLOW's consumer group reads it)."""
    return f"{prefix}:stream:preorders"


def stock_returned_channel(prefix: str) -> str:
    """The pub/sub channel announcing a kill course whose stock came back."""
    return f"{prefix}:stock-returned"


def new_kill_order_no(kill_course_id: int) -> str:
    """A fresh kill order number naming its course (see the module docstring)."""
    return f"K{int(kill_course_id)}-{int(time.time() * 1000):013d}{secrets.token_hex(6)}"


def kill_course_of(kill_order_no: str) -> int | None:
    """The kill course a kill order number names; None for anything not ours."""
    match = _KILL_ORDER_NO.match(kill_order_no)
    if match is None:
        return None
    value = int(match.group(1))
    return value if value <= MAX_ID else None


@functools.cache
def _source(name: str) -> str:
    return (_LUA / name).read_text()


def _script(redis: Redis, name: str) -> Any:
    # redis-py's Script runs EVALSHA and loads the script again on NOSCRIPT.
    return redis.register_script(_source(name))


#: What :func:`return_stock` answers.
RETURNED, ALREADY_RETURNED, NOTHING_HELD = 1, 2, 0


async def return_stock(
    redis: Redis, kill_course_id: int, user_id: int, kill_order_no: str, *, prefix: str = "demo"
) -> int:
    """Give the unit of ``kill_order_no`` back and lower ``user_id``'s count, once, atomically.

    ONE script (``lua/return_stock.lua``) records the kill order in the course's
    ``returned`` hash, lowers the count, raises the stock and tells every process to clear
    its sold-out flag (pub/sub). A kill order whose unit came back before returns nothing,
    so a redelivered message or a sweep racing the delayed message cannot return a unit
    twice; as a second line, a buyer who holds nothing of this course gets nothing back.

    Args:
        redis: the shop's Redis (``app.state.redis``).
        kill_course_id: the kill course bought.
        user_id: the buyer.
        kill_order_no: the purchase whose unit comes back.
        prefix: ``Settings.redis_prefix``.

    Returns:
        :data:`RETURNED`, :data:`ALREADY_RETURNED`, :data:`NOTHING_HELD`, or
        :data:`NOT_PUBLISHED` when the kill course is not in Redis.
    """
    keys = course_keys(prefix, kill_course_id)
    result = await _script(redis, "return_stock.lua")(
        keys=[keys["stock"], keys["buyers"], keys["meta"], keys["returned"]],
        args=[int(user_id), stock_returned_channel(prefix), int(kill_course_id), kill_order_no],
    )
    return int(result)


async def warm_course(
    redis: Redis,
    prefix: str,
    *,
    kill_course_id: int,
    activity_id: int,
    kill_count: int,
    kill_limit: int,
    start_ms: int,
    end_ms: int,
) -> None:
    """Load one kill course into Redis at publish (stock only if absent: never reset)."""
    keys = course_keys(prefix, kill_course_id)
    await _script(redis, "warm.lua")(
        keys=[keys["stock"], keys["meta"]],
        args=[kill_count, start_ms, end_ms, kill_limit, activity_id],
    )


async def stock_left(redis: Redis, prefix: str, kill_course_ids: list[int]) -> dict[int, int]:
    """Units left per kill course (0 for one not warmed), in one round trip."""
    if not kill_course_ids:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for kc in kill_course_ids:
            pipe.get(course_keys(prefix, kc)["stock"])
        values = await pipe.execute()
    return {
        kc: max(0, int(v)) if v is not None else 0
        for kc, v in zip(kill_course_ids, values, strict=True)
    }


class Seckill:
    """One process's seckill: the script, the sold-out flags and their subscriber."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.stream = preorder_stream(prefix)
        self.channel = stock_returned_channel(prefix)
        self._kill = _script(redis, "kill.lua")
        #: kill_course_id -> monotonic time the flag lapses.
        self._sold_out: dict[int, float] = {}
        #: Bumped by every "stock returned" message and reconnect: a script answer from
        #: before a bump must not set a flag after it.
        self._generation = 0
        self._listening = False
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def sold_out(self, kill_course_id: int) -> bool:
        """Whether this process knows the course is sold out (no Redis call)."""
        until = self._sold_out.get(kill_course_id)
        if until is None:
            return False
        if time.monotonic() >= until:
            self._sold_out.pop(kill_course_id, None)
            return False
        return True

    def _flag(self, kill_course_id: int, generation: int) -> None:
        if not self._listening or generation != self._generation:
            return  # a return may have raced this answer: ask Redis next time
        if len(self._sold_out) >= MAX_FLAGS and kill_course_id not in self._sold_out:
            return
        self._sold_out[kill_course_id] = time.monotonic() + SOLD_OUT_FLAG_SECONDS

    def _clear(self, kill_course_id: int | None = None) -> None:
        self._generation += 1
        if kill_course_id is None:
            self._sold_out.clear()
        else:
            self._sold_out.pop(kill_course_id, None)

    async def kill(self, user_id: int, kill_course_id: int) -> str:
        """Try to buy one unit; the kill order number, or the business error that says no.

        Raises:
            SoldOut, AlreadyPurchased, ActivityNotOngoing, NotFound, ServiceUnavailable.
        """
        if self.sold_out(kill_course_id):
            raise SoldOut("this kill course is sold out")
        generation = self._generation
        kill_order_no = new_kill_order_no(kill_course_id)
        keys = course_keys(self.prefix, kill_course_id)
        try:
            code, left = await self._kill(
                keys=[keys["stock"], keys["buyers"], keys["meta"], keys["pending"], self.stream],
                args=[int(user_id), kill_order_no, int(kill_course_id)],
            )
        except (RedisError, OSError) as exc:
            # No answer is no sale: without the script nothing was taken, and if it ran
            # after all, the pre-order is in the stream and reaches the buyer's orders.
            raise ServiceUnavailable("the stock store did not answer; try again") from exc
        code = int(code)
        if code == ADMITTED:
            if int(left) <= 0:
                self._flag(kill_course_id, generation)
            return kill_order_no
        if code == SOLD_OUT:
            self._flag(kill_course_id, generation)
            raise SoldOut("this kill course is sold out")
        if code == LIMIT_REACHED:
            raise AlreadyPurchased("you already hold as many as this kill course allows")
        if code == NOT_STARTED:
            raise ActivityNotOngoing("the activity has not started yet")
        if code == ENDED:
            raise ActivityNotOngoing("the activity has ended")
        raise NotFound("no such kill course on sale")

    async def _listen(self) -> None:
        """Clear sold-out flags on "stock returned"; reconnect (clearing all) on errors."""
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._listening = True
                self._clear()  # anything may have come back while we were not listening
                self._subscribed.set()
                delay = 0.1
                while True:
                    message = await pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    try:
                        self._clear(int(message["data"]))
                    except (TypeError, ValueError):
                        self._clear()
            except (RedisError, OSError) as exc:
                self._listening = False
                self._clear()
                log.warning("stock-returned subscription lost (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self._listening = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def start(self, wait: float = 2.0) -> None:
        """Start listening for stock returns; wait up to ``wait`` s for the subscription.

        Until it is subscribed this process sets no sold-out flag (it could miss the
        message clearing it); with Redis down it starts anyway and subscribes later.
        """
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="seckill-stock-returned")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._subscribed.wait()

    async def stop(self) -> None:
        """Stop listening."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


KILL_RESOURCE = "POST /kill/{kill_course_id}"
_KILL_PATH = re.compile(r"^/kill/([1-9][0-9]{0,9})/?$")


class SoldOutShortcut:
    """Answers ``POST /kill/{id}`` of a kill course this process knows is sold out, at once.

    It sits outside the guards: once stock is gone, the flood of late buyers costs no
    Redis call at all (no semaphore permit, no flow count, no script), so the shop
    answers them about as fast as a constant endpoint. Everything else passes through.
    The answer is the same problem+json the route itself would give.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _KILL_PATH.match(scope["path"])
            seckill: Seckill | None = getattr(scope["app"].state, "seckill", None)
            if match is not None and seckill is not None and seckill.sold_out(int(match[1])):
                response = ProblemResponse(
                    409,
                    SoldOut.code,
                    SoldOut.title,
                    "this kill course is sold out",
                    resource=KILL_RESOURCE,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


router = APIRouter(tags=["seckill"], responses=problems(400, 401, 404, 409, 422, 429, 503))

KillCourseId = Annotated[int, PathParam(ge=1, le=MAX_ID)]


@router.post("/kill/{kill_course_id}")
async def kill(kill_course_id: KillCourseId, user: CurrentUser, request: Request) -> dict[str, str]:
    """Buy one unit of a kill course: 200 ``{"kill_order_no"}``.

    409 ``sold-out``, ``already-purchased`` or ``activity-not-ongoing``; 404 ``not-found``.
    """
    seckill: Seckill = request.app.state.seckill
    return {"kill_order_no": await seckill.kill(user.id, kill_course_id)}


async def kill_order_row(
    sessions: async_sessionmaker[AsyncSession], kill_order_no: str
) -> KillOrder | None:
    """The ``kill_orders`` row of ``kill_order_no``, if FLOW's consumer has written it."""
    async with sessions() as session:
        row: KillOrder | None = await session.scalar(
            select(KillOrder).where(KillOrder.kill_order_no == kill_order_no)
        )
    return row


@router.get("/kill/orders/{kill_order_no}")
async def kill_order(kill_order_no: str, user: CurrentUser, request: Request) -> dict[str, Any]:
    """A kill order of the caller's: ``{"kill_order_no", "kill_course_id", "status"}``.

    The database row when FLOW's consumer has written it, else ``PENDING`` while the
    admission is only in Redis; anyone else's (or unknown) → 404.
    """
    kill_course_id = kill_course_of(kill_order_no)
    if kill_course_id is None:
        raise NotFound("no such kill order")
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker

    async def row_of() -> dict[str, Any] | None:
        row = await kill_order_row(sessions, kill_order_no)
        if row is None:
            return None
        if row.user_id != user.id:
            raise NotFound("no such kill order")
        return {
            "kill_order_no": row.kill_order_no,
            "kill_course_id": row.kill_course_id,
            "status": row.status,
            "created_at": row.created_at.isoformat(),
            "expires_at": row.expires_at.isoformat() if row.expires_at else None,
        }

    found = await row_of()
    if found is not None:
        return found
    seckill: Seckill = request.app.state.seckill
    owner = await seckill.redis.hget(
        course_keys(seckill.prefix, kill_course_id)["pending"], kill_order_no
    )
    if owner is None:
        # The consumer writes the row, then drops the pending entry: both may have
        # happened between the two reads (another worker's consumer), so look again.
        found = await row_of()
        if found is not None:
            return found
    if owner is None or int(owner) != user.id:
        raise NotFound("no such kill order")
    return {
        "kill_order_no": kill_order_no,
        "kill_course_id": kill_course_id,
        "status": KillOrderStatus.PENDING.value,
    }


async def start(app: FastAPI) -> None:
    """Create the process's :class:`Seckill` (``app.state.seckill``) and start its listener."""
    seckill = Seckill(app.state.redis, app.state.settings.redis_prefix)
    app.state.seckill = seckill
    await seckill.start()


async def stop(app: FastAPI) -> None:
    """Stop the listener."""
    seckill: Seckill | None = getattr(app.state, "seckill", None)
    if seckill is not None:
        await seckill.stop()


__all__ = [
    "ALREADY_RETURNED",
    "NOTHING_HELD",
    "RETURNED",
    "SOLD_OUT_FLAG_SECONDS",
    "Seckill",
    "SoldOutShortcut",
    "course_keys",
    "kill_course_of",
    "new_kill_order_no",
    "preorder_stream",
    "return_stock",
    "router",
    "start",
    "stock_left",
    "stock_returned_channel",
    "stop",
    "warm_course",
]
