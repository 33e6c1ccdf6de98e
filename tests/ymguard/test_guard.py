"""The Guard's ways into an app: ``guard.limit``, sync ``@guard.resource``, the origin."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI

from ymguard import Guard, GuardMiddleware, SyncResourceError
from ymguard.chain import ORIGIN_MAX_CHARS, cap_origin
from ymguard.storage import MemoryStore


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
    guard._loop = asyncio.get_running_loop()
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


# -- origins are capped --------------------------------------------------------------------


def origin_guard() -> Guard:
    return Guard(
        {
            "origin": {"from": "header", "name": "X-Caller"},
            "resources": {"GET /x": {"flow": [{"qps": 1, "origin": "other"}]}},
        }
    )


def scope_with(caller: bytes) -> dict[str, Any]:
    return {"type": "http", "headers": [(b"x-caller", caller)]}


def test_long_or_odd_origins_become_a_fixed_length_digest() -> None:
    guard = origin_guard()
    plain = guard.origin_of(scope_with(b"app-a"))
    huge = guard.origin_of(scope_with(b"v" * 60_000))
    huge2 = guard.origin_of(scope_with(b"v" * 59_999 + b"w"))
    odd = guard.origin_of(scope_with("caf\u00e9".encode("latin-1")))
    assert plain == "app-a"
    assert len(huge) == len(huge2) == len(odd) == 33 and huge.startswith("~")
    assert len({huge, huge2, odd}) == 3
    assert guard.origin_of(scope_with(b"x" * ORIGIN_MAX_CHARS)) == "x" * ORIGIN_MAX_CHARS
    assert len(guard.origin_of(scope_with(b"x" * (ORIGIN_MAX_CHARS + 1)))) == 33


async def test_a_non_ascii_origin_named_in_the_rules_matches_the_header_it_names() -> None:
    # The rules file is UTF-8; a header origin read as latin-1 never matched "café".
    rules = {"origin": {"from": "header", "name": "X-Caller"}}
    rules["resources"] = {"GET /x": {"flow": [{"qps": 1, "origin": "caf\u00e9"}]}}
    guard = Guard(rules)
    app = FastAPI()

    @app.get("/x")
    async def x() -> str:
        return "ok"

    app.add_middleware(GuardMiddleware, guard=guard)
    cafe = {"x-caller": "caf\u00e9".encode()}
    async with client(app) as c:
        statuses = [(await c.get("/x", headers=cafe)).status_code for _ in range(3)]
        other = (await c.get("/x", headers={"x-caller": "tea"})).status_code
    assert (statuses, other) == ([200, 429, 429], 200)
    # Bytes that are not UTF-8 still give distinct origins.
    assert guard.origin_of(scope_with(b"\xff")) != guard.origin_of(scope_with(b"\xfe"))


def test_a_digest_sent_as_an_origin_is_not_the_origin_it_digests() -> None:
    # Else a caller could send another caller's digest and share its state.
    victim = "v" * 200
    assert cap_origin(cap_origin(victim)) != cap_origin(victim)
    assert cap_origin("a b") != "a b" and cap_origin("") == ""


async def test_a_60kb_origin_keeps_only_a_digest_in_the_store() -> None:
    guard = origin_guard()
    app = FastAPI()

    @app.get("/x")
    async def x() -> str:
        return "ok"

    app.add_middleware(GuardMiddleware, guard=guard)
    async with client(app) as c:
        for i in range(20):
            caller = (f"caller-{i}:" * 6_000)[:60_000]
            assert (await c.get("/x", headers={"X-Caller": caller})).status_code == 200
    assert isinstance(guard.store, MemoryStore)
    assert len(guard.store.data) == 20
    assert max(len(key) for key in guard.store.data) < 100
