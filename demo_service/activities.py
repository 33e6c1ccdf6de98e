"""Courses and kill activities: the admin's catalogue, publish with cache warm-up, and the
public listing with the server's time and the stock left.

Publishing follows the seed's ``KillActivityServiceImpl.publish``, in the order that
cannot strand an activity: first every kill course is warmed in Redis (stock only if
absent, so a retried or racing publish never resets what was sold), then the activity is
marked published with a conditional ``UPDATE ... WHERE NOT published``: of two publishes
one wins, the other answers 409 ``already-published``. A publish whose database write fails
after the warm-up can simply be retried.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from pydantic import AfterValidator, BaseModel, Field, model_validator
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .accounts import AdminUser
from .errors import AlreadyPublished, InvalidRequest, NotFound
from .models import Course, KillActivity, KillCourse
from .openapi import problems
from .seckill import MAX_ID, stock_left, warm_course

#: Most activities ``GET /activities`` lists (the latest by start time).
LIST_LIMIT = 100


def _utc(value: datetime) -> datetime:
    """A datetime in UTC; one without an offset is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDateTime = Annotated[datetime, AfterValidator(_utc)]
Price = Annotated[Decimal, Field(ge=0, max_digits=10, decimal_places=2)]
Id = Annotated[int, Path(ge=1, le=MAX_ID)]


def money(value: Decimal) -> str:
    """A decimal string with two places ("99.00")."""
    return f"{value:.2f}"


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def status_at(activity: KillActivity, now: datetime) -> Literal["not_started", "ongoing", "ended"]:
    """Where ``activity`` is at ``now`` (the window is ``[start_time, end_time)``)."""
    if now < activity.start_time:
        return "not_started"
    return "ongoing" if now < activity.end_time else "ended"


def _sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    return sessions


class NewCourse(BaseModel):
    """A course to sell."""

    name: str = Field(min_length=1, max_length=200)
    price: Price


class NewKillCourse(BaseModel):
    """A course in an activity: its kill price, stock and per-user cap."""

    course_id: int = Field(ge=1, le=MAX_ID)
    kill_price: Price
    kill_count: int = Field(ge=1, le=10_000_000)
    kill_limit: int = Field(default=1, ge=1, le=1000)


class NewActivity(BaseModel):
    """A kill activity and its courses."""

    name: str = Field(min_length=1, max_length=200)
    start_time: UtcDateTime
    end_time: UtcDateTime
    courses: list[NewKillCourse] = Field(min_length=1, max_length=100)

    @model_validator(mode="after")
    def _window(self) -> NewActivity:
        if self.end_time <= self.start_time:
            raise ValueError("end_time must follow start_time")
        return self


router = APIRouter(tags=["activities"], responses=problems(400, 401, 403, 404, 409, 422, 429, 503))


@router.post("/admin/courses", status_code=201)
async def create_course(body: NewCourse, admin: AdminUser, request: Request) -> dict[str, Any]:
    """Add a course: 201 ``{"course_id", "name", "price"}``."""
    async with _sessions(request)() as session:
        course = Course(name=body.name, price=body.price)
        session.add(course)
        await session.commit()
    return {"course_id": course.id, "name": course.name, "price": money(course.price)}


@router.get("/admin/courses")
async def list_courses(admin: AdminUser, request: Request) -> dict[str, Any]:
    """Every course."""
    async with _sessions(request)() as session:
        courses = (await session.scalars(select(Course).order_by(Course.id))).all()
    return {
        "courses": [{"course_id": c.id, "name": c.name, "price": money(c.price)} for c in courses]
    }


@router.post("/admin/activities", status_code=201)
async def create_activity(body: NewActivity, admin: AdminUser, request: Request) -> dict[str, Any]:
    """Add an unpublished activity: 201 ``{"activity_id", "courses": [{"kill_course_id"}]}``."""
    wanted = {c.course_id for c in body.courses}
    if len(wanted) != len(body.courses):
        raise InvalidRequest("a course appears twice in the activity")
    async with _sessions(request)() as session:
        found = set((await session.scalars(select(Course.id).where(Course.id.in_(wanted)))).all())
        missing = sorted(wanted - found)
        if missing:
            raise NotFound(f"no course {missing[0]}")
        activity = KillActivity(
            name=body.name, start_time=body.start_time, end_time=body.end_time, published=False
        )
        session.add(activity)
        await session.flush()
        kill_courses = [
            KillCourse(
                activity_id=activity.id,
                course_id=c.course_id,
                kill_price=c.kill_price,
                kill_count=c.kill_count,
                kill_limit=c.kill_limit,
            )
            for c in body.courses
        ]
        session.add_all(kill_courses)
        await session.commit()
    return {
        "activity_id": activity.id,
        "name": activity.name,
        "start_time": activity.start_time.isoformat(),
        "end_time": activity.end_time.isoformat(),
        "published": False,
        "courses": [
            {
                "kill_course_id": kc.id,
                "course_id": kc.course_id,
                "kill_price": money(kc.kill_price),
                "kill_count": kc.kill_count,
                "kill_limit": kc.kill_limit,
            }
            for kc in kill_courses
        ],
    }


