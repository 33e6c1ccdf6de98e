"""Background work of the library: clean-ups that must finish, and stopping tasks.

Clean-ups (a release after a cancelled acquire, an unwind) run in tasks of their own that
nobody awaits; this module keeps them referenced until they end and retrieves what they
raised. Long-lived tasks (pub/sub readers, the lease keeper) are stopped with
:func:`stopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from ..errors import StorageUnavailable

log = logging.getLogger("ymguard")

T = TypeVar("T")

#: Below this many seconds, a timer is not worth arming (timers may fire a hair early).
EPSILON = 0.001

# Clean-ups running in tasks of their own, kept referenced until they finish.
_background: set[asyncio.Task[Any]] = set()


def _forget(task: asyncio.Task[Any]) -> None:
    """Done callback of a background clean-up: drop it, and retrieve what it raised."""
    _background.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        if not isinstance(exc, StorageUnavailable):
            log.error("ymguard: a background clean-up failed", exc_info=exc)


async def finish(aw: Awaitable[T]) -> T:
    """Run a clean-up to its end even if the task is cancelled (again) meanwhile."""
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        _background.add(task)  # the clean-up goes on in its own task
        task.add_done_callback(_forget)
        raise


def in_background(aw: Awaitable[Any]) -> asyncio.Future[Any]:
    """Run a clean-up in a task of its own, which nobody waits for (returned for whoever
    wants to know when it ends)."""
    task = asyncio.ensure_future(aw)
    _background.add(task)
    task.add_done_callback(_forget)
    return task


#: How long :func:`drain` (``Guard.aclose``) waits for the clean-ups still running.
DRAIN_SECONDS = 2.0


async def drain(seconds: float = DRAIN_SECONDS) -> None:
    """Wait, up to ``seconds``, for the running loop's clean-ups to end (and for
    those they start): what a cancelled call gives back reaches the store before it closes,
    instead of staying held until its lease ends."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        pending = [t for t in _background if not t.done() and t.get_loop() is loop]
        if not pending:
            # A task that has just ended may not have run its done callbacks yet (they
            # run a turn later), and one may start a clean-up (a cancelled caller's
            # batch gives back what it took): one turn for them, then look again.
            await asyncio.sleep(0)
            pending = [t for t in _background if not t.done() and t.get_loop() is loop]
            if not pending:
                return
        left = deadline - loop.time()
        if left <= 0:
            log.warning("ymguard: %d clean-up(s) still running at close", len(pending))
            return
        await asyncio.wait(pending, timeout=left)


async def stopped(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks``; wait for those of the running loop to end, cancel the others'."""
    here = asyncio.get_running_loop()
    mine = []
    for task in tasks:
        if task.done():
            continue
        loop = task.get_loop()
        if loop is here:
            task.cancel()
            mine.append(task)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
    if mine:
        await asyncio.wait(mine)


async def nap(event: asyncio.Event, seconds: float) -> None:
    """Sleep until ``event`` is set or ``seconds`` pass."""
    if event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(seconds, EPSILON)):
            await event.wait()
