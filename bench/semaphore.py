"""Leased semaphore on Redis: acquire+release per second, against one bare EVALSHA.

Contenders, on one Redis and one event loop:

- ``floor``: one ``EVALSHA`` of ``return 1`` through ``RedisStore.run`` (the store's
  auto-pipelined connection and outage handling): the bare Redis round trip.
- ``ymguard``: ``permit = await sem.try_acquire()`` then ``await permit.release()``: two
  scripts (``permit_acquire.lua``, ``permit_release.lua``), so the best possible ratio
  against the floor is 0.5.
- ``ymguard, waiting``: ``async with sem.hold(timeout=10)`` by more tasks than permits
  (a quarter), so most acquirers stand in line and are woken by pub/sub.

Each round runs N ops sequentially and N ops over C concurrent tasks; the table shows the
median ops/s, the ratio ymguard / floor, and the Redis commands the client sent per op,
counted by the server (``INFO commandstats``): scripts (``EVALSHA``/``EVAL``) and pub/sub
commands, apart from the Redis calls made inside the scripts. By default a private
``redis-server`` on a free port is started and stopped so that nothing else is counted;
``--redis-url`` uses an existing Redis instead (counts then include other clients).

    python -m bench.semaphore                    # 5000 ops, 32 tasks, 5 rounds
    python -m bench.semaphore -n 20000 -r 7 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from bench._common import ops_arguments, redis_for
from ymguard.semaphore import Semaphore
from ymguard.storage import RedisStore

Op = Callable[[int], Awaitable[None]]

#: Commands a client sends itself; every other counted call ran inside a script.
CLIENT_COMMANDS = ("evalsha", "eval", "script", "subscribe", "unsubscribe", "ping")


async def run(op: Op, n: int, tasks: int) -> float:
    """Ops per second of ``n`` calls of ``op``, over ``tasks`` concurrent tasks."""

    async def worker(start: int) -> None:
        for i in range(start, n, tasks):
            await op(i)

    began = time.perf_counter()
    await asyncio.gather(*(worker(t) for t in range(tasks)))
    return n / (time.perf_counter() - began)


async def command_counts(probe: Redis) -> tuple[int, int]:
    """``(client commands, calls inside scripts)`` the server has run so far."""
    stats = await probe.info("commandstats")
    client = inner = 0
    for name, value in stats.items():
        command = name.removeprefix("cmdstat_")
        if command in ("info", "client", "hello"):
            continue
        if command in CLIENT_COMMANDS:
            client += int(value["calls"])
        else:
            inner += int(value["calls"])
    return client, inner


async def bench(
    url: str, n: int, tasks: int, rounds: int
) -> tuple[dict[str, dict[str, float]], dict[str, tuple[float, float]]]:
    """Median ops/s per contender and mode, and per contender the commands per op."""
    prefix = "ymbench-" + uuid.uuid4().hex[:8]
    store = RedisStore(url, key_prefix=prefix)
    probe = Redis.from_url(url)
    noop = store.script("return 1")
    free = Semaphore("bench", tasks, lease_seconds=30, storage=store)  # never full
    crowded = Semaphore("bench-crowded", max(1, tasks // 4), lease_seconds=30, storage=store)

    async def floor(i: int) -> None:
        await store.run(noop, (), ())

    async def ymguard(i: int) -> None:
        permit = await free.try_acquire()
        if permit is None:
            raise RuntimeError("a free semaphore refused a permit")
        await permit.release()

    async def waiting(i: int) -> None:
        async with crowded.hold(timeout=10, keep_alive=False):
            pass

    contenders: dict[str, Op] = {"floor": floor, "ymguard": ymguard, "ymguard, waiting": waiting}
    results: dict[str, dict[str, list[float]]] = {
        name: {"sequential": [], "concurrent": []} for name in contenders
    }
    per_op: dict[str, tuple[float, float]] = {}
    for name, op in contenders.items():  # warm up (EVALSHA cache, connections), then count
        await run(op, 200, tasks)
        before = await command_counts(probe)
        await run(op, n, tasks)
        after = await command_counts(probe)
        per_op[name] = ((after[0] - before[0]) / n, (after[1] - before[1]) / n)
    for r in range(rounds):
        names = list(contenders)
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate the order
        for name in order:
            results[name]["sequential"].append(await run(contenders[name], n, 1))
            results[name]["concurrent"].append(await run(contenders[name], n, tasks))
    if await free.held() or await crowded.held():
        raise RuntimeError("permits were left held")
    await probe.aclose()
    await store.aclose()
    medians = {
        name: {mode: statistics.median(v) for mode, v in modes.items()}
        for name, modes in results.items()
    }
    return medians, per_op


def main() -> None:
    """Run the benchmark and print a Markdown table."""
    args = ops_arguments(__doc__.split("\n")[0])
    with redis_for(args.redis_url) as url:
        medians, per_op = asyncio.run(bench(url, args.n, args.tasks, args.rounds))
    print(f"semaphore acquire+release on Redis, {args.n} ops/run, median of {args.rounds} rounds")
    print(f"(waiting: {args.tasks} tasks share {max(1, args.tasks // 4)} permits)\n")
    print("| contender | sequential ops/s | ratio | concurrent ops/s | ratio | commands/op |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, modes in medians.items():
        seq, conc = modes["sequential"], modes["concurrent"]
        floor_seq, floor_conc = medians["floor"]["sequential"], medians["floor"]["concurrent"]
        client, inner = per_op[name]
        print(
            f"| {name} | {seq:,.0f} | {seq / floor_seq:.2f} | {conc:,.0f} | "
            f"{conc / floor_conc:.2f} | {client:.2f} (+{inner:.1f} inside scripts) |"
        )


if __name__ == "__main__":
    main()
