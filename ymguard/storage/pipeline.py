"""An auto-pipelined Redis connection for the scripts on the request path.

redis-py's asyncio client spends 60-80 µs of CPU per command (pool checkout, packing,
its parser loop); with every guarded request running one script, that alone costs more
than the whole budget ymguard has per request. This connection writes every command
issued in one event-loop turn in a single ``write`` and matches replies to callers in
order, parsing with hiredis (redis-py's own C parser): 4-8 µs of CPU per script.

It serves only single-connection deployments (``redis://``, ``rediss://``,
``redis+unix://``); cluster and sentinel stores keep using redis-py, which knows their
routing. Pub/sub and blocking commands always use redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Mapping
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def _encode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, int | float):
        return repr(value).encode()
    raise TypeError(f"cannot send {type(value).__name__} to Redis")


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP (hiredis packs it in C: a quarter of the cost in Python)."""
    try:
        packed: bytes = _pack_command(args)
    except Exception:  # a bool, or a type hiredis does not take: packed (or refused) below
        return _pack(args)
    return packed


_pack_command = hiredis.pack_command


def _pack(args: tuple[Any, ...]) -> bytes:
    """:func:`pack` in Python (bools as 1 and 0; other types refused with a TypeError)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _encode(arg)
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _ssl_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    """The TLS context a ``rediss://`` URL asks for (redis-py's ``ssl_*`` options)."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    reqs = options.get("ssl_cert_reqs", ssl.CERT_REQUIRED)
    if isinstance(reqs, str):
        reqs = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(
            reqs.lower(), ssl.CERT_REQUIRED
        )
    context.check_hostname = bool(options.get("ssl_check_hostname", reqs != ssl.CERT_NONE))
    context.verify_mode = reqs
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return context


#: The reply list of a batch of one command, until its reply comes (then a list is made):
#: no list of its own while it waits, one object fewer for the garbage collector's count
#: per request waiting for Redis.
_ONE: list[Any] = []


