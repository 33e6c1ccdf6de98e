"""Circuit breakers (Sentinel's ``DegradeRule``): ``slow_ratio``, ``error_ratio``, ``error_count``.

A breaker is CLOSED (calls pass), OPEN (calls are refused with ``circuit-open`` until
``open_seconds`` pass) or HALF_OPEN (exactly one probe call is running). The probe's
success closes it and starts a fresh statistics window; its failure or slowness re-opens
it with a fresh timer; a probe that a later check blocks or that is cancelled re-opens it
too, so a breaker is never left half-open (alibaba/Sentinel#1638). A probe also holds a
lease: if its exit never runs (its process died), another caller may probe after it.

Closed-state decisions read the resource's :class:`ResourceStats` (the one sliding window
per resource); the breakers keep no counters of their own, so statistics are per process.
The *state* is per store: on the memory store it lives in the store's dict; on Redis it
lives in one hash per breaker, changed only by the ``breaker_*.lua`` scripts, and every
transition is published. Each process keeps a local copy of each breaker, refreshed by
one pub/sub subscriber task per store, so a closed (or open) breaker answers without a
Redis call; only the few calls that change the state (trip, probe, probe result) run a
script. A copy is read from Redis when the breaker is built, and the first calls wait for
that read: a process started while a breaker is open never admits a call through it. A
trip opens the local copy at once and then tells Redis, so the calls that arrive during
that round trip are refused too.

Listeners follow pybreaker's ``CircuitBreakerListener`` protocol (``state_change``,
``failure``, ``success``); a ``pybreaker.CircuitBreaker`` with in-memory storage can also
guard a resource (:class:`PybreakerCheck`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import zip_longest
from typing import Any, Literal

import pybreaker
from pydantic import Field, field_validator, model_validator

from ._kind import Env, Kind
from ._model import Rule, rule_ids
from .backends.breaker_state import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerState,
    BreakerStore,
)
from .chain import AWAIT, DEFAULT_ERROR_STATUSES, Context, Stage, has_outcome, is_error
from .errors import CircuitOpen, StorageBlocked, StorageUnavailable, YmguardError
from .stats import SHARED_CLOCK, Counts, ResourceStats
from .storage import Store

log = logging.getLogger("ymguard.breaker")

Strategy = Literal["slow_ratio", "error_ratio", "error_count"]


class BreakerRule(Rule):
    """One ``breaker`` rule of a resource (see ``RULES.md``)."""

    strategy: Strategy
    threshold: float = Field(ge=0, description="a ratio in [0, 1], or a count for error_count")
    max_rt_ms: float | None = Field(None, gt=0, description="slow_ratio: slower is slow")
    window_seconds: float = Field(1, gt=0, description="the statistics window")
    min_requests: int = Field(5, ge=0, description="fewer calls in the window never open it")
    open_seconds: float = Field(10, gt=0, description="open this long, then one probe")
    error_statuses: list[int] = Field(
        default_factory=lambda: sorted(DEFAULT_ERROR_STATUSES),
        description="HTTP statuses that count as errors; exceptions always do",
    )
    probe_lease_seconds: float | None = Field(
        None, gt=0, description="a probe whose outcome never comes is given up after this"
    )

    @field_validator("error_statuses")
    @classmethod
    def _http_statuses(cls, value: list[int]) -> list[int]:
        for status in value:
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status")
        return value

    @model_validator(mode="after")
    def _threshold_fits(self) -> BreakerRule:
        if self.strategy != "error_count" and self.threshold > 1:
            raise ValueError(f"threshold of {self.strategy} is a ratio in [0, 1]")
        if self.strategy == "error_count" and not float(self.threshold).is_integer():
            raise ValueError("threshold of error_count is a whole number of errors")
        if self.strategy == "slow_ratio" and self.max_rt_ms is None:
            raise ValueError("slow_ratio needs max_rt_ms")
        return self

    @property
    def lease_seconds(self) -> float:
        """How long a probe may run before another caller may probe."""
        return self.probe_lease_seconds or self.open_seconds


_PB_STATES: dict[BreakerState, Any] = {
    CLOSED: pybreaker.CircuitClosedState,
    OPEN: pybreaker.CircuitOpenState,
    HALF_OPEN: pybreaker.CircuitHalfOpenState,
}


class ErrorStatus(YmguardError):
    """What a listener's ``failure`` receives for a response with an error status."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"HTTP {status}")


