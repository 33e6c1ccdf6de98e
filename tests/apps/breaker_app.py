"""A Starlette app for the two-process breaker tests, guarded by ``YMGUARD_TEST_*`` settings.

``GET /work`` is guarded by an ``error_count`` breaker that opens on the first error:
``?fail=1`` answers 500, ``?hold=1`` waits until ``POST /release`` (so a probe stays in
flight while the test counts who else got in). ``GET /hits`` says how many calls reached
the endpoint in this process, ``GET /state`` what this process thinks the breaker is.
"""

from __future__ import annotations

import asyncio
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ymguard import Guard, GuardMiddleware

REDIS_URL = os.environ["YMGUARD_TEST_REDIS"]
PREFIX = os.environ["YMGUARD_TEST_PREFIX"]
OPEN_SECONDS = float(os.environ.get("YMGUARD_TEST_OPEN_SECONDS", "1"))

guard = Guard(
    {
        "key_prefix": PREFIX,
        "resources": {
            "GET /work": {
                "breaker": [
                    {
                        "strategy": "error_count",
                        "threshold": 0,
                        "min_requests": 1,
                        "window_seconds": 5,
                        "open_seconds": OPEN_SECONDS,
                        "probe_lease_seconds": 20,
                    }
                ]
            }
        },
    },
    storage=REDIS_URL,
)
hits = 0
release = asyncio.Event()


async def work(request: Request) -> Response:
    global hits
    hits += 1
    if request.query_params.get("fail"):
        return PlainTextResponse("down", status_code=500)
    if request.query_params.get("hold"):
        await asyncio.wait_for(release.wait(), 20)
    return PlainTextResponse("ok")


async def release_held(request: Request) -> Response:
    release.set()
    return PlainTextResponse("released")


async def count(request: Request) -> Response:
    return JSONResponse({"hits": hits, "pid": os.getpid()})


async def state(request: Request) -> Response:
    return JSONResponse({"state": guard.breakers()[0].state})


app = Starlette(
    routes=[
        Route("/work", work),
        Route("/release", release_held, methods=["POST"]),
        Route("/hits", count),
        Route("/state", state),
    ]
)
app.add_middleware(GuardMiddleware, guard=guard)
