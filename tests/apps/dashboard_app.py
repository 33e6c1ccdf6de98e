"""A FastAPI app with the dashboard mounted, for the dashboard's browser test.

Settings from the environment: ``YMGUARD_TEST_REDIS`` (the store; ``memory://`` works too)
and ``YMGUARD_TEST_PREFIX`` (the key prefix). The dashboard at ``/ymguard/`` lets in
requests with ``X-Dashboard-Token: open-sesame`` only.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ymguard import Guard, GuardMiddleware

STORE = os.environ.get("YMGUARD_TEST_REDIS", "memory://")
PREFIX = os.environ.get("YMGUARD_TEST_PREFIX", "ymguard")
TOKEN = "open-sesame"

#: The rules: one resource of each figure the test reads (passed, blocked, errors).
RULES = {
    "key_prefix": PREFIX,
    "resources": {
        "GET /items/{item_id}": {"flow": [{"qps": 10000}]},
        # No permit ever: every call is refused (a blocked figure that does not depend on time).
        "GET /closed": {"semaphore": {"permits": 0}},
        "GET /fail": {"breaker": [{"strategy": "error_count", "threshold": 1000000}]},
        "GET /pool": {"semaphore": {"name": "pool", "permits": 4}},
    },
}

guard = Guard(RULES, storage=STORE)
app = FastAPI()
app.add_middleware(GuardMiddleware, guard=guard)
guard.install(app)


def authorize(request: Request) -> bool:
    """Only callers with the test's token see the dashboard."""
    return request.headers.get("x-dashboard-token") == TOKEN


app.mount("/ymguard", guard.dashboard(authorize=authorize, title="example shop"))


@app.get("/health")
async def health() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/items/{item_id}")
async def item(item_id: int) -> dict[str, int]:
    return {"item_id": item_id}


@app.get("/closed")
async def closed() -> dict[str, str]:
    return {"never": "reached"}


@app.get("/fail")
async def fail() -> JSONResponse:
    return JSONResponse({"error": "on purpose"}, status_code=500)


@app.get("/pool")
async def pool() -> dict[str, str]:
    return {"ok": "yes"}
