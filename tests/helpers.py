"""Real parts for tests: a private redis-server, uvicorn processes, free ports.

Tests that stop or break Redis start their own server here; the machine's shared Redis
on 127.0.0.1:6379 is never stopped or flushed (tests use unique key prefixes instead).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
# 2 s timeouts, not ymguard's 0.5 s default: on a loaded 2-core CI machine a slow answer
# must not turn into a (correct, but test-breaking) fallback to local state.
SHARED_REDIS_URL = os.environ.get(
    "YMGUARD_TEST_REDIS", "redis://127.0.0.1:6379/0?socket_timeout=2&socket_connect_timeout=2"
)
REQUIRE_REDIS = os.environ.get("YMGUARD_REQUIRE_REDIS") == "1"

#: This test run's namespace on the shared Redis. Several runs (other worktrees, CI) share
#: one Redis at once, so a run owns exactly the keys under this prefix: every prefix it hands
#: out starts with it, and the session's last teardown deletes them (``delete_run_keys``).
RUN_PREFIX = f"ymt-{uuid.uuid4().hex[:8]}-"


def http_scope(path: str, method: str = "GET", **extra: Any) -> dict[str, Any]:
    """An HTTP request's ASGI scope for ``path``, as a server sends it (``extra`` adds
    or replaces keys: ``headers``, ``asgi``...)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        **extra,
    }


def unique_prefix() -> str:
    """A key prefix no other test uses: ``ymt-<run id>-<test id>``, inside this run's namespace.

    Give it to subprocesses too (apps under ``tests/apps`` take theirs from the environment),
    so whatever they write is deleted with the run.
    """
    return RUN_PREFIX + uuid.uuid4().hex[:12]


def delete_run_keys(url: str = SHARED_REDIS_URL) -> int:
    """Delete every key of this run on the Redis at ``url``; returns how many were deleted.

    SCAN + UNLINK under :data:`RUN_PREFIX` only: keys of other runs on the same server are
    left alone (their runs delete them). Does nothing when Redis does not answer.
    """
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    deleted = 0
    try:
        batch: list[bytes] = []
        # RUN_PREFIX is hex digits and dashes: nothing in it for the glob to escape.
        for key in client.scan_iter(match=RUN_PREFIX + "*", count=1000):
            batch.append(key)
            if len(batch) == 500:
                deleted += int(client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(client.unlink(*batch))
    except redis.RedisError:
        pass
    finally:
        client.close()
    return deleted


def count_run_keys(url: str = SHARED_REDIS_URL) -> int:
    """How many keys of this run exist on the Redis at ``url`` right now."""
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        return sum(1 for _ in client.scan_iter(match=RUN_PREFIX + "*", count=1000))
    finally:
        client.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str = SHARED_REDIS_URL, within: float = 0.0) -> bool:
    """Whether a Redis server answers PING at ``url`` (asking again for ``within`` seconds).

    A loaded machine can keep a healthy server from answering one PING within a second;
    ``within`` tells a server that is down from one that is slow.
    """
    deadline = time.monotonic() + within
    while True:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            if client.ping():
                return True
        except redis.RedisError:
            pass
        finally:
            client.close()
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


class RedisServer:
    """A private ``redis-server`` on a free port, for tests that stop, pause or kill it."""

    def __init__(self, port: int | None = None, unix_socket: bool = False) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="ymguard-redis-")
        self.unix_socket = os.path.join(self.dir, "redis.sock") if unix_socket else None
        self.proc: subprocess.Popen[bytes] | None = None
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
        ]
        if self.unix_socket:
            args += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        if not redis_answers(self.url, within=30):
            raise TimeoutError("private redis-server did not answer")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hang)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def check_run_prefixes(env: Mapping[str, str]) -> None:
    """Refuse a key prefix for a subprocess (``*PREFIX`` variables) outside this run's namespace.

    What a subprocess writes to the shared Redis under another prefix would outlive the run.
    """
    for name, value in env.items():
        if name.endswith("PREFIX") and not value.startswith(RUN_PREFIX):
            raise ValueError(
                f"{name}={value!r} is outside this test run's namespace {RUN_PREFIX!r}: "
                "use tests.helpers.unique_prefix() (or the prefix fixture)"
            )


class Uvicorn:
    """A uvicorn process serving ``app`` (``module:attr`` or ``--factory``) on a free port.

    ``env`` adds to the environment; key prefixes given in it (``*PREFIX``) must come from
    :func:`unique_prefix`, so the run's cleanup deletes what the process writes.
    """

    def __init__(
        self,
        app: str,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        factory: bool = False,
    ) -> None:
        check_run_prefixes(env or {})
        self.app = app
        self.port = port or free_port()
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.factory = factory
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(
            prefix="ymguard-uvicorn-", suffix=".log", delete=False
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Uvicorn:
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            self.app,
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        if self.factory:
            args.append("--factory")
        self.proc = subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=self.log, stderr=self.log)
        try:
            wait_for_port(self.port, timeout=30)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"uvicorn {self.app} did not start:\n{self.output()}") from None
        return self

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the process dies without running any cleanup."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


@contextlib.contextmanager
def running(servers: list[Uvicorn]) -> Iterator[list[Uvicorn]]:
    """Start every server, yield them, and stop them all, also when a start fails."""
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()
