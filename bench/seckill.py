"""The seckill route with all its guards vs a plain FastAPI endpoint, and its Redis cost.

One run, four phases against uvicorn processes (one worker each, no access log), loaded
with wrk:

- ``plain``: ``bench.apps:app`` with ``BENCH_VARIANT=plain`` (FastAPI returning a constant);
- ``selling``: ``POST /kill/{id}`` of the demo shop (auth middleware, the ``killSem``
  semaphore and flow rule of ``demo_service/rules.yaml``, the one Lua script) on a kill
  course with stock for the whole run, each request from one of 200 buyers in turn;
- ``sold-out``: the same route on a sold-out kill course: the process's sold-out flag
  answers 409 without calling the script.
- ``unguarded``: ``selling`` on a second shop process whose rules leave the seckill route
  unguarded (what the semaphore and flow rule cost, by difference).

Redis commands per request come from ``INFO commandstats`` deltas on a private
redis-server during each shop phase, less the idle background traffic (pub/sub, lease
keepers, relays) measured over as long with no load. The shop's rules are the shipped
file with the flow limits raised out of reach (so every request is a full check and none
is refused); the database is SQLite in a temporary directory.

    python -m bench.seckill                 # 5 s per phase, 32 connections
    python -m bench.seckill -d 10 -c 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import yaml

from bench._common import code_version, free_port, median, start_redis, stop_redis
from bench.overhead import cpu_seconds, parse_wrk, pinning, wrk

ROOT = Path(__file__).resolve().parent.parent
ADMIN_PASSWORD = "bench-admin-password"
TOKEN_SECRET = "bench-token-secret-" + "s" * 32
BUYERS = 200
KILL_RESOURCE = "POST /kill/{kill_course_id}"


def _request(
    url: str, method: str = "GET", body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _serve(
    prefix: list[str], app: str, env: dict[str, str], logdir: Path, factory: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = open(logdir / f"{app.replace(':', '-')}-{port}.log", "wb")
    cmd = [*prefix, sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1", "--no-access-log", "--log-level", "warning"]
    if factory:
        cmd.append("--factory")
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.Popen(cmd, env=full_env, cwd=logdir, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            path = "/health" if factory else "/items/1"
            if _request(url + path)[0] == 200:
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{app} did not start; see {log.name}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _bench_rules(workdir: Path, guarded: bool = True) -> Path:
    """The shipped rules with every flow limit out of reach (checked, never refusing);
    without the seckill route's rules when not ``guarded``."""
    rules = yaml.safe_load((ROOT / "demo_service" / "rules.yaml").read_text())
    for resource in rules["resources"].values():
        for flow in resource.get("flow", []) + resource.get("param_flow", []):
            if "qps" in flow:  # flow and hot-parameter rules: checked, never refusing
                flow["qps"] = 10_000_000
    if not guarded:
        del rules["resources"][KILL_RESOURCE]
    path = workdir / ("rules.yaml" if guarded else "rules-unguarded.yaml")
    path.write_text(yaml.safe_dump(rules))
    return path


