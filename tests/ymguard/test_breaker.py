"""Circuit breakers: Sentinel's three strategies, one probe, shared state, pybreaker.

Every behaviour runs on the memory store and on the shared Redis (the ``store`` fixture).
Slowness is simulated by moving ``ctx.start`` back, never by sleeping; the only sleeps
are the short ``open_seconds`` timers the breakers themselves wait for.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import httpx
import pybreaker
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.helpers import RedisServer, Uvicorn, running
from ymguard import CircuitOpen, Context, Guard, GuardMiddleware, RulesError
from ymguard.backends.breaker_state import close_breakers, copies_for
from ymguard.breaker import Breaker, BreakerCheck
from ymguard.chain import Chain
from ymguard.errors import PROBLEM_BASE, Blocked, StorageUnavailable
from ymguard.storage import RedisStore, Store, store_from_uri
from ymguard.storage.pubsub import pubsub_for


@pytest.fixture
def storage_uri(storage_uri_with_cluster: str) -> str:
    """Parity on memory, Redis and a Redis Cluster (``redis+cluster://``)."""
    return storage_uri_with_cluster


RES = "GET /work"
OPEN = 0.2  # open_seconds of most tests: short, so the file stays fast


def rule(strategy: str = "error_count", **fields: Any) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "threshold": 0,
        "min_requests": 1,
        "window_seconds": 5,
        "open_seconds": OPEN,
        **fields,
    }


MakeGuard = Callable[..., Guard]


@pytest.fixture
async def make_guard(store: Store) -> AsyncIterator[MakeGuard]:
    """Guards on the parametrized store, with ``breaker`` rules for ``GET /work``."""

    def make(*breakers: dict[str, Any], resource: str = RES, **extra: Any) -> Guard:
        rules = {"resources": {resource: {"breaker": list(breakers), **extra}}}
        return Guard(rules, storage=store)

    if isinstance(store, RedisStore):
        # Connect (on a cluster: read its layout) first, so that no call under test pays
        # for it: a slow-ratio rule would count that first call slow on a busy machine.
        await store.call("PING")
    yield make
    await close_breakers(store)


async def call(chain: Chain, outcome: str = "ok") -> str:
    """One call through a chain: ``ok``, ``error``, ``slow`` (1 s) or ``cancel``."""
    ctx = Context(chain.resource)
    try:
        tokens = await chain.enter(ctx)
    except CircuitOpen:
        return "blocked"
    if outcome == "error":
        ctx.error = RuntimeError("boom")
    elif outcome == "cancel":
        ctx.error = asyncio.CancelledError()
    else:
        ctx.status = 200
        if outcome == "slow":
            ctx.start -= 1.0
    await chain.exit(ctx, tokens)
    return "passed"


async def calls(chain: Chain, *outcomes: str) -> list[str]:
    return [await call(chain, outcome) for outcome in outcomes]


def state(guard: Guard, index: int = 0) -> str:
    return guard.breakers()[index].state


