"""HTTP overhead of ymguard vs slowapi: one FastAPI route under uvicorn, loaded with wrk.

The variants of ``bench.apps:app`` (plain, a do-nothing middleware, ymguard without a rule,
with one qps rule on memory, on Redis and on Redis with ``prefetch``, the full chain, and
slowapi on memory and Redis), each in its own uvicorn process (one worker, no access
log). All servers
start once; then each round runs wrk against every variant in turn (the order rotates
from round to round), and the table shows per variant the median requests/s, the median
p99 latency, the server's CPU time per request and the ratio to plain.

Before measuring, a sanity pass starts every limiting variant with a limit of 1/second and
checks that the second request is refused (429): the check really runs. After measuring,
the Redis variants' keys must exist under their unique prefixes (then they are deleted),
and every request must have run a script (a batch of them, with ``prefetch``).

    python -m bench.overhead                       # 5 s x 3 rounds, 32 connections
    python -m bench.overhead -d 10 -r 5 --json out.json
    python -m bench.overhead --gc-freeze           # every server freezes its start-up heap

The last columns are each server's garbage collector (``/_bench/gc``): full collections
per 10k requests, their share of its CPU, and the longest pause.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench._common import code_version, free_port, median, start_redis, stop_redis
from bench.apps import VARIANTS

ROOT = Path(__file__).resolve().parent.parent
PATH = "/items/42"
#: Issue 14's targets: capacity (CPU per request) as a ratio to plain.
TARGETS = {
    "ymguard-norule": 0.98,
    "ymguard-memory": 0.95,
    "ymguard-redis": 0.90,
    "ymguard-redis-prefetch": 0.90,  # the same rule with prefetch: true
    "ymguard-full-redis": 0.80,
}
TARGET_VS_SLOWAPI = 2.5
#: Variants with no limit to check in the sanity pass.
UNLIMITED = ("plain", "asgi-noop", "ymguard-norule")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """One wrk run against one variant."""

    variant: str
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    server_cpu_us_per_req: float | None
    redis_scripts_per_req: float | None = None
    redis_commands_per_req: float | None = None
    round_trips_per_req: float | None = None
    full_gcs_per_10k: float | None = None  # full (generation 2) collections
    young_gcs_per_10k: float | None = None  # young (generation 0) collections
    gc_share: float | None = None  # of the server's CPU time, in collections
    gc_longest_ms: float | None = None  # the longest collection


@dataclass
class Server:
    """One uvicorn process serving one variant."""

    variant: str
    port: int
    proc: subprocess.Popen[bytes]
    key_prefix: str
    log: Path
    redis_keys: int = 0
    problems: list[str] = field(default_factory=list)
    #: (scripts, commands, round trips) per request, one request at a time (Redis variants).
    sequential: tuple[float, float, float | None] | None = None
    runs: list[Run] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"


# -- processes ---------------------------------------------------------------------------


def pinning(enabled: bool) -> tuple[list[str], list[str], str]:
    """Command prefixes for the server and for wrk, and a sentence saying what was done."""
    taskset = shutil.which("taskset")
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled:
        return [], [], "not pinned (--no-pin)"
    if taskset is None or len(cpus) < 2:
        return [], [], f"not pinned (taskset {'missing' if taskset is None else 'found'}, "
        f"{len(cpus)} usable CPU(s))"
    server_cpu, wrk_cpu = cpus[0], cpus[1]
    return (
        [taskset, "-c", str(server_cpu)],
        [taskset, "-c", str(wrk_cpu)],
        f"uvicorn pinned to CPU {server_cpu}, wrk to CPU {wrk_cpu} (taskset); "
        "Redis and other processes are not pinned",
    )


def start_server(
    variant: str,
    prefix: list[str],
    redis_url: str,
    qps: int,
    logdir: Path,
    slowapi_middleware: bool = False,
    gc_freeze: bool = False,
) -> Server:
    port = free_port()
    key_prefix = f"ymbench-{variant}-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("YMGUARD_")}
    env.update(
        BENCH_VARIANT=variant,
        BENCH_QPS=str(qps),
        BENCH_REDIS_URL=redis_url,
        BENCH_KEY_PREFIX=key_prefix,
        BENCH_SLOWAPI_MIDDLEWARE="1" if slowapi_middleware else "0",
        BENCH_GC_FREEZE="1" if gc_freeze else "0",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    log = logdir / f"{variant}-{port}.log"
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "uvicorn",
        "bench.apps:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Server(variant, port, proc, key_prefix, log)


def get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def wait_ready(server: Server, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        try:
            if get(server.url, timeout=1.0) == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    stop(server)
    tail = server.log.read_text(errors="replace")[-2000:]
    raise SystemExit(f"{server.variant}: uvicorn did not become ready:\n{tail}")


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def log_problems(server: Server) -> list[str]:
    """Warnings and errors the server logged (a Redis outage means local fallback)."""
    try:
        text = server.log.read_text(errors="replace")
    except OSError:
        return []
    marks = ("unavailable", "Traceback", "ERROR", "WARNING", "is back after")
    return [line.strip() for line in text.splitlines() if any(m in line for m in marks)]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (from /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# -- wrk -----------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if rps is None or total is None:
        raise ValueError(f"cannot read wrk output:\n{output}")
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", output, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    errors = int(non2xx.group(1)) if non2xx else 0
    if sock:
        errors += sum(int(g) for g in sock.groups())
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "p50_ms": _ms(percentiles["50"]) if "50" in percentiles else float("nan"),
        "p99_ms": _ms(percentiles["99"]) if "99" in percentiles else float("nan"),
        "errors": errors,
    }


RANDOM_IDS_LUA = """\
-- every request asks for another item: /items/1 .. /items/1000000
request = function()
  return wrk.format("GET", "/items/" .. math.random(1, 1000000))
