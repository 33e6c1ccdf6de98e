"""What every benchmark script shares: the code version, free ports, medians, a private Redis."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


def code_version() -> str:
    """The ymguard code measured: ``git describe --always --dirty`` of the repository."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def median(values: Sequence[float]) -> float:
    """The median, NaN left out; NaN when nothing is left."""
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


def start_redis(pin: Sequence[str] = ()) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on a free port, no persistence; ``pin`` prefixes the command.

    Returns the process and its URL; exits the script if the server does not answer.
    """
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found; pass --redis-url to use a running Redis")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="ymbench-redis-")
    cmd = [*pin, exe, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--dir", workdir, "--loglevel", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return proc, url
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit("the private redis-server did not start") from None
                time.sleep(0.05)
    finally:
        client.close()


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server from :func:`start_redis`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ops_arguments(description: str) -> argparse.Namespace:
    """The options every ops/s benchmark takes: -n, --tasks, --rounds, --redis-url."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-n", type=int, default=5000, help="ops per run")
    parser.add_argument("-c", "--tasks", type=int, default=32, help="concurrent tasks")
    parser.add_argument("-r", "--rounds", type=int, default=5)
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    return parser.parse_args()


@contextlib.contextmanager
def redis_for(url: str | None) -> Iterator[str]:
    """``url`` if given, else a private redis-server for the duration of the block."""
    if url is not None:
        yield url
        return
    proc, private = start_redis()
    try:
        yield private
    finally:
        stop_redis(proc)
