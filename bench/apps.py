"""The benchmarked app: one FastAPI route, guarded (or not) as ``BENCH_VARIANT`` says.

``uvicorn bench.apps:app`` serves ``GET /items/{item_id}`` (small JSON) in one of:

- ``plain``: FastAPI alone.
- ``asgi-noop``: a pure ASGI middleware that does nothing (the floor of any middleware).
- ``ymguard-norule``: ``GuardMiddleware`` on the memory store, no rule on the route.
- ``ymguard-memory`` / ``ymguard-redis``: ``GuardMiddleware`` with one ``flow`` qps rule
  on the route's resource, on the memory store or on Redis.
- ``ymguard-redis-prefetch``: the same rule with ``prefetch: true`` (permits taken from
  Redis a few at a time, most calls admitted without a round trip).
- ``ymguard-full-memory`` / ``ymguard-full-redis``: qps + concurrency + breaker +
  semaphore on the route (none ever refuses at the bench's load).
- ``slowapi-memory`` / ``slowapi-redis``: slowapi's quick start (``@limiter.limit`` on the
  endpoint, ``app.state.limiter``, its ``RateLimitExceeded`` handler), optionally with its
  ``SlowAPIMiddleware``, on memory or Redis.

Environment:
    BENCH_VARIANT: the variant (default ``plain``).
    BENCH_QPS: the limit per second (default 10_000_000: the check runs, never blocks).
    BENCH_REDIS_URL: the Redis for the ``*-redis`` variants (default
        ``redis://127.0.0.1:6379/0``).
    BENCH_KEY_PREFIX: the key prefix on Redis (default ``ymbench``); make it unique.
    BENCH_SLOWAPI_MIDDLEWARE: ``1`` adds ``SlowAPIMiddleware`` (slowapi's setup for
        global limits); ``0`` (default) is the quick start, the decorator alone.
    BENCH_GC_FREEZE: ``1`` moves everything alive once the app is built out of the
        garbage collector's reach (``gc.freeze()``, as a tuned service does after start-up);
        ``0`` (default) leaves the collector as a plain app has it.

Every variant also serves ``GET /_bench/gc``: the garbage collector's pauses so far (how
many collections of each generation, their total time, and the longest pause since the
last read). An app whose requests wait mid-way (for Redis) keeps more objects alive across
collections, and the full collections this brings pause the whole process.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from fastapi import FastAPI, Request

VARIANTS = (
    "plain",
    "asgi-noop",
    "ymguard-norule",
    "ymguard-memory",
    "ymguard-redis",
    "ymguard-redis-prefetch",
    "ymguard-full-memory",
    "ymguard-full-redis",
    "slowapi-memory",
    "slowapi-redis",
)
RESOURCE = "GET /items/{item_id}"

VARIANT = os.environ.get("BENCH_VARIANT", "plain")
QPS = int(os.environ.get("BENCH_QPS", "10000000"))
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY_PREFIX = os.environ.get("BENCH_KEY_PREFIX", "ymbench")
SLOWAPI_MIDDLEWARE = os.environ.get("BENCH_SLOWAPI_MIDDLEWARE", "0") == "1"
GC_FREEZE = os.environ.get("BENCH_GC_FREEZE", "0") == "1"

if VARIANT not in VARIANTS:
    raise SystemExit(f"BENCH_VARIANT={VARIANT!r}: use one of {', '.join(VARIANTS)}")

app = FastAPI()


async def get_item(item_id: int, request: Request) -> dict[str, Any]:
    """The endpoint every variant serves (slowapi needs the ``request`` parameter)."""
    return {"item_id": item_id, "name": "widget", "price": 9.5}


if VARIANT.startswith("ymguard"):
    from ymguard import Guard, GuardMiddleware

    rules: dict[str, Any] = {"flow": [{"qps": QPS, "prefetch": VARIANT.endswith("prefetch")}]}
    if VARIANT.startswith("ymguard-full"):
        # The limits are never reached at the bench's 32 connections (QPS: the sanity pass).
        rules = {
            "flow": [{"qps": QPS}, {"concurrency": max(QPS, 1000)}],
            "breaker": [{"strategy": "error_ratio", "threshold": 0.5}],
            "semaphore": {"permits": max(QPS, 1000)},
        }
    guard = Guard(
        rules={
            "key_prefix": KEY_PREFIX,
            "resources": {} if VARIANT == "ymguard-norule" else {RESOURCE: rules},
        },
        storage=REDIS_URL if "redis" in VARIANT else "memory://",
    )
    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    app.get("/items/{item_id}")(get_item)

    @app.get("/_bench/writes", include_in_schema=False)
    async def writes() -> dict[str, int]:
        """Writes (round trips) on the store's pipelined connection so far."""
        pipe = getattr(guard.store, "_pipe", None)
        return {"writes": pipe.writes if pipe is not None else 0}

elif VARIANT == "asgi-noop":

    class Noop:
        """A pure ASGI middleware that only passes the call on."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)

    app.add_middleware(Noop)
    app.get("/items/{item_id}")(get_item)

elif VARIANT.startswith("slowapi"):
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.util import get_remote_address

    limiter = Limiter(
        key_func=get_remote_address,
        storage_uri="memory://" if VARIANT == "slowapi-memory" else REDIS_URL,
        key_prefix=KEY_PREFIX,
    )
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    if SLOWAPI_MIDDLEWARE:
        from slowapi.middleware import SlowAPIMiddleware

        app.add_middleware(SlowAPIMiddleware)
    app.get("/items/{item_id}")(limiter.limit(f"{QPS}/second")(get_item))

else:
    app.get("/items/{item_id}")(get_item)


class GCPauses:
    """The collector's pauses, timed by a ``gc.callbacks`` hook (it runs per collection)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = 0.0  # since the last read

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        took = time.perf_counter() - self.started
        generation = info["generation"]
        self.collections[generation] += 1
        self.seconds[generation] += took
        self.longest = max(self.longest, took)

    def read(self) -> dict[str, Any]:
        longest, self.longest = self.longest, 0.0
        return {
            "collections": list(self.collections),
            "seconds": list(self.seconds),
            "longest_s": longest,
            "frozen": gc.get_freeze_count(),
        }


gc_pauses = GCPauses()


@app.get("/_bench/gc", include_in_schema=False)
async def gc_stats() -> dict[str, Any]:
    """The garbage collector's pauses so far (see :class:`GCPauses`)."""
    return gc_pauses.read()


if GC_FREEZE:  # after every import and the app's construction, as a service would
    gc.collect()
    gc.freeze()
gc.callbacks.append(gc_pauses)