end
"""


def wrk(
    prefix: list[str],
    url: str,
    seconds: float,
    connections: int,
    threads: int,
    script: Path | None = None,
) -> str:
    cmd = [
        *prefix,
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        *(["-s", str(script)] if script else []),
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise SystemExit(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return done.stdout


def measure(server: Server, rnd: int, args: argparse.Namespace, prefix: list[str]) -> Run:
    if args.warmup > 0:
        wrk(prefix, server.url, args.warmup, args.connections, args.threads, args.wrk_script)
    on_redis = "redis" in server.variant
    counts0 = command_counts(args.redis_url) if on_redis else (0, 0)
    writes0 = pipe_writes(server)
    gc0 = gc_pauses(server)
    before = cpu_seconds(server.proc.pid)
    out = parse_wrk(
        wrk(prefix, server.url, args.duration, args.connections, args.threads, args.wrk_script)
    )
    after = cpu_seconds(server.proc.pid)
    gc1 = gc_pauses(server)
    writes1 = pipe_writes(server)
    scripts = commands = trips = None
    if on_redis:  # counters expire within ~1 s: look at once
        counts1 = command_counts(args.redis_url)
        server.redis_keys = max(
            server.redis_keys, len(redis_keys(args.redis_url, server.key_prefix))
        )
        if out["requests"]:
            scripts = (counts1[0] - counts0[0]) / out["requests"]
            commands = (counts1[1] - counts0[1]) / out["requests"]
            if writes0 is not None and writes1 is not None:
                trips = (writes1 - writes0) / out["requests"]
    cpu = None
    if before is not None and after is not None and out["requests"]:
        cpu = (after - before) / out["requests"] * 1e6
    full_gcs = young_gcs = gc_share = gc_longest = None
    if gc0 is not None and gc1 is not None and out["requests"]:
        full_gcs = (gc1["collections"][2] - gc0["collections"][2]) / out["requests"] * 10_000
        young_gcs = (gc1["collections"][0] - gc0["collections"][0]) / out["requests"] * 10_000
        gc_longest = gc1["longest_s"] * 1000
        if before is not None and after is not None and after > before:
            gc_share = (sum(gc1["seconds"]) - sum(gc0["seconds"])) / (after - before)
    return Run(
        variant=server.variant,
        round=rnd,
        rps=out["rps"],
        p50_ms=out["p50_ms"],
        p99_ms=out["p99_ms"],
        requests=out["requests"],
        errors=out["errors"],
        server_cpu_us_per_req=cpu,
        redis_scripts_per_req=scripts,
        redis_commands_per_req=commands,
        round_trips_per_req=trips,
        full_gcs_per_10k=full_gcs,
        young_gcs_per_10k=young_gcs,
        gc_share=gc_share,
        gc_longest_ms=gc_longest,
    )


def gc_pauses(server: Server) -> dict[str, Any] | None:
    """The server's garbage collector so far (``/_bench/gc``; its longest pause is reset)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/_bench/gc", timeout=5) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer
    except (OSError, ValueError):
        return None