async def eventually(check: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    """Wait until ``check()`` holds; the deadline is a liveness bound, not a timing check."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.005)


async def trip_and_wait(guard: Guard) -> Chain:
    """Open the breaker with one error, then wait until a probe may pass."""
    chain = guard.chain(RES)
    assert await call(chain, "error") == "passed"
    assert state(guard) == "open"
    await asyncio.sleep(OPEN + 0.05)
    return chain


# -- the rules ---------------------------------------------------------------------------


def test_rules_accept_the_contract_example() -> None:
    guard = Guard(
        {
            "resources": {
                RES: {
                    "breaker": [
                        {
                            "strategy": "error_ratio",
                            "threshold": 0.5,
                            "max_rt_ms": 200,
                            "window_seconds": 1,
                            "min_requests": 5,
                            "open_seconds": 10,
                            "error_statuses": [500, 502, 503, 504],
                        }
                    ]
                }
            }
        }
    )
    assert guard.rules.resources[RES].breaker[0].threshold == 0.5


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"strategy": "error_ratio", "threshold": 1.5}, "ratio in [0, 1]"),
        ({"strategy": "slow_ratio", "threshold": 0.5}, "needs max_rt_ms"),
        ({"strategy": "error_count", "threshold": 2.5}, "whole number"),
        ({"strategy": "error_count", "threshold": 1, "error_statuses": [700]}, "HTTP status"),
        ({"strategy": "fastest", "threshold": 1}, "strategy"),
    ],
)
def test_rules_refuse_a_malformed_breaker(fields: dict[str, Any], why: str) -> None:
    with pytest.raises(RulesError) as info:
        Guard({"resources": {RES: {"breaker": [fields]}}})
    assert "breaker[0]" in str(info.value)
    assert why in str(info.value)


# -- Sentinel's boundaries ---------------------------------------------------------------


async def test_error_count_opens_one_above_the_threshold(make_guard: MakeGuard) -> None:
    guard = make_guard(rule("error_count", threshold=3))
    chain = guard.chain(RES)
    await calls(chain, "error", "error", "error")
    assert state(guard) == "closed"  # 3 errors: not above 3
    await call(chain, "error")
    assert state(guard) == "open"
    assert await call(chain) == "blocked"


async def test_error_ratio_opens_above_the_ratio_not_at_it(make_guard: MakeGuard) -> None:
    guard = make_guard(rule("error_ratio", threshold=0.5, min_requests=4))
    chain = guard.chain(RES)
    await calls(chain, *["ok"] * 5, *["error"] * 5)
    assert state(guard) == "closed"  # 5/10 = 0.5: not above
    await call(chain, "error")  # 6/11
    assert state(guard) == "open"


async def test_slow_ratio_opens_above_the_ratio_not_at_it(make_guard: MakeGuard) -> None:
    guard = make_guard(rule("slow_ratio", threshold=0.5, max_rt_ms=100, min_requests=4))
    chain = guard.chain(RES)
    await calls(chain, *["ok"] * 5, *["slow"] * 5)
    assert state(guard) == "closed"
    await call(chain, "slow")
    assert state(guard) == "open"


async def test_slow_ratio_of_one_opens_when_every_call_is_slow(make_guard: MakeGuard) -> None:
    guard = make_guard(rule("slow_ratio", threshold=1.0, max_rt_ms=100, min_requests=3))
    chain = guard.chain(RES)
    await calls(chain, "slow", "slow", "ok", "slow")
    assert state(guard) == "closed"  # 3 of 4 slow
    other = make_guard(
        rule("slow_ratio", threshold=1.0, max_rt_ms=100, min_requests=3), resource="GET /other"
    )
    chain = other.chain("GET /other")
    await calls(chain, "slow", "slow")
    assert other.breakers()[0].state == "closed"  # below min_requests
    await call(chain, "slow")  # 3 of 3 slow: equal to 1.0 opens, as in Sentinel
    assert other.breakers()[0].state == "open"


async def test_min_requests_holds_whatever_the_errors(make_guard: MakeGuard) -> None:
    guard = make_guard(
        rule("error_count", threshold=0, min_requests=5),
        rule("error_ratio", threshold=0.1, min_requests=5),
    )
    chain = guard.chain(RES)
    await calls(chain, *["error"] * 4)
    assert [b.state for b in guard.breakers()] == ["closed", "closed"]
    await call(chain, "error")
    assert [b.state for b in guard.breakers()] == ["open", "open"]


async def test_a_good_call_that_reaches_min_requests_opens(make_guard: MakeGuard) -> None:
    # Sentinel decides on every completion: 3 errors then 2 successes with min 5 opens.
    guard = make_guard(rule("error_ratio", threshold=0.5, min_requests=5))
    chain = guard.chain(RES)
    await calls(chain, "error", "error", "error", "ok")
    assert state(guard) == "closed"
    await call(chain, "ok")
    assert state(guard) == "open"


# -- open, probe, close ------------------------------------------------------------------


async def test_probe_success_closes_and_resets_the_window(make_guard: MakeGuard) -> None:
    guard = make_guard(rule("error_count", threshold=2))
    chain = guard.chain(RES)
    await calls(chain, "error", "error", "error")
    assert state(guard) == "open"
    await asyncio.sleep(OPEN + 0.05)
    assert await call(chain) == "passed"  # the probe
    assert state(guard) == "closed"
    await calls(chain, "error", "error")
    assert state(guard) == "closed"  # the 3 earlier errors are forgotten
    await call(chain, "error")
    assert state(guard) == "open"


async def test_probe_failure_reopens_and_restarts_the_timer(make_guard: MakeGuard) -> None:
    guard = make_guard(rule())
    chain = await trip_and_wait(guard)
    assert await call(chain, "error") == "passed"  # the probe, failing
    assert state(guard) == "open"
    assert await call(chain) == "blocked"  # the old timer has passed: this is a new one
    await asyncio.sleep(OPEN + 0.05)
    assert await call(chain) == "passed"
    assert state(guard) == "closed"


async def test_a_slow_probe_reopens_a_slow_ratio_breaker(make_guard: MakeGuard) -> None:
    guard = make_guard(rule("slow_ratio", threshold=0.0, max_rt_ms=100))
    chain = guard.chain(RES)
    await call(chain, "slow")
    assert state(guard) == "open"
    await asyncio.sleep(OPEN + 0.05)
    assert await call(chain, "slow") == "passed"
    assert state(guard) == "open"


async def test_open_answers_503_circuit_open_with_retry_after(make_guard: MakeGuard) -> None:
    guard = make_guard(rule(open_seconds=3))
    backend = Backend()
    async with client(http_app(guard, backend)) as c:
        assert (await c.get("/work", params={"mode": "fail"})).status_code == 500
        response = await c.get("/work")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == PROBLEM_BASE + "circuit-open"
    assert response.json()["resource"] == RES
    assert response.headers["retry-after"] == "3"  # seconds until the probe, rounded up
    assert backend.hits == 1


# -- what counts ---------------------------------------------------------------------------


class Backend:
    """The endpoint's behaviour and what reached it."""

    def __init__(self) -> None:
        self.hits = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()


def http_app(guard: Guard, backend: Backend) -> Starlette:
    async def work(request: Request) -> Response:
        backend.hits += 1
        mode = request.query_params.get("mode", "ok")
        if mode == "fail":
            return PlainTextResponse("down", status_code=500)
        if mode == "missing":
            return PlainTextResponse("no such thing", status_code=404)
        if mode == "raise":
            raise RuntimeError("boom")
        if mode == "nested":  # a guard inside the endpoint refuses
            raise CircuitOpen("inner resource", "breaker[0]", retry_after=1.0)
        if mode == "hold":
            backend.entered.set()
            await backend.release.wait()
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/work", work)])
    app.add_middleware(GuardMiddleware, guard=guard)
    return app


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10)


