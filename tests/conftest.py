"""Fixtures shared by every test: parity over the memory and Redis stores.

Redis-backed tests skip when no Redis answers, unless ``YMGUARD_REQUIRE_REDIS=1`` (set by
``.ci/run``), where they fail instead: CI never passes by skipping Redis.

The shared Redis (``YMGUARD_TEST_REDIS``, default db 0 on 127.0.0.1:6379) serves several
test runs at once: each run writes only under its own ``ymt-<run id>-`` namespace
(``tests.helpers.unique_prefix``) and deletes that namespace when the session ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.helpers import (
    REQUIRE_REDIS,
    RUN_PREFIX,
    SHARED_REDIS_URL,
    RedisServer,
    delete_run_keys,
    redis_answers,
    unique_prefix,
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
    import os

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
