"""Hot parameters: the cost of a ``param_flow`` decision beside a plain ``flow`` reject rule.

Contenders, each one resource's chain entered and left directly (no ASGI, no HTTP, so the
rule's own cost is what is measured), on the memory store and on a private Redis:

- ``flow reject``: ``flow: [{qps: 10000000}]``, the sliding window (the reference);
- ``param_flow reject``: ``param_flow: [{param: id, qps: 10000000}]``, a token bucket per
  value, the calls spread over ``--values`` distinct values;
- ``param_flow queue``: the same with ``behavior: queue`` (pacing; at this rate no call
  ever waits, so only the decision is timed).

Rounds are interleaved so that a noisy neighbour slows every contender alike; the table
shows the median microseconds per decision and the ratio to ``flow reject`` on the same
store, and the best round with its ratio (on a loaded machine the least disturbed round
is the better estimate). On Redis (a private ``redis-server``, so ``INFO commandstats`` is
exact) it also prints the Redis commands per decision: EVALSHA calls (round trips: 1 per
decision) and all commands, the script's inner calls included.

    python -m bench.param_flow                    # 5000 decisions x 5 rounds
    python -m bench.param_flow -n 20000 -r 7 --values 1000 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import redis as redis_sync

from bench._common import code_version, median, start_redis, stop_redis
from ymguard import Context, Guard
from ymguard.storage import Store, store_from_uri

RESOURCE = "GET /items/{id}"
HUGE = 10_000_000
CONTENDERS: dict[str, dict[str, Any]] = {
    "flow reject": {"flow": [{"qps": HUGE}]},
    "param_flow reject": {"param_flow": [{"param": "id", "qps": HUGE}]},
    "param_flow queue": {"param_flow": [{"param": "id", "qps": HUGE, "behavior": "queue"}]},
}


async def timed(guard: Guard, n: int, values: int) -> float:
    """Microseconds per decision over ``n`` sequential enter+exit of the resource."""
    chain = guard.chain(RESOURCE)
    params = [{"id": str(i)} for i in range(values)]
    started = time.perf_counter()
    for i in range(n):
        ctx = Context(RESOURCE, "", params[i % values])
        await chain.exit(ctx, await chain.enter(ctx))
    return (time.perf_counter() - started) / n * 1e6


def commandstats(url: str) -> dict[str, int]:
    client = redis_sync.Redis.from_url(url)
    try:
        return {k: int(v["calls"]) for k, v in client.info("commandstats").items()}
    finally:
        client.close()


async def redis_commands(store: Store, url: str, rules: dict[str, Any], n: int) -> dict[str, float]:
    """EVALSHA calls and all commands per decision of one contender (after a warm-up)."""
    guard = Guard({"resources": {RESOURCE: rules}}, storage=store)
    await timed(guard, 10, 10)  # loads the script
    before = commandstats(url)
    await timed(guard, n, 100)
    after = commandstats(url)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta.pop("cmdstat_info", None)
    return {
        "evalsha": delta.get("cmdstat_evalsha", 0) / n,
        "all": sum(delta.values()) / n,
    }


async def main(n: int, rounds: int, values: int, json_path: str | None) -> None:
    proc, url = start_redis()
    prefix = "bench-param-" + uuid.uuid4().hex[:8]
    stores = {
        "memory": store_from_uri("memory://"),
        "redis": store_from_uri(url, key_prefix=prefix),
    }
    results: dict[str, dict[str, list[float]]] = {s: {c: [] for c in CONTENDERS} for s in stores}
    commands: dict[str, dict[str, float]] = {}
    try:
        guards = {
            (s, c): Guard({"resources": {RESOURCE: rules}}, storage=store)
            for s, store in stores.items()
            for c, rules in CONTENDERS.items()
        }
        for guard in guards.values():  # warm-up: scripts loaded, tables made
            await timed(guard, min(n, 500), values)
        for _ in range(rounds):
            for (s, c), guard in guards.items():
                results[s][c].append(await timed(guard, n, values))
        for c, rules in CONTENDERS.items():
            commands[c] = await redis_commands(stores["redis"], url, rules, min(n, 2000))
    finally:
        for store in stores.values():
            await store.close_tasks()
            await store.aclose()
        stop_redis(proc)

    print(f"# ymguard {code_version()}: {n} decisions x {rounds} rounds, {values} values")
    print(f"{'store':8} {'contender':20} {'median us':>10} {'ratio':>6}", end="")
    print(f" {'best us':>8} {'ratio':>6}  rounds")
    for s, by in results.items():
        ref, best_ref = median(by["flow reject"]), min(by["flow reject"])
        for c, runs in by.items():
            m, best = median(runs), min(runs)
            per_round = " ".join(f"{r:.1f}" for r in runs)
            print(f"{s:8} {c:20} {m:10.1f} {m / ref:6.2f}", end="")
            print(f" {best:8.1f} {best / best_ref:6.2f}  {per_round}")
    print("\nRedis commands per decision (private redis-server, INFO commandstats):")
    for c, found in commands.items():
        print(f"  {c:20} EVALSHA {found['evalsha']:.2f}   all (inner calls too) {found['all']:.2f}")
    if json_path:
        found = {"version": code_version(), "us": results, "commands": commands}
        Path(json_path).write_text(json.dumps(found))  # noqa: ASYNC240 -- after the runs


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=5000, help="decisions per round")
    parser.add_argument("-r", "--rounds", type=int, default=5)
    parser.add_argument("--values", type=int, default=100, help="distinct parameter values")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.rounds, args.values, args.json_path))


if __name__ == "__main__":
    cli()