async def test_http_errors_are_exceptions_and_listed_statuses(make_guard: MakeGuard) -> None:
    guard = make_guard(rule("error_count", threshold=1, error_statuses=[500]))
    async with client(http_app(guard, Backend())) as c:
        for _ in range(3):
            assert (await c.get("/work", params={"mode": "missing"})).status_code == 404
        assert state(guard) == "closed"  # 404 is not listed
        assert (await c.get("/work", params={"mode": "fail"})).status_code == 500
        assert state(guard) == "closed"
        assert (await c.get("/work", params={"mode": "raise"})).status_code == 500
    assert state(guard) == "open"


async def test_requests_blocked_by_ymguard_never_count(make_guard: MakeGuard) -> None:
    # The flow rule's 429s would open this breaker if blocked requests counted.
    guard = make_guard(rule("error_count", threshold=0, error_statuses=[429]), flow=[{"qps": 1}])
    async with client(http_app(guard, Backend())) as c:
        statuses = [(await c.get("/work")).status_code for _ in range(5)]
    assert statuses == [200, 429, 429, 429, 429]
    assert state(guard) == "closed"
    assert guard.breakers()[0].counts.completed == 1


async def test_a_refusal_by_a_guard_inside_the_endpoint_never_counts(
    make_guard: MakeGuard,
) -> None:
    guard = make_guard(rule("error_count", threshold=0))
    async with client(http_app(guard, Backend())) as c:
        responses = [await c.get("/work", params={"mode": "nested"}) for _ in range(3)]
    assert [r.status_code for r in responses] == [503] * 3
    assert responses[0].json()["resource"] == "inner resource"
    assert state(guard) == "closed"
    assert guard.breakers()[0].counts.completed == 0
    assert guard.stats(RES).inflight == 0


async def test_resource_exceptions_count_unless_ignored(make_guard: MakeGuard) -> None:
    guard = make_guard(rule(), resource="pay")
    seen: list[str] = []

    def on_block(amount: int, exc: Blocked) -> str:
        seen.append(type(exc).__name__)
        return "later"

    def on_failure(amount: int, exc: BaseException) -> str:
        seen.append(type(exc).__name__)
        return "fallback"

    @guard.resource(
        "pay", fallback=on_failure, block_handler=on_block, exceptions_to_ignore=(KeyError,)
    )
    async def pay(amount: int) -> str:
        if amount == 0:
            raise KeyError("business error")
        if amount < 0:
            raise ValueError("dependency down")
        return "paid"

    for _ in range(3):
        with pytest.raises(KeyError):
            await pay(0)
    assert guard.breakers()[0].state == "closed"
    assert await pay(-1) == "fallback"
    assert guard.breakers()[0].state == "open"
    assert await pay(1) == "later"
    assert seen == ["ValueError", "CircuitOpen"]


# -- a trip refuses the very next call ---------------------------------------------------


async def test_a_trip_refuses_the_next_call_before_the_store_has_answered(
    make_guard: MakeGuard,
) -> None:
    # "Admitted" means the chain let the call through to the endpoint. Calls arrive one
    # per event-loop turn, as requests do, and each fails at once: the one whose error
    # passes the threshold (the third: errors > 2) must be the last one admitted, on
    # Redis too, where telling the store takes a round trip during which calls go on.
    guard = make_guard(rule("error_count", threshold=2, open_seconds=30))
    chain = guard.chain(RES)
    assert await call(chain) == "passed"  # the state is known and kept fresh from here
    in_flight = Context(RES)
    in_flight_tokens = await chain.enter(in_flight)  # admitted before the trip
    arrivals: list[asyncio.Future[str]] = []
    for _ in range(30):
        arrivals.append(asyncio.ensure_future(call(chain, "error")))
        await asyncio.sleep(0)
    outcomes = await asyncio.gather(*arrivals)
    assert outcomes == ["passed"] * 3 + ["blocked"] * 27
    # A call already in flight when it tripped finishes normally and changes nothing.
    in_flight.status = 200
    await chain.exit(in_flight, in_flight_tokens)
    assert state(guard) == "open"
    assert await call(chain) == "blocked"