class _Forward:
    """A batch's waiter that hands its replies to the caller's future, or to ``late`` if
    that future was cancelled first (a cancel and the reply in the same loop turn, in
    either order: the replies are never dropped)."""

    __slots__ = ("future", "late")

    def __init__(self, future: asyncio.Future[Any], late: Any) -> None:
        self.future = future
        self.late = late

    def done(self) -> bool:
        return False

    def set_result(self, replies: list[Any]) -> None:
        future = self.future
        if not future.done():
            future.set_result(replies)
        elif future.cancelled():
            self.late.set_result(replies)

    def set_exception(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _Loaded:
    """The waiter of a batch of SCRIPT LOADs: no task waits for their replies.

    An error reply (the server cannot serve) is left to the commands that use the
    scripts: they meet it too, and a lost script still falls back to EVAL.
    """

    __slots__ = ("protocol",)

    def __init__(self, protocol: _Protocol) -> None:
        self.protocol = protocol

    def done(self) -> bool:
        return False

    def set_result(self, replies: list[Any]) -> None:
        self.protocol.reloading = False

    def set_exception(self, exc: BaseException) -> None:
        self.protocol.reloading = False


class _Protocol(asyncio.Protocol):
    """One connection: buffered writes, replies resolved in order, a timeout watchdog."""

    def __init__(self, timeout: float, scripts: list[bytes]) -> None:
        self.timeout = timeout
        # The SCRIPT LOAD of every script the store registered (the pipeline's list, shared),
        # how many of them this connection has sent, and whether a reload after a lost
        # script (NOSCRIPT: the server's cache flushed) is on its way.
        self.scripts = scripts
        self.loaded = 0
        self.reloading = False
        self.reader = hiredis.Reader()
        # Per command or batch sent: its future, its deadline, and for a batch the list
        # its replies are gathered in and how many it waits for (one future per batch).
        self.waiters: collections.deque[
            tuple[asyncio.Future[Any], float, list[Any] | None, int]
        ] = collections.deque()
        self.pending: list[bytes] = []
        # Any: uvloop's transports are not asyncio.Transport subclasses.
        self.transport: Any = None
        self.loop = asyncio.get_running_loop()
        self.flush_scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.lost: BaseException | None = None
        self.writes = 0  # round trips sent (one write per event-loop turn)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        while (reply := self.reader.gets()) is not False:
            future, _, batch, expected = waiters[0]
            if isinstance(reply, hiredis.ReplyError):
                text = str(reply)
                if text.startswith("NOSCRIPT"):
                    reply = NoScriptError(text)
                    if not self.reloading:  # the server lost its scripts: load them all
                        self.reloading = True  # once, however many calls met it
                        self.load(0)
                else:
                    reply = ResponseError(text)
            if batch is not None:  # a batch's error replies stay in their places
                if expected == 1:  # its list made now, not held while it waited (_ONE)
                    batch = [reply]
                else:
                    batch.append(reply)
                    if len(batch) < expected:
                        continue
                waiters.popleft()
                if not future.done():  # a cancelled caller's replies are dropped in order
                    future.set_result(batch)
                continue
            waiters.popleft()
            if future.done():  # its caller was cancelled; the reply is dropped in order
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def fail(self, error: BaseException) -> None:
        self.lost = error
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        while self.waiters:
            future = self.waiters.popleft()[0]
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def send(self, data: bytes) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        if self.lost is not None:  # a caller that got the connection as it was lost
            future.set_exception(self.lost)
            return future
        self.waiters.append((future, self.loop.time() + self.timeout, None, 1))
        self.pending.append(data)
        self._queued()
        return future

    def _queued(self) -> None:
        """Commands were queued: flush them at the end of this turn, and watch the time."""
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self.watchdog is None:
            self.watchdog = self.loop.call_later(self.timeout, self._check)

    def send_batch(self, packed: list[bytes], late: Any = None) -> asyncio.Future[list[Any]]:
        """Queue several commands; one future for the list of their replies, in order.

        An error reply is in its place as a ``ResponseError`` (``NoScriptError``), not
        raised; a lost connection fails the future. If the future is cancelled before
        the replies come, they go to ``late`` (its ``set_result``) when they do.
        """
        future = self.loop.create_future()
        if self.lost is not None:  # a caller that got the connection as it was lost
            future.set_exception(self.lost)
            return future
        if not packed:  # nothing to wait for (a waiter for no reply would take the next)
            future.set_result([])
            return future
        n = len(packed)
        waiter: Any = future if late is None else _Forward(future, late)
        self.waiters.append((waiter, self.loop.time() + self.timeout, [] if n > 1 else _ONE, n))
        self.pending.extend(packed)
        self._queued()
        return future

    def load(self, start: int) -> None:
        """Queue the SCRIPT LOAD of ``scripts[start:]``: every command sent after them
        finds them loaded (commands on a connection run in order)."""
        loads = self.scripts[start:]
        self.loaded = len(self.scripts)
        if not loads or self.lost is not None:
            self.reloading = False
            return
        n = len(loads)
        waiter: Any = _Loaded(self)
        self.waiters.append((waiter, self.loop.time() + self.timeout, [] if n > 1 else _ONE, n))
        self.pending.extend(loads)
        self._queued()

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is not None and self.lost is None:
            self.writes += 1
            self.transport.write(b"".join(self.pending))
        self.pending.clear()

    def _check(self) -> None:
        # Replies come in order, so only the oldest waiter can be overdue first.
        self.watchdog = None
        if not self.waiters:
            return
        deadline = self.waiters[0][1]
        if deadline <= self.loop.time():
            self.fail(RedisTimeoutError(f"Redis did not answer within {self.timeout} s"))
        else:
            self.watchdog = self.loop.call_at(deadline, self._check)


class AutoPipeline:
    """Auto-pipelined commands and scripts over one lazily opened connection.

    Args:
        url: a ``redis://``, ``rediss://`` or ``unix://`` URL (as redis-py parses them).
        timeout: seconds a command may wait for its reply before the connection is
            dropped and every command on it fails with a timeout.
        connect_timeout: seconds to open the connection (and authenticate).
    """

    def __init__(self, url: str, timeout: float, connect_timeout: float) -> None:
        self.options = parse_url(url)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._writes_before = 0  # the writes of the connections closed before this one
        self._scripts: list[bytes] = []  # SCRIPT LOAD of each script (see load)

    @property
    def writes(self) -> int:
        """Writes sent so far, over every connection: each one is one round trip."""
        protocol = self._protocol
        return self._writes_before + (protocol.writes if protocol is not None else 0)

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        options = self.options
        timeout = self.timeout
        scripts = self._scripts

        def factory() -> _Protocol:
            return _Protocol(timeout, scripts)

        cls = options.get("connection_class")
        if cls is UnixDomainSocketConnection:
            connect = loop.create_unix_connection(factory, options["path"])
        else:
            context = _ssl_context(options) if cls is SSLConnection else None
            host, port = options.get("host", "localhost"), options.get("port", 6379)
            connect = loop.create_connection(factory, host, port, ssl=context)
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _transport, protocol = await connect
                setup = []
                if options.get("password"):
                    user = options.get("username")
                    auth = (
                        ("AUTH", user, options["password"])
                        if user
                        else ("AUTH", options["password"])
                    )
                    setup.append(protocol.send(pack(auth)))
                if options.get("db"):
                    setup.append(protocol.send(pack(("SELECT", options["db"]))))
                for reply in setup:
                    await reply
                # Before anything else is sent: no EVALSHA on this connection meets a
                # script the server does not know (a new or restarted server).
                protocol.load(0)
        except BaseException as exc:
            if protocol is not None:  # never leave a half-set-up socket behind
                protocol.fail(RedisConnectionError("connection setup failed"))
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError("timed out connecting to Redis") from None
            if isinstance(exc, OSError):
                raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
            if isinstance(exc, ResponseError):  # WRONGPASS, NOAUTH, a bad db: can't serve
                raise AuthenticationError(f"Redis refused the connection: {exc}") from exc
            raise
        return protocol

    async def _ready(self) -> _Protocol:
        protocol = self._protocol
        if (
            protocol is not None
            and protocol.lost is None
            and protocol.loop is asyncio.get_running_loop()
        ):
            return protocol
        if (
            self._connecting is None
            or self._connecting.get_loop() is not asyncio.get_running_loop()
        ):
            self._connecting = asyncio.ensure_future(self._connect())
            # Its callers may all be cancelled: retrieve the outcome so a failed connect
            # is not logged as "exception never retrieved".
            self._connecting.add_done_callback(_retrieve)
        connecting = self._connecting
        try:
            protocol = await asyncio.shield(connecting)
            if self._protocol is not None and self._protocol is not protocol:
                self._writes_before += self._protocol.writes
            self._protocol = protocol
        finally:
            if connecting.done():
                self._connecting = None
        if protocol.lost is not None:  # lost in the steps since it was set up
            raise protocol.lost
        if protocol.loaded < len(self._scripts):  # registered while it connected
            protocol.load(protocol.loaded)
        return protocol

    def load(self, source: str) -> None:
        """Have the server know the script ``source`` before any later command uses it:
        its SCRIPT LOAD goes out first on every new connection, and now on the open one.

        EVALSHA then finds it on a new or restarted server, where it would otherwise meet
        NOSCRIPT and be sent again with EVAL a round trip later (a give-back sent
        without waiting, late: the next call would still find the permit taken). A
        server that loses its scripts while connected (SCRIPT FLUSH) has them all
        loaded again at the first NOSCRIPT reply.
        """
        self._scripts.append(pack(("SCRIPT", "LOAD", source)))
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            return  # loaded as the next connection opens
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # registered outside the loop: loaded at the first NOSCRIPT
            return
        if protocol.loop is loop:
            protocol.load(protocol.loaded)

    def send_now(self, packed: bytes) -> asyncio.Future[Any] | None:
        """Queue a packed command on the open connection; None if it must connect first.

        The request path awaits the returned future directly: one await instead of a
        coroutine per layer.
        """
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            return None
        if protocol.loop is not asyncio.get_running_loop():
            return None
        return protocol.send(packed)

    def send_many_now(
        self, packed: list[bytes], late: Any = None
    ) -> asyncio.Future[list[Any]] | None:
        """Queue several packed commands in one write; None if it must connect first.

        The future's result is the list of replies in order, error replies in their
        places as ``ResponseError`` (see :meth:`_Protocol.send_batch`). If the future is
        cancelled before they come, they go to ``late`` (``set_result`` with the list),
        if given, when they do.
        """
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            return None
        if protocol.loop is not asyncio.get_running_loop():
            return None
        return protocol.send_batch(packed, late)

    def send_many_detached(self, packed: list[bytes], receiver: Any) -> bool:
        """Queue several packed commands in one write; their replies go to ``receiver``
        (``set_result`` with the list, or ``set_exception``), which no task awaits. False,
        having queued nothing, if the connection is not open in this loop."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            return False
        if protocol.loop is not asyncio.get_running_loop():
            return False
        if not packed:  # no reply to wait for (a waiter for none would take the next)
            return True
        deadline = protocol.loop.time() + protocol.timeout
        n = len(packed)
        protocol.waiters.append((receiver, deadline, [] if n > 1 else _ONE, n))
        protocol.pending.extend(packed)
        protocol._queued()
        return True

    async def send_many(self, packed: list[bytes]) -> asyncio.Future[list[Any]]:
        """Connect if needed, then queue several packed commands in one write."""
        protocol = await self._ready()
        return protocol.send_batch(packed)

    async def send(self, packed: bytes) -> Any:
        """Send a packed command (connecting first if needed) and return its reply."""
        future = self.send_now(packed)
        if future is None:
            future = (await self._ready()).send(packed)
        return await future

    async def execute(self, *args: Any) -> Any:
        """Run one command; replies keep redis-py's types (bytes, int, list)."""
        return await self.send(pack(args))

    async def settle(self) -> None:
        """Wait until every command sent so far has been answered (those whose replies
        no one awaits too): a PING, answered after them, if any is still out. Raises what
        the connection meets (lost, timed out)."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            return
        if protocol.loop is not asyncio.get_running_loop():
            return  # its loop's calls, answered or not, are not this loop's to wait for
        if protocol.waiters or protocol.pending:
            await protocol.send(pack(("PING",)))

    def close(self) -> None:
        """Drop the connection (pending commands fail)."""
        if self._protocol is not None:
            self._protocol.fail(RedisConnectionError("closed"))
            self._protocol = None
