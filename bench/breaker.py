"""A closed circuit breaker's cost per request, in process, and how fast a trip spreads.

Contenders, each one Starlette app with one route called directly over ASGI (no sockets,
no HTTP parsing, so the guard's own cost is not hidden behind the server's):

- ``plain``: the app without ymguard.
- ``middleware``: ``GuardMiddleware`` with no rule for the route (the floor of any guard).
- ``breaker memory``: one ``error_ratio`` breaker on the memory store.
- ``breaker redis``: the same on Redis; a closed breaker answers from the local copy, so
  this should cost what memory costs (no Redis call per request).

Rounds are interleaved (plain, middleware, memory, redis, plain, ...) so that a noisy
neighbour slows every contender alike; the table shows the median microseconds per
request and the ratios to ``plain`` and to ``middleware`` (the breaker's own share).
Then ``propagation`` trips a breaker through one Redis store and times until a second
store (a second process, as far as the breaker can tell) sees it open: the pub/sub path.

    python -m bench.breaker                       # 20000 requests, 5 rounds
    python -m bench.breaker -n 50000 -r 7 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import pybreaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ymguard import Context, Guard, GuardMiddleware
from ymguard.backends.breaker_state import close_breakers
from ymguard.storage import Store, store_from_uri

RESOURCE = "GET /work"
RULE = {"strategy": "error_ratio", "threshold": 0.5, "min_requests": 5, "open_seconds": 1}

SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/work",
    "raw_path": b"/work",
    "root_path": "",
    "query_string": b"",
    "headers": [],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 80),
}


async def work(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def app(guard: Guard | None) -> Any:
    starlette = Starlette(routes=[Route("/work", work)])
    if guard is not None:
        starlette.add_middleware(GuardMiddleware, guard=guard)
    return starlette


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def timed(asgi: Any, n: int) -> float:
    """Microseconds per request over ``n`` sequential requests."""
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    started = time.perf_counter()
    for _ in range(n):
        await asgi(dict(SCOPE), receive, send)
    elapsed = time.perf_counter() - started
    assert set(statuses) == {200}, f"unexpected statuses {set(statuses)}"
    return elapsed / n * 1e6


def guard_on(store: Store, rules: bool = True) -> Guard:
    resources = {RESOURCE: {"breaker": [RULE]}} if rules else {}
    return Guard({"resources": resources}, storage=store)


class SeenOpen(pybreaker.CircuitBreakerListener):
    """Sets an event when the breaker it listens to opens."""

    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            self.event.set()


async def propagation(redis_url: str, times: int) -> list[float]:
    """Milliseconds from a trip in one store until a second store's copy is open."""
    results = []
    for _ in range(times):
        prefix = "bench-breaker-" + uuid.uuid4().hex[:8]
        stores = [store_from_uri(redis_url, key_prefix=prefix) for _ in range(2)]
        rule = {**RULE, "strategy": "error_count", "threshold": 0, "min_requests": 1}
        a, b = (Guard({"resources": {RESOURCE: {"breaker": [rule]}}}, storage=s) for s in stores)
        chain_a = a.chain(RESOURCE)
        b.chain(RESOURCE)
        seen = asyncio.Event()
        b.add_breaker_listener(SeenOpen(seen))
        await asyncio.sleep(0.05)  # both subscribers are listening
        ctx = Context(RESOURCE)
        tokens = await chain_a.enter(ctx)
        ctx.error = RuntimeError("down")
        started = time.perf_counter()
        await chain_a.exit(ctx, tokens)
        await asyncio.wait_for(seen.wait(), 5)
        results.append((time.perf_counter() - started) * 1000)
        for s in stores:
            await close_breakers(s)
            await s.aclose()
    return results


async def main(n: int, rounds: int, redis_url: str) -> None:
    prefix = "bench-breaker-" + uuid.uuid4().hex[:8]
    memory = store_from_uri("memory://")
    redis = store_from_uri(redis_url, key_prefix=prefix)
    contenders: dict[str, Any] = {
        "plain": app(None),
        "middleware": app(guard_on(memory, rules=False)),
        "breaker memory": app(guard_on(memory)),
        "breaker redis": app(guard_on(redis)),
    }
    redis_calls = [0]
    run: Callable[..., Any] = redis.run  # type: ignore[attr-defined]

    async def counted(*args: Any) -> Any:
        redis_calls[0] += 1
        return await run(*args)

    for asgi in contenders.values():  # warm up: compile chains, start the subscriber
        await timed(asgi, 200)
    await asyncio.sleep(0.1)
    redis.run = counted  # type: ignore[attr-defined]
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, asgi in contenders.items():
            results[name].append(await timed(asgi, n))
    base = statistics.median(results["plain"])
    floor = statistics.median(results["middleware"])
    print(f"{n} requests x {rounds} rounds, in process over ASGI (median us/request)")
    print(f"{'contender':<16} {'us/req':>8} {'vs plain':>9} {'vs middleware':>14}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<16} {median:>8.1f} {median / base:>9.2f} {median / floor:>14.2f}")
    print(f"Redis calls made by the closed Redis breaker: {redis_calls[0]}")
    delays = await propagation(redis_url, 20)
    print(
        "propagation of a trip to a second store over pub/sub: "
        f"median {statistics.median(delays):.2f} ms, max {max(delays):.2f} ms (20 trips)"
    )
    await close_breakers(redis)
    await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="requests per round")
    parser.add_argument("-r", "--rounds", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.rounds, args.redis_url))