# -- a probe never sticks (alibaba/Sentinel#1638) -----------------------------------------


class BlockEverything:
    """A check after the breaker that blocks every call (a full semaphore, say)."""

    async def enter(self, ctx: Context) -> Any:
        raise CircuitOpen(ctx.resource, "later check", retry_after=1.0)

    async def exit(self, ctx: Context, token: Any) -> None:
        return None


async def test_a_probe_blocked_by_a_later_check_goes_back_to_open(
    make_guard: MakeGuard,
) -> None:
    guard = make_guard(rule())
    await trip_and_wait(guard)
    compiled = guard.chain(RES)
    blocked_after = Chain(RES, [*compiled.checks, BlockEverything()], compiled.stats)
    assert await call(blocked_after) == "blocked"  # the probe got through us, then blocked
    assert state(guard) == "open"  # not half-open forever
    await asyncio.sleep(OPEN + 0.05)
    assert await call(compiled) == "passed"  # a new probe may pass
    assert state(guard) == "closed"


async def test_a_cancelled_probe_goes_back_to_open(make_guard: MakeGuard) -> None:
    guard = make_guard(rule())
    chain = await trip_and_wait(guard)
    assert await call(chain, "cancel") == "passed"
    assert state(guard) == "open"
    await asyncio.sleep(OPEN + 0.05)
    assert await call(chain) == "passed"
    assert state(guard) == "closed"


async def test_a_cancelled_http_probe_goes_back_to_open(make_guard: MakeGuard) -> None:
    guard = make_guard(rule())
    backend = Backend()
    async with client(http_app(guard, backend)) as c:
        await c.get("/work", params={"mode": "fail"})
        await asyncio.sleep(OPEN + 0.05)
        probe = asyncio.ensure_future(c.get("/work", params={"mode": "hold"}))
        await asyncio.wait_for(backend.entered.wait(), 5)
        assert state(guard) == "half-open"
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        await eventually(lambda: state(guard) == "open", "the cancelled probe re-opens it")


async def test_a_probe_whose_exit_never_comes_is_replaced_after_its_lease(
    make_guard: MakeGuard,
) -> None:
    guard = make_guard(rule(probe_lease_seconds=OPEN))
    chain = await trip_and_wait(guard)
    lost = Context(RES)
    lost_tokens = await chain.enter(lost)  # a probe whose process dies: no exit
    assert await call(chain) == "blocked"
    await asyncio.sleep(OPEN + 0.05)
    assert await call(chain) == "passed"  # the lease ran out: a new probe, which closes
    assert state(guard) == "closed"
    lost.status = 500
    await chain.exit(lost, lost_tokens)  # the lost probe's late answer changes nothing
    assert state(guard) == "closed"


async def test_half_open_lets_exactly_one_of_50_concurrent_requests_in(
    make_guard: MakeGuard,
) -> None:
    # The probe's lease outlives the test: with the default (open_seconds, 0.2 s), a
    # loaded machine that takes longer to refuse the 49 would rightly admit a new probe.
    guard = make_guard(rule(probe_lease_seconds=30))
    backend = Backend()
    async with client(http_app(guard, backend)) as c:
        await c.get("/work", params={"mode": "fail"})
        await asyncio.sleep(OPEN + 0.05)
        backend.hits = 0
        tasks = [asyncio.ensure_future(c.get("/work", params={"mode": "hold"})) for _ in range(50)]
        await eventually(lambda: sum(t.done() for t in tasks) == 49, "49 requests refused")
        await asyncio.wait_for(backend.entered.wait(), 5)  # the probe reaches the endpoint
        assert backend.hits == 1
        backend.release.set()
        statuses = sorted(r.status_code for r in await asyncio.gather(*tasks))
    assert statuses == [200] + [503] * 49
    assert state(guard) == "closed"


# -- listeners, pybreaker, guard.breakers() -----------------------------------------------


