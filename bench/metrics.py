"""The cost of ymguard's OpenTelemetry metrics on the request path: one run, side by side.

Three variants of one FastAPI route (``GET /items/{item_id}``), each in its own uvicorn
process (one worker, no access log), loaded in turn with wrk, the order rotating from
round to round:

- ``plain``: FastAPI alone;
- ``metrics-off``: ``GuardMiddleware`` with one ``flow`` qps rule (never reached), and
  ``Guard(metrics=False)``;
- ``metrics-on``: the same with ``Guard(metrics=provider)``, an OpenTelemetry SDK
  ``MeterProvider`` with the Prometheus exporter's reader and no exemplars, as the demo
  wires it (every call counts ``ymguard.requests`` and ``ymguard.active_requests`` in
  process and records ``ymguard.request.duration`` through the SDK). The app is scraped
  once at the end, to check that the calls were counted;
- ``metrics-on-no-durations``: the same with ``guard.metrics.record_durations = False``
  (no ``ymguard.request.duration``: what the rest of the metrics cost).

The table shows per variant the median requests/s, p99 latency, server CPU time per
request (from /proc) and the ratio to ``metrics-off``; the target is ``metrics-on`` within
5% of ``metrics-off`` (ratio >= 0.95) in requests/s.

    python -m bench.metrics                    # memory store, 5 s x 3 rounds, 32 connections
    python -m bench.metrics --store redis -d 10 -r 5 --json out.json
    python -m bench.metrics --in-process       # the ASGI apps called in process: CPU per call

The same module is the benchmarked app: ``uvicorn bench.metrics:app`` with
``BENCH_METRICS_VARIANT`` (one of :data:`VARIANTS`),
``BENCH_STORE`` (``memory://`` or a Redis URL) and ``BENCH_KEY_PREFIX``.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import code_version, free_port, median

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("plain", "metrics-off", "metrics-on", "metrics-on-no-durations")
RESOURCE = "GET /items/{item_id}"
PATH = "/items/42"
TARGET = 0.95
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the app (imported by uvicorn in each server process) ---------------------------------


def create_app() -> Any:
    """The benchmarked app of ``BENCH_METRICS_VARIANT``."""
    from fastapi import FastAPI, Response

    variant = os.environ.get("BENCH_METRICS_VARIANT", "plain")
    store = os.environ.get("BENCH_STORE", "memory://")
    prefix = os.environ.get("BENCH_KEY_PREFIX", "ymbench-metrics")
    if variant not in (*VARIANTS, "metrics-default"):
        raise SystemExit(f"BENCH_METRICS_VARIANT={variant!r}: use one of {', '.join(VARIANTS)}")
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, Any]:
        return {"item_id": item_id, "name": "widget", "price": 9.5}

    if variant == "plain":
        return app

    from ymguard import Guard, GuardMiddleware

    provider: Any = False
    if variant.startswith("metrics-on"):
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        provider = MeterProvider(
            metric_readers=[PrometheusMetricReader(registry=registry)],
            exemplar_filter=AlwaysOffExemplarFilter(),  # as the demo (no traces)
        )

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(registry), media_type="text/plain")

    rules = {"key_prefix": prefix, "resources": {RESOURCE: {"flow": [{"qps": 10_000_000}]}}}
    if variant == "metrics-default":
        provider = True  # the global provider, no SDK set: no-op instruments
    guard = Guard(rules, storage=store, metrics=provider)
    if variant == "metrics-on-no-durations" and guard.metrics is not None:
        guard.metrics.record_durations = False
    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    return app


if os.environ.get("BENCH_METRICS_VARIANT"):  # imported by uvicorn as bench.metrics:app
    app = create_app()


# -- the run -------------------------------------------------------------------------------


@dataclass
class Server:
    """One uvicorn process serving one variant."""

    variant: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"


def start(variant: str, store: str, prefix: list[str], logdir: Path, key_prefix: str) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("YMGUARD_")}
    env.update(
        BENCH_METRICS_VARIANT=variant,
        BENCH_STORE=store,
        BENCH_KEY_PREFIX=key_prefix,
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    log = logdir / f"{variant}.log"
    cmd = [*prefix, sys.executable, "-m", "uvicorn", "bench.metrics:app", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1", "--no-access-log", "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Server(variant, port, proc, log)


def fetch(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""


def wait_ready(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            if fetch(server.url, timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    stop(server)
    raise SystemExit(f"{server.variant} did not start:\n{server.log.read_text()[-2000:]}")


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (from /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk(prefix: list[str], url: str, seconds: float, connections: int) -> dict[str, float]:
    cmd = [*prefix, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    cmd += ["--timeout", "5s", "--latency", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    out = done.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    if done.returncode != 0 or rps is None or total is None:
        raise SystemExit(f"wrk failed ({done.returncode}): {done.stderr or out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": float(rps.group(1)),
        "requests": float(total.group(1)),
        "p99_ms": float(p99.group(1)) * _UNITS[p99.group(2)] if p99 else float("nan"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
    }


def pinning(enabled: bool) -> tuple[list[str], list[str], str]:
    """Command prefixes for the servers and for wrk, and what was done."""
    taskset = shutil.which("taskset")
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or taskset is None or len(cpus) < 2:
        return [], [], "not pinned"
    return (
        [taskset, "-c", str(cpus[0])],
        [taskset, "-c", str(cpus[1])],
        f"uvicorn on CPU {cpus[0]}, wrk on CPU {cpus[1]} (taskset)",
    )


def counted(server: Server) -> float:
    """``ymguard_requests_total`` of the route, scraped from a ``metrics-on`` server."""
    status, text = fetch(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
    if status != 200:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ymguard_requests_total") and RESOURCE in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def in_process_cost(calls: int, rounds: int) -> int:
    """CPU per request of each variant's ASGI app called in process, without HTTP.

    The app (FastAPI, ``GuardMiddleware``, the guard) is called directly with an ASGI
    scope, the variants in turn, ``calls`` requests each per round; CPU time comes from
    ``time.process_time``, so other processes on the machine do not count. Without
    uvicorn's HTTP parsing the ratios are harsher than over HTTP. ``metrics-default``
    is ymguard's default: the global provider with no SDK set (no-op instruments).
    """
    import asyncio

    apps: dict[str, Any] = {}
    for variant in (*VARIANTS, "metrics-default"):
        os.environ["BENCH_METRICS_VARIANT"] = variant
        apps[variant] = create_app()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    async def run(app: Any, n: int) -> float:
        started = time.process_time()
        for _ in range(n):
            await app(dict(scope), receive, send)
        return (time.process_time() - started) / n * 1e6

    async def measure() -> dict[str, list[float]]:
        for app in apps.values():
            await run(app, 200)  # warm up
        found: dict[str, list[float]] = {name: [] for name in apps}
        for _ in range(rounds):
            for name, app in apps.items():
                found[name].append(await run(app, calls))
        return found

    found = asyncio.run(measure())
    off = median(found["metrics-off"])
    print(f"ASGI app called in process, {calls} requests x {rounds} rounds, CPU us per request:")
    for name, values in found.items():
        cpu = median(values)
        print(f"  {name:<24} {cpu:7.1f}  {cpu - off:+6.1f} vs metrics-off  ratio {off / cpu:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("-w", "--warmup", type=float, default=1.0, help="seconds before each run")
    parser.add_argument("--store", default="memory", help="memory, redis, or a Redis URL")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="call each variant's ASGI app in process instead (no HTTP, CPU per request)",
    )
    args = parser.parse_args(argv)
    if args.in_process:
        return in_process_cost(5_000, max(3, args.rounds))
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed")
    store = {"memory": "memory://", "redis": "redis://127.0.0.1:6379/0"}.get(args.store, args.store)
    key_prefix = f"ymbench-metrics-{uuid.uuid4().hex[:10]}"
    server_pin, wrk_pin, pin_note = pinning(not args.no_pin)
    print(
        f"ymguard metrics cost: GET {PATH}, wrk -t1 -c{args.connections} "
        f"-d{round(args.duration)}s (+{args.warmup:g}s warm-up), {args.rounds} rounds "
        f"interleaved, medians; store {store}; {pin_note}; ymguard at {code_version()}",
        flush=True,
    )
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"ymbench-metrics-{uuid.uuid4().hex[:8]}"
    logdir.mkdir(parents=True)
    servers = [start(v, store, server_pin, logdir, key_prefix) for v in VARIANTS]
    scraped = 0.0
    sent = 0.0
    try:
        for server in servers:
            wait_ready(server)
        for rnd in range(args.rounds):
            shift = rnd % len(servers)
            for server in servers[shift:] + servers[:shift]:
                if args.warmup > 0:
                    warm = wrk(wrk_pin, server.url, args.warmup, args.connections)
                    if server.variant == "metrics-on":
                        sent += warm["requests"]
                before = cpu_seconds(server.proc.pid)
                run = wrk(wrk_pin, server.url, args.duration, args.connections)
                after = cpu_seconds(server.proc.pid)
                if before is not None and after is not None and run["requests"]:
                    run["cpu_us_per_req"] = (after - before) / run["requests"] * 1e6
                run["round"] = rnd
                server.runs.append(run)
                if server.variant == "metrics-on":
                    sent += run["requests"]
                print(
                    f"  round {rnd + 1}/{args.rounds} {server.variant:<24} "
                    f"{run['rps']:8.0f} req/s  p99 {run['p99_ms']:6.2f} ms",
                    flush=True,
                )
        scraped = counted(servers[VARIANTS.index("metrics-on")])
    finally:
        for server in servers:
            stop(server)
        if store.startswith("redis"):
            import redis

            client = redis.Redis.from_url(store)
            keys = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()

    rows: dict[str, dict[str, Any]] = {}
    for server in servers:
        cpu = [r["cpu_us_per_req"] for r in server.runs if "cpu_us_per_req" in r]
        rows[server.variant] = {
            "rps": median([r["rps"] for r in server.runs]),
            "p99_ms": median([r["p99_ms"] for r in server.runs]),
            "cpu_us_per_req": median(cpu) if cpu else None,
            "errors": sum(r["errors"] for r in server.runs),
            "rounds_rps": [round(r["rps"]) for r in server.runs],
        }
    off_runs = {r["round"]: r["rps"] for r in servers[1].runs}
    for variant, row in rows.items():
        row["ratio_to_metrics_off"] = row["rps"] / rows["metrics-off"]["rps"]
        mine = next(s for s in servers if s.variant == variant).runs
        row["ratio_median_of_rounds"] = median([r["rps"] / off_runs[r["round"]] for r in mine])
    print()
    header = f"{'variant':<24} {'req/s':>8} {'p99 ms':>8} {'cpu us/req':>11} {'vs off':>7}"
    print(header + f" {'(rounds)':>9}")
    for variant, row in rows.items():
        cpu = f"{row['cpu_us_per_req']:.0f}" if row["cpu_us_per_req"] is not None else "-"
        print(
            f"{variant:<24} {row['rps']:>8.0f} {row['p99_ms']:>8.2f} {cpu:>11} "
            f"{row['ratio_to_metrics_off']:>7.3f} {row['ratio_median_of_rounds']:>9.3f}  "
            + " ".join(str(v) for v in row["rounds_rps"])
        )
    on, off = rows["metrics-on"], rows["metrics-off"]
    ratio = on["ratio_to_metrics_off"]
    verdict = "ok" if ratio >= TARGET else "MISSED"
    print(f"target metrics-on >= {TARGET:.2f} of metrics-off (req/s): {ratio:.3f} {verdict}")
    for variant in ("metrics-on", "metrics-on-no-durations"):
        cpu_on, cpu_off = rows[variant]["cpu_us_per_req"], off["cpu_us_per_req"]
        if cpu_on and cpu_off:
            print(f"server CPU per request, {variant} - metrics-off: {cpu_on - cpu_off:+.0f} us")
    counted_ok = scraped >= sent > 0
    print(
        f"metrics-on counted {scraped:.0f} calls of the route in /metrics; wrk sent {sent:.0f} "
        + ("(ok)" if counted_ok else "(PROBLEM: fewer counted than sent)")
    )
    if args.json:
        result = {
            "config": {
                "store": store,
                "duration_s": args.duration,
                "connections": args.connections,
                "rounds": args.rounds,
                "pinning": pin_note,
                "ymguard": code_version(),
                "python": platform.python_version(),
            },
            "summary": rows,
            "counted": scraped,
            "sent": sent,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(logdir, ignore_errors=True)
    errors = any(row["errors"] for row in rows.values())
    return 0 if counted_ok and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
