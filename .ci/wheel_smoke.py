"""Smoke test of an installed ymguard on a real Redis, run by ``.ci/run`` from the built wheel.

An editable install reads every file from the source tree, so it cannot tell whether the
wheel ships what the package reads at run time (the Lua scripts, above all). ``.ci/run``
installs the wheel into a fresh virtualenv and runs this script from a temporary
directory with ``python -I``, so the source tree is not importable; the script refuses to
run against a ``ymguard`` imported from the tree.

Through a Starlette app (httpx's ASGITransport) it runs a qps rule, a concurrency rule, a
semaphore, a breaker and an Idempotency-Key rule on Redis, asserts the refusals, checks the
state really lives in Redis, and deletes its keys. ``on_storage_error: closed`` turns any
Redis failure into a 503 rather than a silent in-process fallback.

Usage: ``python -I .ci/wheel_smoke.py [REDIS_URL]`` (default ``YMGUARD_TEST_REDIS`` or
``redis://127.0.0.1:6379/0``). Exits 0 and prints ``wheel smoke: ok`` when every check holds.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import ymguard
from ymguard import Guard, GuardMiddleware

SOURCE_TREE = Path(__file__).resolve().parent.parent
PROBLEMS = "https://ymguard.dev/problems/"


def check(condition: bool, what: str) -> None:
    """Fail the smoke test with ``what`` unless ``condition`` holds."""
    if not condition:
        raise SystemExit(f"wheel smoke FAILED: {what}")
    print(f"  ok  {what}")


def problem_type(response: httpx.Response) -> str:
    """The problem type's last segment, or the status when the body is not problem+json."""
    if response.headers.get("content-type") != "application/problem+json":
        return f"<{response.status_code} {response.headers.get('content-type')}>"
    return str(response.json()["type"]).removeprefix(PROBLEMS)


def build_app(guard: Guard) -> tuple[Starlette, dict[str, Any]]:
    """An app with one route per rule kind, and the events and counters the checks use."""
    state: dict[str, Any] = {
        "entered": asyncio.Event(),
        "release": asyncio.Event(),
        "payments": 0,
    }

    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def held(request: Request) -> Response:
        # Stays in flight until the check releases it, so a second call meets a full limit.
        state["entered"].set()
        await state["release"].wait()
        return JSONResponse({"ok": True})

    async def fail(request: Request) -> Response:
        return JSONResponse({"error": "down"}, status_code=500)

    async def pay(request: Request) -> Response:
        state["payments"] += 1
        return JSONResponse({"payment": state["payments"], "body": (await request.body()).decode()})

    app = Starlette(
        routes=[
            Route("/qps", ok),
            Route("/concurrency", held),
            Route("/semaphore", held),
            Route("/breaker", fail),
            Route("/pay", pay, methods=["POST"]),
        ]
    )
    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    return app, state


async def one_held_then_refused(
    c: httpx.AsyncClient, path: str, state: dict[str, Any]
) -> httpx.Response:
    """Hold one call of ``path`` in flight, return the answer to a second one, then finish."""
    state["entered"].clear()
    state["release"].clear()
    first = asyncio.create_task(c.get(path))
    await asyncio.wait_for(state["entered"].wait(), 10)
    second = await c.get(path)
    state["release"].set()
    check((await first).status_code == 200, f"{path}: the call in flight finishes with 200")
    return second


