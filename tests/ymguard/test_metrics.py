"""OpenTelemetry metrics, read back through the SDK's in-memory reader, on both stores.

Each test gives its guard a ``MeterProvider`` of its own (``Guard(metrics=provider)``), so
tests never share counts; nothing here asserts a duration, only counts and attributes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.helpers import RedisServer
from ymguard import Guard, GuardMiddleware
from ymguard.metrics import DURATION_BUCKETS, storage_name


class Metrics:
    """A meter provider with an in-memory reader, and ways to read what it collected."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                if sm.scope.name != "ymguard":
                    continue
                for metric in sm.metrics:
                    if metric.name == name:
                        found += list(metric.data.data_points)
        return found

    def values(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Each point's value (a histogram's count) by the attributes ``keys``, summed."""
        out: dict[tuple[str, ...], float] = {}
        for point in self.points(name):
            key = tuple(str(point.attributes.get(k, "")) for k in keys)
            if isinstance(point, HistogramDataPoint):
                value: float = point.count
            else:
                assert isinstance(point, NumberDataPoint)
                value = point.value
            out[key] = out.get(key, 0) + value
        return out

    def instrument(self, name: str) -> Any:
        data = self.reader.get_metrics_data()
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        return metric
        raise AssertionError(f"no {name}")


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    found = Metrics()
    yield found
    found.provider.shutdown()


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def fail(request: Request) -> PlainTextResponse:
    return PlainTextResponse("down", status_code=500)


async def boom(request: Request) -> PlainTextResponse:
    raise RuntimeError("boom")


def app_for(guard: Guard) -> Starlette:
    routes = [
        Route("/ok", ok),
        Route("/items/{item_id}", ok),
        Route("/limited", ok),
        Route("/sem", ok),
        Route("/shadow", ok),
        Route("/pay", ok, methods=["POST"]),
        Route("/fail", fail),
        Route("/boom", boom),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    return app


RULES: dict[str, Any] = {
    "GET /limited": {"flow": [{"qps": 0}]},
    "GET /sem": {"semaphore": {"permits": 0}},
    "GET /shadow": {"flow": [{"qps": 0, "shadow": True}]},
    "POST /pay": {"idempotency": {"required": True}},
    "GET /fail": {
        "breaker": [
            {
                "strategy": "error_count",
                "threshold": 0,
                "min_requests": 1,
                "window_seconds": 60,
                "open_seconds": 600,
            }
        ]
    },
}


@pytest.fixture
async def guard(storage_uri: str, prefix: str, metrics: Metrics) -> AsyncIterator[Guard]:
    guard = Guard(
        {"key_prefix": prefix, "resources": RULES}, storage=storage_uri, metrics=metrics.provider
    )
    yield guard
    await guard.aclose()


async def test_requests_counted_per_result_and_kind(guard: Guard, metrics: Metrics) -> None:
    async with client(app_for(guard)) as c:
        for i in range(5):
            assert (await c.get(f"/items/{i}")).status_code == 200
        for _ in range(4):
            assert (await c.get("/limited")).status_code == 429
        for _ in range(3):
            assert (await c.get("/sem")).status_code == 429
        for _ in range(6):
            assert (await c.get("/shadow")).status_code == 200
        assert (await c.post("/pay", content=b"x")).status_code == 400  # no key
        headers = {"Idempotency-Key": "k-1"}
        assert (await c.post("/pay", content=b"x", headers=headers)).status_code == 200
        assert (await c.post("/pay", content=b"x", headers=headers)).status_code == 200
        assert (await c.get("/fail")).status_code == 500  # opens the breaker
        for _ in range(2):
            assert (await c.get("/fail")).status_code == 503

    keys = ("ymguard.resource", "ymguard.result", "ymguard.rule.kind", "error.type")
    assert metrics.values("ymguard.requests", *keys) == {
        ("GET /items/{item_id}", "passed", "", ""): 5,
        ("GET /limited", "blocked", "flow", "flow-limited"): 4,
        ("GET /sem", "blocked", "semaphore", "concurrency-limited"): 3,
        ("GET /shadow", "shadow_blocked", "flow", "flow-limited"): 6,
        ("POST /pay", "blocked", "idempotency", "idempotency-key-missing"): 1,
        ("POST /pay", "passed", "", ""): 1,
        ("POST /pay", "replayed", "", ""): 1,
        ("GET /fail", "passed", "", ""): 1,
        ("GET /fail", "blocked", "breaker", "circuit-open"): 2,
    }
    # Every admitted call has a duration; none is left in flight.
    durations = metrics.values("ymguard.request.duration", "ymguard.resource", "ymguard.outcome")
    assert durations == {
        ("GET /items/{item_id}", "success"): 5,
        ("GET /shadow", "success"): 6,
        ("POST /pay", "success"): 2,
        ("GET /fail", "error"): 1,
    }
    active = metrics.values("ymguard.active_requests", "ymguard.resource")
    assert set(active.values()) == {0}
    assert ("GET /items/{item_id}",) in active and ("GET /fail",) in active
    # The breaker: one transition, and the state gauge says open.
    assert metrics.values(
        "ymguard.circuit_breaker.transitions",
        "ymguard.resource",
        "ymguard.circuit_breaker.from",
        "ymguard.circuit_breaker.to",
    ) == {("GET /fail", "closed", "open"): 1}
    states = metrics.values(
        "ymguard.circuit_breaker.state", "ymguard.resource", "ymguard.circuit_breaker.state"
    )
    assert states == {
        ("GET /fail", "closed"): 0,
        ("GET /fail", "open"): 1,
        ("GET /fail", "half_open"): 0,
    }


async def test_instruments_units_and_buckets(guard: Guard, metrics: Metrics) -> None:
    async with client(app_for(guard)) as c:
        await c.get("/ok")
    expected = {
        "ymguard.requests": "{request}",
        "ymguard.request.duration": "s",
        "ymguard.active_requests": "{request}",
        "ymguard.circuit_breaker.state": "1",
    }
    for name, unit in expected.items():
        assert metrics.instrument(name).unit == unit
    (point,) = metrics.points("ymguard.request.duration")
    assert tuple(point.explicit_bounds) == DURATION_BUCKETS
    assert point.count == 1


async def test_an_exception_is_an_error_outcome(guard: Guard, metrics: Metrics) -> None:
    async with client(app_for(guard)) as c:
        with pytest.raises(RuntimeError):
            await c.get("/boom")
    durations = metrics.values("ymguard.request.duration", "ymguard.resource", "ymguard.outcome")
    assert durations == {("GET /boom", "error"): 1}


async def test_series_are_bounded_by_routes_not_clients(guard: Guard, metrics: Metrics) -> None:
    async with client(app_for(guard)) as c:
        for i in range(50):
            headers = {"X-Caller": f"user-{i}"}
            await c.get(f"/items/{i}?user={i}", headers=headers)
        await c.get("/no/such/route")
    points = metrics.points("ymguard.requests")
    assert [dict(p.attributes) for p in points] == [
        {"ymguard.resource": "GET /items/{item_id}", "ymguard.result": "passed"}
    ]
    assert points[0].value == 50


async def test_series_only_for_resources_called(guard: Guard, metrics: Metrics) -> None:
    # Every resource of the rules has a chain (and the metrics bind to it) from the start;
    # only the ones called have series.
    async with client(app_for(guard)) as c:
        await c.get("/ok")
        await c.get("/limited")
    assert set(metrics.values("ymguard.active_requests", "ymguard.resource")) == {
        ("GET /ok",),
        ("GET /limited",),
    }


async def test_semaphore_waits_and_permits(storage_uri: str, prefix: str, metrics: Metrics) -> None:
    rules = {
        "key_prefix": prefix,
        "resources": {"GET /sem": {"semaphore": {"permits": 2, "wait_ms": 50, "name": "s1"}}},
    }
    guard = Guard(rules, storage=storage_uri, metrics=metrics.provider)
    try:
        sem = guard.semaphore("s1")
        held = [await sem.acquire(), await sem.acquire()]
        async with client(app_for(guard)) as c:
            assert (await c.get("/sem")).status_code == 429  # waited 50 ms, in vain
            await guard.metrics.refresh()  # type: ignore[union-attr]
            gauge = metrics.values("ymguard.semaphore.permits", "ymguard.semaphore.state")
            assert gauge == {("held",): 2, ("available",): 0, ("waiting",): 0}
            await held[0].release()
            assert (await c.get("/sem")).status_code == 200
        await held[1].release()
        waits = metrics.values(
            "ymguard.queue.duration", "ymguard.resource", "ymguard.rule.kind", "ymguard.result"
        )
        assert waits == {
            ("GET /sem", "semaphore", "rejected"): 1,
            ("GET /sem", "semaphore", "acquired"): 1,
        }
        await guard.metrics.refresh()  # type: ignore[union-attr]
        gauge = metrics.values(
            "ymguard.semaphore.permits", "ymguard.semaphore", "ymguard.semaphore.state"
        )
        assert gauge == {("s1", "held"): 0, ("s1", "available"): 2, ("s1", "waiting"): 0}
    finally:
        await guard.aclose()


async def test_queue_waits_of_flow_and_param_flow(
    storage_uri: str, prefix: str, metrics: Metrics
) -> None:
    """A queued flow rule and a queued param_flow rule report their waits like a semaphore."""
    queue = {"behavior": "queue", "max_queue_ms": 0}
    rules = {
        "key_prefix": prefix,
        "resources": {
            "GET /ok": {"flow": [{"qps": 1, **queue}]},
            "GET /items/{item_id}": {"param_flow": [{"param": "item_id", "qps": 1, **queue}]},
        },
    }
    guard = Guard(rules, storage=storage_uri, metrics=metrics.provider)
    try:
        async with client(app_for(guard)) as c:
            # The first call of each takes its turn at once; the second's turn is a second
            # away, over max_queue_ms: refused.
            assert [(await c.get("/ok")).status_code for _ in range(2)] == [200, 429]
            statuses = [(await c.get("/items/7")).status_code for _ in range(2)]
            assert statuses == [200, 429]
        waits = metrics.values(
            "ymguard.queue.duration", "ymguard.resource", "ymguard.rule.kind", "ymguard.result"
        )
        assert waits == {
            ("GET /ok", "flow", "acquired"): 1,
            ("GET /ok", "flow", "rejected"): 1,
            ("GET /items/{item_id}", "param_flow", "acquired"): 1,
            ("GET /items/{item_id}", "param_flow", "rejected"): 1,
        }
    finally:
        await guard.aclose()


async def test_metrics_off_registers_nothing(storage_uri: str, prefix: str) -> None:
    guard = Guard({"key_prefix": prefix, "resources": RULES}, storage=storage_uri, metrics=False)
    try:
        assert guard.metrics is None
        assert guard.chain("GET /limited").observers == (guard.stats("GET /limited"),)
        async with client(app_for(guard)) as c:
            assert (await c.get("/limited")).status_code == 429
    finally:
        await guard.aclose()


async def test_without_an_sdk_metrics_are_a_no_op(storage_uri: str, prefix: str) -> None:
    guard = Guard({"key_prefix": prefix, "resources": RULES}, storage=storage_uri)
    try:
        assert guard.metrics is not None
        async with client(app_for(guard)) as c:
            assert (await c.get("/ok")).status_code == 200
            assert (await c.get("/limited")).status_code == 429
    finally:
        await guard.aclose()


async def test_storage_outages_are_counted_once_each(prefix: str, metrics: Metrics) -> None:
    server = RedisServer().start()
    uri = server.url.replace("redis://", "redis://user:secret@")  # credentials never shown
    guard = None
    try:
        rules = {"key_prefix": prefix, "resources": {"GET /limited": {"flow": [{"qps": 1000}]}}}
        guard = Guard(rules, storage=server.url, metrics=metrics.provider)
        async with client(app_for(guard)) as c:
            assert (await c.get("/limited")).status_code == 200
            server.stop()
            for _ in range(3):  # on_storage_error: local, so they pass
                assert (await c.get("/limited")).status_code == 200
        assert metrics.values("ymguard.storage.outages", "ymguard.storage") == {
            (storage_name(guard.store),): 1
        }
        assert storage_name(type("S", (), {"uri": uri})()) == server.url
    finally:
        if guard is not None:
            await guard.aclose()
        server.close()


async def test_an_outage_is_counted_once_per_store_however_many_guards_share_it(
    prefix: str, metrics: Metrics
) -> None:
    """Two guards on one store, and one closed before: one outage, one count (the store
    counts its outages; each store is reported once)."""
    server = RedisServer().start()
    rules = {"key_prefix": prefix, "resources": {"GET /limited": {"flow": [{"qps": 1000}]}}}
    old = Guard(rules, storage=server.url, metrics=metrics.provider)
    await old.aclose()  # closed, not collected: its store met no outage
    first = Guard(rules, storage=server.url, metrics=metrics.provider)
    second = Guard(rules, storage=first.store, metrics=metrics.provider)
    try:
        async with client(app_for(first)) as a, client(app_for(second)) as b:
            assert (await a.get("/limited")).status_code == 200
            server.stop()
            for _ in range(2):
                assert (await a.get("/limited")).status_code == 200
                assert (await b.get("/limited")).status_code == 200
        assert first.store.outages == 1
        assert metrics.values("ymguard.storage.outages", "ymguard.storage") == {
            (storage_name(first.store),): 1
        }
    finally:
        await first.aclose()
        await second.aclose()
        server.close()


async def test_reload_keeps_recording(storage_uri: str, prefix: str, metrics: Metrics) -> None:
    guard = Guard(
        {"key_prefix": prefix, "resources": RULES}, storage=storage_uri, metrics=metrics.provider
    )
    try:
        async with client(app_for(guard)) as c:
            assert (await c.get("/limited")).status_code == 429
            guard.reload({"key_prefix": prefix, "resources": {"GET /ok": {"flow": [{"qps": 0}]}}})
            assert (await c.get("/ok")).status_code == 429
            assert (await c.get("/limited")).status_code == 200
        values = metrics.values("ymguard.requests", "ymguard.resource", "ymguard.result")
        assert values == {
            ("GET /limited", "blocked"): 1,
            ("GET /ok", "blocked"): 1,
            ("GET /limited", "passed"): 1,
        }
    finally:
        await guard.aclose()


async def test_cancelled_calls_leave_no_one_in_flight(
    storage_uri: str, prefix: str, metrics: Metrics
) -> None:
    started = asyncio.Event()

    async def slow(request: Request) -> PlainTextResponse:
        started.set()
        await asyncio.sleep(60)
        return PlainTextResponse("late")

    guard = Guard({"key_prefix": prefix}, storage=storage_uri, metrics=metrics.provider)
    app = Starlette(routes=[Route("/slow", slow)])
    app.add_middleware(GuardMiddleware, guard=guard)
    try:
        async with client(app) as c:
            task = asyncio.ensure_future(c.get("/slow"))
            await asyncio.wait_for(started.wait(), 30)
            assert metrics.values("ymguard.active_requests", "ymguard.resource") == {
                ("GET /slow",): 1
            }
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        for _ in range(600):  # the exit may run in a task of its own: wait up to 30 s
            if metrics.values("ymguard.active_requests", "ymguard.resource") == {("GET /slow",): 0}:
                break
            await asyncio.sleep(0.05)
        assert metrics.values("ymguard.active_requests", "ymguard.resource") == {("GET /slow",): 0}
        assert metrics.values("ymguard.request.duration", "ymguard.outcome") == {("cancelled",): 1}
    finally:
        await guard.aclose()


GLOBAL_PROVIDER_SCRIPT = """
import asyncio
import subprocess
import sys
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from ymguard import Guard
from ymguard.chain import Context

