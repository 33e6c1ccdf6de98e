"""A small shop for the anti-resubmit tests: the seed's order token and Idempotency-Key.

``create_app(storage, prefix, lease_seconds)`` builds it in process; ``app_from_env`` is the
uvicorn factory (``YMGUARD_STORAGE``, ``ANTIRESUBMIT_PREFIX``, ``ANTIRESUBMIT_LEASE``).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ymguard import Guard, GuardMiddleware
from ymguard.storage import Store
from ymguard.types import ASGIApp, Receive, Scope, Send


class FakeAuth:
    """Sets ``request.state.user`` from ``X-User``; runs outside GuardMiddleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                if name == b"x-user":
                    scope.setdefault("state", {})["user"] = value.decode()
        await self.app(scope, receive, send)


def rules(
    prefix: str, lease_seconds: float, on_storage_error: str = "local", origin: bool = True
) -> dict[str, Any]:
    idem = {"required": True, "lease_seconds": lease_seconds, "max_response_bytes": 1000}
    return {
        "key_prefix": prefix,
        "on_storage_error": on_storage_error,
        **({"origin": {"from": "state", "name": "user"}} if origin else {}),
        "resources": {
            "POST /orders": {
                "submit_token": {"scope": ["state:user", "query:course_ids"]},
                "flow": [{"qps": 100000}],
            },
            "POST /checkout": {"submit_token": {}},  # the default scope
            "POST /pay": {"idempotency": idem, "flow": [{"qps": 100000}]},
            "POST /slow": {"idempotency": idem},
            "POST /fail": {"idempotency": idem},
            "POST /big": {"idempotency": idem},
            "POST /stream": {"idempotency": idem},
            "PUT /pay": {"idempotency": idem},
        },
    }


def create_app(
    storage: str | Store,
    prefix: str,
    lease_seconds: float = 60.0,
    on_storage_error: str = "local",
    origin: bool = True,
) -> FastAPI:
    """The test shop on ``storage``; ``app.state.runs`` counts endpoint runs per route.

    ``origin=False`` leaves the guard without an ``origin:`` (every caller's origin is
    the same), so that only the ``credentials`` scope part tells callers apart.
    """
    guard = Guard(rules(prefix, lease_seconds, on_storage_error, origin), storage=storage)
    app = FastAPI()
    runs: Counter[str] = Counter()
    app.state.runs = runs
    app.state.guard = guard
    app.state.release = asyncio.Event()

    @app.get("/runs")
    async def count_runs() -> dict[str, int]:
        return dict(runs)

    @app.get("/orders/confirm")
    async def confirm(request: Request) -> dict[str, str]:
        return {"token": await guard.submit_tokens.issue_for(request, "POST /orders")}

    @app.post("/orders")
    async def place_order(course_ids: str) -> dict[str, str]:
        runs["orders"] += 1
        return {"order": f"order-{runs['orders']}", "courses": course_ids}

    @app.get("/checkout/confirm")
    async def checkout_confirm(request: Request) -> dict[str, str]:
        return {"token": await guard.submit_tokens.issue_for(request, "POST /checkout")}

    @app.post("/checkout")
    async def checkout() -> dict[str, int]:
        runs["checkout"] += 1
        return {"checkout": runs["checkout"]}

    @app.post("/pay", status_code=201)
    async def pay(request: Request) -> JSONResponse:
        body = await request.json()
        runs["pay"] += 1
        await asyncio.sleep(0.05)  # long enough for concurrent retries to find it in flight
        response = JSONResponse(
            {"pay_flow": runs["pay"], "amount": body["amount"]},
            status_code=201,
            headers={"Location": f"/pay/{runs['pay']}", "X-Run": str(runs["pay"])},
        )
        # Kept off the test routes: a client that sent it back would change its own
        # `credentials` scope part, and its retries would no longer match (docs/scopes.md).
        response.set_cookie("session", f"s{runs['pay']}", path="/account")
        return response

    @app.put("/pay")
    async def pay_put() -> dict[str, int]:
        runs["put"] += 1
        return {"put": runs["put"]}

    @app.post("/slow")
    async def slow() -> dict[str, int]:
        runs["slow"] += 1
        await app.state.release.wait()
        return {"slow": runs["slow"]}

    @app.post("/fail")
    async def fail() -> Response:
        runs["fail"] += 1
        if runs["fail"] == 1:
            return JSONResponse({"error": "db down"}, status_code=500)
        return JSONResponse({"ok": runs["fail"]})

    @app.post("/big")
    async def big() -> Response:
        runs["big"] += 1
        return Response(b"x" * 5000, media_type="application/octet-stream")

    @app.post("/stream")
    async def stream() -> StreamingResponse:
        runs["stream"] += 1

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f"chunk-{i};".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    app.add_middleware(GuardMiddleware, guard=guard)
    app.add_middleware(FakeAuth)
    guard.install(app)
    return app


def app_from_env() -> FastAPI:
    """The uvicorn factory: storage, prefix and lease from the environment."""
    return create_app(
        os.environ.get("YMGUARD_STORAGE", "memory://"),
        os.environ["ANTIRESUBMIT_PREFIX"],
        float(os.environ.get("ANTIRESUBMIT_LEASE", "60")),
    )
