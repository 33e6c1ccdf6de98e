"""The dashboard: its snapshot JSON on both stores, the cluster's sum on Redis, who may see it.

The page itself is tested in a real Chromium in ``test_dashboard_browser.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tests.helpers import RedisServer
from ymguard import Guard, GuardMiddleware
from ymguard.dashboard import HISTORY_SECONDS, SecondSeries, rules_digest
from ymguard.dashboard import series as series_module
from ymguard.dashboard.monitor import monitor_of

#: The liveness bound of the waits below (the machine is shared: generous).
WAIT_SECONDS = 30.0
TOKEN = {"x-dashboard-token": "yes"}

RULES: dict[str, Any] = {
    "resources": {
        "GET /items/{item_id}": {"flow": [{"qps": 100000}]},
        "GET /closed": {"semaphore": {"permits": 0}},
        "GET /fail": {"breaker": [{"strategy": "error_count", "threshold": 1000000}]},
        "GET /pool": {"semaphore": {"name": "pool", "permits": 3}},
    }
}


def by_token(request: Request) -> bool:
    return request.headers.get("x-dashboard-token") == "yes"


def shop(guard: Guard, authorize: Callable[[Request], Any] = by_token) -> FastAPI:
    """An app with one resource per figure, and the dashboard at /ymguard."""
    app = FastAPI()
    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    app.mount("/ymguard", guard.dashboard(authorize=authorize, title="Test <shop>"))

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.get("/closed")
    async def closed() -> str:
        return "never"

    @app.get("/fail")
    async def fail() -> JSONResponse:
        return JSONResponse({"error": "on purpose"}, status_code=500)

    @app.get("/pool")
    async def pool() -> str:
        return "ok"

    return app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def guard(storage_uri: str, prefix: str) -> AsyncIterator[Guard]:
    g = Guard({**RULES, "key_prefix": prefix}, storage=storage_uri)
    yield g
    await g.aclose()


async def traffic(c: httpx.AsyncClient, items: int, closed: int, fails: int) -> None:
    for i in range(items):
        assert (await c.get(f"/items/{i}")).status_code == 200
    for _ in range(closed):
        assert (await c.get("/closed")).status_code == 429
    for _ in range(fails):
        assert (await c.get("/fail")).status_code == 500


async def snapshot(c: httpx.AsyncClient, query: str = "") -> dict[str, Any]:
    response = await c.get("/ymguard/api/snapshot" + query, headers=TOKEN)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    data: dict[str, Any] = response.json()
    return data


def totals(data: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {r["name"]: r["total"] for r in data["resources"]}


async def until(
    c: httpx.AsyncClient, done: Callable[[dict[str, Any]], bool], query: str = ""
) -> dict[str, Any]:
    """The first snapshot for which ``done`` holds (reports reach Redis once a second)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        data = await snapshot(c, query)
        if done(data) or time.monotonic() > deadline:
            return data
        await asyncio.sleep(0.2)


def counted(expected: dict[str, dict[str, int]]) -> Callable[[dict[str, Any]], bool]:
    def done(data: dict[str, Any]) -> bool:
        found = totals(data)
        return all(
            all(found.get(name, {}).get(k) == v for k, v in figures.items())
            for name, figures in expected.items()
        )

    return done


EXPECTED = {
    "GET /items/{item_id}": {"passed": 7, "blocked": 0, "success": 7, "errors": 0},
    "GET /closed": {"passed": 0, "blocked": 3, "errors": 0},
    "GET /fail": {"passed": 2, "errors": 2, "success": 0},
}


# -- the snapshot --------------------------------------------------------------------------


