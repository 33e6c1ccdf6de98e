"""Breaker state: one breaker's CLOSED / OPEN / HALF_OPEN on a store, and its local copy.

On the memory store the state lives in the store's dict and the copy is the truth. On
Redis it lives in one hash per breaker, changed only by the ``breaker_*.lua`` scripts,
and every transition is published: each process keeps a local copy of each breaker,
refreshed through the store's pub/sub service (:class:`BreakerCopies` on
:mod:`ymguard.storage.pubsub`), so a closed (or open) breaker answers without a Redis call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import pybreaker

from ..errors import StorageUnavailable
from ..storage.pubsub import PubSub, close_pubsub, pubsub_for
from ..storage.tasks import stopped
from ._lua import lua

if TYPE_CHECKING:
    from ..storage.base import Store
    from ..storage.memory import MemoryStore
    from ..storage.redis import RedisStore

log = logging.getLogger("ymguard.breaker")


class BreakerState(StrEnum):
    """A breaker's state; the values are pybreaker's state names."""

    CLOSED = pybreaker.STATE_CLOSED
    OPEN = pybreaker.STATE_OPEN
    HALF_OPEN = pybreaker.STATE_HALF_OPEN


CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
BY_CODE = (CLOSED, OPEN, HALF_OPEN)  # the Lua scripts' state codes


class Notified(Protocol):
    """A breaker object: tells the listeners of a state change."""

    def notify_state_change(self, old: BreakerState, new: BreakerState) -> None:
        """Call every listener's ``state_change``."""


class Watcher(Protocol):
    """A breaker check: told when its breaker closes (a fresh statistics window)."""

    @property
    def breaker(self) -> Notified:
        """The breaker object the check drives."""

    def on_reset(self, now: float) -> None:
        """The breaker closed at ``now`` (``time.monotonic()``)."""