class Recorder(pybreaker.CircuitBreakerListener):
    """A listener written for pybreaker, unchanged."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str, str]] = []
        self.outcomes: list[str] = []

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        assert isinstance(new_state, pybreaker.CircuitBreakerState)
        self.changes.append((cb.name, old_state.name, new_state.name))

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.outcomes.append(f"failure:{type(exc).__name__}")

    def success(self, cb: Any) -> None:
        self.outcomes.append("success")


async def test_a_pybreaker_listener_hears_our_state_changes(make_guard: MakeGuard) -> None:
    guard = make_guard(rule())
    recorder = Recorder()
    guard.add_breaker_listener(recorder)
    chain = await trip_and_wait(guard)
    await call(chain)
    name = f"{RES}#0"
    assert recorder.changes == [
        (name, "closed", "open"),
        (name, "open", "half-open"),
        (name, "half-open", "closed"),
    ]
    assert recorder.outcomes == ["failure:RuntimeError", "success"]


async def test_listeners_that_ignore_outcomes_are_not_called_for_each_call(
    make_guard: MakeGuard,
) -> None:
    """A listener that keeps pybreaker's own success and failure (they do nothing), like
    the metrics' transition counter, is told of state changes only: not called per call."""

    class Transitions(pybreaker.CircuitBreakerListener):
        def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
            pass

    guard = make_guard(rule())
    recorder, transitions = Recorder(), Transitions()
    guard.add_breaker_listener(recorder)
    guard.add_breaker_listener(transitions)
    (check,) = [c for c in guard.chain(RES).checks if isinstance(c, BreakerCheck)]
    assert recorder in check._st.listeners and transitions in check._st.listeners
    assert check._st.hearing == [recorder]


async def test_an_attached_pybreaker_opens_after_its_fail_max(make_guard: MakeGuard) -> None:
    guard = make_guard()
    recorder = Recorder()
    cb = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=OPEN, listeners=[recorder])
    guard.attach_breaker(RES, cb)
    backend = Backend()
    async with client(http_app(guard, backend)) as c:
        statuses = [(await c.get("/work", params={"mode": "fail"})).status_code for _ in range(4)]
        assert statuses == [500, 500, 500, 503]
        assert cb.current_state == "open"
        assert backend.hits == 3
        await asyncio.sleep(OPEN + 0.05)
        assert (await c.get("/work")).status_code == 200  # pybreaker's half-open trial
    assert cb.current_state == "closed"
    assert [new for _, _, new in recorder.changes] == ["open", "half-open", "closed"]
    assert guard.breakers()[0].strategy == "pybreaker"


def test_a_pybreaker_with_redis_storage_is_refused() -> None:
    import redis

    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, redis.Redis())
    with pytest.raises(ValueError, match="blocking Redis call"):
        Guard().attach_breaker(RES, pybreaker.CircuitBreaker(state_storage=storage))


async def test_breakers_report_name_strategy_state_and_counts(make_guard: MakeGuard) -> None:
    guard = make_guard(rule("error_ratio", threshold=0.5, min_requests=10))
    assert [(b.name, b.strategy, b.state) for b in guard.breakers()] == [
        (f"{RES}#0", "error_ratio", "closed")
    ]
    await calls(guard.chain(RES), "ok", "error", "error")
    (status,) = guard.breakers()
    assert (status.counts.success, status.counts.errors, status.retry_after) == (1, 2, None)


# -- one state for every process (Redis) -------------------------------------------------


@pytest.fixture
async def two_stores(redis_url: str, prefix: str) -> AsyncIterator[list[RedisStore]]:
    """Two Redis stores with one prefix: two processes, as far as breakers can tell."""
    stores = [cast(RedisStore, store_from_uri(redis_url, key_prefix=prefix)) for _ in range(2)]
    yield stores
    for s in stores:
        await close_breakers(s)
        await s.aclose()


