"""Flow behaviours and strategies on both stores, against Sentinel's numbers.

warm_up (WarmUpController), queue (RateLimiterController), warm_up_queue
(WarmUpRateLimiterController), concurrency + queue, strategy relate and chain; the rules
file's checks of their fields. Counts and order are asserted, never timings (a spacing is
only checked as a lower bound, which a slow machine cannot break).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from tests.helpers import RedisServer, Uvicorn, running
from ymguard import (
    Blocked,
    Context,
    FlowLimited,
    Guard,
    GuardMiddleware,
    RulesError,
    load_rules,
)
from ymguard.backends.warmup import WarmUpCurve
from ymguard.chain import current_context
from ymguard.shaping import (
    ChainScoped,
    PacedCheck,
    QueuedConcurrencyCheck,
    RefRecorder,
    RelateCheck,
    WarmUpCheck,
)
from ymguard.storage import Store
from ymguard.storage.memory import MemoryStore


def guard_with(store: Store, resources: dict[str, Any]) -> Guard:
    return Guard({"resources": resources}, storage=store)


async def attempt(guard: Guard, resource: str, parent: Context | None = None) -> Context | None:
    """Enter and exit one call; its context if admitted, else None."""
    chain = guard.chain(resource)
    ctx = Context(resource, parent=parent)
    try:
        tokens = await chain.enter(ctx)
    except Blocked:
        return None
    await chain.exit(ctx, tokens)
    return ctx


async def burst(guard: Guard, resource: str, n: int) -> int:
    """How many of ``n`` calls sent at once are admitted."""
    results = await asyncio.gather(*(attempt(guard, resource) for _ in range(n)))
    return sum(r is not None for r in results)


async def store_clock(store: Store) -> float:
    """Seconds on the clock the store's algorithms read (Redis ``TIME``, else monotonic)."""
    if isinstance(store, MemoryStore):
        return store.now()
    seconds, micros = await store.call("TIME")
    return int(seconds) + int(micros) / 1e6


async def next_whole_second(store: Store) -> None:
    """Wait until just after the next whole second of the store's clock.

    Per-second algorithms (warm-up's sync) change their state at whole seconds: a burst
    that starts there has the whole second to itself and cannot straddle two.
    """
    while True:
        now = await store_clock(store)
        await asyncio.sleep(1.0 - now % 1.0 + 0.01)
        if (await store_clock(store)) % 1.0 < 0.5:
            return


# -- the curve -------------------------------------------------------------------------


def test_the_warm_up_curve_follows_sentinels_formulas() -> None:
    curve = WarmUpCurve(60, 10, 3)
    assert curve.warning == 300  # T * count / (cf - 1)
    assert curve.max_tokens == 600  # warning + 2 * T * count / (1 + cf)
    assert curve.slope == pytest.approx(2 / 60 / 300)
    assert int(curve.rate(curve.max_tokens)) == 20  # cold: count / cold_factor
    assert curve.rate(curve.warning - 1) == 60  # warm


# -- queue -----------------------------------------------------------------------------


async def test_queue_qps_10_admits_6_of_a_burst_of_20_in_turn(store: Store) -> None:
    guard = guard_with(store, {"q": {"flow": [{"qps": 10, "behavior": "queue"}]}})
    assert isinstance(guard.chain("q").checks[0], PacedCheck)
    waits: list[float] = []  # the wait the store gave each call that passed, in order

    async def call() -> bool:
        ctx = await attempt(guard, "q")
        if ctx is None:
            return False
        wait = ctx.extras["queue_wait"][1] if ctx.extras else 0.0  # none kept for no wait
        waits.append(wait)
        return True

    results = await asyncio.gather(*(call() for _ in range(20)))
    assert sum(results) == 6 and results.count(False) == 14
    # They passed in the order of their turns, and the turns were spaced, not one moment:
    # the waits the store gave (not the clock of this test) grow from the first to the last.
    assert waits == sorted(waits) and waits[-1] > waits[0]