class SlowCall(YmguardError):
    """What a listener's ``failure`` receives for a call slower than ``max_rt_ms``."""

    def __init__(self, rt_ms: float, max_rt_ms: float) -> None:
        self.rt_ms = rt_ms
        self.max_rt_ms = max_rt_ms
        super().__init__(f"took {rt_ms:.1f} ms, more than {max_rt_ms:g} ms")


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """One breaker as ``Guard.breakers()`` reports it (metrics, the dashboard).

    Attributes:
        name: the breaker's name (``resource#index``, or the pybreaker's name).
        resource: the resource it guards.
        strategy: ``slow_ratio`` | ``error_ratio`` | ``error_count`` | ``pybreaker``.
        state: ``closed`` | ``open`` | ``half-open`` (this process's view).
        counts: the statistics it decides on (its window, since its last reset).
        threshold: the rule's threshold (``fail_max`` for a pybreaker).
        retry_after: seconds until the probe while open, else ``None``.
    """

    name: str
    resource: str
    strategy: str
    state: str
    counts: Counts
    threshold: float
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class _Probe:
    """The token of the call that is the probe."""

    owner: str
    local: bool  # admitted on the local copy while the store was unavailable


class Breaker:
    """One circuit breaker's state on a store, and its transitions.

    Args:
        store: where the state lives (memory: this process; Redis: every process).
        name: the breaker's name; breakers of one name on one store share their state.
        open_seconds: how long it stays open before one probe may pass.
        lease_seconds: how long a probe may run before another caller may probe.
        resource: the resource named in refusals.
        description: the rule named in refusals (``breaker[0] error_ratio>0.5``).
        identity: what keys the state (default: ``name``); a rule's breaker is keyed by
            the rule's identity, so its state stays with the rule, wherever it moves.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        *,
        open_seconds: float,
        lease_seconds: float | None = None,
        resource: str | None = None,
        description: str = "breaker",
        identity: str | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.resource = resource if resource is not None else name
        self.description = description
        self.open_seconds = open_seconds
        self.lease_seconds = lease_seconds or open_seconds
        state_name = identity if identity is not None else name
        self.key = store.key("breaker", state_name)
        self._state: BreakerStore = store.breaker(state_name)
        self._remote = self._state.remote
        self._st = self._state.copy
        self._st.breaker = weakref.ref(self)

    def __repr__(self) -> str:
        return f"Breaker({self.name!r}, {self.state.value})"

    # -- what users and listeners read ---------------------------------------------------

    @property
    def watching(self) -> bool:
        """Whether the local copy is kept fresh (on Redis: the subscriber runs on this loop).

        On Redis this (re)starts the subscriber when it is not running on the running loop.
        """
        state = self._state
        return state.running() or state.start()

    @property
    def state(self) -> BreakerState:
        """The state as this process sees it (on Redis: the local copy)."""
        return self._st.state

    @property
    def known(self) -> bool:
        """Whether the local copy has been read from the store (always, on memory).

        Until then no call is admitted: the first ones wait for that read.
        """
        return self._st.known

    @property
    def current_state(self) -> str:
        """The state as pybreaker names it (``closed``, ``open``, ``half-open``)."""
        return self._st.state.value

    @property
    def reset_timeout(self) -> float:
        """``open_seconds``, under pybreaker's name."""
        return self.open_seconds

    @property
    def retry_after(self) -> float | None:
        """Seconds until a probe may pass while open, else ``None``."""
        if self._st.state is not OPEN:
            return None
        return max(0.0, self._st.probe_at - time.monotonic())

    @property
    def listeners(self) -> tuple[Any, ...]:
        """The registered listeners."""
        return tuple(self._st.listeners)

    def add_listener(self, listener: Any) -> None:
        """Register a ``pybreaker.CircuitBreakerListener`` (or any object with its methods).

        A listener whose ``success`` and ``failure`` are those of pybreaker's base class
        (it does nothing with them) is not called for each call's outcome.
        """
        st = self._st
        if not any(existing is listener for existing in st.listeners):
            st.listeners.append(listener)
            if _hears_outcomes(listener):
                st.hearing.append(listener)

    def remove_listener(self, listener: Any) -> None:
        """Unregister a listener."""
        st = self._st
        st.listeners[:] = [x for x in st.listeners if x is not listener]
        st.hearing[:] = [x for x in st.hearing if x is not listener]

    def notify_state_change(self, old: BreakerState, new: BreakerState) -> None:
        """Call every listener's ``state_change`` with pybreaker state objects."""
        cb: Any = self
        old_obj = _PB_STATES[old](cb, None, notify=False)
        new_obj = _PB_STATES[new](cb, old_obj, notify=False)
        for listener in list(self._st.listeners):
            try:
                listener.state_change(cb, old_obj, new_obj)
            except Exception:
                log.exception("ymguard: breaker listener %r failed", listener)

    def notify_outcome(self, failure: BaseException | None) -> None:
        """Call every listener's ``failure`` (with the error) or ``success``."""
        cb: Any = self
        for listener in list(self._st.hearing):
            try:
                if failure is None:
                    listener.success(cb)
                else:
                    listener.failure(cb, failure)
            except Exception:
                log.exception("ymguard: breaker listener %r failed", listener)

    # -- transitions ---------------------------------------------------------------------

    def _refusal(self, retry_after: float) -> CircuitOpen:
        return CircuitOpen(self.resource, self.description, retry_after=max(0.0, retry_after))

    async def acquire(self) -> _Probe | None:
        """Admit a call: ``None`` for an ordinary call, a probe token, or raise CircuitOpen."""
        st = self._st
        if self._remote:
            self._state.start()
            if not st.known:
                await self._learn()
        if st.state is CLOSED:
            return None
        now = time.monotonic()
        if st.state is OPEN:
            if now < st.probe_at:
                raise self._refusal(st.probe_at - now)
        elif now < st.lease_until:
            # Half-open: the probe is running now, its answer is about to come.
            raise self._refusal(1.0)
        if not self._remote:
            return self._probe_locally()
        if st.busy:  # this process is asking Redis already; one attempt per process
            raise self._refusal(1.0)
        st.busy = True
        owner = secrets.token_hex(8)
        try:
            reply = await self._state.probe(owner, self.lease_seconds)
        except StorageUnavailable:
            if self._on_outage() == "open":
                return None
            return self._probe_locally()
        finally:
            st.busy = False
        st.apply(reply, fresh=True)
        if int(reply[0]):
            st.owner = owner
            return _Probe(owner, local=False)
        if st.state is CLOSED:
            return None
        if st.state is OPEN:
            raise self._refusal(int(reply[3]) / 1000.0)
        raise self._refusal(1.0)

    async def _learn(self) -> None:
        """Wait for the first read of the state from Redis before admitting a call.

        Until it has answered, the local copy's CLOSED is only a default: a process started
        while the breaker is open would let calls through it. Every caller waits for the
        one read in flight. If Redis cannot answer, ``on_storage_error`` decides: ``closed``
        refuses the call, ``local`` and ``open`` decide on the local copy (the next
        (re)subscription of the subscriber reads it again).
        """
        task = self._state.learn()
        if task is None:  # pragma: no cover - acquire runs on a loop
            return
        try:
            await asyncio.shield(task)
        except StorageUnavailable:
            if self._st.known:  # a message taught it meanwhile
                return
            self._on_outage()

    def _on_outage(self) -> str:
        return self.store.on_outage(
            StorageBlocked(self.resource, self.description, retry_after=1.0)
        )

    def _probe_locally(self) -> _Probe:
        owner = secrets.token_hex(8)
        self._st.move_locally(HALF_OPEN, lease_in=self.lease_seconds, owner=owner)
        return _Probe(owner, local=True)

    async def trip(self) -> None:
        """Open a closed breaker (a no-op if it is not closed any more).

        The local copy opens at once, before Redis is told: the calls that arrive during
        the round trip are refused, so a trip lets no more errors through on Redis than
        on the memory store. The copy keeps its version, so Redis's reply (or the trip's
        own message) replaces its timers with the server's.
        """
        st = self._st
        if st.state is not CLOSED:
            return
        if not self._remote:
            st.move_locally(OPEN, probe_in=self.open_seconds)
            return
        st.move(OPEN, probe_in=self.open_seconds)
        st.busy = True  # no probe attempt of this process before Redis has the trip
        try:
            reply = await self._state.open(self.open_seconds)
        except StorageUnavailable:
            # Every policy keeps the local copy open: it only refuses this process's
            # calls. It has moved on its own now: whatever Redis says next wins.
            st.version = -1
            return
        finally:
            st.busy = False
        st.apply(reply)

    async def probe_done(self, probe: _Probe, ok: bool) -> None:
        """The probe's outcome: close the breaker (``ok``) or re-open it with a fresh timer."""
        st = self._st
        if self._remote and not probe.local:
            try:
                reply = await self._state.result(probe.owner, ok, self.open_seconds)
            except StorageUnavailable:
                # Decide on the local copy, as the memory store would. Redis may stay
                # half-open with this probe's version: the copy is marked as moved on its
                # own, so the next reply (a trip's, a resync's) wins over it.
                pass
            else:
                st.apply(reply)
                return
        if st.state is HALF_OPEN and st.owner == probe.owner:
            if ok:
                st.move_locally(CLOSED)
            else:
                st.move_locally(OPEN, probe_in=self.open_seconds)