class LocalCopy:
    """One breaker's state in this process: the truth on memory, a fresh copy on Redis.

    Shared by every :class:`Breaker` object of one name on one store (a reload builds
    new objects; they find the same state, listeners included). Times are
    ``time.monotonic()`` instants. ``version`` is the version of the Redis state the copy
    holds (0: no hash, closed), or ``-1`` once the copy has moved on its own while Redis
    was unavailable: it then differs from Redis, so whatever Redis says next wins.
    ``known`` is False on Redis until a first reply or message arrives: until then the
    closed copy is only a default, and no call may be admitted on it.
    """

    __slots__ = (
        "breaker",
        "busy",
        "hearing",
        "known",
        "lease_until",
        "listeners",
        "owner",
        "probe_at",
        "reading",
        "reset_at",
        "state",
        "version",
        "watchers",
    )

    def __init__(self, known: bool = True) -> None:
        self.state = CLOSED
        self.version = 0
        self.known = known
        self.reading: asyncio.Task[None] | None = None  # the first read from Redis
        self.probe_at = 0.0
        self.lease_until = 0.0
        self.owner = ""
        self.reset_at: float | None = None
        self.busy = False  # one Redis transition of this process at a time, per breaker
        self.listeners: list[Any] = []
        # Those of them that hear each call's outcome (``success``/``failure`` of their own).
        self.hearing: list[Any] = []
        self.watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()
        # The newest Breaker object, for the listeners; weak, as the copies keep this state
        # and a Breaker keeps its store (the copies' weak key) alive.
        self.breaker: weakref.ref[Notified] | None = None

    def move(
        self, new: BreakerState, probe_in: float = 0.0, lease_in: float = 0.0, owner: str = ""
    ) -> None:
        """Enter ``new``; a close resets the window, a change notifies the listeners."""
        old = self.state
        now = time.monotonic()
        self.state = new
        self.probe_at = now + probe_in
        self.lease_until = now + lease_in
        self.owner = owner
        if new is CLOSED and old is not CLOSED:
            self.reset_at = now
            for check in list(self.watchers):
                check.on_reset(now)
        if new is not old and self.listeners:
            breaker = self.breaker() if self.breaker is not None else None
            if breaker is None:  # the newest object is gone: any other one will do
                breaker = next((check.breaker for check in self.watchers), None)
            if breaker is not None:
                breaker.notify_state_change(old, new)

    def move_locally(
        self, new: BreakerState, probe_in: float = 0.0, lease_in: float = 0.0, owner: str = ""
    ) -> None:
        """Move without Redis (the memory store, or an outage): the next reply wins."""
        self.version = -1
        self.move(new, probe_in, lease_in, owner)

    def apply(self, reply: Sequence[Any], fresh: bool = False) -> None:
        """Take a state from Redis (a script reply or a published message) if it is newer.

        ``reply`` is ``(_, state code, version, ms until probe, ms until lease end)``;
        version 0 means the hash does not exist (closed). A ``fresh`` reply (a probe
        attempt's) is also taken at the same version (its timers are newer) and with a
        missing hash (Redis lost it: closed is the truth).
        """
        self.known = True  # any answer from Redis, even an older one, ends the default
        version = int(reply[2])
        if version <= self.version and not (fresh and version in (0, self.version)):
            return
        self.version = version
        self.move(BY_CODE[int(reply[1])], int(reply[3]) / 1000.0, int(reply[4]) / 1000.0)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class BreakerCopies:
    """The local copies of one Redis store's breakers, kept fresh by the store's pub/sub.

    It watches one pattern on the store's :class:`~ymguard.storage.pubsub.PubSub`, every
    breaker channel under the store's prefix (a breaker created later needs no new
    subscription), and re-reads every known breaker after each (re)subscription, so a
    message lost while disconnected costs nothing.

    It holds its store weakly (``copies`` is keyed weakly by the store): a store dropped
    without ``Guard.aclose`` can be collected, and its pub/sub reader then ends by itself.
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = weakref.ref(store)
        self.states: dict[str, tuple[str, LocalCopy]] = {}  # channel -> (hash key, state)
        self.pattern = _glob_escape(store.key_prefix) + ":{breaker:*}:events"
        self.closed = False
        self.service: PubSub | None = None  # the pub/sub it watches on, once started
        self.reads: set[asyncio.Task[None]] = set()  # first reads in flight
        self._read = store.script(lua("breaker_read", "breaker_lib"))

    def state(self, key: str, channel: str) -> LocalCopy:
        """The local copy of the breaker at ``key``, created (and its read started) on first use."""
        found = self.states.get(channel)
        if found is not None:
            return found[1]
        st = LocalCopy(known=False)
        self.states[channel] = (key, st)
        self.learn(channel)  # read it now, so the first call rarely waits
        return st

    def learn(self, channel: str) -> asyncio.Task[None] | None:
        """The read of a copy not yet known: the one in flight, or a new one.

        None when no event loop runs (it is started at the first call instead).
        """
        st = self.states[channel][1]
        task = st.reading
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if task is None or task.done() or task.get_loop() is not loop:
            task = st.reading = loop.create_task(self._read_one(channel))
            self.reads.add(task)
            task.add_done_callback(self._read_done)
        return task

    def _read_done(self, task: asyncio.Task[None]) -> None:
        self.reads.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that awaited it got it too

    async def _read_one(self, channel: str) -> None:
        key, st = self.states[channel]
        store = self._store()
        if store is None:
            raise StorageUnavailable("the store was closed")
        reply = await store.run(self._read, (key,), ())
        del store
        st.apply(reply)

    def start(self) -> bool:
        """Watch the breakers' pattern on the running loop; False if it cannot run."""
        if self.closed:
            return False
        service = self.service
        if service is None or not service.running():
            store = self._store()
            if store is None:
                return False
            try:
                service = self.service = pubsub_for(store)
            except RuntimeError:  # no event loop runs: the first call starts it
                return False
        return service.watch(self.pattern, self._dispatch, self._resync)

    def running(self) -> bool:
        """Whether the copies are kept fresh on the running loop."""
        service = self.service
        return service is not None and self.pattern in service.patterns and service.running()

    async def _resync(self) -> None:
        for channel in list(self.states):
            try:
                await self._read_one(channel)
            except StorageUnavailable:
                pass  # the next (re)subscription reads it again

    def _dispatch(self, channel: str, data: bytes) -> None:
        found = self.states.get(channel)
        if found is None:
            return
        try:
            version, state, probe_in, lease_in = (int(x) for x in data.split(b","))
        except ValueError:
            log.warning("ymguard breakers: ignored a malformed message on %r", channel)
            return
        found[1].apply((0, state, version, probe_in, lease_in))

    async def aclose(self) -> None:
        """Stop the reads in flight; the copies are no longer kept fresh."""
        self.closed = True
        await stopped(list(self.reads))


copies: weakref.WeakKeyDictionary[Store, BreakerCopies] = weakref.WeakKeyDictionary()


def copies_for(store: RedisStore) -> BreakerCopies:
    """The local copies of ``store``'s breakers (made on first use)."""
    found = copies.get(store)
    if found is None:
        found = copies[store] = BreakerCopies(store)
    return found