async def test_the_snapshot_counts_every_call_by_resource(guard: Guard, storage_uri: str) -> None:
    async with client(shop(guard)) as c:
        await traffic(c, items=7, closed=3, fails=2)
        data = await until(c, counted(EXPECTED))
    found = totals(data)
    for name, figures in EXPECTED.items():
        assert {k: found[name][k] for k in figures} == figures, name
    assert found["GET /fail"]["avg_rt_ms"] is not None
    assert data["store"] == guard.store.kind
    assert data["cluster"] is (storage_uri != "memory://")
    assert data["title"] == "Test <shop>"
    # Every resource of the rules is listed, also those no call reached yet.
    assert set(RULES["resources"]) <= set(found)
    # The series: 15 minutes of seconds, one column per figure, summing to the totals.
    series = data["series"]
    assert series["last"] - series["first"] + 1 == HISTORY_SECONDS
    items = series["resources"]["GET /items/{item_id}"]
    assert {len(v) for v in items.values()} == {HISTORY_SECONDS}
    assert sum(items["passed"]) == 7 and sum(series["resources"]["GET /closed"]["blocked"]) == 3
    # This process reports (on Redis through the store, so it is listed as the cluster sees it).
    assert len(data["processes"]) == 1
    process = data["processes"][0]
    assert process["this"] is True and process["rules_version"] == data["rules"]["version"]


async def test_the_snapshot_shows_rules_breakers_and_semaphores(guard: Guard) -> None:
    async with client(shop(guard)) as c:
        permit = await guard.semaphore("pool").acquire()
        try:
            data = await snapshot(c)
        finally:
            await permit.release()
        after = await snapshot(c)
    rules = data["rules"]
    assert rules["version"] == version_of(guard) and rules["digest"] == digest_of(guard)
    assert [r["kind"] for r in rules["resources"]["GET /fail"]] == ["breaker"]
    assert rules["resources"]["GET /items/{item_id}"] == [
        {"kind": "flow", "rule": "flow[0] qps=100000"}
    ]
    [breaker] = data["breakers"]
    assert breaker["resource"] == "GET /fail" and breaker["state"] == "closed"
    assert breaker["strategy"] == "error_count"
    pools = {s["name"]: s for s in data["semaphores"]}
    assert pools["pool"] | {"resources": None} == {
        "name": "pool",
        "resources": None,
        "permits": 3,
        "held": 1,
        "available": 2,
        "waiting": 0,
    }
    assert pools["pool"]["resources"] == ["GET /pool"]
    assert pools["GET /closed"]["permits"] == 0
    assert {s["name"]: s["held"] for s in after["semaphores"]}["pool"] == 0


def version_of(guard: Guard) -> str:
    """What the dashboard shows as the version: the guard's own, else the digest."""
    version = getattr(guard, "rules_version", None)
    return str(version) if version is not None else digest_of(guard)


def digest_of(guard: Guard) -> str:
    """The guard's own rules digest where it has one (rules at run time), else ours."""
    digest = getattr(guard, "rules_digest", None)
    return digest if isinstance(digest, str) else rules_digest(guard)


class PushedGuard(Guard):
    """A guard whose rules came from a push (version 7)."""

    rules_version = "7"  # type: ignore[assignment]  # a property where rules are pushed


async def test_the_version_is_the_guards_rules_version_when_it_has_one() -> None:
    guard = PushedGuard(RULES)
    async with client(shop(guard)) as c:
        data = await snapshot(c)
    assert data["rules"]["version"] == "7"
    assert data["rules"]["digest"] == digest_of(guard) != "7"
    assert data["processes"][0]["rules_version"] == "7"


async def test_the_digest_follows_the_rules() -> None:
    one, same = Guard(RULES), Guard(RULES)
    other = Guard({"resources": {"GET /items/{item_id}": {"flow": [{"qps": 5}]}}})
    assert rules_digest(one) == rules_digest(same) != rules_digest(other)


async def test_since_returns_only_the_recent_seconds(guard: Guard) -> None:
    async with client(shop(guard)) as c:
        full = await snapshot(c)
        last = full["series"]["last"]
        recent = await snapshot(c, f"?since={last - 3}")
        bad = await c.get("/ymguard/api/snapshot?since=-1", headers=TOKEN)
        huge = await c.get("/ymguard/api/snapshot?since=" + "9" * 40, headers=TOKEN)
    first, end = recent["series"]["first"], recent["series"]["last"]
    assert end >= last and first <= last - 3  # the last seconds again, at least
    assert end - first + 1 < HISTORY_SECONDS
    assert all("total" not in r for r in recent["resources"])
    for answer in (bad, huge):
        assert answer.status_code == 400
        assert answer.headers["content-type"] == "application/problem+json"


# -- the cluster (Redis) -------------------------------------------------------------------