# -- Redis -----------------------------------------------------------------------------------


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def redis_keys(url: str, key_prefix: str) -> list[bytes]:
    client = redis_client(url)
    try:
        return list(client.scan_iter(match=f"*{key_prefix}*", count=1000))
    finally:
        client.close()


#: Commands a bench itself sends to look (not counted).
_PROBES = ("info", "scan", "ping", "client", "hello", "del", "unlink", "command")


def command_counts(url: str) -> tuple[int, int]:
    """``(EVALSHA + EVAL calls, every command run)`` so far, scripts' inner calls included.

    The probe's own commands (INFO, SCAN, ...) are left out; on a shared Redis the counts
    include every other client's.
    """
    client = redis_client(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    scripts = total = 0
    for name, value in stats.items():
        command = name.removeprefix("cmdstat_")
        if command.split("|")[0] in _PROBES:
            continue
        total += int(value["calls"])
        if command in ("evalsha", "eval"):
            scripts += int(value["calls"])
    return scripts, total


#: Requests sent one at a time to count each Redis variant's commands and round trips.
SEQUENTIAL = 200


def count_sequential(server: Server, redis_url: str) -> tuple[float, float, float | None]:
    """``(scripts, commands, round trips)`` per request, one request in flight at a time.

    Under wrk the pipelined connection carries many requests' commands in one write, so
    writes per request there say how well it batches; one request at a time, every write
    is a round trip of that request's own.
    """
    scripts0, commands0 = command_counts(redis_url)
    writes0 = pipe_writes(server)
    for _ in range(SEQUENTIAL):
        get(server.url)
    writes1 = pipe_writes(server)
    scripts1, commands1 = command_counts(redis_url)
    trips = None
    if writes0 is not None and writes1 is not None:
        trips = (writes1 - writes0) / SEQUENTIAL
    return (scripts1 - scripts0) / SEQUENTIAL, (commands1 - commands0) / SEQUENTIAL, trips


def pipe_writes(server: Server) -> int | None:
    """Round trips a ymguard variant has sent on its pipelined Redis connection so far."""
    if not server.variant.startswith("ymguard"):
        return None
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{server.port}/_bench/writes", timeout=5
        ) as resp:
            return int(json.loads(resp.read())["writes"])
    except (OSError, ValueError, KeyError):
        return None


