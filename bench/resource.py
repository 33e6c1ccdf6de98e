"""``@guard.resource`` on a plain async function: µs per call over the bare call.

Contenders, on one event loop, interleaved round by round, timed in chunks of 200 calls;
the fastest chunk is the figure (on a shared machine every disturbance only adds, and a
long run is preempted many times):

- ``bare``: ``await func()``, the function alone.
- ``no rule``: ``@guard.resource`` on a resource without rules (statistics only).
- ``memory qps``: ``@guard.resource`` with one ``flow`` qps rule on the memory store
  (``qps: 10_000_000``: the check runs, never refuses).

Issue 14's target: one memory qps rule costs at most 1.5 µs per call over a bare call.

    python -m bench.resource                  # 20000 calls, 9 rounds
    python -m bench.resource -n 50000 -r 15
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from bench._common import code_version
from ymguard import Guard

TARGET_US = 1.5


async def work(x: int) -> int:
    """The guarded function: as little as a function can do."""
    return x


#: Calls timed together: short enough that most chunks run without being preempted on a
#: busy machine, long enough to dwarf the clock's own cost.
CHUNK = 200


async def per_call_us(func: Callable[[int], Awaitable[int]], n: int) -> float:
    """µs per call: the fastest of the chunks of :data:`CHUNK` calls (``n`` calls in all)."""
    best = float("inf")
    clock = time.perf_counter
    for start in range(0, n, CHUNK):
        began = clock()
        for i in range(start, start + CHUNK):
            await func(i)
        best = min(best, clock() - began)
    return best / CHUNK * 1e6


async def bench(n: int, rounds: int) -> dict[str, float]:
    guard = Guard(
        {"resources": {"memory-qps": {"flow": [{"qps": 10_000_000}]}}}, storage="memory://"
    )
    contenders: dict[str, Callable[[int], Awaitable[int]]] = {
        "bare": work,
        "no rule": guard.resource("no-rule")(work),
        "memory qps": guard.resource("memory-qps")(work),
    }
    best = dict.fromkeys(contenders, float("inf"))
    for func in contenders.values():  # warm up
        await per_call_us(func, min(n, 2000))
    for _ in range(rounds):
        for name, func in contenders.items():
            best[name] = min(best[name], await per_call_us(func, n))
    await guard.aclose()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20_000, help="calls per round and contender")
    parser.add_argument("-r", "--rounds", type=int, default=9)
    args = parser.parse_args()
    best = asyncio.run(bench(args.n, args.rounds))
    print(
        f"@guard.resource on an async function, {args.n} calls x {args.rounds} rounds "
        f"interleaved, fastest chunk of {CHUNK}; ymguard at {code_version()}"
    )
    bare = best["bare"]
    for name, us in best.items():
        print(f"  {name:<11} {us:6.2f} µs/call   +{us - bare:5.2f} µs over bare")
    over = best["memory qps"] - bare
    verdict = "ok" if over <= TARGET_US else "MISSED"
    print(f"target memory qps <= {TARGET_US} µs over bare: {over:.2f} {verdict}")


if __name__ == "__main__":
    main()