async def test_two_processes_on_one_redis_are_summed_and_listed(
    redis_url: str, prefix: str
) -> None:
    # Two guards on one store prefix stand for two processes: each has its own reporter.
    one = Guard({**RULES, "key_prefix": prefix}, storage=redis_url)
    two = Guard({**RULES, "key_prefix": prefix}, storage=redis_url)
    try:
        async with client(shop(one)) as a, client(shop(two)) as b:
            await traffic(a, items=4, closed=1, fails=2)
            await traffic(b, items=3, closed=2, fails=0)
            data = await until(a, lambda d: counted(EXPECTED)(d) and len(d["processes"]) == 2)
            assert counted(EXPECTED)(data), totals(data)
            ids = {p["id"] for p in data["processes"]}
            assert len(ids) == 2
            assert [p["this"] for p in data["processes"]].count(True) == 1
            # A process that stops reporting vanishes from the list (its key expires).
            await two.aclose()
            data = await until(a, lambda d: len(d["processes"]) == 1)
            assert [p["id"] for p in data["processes"]] == [monitor_of(one).process_id]
            # ... and its figures stay in the cluster's history.
            assert counted(EXPECTED)(data)
    finally:
        await one.aclose()
        await two.aclose()


async def test_without_redis_the_dashboard_shows_this_process_and_says_so(
    private_redis: RedisServer, prefix: str
) -> None:
    guard = Guard({**RULES, "key_prefix": prefix}, storage=private_redis.url)
    try:
        async with client(shop(guard)) as c:
            await traffic(c, items=2, closed=0, fails=0)
            data = await until(c, lambda d: totals(d)["GET /items/{item_id}"]["passed"] == 2)
            assert data["cluster"] is True
            private_redis.stop()
            await traffic(c, items=3, closed=0, fails=0)
            down = await snapshot(c)
            assert down["cluster"] is False and "does not answer" in down["cluster_error"]
            assert totals(down)["GET /items/{item_id}"]["passed"] == 5  # this process's own
            assert len(down["processes"]) == 1 and down["processes"][0]["this"] is True
            assert {s["name"]: s["held"] for s in down["semaphores"]}["pool"] is None
            private_redis.start()  # empty again: reports start over, the process comes back
            await traffic(c, items=1, closed=0, fails=0)
            back = await until(c, lambda d: d["cluster"] and len(d["processes"]) == 1)
            assert back["cluster"] is True and back["processes"][0]["this"] is True
    finally:
        await guard.aclose()


def test_a_guard_used_from_a_new_loop_moves_its_reporter(redis_url: str, prefix: str) -> None:
    # One reporter per guard: a guard used from two loops in turn (tests do that) reports
    # from the last one, under one id, and never sends a second twice.
    guard = Guard({**RULES, "key_prefix": prefix}, storage=redis_url)
    app = shop(guard)

    async def calls(n: int, total: int, close: bool) -> dict[str, Any]:
        try:
            async with client(app) as c:
                await traffic(c, items=n, closed=0, fails=0)
                return await until(
                    c, lambda d: totals(d)["GET /items/{item_id}"]["passed"] >= total
                )
        finally:
            if close:  # the store's connections belong to the loop that made them
                await guard.aclose()

    asyncio.run(calls(2, total=2, close=False))
    first_id = monitor_of(guard).process_id
    data = asyncio.run(calls(3, total=5, close=True))
    assert monitor_of(guard).process_id == first_id
    assert totals(data)["GET /items/{item_id}"]["passed"] == 5
    assert [p["id"] for p in data["processes"]] == [first_id]


# -- who may see it ------------------------------------------------------------------------

PATHS = ["/ymguard/", "/ymguard/api/snapshot", "/ymguard/static/dashboard.js"]


async def test_a_refused_request_gets_403_problem_json_everywhere() -> None:
    async with client(shop(Guard(RULES))) as c:
        for path in PATHS:
            for headers in ({}, {"x-dashboard-token": "no"}):
                response = await c.get(path, headers=headers)
                assert response.status_code == 403, path
                assert response.headers["content-type"] == "application/problem+json"
                problem = response.json()
                assert problem["status"] == 403 and problem["type"].endswith("/forbidden")
                assert "resources" not in response.text
            allowed = await c.get(path, headers=TOKEN)
            assert allowed.status_code == 200, path


