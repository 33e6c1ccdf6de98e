"""System protection (``system:``): per process, over every guarded inbound resource."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from ymguard import (
    Blocked,
    Context,
    FlowLimited,
    Guard,
    GuardMiddleware,
    RulesError,
    SystemOverloaded,
    load_rules,
    parse_rules,
)
from ymguard.system import SystemCheck, SystemProtection, SystemRule, process_cpu_seconds


def shop(storage_uri: str, prefix: str, system: dict[str, Any]) -> tuple[Guard, FastAPI, Any]:
    """An app with two guarded routes that wait for ``release`` to be set."""
    guard = Guard(
        {"key_prefix": prefix, "system": system, "resources": {"GET /a": {}}},
        storage=storage_uri,
    )
    app = FastAPI()
    release = asyncio.Event()

    @app.get("/a")
    async def a() -> dict[str, bool]:
        await release.wait()
        return {"ok": True}

    @app.get("/b/{n}")
    async def b(n: int) -> dict[str, bool]:
        await release.wait()
        return {"ok": True}

    @app.get("/quick")
    async def quick() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    return guard, app, release


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def until(condition: Any, steps: int = 1000) -> None:
    """Let the loop run until ``condition`` holds, a step at a time (what it waits for
    is already due: requests on their way in, a timer that woke late)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"condition never held in {steps} loop steps")


async def test_max_concurrency_counts_every_route_together(storage_uri: str, prefix: str) -> None:
    guard, app, release = shop(storage_uri, prefix, {"max_concurrency": 2})
    async with client(app) as c:
        held = [asyncio.ensure_future(c.get("/a")), asyncio.ensure_future(c.get("/b/1"))]
        await until(lambda: guard.system.inflight == 2)
        refused = await c.get("/quick")
        assert refused.status_code == 503
        assert refused.json()["type"].endswith("/system-overloaded")
        assert refused.json()["rule"] == "system max_concurrency=2"
        assert refused.headers["Retry-After"] == "1"
        release.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert (await c.get("/quick")).status_code == 200
    assert guard.system.inflight == 0
    await guard.aclose()


async def test_code_resources_are_not_inbound(storage_uri: str, prefix: str) -> None:
    guard = Guard({"key_prefix": prefix, "system": {"max_concurrency": 0}}, storage=storage_uri)

    @guard.resource("work")
    async def work() -> str:
        return "done"

    assert await work() == "done"
    assert not any(isinstance(c, SystemCheck) for c in guard.chain("work").checks)
    assert isinstance(guard.chain("GET /x").checks[0], SystemCheck)
    with pytest.raises(SystemOverloaded):
        await guard.chain("GET /x").enter(Context("GET /x"))
    await guard.aclose()


async def test_max_qps_answers_429_flow_limited_with_the_system_policy(
    storage_uri: str, prefix: str
) -> None:
    guard, app, _ = shop(storage_uri, prefix, {"max_qps": 0})
    async with client(app) as c:
        refused = await c.get("/quick")
    assert refused.status_code == 429
    assert refused.json()["type"].endswith("/flow-limited")
    assert refused.headers["RateLimit-Policy"] == '"system";q=0;w=1'
    assert refused.headers["Retry-After"] == "1"
    await guard.aclose()


def test_max_qps_admits_that_many_per_second() -> None:
    system = SystemProtection(SystemRule(max_qps=3))
    now = 1000.0
    admitted = 0
    for _ in range(10):
        if system.refusal("GET /a", now) is None:
            system.on_pass(now)
            admitted += 1
    assert admitted == 3
    assert isinstance(system.refusal("GET /a", now + 0.5), FlowLimited)
    assert system.refusal("GET /a", now + 1.0) is None  # the second has slid past


def test_a_request_a_later_check_blocks_is_not_counted() -> None:
    system = SystemProtection(SystemRule(max_qps=1))
    slot = system.on_pass(5.0)
    system.on_undo(slot)
    assert system.inflight == 0 and system.refusal("GET /a", 5.0) is None


def test_max_avg_rt_refuses_while_the_last_second_is_slow() -> None:
    system = SystemProtection(SystemRule(max_avg_rt_ms=100))
    for rt in (50.0, 300.0):
        system.on_pass(10.0)
        system.on_exit(10.0, rt)
    assert system.avg_rt_ms(10.0) == 175.0
    refusal = system.refusal("GET /a", 10.0)
    assert isinstance(refusal, SystemOverloaded) and refusal.rule == "system max_avg_rt_ms=100"
    assert system.refusal("GET /a", 11.5) is None  # nothing finished in the last second


def test_max_cpu_usage_without_adaptive_refuses_while_cpu_is_high() -> None:
    system = SystemProtection(SystemRule(max_cpu_usage=0.8))
    system.cpu_usage = 0.9
    assert isinstance(system.refusal("GET /a", 1.0), SystemOverloaded)
    system.cpu_usage = 0.5
    assert system.refusal("GET /a", 1.0) is None


