"""A watched rules file: a good edit is reloaded, a bad one is logged and refused."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ymguard import Guard

#: Liveness bound for a reload to show (never a timing claim).
WITHIN = 30.0

RULES = """\
# the shop's limits
resources:
  "GET /items":
    flow:
      - qps: {qps}
"""


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WITHIN
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not within {WITHIN} s: {what}")
        await asyncio.sleep(0.05)


def qps_of(guard: Guard) -> int | None:
    return guard.rules.resources["GET /items"].flow[0].qps


@pytest.fixture
async def watched(tmp_path: Path, storage_uri: str, prefix: str) -> AsyncIterator[Guard]:
    path = tmp_path / "rules.yaml"
    path.write_text(f"key_prefix: {prefix}\n" + RULES.format(qps=10))
    guard = Guard.from_yaml(path, storage_uri, watch=True, poll_seconds=0.05)
    await guard.start()
    yield guard
    await guard.aclose()


def rules_path(guard: Guard) -> Path:
    path = guard._runtime.watch_path
    assert path is not None
    return path


async def test_an_edit_of_a_watched_file_is_reloaded(watched: Guard) -> None:
    path = rules_path(watched)
    version = watched.rules_version
    chain = watched.chain("GET /items")
    path.write_text(path.read_text().replace("qps: 10", "qps: 3"))

    await eventually(lambda: qps_of(watched) == 3, "the edit is reloaded")
    assert watched.rules_version != version
    assert watched.chain("GET /items") is not chain

    # An editor that writes a new file and renames it over the old one is seen too.
    fresh = path.with_suffix(".tmp")
    fresh.write_text(path.read_text().replace("qps: 3", "qps: 4"))
    os.replace(fresh, path)
    await eventually(lambda: qps_of(watched) == 4, "the replaced file is reloaded")


async def test_a_bad_edit_is_logged_with_its_line_and_the_old_rules_stay(
    watched: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="ymguard")
    path = rules_path(watched)
    version, chain = watched.rules_version, watched.chain("GET /items")
    good = path.read_text()
    path.write_text(good.replace("qps: 10", "qps: -5"))

    # (A read between the truncation and the write may be refused first, as empty.)
    expected = f'{path}:6: resources."GET /items".flow[0].qps: '

    def logged() -> bool:
        return any(expected in r.getMessage() for r in caplog.records)

    await eventually(logged, "the bad edit is logged")
    message = next(r.getMessage() for r in caplog.records if expected in r.getMessage())
    assert "refused; the rules in force stay" in message
    assert watched.rules_version == version and qps_of(watched) == 10
    assert watched.chain("GET /items") is chain
    assert watched._runtime.refused is not None

    # Fixing the file reloads it.
    path.write_text(good.replace("qps: 10", "qps: 20"))
    await eventually(lambda: qps_of(watched) == 20, "the fixed file is reloaded")
    assert watched._runtime.refused is None


async def test_an_unwatched_guard_reads_its_file_once(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES.format(qps=10))
    guard = Guard.from_yaml(path)
    await guard.start()
    try:
        path.write_text(RULES.format(qps=11))
        await asyncio.sleep(0.3)
        assert qps_of(guard) == 10
    finally:
        await guard.aclose()


async def test_a_file_whose_storage_the_guard_overrides_still_reloads(tmp_path: Path) -> None:
    # The guard runs on the store it was given (or $YMGUARD_STORAGE), not the file's
    # storage: an edit of the same file is still the same store.
    path = tmp_path / "rules.yaml"
    path.write_text("storage: redis://10.9.9.9:6379/0\n" + RULES.format(qps=10))
    guard = Guard.from_yaml(path, "memory://", watch=True, poll_seconds=0.05)
    await guard.start()
    try:
        path.write_text(path.read_text().replace("qps: 10", "qps: 12"))
        await eventually(lambda: qps_of(guard) == 12, "the edit is reloaded")
    finally:
        await guard.aclose()
