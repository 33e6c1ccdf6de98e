"""A FastAPI app for the two-process shaping tests: one queue, one warm-up, one relate."""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI

from ymguard import Guard, GuardMiddleware

REDIS_URL = os.environ["YMGUARD_TEST_REDIS"]
PREFIX = os.environ["YMGUARD_TEST_PREFIX"]

guard = Guard(
    {
        "key_prefix": PREFIX,
        "resources": {
            "queue-inner": {"flow": [{"qps": 1, "behavior": "queue", "max_queue_ms": 2000}]},
            "warm-inner": {"flow": [{"qps": 60, "behavior": "warm_up", "warm_up_seconds": 2}]},
            "GET /read": {
                "flow": [{"qps": 3, "strategy": "relate", "ref_resource": "POST /write"}]
            },
        },
    },
    storage=REDIS_URL,
)
app = FastAPI()
app.add_middleware(GuardMiddleware, guard=guard)
guard.install(app)


@app.get("/health")
async def health() -> dict[str, int]:
    return {"pid": os.getpid()}


@guard.resource("queue-inner", block_handler=lambda: False)
async def queue_inner() -> bool:
    return True


@app.get("/queue")
async def queue(n: int) -> dict[str, int]:
    """``n`` calls of a queued code resource at once."""
    results = await asyncio.gather(*(queue_inner() for _ in range(n)))
    return {"admitted": sum(results)}


@guard.resource("warm-inner", block_handler=lambda: False)
async def warm_inner() -> bool:
    return True


@app.get("/warm")
async def warm(n: int) -> dict[str, int]:
    """``n`` calls of a warm-up code resource at once (a burst without HTTP's spread)."""
    results = await asyncio.gather(*(warm_inner() for _ in range(n)))
    return {"admitted": sum(results)}


@app.get("/read")
async def read() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.post("/write")
async def write() -> dict[str, int]:
    return {"pid": os.getpid()}
