"""The part every store shares: key layout, the outage policy, the primitive factories."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar, cast

if TYPE_CHECKING:
    from ..backends.breaker_state import BreakerStore
    from ..backends.permits import Permits
    from ..backends.responses import KeptResponses
    from ..backends.tokens import Tokens
    from ..backends.window import Window
    from .memory import MemoryStore

StoragePolicy = Literal["local", "open", "closed"]

T = TypeVar("T")

#: A key part longer than this (after escaping) keeps a readable head and a digest.
MAX_KEY_PART = 128
_HEAD = 64

# Printable ASCII (space included) stays as it is, except ``%`` (the escape character)
# and the braces (they would end or open a Redis Cluster hash tag). The kind also escapes
# ``:`` because a colon separates it from the name inside the tag.
_UNSAFE_NAME = re.compile(r"[^ -$&-z|~]")
_UNSAFE_KIND = re.compile(r"[^ -$&-9;-z|~]")


def _escape(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8", "surrogatepass"))


def encode_key_part(part: str, *, kind: bool = False) -> str:
    """``part`` as it appears in a Redis key: injective, brace-free and bounded in length.

    Unsafe characters are percent-escaped as UTF-8 (``{`` → ``%7B``, ``%`` → ``%25``), so
    two different parts never share a key and no part can open or close the hash tag. A
    part longer than :data:`MAX_KEY_PART` after escaping (client input can be anything)
    becomes its first 64 escaped characters, ``%~`` and a 128-bit BLAKE2b digest of the
    whole part: ``%~`` never occurs in an escaped part, so the two forms cannot collide.

    Args:
        part: the text (a resource name, an origin, a suffix).
        kind: escape ``:`` too (the kind is separated from the name by one).
    """
    if not (part.isascii() and part.isprintable()):
        encoded = (_UNSAFE_KIND if kind else _UNSAFE_NAME).sub(_escape, part)
    else:  # the usual case: at most %, braces (and a colon in a kind) to escape
        encoded = part
        if "%" in encoded:
            encoded = encoded.replace("%", "%25")  # first: the escapes below add %
        if "{" in encoded or "}" in encoded:
            encoded = encoded.replace("{", "%7B").replace("}", "%7D")
        if kind and ":" in encoded:
            encoded = encoded.replace(":", "%3A")
    if len(encoded) <= MAX_KEY_PART:
        return encoded
    head = encoded[:_HEAD]
    cut = head.rfind("%", _HEAD - 2)
    if cut != -1:  # never split an escape: %7 would read as another escape's start
        head = head[:cut]
    digest = hashlib.blake2b(part.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return f"{head}%~{digest}"


def check_key_prefix(prefix: str) -> str:
    """``prefix`` if it can start every key; raises ValueError otherwise.

    The prefix sits outside the ``{hash tag}``: a brace in it would move the tag, and one
    rule's keys would land in several Redis Cluster slots (every request failing there).
    """
    if not prefix:
        raise ValueError("must not be empty")
    if "{" in prefix or "}" in prefix:
        raise ValueError("must not contain braces: they would split one rule's hash tag")
    if not all(" " < c < "\x7f" for c in prefix):
        raise ValueError("must be printable ASCII without spaces")
    return prefix


def redact(uri: str) -> str:
    """``uri`` without its password, for messages and logs."""
    scheme, sep, rest = uri.partition("://")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        user_info, _, host = netloc.rpartition("@")
        netloc = f"{user_info.partition(':')[0]}:***@{host}"
    return f"{scheme}{sep}{netloc}{slash}{path}"


class Store:
    """Base of the stores.

    Attributes:
        kind: ``"memory"`` or ``"redis"`` (for messages; a rule kind never branches on it:
            it asks the store for its primitives, :meth:`window`, :meth:`permits`...).
        key_prefix: the first part of every key.
        on_storage_error: ``local`` | ``open`` | ``closed``.
    """

    kind: Literal["memory", "redis"]

    def __init__(self, *, key_prefix: str = "ymguard", on_storage_error: StoragePolicy = "local"):
        try:
            self.key_prefix = check_key_prefix(key_prefix)
        except ValueError as exc:
            raise ValueError(f"key_prefix {key_prefix!r} {exc}") from None
        self.on_storage_error: StoragePolicy = on_storage_error
        # The background work of the checks on this store (lease renewals, writes that
        # wait for the store): stopped by close_tasks (Guard.aclose).
        self._tasks: set[asyncio.Task[None]] = set()
        # In-process state that outlives the checks (a reload makes new ones): by name.
        self._kept: dict[str, Any] = {}
        #: The outages this store has had: calls of this process found it unavailable
        #: (counted once per outage, as it starts; a memory store never has one). The
        #: metrics report it (``ymguard.storage.outages``): no call pays for watching.
        self.outages = 0

    def key(self, kind: str, name: str, suffix: str = "") -> str:
        """The key of one rule's state: ``prefix:{kind:name}:suffix``, each part encoded.

        Everything in braces is the Redis Cluster hash tag, so every key of one rule
        lands in one slot. Each part goes through :func:`encode_key_part`: the layout is
        injective (two different ``(kind, name, suffix)`` never share a key), the braces
        of the tag are the only braces of a key, and a key stays short whatever a client
        sent.
        """
        tag = f"{encode_key_part(kind, kind=True)}:{encode_key_part(name)}"
        if suffix:
            return f"{self.key_prefix}:{{{tag}}}:{encode_key_part(suffix)}"
        return f"{self.key_prefix}:{{{tag}}}"

    #: Whether the store is believed to answer now: a store that can have outages (Redis)
    #: sets it False from the start of one until it answers again. An attribute, not a
    #: property: every staged check reads it on every call. A subclass may override it
    #: with a property of its own.
    available: bool = True

    async def aclose(self) -> None:
        """Release connections; the store is unusable afterwards."""

    #: Whether the state lives outside this process (and can be unavailable).
    remote: bool = False

    # -- the primitives, chosen once by the store ------------------------------------------

    def window(self) -> Window:
        """The sliding window on this store (``backends/window.py``)."""
        raise NotImplementedError

    def permits(self, name: str, kind: str = "sem") -> Permits:
        """The leased permits called ``name`` (``kind``: ``sem`` | ``conc``) on this store."""
        raise NotImplementedError

    def tokens(self, family: str = "submit") -> Tokens:
        """The one-use submit tokens of a token family (a key prefix) on this store."""
        raise NotImplementedError

    def responses(self, resource: str = "") -> KeptResponses:
        """The Idempotency-Key records of a resource on this store (bounded together)."""
        raise NotImplementedError

    def breaker(self, name: str) -> BreakerStore:
        """The state of the breaker called ``name`` on this store."""
        raise NotImplementedError

    # -- outages ---------------------------------------------------------------------------

    @property
    def local(self) -> MemoryStore:
        """The in-process store checks fall back on while this one is unavailable.

        One per store (the memory store is its own), so every check of the store shares
        it and it survives a reload of the rules.
        """
        raise NotImplementedError

    def on_outage(self, refusal: BaseException) -> Literal["open", "local"]:
        """Apply ``on_storage_error`` to a call the store could not serve.

        The one place the policy is read: ``closed`` raises ``refusal``; ``open`` and
        ``local`` are returned for the caller to let the call pass unguarded or decide it
        on :attr:`local`.
        """
        policy = self.on_storage_error
        if policy == "closed":
            _refuse(refusal)
        return policy

    def keep(self, name: str, make: Callable[[], T]) -> T:
        """The store's in-process object called ``name``, made by ``make`` on first use.

        For what a check keeps in process and must not lose when a reload replaces the
        check (names come from the rules, never from clients: the map stays bounded).
        """
        found = self._kept.get(name)
        if found is None:
            found = self._kept[name] = make()
        return cast(T, found)

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` in a task owned by the store, until it ends or :meth:`close_tasks`."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close_tasks(self) -> None:
        """Stop the background tasks tied to this store; using it again starts them afresh.

        The tasks :meth:`spawn` started (a response whose write still waited for the store
        is then kept by no one: its lease expires, and the key can run again after it),
        and in the subclasses the pub/sub readers and the lease keeper.
        """
        running, self._tasks = self._tasks, set()
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


def _refuse(refusal: BaseException) -> NoReturn:
    raise refusal from None