async def test_authorize_may_be_async_and_may_answer_401() -> None:
    async def signed_in(request: Request) -> bool:
        await asyncio.sleep(0)
        if "authorization" not in request.headers:
            raise HTTPException(401, "sign in first", headers={"WWW-Authenticate": "Bearer"})
        return request.headers["authorization"] == "Bearer admin"

    async with client(shop(Guard(RULES), authorize=signed_in)) as c:
        anonymous = await c.get("/ymguard/api/snapshot")
        user = await c.get("/ymguard/api/snapshot", headers={"authorization": "Bearer bob"})
        admin = await c.get("/ymguard/api/snapshot", headers={"authorization": "Bearer admin"})
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert anonymous.json()["detail"] == "sign in first"
    assert user.status_code == 403
    assert admin.status_code == 200


async def test_only_a_true_verdict_lets_in() -> None:
    for verdict in (None, 1, "yes", object()):
        async with client(shop(Guard(RULES), authorize=lambda r, v=verdict: v)) as c:
            assert (await c.get("/ymguard/api/snapshot")).status_code == 403


def test_authorize_is_required_and_callable() -> None:
    guard = Guard(RULES)
    with pytest.raises(TypeError):
        guard.dashboard()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="callable"):
        guard.dashboard(authorize=True)  # type: ignore[arg-type]


async def test_the_page_ships_its_files_with_a_strict_policy() -> None:
    async with client(shop(Guard(RULES))) as c:
        bare = await c.get("/ymguard", headers=TOKEN)
        page = await c.get("/ymguard/", headers=TOKEN)
        script = await c.get("/ymguard/static/dashboard.js", headers=TOKEN)
        style = await c.get("/ymguard/static/dashboard.css", headers=TOKEN)
        missing = await c.get("/ymguard/static/../app.py", headers=TOKEN)
        post = await c.post("/ymguard/api/snapshot", headers=TOKEN)
    assert bare.status_code in (307, 308) and bare.headers["location"].endswith("/ymguard/")
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    # The title is the app's text, escaped; no script or style comes from elsewhere.
    assert "Test &lt;shop&gt;" in page.text and "<shop>" not in page.text
    assert "http://" not in page.text and "https://" not in page.text
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    assert missing.status_code == 404
    assert post.status_code == 405


# -- the per-second history ----------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Call:
    def __init__(self, resource: str) -> None:
        self.resource = resource


def test_the_history_keeps_fifteen_minutes_per_resource() -> None:
    clock = Clock(1_000_000.5)
    series = SecondSeries(clock=clock)
    series.passed(Call("a"))  # type: ignore[arg-type]
    series.finished(Call("a"), 12.0, "success")  # type: ignore[arg-type]
    clock.now += HISTORY_SECONDS - 1
    series.passed(Call("a"))  # type: ignore[arg-type]
    series.finished(Call("a"), 4.0, "error")  # type: ignore[arg-type]
    start = 1_000_000
    rows = series.rows(start, start + HISTORY_SECONDS)
    assert rows[start]["a"] == [1, 0, 1, 0, 12.0]
    assert rows[start + HISTORY_SECONDS - 1]["a"] == [1, 0, 0, 1, 4.0]
    clock.now += 1  # the first second falls out of the window: its slot is reused
    series.passed(Call("a"))  # type: ignore[arg-type]
    rows = series.rows(start, start + HISTORY_SECONDS)
    assert start not in rows and rows[start + HISTORY_SECONDS]["a"][0] == 1


def test_the_history_is_bounded_in_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(series_module, "MAX_RESOURCES", 3)
    series = SecondSeries()
    for i in range(10):
        series.passed(Call(f"r{i}"))  # type: ignore[arg-type]
    assert series.resources == ["r0", "r1", "r2"]


def test_observer_hooks_it_does_not_know_do_nothing() -> None:
    series = SecondSeries()
    series.queued(Call("a"), 0.1)  # type: ignore[attr-defined]
    assert series.resources == []
    with pytest.raises(AttributeError):
        series._private  # type: ignore[attr-defined]  # noqa: B018
