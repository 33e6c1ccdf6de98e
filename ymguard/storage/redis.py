"""The Redis store: one redis-py asyncio client (one pool) per store, Lua by EVALSHA.

Outages are handled here once for every algorithm: a refused or timed-out call marks the
store down, logs one warning, and makes every call in the next ``retry_interval`` fail
fast with :class:`StorageUnavailable` (no request waits on a dead Redis). After that one
call at a time probes; the first success logs the recovery and everything resumes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import StorageUnavailable
from .base import StoragePolicy, Store, redact
from .memory import MemoryStore

if TYPE_CHECKING:
    from ..backends.breaker_state import BreakerStore
    from ..backends.permits import Permits
    from ..backends.responses import KeptResponses
    from ..backends.tokens import Tokens
    from ..backends.window import Window
from .pipeline import AutoPipeline, _pack_command, pack
from .tasks import drain, in_background

log = logging.getLogger("ymguard.storage")


class ClientFailed(Exception):
    """redis-py failed inside a call (not a Redis reply, not one of its errors): an
    ``AttributeError`` or ``TypeError`` writing to a connection the peer closed
    (redis/redis-py#4287), seen on a cluster whose slots move under load. The call may
    have been sent: an outage, not a 500 with redis-py's stack trace."""


async def _client(call: Awaitable[Any]) -> Any:
    """Await a call of the redis-py client; its own failures become :class:`ClientFailed`."""
    try:
        return await call
    except RedisError:
        raise
    except OUTAGE_ERRORS:
        raise
    except Exception as exc:
        raise ClientFailed(f"redis-py failed: {type(exc).__name__}: {exc}") from exc


#: Errors that mean "Redis is not answering", as opposed to a bug in a script.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    ClientFailed,
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
    # The cluster client's "cannot be connected" (no node reachable) and "TTL exhausted".
    RedisClusterException,
    ClusterError,
)

#: Error replies that mean "this server cannot serve us now" (a failover's read-only
#: replica, out of memory, a busy script, loading a dataset): an outage, not a bug.
#: Inside a script the reply is wrapped (``ERR Error running script ... -READONLY ...``).
UNAVAILABLE_REPLIES = re.compile(r"(?:^|-)(?:READONLY|OOM|BUSY|LOADING|MASTERDOWN|CLUSTERDOWN)\b")
#: The same replies as redis-py's own connections raise them (cluster and sentinel stores):
#: it takes the code off the message and names it by the class (LOADING is its
#: ``BusyLoadingError``, a connection error: an outage already). TRYAGAIN (a slot moving
#: under a multi-key call) reaches us when the cluster client's own retries ran out.
_UNAVAILABLE_CLASSES = (OutOfMemoryError, ReadOnlyError, ClusterDownError, TryAgainError)


def cannot_serve(exc: BaseException) -> bool:
    """Whether an error reply means "this server cannot serve us now" (an outage), not a
    bug: by redis-py's class for it, or by its text (the pipelined connection keeps the
    code in the message, and inside a script the reply is wrapped)."""
    return isinstance(exc, _UNAVAILABLE_CLASSES) or UNAVAILABLE_REPLIES.search(str(exc)) is not None


_DEFAULTS = {"socket_timeout": "0.5", "socket_connect_timeout": "0.5"}


class Unanswered(StorageUnavailable):
    """A call was sent (or being sent) but no answer came: it may or may not have run.

    The other :class:`StorageUnavailable` errors of this store mean it did not run: the
    call was refused before it was sent (the store fails fast after an outage), or Redis
    answered that it cannot serve. A caller that must undo what a call may have done (a
    semaphore's acquire) tells the two apart.
    """


