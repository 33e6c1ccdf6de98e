"""Fixtures of the shop's tests: a database of each kind, and the app running in-process.

``database_url`` is an empty database: a SQLite file, or a schema of its own on the
PostgreSQL at 127.0.0.1:5432 (database ``test``), dropped afterwards; PostgreSQL tests
fail rather than skip when ``YMGUARD_REQUIRE_REDIS=1`` (CI). ``shop`` runs the app's
lifespan on the shared Redis under key prefixes of its own (guards and shop keys) and
talks to it over ASGI with httpx.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import insert

from demo_service.accounts import Principal, hash_password
from demo_service.app import create_app
from demo_service.models import User
from demo_service.settings import Settings
from tests.conftest import require_redis
from tests.helpers import REQUIRE_REDIS, unique_prefix

PG_DSN = os.environ.get("YMGUARD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex[:12]
#: Tests sign tokens with this secret instead of one generated per database.
TOKEN_SECRET = "test-secret-" + "x" * 40


async def _pg(sql: str) -> None:
    conn = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_url(schema: str) -> str:
    """The SQLAlchemy URL of ``schema`` in the test database."""
    rest = PG_DSN.split("://", 1)[1]
    return f"postgresql+asyncpg://{rest}?options=-csearch_path%3D{schema}"


@contextlib.asynccontextmanager
async def temp_postgres() -> AsyncIterator[str]:
    """The URL of a fresh schema in the test database, dropped afterwards.

    Skips when PostgreSQL does not answer, or fails under ``YMGUARD_REQUIRE_REDIS=1`` (CI).
    """
    schema = "t_" + uuid.uuid4().hex[:12]
    try:
        await _pg(f"CREATE SCHEMA {schema}")
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL does not answer at {PG_DSN}: {exc}"
        if REQUIRE_REDIS:
            pytest.fail(message + " (CI: PostgreSQL tests must run)")
        pytest.skip(message)
    try:
        yield pg_url(schema)
    finally:
        await _pg(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of each kind (SQLite file; PostgreSQL schema of its own)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}"
        return
    async with temp_postgres() as url:
        yield url


@pytest.fixture
def shop_settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings of a shop on ``database_url`` and the shared Redis, under fresh prefixes."""
    redis_url = require_redis()
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        key_prefix=unique_prefix(),
        redis_prefix=unique_prefix(),
        demo_admin_password=ADMIN_PASSWORD,
        token_secret=TOKEN_SECRET,
        var_dir=tmp_path / "var",
    )


class Shop:
    """The app, started, and an httpx client on it; helpers for the usual steps."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://shop", timeout=60
        )
        self._admin: dict[str, str] | None = None

    @property
    def redis(self) -> Redis:
        """The shop's own Redis client."""
        redis: Redis = self.app.state.redis
        return redis

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        """The header of a bearer token."""
        return {"Authorization": f"Bearer {token}"}

    async def admin(self) -> dict[str, str]:
        """The admin's auth header (logged in over HTTP once)."""
        if self._admin is None:
            response = await self.client.post(
                "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            assert response.status_code == 200, response.text
            self._admin = self.auth(response.json()["token"])
        return self._admin

    async def users(self, count: int) -> list[dict[str, str]]:
        """``count`` buyers made straight in the database (one hash for all: hashing 500
        passwords would take most of a minute), with their auth headers."""
        password_hash = await hash_password("buyer-password")
        names = [f"buyer-{uuid.uuid4().hex[:10]}" for _ in range(count)]
        async with self.app.state.sessionmaker() as session:
            await session.execute(
                insert(User), [{"username": n, "password_hash": password_hash} for n in names]
            )
            await session.commit()
            rows = (
                await session.execute(
                    User.__table__.select().where(User.username.in_(names))  # type: ignore[attr-defined]
                )
            ).all()
        tokens = self.app.state.tokens
        return [self.auth(tokens.issue(Principal(r.id, r.username, False))) for r in rows]

    async def course(self, name: str = "Python", price: str = "199.00") -> int:
        """A new course's id."""
        response = await self.client.post(
            "/admin/courses", json={"name": name, "price": price}, headers=await self.admin()
        )
        assert response.status_code == 201, response.text
        return int(response.json()["course_id"])

    async def activity(
        self,
        *,
        kill_count: int = 10,
        kill_limit: int = 1,
        start: timedelta = timedelta(minutes=-1),
        length: timedelta = timedelta(hours=1),
        publish: bool = True,
    ) -> dict[str, Any]:
        """A new activity with one kill course (ongoing by default), published."""
        course_id = await self.course()
        start_time = datetime.now(UTC) + start
        response = await self.client.post(
            "/admin/activities",
            json={
                "name": "Flash sale",
                "start_time": start_time.isoformat(),
                "end_time": (start_time + length).isoformat(),
                "courses": [
                    {
                        "course_id": course_id,
                        "kill_price": "9.90",
                        "kill_count": kill_count,
                        "kill_limit": kill_limit,
                    }
                ],
            },
            headers=await self.admin(),
        )
        assert response.status_code == 201, response.text
        activity: dict[str, Any] = response.json()
        if publish:
            published = await self.client.post(
                f"/admin/activities/{activity['activity_id']}/publish", headers=await self.admin()
            )
            assert published.status_code == 200, published.text
        return activity


async def delete_prefixed(redis_url: str, *prefixes: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        for prefix in prefixes:
            keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
            for i in range(0, len(keys), 500):
                await client.delete(*keys[i : i + 500])
    finally:
        await client.aclose()


@pytest.fixture
async def shop(shop_settings: Settings) -> AsyncIterator[Shop]:
    """The shop running in-process (lifespan started) on a fresh database and prefixes."""
    s = Shop(shop_settings)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(s.app.router.lifespan_context(s.app))
        stack.push_async_callback(s.client.aclose)
        yield s
    assert shop_settings.redis_url is not None
    await delete_prefixed(
        shop_settings.redis_url, shop_settings.key_prefix or "", shop_settings.redis_prefix
    )


def settings_for(shop: Shop, **changes: Any) -> Settings:
    """The shop's settings with ``changes`` (another app on the same database and Redis)."""
    return replace(shop.settings, **changes)