@router.post("/admin/activities/{activity_id}/publish")
async def publish(activity_id: Id, admin: AdminUser, request: Request) -> dict[str, Any]:
    """Warm the cache and publish: 200; 409 ``already-published``; 404 ``not-found``."""
    redis: Redis = request.app.state.redis
    prefix: str = request.app.state.settings.redis_prefix
    async with _sessions(request)() as session:
        activity = await session.get(KillActivity, activity_id)
        if activity is None:
            raise NotFound(f"no activity {activity_id}")
        if activity.published:
            raise AlreadyPublished(f"activity {activity_id} is already published")
        kill_courses = (
            await session.scalars(select(KillCourse).where(KillCourse.activity_id == activity_id))
        ).all()
        for kc in kill_courses:
            await warm_course(
                redis,
                prefix,
                kill_course_id=kc.id,
                activity_id=activity.id,
                kill_count=kc.kill_count,
                kill_limit=kc.kill_limit,
                start_ms=_ms(activity.start_time),
                end_ms=_ms(activity.end_time),
            )
        result = await session.execute(
            update(KillActivity)
            .where(KillActivity.id == activity_id, KillActivity.published.is_(False))
            .values(published=True)
        )
        if getattr(result, "rowcount", 0) != 1:
            raise AlreadyPublished(f"activity {activity_id} is already published")
        await session.commit()
    return {"activity_id": activity_id, "published": True, "kill_courses": len(kill_courses)}


async def _describe(
    request: Request, activities: list[KillActivity], now: datetime
) -> list[dict[str, Any]]:
    ids = [a.id for a in activities]
    async with _sessions(request)() as session:
        rows = (
            await session.execute(
                select(KillCourse, Course.name)
                .join(Course, Course.id == KillCourse.course_id)
                .where(KillCourse.activity_id.in_(ids))
                .order_by(KillCourse.id)
            )
        ).all()
    left = await stock_left(
        request.app.state.redis, request.app.state.settings.redis_prefix, [kc.id for kc, _ in rows]
    )
    courses: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    for kc, name in rows:
        courses[kc.activity_id].append(
            {
                "kill_course_id": kc.id,
                "course_id": kc.course_id,
                "name": name,
                "kill_price": money(kc.kill_price),
                "kill_count": kc.kill_count,
                "kill_limit": kc.kill_limit,
                "stock_left": left.get(kc.id, 0),
            }
        )
    return [
        {
            "activity_id": a.id,
            "name": a.name,
            "status": status_at(a, now),
            "start_time": a.start_time.isoformat(),
            "end_time": a.end_time.isoformat(),
            "courses": courses[a.id],
        }
        for a in activities
    ]


async def server_time(request: Request) -> datetime:
    """Now by the Redis server's clock (the clock the seckill script judges by)."""
    redis: Redis = request.app.state.redis
    seconds, micros = await redis.time()
    return datetime.fromtimestamp(int(seconds) + int(micros) / 1e6, UTC)


@router.get("/activities")
async def list_activities(request: Request) -> dict[str, Any]:
    """Published activities (public): ``{"server_time", "activities": [...]}``."""
    async with _sessions(request)() as session:
        activities = list(
            (
                await session.scalars(
                    select(KillActivity)
                    .where(KillActivity.published.is_(True))
                    .order_by(KillActivity.start_time.desc(), KillActivity.id.desc())
                    .limit(LIST_LIMIT)
                )
            ).all()
        )
    now = await server_time(request)
    return {
        "server_time": now.isoformat(),
        "activities": await _describe(request, activities, now),
    }


@router.get("/activities/{activity_id}")
async def get_activity(activity_id: Id, request: Request) -> dict[str, Any]:
    """One published activity (public) with ``server_time``; 404 ``not-found``."""
    async with _sessions(request)() as session:
        activity = await session.get(KillActivity, activity_id)
    if activity is None or not activity.published:
        raise NotFound(f"no activity {activity_id}")
    now = await server_time(request)
    (described,) = await _describe(request, [activity], now)
    return {**described, "server_time": now.isoformat()}


__all__ = ["money", "router", "server_time", "status_at"]