async def test_queue_refuses_with_retry_after_and_quota(store: Store) -> None:
    flow = [{"qps": 2, "behavior": "queue", "max_queue_ms": 0, "name": "paced"}]
    guard = guard_with(store, {"q": {"flow": flow}})
    assert await attempt(guard, "q") is not None
    with pytest.raises(FlowLimited) as info:
        await guard.chain("q").enter(Context("q"))
    exc = info.value
    assert exc.rule == "flow[0] qps=2 queue"
    assert exc.retry_after is not None and 0 < exc.retry_after <= 0.5
    assert exc.quota is not None and (exc.quota.name, exc.quota.limit) == ("paced", 2)


async def test_a_cancelled_waiter_gives_its_turn_back(store: Store) -> None:
    # qps 1: turns 1 s apart; 3000 ms of queue holds the turns at 0, 1, 2 and 3 s.
    flow = [{"qps": 1, "behavior": "queue", "max_queue_ms": 3000}]
    guard = guard_with(store, {"q": {"flow": flow}})
    calls = [asyncio.ensure_future(attempt(guard, "q")) for _ in range(6)]
    for _ in range(100):  # the turn at 0 and the two refusals come back at once
        await asyncio.sleep(0.01)
        if sum(c.done() for c in calls) >= 3:
            break
    finished = [c for c in calls if c.done()]
    assert len(finished) == 3 and sum(c.result() is None for c in finished) == 2
    waiting = [c for c in calls if not c.done()]
    for call in waiting[1:]:  # the turns at 2 s and 3 s leave
        call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*waiting[1:])
    # Their turns are free again: two newcomers get them (none would without the give-back).
    newcomers = [asyncio.ensure_future(attempt(guard, "q")) for _ in range(4)]
    results = await asyncio.gather(waiting[0], *newcomers)
    assert results[0] is not None
    assert sum(r is not None for r in results[1:]) >= 2


async def test_a_waiter_whose_client_leaves_gives_its_turn_back(store: Store) -> None:
    flow = [{"qps": 2, "behavior": "queue", "max_queue_ms": 600}]
    guard = guard_with(store, {"GET /q": {"flow": flow}})
    chain = guard.chain("GET /q")
    assert await attempt(guard, "GET /q") is not None  # the turn at 0
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    ctx = Context("GET /q", scope={"type": "http"}, receive=receive)
    waiter = asyncio.ensure_future(chain.enter(ctx))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # waits for the turn at 0.5 s
    gone.set()
    with pytest.raises(FlowLimited, match="the client left"):
        await waiter
    assert ctx.extras is not None and ctx.extras["queue_wait"][2] == "cancelled"
    # The turn is free: the next caller takes it (without the give-back its turn would be
    # 1 s away, more than the 600 ms of queue).
    assert await attempt(guard, "GET /q") is not None