async def smoke(url: str) -> None:
    """Run every check on the Redis at ``url``; delete the keys it made, also on failure."""
    # The test suite hands out a prefix inside its run's namespace; CI makes its own.
    prefix = os.environ.get("YMGUARD_TEST_PREFIX") or f"ymt-smoke-{uuid.uuid4().hex[:12]}"
    rules = {
        "key_prefix": prefix,
        "on_storage_error": "closed",
        "resources": {
            "GET /qps": {"flow": [{"qps": 2}]},
            "GET /concurrency": {"flow": [{"concurrency": 1}]},
            "GET /semaphore": {"semaphore": {"permits": 1, "lease_seconds": 30}},
            "GET /breaker": {
                "breaker": [
                    {
                        "strategy": "error_count",
                        "threshold": 1,
                        "min_requests": 1,
                        "window_seconds": 10,
                        "open_seconds": 60,
                    }
                ]
            },
            "POST /pay": {"idempotency": {"required": True}},
        },
    }
    guard = Guard(rules, storage=url)
    app, state = build_app(guard)
    client = aioredis.Redis.from_url(url)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://smoke") as c:
            statuses = [(await c.get("/qps")).status_code for _ in range(3)]
            check(statuses == [200, 200, 429], f"qps 2: three calls answer {statuses}")
            check(
                problem_type(await c.get("/qps")) == "flow-limited",
                "qps: the refusal is problem+json flow-limited",
            )

            refused = await one_held_then_refused(c, "/concurrency", state)
            check(
                (refused.status_code, problem_type(refused)) == (429, "flow-limited"),
                "concurrency 1: a second call in flight is refused 429 flow-limited",
            )

            refused = await one_held_then_refused(c, "/semaphore", state)
            check(
                (refused.status_code, problem_type(refused)) == (429, "concurrency-limited"),
                "semaphore 1 permit: a second holder is refused 429 concurrency-limited",
            )
            sem = guard.semaphore("GET /semaphore")
            check(await sem.available() == 1, "semaphore: the permit is back after the call")
            permit = await sem.try_acquire()
            check(permit is not None, "semaphore API: try_acquire takes the permit")
            check(await sem.try_acquire() is None, "semaphore API: no second permit")
            assert permit is not None
            check(await permit.release(), "semaphore API: release gives it back")

            statuses = [(await c.get("/breaker")).status_code for _ in range(3)]
            check(statuses == [500, 500, 503], f"breaker error_count 1: answers {statuses}")
            opened = await c.get("/breaker")
            check(
                problem_type(opened) == "circuit-open" and "retry-after" in opened.headers,
                "breaker: open answers 503 circuit-open with Retry-After",
            )

            missing = await c.post("/pay", content=b"a")
            check(
                (missing.status_code, problem_type(missing)) == (400, "idempotency-key-missing"),
                "idempotency: no key is 400 idempotency-key-missing",
            )
            key = {"Idempotency-Key": uuid.uuid4().hex}
            first = await c.post("/pay", content=b"order-1", headers=key)
            again = await c.post("/pay", content=b"order-1", headers=key)
            check(first.status_code == 200, "idempotency: the first call runs")
            check(
                again.headers.get("idempotent-replayed") == "true"
                and again.content == first.content
                and state["payments"] == 1,
                "idempotency: the retry is replayed byte for byte, the endpoint ran once",
            )
            other = await c.post("/pay", content=b"order-2", headers=key)
            check(
                (other.status_code, problem_type(other)) == (422, "idempotency-key-mismatch"),
                "idempotency: the same key with another body is 422 idempotency-key-mismatch",
            )

        keys = [k async for k in client.scan_iter(match=prefix + ":*", count=1000)]
        check(len(keys) >= 3, f"the rules' state lives in Redis ({len(keys)} keys)")
    finally:
        await guard.aclose()
        keys = [k async for k in client.scan_iter(match=prefix + ":*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def main() -> None:
    """Run the smoke test on the Redis named by argv[1] or the environment."""
    default = os.environ.get("YMGUARD_TEST_REDIS", "redis://127.0.0.1:6379/0")
    url = sys.argv[1] if len(sys.argv) > 1 else default
    print(f"wheel smoke: ymguard {ymguard.__version__} on {url}")
    where = Path(ymguard.__file__).resolve()
    check(
        not where.is_relative_to(SOURCE_TREE),
        f"ymguard is imported from the installed package ({where.parent}), not the tree",
    )
    asyncio.run(smoke(url))
    print("wheel smoke: ok")


if __name__ == "__main__":
    main()