def _commands(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _kill_script(workdir: Path, kill_course_id: int, tokens: list[str]) -> Path:
    """A wrk script: POST /kill/{id}, each request as the next buyer."""
    listed = ",".join(f'"{t}"' for t in tokens)
    path = workdir / f"kill-{kill_course_id}.lua"
    path.write_text(
        f"local tokens = {{{listed}}}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i + 1\n"
        "  local t = tokens[(i % #tokens) + 1]\n"
        f'  return wrk.format("POST", "/kill/{kill_course_id}", '
        '{["Authorization"] = "Bearer " .. t})\n'
        "end\n"
    )
    return path


def _activity(url: str, admin: str, kill_count: int, kill_limit: int) -> int:
    status, course = _request(
        url + "/admin/courses", "POST", {"name": "Bench", "price": "10.00"}, admin
    )
    assert status == 201, course
    start = datetime.now(UTC) - timedelta(minutes=1)
    status, activity = _request(
        url + "/admin/activities",
        "POST",
        {
            "name": "Bench",
            "start_time": start.isoformat(),
            "end_time": (start + timedelta(hours=2)).isoformat(),
            "courses": [
                {
                    "course_id": course["course_id"],
                    "kill_price": "1.00",
                    "kill_count": kill_count,
                    "kill_limit": kill_limit,
                }
            ],
        },
        admin,
    )
    assert status == 201, activity
    status, body = _request(
        url + f"/admin/activities/{activity['activity_id']}/publish", "POST", None, admin
    )
    assert status == 200, body
    return int(activity["courses"][0]["kill_course_id"])


def main() -> int:
    """Run the three phases and print the table; the exit status is 1 if a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("-r", "--rounds", type=int, default=3, help="rounds (phases interleave)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--json", type=Path, help="write everything measured here")
    args = parser.parse_args()

    server_pin, wrk_pin, pin_note = pinning(not args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="ymbench-seckill-"))
    redis_proc, redis_url = start_redis()
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {"version": code_version(), "pinning": pin_note, "phases": {}}
    failures: list[str] = []
    try:
        plain_proc, plain_url = _serve(server_pin, "bench.apps:app", {}, workdir)
        procs.append(plain_proc)
        env = {
            "DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'shop.db'}",
            "REDIS_URL": redis_url,
            "YMGUARD_RULES": str(_bench_rules(workdir)),
            "DEMO_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "DEMO_TOKEN_SECRET": TOKEN_SECRET,
        }
        env = {**{k: "" for k in ("YMGUARD_STORAGE", "YMGUARD_KEY_PREFIX")}, **env}
        shop_proc, shop_url = _serve(
            server_pin, "demo_service.app:create_app", env, workdir, factory=True
        )
        procs.append(shop_proc)
        # The same shop (database, Redis) without the seckill route's guards: what they cost.
        bare_env = {**env, "YMGUARD_RULES": str(_bench_rules(workdir, guarded=False))}
        bare_proc, bare_url = _serve(
            server_pin, "demo_service.app:create_app", bare_env, workdir, factory=True
        )
        procs.append(bare_proc)

        status, login = _request(
            shop_url + "/auth/login",
            "POST",
            {"username": "admin", "password": ADMIN_PASSWORD},
        )
        assert status == 200, login
        admin = login["token"]
        # Real buyers in the database (a consumer may persist their kill orders).
        with sqlite3.connect(workdir / "shop.db", timeout=30) as conn:
            conn.executemany(
                "INSERT INTO users (username, password_hash, is_admin, created_at) "
                "VALUES (?, 'x', 0, '2026-01-01 00:00:00')",
                [(f"bench-buyer-{i}",) for i in range(BUYERS)],
            )
            ids = [r[0] for r in conn.execute("SELECT id FROM users WHERE username LIKE 'bench-%'")]
        sys.path.insert(0, str(ROOT))
        from demo_service.accounts import Principal, TokenCodec

        codec = TokenCodec(TOKEN_SECRET)
        tokens = [codec.issue(Principal(i, f"bench-buyer-{i}", False)) for i in ids]

        selling = _activity(shop_url, admin, kill_count=10_000_000, kill_limit=1000)
        sold_out = _activity(shop_url, admin, kill_count=1, kill_limit=1)
        status, _ = _request(f"{shop_url}/kill/{sold_out}", "POST", None, tokens[0])
        assert status == 200
        status, body = _request(f"{shop_url}/kill/{sold_out}", "POST", None, tokens[1])
        if status != 409:
            failures.append(f"the sold-out course answered {status}: {body}")

        client = redis.Redis.from_url(redis_url)
        before = _commands(client)
        time.sleep(args.duration)
        idle = _delta(_commands(client), before)
        results["idle_commands"] = idle

        phases = [
            ("plain", plain_proc.pid, plain_url + "/items/1", None),
            ("selling", shop_proc.pid, shop_url, _kill_script(workdir, selling, tokens)),
            ("unguarded", bare_proc.pid, bare_url, _kill_script(workdir, selling, tokens)),
            ("sold-out", shop_proc.pid, shop_url, _kill_script(workdir, sold_out, tokens)),
        ]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in phases}
        for round_no in range(args.rounds):
            # The order rotates from round to round: a noisy neighbour hurts all alike.
            shift = round_no % len(phases)
            for name, pid, url, script in phases[shift:] + phases[:shift]:
                before, cpu_before = _commands(client), cpu_seconds(pid)
                run = parse_wrk(wrk(wrk_pin, url, args.duration, args.connections, 1, script))
                cpu_after = cpu_seconds(pid)
                used = _delta(_commands(client), before)
                net = {k: v - idle.get(k, 0) for k, v in used.items()}
                net = {k: v for k, v in net.items() if v > 0}
                n = max(run["requests"], 1)
                run["redis_per_request"] = {k: round(v / n, 3) for k, v in net.items()}
                if cpu_before is not None and cpu_after is not None:
                    run["cpu_us_per_request"] = (cpu_after - cpu_before) * 1e6 / n
                runs[name].append(run)
                if name in ("selling", "unguarded") and run["errors"]:
                    failures.append(f"selling: {run['errors']} non-2xx or socket errors")
                if name == "sold-out" and run["errors"] < run["requests"]:
                    failures.append("sold-out: some requests were answered 2xx")
        for name, phase_runs in runs.items():
            results["phases"][name] = {
                "rps": median([r["rps"] for r in phase_runs]),
                "p50_ms": median([r["p50_ms"] for r in phase_runs]),
                "p99_ms": median([r["p99_ms"] for r in phase_runs]),
                "cpu_us_per_request": median(
                    [r.get("cpu_us_per_request", float("nan")) for r in phase_runs]
                ),
                "redis_per_request": phase_runs[-1]["redis_per_request"],
                "rounds": phase_runs,
            }
        sold = 10_000_000 - int(client.get(_stock_key(selling)) or 0)
        results["sold_while_selling"] = sold
        client.close()
    finally:
        for proc in procs:
            _stop(proc)
        stop_redis(redis_proc)

    plain = results["phases"]["plain"]
    print(f"ymguard {results['version']}; {pin_note}; medians of {args.rounds} rounds")
    print(
        f"{'phase':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} "
        f"{'rps/plain':>10} {'plain/CPU':>10}  Redis calls per request"
    )
    for name, run in results["phases"].items():
        calls = run["redis_per_request"]
        shown = {k: v for k, v in calls.items() if k in ("evalsha", "eval") or v >= 0.05}
        commands = ", ".join(f"{k} {v:g}" for k, v in sorted(shown.items()))
        print(
            f"{name:<10} {run['rps']:>9.0f} {run['p50_ms']:>8.2f} {run['p99_ms']:>8.2f} "
            f"{run['cpu_us_per_request']:>11.0f} {run['rps'] / plain['rps']:>10.2f} "
            f"{plain['cpu_us_per_request'] / run['cpu_us_per_request']:>10.2f}  "
            f"{commands or '-'}"
        )
    print(
        "Redis calls: round trips are EVALSHA (each a whole Lua script); the other names are "
        "the commands those scripts ran."
    )
    print(f"sold while selling: {results['sold_while_selling']} (each one script call)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    for failure in failures:
        print("CHECK FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


def _stock_key(kill_course_id: int) -> str:
    from demo_service.seckill import course_keys

    return course_keys("demo", kill_course_id)["stock"]


if __name__ == "__main__":
    sys.exit(main())
