"""Submit tokens on Redis: issue + consume per second, against two bare Redis round trips.

Contenders, on one Redis and one event loop, each op on a fresh scope:

- ``floor``: ``SET key value PX ttl`` then ``DEL key`` with redis-py asyncio: two plain
  round trips, what an app writes by hand (the seed's way, minus its racy ``GET``).
- ``floor-store``: the same two commands through ``RedisStore.call`` (the store's
  auto-pipelined hiredis connection): two bare round trips on the transport ymguard uses,
  so the ratio against it is the cost of the token logic and the Lua compare-and-delete.
- ``ymguard``: ``SubmitTokens.issue(scope)`` (``SET PX``) then ``consume(scope, token)``
  (one ``EVALSHA`` compare-and-delete), through ``RedisStore``'s outage handling.

Each round runs N ops sequentially and N ops spread over C concurrent tasks, for both
contenders (the order alternates each round); the table shows the median ops/s and the
ratios ymguard / floor (1.0 = as fast as the bare round trips). By default a private
``redis-server`` on a free port is started and stopped (nothing else shares it);
``--redis-url`` uses an existing Redis instead (keys use a unique prefix and are deleted
by the ops themselves).

    python -m bench.antiresubmit                  # 5000 ops, 32 tasks, 5 rounds
    python -m bench.antiresubmit -n 20000 -r 7 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from bench._common import ops_arguments, redis_for
from ymguard.antiresubmit import SubmitTokens
from ymguard.storage import RedisStore

Op = Callable[[int], Awaitable[None]]


async def run(op: Op, n: int, tasks: int) -> float:
    """Ops per second of ``n`` calls of ``op``, over ``tasks`` concurrent tasks."""

    async def worker(start: int) -> None:
        for i in range(start, n, tasks):
            await op(i)

    began = time.perf_counter()
    await asyncio.gather(*(worker(t) for t in range(tasks)))
    return n / (time.perf_counter() - began)


async def bench(url: str, n: int, tasks: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median ops/s per contender and mode (``sequential``, ``concurrent``)."""
    prefix = "ymbench-" + uuid.uuid4().hex[:8]
    store = RedisStore(url, key_prefix=prefix)
    tokens = SubmitTokens(storage=store, ttl_seconds=900)
    bare = Redis.from_url(url)
    value = "x" * 22  # a token's length

    async def floor(i: int) -> None:
        key = f"{prefix}:floor:{i}"
        await bare.set(key, value, px=900_000)
        await bare.delete(key)

    async def floor_store(i: int) -> None:
        key = f"{prefix}:floor-store:{i}"
        await store.call("SET", key, value, "PX", 900_000)
        await store.call("DEL", key)

    async def ymguard(i: int) -> None:
        scope = f"user-{i}:courses-1,2"
        token = await tokens.issue(scope)
        if not await tokens.consume(scope, token):
            raise RuntimeError("a fresh token was refused")

    contenders: dict[str, Op] = {"floor": floor, "floor-store": floor_store, "ymguard": ymguard}
    results: dict[str, dict[str, list[float]]] = {
        name: {"sequential": [], "concurrent": []} for name in contenders
    }
    for op in contenders.values():  # warm up: connections, EVALSHA cache
        await run(op, 200, tasks)
    for r in range(rounds):
        names = list(contenders)
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate the order
        for name in order:
            results[name]["sequential"].append(await run(contenders[name], n, 1))
            results[name]["concurrent"].append(await run(contenders[name], n, tasks))
    await bare.aclose()
    await store.aclose()
    return {
        name: {mode: statistics.median(v) for mode, v in modes.items()}
        for name, modes in results.items()
    }


def main() -> None:
    """Run the benchmark and print a Markdown table."""
    args = ops_arguments(__doc__.split("\n")[0])
    with redis_for(args.redis_url) as url:
        medians = asyncio.run(bench(url, args.n, args.tasks, args.rounds))
    print(f"issue+consume on Redis, {args.n} ops/run, median of {args.rounds} rounds\n")
    print(
        "| mode | floor: SET+DEL, redis-py | floor-store: SET+DEL, store | "
        "ymguard: issue+consume | ratio vs floor | ratio vs floor-store |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("sequential", "concurrent"):
        floor, floor_store = medians["floor"][mode], medians["floor-store"][mode]
        ours = medians["ymguard"][mode]
        label = mode if mode == "sequential" else f"concurrent ({args.tasks} tasks)"
        print(
            f"| {label} | {floor:,.0f} | {floor_store:,.0f} | {ours:,.0f} | "
            f"{ours / floor:.2f} | {ours / floor_store:.2f} |"
        )


if __name__ == "__main__":
    main()
