"""Prefetched QPS permits: a Redis window's permits taken a few at a time, handed out here.

A ``qps`` rule with ``prefetch: true`` still counts every call in the shared Redis window,
but a process takes several permits in one call and hands them out without a round trip.
Permits are only handed out within the 100 ms bucket they were counted in (the window's
resolution), so what the window counts is what was admitted, bucket by bucket, exactly as
without prefetching: no process ever admits more than the window allows. What changes is
that permits a process took and did not use are held back from the others until their
bucket ends, when they are given back (``window_refund.lua``).

How many a process asks for adapts to its own traffic: it starts at one; a stock that runs
out within its bucket doubles the next request, one that ends its bucket with permits left
halves it; at most ``max_batch`` (default: a tenth of the limit, a bucket's share). The
window gives at most half of what is left to one request (at least one), so near the limit
the batches shrink to one and processes share the last permits.

A call that finds the stock empty sends a fetch with its chain's other store calls
(:meth:`PrefetchWindow.fetch_call`: one round trip for the chain) and keeps a permit of
what it brings. Calls that find the stock empty while a fetch is on its way wait for one
shared fetch instead (:meth:`PrefetchWindow.acquire`), then take from what it brought,
even from a reply that came after its bucket ended (they were counted while they waited,
as a call without prefetching is); one that finds nothing left asks Redis for its own
permit. So a call waits for two round trips at most, even when a round trip is as long
as a bucket.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
import weakref
from typing import Any

from ..storage.redis import ScriptCall
from ..storage.tasks import in_background
from .window import BUCKETS, Prefetched, RedisWindow, WindowResult

#: A fetch sent in a chain's batch counts as on its way this long at most (its reply
#: may never be read: a cancelled batch); meanwhile the stock's misses wait for a shared one.
_STAGED_FOR = 1.0
#: Seconds after a bucket's end before its leftovers are given back: time for the calls
#: that waited for its fetch to take theirs.
_GRACE = 0.01


class _Stock:
    """One key's permits in this process: how many, their bucket, until when they count."""

    __slots__ = ("fetching", "left", "size", "slot", "staged", "until", "waiters")

    def __init__(self) -> None:
        self.left = 0
        self.slot: int | bytes = b""
        self.until = 0.0  # time.monotonic() at which the bucket ends (a little early)
        self.size = 1  # how many the next fetch asks for
        self.fetching: asyncio.Future[WindowResult] | None = None
        # The calls waiting for that fetch, a future each (see PrefetchWindow.acquire).
        self.waiters: list[asyncio.Future[WindowResult]] = []
        # When a fetch riding in a chain's batch was sent, until its reply (-inf: none).
        self.staged = -math.inf


#: The prefetching windows of each store, weakly: what they hold goes back at its close.
_windows: weakref.WeakKeyDictionary[Any, weakref.WeakSet[PrefetchWindow]] = (
    weakref.WeakKeyDictionary()
)


async def give_back_stocks(store: Any) -> None:
    """Give back, on ``store``, every prefetched permit not handed out yet (it is closing:
    they would count, unused, until their bucket leaves the window). ``close_tasks``
    calls it; a bucket's end then finds nothing left to give back."""
    refunds = []
    for prefetch in list(_windows.get(store, ())):
        for key, stock in list(prefetch._stocks.items()):
            if stock.left:
                left, stock.left = stock.left, 0
                refunds.append(prefetch.window.refund(key, stock.slot, left))
    if refunds:
        await asyncio.gather(*refunds, return_exceptions=True)  # an outage: they count on