# -- the checks --------------------------------------------------------------------------


def _admit(reply: Any) -> None:
    return None


#: The stage of a closed breaker: admitted, no store call, no token.
_CLOSED = Stage(None, None, _admit)


def _hears_outcomes(listener: Any) -> bool:
    """Whether ``listener`` does anything with a call's outcome: its ``success`` or
    ``failure`` is not pybreaker's base class's (which does nothing)."""
    base = pybreaker.CircuitBreakerListener
    kind = type(listener)
    return getattr(kind, "success", None) is not base.success or (
        getattr(kind, "failure", None) is not base.failure
    )


class BreakerCheck:
    """A ``breaker`` rule of a resource: decides on the resource's statistics.

    Args:
        breaker: the breaker's state on the store.
        rule: the rule.
        stats: the resource's statistics (registered for the rule's window and slow
            threshold here).
    """

    kind = "breaker"

    def __init__(self, breaker: Breaker, rule: BreakerRule, stats: ResourceStats) -> None:
        self.breaker = breaker
        self.rule = rule
        self.stats = stats
        self.error_statuses = frozenset(rule.error_statuses)
        self.strategy = rule.strategy
        self.threshold = rule.threshold
        stats.widen(rule.window_seconds)
        self.slow_index = -1
        self.max_rt_ms = math.inf
        if rule.strategy == "slow_ratio":
            assert rule.max_rt_ms is not None
            self.max_rt_ms = rule.max_rt_ms
            self.slow_index = stats.track_slow(rule.max_rt_ms)
        # The reset bucket's slot, length and totals at the reset (see ``on_reset``).
        self._base: tuple[int, float, Counts] | None = None
        self._pending = False  # the last look: over the threshold, short of min_requests
        self._look_at = 0.0  # when a good call looks at the window next
        self._st = breaker._st
        self._st.watchers.add(self)
        self._remote = breaker._remote
        self._state = breaker._state
        # On Redis a closed breaker rides in the chain's batch of store calls, so that it
        # does not split the round trip of the checks around it.
        self.stage_enter: Callable[[Context], Stage | None] | None = (
            self._stage_enter if self._remote else None
        )

    def __repr__(self) -> str:
        return f"BreakerCheck({self.breaker.resource!r}, {self.breaker.description!r})"

    def _stage_enter(self, ctx: Context) -> Stage | None:
        """A closed copy that answers alone joins the chain's batch (no store call);
        anything else takes the plain ``enter``."""
        st = self._st
        if st.state is CLOSED and st.known and (not self._remote or self._state.running()):
            return _CLOSED
        return None

    def enter_fast(self, ctx: Context) -> Any:
        """:meth:`enter` without a coroutine while a known closed copy answers alone
        (None: admitted); else ``AWAIT`` (the chain awaits :meth:`enter`)."""
        st = self._st
        if st.state is CLOSED and st.known and (not self._remote or self._state.running()):
            return None
        return AWAIT

    async def enter(self, ctx: Context) -> Any:
        """Admit the call (``None``, or the probe token) or raise :class:`CircuitOpen`."""
        st = self._st
        if st.state is CLOSED and st.known:
            # A closed local copy answers alone once read and while it is kept fresh:
            # always on memory, on Redis while the subscriber runs on this loop (else
            # ``acquire`` starts it, and a copy never read waits for its first read).
            if not self._remote or self._state.running():
                return None
        return await self.breaker.acquire()

    async def exit(self, ctx: Context, token: Any) -> None:
        """Judge a probe, or open the breaker if the window now passes the threshold."""
        if not has_outcome(ctx):
            # Blocked after us, replayed, cancelled or abandoned by its client: never
            # counted; a probe goes back to open (Sentinel#1638).
            if token is not None:
                await self.breaker.probe_done(token, ok=False)
            return
        failure = self._failure(ctx)
        if self._st.hearing:
            self.breaker.notify_outcome(failure)
        if token is not None:
            ok = failure is None and not isinstance(ctx.error, asyncio.CancelledError)
            await self.breaker.probe_done(token, ok)
            return
        if self._st.state is not CLOSED:
            return
        # Summing the window costs more than the rest of the check, so a good call only
        # looks when it can change the answer: when the last look found the threshold
        # passed but too few calls (the good call may be the min_requests-th), or once
        # per bucket, for the ratio that rises as good calls slide out of the window.
        if failure is None and not self._pending:
            now = time.monotonic()
            if now < self._look_at:
                return
            self._look_at = now + self.stats.window_seconds / self.stats.buckets
        if self.exceeded():
            await self.breaker.trip()

    def exit_fast(self, ctx: Context, token: Any) -> Any:
        """:meth:`exit` without a coroutine when it has nothing to await (None): a closed
        breaker's good call between two looks at the window, or a call without outcome
        that was no probe. Else ``AWAIT``, having done nothing: the chain awaits
        :meth:`exit`."""
        if token is not None:
            return AWAIT  # a probe: judged on the store
        if not has_outcome(ctx):
            return None
        # _failure for the usual call (every call runs this): an error says is_error, and
        # only a slow-call rule pays for _failure's look at the time.
        if (
            self._st.state is not CLOSED
            or self._pending
            or is_error(ctx, self.error_statuses)
            or (self.slow_index >= 0 and self._failure(ctx) is not None)
        ):
            return AWAIT
        now = ctx.now if SHARED_CLOCK and ctx.now else time.monotonic()
        if now >= self._look_at:
            return AWAIT  # this good call looks at the window (see exit)
        if self._st.hearing:
            self.breaker.notify_outcome(None)
        return None

    def _failure(self, ctx: Context) -> BaseException | None:
        """What makes this call bad for this breaker (an error, or slowness), or None."""
        if is_error(ctx, self.error_statuses):
            return ctx.error or ErrorStatus(ctx.status or 0)
        if self.slow_index >= 0:
            rt_ms = (time.perf_counter() - ctx.start) * 1000.0
            if rt_ms > self.max_rt_ms:
                return SlowCall(rt_ms, self.max_rt_ms)
        return None

    def on_reset(self, now: float) -> None:
        """The breaker closed: remember the current bucket so it starts from zero."""
        # ``counts(since=)`` keeps the whole bucket the reset falls in (the probe, late
        # calls from before the trip); its totals at this instant are taken off later.
        blen = self.stats.window_seconds / self.stats.buckets
        self._base = (int(now / blen), blen, self.stats.counts(blen, since=now))

    def counts(self) -> Counts:
        """The statistics this breaker decides on: its window, since its last reset."""
        stats = self.stats
        c = stats.counts(self.rule.window_seconds, since=self._st.reset_at)
        if self._base is None:
            return c
        slot, blen, base = self._base
        span = min(stats.buckets, max(1, round(self.rule.window_seconds / blen)))
        if blen != stats.window_seconds / stats.buckets or (
            int(time.monotonic() / blen) - span + 1 > slot
        ):
            self._base = None  # the reset bucket has left the window
            return c
        return Counts(
            passed=max(0, c.passed - base.passed),
            blocked=max(0, c.blocked - base.blocked),
            success=max(0, c.success - base.success),
            errors=max(0, c.errors - base.errors),
            rt_total_ms=max(0.0, c.rt_total_ms - base.rt_total_ms),
            slow=tuple(max(0, a - b) for a, b in zip_longest(c.slow, base.slow, fillvalue=0)),
        )

    def exceeded(self) -> bool:
        """Whether the window passes the threshold (Sentinel's boundaries)."""
        c = self.counts()
        total = c.completed
        if total == 0:
            over = False
        elif self.strategy == "error_count":
            over = c.errors > self.threshold
        elif self.strategy == "error_ratio":
            over = c.errors / total > self.threshold
        else:
            ratio = c.slow[self.slow_index] / total
            # Sentinel opens at exactly 100 % slow when the threshold is 1.0.
            over = ratio > self.threshold or (self.threshold == 1.0 and ratio == 1.0)
        enough = total >= self.rule.min_requests
        self._pending = over and not enough
        return over and enough

    def status(self) -> BreakerStatus:
        """This breaker for ``Guard.breakers()``."""
        b = self.breaker
        return BreakerStatus(
            b.name,
            b.resource,
            self.strategy,
            b.state.value,
            self.counts(),
            self.threshold,
            b.retry_after,
        )