before = Guard({"resources": {"GET /a": {"flow": [{"qps": 0}]}}})   # made before the SDK
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
after = Guard({"resources": {"GET /b": {}}})                          # and after it

async def main():
    for guard, resource in ((before, "GET /a"), (after, "GET /b")):
        ctx = Context(resource)
        try:
            tokens = await guard.chain(resource).enter(ctx)
        except Exception:
            continue
        await guard.chain(resource).exit(ctx, tokens)

asyncio.run(main())
for rm in reader.get_metrics_data().resource_metrics:
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            if m.name == "ymguard.requests":
                for p in m.data.data_points:
                    a = p.attributes
                    print(a["ymguard.resource"], a["ymguard.result"], p.value)
"""


def test_an_sdk_set_globally_gets_the_metrics_of_every_guard() -> None:
    done = subprocess.run(
        [sys.executable, "-c", GLOBAL_PROVIDER_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["GET /a blocked 1", "GET /b passed 1"]


async def test_durations_can_be_left_out(guard: Guard, metrics: Metrics) -> None:
    assert guard.metrics is not None
    guard.metrics.record_durations = False
    async with client(app_for(guard)) as c:
        assert (await c.get("/ok")).status_code == 200
    assert metrics.points("ymguard.request.duration") == []
    assert metrics.values("ymguard.requests", "ymguard.resource") == {("GET /ok",): 1}
