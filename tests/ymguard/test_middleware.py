"""GuardMiddleware and the exception mapper, end to end through real ASGI apps."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Host, Route, Router

from tests.helpers import http_scope
from ymguard import Blocked, FlowLimited, Guard, GuardMiddleware
from ymguard.errors import PROBLEM_BASE


class SoldOut(Exception):
    """The app's own exception, mapped by the rules file's ``errors:``."""


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def shop(guard: Guard) -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.post("/kill/{course_id}")
    async def kill(course_id: int) -> dict[str, int]:
        if course_id == 0:
            raise SoldOut("course 0 is sold out")
        return {"course": course_id}

    sub = Starlette(routes=[Route("/hello/{name}", lambda r: PlainTextResponse("hi"))])
    app.mount("/sub", sub)
    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    return app


async def test_one_resource_per_route_template(storage_uri: str, prefix: str) -> None:
    guard = Guard(
        {"key_prefix": prefix, "resources": {"GET /items/{item_id}": {"flow": [{"qps": 3}]}}},
        storage=storage_uri,
    )
    async with client(shop(guard)) as c:
        statuses = [(await c.get(f"/items/{i}")).status_code for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert guard.stats("GET /items/{item_id}").counts().passed == 3
    await guard.aclose()


async def test_blocked_is_problem_json_with_retry_after_and_ratelimit(
    storage_uri: str, prefix: str
) -> None:
    rules = {"key_prefix": prefix, "resources": {"GET /items/{item_id}": {"flow": [{"qps": 1}]}}}
    guard = Guard(rules, storage=storage_uri)
    async with client(shop(guard)) as c:
        await c.get("/items/1")
        response = await c.get("/items/2")
    await guard.aclose()
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == PROBLEM_BASE + "flow-limited"
    assert body["status"] == 429 and body["title"] and body["detail"]
    assert body["resource"] == "GET /items/{item_id}"
    assert response.headers["retry-after"] == "1"
    assert response.headers["ratelimit-policy"] == '"flow";q=1;w=1'
    assert response.headers["ratelimit"] == '"flow";r=0;t=1'


async def test_mounted_sub_apps_name_their_routes_with_the_mount_path() -> None:
    guard = Guard({"resources": {"GET /sub/hello/{name}": {"flow": [{"qps": 1}]}}})
    async with client(shop(guard)) as c:
        assert [(await c.get(f"/sub/hello/{n}")).status_code for n in "ab"] == [200, 429]


async def test_plain_starlette_routes_are_resources_too() -> None:
    guard = Guard({"resources": {"GET /p/{x}": {"flow": [{"qps": 1}]}}})

    async def page(request: Request) -> JSONResponse:
        return JSONResponse({"x": request.path_params["x"]})

    app = Starlette(routes=[Route("/p/{x}", page)])
    app = GuardMiddleware(app, guard=guard)  # type: ignore[assignment]
    async with client(app) as c:
        # Wrapped from outside, before Starlette sets scope["app"]: the wrapped app's
        # router still names the route by its template.
        assert [(await c.get(f"/p/{i}")).status_code for i in range(2)] == [200, 429]

    guard = Guard({"resources": {"GET /p/{x}": {"flow": [{"qps": 1}]}}})
    app2 = Starlette(routes=[Route("/p/{x}", page)])
    app2.add_middleware(GuardMiddleware, guard=guard)
    async with client(app2) as c:
        assert [(await c.get(f"/p/{i}")).status_code for i in range(2)] == [200, 429]


async def test_unknown_paths_pass_through_untouched() -> None:
    guard = Guard({"resources": {"GET /items/{item_id}": {"flow": [{"qps": 0}]}}})
    async with client(shop(guard)) as c:
        assert (await c.get("/nowhere")).status_code == 404


async def test_app_exceptions_named_in_errors_become_problem_json() -> None:
    guard = Guard({"errors": {f"{__name__}:SoldOut": {"status": 409, "title": "Sold out"}}})
    async with client(shop(guard)) as c:
        response = await c.post("/kill/0")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == PROBLEM_BASE + "sold-out"
    assert body["detail"] == "course 0 is sold out"
    assert body["resource"] == "POST /kill/{course_id}"


async def test_map_exception_with_a_code_attribute() -> None:
    class BusinessError(Exception):
        code = "activity-not-ongoing"

    guard = Guard()
    guard.map_exception(BusinessError, status=409, title="Activity not ongoing")
    app = FastAPI()

    @app.get("/x")
    async def x() -> None:
        raise BusinessError("not yet")

    guard.install(app)
    async with client(app) as c:
        response = await c.get("/x")
    assert response.status_code == 409
    assert response.json()["type"].endswith("/activity-not-ongoing")


async def test_a_bad_errors_entry_is_a_clear_error_at_startup() -> None:
    guard = Guard({"errors": {"no_such_module:Boom": {"status": 400, "title": "x"}}})
    app = FastAPI()
    guard.install(app)  # imports nothing yet: the class may be defined after this line
    with pytest.raises(ValueError, match="cannot import 'no_such_module:Boom'"):
        async with client(app) as c:
            await c.get("/")


async def test_guard_limit_as_a_dependency_and_as_a_decorator(
    storage_uri: str, prefix: str
) -> None:
    guard = Guard({"key_prefix": prefix}, storage=storage_uri)
    app = FastAPI()

    @app.get("/dep/{n}", dependencies=[Depends(guard.limit("2/second"))])
    async def dep(n: int) -> dict[str, int]:
        return {"n": n}

    @app.get("/dec")
    @guard.limit("2/second")
    async def dec(q: int = 0) -> dict[str, int]:
        return {"q": q}

    guard.install(app)
    async with client(app) as c:
        assert [(await c.get(f"/dep/{i}")).status_code for i in range(3)] == [200, 200, 429]
        responses = [await c.get("/dec", params={"q": 7}) for _ in range(3)]
    await guard.aclose()
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[0].json() == {"q": 7}
    assert responses[2].headers["content-type"] == "application/problem+json"
    assert responses[2].headers["ratelimit-policy"] == '"2/1s";q=2;w=1'


async def test_blocked_inside_an_endpoint_is_rendered_even_without_install() -> None:
    guard = Guard({"resources": {"inner": {"flow": [{"qps": 0}]}}})

    @guard.resource("inner")
    async def inner() -> str:
        return "never"

    app = FastAPI()

    @app.get("/outer")
    async def outer() -> str:
        return await inner()

    app.add_middleware(GuardMiddleware, guard=guard)
    async with client(app) as c:
        response = await c.get("/outer")
    assert response.status_code == 429
    assert response.json()["resource"] == "inner"


async def test_origin_from_header_scopes_rules() -> None:
    guard = Guard(
        {
            "origin": {"from": "header", "name": "X-Caller"},
            "resources": {"GET /items/{item_id}": {"flow": [{"qps": 1, "origin": "crawler"}]}},
        }
    )
    async with client(shop(guard)) as c:
        crawler = [
            (await c.get("/items/1", headers={"X-Caller": "crawler"})).status_code for _ in "ab"
        ]
        others = [(await c.get("/items/1", headers={"X-Caller": "app"})).status_code for _ in "ab"]
    assert crawler == [200, 429] and others == [200, 200]


async def test_origin_from_client_ip() -> None:
    guard = Guard(
        {
            "origin": {"from": "client_ip"},
            "resources": {"GET /items/{item_id}": {"flow": [{"qps": 1, "origin": "127.0.0.1"}]}},
        }
    )
    app = shop(guard)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert [(await c.get("/items/1")).status_code for _ in "ab"] == [200, 429]


async def test_error_statuses_and_exceptions_count_as_errors() -> None:
    guard = Guard()
    app = FastAPI()

    @app.get("/fail/{code}")
    async def fail(code: int) -> PlainTextResponse:
        if code == 0:
            raise RuntimeError("boom")
        return PlainTextResponse("x", status_code=code)

    app.add_middleware(GuardMiddleware, guard=guard)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for code in (200, 404, 500, 503, 0):
            await c.get(f"/fail/{code}")
    counts = guard.stats("GET /fail/{code}").counts()
    assert (counts.success, counts.errors) == (2, 3)
    assert guard.stats("GET /fail/{code}").inflight == 0


async def test_websockets_and_lifespan_pass_through() -> None:
    guard = Guard()
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = GuardMiddleware(app, guard=guard)
    await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    await middleware({"type": "websocket", "path": "/ws"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan", "websocket"]


async def test_resource_decorator_guards_async_and_sync_code(storage_uri: str, prefix: str) -> None:
    guard = Guard(
        {
            "key_prefix": prefix,
            "resources": {"pay": {"flow": [{"qps": 1}]}, "sync": {"flow": [{"qps": 1}]}},
        },
        storage=storage_uri,
    )

    @guard.resource("pay")
    async def pay(amount: int) -> int:
        return amount

    assert await pay(5) == 5
    with pytest.raises(FlowLimited):
        await pay(6)
    guard.bind_loop()

    @guard.resource("sync")
    def sync_call(x: int) -> int:
        return x * 2

    # Sync code runs its guard from a worker thread (a sync endpoint's), on either store.
    assert await asyncio.to_thread(sync_call, 2) == 4
    with pytest.raises(FlowLimited):
        await asyncio.to_thread(sync_call, 3)
    await guard.aclose()


async def test_sync_resources_on_redis_run_from_worker_threads(redis_url: str, prefix: str) -> None:
    guard = Guard(
        {"key_prefix": prefix, "resources": {"sync": {"flow": [{"qps": 1}]}}}, storage=redis_url
    )
    guard.bind_loop()

    @guard.resource("sync", block_handler=lambda x, exc: f"blocked {type(exc).__name__}")
    def sync_call(x: int) -> str:
        return f"ran {x}"

    assert await asyncio.to_thread(sync_call, 1) == "ran 1"
    assert await asyncio.to_thread(sync_call, 2) == "blocked FlowLimited"
    await guard.aclose()


async def test_fallback_and_block_handler_work_like_sentinel_resource() -> None:
    guard = Guard({"resources": {"blocked": {"flow": [{"qps": 0}]}}})
    calls: list[str] = []

    def fallback(x: int, exc: BaseException) -> str:
        calls.append(type(exc).__name__)
        return "fallback"

    @guard.resource("failing", fallback=fallback)
    async def failing(x: int) -> str:
        raise ValueError(x)

    @guard.resource("blocked", block_handler=lambda x: "handled")
    async def blocked(x: int) -> str:
        return "ran"

    @guard.resource("blocked", fallback=fallback)
    async def blocked_fallback(x: int) -> str:
        return "ran"

    @guard.resource("ignored", fallback=fallback, exceptions_to_ignore=(KeyError,))
    async def ignored(x: int) -> str:
        raise KeyError(x)

    assert await failing(1) == "fallback"
    assert await blocked(1) == "handled"
    assert await blocked_fallback(1) == "fallback"  # no block handler: fallback takes blocks
    with pytest.raises(KeyError):
        await ignored(1)
    assert calls == ["ValueError", "FlowLimited"]
    assert guard.stats("failing").counts().errors == 1
    assert guard.stats("ignored").counts().errors == 0


def test_blocked_errors_render_their_own_status() -> None:
    from ymguard.errors import CircuitOpen, blocked_response

    response = blocked_response(CircuitOpen("GET /x", "breaker[0]", retry_after=2.2))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert "ratelimit" not in response.headers
    body = json.loads(bytes(response.body))
    assert body["type"].endswith("/circuit-open") and body["resource"] == "GET /x"
    assert isinstance(CircuitOpen("r"), Blocked)


async def test_framework_errors_become_problem_json_without_stack_traces() -> None:
    guard = Guard()
    app = FastAPI()

    @app.get("/n/{n}")
    async def number(n: int) -> dict[str, int]:
        if n == 13:
            raise RuntimeError("secret internals")
        return {"n": n}

    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        missing = await c.get("/nowhere")
        wrong_method = await c.post("/n/1")
        invalid = await c.get("/n/abc")
        crash = await c.get("/n/13")
    assert missing.status_code == 404 and missing.json()["type"].endswith("/not-found")
    assert wrong_method.status_code == 405 and "allow" in wrong_method.headers
    assert invalid.status_code == 422
    assert invalid.json()["type"].endswith("/validation-error")
    assert invalid.json()["errors"][0]["loc"] == ["path", "n"]
    assert crash.status_code == 500
    assert crash.headers["content-type"] == "application/problem+json"
    assert "secret" not in crash.text
    for response in (missing, wrong_method, invalid):
        assert response.headers["content-type"] == "application/problem+json"


async def test_routes_of_included_routers_are_named_with_their_prefix() -> None:
    from fastapi import APIRouter

    guard = Guard(
        {
            "resources": {
                "GET /shop/orders/{order_no}": {"flow": [{"qps": 1}]},
                "POST /shop/admin/courses/{course_id}": {"flow": [{"qps": 1}]},
            }
        }
    )
    orders, admin = APIRouter(), APIRouter(prefix="/admin")

    @orders.get("/orders/{order_no}")
    async def order(order_no: str) -> dict[str, str]:
        return {"order_no": order_no}

    @admin.post("/courses/{course_id}")
    async def course(course_id: int) -> dict[str, int]:
        return {"course_id": course_id}

    orders.include_router(admin)
    app = FastAPI()
    app.include_router(orders, prefix="/shop")
    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    async with client(app) as c:
        assert [(await c.get(f"/shop/orders/{n}")).status_code for n in "ab"] == [200, 429]
        assert [(await c.post(f"/shop/admin/courses/{n}")).status_code for n in (1, 2)] == [
            200,
            429,
        ]
        assert (await c.get("/shop/nothing")).status_code == 404
        assert (await c.delete("/shop/orders/a")).status_code == 405
    # A method the route does not serve is no resource: it falls through to the 405.
    assert "DELETE /shop/orders/{order_no}" not in guard._chains


async def test_a_disconnect_after_the_response_does_not_cancel_background_work() -> None:
    from starlette.background import BackgroundTask

    guard = Guard({"resources": {"GET /job": {"semaphore": {"permits": 1}}}})
    done = asyncio.Event()

    async def after_response() -> None:
        await asyncio.sleep(0.05)
        done.set()

    app = FastAPI()

    @app.get("/job")
    async def job() -> JSONResponse:
        return JSONResponse({"queued": True}, background=BackgroundTask(after_response))

    app.add_middleware(GuardMiddleware, guard=guard)
    sent: list[dict[str, Any]] = []
    response_done = asyncio.Event()
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await response_done.wait()  # like uvicorn: the disconnect comes after the body
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            response_done.set()

    scope = http_scope("/job", headers=[(b"host", b"t")], server=("t", 80))
    await app(scope, receive, send)
    assert done.is_set()
    assert sent[0]["status"] == 200
    assert await guard.semaphore("GET /job").available() == 1


# -- methods and paths are client input: resources stay bounded ---------------------------


def guard_middleware(app: Any) -> GuardMiddleware:
    """The GuardMiddleware instance of a started Starlette app's stack."""
    node = app.middleware_stack
    while not isinstance(node, GuardMiddleware):
        node = node.app
    return node