async def close_breakers(store: Store) -> None:
    """Stop keeping the breaker copies of a store fresh: their reads and its pub/sub.

    ``Store.close_tasks`` (``Guard.aclose``) calls it; breakers made afterwards start
    afresh.
    """
    found = copies.pop(store, None)
    if found is not None:
        await found.aclose()
    await close_pubsub(store)


class BreakerStore(Protocol):
    """One breaker's state on a store: its local copy and the transitions on the store.

    ``remote`` is False on the memory store: the copy is the truth, and the breaker moves
    it itself (the transition calls are never made). On Redis each transition is one
    script whose reply is ``(ok, state code, version, ms until probe, ms until lease end)``.
    """

    remote: bool
    copy: LocalCopy

    def start(self) -> bool:
        """Keep the copy fresh on the running loop; False if it cannot run."""

    def running(self) -> bool:
        """Whether the copy is kept fresh on the running loop."""

    def learn(self) -> asyncio.Task[None] | None:
        """The first read of the copy from the store (in flight or new), or None."""

    async def probe(self, owner: str, lease_seconds: float) -> Sequence[Any]:
        """Let ``owner``'s call be the probe if the breaker is open and its time has come."""

    async def open(self, open_seconds: float) -> Sequence[Any]:
        """Open a closed breaker for ``open_seconds``."""

    async def result(self, owner: str, ok: bool, open_seconds: float) -> Sequence[Any]:
        """The probe's outcome: close (``ok``) or re-open for ``open_seconds``."""


class MemoryBreakerStore:
    """A breaker in process: the copy in the store's dict is the truth."""

    remote = False

    def __init__(self, store: MemoryStore, key: str) -> None:
        copy = store.data.get(key)
        if not isinstance(copy, LocalCopy):
            copy = store.data[key] = LocalCopy()
        self.copy = copy

    def start(self) -> bool:
        """Nothing to keep fresh."""
        return True

    def running(self) -> bool:
        """Always fresh."""
        return True

    def learn(self) -> asyncio.Task[None] | None:
        """Nothing to read."""
        return None

    async def probe(self, owner: str, lease_seconds: float) -> Sequence[Any]:
        """Never called: the breaker moves the copy itself."""
        raise NotImplementedError

    async def open(self, open_seconds: float) -> Sequence[Any]:
        """Never called: the breaker moves the copy itself."""
        raise NotImplementedError

    async def result(self, owner: str, ok: bool, open_seconds: float) -> Sequence[Any]:
        """Never called: the breaker moves the copy itself."""
        raise NotImplementedError


class RedisBreakerStore:
    """A breaker on Redis: one hash, ``breaker_*.lua``, a copy kept fresh by pub/sub."""

    remote = True

    def __init__(self, store: RedisStore, name: str) -> None:
        self.store = store
        self.key = store.key("breaker", name)
        self.channel = store.key("breaker", name, "events")
        self.copies = copies_for(store)
        self.copy = self.copies.state(self.key, self.channel)
        self._keys = (self.key, self.channel)
        self._open = store.script(lua("breaker_open", "breaker_lib"))
        self._probe = store.script(lua("breaker_probe", "breaker_lib"))
        self._result = store.script(lua("breaker_result", "breaker_lib"))
        self.copies.start()

    def start(self) -> bool:
        """(Re)start keeping the copy fresh on the running loop."""
        return self.copies.start()

    def running(self) -> bool:
        """Whether the copy is kept fresh on the running loop."""
        return self.copies.running()

    def learn(self) -> asyncio.Task[None] | None:
        """The first read of the copy (see :meth:`BreakerCopies.learn`)."""
        return self.copies.learn(self.channel)

    async def probe(self, owner: str, lease_seconds: float) -> Sequence[Any]:
        """``breaker_probe.lua``."""
        reply: Sequence[Any] = await self.store.run(
            self._probe, self._keys, (owner, math.ceil(lease_seconds * 1000))
        )
        return reply

    async def open(self, open_seconds: float) -> Sequence[Any]:
        """``breaker_open.lua``."""
        reply: Sequence[Any] = await self.store.run(
            self._open, self._keys, (math.ceil(open_seconds * 1000),)
        )
        return reply

    async def result(self, owner: str, ok: bool, open_seconds: float) -> Sequence[Any]:
        """``breaker_result.lua``."""
        reply: Sequence[Any] = await self.store.run(
            self._result,
            self._keys,
            (owner, 1 if ok else 0, math.ceil(open_seconds * 1000)),
        )
        return reply


__all__ = [
    "BY_CODE",
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "BreakerCopies",
    "BreakerState",
    "BreakerStore",
    "LocalCopy",
    "MemoryBreakerStore",
    "RedisBreakerStore",
    "close_breakers",
    "copies_for",
]
