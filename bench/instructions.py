"""Instructions per request of each variant's ASGI app, counted by valgrind: repeatable.

On a shared machine the HTTP bench's ratios move by 10-20% from run to run; instruction
counts do not depend on what else runs. Each variant of ``bench.apps`` is called in
process (no HTTP server, no client) by 32 concurrent tasks; the process runs twice under
``valgrind --tool=cachegrind --cache-sim=no`` (``n`` and ``4 n`` requests) and the
difference over ``3 n`` requests is the figure: start-up and imports cancel out. Only
user-space instructions count: the kernel's share (socket writes and reads to Redis) is
left out, and on Redis how many requests share a write depends on timing (a few % of
spread). Redis variants talk to a private ``redis-server`` on a free port.

``--against PATH`` measures another checkout of the project too (``git worktree add
/tmp/old <commit>``), side by side in one run: the change per variant, before and after.

    python -m bench.instructions
    python -m bench.instructions --variants plain,ymguard-memory,ymguard-redis
    python -m bench.instructions --against /tmp/old --json out.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench._common import code_version, start_redis, stop_redis
from bench.apps import VARIANTS

ROOT = Path(__file__).resolve().parent.parent
#: The program each measured process runs: ``bench.apps`` from the checkout on its path.
CHILD = """
import asyncio, os, sys
variant, n = sys.argv[1], int(sys.argv[2])
os.environ["BENCH_VARIANT"] = variant
import bench.apps as apps
app = apps.app
PATH = "/items/42"
SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
         "method": "GET", "scheme": "http", "path": PATH, "raw_path": PATH.encode(),
         "query_string": b"", "root_path": "", "headers": [(b"host", b"bench")],
         "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

class Receive:  # a server's receive: the body, then nothing until the client leaves
    def __init__(self):
        self.sent = False
    async def __call__(self):
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.get_running_loop().create_future()

async def send(message):
    if message["type"] == "http.response.start" and message["status"] != 200:
        raise SystemExit(f"{variant}: status {message['status']}")

async def worker(k):
    for _ in range(k):
        await app(dict(SCOPE), Receive(), send)

async def main():
    await asyncio.gather(*(worker(n // 32) for _ in range(32)))

asyncio.run(main())
"""
CONCURRENCY = 32


def count(checkout: Path, variant: str, n: int, env: dict[str, str]) -> int:
    """Instructions the child runs for ``n`` requests of ``variant`` from ``checkout``."""
    done = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            "-c",
            CHILD,
            variant,
            str(n),
        ],
        cwd=checkout,
        env={**env, "PYTHONPATH": str(checkout)},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{variant} ({checkout}) failed:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def knows(checkout: Path, variant: str) -> bool:
    """Whether ``checkout``'s ``bench/apps.py`` has ``variant``."""
    return f'"{variant}"' in (checkout / "bench" / "apps.py").read_text(encoding="utf-8")


def per_request(checkout: Path, variant: str, n: int, env: dict[str, str]) -> float:
    """Instructions per request: (count(4 n) - count(n)) / 3 n."""
    return (count(checkout, variant, 4 * n, env) - count(checkout, variant, n, env)) / (3 * n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("-n", "--requests", type=int, default=640, help="the shorter run")
    parser.add_argument("--against", type=Path, help="another checkout, measured side by side")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(unknown)}")
    if "plain" not in variants:
        variants.insert(0, "plain")
    n = max(CONCURRENCY, args.requests // CONCURRENCY * CONCURRENCY)
    checkouts = [ROOT] + ([args.against.resolve()] if args.against else [])
    redis_proc, redis_url = start_redis()
    # One hash seed for every run: with a random one, dicts and sets lay out differently
    # from run to run (full chain on memory, one request at a time, f47f246: 513.1k and
    # 514.5k instructions per request with random seeds, 514.5k and 514.9k with seed 0).
    env = {
        **os.environ,
        "BENCH_REDIS_URL": redis_url,
        "BENCH_KEY_PREFIX": "ymbench-ir",
        "PYTHONHASHSEED": "0",
    }
    try:
        # A variant the other checkout's bench/apps.py does not have yet is measured here only.
        # A variant's runs of both checkouts are queued together, to run side by side. On
        # Redis the checkout measured first still reads some 1% more on the full chain
        # (4-7k instructions per request at a1799e6 and 9492dc2, either way round): compare
        # Redis variants both ways round (--against each other) before trusting 1-2%.
        jobs = {(c, v): (c, v) for v in variants for c in checkouts if knows(c, v)}
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {key: pool.submit(per_request, c, v, n, env) for key, (c, v) in jobs.items()}
            found = {key: f.result() for key, f in futures.items()}
    finally:
        stop_redis(redis_proc)
    print(
        f"instructions per request (valgrind, user space), {CONCURRENCY} concurrent tasks, "
        f"{3 * n} requests counted; ymguard at {code_version()}"
    )
    header = f"{'variant':<22} {'instructions':>12} {'over plain':>11} {'vs plain':>9}"
    if args.against:
        header += f" {'against':>12} {'change':>8}"
    print(header)
    plain = found[(ROOT, "plain")]
    rows = []
    for v in variants:
        ours = found[(ROOT, v)]
        row = {"variant": v, "instructions": round(ours), "vs_plain": plain / ours}
        line = f"{v:<22} {ours:>12,.0f} {ours - plain:>+11,.0f} {plain / ours:>9.3f}"
        if args.against and (checkouts[1], v) in found:
            theirs = found[(checkouts[1], v)]
            row["against"] = round(theirs)
            line += f" {theirs:>12,.0f} {(ours - theirs) / theirs:>+8.1%}"
        elif args.against:
            line += f" {'-':>12} {'new':>8}"
        rows.append(row)
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"version": code_version(), "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