def count_redis_calls(store: RedisStore) -> list[int]:
    counter = [0]
    run, call_ = store.run, store.call

    async def counted_run(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return await run(*args, **kwargs)

    async def counted_call(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return await call_(*args, **kwargs)

    store.run = counted_run  # type: ignore[method-assign]
    store.call = counted_call  # type: ignore[method-assign]
    return counter


async def test_a_trip_in_one_process_opens_it_everywhere_without_redis_calls(
    two_stores: list[RedisStore],
) -> None:
    a, b = (Guard({"resources": {RES: {"breaker": [rule()]}}}, storage=s) for s in two_stores)
    chain_a, chain_b = a.chain(RES), b.chain(RES)
    await asyncio.sleep(0.1)  # both subscribers settle
    calls_b = count_redis_calls(cast(RedisStore, b.store))
    assert await calls(chain_b, *["ok"] * 100) == ["passed"] * 100
    assert calls_b[0] == 0  # a closed breaker answers from the local copy
    started = time.monotonic()
    await call(chain_a, "error")
    await eventually(lambda: state(b) == "open", "process b sees the trip")
    latency_ms = (time.monotonic() - started) * 1000
    print(f"trip seen by the other process after {latency_ms:.1f} ms")
    assert await calls(chain_b, *["ok"] * 100) == ["blocked"] * 100
    assert calls_b[0] == 0  # an open breaker too, until its timer ends


async def test_a_process_started_after_a_trip_admits_nothing_to_the_open_breaker(
    two_stores: list[RedisStore],
) -> None:
    rules = {"resources": {RES: {"breaker": [rule(open_seconds=30)]}}}
    tripped = Guard(rules, storage=two_stores[0])
    await call(tripped.chain(RES), "error")
    assert state(tripped) == "open"
    fresh = Guard(rules, storage=two_stores[1])  # a worker started (or scaled up) now
    chain = fresh.chain(RES)
    outcomes = await asyncio.gather(*(call(chain) for _ in range(20)))
    assert outcomes == ["blocked"] * 20
    assert state(fresh) == "open"
    assert 29 < (fresh.breakers()[0].retry_after or 0) <= 30  # Redis's timer, not a new one


async def test_a_fresh_guard_on_the_same_store_admits_nothing_to_the_open_breaker(
    store: Store,
) -> None:
    # The memory store's twin of the test above: one process, a second Guard (a reload).
    rules = {"resources": {RES: {"breaker": [rule(open_seconds=30)]}}}
    try:
        await call(Guard(rules, storage=store).chain(RES), "error")
        chain = Guard(rules, storage=store).chain(RES)
        assert await asyncio.gather(*(call(chain) for _ in range(20))) == ["blocked"] * 20
    finally:
        await close_breakers(store)


async def test_one_probe_across_two_processes(two_stores: list[RedisStore]) -> None:
    rules = {"resources": {RES: {"breaker": [rule(probe_lease_seconds=30)]}}}
    guards = [Guard(rules, storage=s) for s in two_stores]
    backend = Backend()
    apps = [http_app(g, backend) for g in guards]
    async with client(apps[0]) as c0, client(apps[1]) as c1:
        await c0.get("/work", params={"mode": "fail"})
        await eventually(lambda: state(guards[1]) == "open", "both see it open")
        await asyncio.sleep(OPEN + 0.05)
        backend.hits = 0
        tasks = [
            asyncio.ensure_future((c0, c1)[i % 2].get("/work", params={"mode": "hold"}))
            for i in range(50)
        ]
        await eventually(lambda: sum(t.done() for t in tasks) == 49, "49 requests refused")
        await asyncio.wait_for(backend.entered.wait(), 5)  # the probe reaches the endpoint
        assert backend.hits == 1
        backend.release.set()
        statuses = sorted(r.status_code for r in await asyncio.gather(*tasks))
        assert statuses == [200] + [503] * 49
        await eventually(
            lambda: [state(g) for g in guards] == ["closed", "closed"], "both see it closed"
        )


async def test_redis_outage_falls_back_to_a_local_breaker(private_redis: RedisServer) -> None:
    url = private_redis.url + "?socket_timeout=0.3&socket_connect_timeout=0.3"
    guard = Guard({"on_storage_error": "local", "resources": {RES: {"breaker": [rule()]}}}, url)
    chain = guard.chain(RES)
    await calls(chain, "ok")
    private_redis.stop()
    try:
        await call(chain, "error")
        assert state(guard) == "open"  # opened locally
        assert await call(chain) == "blocked"
        await asyncio.sleep(OPEN + 0.05)
        assert await call(chain) == "passed"  # a local probe
        assert state(guard) == "closed"
    finally:
        await guard.aclose()


@pytest.mark.parametrize(("policy", "status"), [("local", 200), ("open", 200), ("closed", 503)])
async def test_a_breaker_redis_never_answered_for_follows_on_storage_error(
    private_redis: RedisServer, prefix: str, policy: str, status: int
) -> None:
    # A process starting during an outage cannot know the state: the policy decides.
    url = private_redis.url + "?socket_timeout=0.3&socket_connect_timeout=0.3"
    rules = {"on_storage_error": policy, "resources": {RES: {"breaker": [rule()]}}}
    guard = Guard(rules, storage=RedisStore(url, key_prefix=prefix, on_storage_error=policy))
    private_redis.stop()
    try:
        async with client(http_app(guard, Backend())) as c:
            responses = await asyncio.wait_for(
                asyncio.gather(*(c.get("/work") for _ in range(5))), timeout=10
            )  # a liveness bound, not a timing
        assert [r.status_code for r in responses] == [status] * 5
        if policy == "closed":
            assert responses[0].json()["type"] == PROBLEM_BASE + "storage-unavailable"
        assert state(guard) == "closed"  # nothing was learnt, nothing was tripped
    finally:
        await guard.aclose()


@pytest.fixture
def two_servers(redis_url: str, prefix: str) -> Iterator[list[Uvicorn]]:
    env = {"YMGUARD_TEST_REDIS": redis_url, "YMGUARD_TEST_PREFIX": prefix}
    servers = [Uvicorn("tests.apps.breaker_app:app", env=env) for _ in range(2)]
    with running(servers):
        yield servers


async def test_two_uvicorn_processes_share_the_breaker_and_its_one_probe(
    two_servers: list[Uvicorn],
) -> None:
    async def get_json(c: httpx.AsyncClient, url: str) -> Any:
        return (await c.get(url)).json()

    async with httpx.AsyncClient(timeout=30) as c:
        urls = [s.url for s in two_servers]
        for url in urls:  # compile the chains and start both subscribers
            assert (await c.get(url + "/work")).status_code == 200
        assert (await c.get(urls[0] + "/work", params={"fail": 1})).status_code == 500

        async def b_open() -> bool:
            return bool((await get_json(c, urls[1] + "/state"))["state"] == "open")

        deadline = time.monotonic() + 5
        while not await b_open():
            if time.monotonic() > deadline:  # a liveness bound, not a timing
                pytest.fail("the second process never saw the trip")
            await asyncio.sleep(0.01)
        refused = await c.get(urls[1] + "/work")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"

        await asyncio.sleep(1.1)  # the open timer (1 s) ends
        before = [(await get_json(c, url + "/hits"))["hits"] for url in urls]
        tasks = [
            asyncio.ensure_future(c.get(urls[i % 2] + "/work", params={"hold": 1}))
            for i in range(50)
        ]
        deadline = time.monotonic() + 15
        while sum(t.done() for t in tasks) < 49:
            if time.monotonic() > deadline:  # a liveness bound, not a timing
                pytest.fail("49 of the 50 requests were never refused")
            await asyncio.sleep(0.01)
        after = [(await get_json(c, url + "/hits"))["hits"] for url in urls]
        assert sum(after) - sum(before) == 1  # exactly one probe reached an endpoint
        for url in urls:
            await c.post(url + "/release")
        statuses = sorted(r.status_code for r in await asyncio.gather(*tasks))
        assert statuses == [200] + [503] * 49
        for url in urls:
            deadline = time.monotonic() + 5
            while (await get_json(c, url + "/state"))["state"] != "closed":
                if time.monotonic() > deadline:  # a liveness bound, not a timing
                    pytest.fail("a process never saw the close")
                await asyncio.sleep(0.01)


async def test_a_uvicorn_worker_started_after_a_trip_admits_nothing(
    redis_url: str, prefix: str
) -> None:
    env = {
        "YMGUARD_TEST_REDIS": redis_url,
        "YMGUARD_TEST_PREFIX": prefix,
        "YMGUARD_TEST_OPEN_SECONDS": "60",
    }
    async with httpx.AsyncClient(timeout=30) as c:
        with running([Uvicorn("tests.apps.breaker_app:app", env=env)]) as (first,):
            assert (await c.get(first.url + "/work", params={"fail": 1})).status_code == 500
        # A worker started (restarted, scaled up) while the breaker is open: its very
        # first requests, all at once, find it open.
        with running([Uvicorn("tests.apps.breaker_app:app", env=env)]) as (late,):
            responses = await asyncio.gather(*(c.get(late.url + "/work") for _ in range(30)))
            hits = (await c.get(late.url + "/hits")).json()["hits"]
    print(f"admitted by the late worker: {hits}")
    assert [r.status_code for r in responses] == [503] * 30
    assert hits == 0


async def test_a_probe_result_lost_in_an_outage_never_stops_it_opening(
    private_redis: RedisServer, prefix: str
) -> None:
    # The probe's exit closes only the local copy while Redis stays half-open with the
    # same version; the replies after the restart must still win over that copy.
    url = private_redis.url + "?socket_timeout=0.3&socket_connect_timeout=0.3"
    store = RedisStore(url, key_prefix=prefix, retry_interval=0.05)
    guard = Guard({"resources": {RES: {"breaker": [rule()]}}}, storage=store)
    try:
        chain = await trip_and_wait(guard)
        ctx = Context(RES)
        tokens = await chain.enter(ctx)  # the probe: half-open on Redis
        assert state(guard) == "half-open"
        await store.call("SAVE")  # the restarted server comes back half-open
        private_redis.stop()
        ctx.status = 200
        await chain.exit(ctx, tokens)  # its success never reaches Redis
        assert state(guard) == "closed"  # closed on the local copy only
        private_redis.start()
        key = guard.chain(RES).checks[0].breaker.key  # type: ignore[attr-defined]

        async def on_redis() -> bytes | None:
            try:
                value: bytes | None = await store.call("HGET", key, "s")
                return value
            except StorageUnavailable:  # the old connection dies on first use
                return None

        # Bad calls go on until this copy and Redis both say open: the replies after
        # the restart win over the diverged local copy.
        bad_calls = 0
        for _ in range(800):  # a liveness bound, not a timing check
            if state(guard) == "open" and await on_redis() == b"1":
                break
            bad_calls += await call(chain, "error") == "passed"
            await asyncio.sleep(0.01)
        else:
            pytest.fail(f"never open on Redis after {bad_calls} bad calls")
        assert await call(chain) == "blocked"
    finally:
        await guard.aclose()


async def test_a_subscriber_left_on_a_dead_event_loop_is_started_again(
    two_stores: list[RedisStore],
) -> None:
    a, b = two_stores
    dead = asyncio.new_event_loop()
    stale = cast("asyncio.Task[None]", dead.create_future())  # pending for ever
    dead.close()
    hub = pubsub_for(b)
    hub.task, hub.loop = stale, dead  # what a Guard used under an earlier loop leaves
    await close_breakers(b)  # stops nothing there, and fails on nothing
    hub = pubsub_for(b)
    hub.task, hub.loop = stale, dead
    guard_a, guard_b = (
        Guard({"resources": {RES: {"breaker": [rule()]}}}, storage=s) for s in (a, b)
    )
    chain_b = guard_b.chain(RES)  # a new breaker starts the subscriber on this loop
    assert hub.task is not stale and hub.task.get_loop() is asyncio.get_running_loop()
    await eventually(lambda: hub.ready, "the new subscriber listens")
    running = hub.task
    while not running.done():  # as if the loop it ran on had ended
        running.cancel()
        await asyncio.wait([running], timeout=0.05)
    hub.task, hub.loop = stale, dead
    assert await call(chain_b) == "passed"  # a closed breaker's call starts it again
    assert hub.task is not stale and hub.task.get_loop() is asyncio.get_running_loop()
    await eventually(lambda: hub.ready, "the new subscriber listens")
    await call(guard_a.chain(RES), "error")
    await eventually(lambda: state(guard_b) == "open", "b hears a's trip")


async def test_a_store_dropped_without_aclose_is_collected(redis_url: str, prefix: str) -> None:
    store = RedisStore(redis_url, key_prefix=prefix)
    breaker = Breaker(store, "dropped", open_seconds=OPEN)
    hub, reads = pubsub_for(store), copies_for(store).reads
    # A read in flight holds the store (its call does) until Redis answers.
    copy = breaker._st  # holds no store
    await eventually(lambda: hub.ready and copy.known and not reads, "reads are done")
    pipe, dropped = store._pipe, weakref.ref(store)
    del store, breaker
    gc.collect()
    assert dropped() is None  # the hub and the local copies keep no store alive
    assert hub.task is not None
    await eventually(hub.task.done, "the subscriber of a collected store ends")
    await hub.client.aclose()  # what aclose would have closed
    if pipe is not None:
        pipe.close()


async def test_guard_aclose_stops_the_subscriber(redis_url: str, prefix: str) -> None:
    store = store_from_uri(redis_url, key_prefix=prefix)
    guard = Guard({"resources": {RES: {"breaker": [rule()]}}}, storage=store)
    assert await call(guard.chain(RES)) == "passed"
    hub = pubsub_for(cast(RedisStore, guard.store))
    await eventually(lambda: hub.ready, "the subscriber listens")
    task = hub.task
    assert task is not None
    await guard.aclose()
    assert task.done()


# -- probes that never ran as probes -------------------------------------------------------

_PROBE_RULE = {
    "strategy": "error_count",
    "threshold": 0,
    "min_requests": 1,
    "open_seconds": 0.3,
    "window_seconds": 1,
}


class _Boom:
    """A check whose enter fails with a bug, not a refusal."""

    async def enter(self, ctx: Context) -> Any:
        raise RuntimeError("a bug in a later check")

    async def exit(self, ctx: Context, token: Any) -> None:
        return None


async def _trip_once(guard: Guard, resource: str) -> None:
    chain = guard.chain(resource)
    ctx = Context(resource)
    tokens = await chain.enter(ctx)
    ctx.error = ValueError("backend down")
    await chain.exit(ctx, tokens)
    assert [b.state for b in guard.breakers()] == ["open"]


async def test_a_probe_that_dies_in_a_later_check_reopens_the_breaker(store: Store) -> None:
    guard = Guard({"resources": {"call": {"breaker": [_PROBE_RULE]}}}, storage=store)
    await _trip_once(guard, "call")
    await asyncio.sleep(0.4)
    chain = guard.chain("call")
    broken = Chain("call", [*chain.checks, _Boom()], chain.stats)
    with pytest.raises(RuntimeError):
        await broken.enter(Context("call"))
    await asyncio.sleep(0.05)  # the Redis copy is fresh by pub/sub
    assert [b.state for b in guard.breakers()] == ["open"]


async def test_a_replay_is_no_probe_success(store: Store) -> None:
    from starlette.responses import Response

    from ymguard.chain import ShortCircuit

    class Replay:
        async def enter(self, ctx: Context) -> Any:
            raise ShortCircuit(Response("stored", status_code=201), 201)

        async def exit(self, ctx: Context, token: Any) -> None:
            return None

    guard = Guard({"resources": {"call": {"breaker": [_PROBE_RULE]}}}, storage=store)
    await _trip_once(guard, "call")
    await asyncio.sleep(0.4)
    chain = guard.chain("call")
    replaying = Chain("call", [*chain.checks, Replay()], chain.stats)
    with pytest.raises(ShortCircuit):
        await replaying.enter(Context("call"))
    await asyncio.sleep(0.05)
    assert [b.state for b in guard.breakers()] == ["open"]
    with pytest.raises(Blocked):  # and it stays open until the next real probe
        await guard.chain("call").enter(Context("call"))
