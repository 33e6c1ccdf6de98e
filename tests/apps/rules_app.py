"""A FastAPI app for the rules-at-run-time tests: its own rules, then whatever is pushed.

``YMGUARD_TEST_REDIS`` and ``YMGUARD_TEST_PREFIX`` name the Redis and key prefix;
``GET /rules`` says which rules version is in force and the limit of ``GET /items``.
With ``YMGUARD_TEST_START=middleware`` the app does not start the guard itself:
``GuardMiddleware`` starts it at the app's first ASGI call.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from ymguard import Guard, GuardMiddleware

guard = Guard(
    {
        "key_prefix": os.environ["YMGUARD_TEST_PREFIX"],
        "resources": {"GET /items": {"flow": [{"qps": 1000}]}},
    },
    storage=os.environ["YMGUARD_TEST_REDIS"],
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if os.environ.get("YMGUARD_TEST_START") != "middleware":
        await guard.start()  # the newest pushed version is in force before the first request
    yield
    await guard.aclose()


app = FastAPI(lifespan=lifespan)
app.add_middleware(GuardMiddleware, guard=guard)
guard.install(app)


@app.get("/items")
async def items() -> dict[str, str]:
    return {"pid": str(os.getpid())}


@app.get("/rules")
async def rules() -> dict[str, Any]:
    flow = guard.rules.resources["GET /items"].flow
    return {
        "version": guard.rules_version,
        "digest": guard.rules_digest,
        "qps": flow[0].qps if flow else None,
    }
