"""A FastAPI app for the two-process tests: guarded by ``YMGUARD_TEST_*`` settings."""

from __future__ import annotations

import asyncio
import os

import redis.asyncio as aioredis
from fastapi import FastAPI

from ymguard import Guard, GuardMiddleware

REDIS_URL = os.environ["YMGUARD_TEST_REDIS"]
PREFIX = os.environ["YMGUARD_TEST_PREFIX"]

guard = Guard(
    {
        "key_prefix": PREFIX,
        "resources": {
            "GET /burst/{n}": {"flow": [{"qps": 10}]},
            "GET /slow": {"flow": [{"concurrency": 4}]},
            "GET /hang": {"flow": [{"concurrency": 1, "lease_seconds": 1}]},
        },
    },
    storage=REDIS_URL,
)
app = FastAPI()
app.add_middleware(GuardMiddleware, guard=guard)
guard.install(app)
probe = aioredis.Redis.from_url(REDIS_URL)

# Track how many /slow calls run at once across every process, and the peak.
_ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


@app.get("/health")
async def health() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/burst/{n}")
async def burst(n: int) -> dict[str, int]:
    return {"n": n}


@app.get("/slow")
async def slow() -> dict[str, int]:
    keys = [f"{PREFIX}:running", f"{PREFIX}:peak"]
    await probe.eval(_ENTER, 2, *keys)
    try:
        await asyncio.sleep(0.3)
    finally:
        await probe.decr(keys[0])
    return {"pid": os.getpid()}


@app.get("/hang")
async def hang(seconds: float = 0.0) -> dict[str, int]:
    await asyncio.sleep(seconds)
    return {"pid": os.getpid()}