_PROBE = "probe"


class PybreakerCheck:
    """An existing ``pybreaker.CircuitBreaker`` guarding a resource.

    pybreaker's own ``call`` cannot guard a coroutine (it would count the un-awaited
    coroutine as a success) and holds its thread lock across the whole call, so it
    never runs the endpoint here. Instead the check reads its state at ``enter`` (one
    probe at a time while half-open, as ours) and replays the call's outcome through
    ``cb.call`` at ``exit``, so pybreaker's counters, ``fail_max``, ``exclude`` and
    listeners behave as the user configured them. Its lock is taken only for that replay
    and never across an ``await``; if another thread holds it, the replay runs in a
    worker thread instead of blocking the event loop. Only in-memory storage is
    accepted: ``CircuitRedisStorage`` is synchronous redis-py, a blocking call on every
    state read (use a ``breaker:`` rule on a Redis store for shared state).
    """

    kind = "breaker"

    def __init__(
        self,
        resource: str,
        cb: pybreaker.CircuitBreaker,
        error_statuses: Iterable[int] = DEFAULT_ERROR_STATUSES,
        stats: ResourceStats | None = None,
    ) -> None:
        storage = getattr(cb, "_state_storage", None)
        if isinstance(storage, pybreaker.CircuitRedisStorage):
            raise ValueError(
                "a pybreaker breaker with CircuitRedisStorage would make a blocking Redis "
                "call on every request; use a breaker: rule on a Redis store to share state"
            )
        self.resource = resource
        self.cb = cb
        self.error_statuses = frozenset(error_statuses)
        self.stats = stats
        self.description = f"pybreaker {cb.name or ''}".rstrip()
        self._probe_until = 0.0  # while this is ahead, a probe of ours runs

    def __repr__(self) -> str:
        return f"PybreakerCheck({self.resource!r}, {self.cb.name!r})"

    async def _locked(self, fn: Any, *args: Any) -> Any:
        lock = getattr(self.cb, "_lock", None)
        if lock is None or lock.acquire(blocking=False):
            try:
                return fn(*args)
            finally:
                if lock is not None:
                    lock.release()
        # Another thread is inside the breaker (pybreaker holds its lock across calls).
        return await asyncio.to_thread(fn, *args)

    def _opened_remaining(self) -> float:
        opened_at = self.cb._state_storage.opened_at
        if opened_at is None:
            return 0.0
        elapsed = (datetime.now(UTC) - opened_at).total_seconds()
        return float(self.cb.reset_timeout) - elapsed

    async def enter(self, ctx: Context) -> Any:
        """Admit the call, let one probe through, or raise :class:`CircuitOpen`."""
        state = self.cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return None
        now = time.monotonic()
        if now < self._probe_until:
            raise CircuitOpen(self.resource, self.description, retry_after=1.0)
        if state == pybreaker.STATE_OPEN:
            remaining = self._opened_remaining()
            if remaining > 0:
                raise CircuitOpen(self.resource, self.description, retry_after=remaining)
            await self._locked(self.cb.half_open)
        self._probe_until = now + max(float(self.cb.reset_timeout), 1.0)
        return _PROBE

    def _replay(self, failure: BaseException | None) -> None:
        def outcome() -> None:
            if failure is not None:
                raise failure

        with suppress(BaseException):  # CircuitBreakerError on a trip, or the failure
            self.cb.call(outcome)

    async def exit(self, ctx: Context, token: Any) -> None:
        """Replay the outcome through the pybreaker breaker (or re-open it for a probe)."""
        probe = token is _PROBE
        if probe:
            self._probe_until = 0.0
        if not has_outcome(ctx):
            # No outcome to report: a probe goes back to open, other calls are not counted.
            if probe and self.cb.current_state == pybreaker.STATE_HALF_OPEN:
                await self._locked(self.cb.open)
            return
        # Only the state the call was admitted in may hear its outcome: a call admitted
        # while closed that ends after a trip must not act as the half-open probe.
        wanted = pybreaker.STATE_HALF_OPEN if probe else pybreaker.STATE_CLOSED
        if self.cb.current_state != wanted:
            return
        failure: BaseException | None = None
        if ctx.error is not None:
            failure = ctx.error
        elif ctx.status in self.error_statuses:
            failure = ErrorStatus(ctx.status or 0)
        await self._locked(self._replay, failure)

    def status(self) -> BreakerStatus:
        """This breaker for ``Guard.breakers()``."""
        state = self.cb.current_state
        retry = max(0.0, self._opened_remaining()) if state == pybreaker.STATE_OPEN else None
        counts = self.stats.counts() if self.stats is not None else Counts(0, 0, 0, 0, 0.0)
        return BreakerStatus(
            self.cb.name or self.resource,
            self.resource,
            "pybreaker",
            state,
            counts,
            float(self.cb.fail_max),
            retry,
        )


