"""QPS window on Redis: ymguard's Lua sliding window vs ``limits.aio`` (redis-py), and the floor.

Every contender admits one hit per call against one key with a limit that is never
reached, on the same Redis and the same event loop:

- ``floor-ping``: a bare ``PING`` (redis-py asyncio): the round trip no limiter can beat.
- ``floor-evalsha``: ``EVALSHA`` of ``return 1`` through redis-py: the round trip of any
  Lua limiter on redis-py (what ``limits.aio`` uses).
- ``floor-ym-store``: the same trivial script through ``RedisStore.run`` (ymguard's own
  transport, auto-pipelined where the store has one): the floor under ymguard's window.
- ``ymguard``: ``store.window().acquire(key, limit, 1.0)`` (``ymguard/backends/window.py``).
- ``limits-moving``, ``limits-sliding``, ``limits-fixed``: ``limits.aio``'s
  ``MovingWindowRateLimiter``, ``SlidingWindowCounterRateLimiter`` and
  ``FixedWindowRateLimiter`` ``.hit()``, on ``RedisStorage(..., implementation="redispy")``.

Each round runs N sequential hits and N hits spread over C concurrent tasks, for every
contender in turn (the order rotates each round); the table shows the medians, the
client's CPU time per hit (the cost an app pays in its own process), Redis's CPU time per
hit and the Redis commands per hit (``INFO commandstats`` deltas, counted in a separate
pass). By default the script starts a private ``redis-server`` on a free port (nothing
else talks to it, so the counts are exact) and stops it at the end.

    python -m bench.limiter_window                 # 5000 hits, 32 tasks, 5 rounds
    python -m bench.limiter_window -n 20000 -r 7 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench._common import code_version, median, start_redis, stop_redis

Hit = Callable[[], Awaitable[bool]]


# -- the contenders ------------------------------------------------------------------------


async def make_contenders(url: str, prefix: str, limit: int) -> tuple[dict[str, Hit], list[Any]]:
    """The hit functions by name, and the objects to close at the end."""
    from limits import RateLimitItemPerSecond
    from limits.aio.storage import RedisStorage
    from limits.aio.strategies import (
        FixedWindowRateLimiter,
        MovingWindowRateLimiter,
        SlidingWindowCounterRateLimiter,
    )
    from redis.asyncio import Redis

    from ymguard.storage import RedisStore

    floor = Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    trivial = floor.register_script("return 1")

    async def floor_ping() -> bool:
        return bool(await floor.ping())

    async def floor_evalsha() -> bool:
        return await trivial(keys=[f"{prefix}:floor"], args=[]) == 1

    store = RedisStore(url, key_prefix=f"{prefix}:ym")
    window = store.window()
    trivial_ym = store.script("return 1")

    async def floor_ymguard() -> bool:
        return await store.run(trivial_ym, (f"{prefix}:floor-ym",), ()) == 1

    key = store.key("flow", "GET /items/{item_id}#0")

    async def ymguard() -> bool:
        return (await window.acquire(key, limit, 1.0)).admitted

    storage = RedisStorage("async+" + url, implementation="redispy", key_prefix=f"{prefix}:limits")
    item = RateLimitItemPerSecond(limit)
    moving = MovingWindowRateLimiter(storage)
    sliding = SlidingWindowCounterRateLimiter(storage)
    fixed = FixedWindowRateLimiter(storage)

    async def limits_moving() -> bool:
        return await moving.hit(item, "moving")

    async def limits_sliding() -> bool:
        return await sliding.hit(item, "sliding")

    async def limits_fixed() -> bool:
        return await fixed.hit(item, "fixed")

    contenders: dict[str, Hit] = {
        "floor-ping": floor_ping,
        "floor-evalsha": floor_evalsha,
        "floor-ym-store": floor_ymguard,
        "ymguard": ymguard,
        "limits-moving": limits_moving,
        "limits-sliding": limits_sliding,
        "limits-fixed": limits_fixed,
    }
    return contenders, [floor, store, storage]


async def close_all(objects: list[Any]) -> None:
    from limits.aio.storage import RedisStorage

    for obj in objects:
        if isinstance(obj, RedisStorage):
            connection = obj.bridge.get_connection()
            await connection.aclose()
        else:
            await obj.aclose()


# -- measuring -----------------------------------------------------------------------------


async def run_hits(hit: Hit, n: int, tasks: int) -> tuple[float, float, int]:
    """Seconds of wall time, client CPU seconds and refusals for ``n`` hits over ``tasks``."""
    refused = 0

    async def worker(count: int) -> None:
        nonlocal refused
        for _ in range(count):
            if not await hit():
                refused += 1

    shares = [n // tasks + (1 if i < n % tasks else 0) for i in range(tasks)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    if tasks == 1:
        await worker(n)
    else:
        await asyncio.gather(*(worker(count) for count in shares))
    return time.perf_counter() - t0, time.process_time() - cpu0, refused


async def commandstats(client: Any) -> dict[str, tuple[int, int]]:
    info = await client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in info.items()
        if isinstance(v, dict)
    }


TOP_LEVEL = ("evalsha", "eval", "ping")


async def server_reads(client: Any) -> int:
    """Read events Redis has processed: one per batch of commands a connection sent."""
    return int((await client.info("stats"))["total_reads_processed"])


async def count_commands(hit: Hit, client: Any, hits: int, tasks: int) -> dict[str, Any]:
    """What one hit costs Redis, from ``INFO`` deltas around a pass of ``hits`` hits.

    ``per_hit``: commands by name (the stats count a script's inner ``redis.call``s as
    well as the script); ``top_level``: the commands the client sent (``TOP_LEVEL``);
    ``redis_usec``: Redis CPU for them (a script's time includes its inner calls);
    ``reads_seq``/``reads_conc``: Redis read events per hit, sequential and over
    ``tasks`` tasks: the network round trips, fewer than one when a client pipelines.
    Each ``INFO`` is one read and one command of its own; they are taken off.
    """
    before, reads0 = await commandstats(client), await server_reads(client)
    await run_hits(hit, hits, 1)
    reads1 = await server_reads(client)
    after = await commandstats(client)
    reads2 = await server_reads(client)
    await run_hits(hit, hits, tasks)
    reads3 = await server_reads(client)
    per_hit: dict[str, float] = {}
    usec = 0
    for name, (calls, us) in after.items():
        if name == "info":
            continue
        c0, u0 = before.get(name, (0, 0))
        if calls > c0:
            per_hit[name] = (calls - c0) / hits
            if name in TOP_LEVEL:
                usec += us - u0
    return {
        "per_hit": per_hit,
        "top_level": sum(v for k, v in per_hit.items() if k in TOP_LEVEL),
        "redis_usec": usec / hits,
        "reads_seq": (reads1 - reads0 - 2) / hits,  # less the 2 INFOs in between
        "reads_conc": (reads3 - reads2 - 1) / hits,
    }


async def bench(args: argparse.Namespace, url: str, private: bool) -> dict[str, Any]:
    from redis.asyncio import Redis

    prefix = f"ymbench-window-{uuid.uuid4().hex[:10]}"
    contenders, closers = await make_contenders(url, prefix, args.limit)
    admin = Redis.from_url(url, socket_timeout=5)
    wanted = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(wanted) - set(contenders)
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; use {', '.join(contenders)}")
    contenders = {name: contenders[name] for name in wanted}
    results: dict[str, dict[str, Any]] = {
        name: {"seq": [], "conc": [], "cpu_seq": [], "cpu_conc": [], "refused": 0}
        for name in contenders
    }
    try:
        # Warm up: scripts loaded, pools filled, code paths hot.
        for hit in contenders.values():
            await run_hits(hit, 200, 1)
            await run_hits(hit, max(200, args.tasks * 4), args.tasks)
        names = list(contenders)
        for rnd in range(args.rounds):
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:
                hit = contenders[name]
                row = results[name]
                wall, cpu, refused = await run_hits(hit, args.hits, 1)
                row["seq"].append(args.hits / wall)
                row["cpu_seq"].append(cpu / args.hits * 1e6)
                row["refused"] += refused
                wall, cpu, refused = await run_hits(hit, args.hits, args.tasks)
                row["conc"].append(args.hits / wall)
                row["cpu_conc"].append(cpu / args.hits * 1e6)
                row["refused"] += refused
            print(
                f"  round {rnd + 1}/{args.rounds}: "
                + ", ".join(
                    f"{n} {results[n]['seq'][-1]:.0f}/{results[n]['conc'][-1]:.0f}" for n in names
                ),
                flush=True,
            )
        counts: dict[str, Any] = {}
        for name, hit in contenders.items():
            counts[name] = await count_commands(hit, admin, args.count_hits, args.tasks)
    finally:
        if not private:
            keys = [k async for k in admin.scan_iter(match=f"{prefix}*", count=1000)]
            if keys:
                await admin.delete(*keys)
        await admin.aclose()
        await close_all(closers)

    summary: dict[str, Any] = {}
    for name, row in results.items():
        summary[name] = {
            "seq_ops": median(row["seq"]),
            "conc_ops": median(row["conc"]),
            "client_cpu_us_seq": median(row["cpu_seq"]),
            "client_cpu_us_conc": median(row["cpu_conc"]),
            "refused": row["refused"],
            "seq_rounds": [round(v) for v in row["seq"]],
            "conc_rounds": [round(v) for v in row["conc"]],
            **{f"commands_{k}": v for k, v in counts[name].items()},
        }
    return summary


def table(summary: dict[str, Any], private: bool) -> list[str]:
    ym = summary.get("ymguard")
    lines = [
        f"{'contender':<15} {'seq ops/s':>10} {'conc ops/s':>11} {'ym/x seq':>9} "
        f"{'ym/x conc':>10} {'cli us/hit':>11} {'(conc)':>7} {'redis us':>9} {'cmds':>5} "
        f"{'rt/hit conc':>12}  commands per hit (Lua inner calls included)"
    ]
    for name, row in summary.items():
        ratio_seq = ym["seq_ops"] / row["seq_ops"] if ym else float("nan")
        ratio_conc = ym["conc_ops"] / row["conc_ops"] if ym else float("nan")
        cmds = " ".join(f"{k}={v:.3g}" for k, v in sorted(row["commands_per_hit"].items()))
        refused = f"  REFUSED={row['refused']}" if row["refused"] else ""
        lines.append(
            f"{name:<15} {row['seq_ops']:>10.0f} {row['conc_ops']:>11.0f} {ratio_seq:>9.2f} "
            f"{ratio_conc:>10.2f} {row['client_cpu_us_seq']:>11.1f} "
            f"{row['client_cpu_us_conc']:>7.1f} {row['commands_redis_usec']:>9.1f} "
            f"{row['commands_top_level']:>5.3g} {row['commands_reads_conc']:>12.2f}  "
            f"{cmds}{refused}"
        )
    lines.append(
        "ym/x: ymguard's ops/s over the row's; cli us/hit: client CPU per hit in this process "
        "(sequential, concurrent); redis us: Redis CPU per hit (commandstats usec of the "
        "commands sent); cmds: commands sent per hit; rt/hit conc: Redis read events per hit "
        "over the concurrent tasks (round trips; < 1 when pipelined)"
        + ("" if private else "; counts from a SHARED Redis: other clients' commands included")
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--hits", type=int, default=5000, help="hits per run and mode")
    parser.add_argument("-c", "--tasks", type=int, default=32, help="concurrent tasks")
    parser.add_argument("-r", "--rounds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=1_000_000, help="per second, never reached")
    parser.add_argument("--count-hits", type=int, default=1000, help="hits for the counting")
    parser.add_argument(
        "--contenders",
        default=(
            "floor-ping,floor-evalsha,floor-ym-store,ymguard,"
            "limits-moving,limits-sliding,limits-fixed"
        ),
    )
    parser.add_argument(
        "--redis-url", help="use this Redis instead of a private redis-server (never flushed)"
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    redis_pin: list[str] = []
    pin_note = "not pinned"
    if not args.no_pin and shutil.which("taskset") and len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[0]})
        if not args.redis_url:
            redis_pin = ["taskset", "-c", str(cpus[1])]
            pin_note = f"client pinned to CPU {cpus[0]}, private redis-server to CPU {cpus[1]}"
        else:
            pin_note = f"client pinned to CPU {cpus[0]}"

    proc = None
    if args.redis_url:
        url, private = args.redis_url, False
    else:
        proc, url = start_redis(redis_pin)
        private = True
    loop_name = "asyncio"
    try:
        if not args.no_uvloop:
            try:
                import uvloop

                runner: Any = uvloop.run
                loop_name = "uvloop"
            except ImportError:
                runner = asyncio.run
        else:
            runner = asyncio.run
        version = code_version()
        where = f"private redis-server {url}" if private else f"{url} (shared)"
        print(
            f"QPS window on Redis: {args.hits} hits sequential and over {args.tasks} tasks, "
            f"{args.rounds} rounds interleaved, medians; {where}; {loop_name}; {pin_note}; "
            f"ymguard at {version}"
        )
        summary = runner(bench(args, url, private))
    finally:
        if proc is not None:
            stop_redis(proc)
    print()
    lines = table(summary, private)
    print("\n".join(lines))
    if args.json:
        result = {
            "config": {
                "ymguard": version,
                "hits": args.hits,
                "tasks": args.tasks,
                "rounds": args.rounds,
                "limit": args.limit,
                "redis": "private" if private else url,
                "loop": loop_name,
                "pinning": pin_note,
            },
            "summary": summary,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(row["refused"] for row in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
