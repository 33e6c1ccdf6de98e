"""Shadow mode: ``shadow: true`` on any rule evaluates and reports it, but never blocks.

Every behaviour runs on the memory store and on the shared Redis (``storage_uri``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ymguard import Guard, GuardMiddleware, RulesError, parse_rules, shadow
from ymguard._model import rule_ids
from ymguard.breaker import BreakerCheck
from ymguard.chain import Context
from ymguard.limiter import FlowRule, QpsCheck
from ymguard.shadow import SHADOWED, is_shadow

RES = "GET /work"


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def requests_by_result(reader: InMemoryMetricReader) -> dict[tuple[str, str, str], int]:
    out: dict[tuple[str, str, str], int] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != "ymguard.requests":
                    continue
                for p in metric.data.data_points:
                    a = p.attributes
                    key = (
                        str(a["ymguard.result"]),
                        str(a.get("ymguard.rule.kind", "")),
                        str(a.get("error.type", "")),
                    )
                    out[key] = out.get(key, 0) + int(p.value)
    return out


class Shop:
    """An app with one guarded route whose handler can be held open."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()
        self.inside = 0

        async def work(request: Request) -> PlainTextResponse:
            self.calls += 1
            self.inside += 1
            try:
                await self.release.wait()
            finally:
                self.inside -= 1
            return PlainTextResponse("done", status_code=int(request.query_params.get("s", 200)))

        self.app = Starlette(routes=[Route("/work", work)])
        self.app.add_middleware(GuardMiddleware, guard=guard)
        guard.install(self.app)


def make_guard(storage_uri: str, prefix: str, reader: InMemoryMetricReader, **rules: Any) -> Guard:
    return Guard(
        {"key_prefix": prefix, "resources": {RES: rules}},
        storage=storage_uri,
        metrics=MeterProvider(metric_readers=[reader]),
    )


async def test_a_shadow_flow_rule_never_blocks_and_reports(
    storage_uri: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shadow, "LOG_INTERVAL", 3600.0)  # a slow machine stays in one interval
    reader = InMemoryMetricReader()
    # qps 0 refuses every call, whatever the machine's speed (a shadow semaphore below
    # shows admitted and refused calls side by side).
    guard = make_guard(storage_uri, prefix, reader, flow=[{"qps": 0, "shadow": True}])
    shop = Shop(guard)
    caplog.set_level(logging.WARNING, logger="ymguard.shadow")
    try:
        async with client(shop.app) as c:
            statuses = [(await c.get("/work")).status_code for _ in range(8)]
        assert statuses == [200] * 8
        assert shop.calls == 8
        assert requests_by_result(reader) == {("shadow_blocked", "flow", "flow-limited"): 8}
        lines = [r for r in caplog.records if r.name == "ymguard.shadow"]
        assert len(lines) == 1  # at most one line per rule per interval
        assert "would have refused" in lines[0].getMessage()
        assert "flow[0] qps=0" in lines[0].getMessage()
    finally:
        await guard.aclose()


async def test_a_shadow_semaphore_holds_real_permits_and_leaks_none(
    storage_uri: str, prefix: str
) -> None:
    reader = InMemoryMetricReader()
    guard = make_guard(
        storage_uri, prefix, reader, semaphore={"permits": 1, "name": f"{prefix}-s", "shadow": True}
    )
    shop = Shop(guard)
    shop.release.clear()
    try:
        async with client(shop.app) as c:
            calls = [asyncio.ensure_future(c.get("/work")) for _ in range(3)]
            for _ in range(600):  # all three get in: up to 30 s on a loaded machine
                if shop.inside == 3:
                    break
                await asyncio.sleep(0.05)
            assert shop.inside == 3
            sem = guard.semaphore(f"{prefix}-s")
            assert await sem.held() == 1  # the one call it admitted holds the permit
            shop.release.set()
            assert [r.status_code for r in await asyncio.gather(*calls)] == [200] * 3
        assert await sem.held() == 0
        assert requests_by_result(reader) == {
            ("passed", "", ""): 1,
            ("shadow_blocked", "semaphore", "concurrency-limited"): 2,
        }
    finally:
        await guard.aclose()


async def test_a_shadow_breaker_opens_but_lets_calls_through(storage_uri: str, prefix: str) -> None:
    reader = InMemoryMetricReader()
    breaker = {
        "strategy": "error_count",
        "threshold": 0,
        "min_requests": 1,
        "window_seconds": 60,
        "open_seconds": 600,
        "shadow": True,
    }
    guard = make_guard(storage_uri, prefix, reader, breaker=[breaker])
    shop = Shop(guard)
    try:
        async with client(shop.app) as c:
            assert (await c.get("/work?s=500")).status_code == 500
            # Open now: an enforced breaker would answer 503; this one lets them through.
            for _ in range(3):
                assert (await c.get("/work")).status_code == 200
        (status,) = guard.breakers()
        assert status.state == "open"
        assert any(isinstance(ch, BreakerCheck) for ch in guard.chain(RES).checks)
        assert requests_by_result(reader) == {
            ("passed", "", ""): 1,
            ("shadow_blocked", "breaker", "circuit-open"): 3,
        }
    finally:
        await guard.aclose()