async def test_a_waiter_hands_the_request_body_on(store: Store) -> None:
    flow = [{"qps": 5, "behavior": "queue", "max_queue_ms": 1000}]
    guard = guard_with(store, {"POST /q": {"flow": flow}})
    assert await attempt(guard, "POST /q") is not None
    sent = [{"type": "http.request", "body": b"abc", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if sent:
            return sent.pop(0)
        await asyncio.Event().wait()  # no disconnect
        raise AssertionError

    ctx = Context("POST /q", scope={"type": "http"}, receive=receive)
    tokens = await guard.chain("POST /q").enter(ctx)
    assert ctx.receive is not receive and ctx.receive is not None
    assert (await ctx.receive())["body"] == b"abc"
    await guard.chain("POST /q").exit(ctx, tokens)


# -- warm_up ---------------------------------------------------------------------------


async def test_warm_up_starts_cold_warms_to_qps_and_cools_again(store: Store) -> None:
    # qps 60, cold_factor 3: a cold second admits qps / 3 = 20 (Sentinel's warningQps).
    # warm_up_seconds 2 keeps the test short: warm after ~3 busy seconds, cold after 2 idle.
    flow = [{"qps": 60, "behavior": "warm_up", "warm_up_seconds": 2}]
    guard = guard_with(store, {"w": {"flow": flow}})
    assert isinstance(guard.chain("w").checks[0], WarmUpCheck)
    # Each burst starts just after a whole second of the store's clock, so none straddles
    # the once-a-second sync (a straddling cold burst admits 20 + ~5 of the next second).
    await next_whole_second(store)
    first = await burst(guard, "w", 100)
    assert 20 <= first <= 23  # 20, or a few more on a machine too slow to end within it
    for _ in range(20):  # a burst a second: the rate rises 20, 25, 40, 60 (on an idle box)
        await next_whole_second(store)
        admitted = await burst(guard, "w", 100)
        assert admitted <= 60
        if admitted >= 55:
            break
    else:
        raise AssertionError("warm-up never reached qps")
    await asyncio.sleep(3.5)  # idle: the tokens fill up, the resource is cold again
    await next_whole_second(store)
    assert 20 <= await burst(guard, "w", 100) <= 23


async def test_warm_up_gives_a_pass_back_when_a_later_check_blocks(store: Store) -> None:
    flow = [{"qps": 3, "behavior": "warm_up", "cold_factor": 1.5}, {"qps": 1}]
    guard = guard_with(store, {"w": {"flow": flow}})
    # cold: 3 / 1.5 = 2 a second. The second rule lets one through; the refused ones give
    # their warm-up pass back, so the first rule is not spent by them.
    assert await burst(guard, "w", 5) == 1
    chain = guard.chain("w")
    ctx = Context("w")
    with pytest.raises(FlowLimited) as info:
        await chain.enter(ctx)
    assert info.value.rule == "flow[1] qps=1"  # the warm-up still had room


# -- warm_up_queue -----------------------------------------------------------------------


async def test_warm_up_queue_spaces_a_cold_resource_at_qps_over_cold_factor(
    store: Store,
) -> None:
    # qps 10, cold_factor 3: cold, turns are 1000 / (10 / 3) = 300 ms apart, so a queue of
    # 1000 ms holds the turns at 0, 0.3, 0.6 and 0.9 s (warm, it would hold 11).
    flow = [{"qps": 10, "behavior": "warm_up_queue", "warm_up_seconds": 2, "max_queue_ms": 1000}]
    guard = guard_with(store, {"wq": {"flow": flow}})
    assert await burst(guard, "wq", 10) == 4  # warm, the same queue would hold 11


# -- concurrency + queue ------------------------------------------------------------------


async def test_concurrency_queue_serves_waiters_first_come_first_served(store: Store) -> None:
    flow = [{"concurrency": 1, "behavior": "queue", "max_queue_ms": 20_000}]
    guard = guard_with(store, {"c": {"flow": flow}})
    chain = guard.chain("c")
    check = chain.checks[0]
    assert isinstance(check, QueuedConcurrencyCheck)
    holder = Context("c")
    held = await chain.enter(holder)
    order: list[str] = []

    async def call(name: str) -> None:
        ctx = Context("c")
        tokens = await chain.enter(ctx)
        order.append(name)
        await asyncio.sleep(0.01)
        await chain.exit(ctx, tokens)

    waiters = {}
    for n, name in enumerate("BCD", start=1):
        waiters[name] = asyncio.ensure_future(call(name))
        for _ in range(400):  # until it stands in line
            await asyncio.sleep(0.025)
            assert check._default is not None
            if await check._default.waiting() == n:
                break
        else:
            raise AssertionError(f"{name} never joined the line")
    waiters["C"].cancel()  # C leaves the line: it holds nothing
    with contextlib.suppress(asyncio.CancelledError):
        await waiters["C"]
    await chain.exit(holder, held)
    await asyncio.wait_for(asyncio.gather(waiters["B"], waiters["D"]), 30)
    assert order == ["B", "D"]


async def test_concurrency_queue_refuses_after_max_queue_ms(store: Store) -> None:
    flow = [{"concurrency": 1, "behavior": "queue", "max_queue_ms": 200}]
    guard = guard_with(store, {"c": {"flow": flow}})
    chain = guard.chain("c")
    holder = Context("c")
    held = await chain.enter(holder)
    ctx = Context("c")
    with pytest.raises(FlowLimited):
        await chain.enter(ctx)
    assert ctx.extras is not None and ctx.extras["queue_wait"][2] == "rejected"
    await chain.exit(holder, held)
    assert await attempt(guard, "c") is not None


# -- strategies ---------------------------------------------------------------------------


@pytest.mark.parametrize("read_first", [True, False])
async def test_relate_limits_reads_by_the_writes_per_second(store: Store, read_first: bool) -> None:
    read = {"flow": [{"qps": 3, "strategy": "relate", "ref_resource": "POST /w"}]}
    write: dict[str, Any] = {}
    resources = {"GET /r": read, "POST /w": write}
    if not read_first:
        resources = {"POST /w": write, "GET /r": read}
    guard = guard_with(store, resources)
    assert isinstance(guard.chain("GET /r").checks[0], RelateCheck)
    assert isinstance(guard.chain("POST /w").checks[0], RefRecorder)
    # Reads do not count against themselves: with no writes, every read passes.
    assert await burst(guard, "GET /r", 10) == 10
    assert await burst(guard, "POST /w", 2) == 2
    assert await attempt(guard, "GET /r") is not None  # 2 writes + 1 <= 3
    assert await attempt(guard, "POST /w") is not None
    with pytest.raises(FlowLimited) as info:  # 3 writes in the last second: reads wait
        await guard.chain("GET /r").enter(Context("GET /r"))
    assert info.value.rule == "flow[0] qps=3 relate POST /w"
    for _ in range(40):  # the writes leave the window: reads pass again
        await asyncio.sleep(0.1)
        if await attempt(guard, "GET /r") is not None:
            break
    else:
        raise AssertionError("reads never passed again")


async def test_relate_counts_the_writes_of_a_guard_on_the_same_store(store: Store) -> None:
    # Two guards on one store stand for two processes (on Redis, the counts are shared).
    rules = {
        "GET /r": {"flow": [{"qps": 2, "strategy": "relate", "ref_resource": "POST /w"}]},
        "POST /w": {},
    }
    reader, writer = guard_with(store, rules), guard_with(store, rules)
    assert await burst(writer, "POST /w", 2) == 2
    assert await attempt(reader, "GET /r") is None


async def test_chain_applies_only_to_calls_entered_from_the_ref_resource(store: Store) -> None:
    flow = [{"qps": 1, "strategy": "chain", "ref_resource": "GET /route"}]
    guard = guard_with(store, {"lookup": {"flow": flow}})
    assert isinstance(guard.chain("lookup").checks[0], ChainScoped)

    @guard.resource("lookup")
    async def lookup() -> str:
        return "ok"

    for _ in range(3):  # called from elsewhere: the rule does not apply
        assert await lookup() == "ok"
    route = Context("GET /route")
    reset = current_context.set(route)
    try:
        assert await lookup() == "ok"
        with pytest.raises(FlowLimited):
            await lookup()
        nested = Context("other", parent=route)  # entered from the route further up
        assert await attempt(guard, "lookup", parent=nested) is None
    finally:
        current_context.reset(reset)
    assert await lookup() == "ok"


# -- the rules file -------------------------------------------------------------------------


def _problem(tmp_path: Path, rule: str) -> str:
    path = tmp_path / "rules.yaml"
    path.write_text(f"resources:\n  GET /a:\n    flow:\n      - {rule}\n")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    (problem,) = info.value.problems
    return str(problem)


@pytest.mark.parametrize(
    ("rule", "field", "why"),
    [
        ("{qps: 5, strategy: relate}", "ref_resource", "strategy relate needs ref_resource"),
        ("{qps: 5, strategy: chain}", "ref_resource", "strategy chain needs ref_resource"),
        ("{qps: 5, ref_resource: GET /b}", "ref_resource", "only strategy relate or chain"),
        ("{qps: 5, behavior: warm_up, cold_factor: 1}", "cold_factor", "greater than 1"),
        ("{concurrency: 5, behavior: warm_up}", "behavior", "reject or queue"),
        ("{qps: 0, behavior: queue}", "behavior", "qps >= 1"),
        ("{concurrency: 5, strategy: relate, ref_resource: x}", "strategy", "use qps"),
        ("{qps: 5, behavior: queue, strategy: relate, ref_resource: x}", "strategy", "reject"),
        ("{qps: 5, behavior: queue, max_queue_ms: -1}", "max_queue_ms", "greater than"),
        ("{qps: 5, behavior: warm_up, warm_up_seconds: 0}", "warm_up_seconds", "greater"),
        ("{qps: 5, strategy: sideways, ref_resource: x}", "strategy", "direct"),
    ],
)
def test_nonsense_flow_fields_are_refused_by_file_line_and_field(
    tmp_path: Path, rule: str, field: str, why: str
) -> None:
    problem = _problem(tmp_path, rule)
    assert f':4: resources."GET /a".flow[0].{field}: ' in problem
    assert why in problem


def test_every_flow_field_loads(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "resources:\n"
        "  GET /a:\n"
        "    flow:\n"
        "      - {qps: 5, behavior: reject, max_queue_ms: 100}\n"
        "      - {qps: 5, behavior: warm_up, warm_up_seconds: 10, cold_factor: 3}\n"
        "      - {qps: 5, behavior: queue, max_queue_ms: 500}\n"
        "      - {qps: 5, behavior: warm_up_queue, warm_up_seconds: 5, max_queue_ms: 500}\n"
        "      - {concurrency: 5, behavior: queue, max_queue_ms: 500}\n"
        "      - {qps: 5, strategy: relate, ref_resource: POST /b}\n"
        "      - {qps: 5, behavior: queue, strategy: chain, ref_resource: GET /c}\n"
        "      - {qps: 5, strategy: direct, origin: app-a}\n"
    )
    rules = load_rules(path).resources["GET /a"].flow
    assert [r.behavior for r in rules][:5] == [
        "reject",
        "warm_up",
        "queue",
        "warm_up_queue",
        "queue",
    ]
    kinds = [type(c).__name__ for c in Guard(load_rules(path)).chain("GET /a").checks]
    assert kinds == [
        "QpsCheck",
        "WarmUpCheck",
        "PacedCheck",
        "PacedCheck",
        "QueuedConcurrencyCheck",
        "RelateCheck",
        "ChainScoped",
        "QpsCheck",
    ]


# -- two processes on one Redis ------------------------------------------------------------


@pytest.fixture
def two_shaping_servers(redis_url: str, prefix: str) -> Iterator[list[Uvicorn]]:
    env = {"YMGUARD_TEST_REDIS": redis_url, "YMGUARD_TEST_PREFIX": prefix}
    servers = [Uvicorn("tests.apps.shaping_app:app", env=env) for _ in range(2)]
    with running(servers):
        yield servers


async def test_two_processes_share_one_queue_one_warm_up_and_one_relate(
    two_shaping_servers: list[Uvicorn],
) -> None:
    a, b = two_shaping_servers
    async with httpx.AsyncClient(timeout=30) as c:
        pids = {(await c.get(s.url + "/health")).json()["pid"] for s in (a, b)}
        assert len(pids) == 2
        # Open the connections first, so that each burst arrives at once.
        await asyncio.gather(*(c.get(f"{(a, b)[i % 2].url}/health") for i in range(100)))
        # One queue: qps 1 with 2000 ms of queue holds the turns at 0, 1 and 2 s, so of two
        # bursts of 5 it admits 3 (two queues: 6), or 4 if the bursts arrive a second apart.
        sent = [c.get(f"{s.url}/queue", params={"n": 5}) for s in (a, b)]
        admitted = [r.json()["admitted"] for r in await asyncio.gather(*sent)]
        assert 3 <= sum(admitted) <= 4
        # One warm-up curve: a cold second admits about 20 of 2 x 60 (two curves: 40).
        sent = [c.get(f"{s.url}/warm", params={"n": 60}) for s in (a, b)]
        admitted = [r.json()["admitted"] for r in await asyncio.gather(*sent)]
        assert 20 <= sum(admitted) <= 30
        # Relate: writes to one process hold back reads of the other.
        assert (await c.get(b.url + "/read")).status_code == 200
        for _ in range(3):
            assert (await c.post(a.url + "/write")).status_code == 200
        refused = await c.get(b.url + "/read")
        assert refused.status_code == 429
        assert refused.json()["type"].endswith("flow-limited")


# -- Redis outages ---------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "admitted"), [("local", 2), ("open", 8), ("closed", 0)])
async def test_shaping_follows_on_storage_error_while_redis_is_down(
    private_redis: RedisServer, policy: str, admitted: int
) -> None:
    # warm_up qps 6, cold_factor 3: 2 a cold second; queue qps 1 with no queue: 1 at once.
    rules = {
        "on_storage_error": policy,
        "resources": {
            "w": {"flow": [{"qps": 6, "behavior": "warm_up", "warm_up_seconds": 2}]},
            "q": {"flow": [{"qps": 1, "behavior": "queue", "max_queue_ms": 0}]},
        },
    }
    url = private_redis.url + "?socket_timeout=0.3&socket_connect_timeout=0.3"
    guard = Guard(rules, storage=url)
    private_redis.stop()
    results = [await attempt_or_503(guard, "w") for _ in range(8)]
    queued = [await attempt_or_503(guard, "q") for _ in range(3)]
    await guard.aclose()
    if policy == "closed":
        assert set(results) == set(queued) == {503}
        return
    assert results.count(200) == admitted and set(results) <= {200, 429}
    assert queued.count(200) == (1 if policy == "local" else 3)


async def attempt_or_503(guard: Guard, resource: str) -> int:
    """200 if admitted, else the refusal's status (429, or 503 for the store)."""
    chain = guard.chain(resource)
    ctx = Context(resource)
    try:
        tokens = await asyncio.wait_for(chain.enter(ctx), 10)  # liveness: never hangs
    except Blocked as exc:
        return exc.status
    await chain.exit(ctx, tokens)
    return 200


async def test_every_shaping_key_on_redis_expires(redis_url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    resources = {
        "w": {"flow": [{"qps": 5, "behavior": "warm_up"}]},
        "q": {"flow": [{"qps": 5, "behavior": "queue"}]},
        "wq": {"flow": [{"qps": 5, "behavior": "warm_up_queue"}]},
        "r": {"flow": [{"qps": 5, "strategy": "relate", "ref_resource": "x"}]},
        "x": {},
    }
    guard = Guard({"key_prefix": prefix, "resources": resources}, storage=redis_url)
    for name in resources:
        assert await attempt(guard, name) is not None  # one call each: new keys only
    client = Redis.from_url(redis_url)
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
    assert len(keys) >= 4
    ttls = [await client.pttl(key) for key in keys]
    assert all(ttl > 0 for ttl in ttls), dict(zip(keys, ttls, strict=True))
    await client.aclose()
    await guard.aclose()


async def test_concurrency_queue_is_one_line_across_processes(redis_url: str, prefix: str) -> None:
    # Two guards, each with its own Redis connections and wake-ups, stand for two processes.
    flow = [{"concurrency": 1, "behavior": "queue", "max_queue_ms": 20_000}]
    rules = {"key_prefix": prefix, "resources": {"c": {"flow": flow}}}
    one, two = Guard(rules, storage=redis_url), Guard(rules, storage=redis_url)
    chains = {"one": one.chain("c"), "two": two.chain("c")}
    check = chains["one"].checks[0]
    assert isinstance(check, QueuedConcurrencyCheck)
    holder = Context("c")
    held = await chains["one"].enter(holder)
    order: list[str] = []

    async def call(name: str, via: str) -> None:
        ctx = Context("c")
        tokens = await chains[via].enter(ctx)
        order.append(name)
        await asyncio.sleep(0.01)
        await chains[via].exit(ctx, tokens)

    waiters = []
    for n, (name, via) in enumerate([("B", "two"), ("C", "one"), ("D", "two")], start=1):
        waiters.append(asyncio.ensure_future(call(name, via)))
        for _ in range(400):  # until it stands in line
            await asyncio.sleep(0.025)
            check._default = check._default or check._queue("")
            if await check._default.waiting() == n:
                break
        else:
            raise AssertionError(f"{name} never joined the line")
    await chains["one"].exit(holder, held)
    await asyncio.wait_for(asyncio.gather(*waiters), 30)
    assert order == ["B", "C", "D"]
    await one.aclose()
    await two.aclose()


async def test_queued_http_requests_keep_their_bodies_through_the_middleware(
    store: Store,
) -> None:
    flow = [{"qps": 5, "behavior": "queue", "max_queue_ms": 2000}]
    guard = guard_with(store, {"POST /echo": {"flow": flow}})
    app = FastAPI()
    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, str]:
        return {"body": (await request.body()).decode()}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        sent = [c.post("/echo", content=f"body-{i}") for i in range(4)]
        responses = await asyncio.gather(*sent)
    assert [r.status_code for r in responses] == [200] * 4
    assert sorted(r.json()["body"] for r in responses) == [f"body-{i}" for i in range(4)]
