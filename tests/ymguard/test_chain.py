"""The chain: observers hear every call, and every check reports a status."""

from __future__ import annotations

from typing import Any

from ymguard import Blocked, Context, Guard
from ymguard.breaker import BreakerStatus
from ymguard.chain import Check, CheckStatus, Outcome
from ymguard.storage import Store


class Recorder:
    """An observer that writes down what it hears."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def passed(self, ctx: Context) -> None:
        self.events.append(("passed", ctx.resource))

    def blocked(self, ctx: Context, error: Blocked, check: Check) -> None:
        self.events.append(("blocked", ctx.resource, check.kind, error.rule))

    def finished(self, ctx: Context, rt_ms: float, outcome: Outcome) -> None:
        assert rt_ms >= 0
        self.events.append(("finished", ctx.resource, ctx.status, outcome))


async def call(guard: Guard, resource: str, status: int = 200) -> bool:
    chain = guard.chain(resource)
    ctx = Context(resource)
    try:
        tokens = await chain.enter(ctx)
    except Blocked:
        return False
    ctx.status = status
    await chain.exit(ctx, tokens)
    return True


async def test_observers_hear_passed_blocked_with_rule_and_kind_and_finished(
    store: Store,
) -> None:
    guard = Guard({"resources": {"GET /r": {"flow": [{"qps": 2}]}}}, storage=store)
    recorder = Recorder()
    guard.observe(recorder)
    assert [await call(guard, "GET /r", status) for status in (200, 503, 200)] == [
        True,
        True,
        False,
    ]
    assert recorder.events == [
        ("passed", "GET /r"),
        ("finished", "GET /r", 200, "success"),
        ("passed", "GET /r"),
        ("finished", "GET /r", 503, "error"),
        ("blocked", "GET /r", "flow", "flow[0] qps=2"),
    ]


async def test_observers_stay_through_a_reload_and_hear_resources_compiled_later() -> None:
    guard = Guard({"resources": {"GET /a": {"flow": [{"qps": 1}]}}})
    recorder = Recorder()
    guard.observe(recorder)
    guard.reload({"resources": {"GET /b": {"flow": [{"qps": 1}]}}})
    assert await call(guard, "GET /b") and await call(guard, "GET /code")
    assert [e[:2] for e in recorder.events if e[0] == "passed"] == [
        ("passed", "GET /b"),
        ("passed", "GET /code"),
    ]


async def test_statistics_subscribe_to_the_chain_like_any_observer() -> None:
    guard = Guard({"resources": {"GET /r": {"flow": [{"qps": 1}]}}})
    chain = guard.chain("GET /r")
    assert chain.observers[0] is guard.stats("GET /r")
    await call(guard, "GET /r")
    await call(guard, "GET /r")
    counts = guard.stats("GET /r").counts()
    assert (counts.passed, counts.blocked, counts.success, guard.stats("GET /r").inflight) == (
        1,
        1,
        1,
        0,
    )


async def test_every_check_reports_a_status(store: Store) -> None:
    guard = Guard(
        {
            "resources": {
                "POST /orders": {
                    "flow": [{"qps": 5}, {"concurrency": 2}],
                    "breaker": [{"strategy": "error_ratio", "threshold": 0.5}],
                    "semaphore": {"permits": 3},
                    "idempotency": {},
                    "submit_token": {},
                }
            }
        },
        storage=store,
    )
    statuses = guard.status()
    kinds = [s.kind if isinstance(s, CheckStatus) else "breaker" for s in statuses]
    assert kinds == ["flow", "flow", "breaker", "semaphore", "idempotency", "submit_token"]
    assert statuses[0] == CheckStatus(
        "flow", "POST /orders", "flow[0] qps=5", {"qps": 5, "origins": 0}
    )
    assert isinstance(statuses[2], BreakerStatus) and statuses[2].state == "closed"
    assert all(s.resource == "POST /orders" for s in statuses)  # type: ignore[attr-defined]
    await guard.aclose()
