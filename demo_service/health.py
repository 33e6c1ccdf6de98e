"""``GET /health``: is this instance able to serve (Redis and the database answer)?"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ymguard import __version__

from . import db

#: Longest a health probe waits for Redis or the database.
PROBE_TIMEOUT_SECONDS = 1.0


async def _answers(check: Awaitable[Any]) -> str:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            await check
    except Exception:
        return "down"
    return "ok"


async def health(request: Request) -> JSONResponse:
    """``{"status", "redis", "database", "version"}``: 200 when both answer, 503 otherwise."""
    state = request.app.state
    redis, database = await asyncio.gather(
        _answers(state.redis.ping()), _answers(db.ping(state.engine))
    )
    ok = redis == database == "ok"
    return JSONResponse(
        {
            "status": "ok" if ok else "down",
            "redis": redis,
            "database": database,
            "version": __version__,
        },
        status_code=200 if ok else 503,
        headers={"Cache-Control": "no-store"},
    )


def add_health(app: FastAPI) -> None:
    """Serve ``GET /health`` on ``app``.

    Added on the app itself, not through ``include_router``: FastAPI 0.16x wraps included
    routers in an object ymguard's resource naming does not look into yet, which would
    name the resource ``"GET "`` instead of ``"GET /health"``.
    """
    app.add_api_route("/health", health, methods=["GET"], tags=["health"])


__all__ = ["PROBE_TIMEOUT_SECONDS", "add_health", "health"]
