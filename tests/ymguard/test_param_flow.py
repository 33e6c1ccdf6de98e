"""Hot parameters (``param_flow``) on both stores: per-value buckets, items, pacing, bounds."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.helpers import RedisServer, Uvicorn, running
from ymguard import (
    Blocked,
    Context,
    Guard,
    GuardMiddleware,
    ParamFlowLimited,
    RulesError,
    StorageBlocked,
    load_rules,
    parse_rules,
)
from ymguard.backends.param_bucket import (
    BUCKET,
    PACING,
    BucketSpec,
    MemoryParamBuckets,
    param_buckets,
)
from ymguard.cli import main
from ymguard.param_flow import DEFAULT_MAX_VALUES, ParamFlowCheck
from ymguard.storage import MemoryStore, Store, store_from_uri

# A long duration: nothing refills while a test runs, however slow the machine.
LONG = 3600


def guard_with(store: Store, rules: list[dict[str, Any]], resource: str = "GET /r/{id}") -> Guard:
    return Guard({"resources": {resource: {"param_flow": rules}}}, storage=store)


async def attempt(guard: Guard, params: dict[str, Any], resource: str = "GET /r/{id}") -> bool:
    """Enter and leave at once; True if admitted."""
    chain = guard.chain(resource)
    ctx = Context(resource, "", params)
    try:
        tokens = await chain.enter(ctx)
    except Blocked:
        return False
    await chain.exit(ctx, tokens)
    return True


async def burst(guard: Guard, value: Any, n: int) -> int:
    return sum(await asyncio.gather(*(attempt(guard, {"id": value}) for _ in range(n))))


async def test_qps_3_admits_3_per_value(store: Store) -> None:
    guard = guard_with(store, [{"param": "id", "qps": 3, "duration_seconds": LONG}])
    assert await burst(guard, "a", 10) == 3
    assert await burst(guard, "b", 10) == 3
    assert await burst(guard, 42, 10) == 3
    assert await burst(guard, "42", 10) == 0  # 42 and "42" are one value


async def test_items_override_the_threshold_and_0_blocks_the_value(store: Store) -> None:
    rule = {"param": "id", "qps": 3, "duration_seconds": LONG, "items": {"42": 0, 7: 5}}
    guard = guard_with(store, [rule])
    assert await burst(guard, 42, 5) == 0
    assert await burst(guard, "7", 10) == 5
    assert await burst(guard, "8", 10) == 3


async def test_burst_adds_tokens_a_value_may_spend_at_once(store: Store) -> None:
    guard = guard_with(store, [{"param": "id", "qps": 2, "burst": 3, "duration_seconds": LONG}])
    assert await burst(guard, "x", 10) == 5


async def test_a_value_refills_after_its_duration(store: Store) -> None:
    guard = guard_with(store, [{"param": "id", "qps": 1, "duration_seconds": 0.2}])
    assert await attempt(guard, {"id": "v"})
    for _ in range(300):  # up to 30 s: the bucket refills after 0.2 s
        await asyncio.sleep(0.1)
        if await attempt(guard, {"id": "v"}):
            break
    else:
        raise AssertionError("the value never got a token back")


async def test_a_call_without_the_parameter_is_not_limited(store: Store) -> None:
    guard = guard_with(store, [{"param": "id", "qps": 0}])
    assert await attempt(guard, {})
    assert not await attempt(guard, {"id": 1})


async def test_a_refusal_names_the_rule_and_its_quota(store: Store) -> None:
    guard = guard_with(store, [{"param": "id", "qps": 2, "duration_seconds": LONG, "name": "hot"}])
    assert await burst(guard, "a", 2) == 2
    with pytest.raises(ParamFlowLimited) as info:
        await guard.chain("GET /r/{id}").enter(Context("GET /r/{id}", "", {"id": "a"}))
    exc = info.value
    assert exc.rule == "param_flow[0] id qps=2"
    assert exc.retry_after is not None and 0 < exc.retry_after <= LONG + 1
    assert exc.quota is not None
    assert (exc.quota.name, exc.quota.limit, exc.quota.remaining) == ("hot", 2, 0)


async def test_a_call_a_later_rule_blocks_spends_no_token(store: Store) -> None:
    rules = {"param_flow": [{"param": "id", "qps": 2, "duration_seconds": LONG}]}
    guard = Guard(
        {"resources": {"GET /r/{id}": {**rules, "flow": [{"concurrency": 0}]}}}, storage=store
    )
    assert await burst(guard, "a", 6) == 0
    guard.reload({"resources": {"GET /r/{id}": rules}})  # the same rule: the same state
    assert await burst(guard, "a", 6) == 2


async def test_odd_and_long_values_are_distinct_and_bounded(store: Store) -> None:
    guard = guard_with(store, [{"param": "id", "qps": 1, "duration_seconds": LONG}])
    values = ["a b", "a%20b", "{tag}", "é", "x" * 10_000, "x" * 9_999 + "y", "\x00", ""]
    for value in values:
        assert await attempt(guard, {"id": value})
    for value in values:
        assert not await attempt(guard, {"id": value})


async def test_queue_paces_one_value_and_refuses_past_max_queue(store: Store) -> None:
    # One call a minute per value, at most five minutes of queue: of a burst of 20,
    # the first goes now, five get slots 1-5 minutes out, fourteen are refused.
    name = "GET /q#rule"
    buckets = param_buckets(store, name, DEFAULT_MAX_VALUES)
    spec = BucketSpec(PACING, 1, 0, 60_000.0, 300_000)
    results = await asyncio.gather(*(buckets.acquire("v", spec) for _ in range(20)))
    admitted = sorted(r.wait_seconds for r in results if r.admitted)
    assert len(admitted) == 6 and sum(not r.admitted for r in results) == 14
    assert [round(w / 60) for w in admitted] == [0, 1, 2, 3, 4, 5]
    other = await buckets.acquire("w", spec)  # another value has its own schedule
    assert other.admitted and other.wait_seconds == 0


async def test_queue_awaits_its_slot_and_a_cancelled_waiter_holds_nothing(store: Store) -> None:
    rule = {"param": "id", "qps": 1, "duration_seconds": 60, "behavior": "queue"}
    rule["max_queue_ms"] = 300_000
    guard = guard_with(store, [rule])
    assert await attempt(guard, {"id": "v"})  # the first goes at once
    waiter = asyncio.ensure_future(attempt(guard, {"id": "v"}))
    check = guard.chain("GET /r/{id}").checks[0]
    assert isinstance(check, ParamFlowCheck)
    spec = check._spec(1)
    for _ in range(200):  # wait until it holds the slot a minute out and sleeps
        await asyncio.sleep(0.05)
        if _reserved(store, check, "v"):
            break
    assert not waiter.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    for _ in range(200):  # the refund runs in the background
        await asyncio.sleep(0.05)
        if not _reserved(store, check, "v"):
            break
    # The next caller gets the slot the cancelled one left, not the one after it.
    result = await check.buckets.acquire("v", spec)
    assert result.admitted and round(result.wait_seconds / 60) == 1


async def test_a_waiter_leaving_mid_line_never_doubles_a_slot(store: Store) -> None:
    # X goes now, A and B wait 1 and 2 minutes; A leaves. The next caller must not get
    # B's slot (two calls of the value at once): it queues after B.
    buckets = param_buckets(store, "GET /q#mid", DEFAULT_MAX_VALUES)
    spec = BucketSpec(PACING, 1, 0, 60_000.0, 300_000)
    x, a, b = [await buckets.acquire("v", spec) for _ in range(3)]
    assert [round(r.wait_seconds / 60) for r in (x, a, b)] == [0, 1, 2]
    await buckets.refund("v", spec, a.slot)  # A leaves the middle of the line
    c = await buckets.acquire("v", spec)
    assert c.admitted and round(c.wait_seconds / 60) == 3
    await buckets.refund("v", spec, c.slot)  # the last of the line leaves: its slot comes back
    d = await buckets.acquire("v", spec)
    assert d.admitted and round(d.wait_seconds / 60) == 3


def _reserved(store: Store, check: ParamFlowCheck, value: str) -> bool:
    """Whether the value's schedule reaches a minute out (someone holds that slot)."""
    if isinstance(check.buckets, MemoryParamBuckets):
        state = check.buckets.table.get(value)
        return isinstance(state, float) and state > MemoryStore.now() * 1000 + 30_000
    key = check.buckets.key(value)  # type: ignore[attr-defined]
    client = redis.Redis.from_url(store.uri)  # type: ignore[attr-defined]
    try:
        seconds, micros = client.time()
        last = float(client.hget(key, "t") or 0)
        return last > seconds * 1000 + micros / 1000 + 30_000
    finally:
        client.close()


