"""A separate process for the semaphore tests: ``python -m tests.apps.semaphore_worker``.

``crowd URL PREFIX TASKS PERMITS``: print ``ready``, wait for the test's go (a Redis list),
then run TASKS tasks that each hold a permit of ``crowd`` for a moment, counting in Redis how
many hold one at once in every process; print ``{"acquired": n, "peak": p}`` as JSON.

``hold URL PREFIX COUNT LEASE``: take COUNT permits of ``doomed`` (lease LEASE seconds),
print ``held``, and sleep until killed.
"""

from __future__ import annotations

import asyncio
import json
import sys

import redis.asyncio as aioredis

from ymguard import Semaphore
from ymguard.storage import store_from_uri

# INCR the running count and keep its peak, in one step.
_ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


async def crowd(url: str, prefix: str, tasks: int, permits: int) -> None:
    store = store_from_uri(url, key_prefix=prefix)
    sem = Semaphore("crowd", permits, lease_seconds=5, storage=store)
    probe = aioredis.Redis.from_url(url)
    running, peak = f"{prefix}:running", f"{prefix}:peak"
    print("ready", flush=True)
    await probe.blpop([f"{prefix}:go"], timeout=20)
    acquired = 0

    async def one() -> None:
        nonlocal acquired
        async with sem.hold(timeout=30):
            await probe.eval(_ENTER, 2, running, peak)
            await asyncio.sleep(0.005)
            await probe.decr(running)
            acquired += 1

    await asyncio.gather(*(one() for _ in range(tasks)))
    print(json.dumps({"acquired": acquired, "peak": int(await probe.get(peak) or 0)}), flush=True)
    await probe.aclose()
    await store.aclose()


async def hold(url: str, prefix: str, count: int, lease: float) -> None:
    store = store_from_uri(url, key_prefix=prefix)
    sem = Semaphore("doomed", 5, lease_seconds=lease, storage=store)
    permits = [await sem.acquire() for _ in range(count)]
    print("held", len(permits), flush=True)
    await asyncio.sleep(3600)


def main(argv: list[str]) -> None:
    mode, url, prefix = argv[:3]
    if mode == "crowd":
        asyncio.run(crowd(url, prefix, int(argv[3]), int(argv[4])))
    else:
        asyncio.run(hold(url, prefix, int(argv[3]), float(argv[4])))


if __name__ == "__main__":
    main(sys.argv[1:])
