"""The Guard: origins, reload (rule identity, an atomic swap) and its lifecycle."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from ymguard import Blocked, Context, Guard, GuardMiddleware
from ymguard.chain import ORIGIN_MAX_CHARS, cap_origin
from ymguard.storage import MemoryStore, Store


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


# -- origins are capped --------------------------------------------------------------------


def origin_guard() -> Guard:
    return Guard(
        {
            "origin": {"from": "header", "name": "X-Caller"},
            "resources": {"GET /x": {"flow": [{"qps": 1, "origin": "other"}]}},
        }
    )


def scope_with(caller: bytes) -> dict[str, Any]:
    return {"type": "http", "headers": [(b"x-caller", caller)]}


def test_long_or_odd_origins_become_a_fixed_length_digest() -> None:
    guard = origin_guard()
    plain = guard.origin_of(scope_with(b"app-a"))
    huge = guard.origin_of(scope_with(b"v" * 60_000))
    huge2 = guard.origin_of(scope_with(b"v" * 59_999 + b"w"))
    odd = guard.origin_of(scope_with("caf\u00e9".encode("latin-1")))
    assert plain == "app-a"
    assert len(huge) == len(huge2) == len(odd) == 33 and huge.startswith("~")
    assert len({huge, huge2, odd}) == 3
    assert guard.origin_of(scope_with(b"x" * ORIGIN_MAX_CHARS)) == "x" * ORIGIN_MAX_CHARS
    assert len(guard.origin_of(scope_with(b"x" * (ORIGIN_MAX_CHARS + 1)))) == 33


async def test_a_non_ascii_origin_named_in_the_rules_matches_the_header_it_names() -> None:
    # The rules file is UTF-8; a header origin read as latin-1 never matched "café".
    rules = {"origin": {"from": "header", "name": "X-Caller"}}
    rules["resources"] = {"GET /x": {"flow": [{"qps": 1, "origin": "caf\u00e9"}]}}
    guard = Guard(rules)
    app = FastAPI()

    @app.get("/x")
    async def x() -> str:
        return "ok"

    app.add_middleware(GuardMiddleware, guard=guard)
    cafe = {"x-caller": "caf\u00e9".encode()}
    async with client(app) as c:
        statuses = [(await c.get("/x", headers=cafe)).status_code for _ in range(3)]
        other = (await c.get("/x", headers={"x-caller": "tea"})).status_code
    assert (statuses, other) == ([200, 429, 429], 200)
    # Bytes that are not UTF-8 still give distinct origins.
    assert guard.origin_of(scope_with(b"\xff")) != guard.origin_of(scope_with(b"\xfe"))


def test_a_digest_sent_as_an_origin_is_not_the_origin_it_digests() -> None:
    # Else a caller could send another caller's digest and share its state.
    victim = "v" * 200
    assert cap_origin(cap_origin(victim)) != cap_origin(victim)
    assert cap_origin("a b") != "a b" and cap_origin("") == ""


async def test_a_60kb_origin_keeps_only_a_digest_in_the_store() -> None:
    guard = origin_guard()
    app = FastAPI()

    @app.get("/x")
    async def x() -> str:
        return "ok"

    app.add_middleware(GuardMiddleware, guard=guard)
    async with client(app) as c:
        for i in range(20):
            caller = (f"caller-{i}:" * 6_000)[:60_000]
            assert (await c.get("/x", headers={"X-Caller": caller})).status_code == 200
    assert isinstance(guard.store, MemoryStore)
    assert len(guard.store.data) == 20
    assert max(len(key) for key in guard.store.data) < 100


# -- reload: rule identity and an atomic swap ----------------------------------------------

_BREAKER = {"strategy": "error_count", "threshold": 0, "min_requests": 1, "open_seconds": 60}


def _reload_rules(resources: dict[str, list[str]], added: bool) -> dict[str, Any]:
    """Resources whose unchanged rule gets one more rule of its kind in front if ``added``."""
    unchanged: dict[str, Any] = {
        "qps": {"qps": 3},
        "concurrency": {"concurrency": 1},
        "breaker": _BREAKER,
    }
    front: dict[str, Any] = {
        "qps": {"qps": 1000},
        "concurrency": {"qps": 1000},
        "breaker": {**_BREAKER, "threshold": 100},
    }
    out: dict[str, Any] = {}
    for resource, (what,) in resources.items():
        kind = "breaker" if what == "breaker" else "flow"
        out[resource] = {kind: [front[what], unchanged[what]] if added else [unchanged[what]]}
    return {"resources": out}


async def _admitted(guard: Guard, resource: str, status: int = 200) -> bool:
    chain = guard.chain(resource)
    ctx = Context(resource)
    try:
        tokens = await chain.enter(ctx)
    except Blocked:
        return False
    ctx.status = status
    await chain.exit(ctx, tokens)
    return True


async def test_a_reload_with_a_rule_added_in_front_keeps_window_counts(store: Store) -> None:
    # A window forgets its counts after a second: each try must fit in one (0.8 s, as a
    # count lapses 0.9-1.0 s after it was made); a machine too slow for that tries again.
    for attempt in range(5):
        resource = f"GET /q{attempt}"
        guard = Guard(_reload_rules({resource: ["qps"]}, added=False), storage=store)
        start = time.monotonic()
        before = [await _admitted(guard, resource) for _ in range(2)]  # 2 of 3
        guard.reload(_reload_rules({resource: ["qps"]}, added=True))
        after = [await _admitted(guard, resource) for _ in range(3)]
        if time.monotonic() - start < 0.8:
            assert before == [True, True]
            # The unchanged qps=3 rule still counts the 2 calls: 1 more passes.
            assert after == [True, False, False]
            return
    pytest.fail("five tries each took longer than the window (the machine is too slow)")


async def test_a_reload_with_a_rule_added_in_front_keeps_open_breakers_and_held_permits(
    store: Store,
) -> None:
    resources = {"GET /c": ["concurrency"], "GET /b": ["breaker"]}
    guard = Guard(_reload_rules(resources, added=False), storage=store)
    old = guard.chain("GET /c")
    held = Context("GET /c")
    tokens = await old.enter(held)  # holds the one permit
    assert not await _admitted(guard, "GET /c")
    await _admitted(guard, "GET /b", status=500)
    await _admitted(guard, "GET /b", status=500)
    assert not await _admitted(guard, "GET /b")  # open

    guard.reload(_reload_rules(resources, added=True))

    # The unchanged concurrency rule still knows its permit is held.
    assert not await _admitted(guard, "GET /c")
    # The unchanged breaker is still open; the one added in front is closed.
    checks: list[Any] = list(guard.chain("GET /b").checks)
    assert [check.breaker.state.value for check in checks] == ["closed", "open"]
    assert not await _admitted(guard, "GET /b")
    # The permit the old chain gives back frees the count the new chain uses.
    await old.exit(held, tokens)
    assert await _admitted(guard, "GET /c")
    await guard.aclose()


async def test_a_reload_compiles_every_chain_before_the_swap() -> None:
    guard = Guard({"resources": {"GET /a": {"flow": [{"qps": 1}]}}})
    first = guard.chain("GET /a")
    guard.reload({"resources": {"GET /a": {"flow": [{"qps": 2}]}, "GET /b": {}}})
    assert set(guard._chains) == {"GET /a", "GET /b"}  # compiled eagerly, swapped whole
    assert guard.chain("GET /a") is not first


# -- lifecycle -------------------------------------------------------------------------------


async def test_aclose_stops_every_background_task_of_the_store(redis_url: str, prefix: str) -> None:
    rules = {
        "key_prefix": prefix,
        "resources": {
            "held": {"semaphore": {"permits": 1, "lease_seconds": 0.6}},
            "guarded": {"breaker": [_BREAKER]},
        },
    }
    guard = Guard(rules, storage=redis_url)
    before = {t for t in asyncio.all_tasks() if not t.done()}

    @guard.resource("held")
    async def held() -> None:
        await asyncio.sleep(0.3)  # longer than a third of the lease: the keeper runs

    await held()
    await guard.chain("guarded").enter(Context("guarded"))
    await guard.aclose()
    await asyncio.sleep(0.05)
    left = {t for t in asyncio.all_tasks() if not t.done()} - before
    assert left == set()