async def test_the_parameter_is_read_where_the_rule_says(storage_uri: str, prefix: str) -> None:
    def rule(param: str) -> list[dict[str, Any]]:
        return [{"param": param, "qps": 1, "duration_seconds": LONG}]

    guard = Guard(
        {
            "key_prefix": prefix,
            "origin": {"from": "header", "name": "X-Caller"},
            "resources": {
                "GET /p/{course_id}": {"param_flow": rule("course_id")},
                "GET /q": {"param_flow": rule("query:user")},
                "GET /h": {"param_flow": rule("header:X-Device")},
                "GET /s": {"param_flow": rule("state:tenant")},
                "GET /o": {"param_flow": rule("origin")},
            },
        },
        storage=storage_uri,
    )
    from fastapi import FastAPI

    app = FastAPI()
    for path in ("/p/{course_id}", "/q", "/h", "/s", "/o"):
        app.add_api_route(path, lambda: {"ok": True})

    async def with_state(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["tenant"] = scope["path"].rsplit("=", 1)[-1]
        await guarded(scope, receive, send)

    guarded = GuardMiddleware(app, guard)
    guard.install(app)
    transport = httpx.ASGITransport(app=with_state)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:

        async def twice(path: str, **kw: Any) -> list[int]:
            return [(await c.get(path, **kw)).status_code for _ in range(2)]

        assert await twice("/p/1") == [200, 429]
        assert await twice("/p/2") == [200, 429]
        assert await twice("/q", params={"user": "ann"}) == [200, 429]
        assert await twice("/q", params={"user": "bob"}) == [200, 429]
        assert await twice("/q") == [200, 200]  # no user: not limited
        assert await twice("/h", headers={"X-Device": "d1"}) == [200, 429]
        assert await twice("/h", headers={"X-Device": "d2"}) == [200, 429]
        assert await twice("/o", headers={"X-Caller": "app-a"}) == [200, 429]
        assert await twice("/o", headers={"X-Caller": "app-b"}) == [200, 429]
        assert await twice("/o") == [200, 200]  # no origin: not limited
        refused = await c.get("/p/1")
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    body = refused.json()
    assert body["type"].endswith("/param-flow-limited") and body["resource"] == "GET /p/{course_id}"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Policy"].startswith('"param_flow";q=1;w=3600')
    assert refused.headers["RateLimit"].startswith('"param_flow";r=0;t=')
    await guard.aclose()


async def test_a_code_resource_is_limited_per_argument(storage_uri: str, prefix: str) -> None:
    rule = {"param": "user", "qps": 2, "duration_seconds": LONG}
    guard = Guard(
        {"key_prefix": prefix, "resources": {"charge": {"param_flow": [rule]}}},
        storage=storage_uri,
    )

    @guard.resource("charge", block_handler=lambda user, amount: "blocked")
    async def charge(user: str, amount: int) -> str:
        return "ok"

    assert [await charge(user="ann", amount=1) for _ in range(3)] == ["ok", "ok", "blocked"]
    assert await charge("bob", 1) == "ok"  # positional arguments are read by name too
    assert await charge("bob", amount=1) == "ok"
    assert await charge("bob", 1) == "blocked"
    await guard.aclose()


# -- bounds -----------------------------------------------------------------------------


def test_a_million_distinct_values_stay_within_50_mb_on_the_memory_store() -> None:
    store = MemoryStore()
    guard = Guard(
        {"resources": {"GET /r/{id}": {"param_flow": [{"param": "id", "qps": 5}]}}},
        storage=store,
    )
    check = guard.chain("GET /r/{id}").checks[0]
    assert isinstance(check, ParamFlowCheck) and isinstance(check.buckets, MemoryParamBuckets)
    decide, spec = check.buckets.decide, check._spec(5)
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(1_000_000):
            decide(str(i), spec)  # the check's own primitive, without a coroutine per call
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(check.buckets) == DEFAULT_MAX_VALUES
    assert peak <= 50 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
    assert current <= peak


async def test_the_lru_keeps_the_recently_used_values() -> None:
    store = MemoryStore()
    buckets = MemoryParamBuckets(store, "GET /r#x", max_values=3)
    spec = BucketSpec(BUCKET, 1, 0, LONG * 1000.0, 0)
    for value in ("a", "b", "c"):
        assert (await buckets.acquire(value, spec)).admitted
    assert not (await buckets.acquire("a", spec)).admitted  # "a" used again: most recent
    assert (await buckets.acquire("d", spec)).admitted  # "b" goes
    assert set(buckets.table) == {"c", "a", "d"}
    assert not (await buckets.acquire("a", spec)).admitted  # "a" kept its empty bucket


async def test_on_redis_each_value_is_one_key_in_the_rules_slot_with_a_ttl(
    redis_url: str, prefix: str
) -> None:
    store = store_from_uri(redis_url, key_prefix=prefix)
    guard = guard_with(store, [{"param": "id", "qps": 2, "duration_seconds": 5}])
    values = ["a", "{b}", "x" * 5000]
    for value in values:
        assert await attempt(guard, {"id": value})
    client = redis.Redis.from_url(redis_url)
    try:
        keys = sorted(k.decode() for k in client.scan_iter(match=prefix + ":*"))
        assert len(keys) == 3
        tags = {key[key.index("{") : key.index("}") + 1] for key in keys}
        assert len(tags) == 1 and tags.pop().startswith("{param:GET /r/%7Bid%7D#")
        assert all(key.count("{") == 1 and key.count("}") == 1 for key in keys)
        assert max(len(key) for key in keys) < 300  # the long value is hashed
        for key in keys:
            assert 0 < client.pttl(key) <= 5001
    finally:
        client.close()
    await guard.aclose()


async def test_one_redis_command_per_decision(private_redis: RedisServer, prefix: str) -> None:
    store = store_from_uri(private_redis.url, key_prefix=prefix)
    guard = guard_with(store, [{"param": "id", "qps": 3}])
    await attempt(guard, {"id": "warm"})  # loads the script
    client = redis.Redis.from_url(private_redis.url)
    client.config_resetstat()
    for i in range(50):
        await attempt(guard, {"id": i % 5})
    stats = client.info("commandstats")
    client.close()
    calls = {name: int(v["calls"]) for name, v in stats.items()}
    assert calls.get("cmdstat_evalsha") == 50
    assert "cmdstat_eval" not in calls
    await guard.aclose()


# -- two processes ----------------------------------------------------------------------


@pytest.fixture
def two_servers(redis_url: str, prefix: str) -> Iterator[list[Uvicorn]]:
    env = {"YMGUARD_TEST_REDIS": redis_url, "YMGUARD_TEST_PREFIX": prefix}
    servers = [Uvicorn("tests.apps.hot_app:app", env=env) for _ in range(2)]
    with running(servers):
        yield servers


async def test_two_processes_enforce_one_per_value_limit(two_servers: list[Uvicorn]) -> None:
    async with httpx.AsyncClient(timeout=30) as c:
        pids = {(await c.get(s.url + "/health")).json()["pid"] for s in two_servers}
        assert len(pids) == 2
        for course in ("7", "8"):
            requests = [c.post(f"{two_servers[i % 2].url}/kill/{course}") for i in range(12)]
            statuses = [r.status_code for r in await asyncio.gather(*requests)]
            assert statuses.count(200) == 3 and statuses.count(429) == 9
        refused = await asyncio.gather(*(c.post(s.url + "/kill/42") for s in two_servers))
        assert [r.status_code for r in refused] == [429, 429]


# -- the rules file ---------------------------------------------------------------------

FULL = """\
resources:
  "POST /kill/{course_id}":
    param_flow:
      - param: course_id
        qps: 500
        burst: 0
        duration_seconds: 1
        behavior: reject
        items: {"42": 2000, "13": 0, 7: 1}
      - param: query:user
        qps: 5
        behavior: queue
        max_queue_ms: 200
        max_values: 1000
        name: per-user
      - {param: "header:X-Device", qps: 1}
      - {param: "state:tenant", qps: 1}
      - {param: origin, qps: 1}
"""


def test_check_accepts_every_param_flow_field(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(FULL)
    rules = load_rules(path).resources["POST /kill/{course_id}"].param_flow
    assert rules[0].items == {"42": 2000, "13": 0, "7": 1}
    assert rules[1].behavior == "queue" and rules[1].max_values == 1000
    # ymguard check prints what applies, as a rules file that means the same.
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["check", str(path)]) == 0
    again = tmp_path / "again.yaml"
    again.write_text(out.getvalue())
    assert load_rules(again) == load_rules(path)


@pytest.mark.parametrize(
    ("rule", "field", "why"),
    [
        ({"param": "id", "qps": -1}, "qps", "greater than or equal to 0"),
        ({"param": "1id", "qps": 1}, "param", "is not a parameter"),
        ({"param": "cookie:x", "qps": 1}, "param", "not a parameter source"),
        ({"param": "header:bad name", "qps": 1}, "param", "not an HTTP header name"),
        ({"param": "query:", "qps": 1}, "param", "needs a name"),
        ({"param": "state:a-b", "qps": 1}, "param", "Python identifier"),
        ({"param": "id"}, "qps", "required"),
        ({"param": "id", "qps": 1, "items": {1.5: 2}}, "items", "not 1.5"),
        ({"param": "id", "qps": 1, "items": {True: 2}}, "items", "not True"),
        ({"param": "id", "qps": 1, "items": {"a": -1}}, "items", "0 (refused) or more"),
        ({"param": "id", "qps": 1, "items": {"1": 1, 1: 2}}, "items", "twice"),
        ({"param": "id", "qps": 1, "behavior": "warm_up"}, "behavior", "'reject' or 'queue'"),
        ({"param": "id", "qps": 1, "duration_seconds": 0}, "duration_seconds", "greater than 0"),
        ({"param": "id", "qps": 1, "max_values": 0}, "max_values", "greater than or equal"),
        ({"param": "id", "qps": 1, "max_values": 10**7}, "max_values", "less than or equal"),
        ({"param": "id", "qps": 1, "speed": 1}, "speed", "unknown field"),
    ],
)
def test_nonsense_is_refused_by_field(rule: dict[str, Any], field: str, why: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules({"resources": {"GET /r/{id}": {"param_flow": [rule]}}}, source="r.yaml")
    (problem,) = info.value.problems
    assert problem.field.startswith('resources."GET /r/{id}".param_flow[0]')
    assert problem.field.endswith(field) or field in problem.field
    assert why in problem.why, problem.why


def test_a_path_param_the_route_lacks_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    guard = Guard({"resources": {"GET /r/{id}": {"param_flow": [{"param": "course", "qps": 1}]}}})
    with caplog.at_level("WARNING", logger="ymguard"):
        guard.chain("GET /r/{id}")
        guard.reload(guard.rules)
    assert "does not have" in caplog.text


# -- outages ----------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "admitted"), [("local", 2), ("open", 5), ("closed", 0)])
async def test_a_redis_outage_follows_on_storage_error(
    private_redis: RedisServer, prefix: str, policy: str, admitted: int
) -> None:
    store = store_from_uri(private_redis.url, key_prefix=prefix, on_storage_error=policy)  # type: ignore[arg-type]
    guard = guard_with(store, [{"param": "id", "qps": 2, "duration_seconds": LONG}])
    private_redis.stop()
    results = []
    for _ in range(5):
        try:
            await attempt_raising(guard, {"id": "v"})
            results.append("ok")
        except StorageBlocked:
            results.append("storage")
        except ParamFlowLimited:
            results.append("limited")
    assert results.count("ok") == admitted
    if policy == "closed":
        assert set(results) == {"storage"}
    await guard.aclose()


async def attempt_raising(guard: Guard, params: dict[str, Any]) -> None:
    chain = guard.chain("GET /r/{id}")
    ctx = Context("GET /r/{id}", "", params)
    await chain.exit(ctx, await chain.enter(ctx))