def _with_defaults(uri: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    for name, value in _DEFAULTS.items():
        query.setdefault(name, value)
    return urlunsplit(parts._replace(query=urlencode(query))), query


def make_client(uri: str) -> Any:
    """A redis-py asyncio client for a ymguard storage URI (no retries: we fail fast)."""
    scheme, _, rest = uri.partition("://")
    no_retry = Retry(NoBackoff(), 0)
    if scheme in ("redis", "rediss"):
        url, _ = _with_defaults(uri)
        return Redis.from_url(url, retry=no_retry)
    if scheme == "redis+unix":
        url, _ = _with_defaults("unix://" + rest)
        return Redis.from_url(url, retry=no_retry)
    if scheme == "redis+cluster":
        from redis.asyncio.cluster import RedisCluster

        url, query = _with_defaults("redis://" + rest)
        # redis-py's cluster pool refuses a command past 100 connections per node (an
        # outage to us, and a fallback to local state): a single server's has no bound.
        options = {} if "max_connections" in query else {"max_connections": 2**31}
        return RedisCluster.from_url(url, **options)
    if scheme == "redis+sentinel":
        from redis.asyncio.sentinel import Sentinel

        parts = urlsplit(uri)
        query = dict(parse_qsl(parts.query))
        service = parts.path.strip("/") or query.pop("service_name", "mymaster")
        hosts = []
        for hostport in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = hostport.partition(":")
            hosts.append((host, int(port or 26379)))
        timeout = float(query.get("socket_timeout", _DEFAULTS["socket_timeout"]))
        sentinel = Sentinel(hosts, socket_timeout=timeout)  # type: ignore[no-untyped-call]
        return sentinel.master_for(
            service,
            socket_timeout=timeout,
            db=int(query.get("db", 0)),
            password=parts.password,
            retry=no_retry,
        )
    raise ValueError(f"not a Redis storage URI: {uri!r}")


def make_pipeline(uri: str) -> AutoPipeline | None:
    """The auto-pipelined connection for a single-server URI (None for cluster/sentinel)."""
    scheme, _, rest = uri.partition("://")
    if scheme in ("redis", "rediss"):
        url = uri
    elif scheme == "redis+unix":
        url = "unix://" + rest
    else:
        return None
    url, query = _with_defaults(url)
    return AutoPipeline(url, float(query["socket_timeout"]), float(query["socket_connect_timeout"]))


def evalsha(script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> bytes:
    """The EVALSHA of ``script`` with ``keys`` and ``args``, packed for the pipelined
    connection."""
    return pack(("EVALSHA", script.sha, len(keys), *keys, *args))


class ArgsPacker:
    """The EVALSHAs of one script on fixed keys, ``nargs`` arguments each, packed with
    the command, the sha and the keys packed once: a call packs only its arguments.

    hiredis's ``pack_command`` costs about as much per argument as for the command itself:
    a permit's acquire (4 keys and 5 arguments) packs in 60% of the time this way.

    Args:
        script: the registered script.
        keys: its KEYS, the same for every call.
        nargs: how many arguments every call has (:meth:`pack` refuses another count:
            its header would be wrong).
    """

    __slots__ = ("_head", "_nargs", "_skip")

    def __init__(self, script: AsyncScript, keys: Sequence[str], nargs: int) -> None:
        body = pack(("EVALSHA", script.sha, len(keys), *keys))
        # The array header counts every part; the body goes on after its own header.
        self._head = b"*%d\r\n" % (3 + len(keys) + nargs) + body[body.index(b"\r\n") + 2 :]
        self._skip = len(b"*%d\r\n" % nargs)  # the header of the arguments packed alone
        self._nargs = nargs

    def pack(self, args: tuple[Any, ...]) -> bytes:
        """The call with ``args``, packed: what :func:`evalsha` packs, for less."""
        if len(args) != self._nargs:
            raise ValueError(f"{len(args)} arguments for a packer of {self._nargs}")
        try:  # pipeline.pack, inlined: a request packs up to five calls
            body: bytes = _pack_command(args)
        except Exception:  # a bool, or a type hiredis does not take: see pipeline.pack
            body = pack(args)
        return self._head + body[self._skip :]


class ScriptCall(NamedTuple):
    """One script call prepared for :meth:`RedisStore.run_many`.

    Attributes:
        script: the registered script.
        keys: its KEYS.
        args: its ARGV.
        packed: the call packed once (``RedisStore.pack``), or None.
    """

    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Any]
    packed: bytes | None = None


#: ``new_call(ScriptCall, (script, keys, args, packed))`` builds a :class:`ScriptCall` in
#: C, for the calls made on every request: the named tuple's own constructor is a Python
#: function (a third of the cost of building the call, arguments packed included).
new_call = tuple.__new__


def packed_calls(calls: Sequence[ScriptCall]) -> list[bytes]:
    """Each call's EVALSHA, packed (its ``packed`` bytes where it has them). A batch of
    one packs inline where it is sent, without this call: the usual batch."""
    packed = []  # a loop, not a comprehension: that would be a call of its own
    for c in calls:
        packed.append(c.packed or evalsha(c.script, c.keys, c.args))
    return packed


#: How long :meth:`RedisStore.settle` (and so ``aclose``) waits for the replies of the
#: calls no one awaits.
SETTLE_SECONDS = 2.0


class _Detached:
    """The replies of a batch sent by :meth:`RedisStore.send_many_detached`.

    The connection hands them over as it would to a caller's future (``done``,
    ``set_result``, ``set_exception``), but no task waits: they are judged here.
    """

    __slots__ = ("calls", "store")

    def __init__(self, store: RedisStore, calls: Sequence[ScriptCall]) -> None:
        self.store = store
        self.calls = calls

    def done(self) -> bool:
        return False

    def set_result(self, replies: list[Any]) -> None:
        for reply in replies:
            if isinstance(reply, ResponseError):
                self._mend(replies)
                return

    def _mend(self, replies: list[Any]) -> None:
        store = self.store
        again = []
        for call, reply in zip(self.calls, replies, strict=True):
            if isinstance(reply, NoScriptError):  # a restarted or flushed server
                again.append(call)
            elif isinstance(reply, ResponseError):
                if cannot_serve(reply):
                    self.set_exception(reply)  # the leases free what was not given back
                else:
                    self._failed(reply)
        if again and not store._closing:  # sent again with EVAL (run_many mends it)
            resent = in_background(self._again(again))
            store._resending.add(resent)
            resent.add_done_callback(store._resending.discard)

    async def _again(self, calls: list[ScriptCall]) -> None:
        for reply in await self.store.run_many(calls, always_try=True):
            if isinstance(reply, BaseException):
                self._failed(reply)

    def _failed(self, reply: BaseException) -> None:
        # A bug (a script's error, a bad argument): seen, not taken for an outage.
        log.error("ymguard: a give-back on %s failed: %s", self.store.shown, reply)

    def set_exception(self, exc: BaseException) -> None:
        # The leases free what was not given back. The store is marked down once the
        # callers already woken by this read have run: one of them, answered before the
        # outage, would otherwise take the outage for over ("another call met an outage
        # meanwhile") and lift the fail-fast while Redis still hangs. Not while closing.
        store = self.store
        if store._closing:
            return
        try:
            asyncio.get_running_loop().call_soon(store._mark_down, exc)
        except RuntimeError:  # failed from outside the loop (a close at exit): at once
            store._mark_down(exc)


class RedisStore(Store):
    """Guard state in Redis.

    Args:
        uri: a ``redis://``-family URI; ``socket_timeout`` and ``socket_connect_timeout``
            may be given in the query string (default 0.5 s each).
        key_prefix: the first part of every key.
        on_storage_error: ``local`` | ``open`` | ``closed``.
        retry_interval: seconds to fail fast after an outage before probing again.
    """

    kind: Literal["memory", "redis"] = "redis"
    remote = True

    def __init__(
        self,
        uri: str,
        *,
        key_prefix: str = "ymguard",
        on_storage_error: StoragePolicy = "local",
        retry_interval: float = 1.0,
    ) -> None:
        super().__init__(key_prefix=key_prefix, on_storage_error=on_storage_error)
        self.uri = uri
        #: The URI without its password: what messages and logs name.
        self.shown = redact(uri)
        self.client: Any = make_client(uri)
        self._pipe = make_pipeline(uri)
        self.retry_interval = retry_interval
        self._scripts: dict[str, AsyncScript] = {}
        # Whether it answers (see Store: on the instance, read on every staged call), and
        # when the current outage began (read only while it is not available).
        self.available = True
        self._down_since = 0.0
        self._retry_at = 0.0
        self._probing = False
        self._local: MemoryStore | None = None
        # redis-py's asyncio cluster client, used by many tasks at once before it has read
        # the cluster's layout, breaks connections under them: it is initialized first.
        self._cluster_ready = uri.partition("://")[0] != "redis+cluster"
        self._cluster_init: asyncio.Future[Any] | None = None
        self._pubsub_client: Any = None
        # The give-backs sent again after a lost script (settle waits for them), and
        # whether aclose has begun closing the connection.
        self._resending: set[asyncio.Future[Any]] = set()
        self._closing = False

    def __repr__(self) -> str:
        return f"RedisStore({self.shown!r}, key_prefix={self.key_prefix!r})"

    def script(self, source: str) -> AsyncScript:
        """The registered script for a Lua source (called by EVALSHA; a server that lost
        it answers NOSCRIPT, and the call is sent again with EVAL). On one server it is
        loaded on the pipelined connection before any call uses it
        (:meth:`AutoPipeline.load`)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
            if self._pipe is not None:  # loaded on its connection before it is used
                self._pipe.load(source)
        return script

    def pack(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> bytes | None:
        """The EVALSHA of a call whose keys and arguments never change, packed once.

        A check that runs the same call on every request keeps these bytes and passes
        them to :meth:`run` (None where the store has no pipelined connection).
        """
        if self._pipe is None:
            return None
        return evalsha(script, keys, args)

    def packer(self, script: AsyncScript, keys: Sequence[str], nargs: int) -> ArgsPacker | None:
        """An :class:`ArgsPacker` for calls of ``script`` on ``keys`` whose arguments
        change (None where the store has no pipelined connection: nothing is packed)."""
        if self._pipe is None:
            return None
        return ArgsPacker(script, keys, nargs)

    async def run(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        packed: bytes | None = None,
        *,
        always_try: bool = False,
    ) -> Any:
        """Run one script atomically; raises :class:`StorageUnavailable` on an outage.

        Args:
            script: the registered script.
            keys: its KEYS.
            args: its ARGV.
            packed: ``pack(script, keys, args)``, when the caller keeps it.
            always_try: try even while the store fails fast after an outage. Releases
                and refunds use it: skipping one leaks a permit until its lease ends,
                while trying costs nothing when Redis is back and little when it is not.
        """
        pipe = self._pipe
        if pipe is not None and self.available:
            # The usual case (up, connected): one await on the reply's future, without the
            # outage wrapper's coroutines (and no closure: see _run_guarded); what it would
            # do on an error is done here.
            future = pipe.send_now(packed or evalsha(script, keys, args))
            if future is not None:
                try:
                    try:
                        reply = await future
                    except NoScriptError:  # a restarted or flushed server: EVAL caches it
                        reply = await pipe.execute("EVAL", script.script, len(keys), *keys, *args)
                except OUTAGE_ERRORS as exc:
                    self._mark_down(exc)
                    raise self._unanswered(exc) from exc
                except ResponseError as exc:
                    if not cannot_serve(exc):
                        raise
                    self._mark_down(exc)
                    raise StorageUnavailable(f"{self.shown} cannot serve: {exc}") from exc
                if not self.available:  # another call met an outage meanwhile
                    self._mark_up()
                return reply
        return await self._run_guarded(script, keys, args, packed, always_try)

    async def _run_guarded(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        packed: bytes | None,
        always_try: bool,
    ) -> Any:
        """:meth:`run` through the outage wrapper (down, connecting, or no pipeline).

        Its closures live here, not in :meth:`run`: a function's captured variables cost
        a cell each on every call, taken or not.
        """
        pipe = self._pipe
        if pipe is None:
            return await self._guarded(lambda: _client(script(keys=keys, args=args)), always_try)

        async def send() -> Any:
            data = packed or evalsha(script, keys, args)
            try:
                future = pipe.send_now(data)
                return await (future if future is not None else pipe.send(data))
            except NoScriptError:  # a restarted or flushed server: EVAL caches it again
                return await pipe.execute("EVAL", script.script, len(keys), *keys, *args)

        return await self._guarded(send, always_try)

    async def run_many(self, calls: Sequence[ScriptCall], *, always_try: bool = False) -> list[Any]:
        """Run several scripts in one round trip; per call its reply or its error reply.

        On one server the calls go out in one write on the pipelined connection and their
        replies come back in order (not a transaction: each script is atomic on its own).
        On a cluster their keys may live in different slots: redis-py sends each to its
        node, all at once, so the calls cost one round trip of the slowest node.

        Raises:
            StorageUnavailable: as :meth:`run` (the batch is refused or unanswered whole;
                :class:`Unanswered` when some calls may have run).
        """
        if not calls:
            return []
        pipe = self._pipe
        if pipe is None:
            return await self._run_many_client(calls, always_try)
        # The usual case (up, connected): the calls queued now and their replies read
        # here, without the outage wrapper's coroutines (and no closure: see _run_guarded).
        sent = self.send_many_now(calls)
        if sent is not None:
            try:
                replies = await sent
            except OUTAGE_ERRORS as exc:
                raise self.lost(exc) from exc
            return replies if self.replied(replies) else await self.mended(calls, replies)
        return await self._run_many_guarded(pipe, calls, packed_calls(calls), always_try)

    def send_many_now(
        self, calls: Sequence[ScriptCall], late: Any = None
    ) -> asyncio.Future[list[Any]] | None:
        """:meth:`run_many` in parts, for a caller that awaits no coroutine of the store's:
        the calls queued now in one write; the future of their raw replies, or None,
        having sent nothing, where :meth:`run_many` must be awaited instead (no pipelined
        connection open in this loop, or the store down).

        The caller then does what :meth:`run_many` does: a failed future is the
        connection's failure (raise :meth:`lost`); replies are handed to :meth:`replied`,
        and to :meth:`mended` where it answers False. The chain's entry awaits the
        future itself: a request waiting for Redis then holds no coroutine of the
        store's, which counts towards the garbage collector's next young collection
        (see ``Chain.enter``).

        ``late``, if given, takes the replies (its ``set_result`` with the raw list) if
        the future is cancelled before they come: for calls whose caller must learn
        what they took even when it is gone.
        """
        pipe = self._pipe
        if pipe is None or not self.available or not calls:
            return None
        if len(calls) == 1:  # the usual batch: packed_calls inline
            c = calls[0]
            packed = [c.packed or evalsha(c.script, c.keys, c.args)]
        else:
            packed = packed_calls(calls)
        return pipe.send_many_now(packed, late)

    def replied(self, replies: list[Any]) -> bool:
        """Whether the raw replies of :meth:`send_many_now` are final (no error reply to
        mend: else await :meth:`mended`). A reply marks the store up after another
        call's outage."""
        for reply in replies:
            if isinstance(reply, ResponseError):
                return False
        if not self.available:  # another call met an outage meanwhile
            self._mark_up()
        return True

    async def mended(self, calls: Sequence[ScriptCall], replies: list[Any]) -> list[Any]:
        """The replies of :meth:`send_many_now` with error replies among them, as
        :meth:`run_many` returns them: a lost script sent again with EVAL, an unavailable
        reply raised (see :meth:`_mended`), a bug kept in its place."""
        pipe = self._pipe
        assert pipe is not None
        try:
            replies = await self._mended(pipe, calls, replies)
        except OUTAGE_ERRORS as exc:
            raise self.lost(exc) from exc
        if not self.available:
            self._mark_up()
        return replies

    def lost(self, exc: BaseException) -> Unanswered:
        """Calls sent on the pipelined connection met its failure (``exc``, from the
        future of :meth:`send_many_now`): the store is marked down, and the error its
        callers raise is returned (they may have run)."""
        self._mark_down(exc)
        return self._unanswered(exc)

    def _unanswered(self, exc: BaseException) -> Unanswered:
        """The error a caller meets when its calls were sent and the connection failed."""
        error = Unanswered(f"{self.shown} is unavailable: {exc}")
        error.__cause__ = exc
        return error

    def send_many_detached(self, calls: Sequence[ScriptCall]) -> bool:
        """Send ``calls`` in one write without waiting for their replies; False, having
        sent nothing, where they must be awaited (:meth:`run_many`) instead.

        For give-backs after a call (releases: idempotent, and a lease frees what never
        arrives). The connection reads the replies when they come (:class:`_Detached`):
        a script the server lost is sent again through :meth:`run_many`, an error reply
        is logged, a lost connection marks the store down. Commands on the connection run
        in the order sent, so this process's next call sees the release (unless the
        server lost the script: then it follows a round trip later). Sent only on the
        pipelined connection, open and up; :meth:`aclose` waits for the replies.
        """
        pipe = self._pipe
        if pipe is None or not self.available or self._closing:
            return False
        if len(calls) == 1:  # the usual batch: packed_calls inline
            c = calls[0]
            packed = [c.packed or evalsha(c.script, c.keys, c.args)]
        elif not calls:
            return True  # nothing to send (a waiter for no reply would take the next)
        else:
            packed = packed_calls(calls)
        return pipe.send_many_detached(packed, _Detached(self, calls))

    async def _run_many_guarded(
        self, pipe: AutoPipeline, calls: Sequence[ScriptCall], packed: list[bytes], always_try: bool
    ) -> list[Any]:
        """:meth:`run_many` on the pipelined connection through the outage wrapper."""

        async def send() -> list[Any]:
            sent = pipe.send_many_now(packed) or await pipe.send_many(packed)
            return await self._mended(pipe, calls, await sent)

        done: list[Any] = await self._guarded(send, always_try)
        return done

    async def _run_many_client(self, calls: Sequence[ScriptCall], always_try: bool) -> list[Any]:
        """:meth:`run_many` through redis-py (a cluster or a sentinel store)."""

        async def gather() -> list[Any]:
            replies: list[Any] = await asyncio.gather(
                *(c.script(keys=c.keys, args=c.args) for c in calls), return_exceptions=True
            )
            # Judged in here: an outage raised from this marks the store down, and
            # _guarded does not take the batch's return for a recovery.
            self._fail_on_outage(replies)
            return replies

        done: list[Any] = await self._guarded(gather, always_try)
        return done

    def _fail_on_outage(self, replies: Sequence[Any]) -> None:
        """Raise if one call of a batch sent through redis-py met an outage.

        An outage met by one call is an outage of the batch (the others are refused):
        :class:`Unanswered` if any call ran or may have (a reply, a lost or timed-out
        call, redis-py failing inside; the caller gives back what they took), else
        :class:`StorageUnavailable` (every failure an unavailable reply: nothing ran).
        Other errors (a bug in a script, a bad argument) are kept in their places.
        """
        failed: BaseException | None = None
        ran = False
        for reply in replies:
            if not isinstance(reply, BaseException):
                ran = True
            elif isinstance(reply, ResponseError):
                if failed is None and cannot_serve(reply):
                    failed = reply
            elif isinstance(reply, OUTAGE_ERRORS) or not isinstance(reply, RedisError):
                # Sent, perhaps run: lost, cancelled, or redis-py failing inside (what
                # _client makes ClientFailed; gather's calls are not wrapped: one cancelled
                # before it started would leave its script's coroutine never awaited).
                ran = True
                if failed is None:
                    failed = reply
        if failed is not None:
            self._mark_down(failed)
            error = Unanswered if ran else StorageUnavailable
            raise error(f"{self.shown} is unavailable: {failed}") from failed

    async def _mended(
        self, pipe: AutoPipeline, calls: Sequence[ScriptCall], replies: list[Any]
    ) -> list[Any]:
        """The replies of ``calls`` sent on the pipelined connection, in order.

        A script the server lost (NOSCRIPT) is sent again with EVAL; an error reply is
        kept in its place. An unavailable reply (OOM, LOADING, ...) marks the store down
        and fails the batch: :class:`Unanswered` if another call of it ran (its caller
        must give back what that one took), else :class:`StorageUnavailable`; a lost
        connection is raised as it is.
        """
        failed: BaseException | None = None
        ran = False  # whether a call of the batch ran (its reply is not an error)
        for i, reply in enumerate(replies):
            if not isinstance(reply, ResponseError):
                ran = True
                continue
            if isinstance(reply, NoScriptError):  # a restarted or flushed server: EVAL again
                if failed is None:
                    c = calls[i]
                    args = ("EVAL", c.script.script, len(c.keys), *c.keys, *c.args)
                    try:
                        replies[i] = await pipe.execute(*args)
                        ran = True
                    except ResponseError as exc:
                        replies[i] = exc
                        if cannot_serve(exc):
                            failed = exc
            elif failed is None and cannot_serve(reply):
                failed = reply
        if failed is not None:
            self._mark_down(failed)
            error = Unanswered if ran else StorageUnavailable
            raise error(f"{self.shown} cannot serve: {failed}") from failed
        return replies

    async def call(self, *args: Any, always_try: bool = False) -> Any:
        """Run one plain command with the same outage handling as :meth:`run`."""
        pipe = self._pipe
        if pipe is not None:
            return await self._guarded(lambda: pipe.execute(*args), always_try)
        return await self._guarded(lambda: _client(self.client.execute_command(*args)), always_try)

    async def _guarded(self, make: Callable[[], Awaitable[Any]], always_try: bool) -> Any:
        """Await ``make()`` under the outage rules: fail fast, one prober, log once."""
        probing = False
        if not self.available and not always_try:
            if self._probing or time.monotonic() < self._retry_at:
                raise StorageUnavailable(f"{self.shown} is unavailable")
            self._probing = probing = True
        try:
            if not self._cluster_ready:
                await self._init_cluster()
            result = await make()
        except OUTAGE_ERRORS as exc:
            self._mark_down(exc)
            raise Unanswered(f"{self.shown} is unavailable: {exc}") from exc
        except ResponseError as exc:
            if not cannot_serve(exc):
                raise  # a bug in a script: let it be seen
            self._mark_down(exc)
            raise StorageUnavailable(f"{self.shown} cannot serve: {exc}") from exc
        finally:
            if probing:
                self._probing = False
        if not self.available:
            self._mark_up()
        return result

    async def _init_cluster(self) -> None:
        """Read the cluster's layout once, before the first command (every caller waits)."""
        init = self._cluster_init
        if init is None or init.get_loop() is not asyncio.get_running_loop():
            init = self._cluster_init = asyncio.ensure_future(self.client.initialize())
        try:
            await asyncio.shield(init)
        except BaseException:
            if init.done():
                self._cluster_init = None  # the next call tries again
            raise
        self._cluster_ready = True

    @property
    def pubsub_client(self) -> Any:
        """The client pub/sub runs on: the store's own, or on a cluster a plain client of
        the URI's node (redis-py's asyncio cluster client has no pub/sub, and a PUBLISH on
        a cluster reaches the subscribers of every node)."""
        if self._pubsub_client is None:
            scheme, _, rest = self.uri.partition("://")
            if scheme == "redis+cluster":
                self._pubsub_client = make_client("redis://" + rest)
            else:
                self._pubsub_client = self.client
        return self._pubsub_client

    def _mark_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._retry_at = now + self.retry_interval
        if self.available:
            self.available = False
            self._down_since = now
            self.outages += 1
            log.warning(
                "ymguard storage %s unavailable (%s: %s); on_storage_error=%s until it answers",
                self.shown,
                type(exc).__name__,
                exc,
                self.on_storage_error,
            )

    def _mark_up(self) -> None:
        assert not self.available
        log.warning(
            "ymguard storage %s is back after %.1f s",
            self.shown,
            time.monotonic() - self._down_since,
        )
        self.available = True

    # -- the primitives (imported on first use: they import the storage package) ----------

    def window(self) -> Window:
        """The sliding window on Redis."""
        from ..backends.window import RedisWindow

        return RedisWindow(self)

    def permits(self, name: str, kind: str = "sem") -> Permits:
        """Leased permits on Redis."""
        from ..backends.permits import RedisPermits, permit_keys

        return RedisPermits(self, permit_keys(self, name, kind))

    def tokens(self, family: str = "submit") -> Tokens:
        """Submit tokens on Redis."""
        from ..backends.tokens import RedisTokens

        return RedisTokens(self)

    def responses(self, resource: str = "") -> KeptResponses:
        """Idempotency records on Redis."""
        from ..backends.responses import RedisResponses

        return RedisResponses(self)

    def breaker(self, name: str) -> BreakerStore:
        """A breaker's state on Redis, with its copy in this process."""
        from ..backends.breaker_state import RedisBreakerStore

        return RedisBreakerStore(self, name)

    @property
    def local(self) -> MemoryStore:
        """The in-process fallback of this store (made on first use, kept for good)."""
        if self._local is None:
            self._local = MemoryStore(key_prefix=self.key_prefix)
        return self._local

    async def close_tasks(self) -> None:
        """Stop the spawned tasks, the pub/sub service and the lease keepers."""
        from ..backends.breaker_state import close_breakers
        from ..backends.permits import close_store_tasks
        from .pubsub import close_pubsub

        await super().close_tasks()
        await close_breakers(self)
        await close_store_tasks(self)
        await close_pubsub(self)  # the one reader of breakers and waiters alike
        await self.local.close_tasks()

    async def settle(self, seconds: float = SETTLE_SECONDS) -> None:
        """Wait, up to ``seconds``, until the calls sent without waiting
        (:meth:`send_many_detached`) have been answered, and those sent again after a lost
        script too, if the connection is open. Raises nothing: what fails is logged."""
        pipe = self._pipe
        if pipe is None:
            return
        try:
            async with asyncio.timeout(seconds):
                await pipe.settle()
                while self._resending:
                    await asyncio.wait(set(self._resending))
                    await pipe.settle()
        except OUTAGE_ERRORS:
            pass  # the leases free what was not given back
        except Exception:
            log.exception("ymguard: waiting for the replies on %s failed", self.shown)

    async def aclose(self) -> None:
        """Close the connection pool and the pipelined connection, after the replies of
        the calls sent without waiting (:meth:`settle`) and the give-back of the
        prefetched permits not handed out (a reply on its way may have stocked some)."""
        from ..backends.prefetch import give_back_stocks

        try:
            if self._pipe is not None:
                await self.settle()
                await drain()  # what a late reply's taking started giving back
            await give_back_stocks(self)
        finally:
            self._closing = True  # what the close fails is not an outage
            if self._pipe is not None:
                self._pipe.close()
        if self._pubsub_client is not None and self._pubsub_client is not self.client:
            await self._pubsub_client.aclose()
        await self.client.aclose()
