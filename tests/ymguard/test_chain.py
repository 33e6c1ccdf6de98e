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


class PerResource:
    """An observer that keeps a recorder per resource and binds each to its chains."""

    def __init__(self, bound: set[str]) -> None:
        self.bound = bound  # the resources it binds (others: the observer itself)
        self.recorders: dict[str, Recorder] = {}
        self.own = Recorder()

    def bind(self, resource: str) -> Recorder | None:
        if resource not in self.bound:
            return None
        return self.recorders.setdefault(resource, Recorder())

    def passed(self, ctx: Context) -> None:
        self.own.passed(ctx)

    def blocked(self, ctx: Context, error: Blocked, check: Check) -> None:
        self.own.blocked(ctx, error, check)

    def finished(self, ctx: Context, rt_ms: float, outcome: Outcome) -> None:
        self.own.finished(ctx, rt_ms, outcome)


async def test_an_observer_bound_to_a_resource_hears_its_calls_through_what_bind_returns() -> None:
    guard = Guard({"resources": {"GET /a": {"flow": [{"qps": 1}]}}})
    observer = PerResource({"GET /a"})
    guard.observe(observer)
    assert await call(guard, "GET /a") and not await call(guard, "GET /a")
    assert await call(guard, "GET /b", 503)
    assert observer.recorders["GET /a"].events == [
        ("passed", "GET /a"),
        ("finished", "GET /a", 200, "success"),
    ]
    # Refusals go to the observer itself; a resource bind answers None for, too.
    assert observer.own.events == [
        ("blocked", "GET /a", "flow", "flow[0] qps=1"),
        ("passed", "GET /b"),
        ("finished", "GET /b", 503, "error"),
    ]


def test_a_guarded_calls_params_are_built_from_its_arguments_when_first_read() -> None:
    ctx = Context("f", call_args=(("a", "b"), (1,), {"c": 3}))
    assert ctx.params == {"a": 1, "c": 3}
    assert ctx.params is ctx.params  # built once
    ctx.params = {"x": 1}
    assert ctx.params == {"x": 1}
    assert Context("g").params == {} and Context("h", params={"id": "7"}).params == {"id": "7"}


class SyncExit:
    """A check whose exit runs without a coroutine (``exit_now``); its ``exit`` must not run."""

    kind = "test"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.left: list[Any] = []

    def status(self) -> object:
        return None

    async def enter(self, ctx: Context) -> Any:
        return "token"

    def exit_now(self, ctx: Context, token: Any) -> None:
        self.left.append(token)
        if self.fail:
            raise RuntimeError("exit failed")

    async def exit(self, ctx: Context, token: Any) -> None:
        raise AssertionError("the chain awaited exit although exit_now is there")


async def test_a_check_with_exit_now_is_left_without_a_coroutine_and_its_failure_is_logged(
    caplog: Any,
) -> None:
    from ymguard.chain import Chain
    from ymguard.stats import ResourceStats

    check, failing = SyncExit(), SyncExit(fail=True)
    chain = Chain("r", [check, failing], ResourceStats())
    assert chain.sync_exit
    ctx = Context("r")
    tokens = await chain.enter(ctx)
    assert chain.exit_now(ctx, tokens) is None
    assert check.left == ["token"] and failing.left == ["token"]  # the failure stopped nothing
    assert "exit of" in caplog.text
    ctx = Context("r")
    await chain.exit(ctx, await chain.enter(ctx))  # the awaited exit runs exit_now too
    assert check.left == ["token", "token"]


async def test_memory_concurrency_and_semaphore_enter_and_leave_without_a_coroutine() -> None:
    guard = Guard(
        {
            "resources": {
                "conc": {"flow": [{"concurrency": 1}]},
                "sem": {"semaphore": {"permits": 1}},
            }
        },
        storage="memory://",
    )
    for resource in ("conc", "sem"):
        chain = guard.chain(resource)
        assert chain.sync_enter and chain.sync_exit, resource
        first = Context(resource)
        tokens = chain.enter_now(first)
        try:
            chain.enter_now(Context(resource))
        except Blocked as exc:
            assert exc.code == ("concurrency-limited" if resource == "sem" else "flow-limited")
        else:
            raise AssertionError(f"{resource}: a second call was admitted")
        assert chain.exit_now(first, tokens) is None  # the permit is back
        again = Context(resource)
        assert chain.exit_now(again, chain.enter_now(again)) is None
    await guard.aclose()


async def test_an_observer_without_bind_on_its_class_is_not_bound() -> None:
    from unittest.mock import Mock

    guard = Guard({"resources": {"r": {"flow": [{"qps": 9}]}}}, metrics=False)
    observer = Mock()  # makes a callable ``bind`` on demand: not a request to be bound
    guard.observe(observer)
    assert await call(guard, "r")
    assert (observer.passed.call_count, observer.finished.call_count) == (1, 1)


async def test_a_bound_observer_hears_the_end_of_a_call_refused_inside_its_endpoint() -> None:
    from ymguard.errors import FlowLimited

    guard = Guard({"resources": {"GET /a": {"flow": [{"qps": 9}]}}}, metrics=False)
    observer = PerResource({"GET /a"})
    guard.observe(observer)
    chain = guard.chain("GET /a")
    ctx = Context("GET /a")
    tokens = await chain.enter(ctx)
    ctx.blocked = FlowLimited("inner", "flow[0] qps=0")  # a guard inside the endpoint refused
    await chain.exit(ctx, tokens)
    assert observer.recorders["GET /a"].events == [
        ("passed", "GET /a"),
        ("finished", "GET /a", None, "blocked"),
    ]