async def call(app: Any, method: str, path: str) -> int:
    """One request straight through the ASGI app (no HTTP client: 50,000 of them are fast)."""
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(http_scope(path, method), receive, send)
    return statuses[0]


async def test_50000_invented_methods_make_no_resources() -> None:
    guard = Guard({"resources": {"GET /items/{item_id}": {"flow": [{"qps": 1000}]}}})
    app = shop(guard)
    assert await call(app, "GET", "/items/1") == 200
    for i in range(50_000):
        assert await call(app, f"M{i}", "/items/1") == 405  # the app's own answer
    assert list(guard._chains) == ["GET /items/{item_id}"]
    assert list(guard._stats) == ["GET /items/{item_id}"]
    assert len(guard_middleware(app)._resources) <= 4096


async def test_a_mounted_app_without_routes_is_named_only_for_standard_methods() -> None:
    guard = Guard()

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("raw")(scope, receive, send)

    app = Starlette()
    app.mount("/raw", raw)
    app.add_middleware(GuardMiddleware, guard=guard)
    assert await call(app, "GET", "/raw/x") == 200
    for i in range(100):
        assert await call(app, f"M{i}", "/raw/x") == 200
    assert list(guard._chains) == ["GET /raw/{path}"]


async def test_an_endpoint_class_route_is_named_only_for_standard_methods() -> None:
    # A route whose endpoint is a class serves any method (its methods are None): the
    # class answers 405 to the others, which must not become resources either.
    class Items(HTTPEndpoint):
        async def get(self, request: Request) -> PlainTextResponse:
            return PlainTextResponse("items")

    guard = Guard()
    app = Starlette(routes=[Route("/items", Items)])
    app.add_middleware(GuardMiddleware, guard=guard)
    assert await call(app, "GET", "/items") == 200
    for i in range(100):
        assert await call(app, f"M{i}", "/items") == 405
    assert list(guard._chains) == ["GET /items"]