# -- building --------------------------------------------------------------------------


def breaker_error_statuses(rules: Sequence[BreakerRule]) -> frozenset[int]:
    """The statuses the resource's statistics count as errors: the union of its rules'."""
    if not rules:
        return DEFAULT_ERROR_STATUSES
    return frozenset(s for rule in rules for s in rule.error_statuses)


def _error_statuses(rules: Sequence[BreakerRule]) -> frozenset[int] | None:
    return frozenset(s for rule in rules for s in rule.error_statuses) if rules else None


def _build(env: Env, resource: str, rules: Sequence[BreakerRule]) -> list[Any]:
    checks: list[Any] = build_breaker_checks(
        env.store, resource, rules, env.stats(resource), env.listeners(resource)
    )
    return checks + list(env.attached(resource))  # pybreakers attached by code


#: The ``breaker`` kind's registry entry (pybreakers attached by code run after the rules').
KIND = Kind("breaker", 50, BreakerRule, _build, _error_statuses)


def build_breaker_checks(
    store: Store,
    resource: str,
    rules: Sequence[BreakerRule],
    stats: ResourceStats,
    listeners: Iterable[Any] = (),
) -> list[BreakerCheck]:
    """The checks for a resource's ``breaker`` rules, in file order.

    Args:
        store: where the breakers' state lives.
        resource: the resource name.
        rules: its ``breaker`` rules.
        stats: its statistics, which the checks read.
        listeners: pybreaker-style listeners to register on each breaker.
    """
    listeners = list(listeners)
    checks: list[BreakerCheck] = []
    for index, (rule, identity) in enumerate(zip(rules, rule_ids(rules), strict=True)):
        threshold = f"{rule.threshold:g}"
        if rule.strategy == "slow_ratio":
            threshold += f" max_rt_ms={rule.max_rt_ms:g}"
        breaker = Breaker(
            store,
            f"{resource}#{index}",
            open_seconds=rule.open_seconds,
            lease_seconds=rule.lease_seconds,
            resource=resource,
            description=f"breaker[{index}] {rule.strategy}>{threshold}",
            identity=f"{resource}#{identity}",  # the rule, not its place in the list
        )
        for listener in listeners:
            breaker.add_listener(listener)
        checks.append(BreakerCheck(breaker, rule, stats))
    return checks


__all__ = [
    "KIND",
    "Breaker",
    "BreakerCheck",
    "BreakerRule",
    "BreakerState",
    "BreakerStatus",
    "ErrorStatus",
    "PybreakerCheck",
    "SlowCall",
    "breaker_error_statuses",
    "build_breaker_checks",
]
