"""A FastAPI app for the semaphore's uvicorn tests (``tests/ymguard/test_semaphore.py``).

Settings come from the environment: ``YMGUARD_STORAGE`` (read by the Guard itself),
``SEM_TEST_PREFIX`` (the key prefix) and, with two processes, ``SEM_TEST_REDIS`` where
``/slow`` counts the calls running at once in every process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from ymguard import Guard, GuardMiddleware

PREFIX = os.environ["SEM_TEST_PREFIX"]
REDIS_URL = os.environ.get("SEM_TEST_REDIS")

guard = Guard(
    {
        "key_prefix": PREFIX,
        "resources": {
            "GET /slow": {"semaphore": {"permits": 2, "lease_seconds": 1}},
            "GET /stream": {"semaphore": {"permits": 1, "lease_seconds": 3, "name": "feed"}},
            "GET /peek": {"semaphore": {"permits": 1, "lease_seconds": 3, "name": "feed"}},
            # A long lease: only the client going away can free this permit quickly.
            "GET /sleep": {"semaphore": {"permits": 1, "lease_seconds": 60, "name": "bed"}},
            "GET /bed": {"semaphore": {"permits": 1, "lease_seconds": 60, "name": "bed"}},
            "GET /after": {
                "semaphore": {"permits": 1, "lease_seconds": 3, "name": "feed", "wait_ms": 8000}
            },
        },
    }
)
app = FastAPI()
app.add_middleware(GuardMiddleware, guard=guard)
guard.install(app)
counter = aioredis.Redis.from_url(REDIS_URL) if REDIS_URL else None
_running = 0


@app.get("/health")
async def health() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/slow")
async def slow() -> dict[str, int]:
    """Sleeps a while; answers how many /slow calls ran at once when it started."""
    global _running
    key = f"{PREFIX}:running"
    if counter is not None:
        running = int(await counter.incr(key))
    else:
        _running += 1
        running = _running
    try:
        await asyncio.sleep(0.2)
    finally:
        if counter is not None:
            await counter.decr(key)
        else:
            _running -= 1
    return {"running": running, "pid": os.getpid()}


@app.get("/stream")
async def stream() -> StreamingResponse:
    """A long feed (a minute): it holds the ``feed`` permit until the client goes away."""

    async def lines() -> AsyncIterator[bytes]:
        for i in range(600):
            yield f"{i}\n".encode()
            await asyncio.sleep(0.1)

    return StreamingResponse(lines(), media_type="text/plain")


@app.get("/peek")
async def peek() -> dict[str, bool]:
    """Shares ``feed`` without waiting: 429 while someone holds it."""
    return {"ok": True}


@app.get("/after")
async def after() -> dict[str, bool]:
    """Shares ``feed`` and waits up to 8 s for it."""
    return {"ok": True}


@app.get("/sleep")
async def sleep() -> dict[str, bool]:
    """A plain (not streamed) endpoint that runs a minute, holding the ``bed`` permit."""
    await asyncio.sleep(60)
    return {"ok": True}


@app.get("/bed")
async def bed() -> dict[str, bool]:
    """Shares ``bed`` without waiting: 429 while /sleep holds it."""
    return {"ok": True}