def delete_keys(url: str, key_prefix: str) -> None:
    client = redis_client(url)
    try:
        keys = list(client.scan_iter(match=f"*{key_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# -- the run ---------------------------------------------------------------------------


def sanity(variants: list[str], prefix: list[str], args: argparse.Namespace, logdir: Path) -> None:
    """Each limiting variant with a 1/second limit refuses the second request."""
    limited = [v for v in variants if v not in UNLIMITED]
    servers = [
        start_server(v, prefix, args.redis_url, 1, logdir, args.slowapi_middleware == "on")
        for v in limited
    ]
    try:
        for server in servers:
            wait_ready(server)  # the first request (200) is spent here
            status = get(server.url)
            if status != 429:
                raise SystemExit(
                    f"sanity: {server.variant} with a 1/s limit answered {status} to the "
                    "2nd request, not 429: its limiter is not checking"
                )
            print(f"  sanity: {server.variant}: 1/s limit -> 2nd request 429 (ok)")
    finally:
        for server in servers:
            stop(server)
            if "redis" in server.variant:
                delete_keys(args.redis_url, server.key_prefix)


def summarize(servers: list[Server]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for server in servers:
        runs = server.runs
        cpu = [r.server_cpu_us_per_req for r in runs if r.server_cpu_us_per_req is not None]
        rows[server.variant] = {
            "rps": median([r.rps for r in runs]),
            "p50_ms": median([r.p50_ms for r in runs]),
            "p99_ms": median([r.p99_ms for r in runs]),
            "cpu_us_per_req": median(cpu) if cpu else None,
            "errors": sum(r.errors for r in runs),
            "rounds_rps": [round(r.rps, 1) for r in runs],
            "redis_scripts_per_req_min": min(
                (r.redis_scripts_per_req for r in runs if r.redis_scripts_per_req is not None),
                default=None,
            ),
            "redis_scripts_per_req": server.sequential[0] if server.sequential else None,
            "redis_commands_per_req": server.sequential[1] if server.sequential else None,
            "round_trips_per_req": server.sequential[2] if server.sequential else None,
            "writes_per_req_under_load": _median_of(r.round_trips_per_req for r in runs),
            "full_gcs_per_10k": _median_of(r.full_gcs_per_10k for r in runs),
            "young_gcs_per_10k": _median_of(r.young_gcs_per_10k for r in runs),
            "gc_share": _median_of(r.gc_share for r in runs),
            "gc_longest_ms": max(
                (r.gc_longest_ms for r in runs if r.gc_longest_ms is not None), default=None
            ),
        }
    plain = rows.get("plain", {}).get("rps")
    for variant, row in rows.items():
        row["ratio_to_plain"] = row["rps"] / plain if plain else None
        # the ratio within each round (the runs of one round are closest in time)
        if plain:
            per_round = []
            plain_runs = {r.round: r.rps for s in servers if s.variant == "plain" for r in s.runs}
            for s in servers:
                if s.variant == variant:
                    per_round = [r.rps / plain_runs[r.round] for r in s.runs]
            row["ratio_to_plain_median_of_rounds"] = median(per_round)
    # Capacity: plain's CPU per request over the variant's, within each round.
    plain_cpu = {
        r.round: r.server_cpu_us_per_req
        for s in servers
        if s.variant == "plain"
        for r in s.runs
        if r.server_cpu_us_per_req
    }
    for s in servers:
        ratios = [
            plain_cpu[r.round] / r.server_cpu_us_per_req
            for r in s.runs
            if r.server_cpu_us_per_req and r.round in plain_cpu
        ]
        rows[s.variant]["cpu_ratio_to_plain"] = median(ratios) if ratios else None
    return rows


def _median_of(values: Any) -> float | None:
    kept = [v for v in values if v is not None]
    return median(kept) if kept else None


def _percent(share: float | None) -> float | None:
    return None if share is None else share * 100


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        f"{'variant':<20} {'req/s':>7} {'p99 ms':>7} {'cpu us/req':>10} {'capacity':>9} "
        f"{'rps ratio':>9} {'scripts':>8} {'commands':>8} {'trips':>6} {'young gc':>8} "
        f"{'full gc':>7} "
        f"{'gc cpu':>6} {'gc max':>6}  req/s per round",
    ]
    for variant, row in rows.items():
        per_round = " ".join(f"{v:.0f}" for v in row["rounds_rps"])
        err = f"  ERRORS={row['errors']}" if row["errors"] else ""
        lines.append(
            f"{variant:<20} {row['rps']:>7.0f} {row['p99_ms']:>7.2f} "
            f"{_fmt(row['cpu_us_per_req'], '.0f'):>10} "
            f"{_fmt(row.get('cpu_ratio_to_plain'), '.2f'):>9} "
            f"{_fmt(row.get('ratio_to_plain_median_of_rounds'), '.2f'):>9} "
            f"{_fmt(row.get('redis_scripts_per_req'), '.2f'):>8} "
            f"{_fmt(row.get('redis_commands_per_req'), '.1f'):>8} "
            f"{_fmt(row.get('round_trips_per_req'), '.2f'):>6} "
            f"{_fmt(row.get('young_gcs_per_10k'), '.1f'):>8} "
            f"{_fmt(row.get('full_gcs_per_10k'), '.1f'):>7} "
            f"{_fmt(_percent(row.get('gc_share')), '.1f'):>5}% "
            f"{_fmt(row.get('gc_longest_ms'), '.0f'):>6}  {per_round}{err}"
        )
    lines.append(
        "capacity: plain's server CPU per request / the variant's (median of rounds); "
        f"scripts, commands (inside scripts too), round trips: per request on Redis, "
        f"counted over {SEQUENTIAL} requests sent one at a time; young gc, full gc: the "
        "garbage collector's young and full collections per 10k requests, gc cpu: its "
        "share of the server's CPU, gc max: its longest pause in ms (of every round)"
    )
    if "ymguard-redis" in rows and "slowapi-redis" in rows:
        ratio = rows["ymguard-redis"]["rps"] / rows["slowapi-redis"]["rps"]
        lines.append(f"ymguard-redis / slowapi-redis: {ratio:.2f}x")
    if "ymguard-memory" in rows and "slowapi-memory" in rows:
        ratio = rows["ymguard-memory"]["rps"] / rows["slowapi-memory"]["rps"]
        lines.append(f"ymguard-memory / slowapi-memory: {ratio:.2f}x")
    return lines


def check_targets(rows: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for variant, target in TARGETS.items():
        ratio = rows.get(variant, {}).get("cpu_ratio_to_plain")
        if ratio is not None:
            verdict = "ok" if ratio >= target else "MISSED"
            out.append(
                f"target {variant} >= {target:.2f} of plain (capacity): {ratio:.2f} {verdict}"
            )
    trips = rows.get("ymguard-full-redis", {}).get("round_trips_per_req")
    if trips is not None:
        verdict = "ok" if trips <= 2.05 else "MISSED"
        out.append(f"target ymguard-full-redis 2 round trips per request: {trips:.2f} {verdict}")
    if "ymguard-redis" in rows and "slowapi-redis" in rows:
        ratio = rows["ymguard-redis"]["rps"] / rows["slowapi-redis"]["rps"]
        verdict = "ok" if ratio >= TARGET_VS_SLOWAPI else "MISSED"
        out.append(
            f"target ymguard-redis >= {TARGET_VS_SLOWAPI}x slowapi-redis: {ratio:.2f}x {verdict}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("-t", "--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("-w", "--warmup", type=float, default=1.0, help="seconds before each run")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of variants"
    )
    parser.add_argument(
        "--redis-url", help="use this Redis (counts include other clients) instead of a private one"
    )
    parser.add_argument("--qps", type=int, default=10_000_000, help="the never-reached limit")
    parser.add_argument(
        "--random-ids",
        action="store_true",
        help="each request asks for a random /items/{id} (route caches and per-URL keys miss)",
    )
    parser.add_argument(
        "--slowapi-middleware",
        choices=("on", "off"),
        default="off",
        help="off (default): slowapi's quick start, the decorator and its exception handler; "
        "on: add SlowAPIMiddleware too (its global-limits setup, a BaseHTTPMiddleware)",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="every server freezes its start-up heap (gc.freeze() once the app is built), "
        "as a tuned service does: full collections no longer walk FastAPI's objects",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--no-sanity", action="store_true", help="skip the 1/s sanity check")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; use {', '.join(VARIANTS)}")
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed")
    private = None
    if args.redis_url is None:
        private, args.redis_url = start_redis()
    try:
        redis_client(args.redis_url).ping()
    except Exception as exc:
        parser.error(f"Redis at {args.redis_url} does not answer ({exc})")
    try:
        return _main(args, variants)
    finally:
        if private is not None:
            stop_redis(private)


def _main(args: argparse.Namespace, variants: list[str]) -> int:

    server_prefix, wrk_prefix, pin_note = pinning(not args.no_pin)
    version = code_version()
    path = "/items/<random id>" if args.random_ids else PATH
    print(
        f"ymguard overhead: GET {path}, wrk -t{args.threads} -c{args.connections} "
        f"-d{round(args.duration)}s --latency (+{args.warmup:g}s warm-up), {args.rounds} "
        f"rounds interleaved, medians; {pin_note}; uvicorn 1 worker, --no-access-log; "
        f"slowapi middleware {args.slowapi_middleware}; "
        f"gc.freeze() {'on' if args.gc_freeze else 'off'}; ymguard at {version}"
    )
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"ymbench-{uuid.uuid4().hex[:8]}"
    logdir.mkdir(parents=True)
    args.wrk_script = None
    if args.random_ids:
        args.wrk_script = logdir / "random_ids.lua"
        args.wrk_script.write_text(RANDOM_IDS_LUA)

    if not args.no_sanity:
        sanity(variants, server_prefix, args, logdir)

    servers: list[Server] = []
    key_check: dict[str, int] = {}
    try:
        for variant in variants:
            servers.append(
                start_server(
                    variant,
                    server_prefix,
                    args.redis_url,
                    args.qps,
                    logdir,
                    args.slowapi_middleware == "on",
                    args.gc_freeze,
                )
            )
        for server in servers:
            wait_ready(server)
        for rnd in range(args.rounds):
            shift = rnd % len(servers)
            for server in servers[shift:] + servers[:shift]:
                run = measure(server, rnd, args, wrk_prefix)
                server.runs.append(run)
                print(
                    f"  round {rnd + 1}/{args.rounds} {server.variant:<15} "
                    f"{run.rps:8.0f} req/s  p99 {run.p99_ms:6.2f} ms"
                    + (f"  ERRORS {run.errors}" if run.errors else ""),
                    flush=True,
                )
        for server in servers:
            if "redis" in server.variant:
                key_check[server.variant] = server.redis_keys
                server.sequential = count_sequential(server, args.redis_url)
    finally:
        for server in servers:
            stop(server)
        for server in servers:
            if "redis" in server.variant:
                delete_keys(args.redis_url, server.key_prefix)
            server.problems = log_problems(server)
        if not any(server.problems for server in servers):
            shutil.rmtree(logdir, ignore_errors=True)

    rows = summarize(servers)
    print()
    lines = print_table(rows)
    problems: list[str] = []
    for variant, count in key_check.items():
        scripts = rows[variant]["redis_scripts_per_req_min"]
        if variant.endswith("prefetch"):  # a script per batch of permits, not per request
            ok = count > 0 and scripts is not None and scripts > 0
            verdict = "ok (a batch of permits per script)" if ok else "PROBLEM: Redis unused"
        else:
            ok = count > 0 and scripts is not None and scripts >= 0.99
            verdict = "ok" if ok else "PROBLEM: the variant did not use Redis for every request"
        if not ok:
            problems.append(variant)
        lines.append(
            f"{variant} on Redis: {count} key(s) under its prefix right after its runs, "
            f"EVALSHA per request >= {scripts or 0:.2f} {verdict}"
        )
    for server in servers:
        for line in server.problems[:5]:
            lines.append(f"{server.variant} server log ({server.log}): {line}")
    lines += check_targets(rows)
    print("\n".join(lines))

    if args.json:
        result = {
            "config": {
                "ymguard": version,
                "slowapi_middleware": args.slowapi_middleware,
                "gc_freeze": args.gc_freeze,
                "path": path,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "connections": args.connections,
                "threads": args.threads,
                "rounds": args.rounds,
                "pinning": pin_note,
                "redis_url": args.redis_url,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            },
            "summary": rows,
            "redis_keys_right_after_runs": key_check,
            "targets": check_targets(rows),
            "runs": [asdict(r) for s in servers for r in s.runs],
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    problems += [s.variant for s in servers if s.problems]
    errors = any(row["errors"] for row in rows.values())
    return 1 if problems or errors else 0


if __name__ == "__main__":
    sys.exit(main())