async def test_an_app_without_routes_only_guards_paths_the_rules_name() -> None:
    guard = Guard({"resources": {"GET /limited": {"flow": [{"qps": 1}]}}})

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("raw")(scope, receive, send)

    app = GuardMiddleware(raw, guard=guard)
    for i in range(1_000):
        assert await call(app, "GET", f"/page/{i}") == 200
    assert [await call(app, "GET", "/limited") for _ in range(2)] == [200, 429]
    assert list(guard._chains) == ["GET /limited"]


async def test_long_paths_are_not_cached() -> None:
    guard = Guard()
    app = shop(guard)
    for i in range(100):
        await call(app, "GET", f"/items/{i}{'0' * 10_000}")
    assert sum(len(path) for _, _, path in guard_middleware(app)._resources) < 1_000


async def test_virtual_hosts_sharing_a_path_are_different_resources() -> None:
    """Starlette ``Host`` routes: the Host header picks the route, so it picks the resource
    too (the route cache, keyed by method and path, must not answer for another host)."""

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Host("a.example", app=Router([Route("/items/{item_id}", ok)])),
            Host("b.example", app=Router([Route("/items/{name}", ok)])),
        ]
    )
    guard = Guard({"resources": {"GET /items/{item_id}": {"flow": [{"qps": 0}]}}})
    app.add_middleware(GuardMiddleware, guard=guard)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(2):  # the second round is answered from whatever was cached
            assert (await client.get("http://a.example/items/1")).status_code == 429
            assert (await client.get("http://b.example/items/1")).status_code == 200
    await guard.aclose()