async def test_an_enforced_block_after_a_shadow_rule_gives_its_quota_back(
    storage_uri: str, prefix: str
) -> None:
    reader = InMemoryMetricReader()
    # The shadow flow admits one call a minute... but every call is refused after it by
    # the enforced semaphore, so it gives its count back each time: never shadow_blocked.
    guard = make_guard(
        storage_uri,
        prefix,
        reader,
        flow=[{"qps": 1, "shadow": True}],
        semaphore={"permits": 0, "name": f"{prefix}-s"},
    )
    shop = Shop(guard)
    try:
        async with client(shop.app) as c:
            assert [(await c.get("/work")).status_code for _ in range(5)] == [429] * 5
        assert shop.calls == 0
        assert requests_by_result(reader) == {
            ("blocked", "semaphore", "concurrency-limited"): 5,
        }
    finally:
        await guard.aclose()


async def test_a_shadow_refusal_then_an_enforced_one_counts_as_blocked(
    storage_uri: str, prefix: str
) -> None:
    reader = InMemoryMetricReader()
    guard = make_guard(
        storage_uri,
        prefix,
        reader,
        flow=[{"qps": 0, "shadow": True}, {"qps": 0}],
    )
    shop = Shop(guard)
    try:
        async with client(shop.app) as c:
            assert [(await c.get("/work")).status_code for _ in range(3)] == [429] * 3
        assert requests_by_result(reader) == {("blocked", "flow", "flow-limited"): 3}
    finally:
        await guard.aclose()


async def test_a_shadow_idempotency_rule_reports_a_missing_key(
    storage_uri: str, prefix: str
) -> None:
    reader = InMemoryMetricReader()
    guard = Guard(
        {
            "key_prefix": prefix,
            "resources": {"POST /work": {"idempotency": {"required": True, "shadow": True}}},
        },
        storage=storage_uri,
        metrics=MeterProvider(metric_readers=[reader]),
    )

    async def work(request: Request) -> PlainTextResponse:
        return PlainTextResponse("done")

    app = Starlette(routes=[Route("/work", work, methods=["POST"])])
    app.add_middleware(GuardMiddleware, guard=guard)
    try:
        async with client(app) as c:
            assert (await c.post("/work", content=b"x")).status_code == 200
        assert requests_by_result(reader) == {
            ("shadow_blocked", "idempotency", "idempotency-key-missing"): 1
        }
    finally:
        await guard.aclose()


async def test_the_chain_sees_the_refusal_in_ctx_shadowed(storage_uri: str, prefix: str) -> None:
    guard = Guard(
        {"key_prefix": prefix, "resources": {RES: {"flow": [{"qps": 0, "shadow": True}]}}},
        storage=storage_uri,
        metrics=False,
    )
    try:
        chain = guard.chain(RES)
        (check,) = chain.checks
        assert isinstance(check, QpsCheck) and is_shadow(check)
        ctx = Context(RES)
        tokens = await chain.enter(ctx)
        assert tokens == [SHADOWED]
        assert ctx.shadowed is not None
        ((error, by),) = ctx.shadowed
        assert by is check and error.code == "flow-limited"
        await chain.exit(ctx, tokens)
        assert guard.stats(RES).counts().passed == 1
    finally:
        await guard.aclose()


def test_shadow_is_a_field_of_every_rule_and_no_part_of_its_identity() -> None:
    rules = parse_rules(
        {
            "resources": {
                "POST /x": {
                    "flow": [{"qps": 1, "shadow": True}],
                    "semaphore": {"permits": 1, "shadow": True},
                    "breaker": [{"strategy": "error_count", "threshold": 1, "shadow": True}],
                    "idempotency": {"shadow": True},
                    "submit_token": {"shadow": True},
                }
            }
        }
    )
    found = rules.resources["POST /x"]
    assert found.flow[0].shadow and found.breaker[0].shadow
    assert found.semaphore is not None and found.semaphore.shadow
    assert found.idempotency is not None and found.idempotency.shadow
    assert found.submit_token is not None and found.submit_token.shadow
    assert rule_ids([FlowRule(qps=5)]) == rule_ids([FlowRule(qps=5, shadow=True)])
    assert not FlowRule(qps=5).shadow


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        ({"resources": {"GET /x": {"shadow": True}}}, 'resources."GET /x".shadow'),
        ({"shadow": True}, "shadow"),
        ({"resources": {"GET /x": {"flow": [{"qps": 1, "shadow": "maybe"}]}}}, "flow[0].shadow"),
    ],
)
def test_shadow_is_refused_where_it_is_no_rule(rules: dict[str, Any], field: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(rules, source="rules.yaml")
    assert field in str(caught.value)
