"""One pub/sub connection per Redis store and event loop, shared by every user.

Two kinds of subscription ride on it:

- **Patterns** are permanent (the breakers' transitions; next, rule pushes). A pattern is
  subscribed as long as the service runs; after every (re)connection it is subscribed
  again and its ``resync`` callback is awaited, so that what was published while the
  connection was down is read back instead of lost. The service reconnects by itself
  (every ``retry_interval`` of the store) while any pattern is watched.
- **Channels** are on demand (the semaphores' wake-ups). A listener registers an
  :class:`asyncio.Event` under an id; a message on the channel is the ids it wakes,
  separated by spaces. :meth:`PubSub.listen` waits (up to a deadline) for the server to
  confirm the subscription, so the caller knows whether wake-ups are reliable. A channel
  nobody listens to for :data:`LINGER` seconds is unsubscribed. When the connection
  breaks, every channel is forgotten and every listener woken: it looks again and
  subscribes afresh.

One reader task reads the connection for both; it ends when nothing is left to read (no
pattern, no channel) and is started again on demand. Pub/sub rather than BLPOP: one
connection carries every breaker and semaphore of the store, where BLPOP would park one
pooled connection per waiting task.

The service holds its store weakly (the map of services is keyed weakly by store): a
store dropped without :meth:`~ymguard.storage.Store.close_tasks` is collected, and the
reader then ends by itself. The asyncio Redis Cluster client has no pub/sub: on a cluster
the service subscribes on a plain connection to the URI's node (a PUBLISH on a cluster
reaches the subscribers of every node). A client with no pub/sub at all makes the service
say so (:attr:`PubSub.unsupported`); breaker copies are then read from Redis instead and
waiters nap until the next lease expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .redis import OUTAGE_ERRORS

if TYPE_CHECKING:
    from .base import Store
    from .redis import RedisStore

log = logging.getLogger("ymguard")

#: How long a channel nobody listens to stays subscribed (a burst of waiters reuses it).
LINGER = 2.0
#: How long a read waits for a message before the reader looks after its connection: a
#: PING finds a dead server, and channels past their linger are dropped.
IDLE_SECONDS = 1.0


@dataclass(slots=True)
class Pattern:
    """A permanent subscription: who is told of its messages and of every reconnection.

    Attributes:
        on_message: called with the channel and the data of every message.
        resync: awaited after every (re)subscription, to read back what a lost message
            would have said.
    """

    on_message: Callable[[str, bytes], None]
    resync: Callable[[], Awaitable[None]]


class PubSub:
    """The pub/sub service of one Redis store on one event loop (see the module).

    Attributes:
        loop: the event loop it runs on (a service used from a new loop starts afresh).
        task: the reader task, while it runs.
        pubsub: the redis-py pub/sub connection, while the reader has one.
        ready: True once every pattern is subscribed and resynced on the current
            connection (False while (re)connecting).
        listeners: per channel, the events of its listeners by id.
        unsupported: the client has no pub/sub (the asyncio cluster client).
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = weakref.ref(store)
        self.client: Any = store.pubsub_client
        self.uri = store.shown  # for logs: without its password
        self.loop = asyncio.get_running_loop()
        self.patterns: dict[str, Pattern] = {}
        self.listeners: dict[str, dict[str, asyncio.Event]] = {}
        self.task: asyncio.Task[None] | None = None
        self.pubsub: Any = None
        self.ready = False
        self.unsupported = False
        self.closed = False
        # Per channel, set once its subscription is confirmed (or abandoned: see
        # ``listening``); per channel nobody listens to, since when (loop clock).
        self._confirmed: dict[str, asyncio.Event] = {}
        self._idle: dict[str, float] = {}
        self._connected = asyncio.Event()
        self._warned = False

    # -- lifecycle ---------------------------------------------------------------------------

    def _rebind(self) -> None:
        """Start afresh on the running loop: what the old loop held can never run again."""
        self.loop = asyncio.get_running_loop()
        self.task = None
        self.pubsub = None
        self.ready = False
        self.listeners = {}
        self._confirmed = {}
        self._idle = {}
        self._connected = asyncio.Event()

    def running(self) -> bool:
        """Whether the reader runs on the running event loop."""
        task = self.task
        if task is None or task.done():
            return False
        try:
            return task.get_loop() is asyncio.get_running_loop()
        except RuntimeError:
            return False

    def _start(self) -> bool:
        """Start the reader unless it runs; False if it cannot (closed, no pub/sub)."""
        if self.closed or self.unsupported:
            return False
        task = self.task
        if task is None or task.done():
            self.task = self.loop.create_task(self._run(), name=f"ymguard-pubsub {self.uri}")
        return True

    async def aclose(self) -> None:
        """Stop the reader and close the connection; listeners wake and look again."""
        self.closed = True
        task = self.task
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - close_tasks runs on a loop
            here = None
        if self.loop is not here:
            # A task of another loop: ask that loop to stop it, if it still runs at all.
            if task is not None and not task.done() and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(task.cancel)
            return
        if task is not None:
            while not task.done():
                # Cancel again until it lands: a redis-py read may swallow one cancellation.
                task.cancel()
                await asyncio.wait([task], timeout=0.05)
            self.task = None
        pubsub, self.pubsub = self.pubsub, None
        self._disconnected()
        self._forget_channels()
        if pubsub is not None:
            await _close(pubsub)

    # -- patterns ----------------------------------------------------------------------------

    def watch(
        self,
        pattern: str,
        on_message: Callable[[str, bytes], None],
        resync: Callable[[], Awaitable[None]],
    ) -> bool:
        """Subscribe to ``pattern`` for good, and keep the reader running for it.

        Cheap when already watched (callers may call it at every use). False if the
        service cannot run (closed, or no pub/sub on this client).
        """
        if pattern not in self.patterns:
            self.patterns[pattern] = Pattern(on_message, resync)
            pubsub = self.pubsub
            if pubsub is not None and self._connected.is_set() and self.running():
                # Added to a live connection: subscribe it now (a failure breaks the
                # connection, and the reconnection subscribes every pattern again).
                task = self.loop.create_task(self._add_pattern(pubsub, pattern))
                task.add_done_callback(_retrieve)
        return self._start()

    async def _add_pattern(self, pubsub: Any, pattern: str) -> None:
        self.ready = False
        with contextlib.suppress(Exception):
            await pubsub.psubscribe(pattern)
            await self.patterns[pattern].resync()
            if self.pubsub is pubsub:  # else the reconnection subscribes and resyncs it
                self.ready = True

    # -- channels ----------------------------------------------------------------------------

    def listening(self, channel: str) -> bool:
        """Whether ``channel``'s subscription is confirmed now."""
        confirmed = self._confirmed.get(channel)
        return confirmed is not None and confirmed.is_set() and self.pubsub is not None

    async def listen(
        self, channel: str, listener: str, deadline: float
    ) -> tuple[asyncio.Event, bool]:
        """Register ``listener`` on ``channel``: its event, and whether wake-ups are reliable.

        Waits for the server's confirmation of the subscription until ``deadline`` (event
        loop clock) at most.
        """
        listeners = self.listeners.setdefault(channel, {})
        event = listeners.get(listener)
        if event is None:
            event = listeners[listener] = asyncio.Event()
        self._idle.pop(channel, None)
        return event, await self._subscribe(channel, deadline)

    def unlisten(self, channel: str, listener: str) -> None:
        """Forget a listener (its channel lingers, then is unsubscribed)."""
        listeners = self.listeners.get(channel)
        if listeners is not None:
            listeners.pop(listener, None)
            if not listeners:
                del self.listeners[channel]
                if channel in self._confirmed:
                    self._idle[channel] = self.loop.time()

    async def _subscribe(self, channel: str, deadline: float) -> bool:
        if self.listening(channel):
            return True
        if not self._start():
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                confirmed = self._confirmed.get(channel)
                if confirmed is None:
                    confirmed = self._confirmed[channel] = asyncio.Event()
                    await self._send_subscribe(channel, confirmed)
                await confirmed.wait()
        return self.listening(channel)

    async def _send_subscribe(self, channel: str, confirmed: asyncio.Event) -> None:
        try:
            connected = self._connected
            await connected.wait()
            if connected is self._connected and self.pubsub is not None:
                await self.pubsub.subscribe(channel)
                return
        except BaseException as exc:
            self._abandon(channel, confirmed)
            if not isinstance(exc, OUTAGE_ERRORS):
                raise
            return
        self._abandon(channel, confirmed)  # the connection failed before it was up

    def _abandon(self, channel: str, confirmed: asyncio.Event) -> None:
        """Forget a subscription attempt; whoever waits on it wakes and finds none, and the
        next listener subscribes afresh."""
        if self._confirmed.get(channel) is confirmed:
            del self._confirmed[channel]
        confirmed.set()

    def _disconnected(self) -> None:
        """The connection is gone (or never came): wake whoever waits for it to be up."""
        self.ready = False
        connected, self._connected = self._connected, asyncio.Event()
        connected.set()

    def _forget_channels(self) -> None:
        """Every subscription is gone with its connection: wake everyone to look again."""
        confirmed, self._confirmed = self._confirmed, {}
        self._idle = {}
        for event in confirmed.values():
            event.set()
        for listeners in self.listeners.values():
            for event in listeners.values():
                event.set()

    # -- the reader --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                pubsub = self.client.pubsub()
            except (AttributeError, NotImplementedError):
                self.unsupported = True  # e.g. the asyncio cluster client
                self._disconnected()
                self._forget_channels()
                log.warning(
                    "ymguard: %s has no pub/sub; breakers read Redis, waiters nap", self.uri
                )
                return
            self.pubsub = pubsub
            try:
                if self.patterns:
                    await pubsub.psubscribe(*self.patterns)
                else:
                    await pubsub.connect()
                self._connected.set()  # channel subscriptions may go out now
                for pattern in list(self.patterns.values()):
                    await pattern.resync()
                self.ready = True
                if self._warned:
                    log.warning("ymguard: pub/sub on %s is back", self.uri)
                    self._warned = False
                await self._read(pubsub)
                return  # nothing left to read
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping():
                    return
                if self.patterns and not self._warned:
                    log.warning(
                        "ymguard: pub/sub on %s failed (%s: %s); breaker copies may lag until "
                        "it reconnects",
                        self.uri,
                        type(exc).__name__,
                        exc,
                    )
                    self._warned = True
                else:
                    log.debug("ymguard: pub/sub on %s lost: %r", self.uri, exc)
            finally:
                # Synchronously, before any await: a listener arriving now subscribes afresh.
                self._disconnected()
                if self.pubsub is pubsub:
                    self.pubsub = None
                    self._forget_channels()
                if self.task is asyncio.current_task() and not self.patterns:
                    self.task = None
                await _close(pubsub)
            if not self.patterns:
                return  # channels are subscribed again on demand, by their listeners
            store = self._store()
            if store is None:
                return
            interval = store.retry_interval
            del store  # not held while asleep
            await asyncio.sleep(interval)

    def _stopping(self) -> bool:
        # A cancellation that a redis-py read swallowed must still end the loop; so does a
        # service that moved on to another event loop (this reader's state is gone).
        task = asyncio.current_task()
        return (
            self.closed
            or self._store() is None
            or self.loop is not asyncio.get_running_loop()
            or (task is not None and task.cancelling() > 0)
        )

    async def _read(self, pubsub: Any) -> None:
        """Read messages until nothing is left to read (no pattern, no channel)."""
        while True:
            message = await pubsub.get_message(timeout=IDLE_SECONDS)
            if self._stopping():
                return
            if message is None:
                await self._sweep(pubsub)
                if not self.patterns and not self._confirmed and not self.listeners:
                    return
                await pubsub.ping()  # a dead server shows here, not in a silent read
                continue
            kind = message.get("type")
            if kind == "pmessage":
                found = self.patterns.get(_text(message.get("pattern")))
                data = message.get("data")
                if found is not None and isinstance(data, bytes):
                    found.on_message(_text(message.get("channel")), data)
            elif kind == "message":
                listeners = self.listeners.get(_text(message.get("channel")))
                if listeners:
                    for listener in _text(message.get("data")).split():
                        event = listeners.get(listener)
                        if event is not None:
                            event.set()
            elif kind == "subscribe":
                confirmed = self._confirmed.get(_text(message.get("channel")))
                if confirmed is not None:
                    confirmed.set()
            if self._idle:
                await self._sweep(pubsub)

    async def _sweep(self, pubsub: Any) -> None:
        """Unsubscribe the channels nobody listened to for :data:`LINGER` seconds."""
        now = self.loop.time()
        gone = [c for c, since in self._idle.items() if now - since >= LINGER]
        for channel in gone:
            del self._idle[channel]
            if channel not in self.listeners:  # else a listener came back meanwhile
                self._confirmed.pop(channel, None)
        if gone:
            await pubsub.unsubscribe(*gone)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _close(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


_services: weakref.WeakKeyDictionary[Store, PubSub] = weakref.WeakKeyDictionary()


def pubsub_for(store: RedisStore) -> PubSub:
    """The pub/sub service of ``store`` on the running event loop (made on first use).

    A service left by an event loop that is gone (a new ``asyncio.run``, a test's fresh
    loop) starts afresh on this one. Raises ``RuntimeError`` when no loop runs.
    """
    loop = asyncio.get_running_loop()
    service = _services.get(store)
    if service is None:
        service = _services[store] = PubSub(store)
    elif service.loop is not loop:
        service._rebind()
    return service


def pubsub_of(store: Store) -> PubSub | None:
    """The store's pub/sub service if it has one (on whatever loop), without making one."""
    return _services.get(store)


async def close_pubsub(store: Store) -> None:
    """Stop the store's pub/sub service (``close_tasks`` calls it); using it again starts a
    new one. Safe on any store, and more than once."""
    service = _services.pop(store, None)
    if service is not None:
        await service.aclose()


__all__ = ["IDLE_SECONDS", "LINGER", "Pattern", "PubSub", "close_pubsub", "pubsub_for", "pubsub_of"]