class PrefetchWindow:
    """A Redis window's permits for one rule, taken ahead and handed out in process.

    Args:
        window: the Redis window.
        limit: the rule's permits per window.
        window_seconds: the window's length.
        max_batch: the most permits one fetch asks for (default ``limit / BUCKETS``).
    """

    def __init__(
        self,
        window: RedisWindow,
        limit: int,
        window_seconds: float = 1.0,
        max_batch: int | None = None,
    ) -> None:
        self.window = window
        self.limit = limit
        self.window_seconds = window_seconds
        self.max_batch = max(1, max_batch if max_batch is not None else limit // BUCKETS)
        self._stocks: dict[str, _Stock] = {}
        store = getattr(window, "store", None)  # a stand-in window may have none
        if store is not None:
            _windows.setdefault(store, weakref.WeakSet()).add(self)

    def _stock(self, key: str) -> _Stock:
        stock = self._stocks.get(key)
        if stock is None:
            stock = self._stocks[key] = _Stock()
        return stock

    def take_now(self, key: str) -> int | bytes | None:
        """A permit from the stock in process (its slot), or None: then :meth:`acquire`."""
        stock = self._stocks.get(key)
        return None if stock is None else _take(stock)

    async def acquire(self, key: str) -> WindowResult:
        """A permit from the stock, or from Redis (fetching a batch): its result.

        A caller waits for at most one fetch (its own, or one already in flight). If
        that one brought nothing it can use (others took it all, or its reply came after
        its bucket had ended: a round trip or a stalled loop as long as a bucket), it
        asks Redis for its own permit, as without prefetching: every call ends, admitted
        or refused, within two round trips.

        Refused only when Redis refuses one permit. Raises what the store raises in an
        outage (:class:`~ymguard.errors.StorageUnavailable`).
        """
        stock = self._stock(key)
        slot = _take(stock)
        if slot is not None:
            return WindowResult(True, 0, 0.0, slot)
        if stock.fetching is None:
            fetching = stock.fetching = asyncio.ensure_future(self._fetch(key, stock))
            waiters = stock.waiters = []
            fetching.add_done_callback(functools.partial(_answer, stock, waiters))
        # A future of its own, which the fetch's end answers (_answer): a caller that is
        # cancelled leaves the fetch to the others (what asyncio.shield does, for one
        # object instead of a dozen held while it waits). The same stock after the wait:
        # if its key was forgotten meanwhile (its origin left the check's table), it is
        # not put back.
        waiter: asyncio.Future[WindowResult] = asyncio.get_running_loop().create_future()
        stock.waiters.append(waiter)
        result = await waiter
        if not result.admitted:
            return result
        # A permit of the fetch it waited for, even if its reply came after the bucket
        # ended: it was counted when the script ran, while this call waited (as a call
        # without prefetching is).
        slot = _take(stock, late=stock.slot == result.slot)
        if slot is not None:
            return WindowResult(True, 0, 0.0, slot)
        return await self.window.acquire(key, self.limit, self.window_seconds)

    async def _fetch(self, key: str, stock: _Stock) -> WindowResult:
        """Fetch a batch for ``stock``; :func:`_answer` hands its end to the callers of
        :meth:`acquire` that found the stock empty meanwhile."""
        now = self._grow(stock)
        got = await self.window.prefetch(key, self.limit, self.window_seconds, stock.size)
        if got.admitted:
            self._stock_in(key, stock, got, now)
        return WindowResult(got.admitted, got.remaining, got.wait_seconds, got.slot)

    def fetch_call(self, key: str) -> tuple[ScriptCall, _Stock, float] | None:
        """A fetch as a call to send with other checks' calls (the chain's batch), for a
        call that found the stock empty: the call, the stock and when it was made; hand
        the reply to :meth:`stocked`. None while another fetch of the key is on its way:
        then :meth:`acquire` (which waits for the shared one).
        """
        stock = self._stock(key)
        now = time.monotonic()
        if stock.fetching is not None or now - stock.staged < _STAGED_FOR:
            return None
        self._grow(stock)
        stock.staged = now
        call = self.window.prefetch_call(key, self.limit, self.window_seconds, stock.size)
        return call, stock, now

    def stocked(
        self, key: str, stock: _Stock, got: Prefetched, sent_at: float
    ) -> int | bytes | None:
        """The reply of a :meth:`fetch_call`: its permits stocked and the caller's one
        taken (its slot, whenever the reply came: it was counted while the caller
        waited), or None if Redis refused."""
        if stock.staged == sent_at:
            stock.staged = -math.inf  # answered: the next miss may send a fetch again
        if not got.admitted:
            return None
        self._stock_in(key, stock, got, sent_at)
        stock.left -= 1
        return got.slot

    def _grow(self, stock: _Stock) -> float:
        """Before a fetch: a stock that ran out within its bucket asks for twice as many."""
        now = time.monotonic()
        if stock.left == 0 and now < stock.until:
            stock.size = min(stock.size * 2, self.max_batch)
        return now

    def _stock_in(self, key: str, stock: _Stock, got: Prefetched, sent_at: float) -> None:
        """Add a fetch's permits to the stock (``got`` admitted; sent at ``sent_at``)."""
        if stock.left and stock.slot != got.slot:  # an ended bucket's leftovers
            in_background(self.window.refund(key, stock.slot, stock.left))
            stock.left = 0
            stock.size = max(1, stock.size // 2)
        stock.left += got.taken
        stock.slot = got.slot
        # The bucket ends seconds_left after the script ran, which was after `sent_at`.
        stock.until = sent_at + got.seconds_left
        # Given back a moment after the bucket ends: the calls that waited for this fetch
        # take theirs first, even from a reply that came late.
        asyncio.get_running_loop().call_later(
            max(0.0, stock.until - time.monotonic()) + _GRACE,
            self._expire,
            key,
            stock,
            got.slot,
        )

    def _expire(self, key: str, stock: _Stock, slot: int | bytes) -> None:
        """A bucket has ended: give back what is left of its permits, ask for fewer."""
        if stock.slot != slot or time.monotonic() < stock.until or not stock.left:
            return  # refilled since (a later bucket, or this one again), or all used
        left, stock.left = stock.left, 0
        stock.size = max(1, stock.size // 2)
        in_background(self.window.refund(key, slot, left))

    def give_back(self, key: str, slot: int | bytes) -> bool:
        """Put back a permit a later check refused, if its bucket still runs here."""
        stock = self._stocks.get(key)
        if stock is None or stock.slot != slot or time.monotonic() >= stock.until:
            return False
        stock.left += 1
        return True

    def forget(self, key: str) -> None:
        """Drop a key's stock (its origin left the check's table): give back what is left."""
        stock = self._stocks.pop(key, None)
        if stock is not None and stock.left:
            left, stock.left = stock.left, 0
            try:
                in_background(self.window.refund(key, stock.slot, left))
            except RuntimeError:  # no loop running: they count until the window passes
                pass

    def held(self) -> int:
        """Permits taken from Redis and not handed out yet, over every key."""
        return sum(stock.left for stock in self._stocks.values())


def _take(stock: _Stock, late: bool = False) -> int | bytes | None:
    """A permit of ``stock`` (its slot) while its bucket runs (or ``late``), else None."""
    if not stock.left or (not late and time.monotonic() >= stock.until):
        return None
    stock.left -= 1
    return stock.slot


def _answer(
    stock: _Stock, waiters: list[asyncio.Future[WindowResult]], fetch: asyncio.Future[WindowResult]
) -> None:
    """A fetch ended (a done callback, so also when it was cancelled before it ran): each
    caller still waiting gets its result, its error or its cancellation."""
    if stock.fetching is fetch:
        stock.fetching = None
        stock.waiters = []
    cancelled = fetch.cancelled()
    error = None if cancelled else fetch.exception()  # retrieved: never "never retrieved"
    for waiter in waiters:
        if waiter.done():  # its caller was cancelled
            continue
        if cancelled:
            waiter.cancel()
        elif error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(fetch.result())


__all__ = ["PrefetchWindow", "give_back_stocks"]
