"""Flow behaviours and strategies: each one's cost beside a plain ``reject`` rule.

Every contender is one resource with one ``flow`` rule whose limit is never reached (the
check runs in full, never blocks), entered and exited through its chain
(``guard.chain(resource).enter/exit``, what the middleware and ``@guard.resource`` do):

- ``reject``: ``qps`` with ``behavior: reject`` (the sliding window): the baseline.
- ``warm_up``, ``queue``, ``warm_up_queue``: the shaping behaviours (``shaping.py``).
- ``concurrency``, ``concurrency_queue``: in-flight counting, without and with a line.
- ``relate``: ``strategy: relate`` (reads the referenced resource's count).
- ``chain``: ``strategy: chain`` around a reject rule, for a call entered from its
  ``ref_resource``.

Each round runs N calls spread over C tasks for every contender in turn (the order
rotates each round), on the memory store and on Redis; the table shows the median calls
per second, the ratio to ``reject`` on the same store, and on Redis the commands per
decision (``INFO commandstats`` deltas, counted in a separate pass). By default Redis is
a private ``redis-server`` on a free port (nothing else talks to it: the counts are
exact), stopped at the end.

    python -m bench.flow                     # 3000 calls, 16 tasks, 3 rounds
    python -m bench.flow -n 10000 -r 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from bench._common import code_version, median, redis_for

#: A limit no run reaches: every check decides in full and admits.
BIG = 10_000_000

RULES: dict[str, list[dict[str, Any]]] = {
    "reject": [{"qps": BIG}],
    "warm_up": [{"qps": BIG, "behavior": "warm_up"}],
    "queue": [{"qps": BIG, "behavior": "queue"}],
    "warm_up_queue": [{"qps": BIG, "behavior": "warm_up_queue"}],
    "concurrency": [{"concurrency": BIG}],
    "concurrency_queue": [{"concurrency": BIG, "behavior": "queue"}],
    "relate": [{"qps": BIG, "strategy": "relate", "ref_resource": "writes"}],
    "chain": [{"qps": BIG, "strategy": "chain", "ref_resource": "GET /entry"}],
}


def make_guard(storage: str, prefix: str) -> Any:
    from ymguard import Guard

    resources: dict[str, Any] = {name: {"flow": flow} for name, flow in RULES.items()}
    resources["writes"] = {}
    return Guard({"key_prefix": prefix, "resources": resources}, storage=storage)


async def run_calls(guard: Any, name: str, n: int, tasks: int) -> float:
    """Calls per second of ``n`` enter/exit pairs over ``tasks`` tasks."""
    from ymguard import Context

    chain = guard.chain(name)
    entry = Context("GET /entry")

    async def worker(count: int) -> None:
        for _ in range(count):
            ctx = Context(name, parent=entry)
            tokens = await chain.enter(ctx)
            await chain.exit(ctx, tokens)

    share, extra = divmod(n, tasks)
    started = time.perf_counter()
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(tasks)))
    return n / (time.perf_counter() - started)


#: The commands a client sends (the stats also count a script's inner ``redis.call``s).
TOP_LEVEL = ("cmdstat_evalsha", "cmdstat_eval")


async def commands_per_call(guard: Any, name: str, url: str, calls: int) -> tuple[float, float]:
    """Per enter+exit: scripts sent (EVALSHA/EVAL), and every command the server ran.

    From ``INFO commandstats`` before and after ``calls`` sequential calls; the ``INFO``
    itself is left out.
    """
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:

        async def totals() -> tuple[int, int]:
            stats = await client.info("commandstats")
            calls = {k: int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}
            return sum(v for k, v in calls.items() if k in TOP_LEVEL), sum(calls.values())

        sent0, ran0 = await totals()
        await run_calls(guard, name, calls, 1)
        sent1, ran1 = await totals()
        return (sent1 - sent0) / calls, (ran1 - ran0) / calls
    finally:
        await client.aclose()


async def bench(args: argparse.Namespace, url: str) -> dict[str, Any]:
    prefix = f"ymbench-flow-{uuid.uuid4().hex[:8]}"
    stores = {"memory": "memory://", "redis": url}
    guards = {kind: make_guard(uri, prefix) for kind, uri in stores.items()}
    names = list(RULES)
    rates: dict[str, dict[str, list[float]]] = {k: {n: [] for n in names} for k in stores}
    for guard in guards.values():  # warm up: scripts loaded, connections open
        for name in names:
            await run_calls(guard, name, 200, args.tasks)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for kind, guard in guards.items():
            for name in order:
                rates[kind][name].append(await run_calls(guard, name, args.n, args.tasks))
    commands = {name: await commands_per_call(guards["redis"], name, url, 500) for name in names}
    for guard in guards.values():
        await guard.aclose()
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    async for key in client.scan_iter(match=f"{prefix}:*"):
        await client.delete(key)
    await client.aclose()
    summary: dict[str, Any] = {"version": code_version(), "n": args.n, "tasks": args.tasks}
    for kind in stores:
        base = median(rates[kind]["reject"])
        summary[kind] = {
            name: {
                "calls_per_s": median(rates[kind][name]),
                "ratio_to_reject": median(rates[kind][name]) / base,
                "rounds": rates[kind][name],
            }
            for name in names
        }
    summary["redis_commands_per_decision"] = commands
    return summary


def table(summary: dict[str, Any]) -> list[str]:
    lines = [
        f"ymguard {summary['version']}: {summary['n']} calls over {summary['tasks']} tasks, "
        "medians of the rounds",
        f"{'rule':<20}{'memory/s':>12}{'x reject':>10}{'redis/s':>12}{'x reject':>10}"
        f"{'scripts':>9}{'inner':>7}",
    ]
    for name in RULES:
        mem, red = summary["memory"][name], summary["redis"][name]
        lines.append(
            f"{name:<20}{mem['calls_per_s']:>12.0f}{mem['ratio_to_reject']:>10.2f}"
            f"{red['calls_per_s']:>12.0f}{red['ratio_to_reject']:>10.2f}"
            f"{summary['redis_commands_per_decision'][name][0]:>9.2f}"
            f"{summary['redis_commands_per_decision'][name][1]:>7.1f}"
        )
    lines.append(
        "scripts: Redis commands sent per call (EVALSHA/EVAL: the decision, and a release at "
        "exit for concurrency); inner: every command the server ran for it, the scripts' "
        "redis.call()s included (INFO commandstats deltas)"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3000, help="calls per run")
    parser.add_argument("-c", "--tasks", type=int, default=16, help="concurrent tasks")
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    parser.add_argument("--json", type=Path, help="write everything measured here")
    args = parser.parse_args(argv)
    with redis_for(args.redis_url) as url:
        summary = asyncio.run(bench(args, url))
    print("\n".join(table(summary)))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
