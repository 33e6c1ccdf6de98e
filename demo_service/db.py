"""The SQL database: one SQLAlchemy async engine per process, by URL, and the schema.

SQLite (aiosqlite) by default, PostgreSQL (asyncpg) with
``DATABASE_URL=postgresql+asyncpg://...``. SQLite runs in WAL mode with a busy timeout so
that several workers can share the file. libpq's ``options=-c name=value`` query parameter
(e.g. ``?options=-csearch_path%3Dshop``) works with asyncpg too: it becomes asyncpg's
``server_settings``, which asyncpg does not take from the URL itself.
"""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from .models import Base

#: The key of the PostgreSQL advisory lock held while one worker creates the schema.
_SCHEMA_LOCK = 0x796D6775617264  # "ymguard"


def _server_settings(url: URL) -> tuple[URL, dict[str, str]]:
    """Move libpq's ``options=-c k=v`` out of an asyncpg URL into ``server_settings``."""
    raw = url.query.get("options")
    if raw is None or url.get_driver_name() != "asyncpg":
        return url, {}
    settings: dict[str, str] = {}
    for value in [raw] if isinstance(raw, str) else list(raw):
        words = shlex.split(value)
        i = 0
        while i < len(words):
            word = words[i]
            if word == "-c" and i + 1 < len(words):
                i += 1
                word = words[i]
            elif word.startswith("-c"):
                word = word[2:]
            elif word.startswith("--"):
                word = word[2:]  # libpq also takes --name=value
            else:
                raise ValueError(f"DATABASE_URL options: cannot use {word!r} (only -c name=value)")
            name, sep, setting = word.partition("=")
            if not sep:
                raise ValueError(f"DATABASE_URL options: {word!r} is not name=value")
            settings[name] = setting
            i += 1
    return url.difference_update_query(["options"]), settings


def make_engine(database_url: str) -> AsyncEngine:
    """An async engine for ``database_url``; for a SQLite file, its directory is created."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        url, server_settings = _server_settings(url)
        connect_args: dict[str, Any] = {}
        if server_settings:
            connect_args["server_settings"] = server_settings
        return create_async_engine(
            url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args
        )
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url)

    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions on ``engine`` whose objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    """Run ``SELECT 1``; raises whatever the driver raises when the database is down."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def create_schema(engine: AsyncEngine) -> None:
    """Create every table that does not exist yet; safe with several workers at once.

    On PostgreSQL the workers take turns under an advisory lock; SQLite's file lock makes
    a second ``CREATE TABLE`` fail instead, so a worker that loses the race tries again
    (and then finds the tables there).
    """
    for attempt in range(5):
        try:
            async with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    await conn.execute(text(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})"))
                await conn.run_sync(Base.metadata.create_all)
            return
        except DBAPIError:
            if attempt == 4:
                raise
            await asyncio.sleep(0.1 * (attempt + 1))


__all__ = ["create_schema", "make_engine", "make_sessionmaker", "ping"]
