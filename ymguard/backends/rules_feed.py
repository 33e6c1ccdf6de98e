"""Pushed rules: numbered versions of a rules file kept in the store, and a nudge per push.

On Redis the newest version lives in one hash under the key prefix (``rules_push.lua``
numbers it, stores the text and publishes the nudge in one step) and every guard on the
prefix listens to one channel on the store's pub/sub service. A nudge only says "look":
the listener reads the newest version, so a lost message costs nothing once the pub/sub
reconnects and resyncs. The memory store keeps the same record in process, for the
guards sharing that store.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..storage.pubsub import pubsub_for
from ._lua import lua

if TYPE_CHECKING:
    from ..storage.base import Store
    from ..storage.memory import MemoryStore
    from ..storage.redis import RedisStore

log = logging.getLogger("ymguard")

#: The largest rules text a store accepts (a real file is a few kilobytes).
MAX_RULES_BYTES = 1_000_000

#: A listener: called with the version a nudge names, or None after a (re)subscription.
Listener = Callable[[int | None], None]


@dataclass(frozen=True, slots=True)
class PushedRules:
    """One pushed version as the store keeps it.

    Attributes:
        version: its number (1, 2, ...: each push adds one).
        text: the rules file as pushed (YAML).
        digest: the rules' digest as the pusher computed it.
        source: where the pusher read them (a file name).
        pushed_ms: when, in milliseconds since the epoch (the store's clock).
    """

    version: int
    text: str
    digest: str
    source: str
    pushed_ms: int


class VersionConflict(Exception):
    """A push said which version it expected in force, and another one is.

    Attributes:
        current: the version in force.
    """

    def __init__(self, current: int) -> None:
        super().__init__(f"version {current} is in force")
        self.current = current


class RulesFeed(Protocol):
    """Pushed rules on one store: push, read the newest, listen for pushes."""

    async def push(self, text: str, digest: str, source: str, expected: int | None) -> int:
        """Store ``text`` as the next version and tell every listener; its number.

        Raises :class:`VersionConflict` if ``expected`` is given and not in force.
        """

    async def latest(self) -> PushedRules | None:
        """The newest pushed version, or None if nothing was pushed."""

    def listen(self, listener: Listener) -> bool:
        """Call ``listener`` at every push (kept weakly if it is a bound method).

        False when pushes cannot be heard (no pub/sub): the caller reads :meth:`latest`
        on its own schedule instead.
        """

    def unlisten(self, listener: Listener) -> None:
        """Stop calling ``listener``."""


class _Listeners:
    """Listeners of one feed; a bound method is held weakly (its guard may be dropped)."""

    def __init__(self) -> None:
        self._plain: list[Listener] = []
        self._bound: dict[int, tuple[weakref.ref[object], Callable[..., None]]] = {}

    def add(self, listener: Listener) -> None:
        owner = getattr(listener, "__self__", None)
        func = getattr(listener, "__func__", None)
        if owner is not None and func is not None:
            self._bound[id(owner)] = (weakref.ref(owner), func)
        elif listener not in self._plain:
            self._plain.append(listener)

    def remove(self, listener: Listener) -> None:
        owner = getattr(listener, "__self__", None)
        if owner is not None:
            self._bound.pop(id(owner), None)
        elif listener in self._plain:
            self._plain.remove(listener)

    def __bool__(self) -> bool:
        return bool(self._plain or self._bound)

    def call(self, version: int | None) -> None:
        for key, (ref, func) in list(self._bound.items()):
            owner = ref()
            if owner is None:
                self._bound.pop(key, None)
                continue
            _safely(func, owner, version)
        for listener in list(self._plain):
            _safely(listener, version)


def _safely(call: Callable[..., None], *args: object) -> None:
    try:
        call(*args)
    except Exception:  # one listener's bug must not stop the others hearing the push
        log.exception("ymguard: a rules listener failed")


class MemoryRulesFeed:
    """Pushed rules kept in process: the guards sharing one memory store hear them."""

    def __init__(self) -> None:
        self.record: PushedRules | None = None
        self.listeners = _Listeners()

    async def push(self, text: str, digest: str, source: str, expected: int | None) -> int:
        """Store the next version and call every listener soon (on the running loop)."""
        current = self.record.version if self.record else 0
        if expected is not None and expected != current:
            raise VersionConflict(current)
        version = current + 1
        self.record = PushedRules(version, text, digest, source, int(time.time() * 1000))
        asyncio.get_running_loop().call_soon(self.listeners.call, version)
        return version

    async def latest(self) -> PushedRules | None:
        """The newest version pushed to this store."""
        return self.record

    def listen(self, listener: Listener) -> bool:
        """Call ``listener`` at every push to this store."""
        self.listeners.add(listener)
        return True

    def unlisten(self, listener: Listener) -> None:
        """Stop calling ``listener``."""
        self.listeners.remove(listener)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisRulesFeed:
    """Pushed rules in Redis (see the module); holds its store weakly."""

    def __init__(self, store: RedisStore) -> None:
        self._store = weakref.ref(store)
        self.key = store.key("rules", "current")
        self.channel = store.key("rules", "current", "events")
        self.pattern = _glob_escape(self.channel)
        self.listeners = _Listeners()
        self._push = store.script(lua("rules_push"))

    def _live(self) -> RedisStore:
        store = self._store()
        if store is None:  # pragma: no cover - the guard holds its store
            raise RuntimeError("the store is gone")
        return store

    async def push(self, text: str, digest: str, source: str, expected: int | None) -> int:
        """Run ``rules_push.lua``: number, store and announce the version in one step."""
        store = self._live()
        keys = (self.key, self.channel)
        args = (text, digest, source, "" if expected is None else str(expected))
        ok, version = await store.run(self._push, keys, args)
        if not int(ok):
            raise VersionConflict(int(version))
        return int(version)

    async def latest(self) -> PushedRules | None:
        """Read the hash of the newest version."""
        store = self._live()
        fields = ("version", "text", "digest", "source", "pushed_ms")
        reply = await store.call("HMGET", self.key, *fields, always_try=True)
        if not reply or reply[0] is None:
            return None
        version, text, digest, source, pushed_ms = (
            x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x or "") for x in reply
        )
        return PushedRules(int(version), text, digest, source, int(pushed_ms or 0))

    def listen(self, listener: Listener) -> bool:
        """Watch the channel on the store's pub/sub (resynced after every reconnection)."""
        self.listeners.add(listener)
        return self.start()

    def start(self) -> bool:
        """Make sure the channel is watched on the running loop; False if it cannot be."""
        store = self._store()
        if store is None:
            return False
        try:
            service = pubsub_for(store)
        except RuntimeError:  # no event loop runs
            return False
        return service.watch(self.pattern, self._on_message, self._resync)

    def unlisten(self, listener: Listener) -> None:
        """Stop calling ``listener`` (the channel stays watched until the store closes)."""
        self.listeners.remove(listener)

    def _on_message(self, channel: str, data: bytes) -> None:
        head = data.split(b" ", 1)[0]
        version = int(head) if head.isdigit() else None
        self.listeners.call(version)

    async def _resync(self) -> None:
        # After every (re)subscription: a push made while the connection was down was
        # heard by no one, so every listener reads the newest version again.
        self.listeners.call(None)


_feeds: weakref.WeakKeyDictionary[Store, RulesFeed] = weakref.WeakKeyDictionary()


def rules_feed(store: Store) -> RulesFeed:
    """The pushed rules of ``store`` (one feed per store, made on first use)."""
    found = _feeds.get(store)
    if found is None:
        from ..storage.redis import RedisStore

        if isinstance(store, RedisStore):
            found = RedisRulesFeed(store)
        else:
            memory: MemoryStore | Store = store
            found = memory.keep("rules-feed", MemoryRulesFeed)
        _feeds[store] = found
    return found


__all__ = [
    "MAX_RULES_BYTES",
    "MemoryRulesFeed",
    "PushedRules",
    "RedisRulesFeed",
    "RulesFeed",
    "VersionConflict",
    "rules_feed",
]