def test_adaptive_is_sentinels_bbr_check_while_triggered() -> None:
    system = SystemProtection(SystemRule(adaptive=True, max_loop_lag_ms=100))
    now = 20.0
    # Ten calls of 100 ms finished in one bucket: 100 per second at best, 100 ms at best,
    # so the process can have 100 * 100 / 1000 = 10 calls in flight without queueing.
    for _ in range(10):
        system.on_pass(now)
        system.on_exit(now, 100.0)
    assert system.max_success_qps(now) == 100 and system.min_rt_ms(now) == 100
    for _ in range(11):
        system.on_pass(now)
    assert system.inflight == 11
    assert system.refusal("GET /a", now) is None  # no lag: no limit
    system.note_lag(150.0, time.monotonic())
    refusal = system.refusal("GET /a", now)
    assert isinstance(refusal, SystemOverloaded) and refusal.rule == "system adaptive (loop lag)"
    system.on_exit(now, None)
    assert system.inflight == 10 and system.refusal("GET /a", now) is None
    # CPU over max_cpu_usage triggers it too.
    system = SystemProtection(SystemRule(adaptive=True, max_cpu_usage=0.5))
    system.inflight = 2  # nothing finished yet: no capacity shown, one call at a time
    assert system.refusal("GET /a", now) is None
    system.cpu_usage = 0.7
    assert isinstance(system.refusal("GET /a", now), SystemOverloaded)
    system.inflight = 1
    assert system.refusal("GET /a", now) is None  # one in flight always passes


async def test_a_blocked_event_loop_triggers_adaptive_protection(
    storage_uri: str, prefix: str
) -> None:
    system = {"adaptive": True, "max_loop_lag_ms": 300}
    guard = Guard({"key_prefix": prefix, "system": system}, storage=storage_uri)
    chain = guard.chain("GET /x")
    held = [await chain.enter(Context("GET /x")) for _ in range(2)]  # two in flight
    timer = guard.system._timer
    assert timer is not None
    await asyncio.sleep(0.05)  # the timer starts its first nap
    time.sleep(1.0)  # noqa: ASYNC251 -- block the event loop: the timer wakes 1 s late
    await until(lambda: guard.system.loop_lag_ms > 300)
    with pytest.raises(SystemOverloaded) as info:
        await chain.enter(Context("GET /x"))
    assert info.value.rule == "system adaptive (loop lag)"
    for _ in range(20):  # the lag is measured by one timer per loop, not per request
        with pytest.raises(Blocked):
            await chain.enter(Context("GET /x"))
    assert guard.system._timer is timer
    for tokens in held:
        await chain.exit(Context("GET /x", start=time.perf_counter()), tokens)
    await guard.aclose()
    assert guard.system._timer is None


async def test_the_timer_samples_the_process_cpu(storage_uri: str, prefix: str) -> None:
    guard = Guard({"key_prefix": prefix, "system": {"max_cpu_usage": 1.0}}, storage=storage_uri)
    chain = guard.chain("GET /x")
    await chain.exit(
        Context("GET /x", start=time.perf_counter()), await chain.enter(Context("GET /x"))
    )
    async with asyncio.timeout(30):  # a hang fails; no duration is asserted
        while guard.system.cpu_usage == 0:
            spent = process_cpu_seconds()
            while process_cpu_seconds() - spent < 0.05:  # burn CPU on the loop's thread
                pass
            await asyncio.sleep(0.05)
    assert 0 < guard.system.cpu_usage <= 1
    await guard.aclose()


async def test_a_reload_swaps_the_system_rule(storage_uri: str, prefix: str) -> None:
    guard = Guard({"key_prefix": prefix, "system": {"max_concurrency": 0}}, storage=storage_uri)
    with pytest.raises(SystemOverloaded):
        await guard.chain("GET /x").enter(Context("GET /x"))
    guard.reload({"key_prefix": prefix})
    assert guard.chain("GET /x").checks == ()
    guard.reload({"key_prefix": prefix, "system": {"max_concurrency": 1}})
    assert isinstance(guard.chain("GET /x").checks[0], SystemCheck)
    await guard.aclose()


FULL = """\
system:
  max_concurrency: 2000
  max_qps: 20000
  max_avg_rt_ms: 1000
  max_cpu_usage: 0.9
  adaptive: true
  max_loop_lag_ms: 50
"""


def test_check_accepts_every_system_field(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(FULL)
    rule = load_rules(path).system
    assert rule is not None and rule.adaptive and rule.max_cpu_usage == 0.9


@pytest.mark.parametrize(
    ("system", "field", "why"),
    [
        ({"max_cpu_usage": 1.5}, "system.max_cpu_usage", "less than or equal to 1"),
        ({"max_cpu_usage": -0.1}, "system.max_cpu_usage", "greater than or equal to 0"),
        ({"max_qps": -1}, "system.max_qps", "greater than or equal to 0"),
        ({"max_concurrency": 1.5}, "system.max_concurrency", "integer"),
        ({"max_avg_rt_ms": 0}, "system.max_avg_rt_ms", "greater than 0"),
        ({"max_loop_lag_ms": 50}, "system", "set adaptive: true"),
        ({"adaptive": "sometimes"}, "system.adaptive", "boolean"),
        ({"max_load": 3}, "system.max_load", "unknown field"),
    ],
)
def test_nonsense_is_refused(system: dict[str, Any], field: str, why: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules({"system": system}, source="r.yaml")
    (problem,) = info.value.problems
    assert problem.field == field and why in problem.why, str(problem)


def test_a_guard_used_on_two_event_loops_gets_a_timer_on_each() -> None:
    guard = Guard({"system": {"adaptive": True}})

    async def one_call() -> object:
        chain = guard.chain("GET /x")
        ctx = Context("GET /x")
        await chain.exit(ctx, await chain.enter(ctx))
        return guard.system._timer

    first = asyncio.run(one_call())  # that loop is closed now, its timer never ran out
    second = asyncio.run(one_call())
    assert first is not None and second is not None and first is not second
