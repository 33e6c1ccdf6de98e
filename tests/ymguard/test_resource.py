"""Guarding code: ``guard.limit`` on routes and functions, ``@guard.resource`` on sync code."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI

from ymguard import Guard, GuardMiddleware, SyncResourceError


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


# -- guard.limit -------------------------------------------------------------------------


def test_guard_limit_above_the_route_decorator_fails_at_decoration_time() -> None:
    guard = Guard()
    app = FastAPI()
    with pytest.raises(TypeError, match=r"above the route decorator of .*search"):

        @guard.limit("1/second")
        @app.get("/search")
        async def search() -> str:
            return "found"


def test_guard_limit_above_a_routers_decorator_fails_too() -> None:
    guard = Guard()
    router = APIRouter()
    with pytest.raises(TypeError, match=r"Put @guard\.limit"):

        @guard.limit("1/second")
        @router.post("/orders")
        def order() -> str:
            return "ordered"


def test_guard_limit_applied_by_call_to_a_named_function_wraps_it() -> None:
    guard = Guard()

    def report() -> str:
        return "report"

    limited = guard.limit("1/second")(report)
    assert limited is not report and limited() == "report"


async def test_guard_limit_names_the_route_the_same_way_in_both_forms(
    storage_uri: str, prefix: str
) -> None:
    guard = Guard({"key_prefix": prefix}, storage=storage_uri)
    app = FastAPI()
    decorator, dependency = guard.limit("2/second"), guard.limit("2/second")

    @app.get("/search/{q}")
    @decorator
    async def search(q: str, page: int = 1) -> dict[str, Any]:
        return {"q": q, "page": page}

    @app.get("/find/{q}", dependencies=[Depends(dependency)])
    async def find(q: str) -> dict[str, str]:
        return {"q": q}

    guard.install(app)
    async with client(app) as c:
        searched = [await c.get(f"/search/{i}", params={"page": 3}) for i in range(3)]
        found = [await c.get(f"/find/{i}") for i in range(3)]
    await guard.aclose()
    assert [r.status_code for r in searched] == [200, 200, 429]
    assert searched[0].json() == {"q": "0", "page": 3}
    assert [r.status_code for r in found] == [200, 200, 429]
    # One naming: the route's resource name, whichever form limits it.
    assert list(decorator._chains) == ["GET /search/{q}"]
    assert list(dependency._chains) == ["GET /find/{q}"]
    assert searched[2].json()["resource"] == "GET /search/{q} limit 2/second"
    assert found[2].json()["resource"] == "GET /find/{q} limit 2/second"


async def test_guard_limit_decorator_behind_the_middleware_uses_the_route_name() -> None:
    guard = Guard()
    app = FastAPI()
    limit = guard.limit("1/second")

    @app.post("/orders")
    @limit
    def order() -> str:  # a sync endpoint: FastAPI runs it in a worker thread
        return "ordered"

    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    async with client(app) as c:
        assert [(await c.post("/orders")).status_code for _ in range(2)] == [200, 429]
    assert list(limit._chains) == ["POST /orders"]


# -- sync @guard.resource on the event loop's thread -------------------------------------


async def test_a_sync_resource_on_the_event_loop_thread_is_refused_on_every_store(
    storage_uri: str, prefix: str
) -> None:
    guard = Guard(
        {"key_prefix": prefix, "resources": {"sync": {"flow": [{"qps": 5}]}}},
        storage=storage_uri,
    )
    guard.bind_loop()
    ran: list[int] = []

    @guard.resource("sync")
    def body(x: int) -> int:
        ran.append(x)
        return x

    with pytest.raises(SyncResourceError, match="'sync' was called on the event loop's thread"):
        body(1)
    assert ran == [] and guard.stats("sync").counts().passed == 0  # refused before spending
    assert await asyncio.to_thread(body, 2) == 2  # from a worker thread it runs
    await guard.aclose()


async def test_a_sync_resource_on_the_event_loop_thread_calls_its_fallback(
    storage_uri: str, prefix: str
) -> None:
    guard = Guard({"key_prefix": prefix}, storage=storage_uri)
    seen: list[BaseException] = []

    def fallback(x: int, exc: BaseException) -> str:
        seen.append(exc)
        return f"fallback {x}"

    @guard.resource("sync", fallback=fallback)
    def body(x: int) -> str:
        return f"ran {x}"

    assert body(1) == "fallback 1"
    assert len(seen) == 1 and isinstance(seen[0], SyncResourceError)
    await guard.aclose()


def test_a_sync_resource_with_no_loop_runs_on_memory() -> None:
    guard = Guard({"resources": {"sync": {"flow": [{"qps": 1}]}}})

    @guard.resource("sync", block_handler=lambda: "blocked")
    def body() -> str:
        return "ran"

    assert [body(), body()] == ["ran", "blocked"]


def test_a_sync_permit_with_no_loop_to_keep_its_lease_on_is_refused_before_it_is_taken() -> None:
    # A permit's lease is kept on an event loop; with none, the call fails before it takes
    # one (taken first, it would never be given back).
    guard = Guard(
        {
            "resources": {
                "conc": {"flow": [{"concurrency": 1}]},
                "sem": {"semaphore": {"permits": 1}},
            }
        },
        metrics=False,
    )
    for name in ("conc", "sem"):

        @guard.resource(name)
        def work() -> int:
            return 1

        @guard.resource(name)
        async def awork() -> int:
            return 2

        for _ in range(2):
            with pytest.raises(RuntimeError):
                work()
        assert asyncio.run(awork()) == 2, name  # the one permit is free


async def test_a_sync_resource_runs_its_body_in_the_callers_thread(
    redis_url: str, prefix: str
) -> None:
    guard = Guard(
        {"key_prefix": prefix, "resources": {"sync": {"flow": [{"qps": 5}]}}}, storage=redis_url
    )
    guard.bind_loop()

    @guard.resource("sync")
    def body() -> str:
        return threading.current_thread().name

    assert await asyncio.to_thread(body) != threading.main_thread().name
    assert guard.stats("sync").inflight == 0
    await guard.aclose()


def test_a_sync_resource_on_redis_without_a_loop_refuses_before_spending(
    redis_url: str, prefix: str
) -> None:
    guard = Guard(
        {"key_prefix": prefix, "resources": {"sync": {"flow": [{"qps": 1}]}}}, storage=redis_url
    )

    @guard.resource("sync")
    def body() -> str:
        return "ran"

    with pytest.raises(RuntimeError, match="worker thread"):
        body()
    assert guard.stats("sync").counts().passed == 0


async def test_guard_limit_leaves_nothing_in_flight() -> None:
    guard = Guard()
    limit = guard.limit("5/second")

    @limit
    async def endpoint() -> str:
        return "ok"

    for _ in range(3):
        await endpoint()
    (chain,) = limit._chains.values()
    assert chain.stats.inflight == 0 and chain.stats.counts().passed == 3
