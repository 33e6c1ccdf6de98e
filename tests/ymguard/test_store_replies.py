"""How the Redis store reads error replies: ``run`` and ``run_many`` against a scripted
server speaking RESP over TCP.

A real Redis cannot be made to answer LOADING, OOM or NOSCRIPT to one chosen call while
the next succeeds; this server answers each command as a test says (the rest of the
suite runs on real Redis). What is checked: an unavailable reply marks the store down and
fails fast after; a bug in a script is raised, not taken for an outage; a lost script is
sent again with EVAL; a success after another call's outage marks the store up; a batch
in which some call ran fails as Unanswered, so that its caller gives back what it took.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import hiredis
import pytest
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ymguard import Context, Guard
from ymguard.chain import Chain
from ymguard.errors import StorageUnavailable
from ymguard.storage import RedisStore
from ymguard.storage.redis import ClientFailed, ScriptCall, Unanswered

Reply = bytes | None  # None: close the connection; b"...": raw RESP


class FakeRedis:
    """Answers each command with ``handler(args)``; all replies of one read in one write."""

    def __init__(self, handler: Callable[[list[bytes]], Any]) -> None:
        self.handler = handler
        self.commands: list[list[bytes]] = []
        self.server: asyncio.AbstractServer | None = None
        self.store: RedisStore | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}?socket_timeout=0.5&socket_connect_timeout=0.5"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                out = []
                while (cmd := parser.gets()) is not False:
                    self.commands.append(cmd)
                    reply = self.handler(cmd)
                    if asyncio.iscoroutine(reply):
                        reply = await reply
                    if reply is None:
                        writer.write(b"".join(out))
                        writer.close()
                        return
                    out.append(reply)
                writer.write(b"".join(out))
        except ConnectionError:
            pass

    async def stop(self) -> None:
        """Close the test's store (its connections), then the server."""
        if self.store is not None:
            await self.store.aclose()
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


def by_key(replies: dict[bytes, list[Reply]]) -> Callable[[list[bytes]], Any]:
    """EVALSHA/EVAL with KEYS[1] == k: the next of replies[k]; PING etc.: +OK."""

    def handler(cmd: list[bytes]) -> Any:
        name = cmd[0].upper()
        if name in (b"EVALSHA", b"EVAL"):
            key = cmd[3]
            queue = replies[key]
            return queue.pop(0) if len(queue) > 1 else queue[0]
        return b"+OK\r\n"

    return handler


SRC = "return 1"


async def make(handler: Callable[[list[bytes]], Any]) -> tuple[FakeRedis, RedisStore]:
    fake = FakeRedis(handler)
    url = await fake.start()
    store = fake.store = RedisStore(url, key_prefix="replies", retry_interval=30.0)
    # open the pipelined connection
    assert store._pipe is not None
    await store._pipe.execute("PING")
    return fake, store


async def test_success_after_a_concurrent_outage_marks_the_store_up() -> None:
    """Two runs in flight: A's reply is LOADING (marks down), B's succeeds afterwards.

    B's success shows the store answers: it is up again at once, not after a probe."""
    fake, store = await make(by_key({b"a": [b"-LOADING Redis is loading\r\n"], b"b": [b":7\r\n"]}))
    script = store.script(SRC)
    a = asyncio.ensure_future(store.run(script, ["a"], []))
    b = asyncio.ensure_future(store.run(script, ["b"], []))
    with pytest.raises(StorageUnavailable):
        await a
    assert await b == 7
    assert store.available, "B's answer came after A's outage: the store is up again"
    await fake.stop()


async def test_noscript_after_a_concurrent_outage_still_runs_eval() -> None:
    """A: LOADING (marks down); B: NOSCRIPT, then its EVAL is sent (not failed fast)."""
    fake, store = await make(
        by_key({b"a": [b"-LOADING Redis is loading\r\n"], b"b": [b"-NOSCRIPT x\r\n", b":7\r\n"]})
    )
    script = store.script(SRC)
    a = asyncio.ensure_future(store.run(script, ["a"], []))
    b = asyncio.ensure_future(store.run(script, ["b"], []))
    with pytest.raises(StorageUnavailable):
        await a
    assert await b == 7
    await fake.stop()


async def test_noscript_then_eval_bug_reply_is_raised_not_an_outage() -> None:
    fake, store = await make(by_key({b"a": [b"-NOSCRIPT x\r\n", b"-ERR user_script:1: boom\r\n"]}))
    script = store.script(SRC)
    with pytest.raises(ResponseError) as info:
        await store.run(script, ["a"], [])
    assert not isinstance(info.value, StorageUnavailable)
    assert store.available
    await fake.stop()


async def test_noscript_then_eval_loses_the_connection_is_unanswered() -> None:
    fake, store = await make(by_key({b"a": [b"-NOSCRIPT x\r\n", None]}))
    script = store.script(SRC)
    with pytest.raises(Unanswered):
        await store.run(script, ["a"], [])
    assert not store.available
    await fake.stop()


@pytest.mark.parametrize(
    "reply", [b"-LOADING x\r\n", b"-MASTERDOWN x\r\n", b"-ERR Error running script -READONLY x\r\n"]
)
async def test_unavailable_replies_in_run(reply: bytes) -> None:
    fake, store = await make(by_key({b"a": [reply]}))
    script = store.script(SRC)
    with pytest.raises(StorageUnavailable) as info:
        await store.run(script, ["a"], [])
    assert not isinstance(info.value, Unanswered)
    assert not store.available
    # fail fast now (no command sent)
    n = len(fake.commands)
    with pytest.raises(StorageUnavailable):
        await store.run(script, ["a"], [])
    assert len(fake.commands) == n
    # always_try goes through and marks up on success
    fake.handler = by_key({b"a": [b":1\r\n"]})
    assert await store.run(script, ["a"], [], always_try=True) == 1
    assert store.available
    await fake.stop()


async def test_bug_reply_in_run_is_raised_and_store_stays_up() -> None:
    fake, store = await make(by_key({b"a": [b"-ERR user_script:1: Script attempted x\r\n"]}))
    script = store.script(SRC)
    with pytest.raises(ResponseError) as info:
        await store.run(script, ["a"], [])
    assert not isinstance(info.value, StorageUnavailable)
    assert store.available
    await fake.stop()


async def test_run_many_noscript_then_later_unavailable() -> None:
    """[NOSCRIPT->EVAL ok, LOADING]: the EVAL ran: must be Unanswered (chain undoes)."""
    fake, store = await make(
        by_key({b"a": [b"-NOSCRIPT x\r\n", b":1\r\n"], b"b": [b"-LOADING x\r\n"]})
    )
    script = store.script(SRC)
    calls = [ScriptCall(script, ["a"], []), ScriptCall(script, ["b"], [])]
    with pytest.raises(StorageUnavailable) as info:
        await store.run_many(calls)
    assert isinstance(info.value, Unanswered), "call a ran (EVAL answered 1)"
    await fake.stop()


async def test_run_many_ok_then_later_unavailable() -> None:
    fake, store = await make(by_key({b"a": [b":1\r\n"], b"b": [b"-OOM x\r\n"]}))
    script = store.script(SRC)
    calls = [ScriptCall(script, ["a"], []), ScriptCall(script, ["b"], [])]
    with pytest.raises(StorageUnavailable) as info:
        await store.run_many(calls)
    assert isinstance(info.value, Unanswered), "call a ran"
    await fake.stop()


async def test_run_many_bug_reply_kept_in_place() -> None:
    fake, store = await make(
        by_key({b"a": [b"-NOSCRIPT x\r\n", b":1\r\n"], b"b": [b"-ERR boom\r\n"], b"c": [b":3\r\n"]})
    )
    script = store.script(SRC)
    calls = [ScriptCall(script, [k], []) for k in ("a", "b", "c")]
    replies = await store.run_many(calls)
    assert replies[0] == 1 and isinstance(replies[1], ResponseError) and replies[2] == 3
    assert store.available
    await fake.stop()


async def test_cancel_in_the_fast_path_does_not_shift_replies() -> None:
    gate = asyncio.Event()

    async def slow(cmd: list[bytes]) -> bytes:
        if cmd[0].upper() == b"EVALSHA" and cmd[3] == b"slow":
            await gate.wait()
            return b":1\r\n"
        return b":2\r\n" if cmd[0].upper() == b"EVALSHA" else b"+OK\r\n"

    fake, store = await make(slow)
    script = store.script(SRC)
    t = asyncio.ensure_future(store.run(script, ["slow"], []))
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    gate.set()
    assert await store.run(script, ["x"], []) == 2
    assert store.available
    await fake.stop()


async def test_cancel_during_noscript_eval_fallback() -> None:
    gate, eval_sent = asyncio.Event(), asyncio.Event()

    async def handler(cmd: list[bytes]) -> bytes:
        name = cmd[0].upper()
        if name == b"EVALSHA" and cmd[3] == b"a":
            return b"-NOSCRIPT x\r\n"
        if name == b"EVAL" and cmd[3] == b"a":
            eval_sent.set()
            await gate.wait()
            return b":1\r\n"
        return b":2\r\n" if name in (b"EVALSHA", b"EVAL") else b"+OK\r\n"

    fake, store = await make(handler)
    script = store.script(SRC)
    t = asyncio.ensure_future(store.run(script, ["a"], []))
    await asyncio.wait_for(eval_sent.wait(), 5)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    gate.set()
    assert await store.run(script, ["x"], []) == 2
    assert store.available and not store._probing
    await fake.stop()


async def test_timeout_in_the_fast_path_is_unanswered_then_probe_recovers() -> None:
    async def never(cmd: list[bytes]) -> bytes:
        if cmd[0].upper() == b"EVALSHA" and cmd[3] == b"hang":
            await asyncio.sleep(5)
        return b":1\r\n" if cmd[0].upper() == b"EVALSHA" else b"+OK\r\n"

    fake, store = await make(never)
    store.retry_interval = 0.05
    script = store.script(SRC)
    with pytest.raises(Unanswered):
        await store.run(script, ["hang"], [])
    assert not store.available
    with pytest.raises(StorageUnavailable):
        await store.run(script, ["x"], [])
    await asyncio.sleep(0.1)
    assert await store.run(script, ["x"], []) == 1  # the probe
    assert store.available
    await fake.stop()


# -- batches through redis-py (a cluster or a sentinel store) ----------------------------
# Each call of a batch goes to its own node: the replies can mix outcomes. The scripts
# here are stand-ins answering as a test says; the client is never connected.

OOM = ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
TIMED_OUT = RedisTimeoutError("Timeout reading from socket")
#: What redis-py's cluster client raised while slots moved under load (found by review).
CLIENT_BUG = AttributeError("'NoneType' object has no attribute 'writelines'")


class Answering:
    """A registered script's stand-in: returns ``outcome``, or raises it."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome

    async def __call__(self, keys: Any = None, args: Any = None) -> Any:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


async def client_batch(*outcomes: Any, down: bool = False) -> tuple[RedisStore, Any]:
    """``run_many`` on a cluster store whose calls end as ``outcomes``: (store, result or
    the exception raised)."""
    store = RedisStore("redis+cluster://127.0.0.1:1?socket_timeout=0.1", key_prefix="replies")
    store._cluster_ready = True  # no layout to read: no call reaches a node
    if down:
        store._mark_down(TIMED_OUT)
    calls = [ScriptCall(Answering(o), ["k"], []) for o in outcomes]  # type: ignore[arg-type]
    try:
        result: Any = await store.run_many(calls, always_try=down)
    except Exception as exc:
        result = exc
    return store, result


@pytest.mark.parametrize(
    "outcomes",
    [(TIMED_OUT, OOM), (OOM, TIMED_OUT), (1, OOM), (OOM, 1), (CLIENT_BUG, OOM), (OOM, CLIENT_BUG)],
    ids=["timeout,oom", "oom,timeout", "ok,oom", "oom,ok", "client,oom", "oom,client"],
)
async def test_a_client_batch_where_a_call_may_have_run_is_unanswered(outcomes: Any) -> None:
    """Whatever the order of the replies (before, [OOM, timeout] was a plain
    StorageUnavailable: the timed-out call's permit was not given back)."""
    store, result = await client_batch(*outcomes)
    assert isinstance(result, Unanswered)
    assert not store.available
    await store.aclose()


async def test_a_client_batch_refused_by_every_node_is_not_unanswered() -> None:
    store, result = await client_batch(OOM, OOM)
    assert isinstance(result, StorageUnavailable) and not isinstance(result, Unanswered)
    await store.aclose()


async def test_redis_py_failing_inside_is_an_outage_not_a_500() -> None:
    """A batch and a single call: the store is marked down, the caller meets an outage."""
    store, result = await client_batch(1, CLIENT_BUG)
    assert isinstance(result, Unanswered)
    assert isinstance(result.__cause__, AttributeError)  # named in the outage's message
    await store.aclose()
    store = RedisStore("redis+cluster://127.0.0.1:1?socket_timeout=0.1", key_prefix="replies")
    store._cluster_ready = True
    with pytest.raises(Unanswered) as raised:
        await store.run(Answering(CLIENT_BUG), ["k"], [])  # type: ignore[arg-type]
    assert isinstance(raised.value.__cause__, ClientFailed)
    assert not store.available
    await store.aclose()


async def test_a_client_batch_keeps_a_bug_reply_in_its_place() -> None:
    bug = ResponseError("ERR Error running script: attempt to compare nil with number")
    store, result = await client_batch(1, bug)
    assert result == [1, bug]
    assert store.available
    await store.aclose()


async def test_a_down_store_failing_again_logs_no_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A release tried while the store is down, whose batch meets the outage again, is
    no sign of recovery (before: 'is back after 0.0 s', then 'unavailable' again)."""
    with caplog.at_level(logging.WARNING, logger="ymguard.storage"):
        store, result = await client_batch(1, TIMED_OUT, down=True)
    assert isinstance(result, Unanswered)
    assert not store.available
    assert not [r for r in caplog.records if "is back" in r.getMessage()]
    await store.aclose()


def as_redis_py_raises(reply: str) -> BaseException:
    """An error reply as redis-py's own connections raise it (the code taken off the
    message, named by the class)."""
    from redis._parsers.base import BaseParser

    error: BaseException = BaseParser.parse_error(reply)
    return error


@pytest.mark.parametrize(
    "reply",
    [
        "OOM command not allowed when used memory > 'maxmemory'.",
        "READONLY You can't write against a read only replica.",
        "CLUSTERDOWN The cluster is down",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
    ],
    ids=["oom", "readonly", "clusterdown", "masterdown", "tryagain"],
)
async def test_redis_py_unavailable_replies_are_outages(reply: str) -> None:
    """Through redis-py (cluster, sentinel) the code is off the message: before, OOM,
    READONLY and TRYAGAIN read as bugs in a script (a 500), CLUSTERDOWN in a batch too."""
    error = as_redis_py_raises(reply)
    assert reply.split()[0] not in str(error)  # what the text alone could not tell
    store, result = await client_batch(error)
    assert isinstance(result, StorageUnavailable) and not isinstance(result, Unanswered)
    assert not store.available
    await store.aclose()
    store = RedisStore("redis+cluster://127.0.0.1:1?socket_timeout=0.1", key_prefix="replies")
    store._cluster_ready = True
    with pytest.raises(StorageUnavailable):
        await store.run(Answering(error), ["k"], [])  # type: ignore[arg-type]
    assert not store.available
    await store.aclose()


# -- the chain's entry on the pipelined connection ----------------------------------------
# A one-rule chain on Redis awaits its batch's future itself (``send_many_now``), doing
# what ``run_many`` would do on the replies. The window's reply: admitted, remaining,
# wait in ms, slot.

ADMITTED = b"*4\r\n:1\r\n:9\r\n:0\r\n:1\r\n"


def scripted(*replies: Reply) -> Callable[[list[bytes]], Any]:
    """EVALSHA/EVAL: the next of ``replies`` (the last one again once they run out)."""
    queue = list(replies)

    def handler(cmd: list[bytes]) -> Any:
        if cmd[0].upper() in (b"EVALSHA", b"EVAL"):
            return queue.pop(0) if len(queue) > 1 else queue[0]
        return b"+OK\r\n"

    return handler


async def qps_chain(handler: Callable[[list[bytes]], Any]) -> tuple[FakeRedis, Guard, Chain]:
    fake, store = await make(handler)
    store.on_storage_error = "open"  # an outage passes the call: a token of None
    guard = Guard({"resources": {"GET /r": {"flow": [{"qps": 10}]}}}, storage=store)
    return fake, guard, guard.chain("GET /r")


def scripts_sent(fake: FakeRedis) -> list[bytes]:
    return [cmd[0].upper() for cmd in fake.commands if cmd[0].upper() in (b"EVALSHA", b"EVAL")]


async def test_the_chain_awaits_its_batch_and_no_coroutine_of_the_store() -> None:
    """While a request waits for Redis, the chain's entry awaits the connection's future
    itself: every coroutine held while waiting is an object the garbage collector counts
    (with 32 requests waiting, two more each made uvicorn run a young collection every
    60 requests)."""
    gate = asyncio.Event()

    async def held(cmd: list[bytes]) -> bytes:
        if cmd[0].upper() == b"EVALSHA":
            await gate.wait()
            return ADMITTED
        return b"+OK\r\n"

    fake, guard, chain = await qps_chain(held)
    task = asyncio.ensure_future(chain.enter(Context("GET /r")))
    await asyncio.sleep(0)  # the task runs up to its wait; the write goes out after
    coro = task.get_coro()
    assert coro.cr_code is Chain.enter.__code__  # type: ignore[union-attr]
    assert not asyncio.iscoroutine(coro.cr_await), coro.cr_await  # type: ignore[union-attr]
    assert not task.done()
    gate.set()
    assert len(await task) == 1
    await guard.aclose()
    await fake.stop()


async def test_the_chain_sends_a_lost_script_again() -> None:
    fake, guard, chain = await qps_chain(scripted(b"-NOSCRIPT x\r\n", ADMITTED))
    assert len(await chain.enter(Context("GET /r"))) == 1
    assert scripts_sent(fake) == [b"EVALSHA", b"EVAL"]
    assert guard.store.available
    await guard.aclose()
    await fake.stop()


async def test_the_chain_meets_an_unavailable_reply_as_an_outage() -> None:
    fake, guard, chain = await qps_chain(scripted(b"-LOADING x\r\n"))
    assert await chain.enter(Context("GET /r")) == [None]  # on_storage_error: open
    assert not guard.store.available
    assert scripts_sent(fake) == [b"EVALSHA"]  # the check's own enter failed fast
    await guard.aclose()
    await fake.stop()


async def test_the_chain_meets_a_lost_connection_with_the_store_down() -> None:
    """The store is down before the check meets the outage on its own: it does not try
    the lost connection again."""
    fake, guard, chain = await qps_chain(scripted(None))
    assert await chain.enter(Context("GET /r")) == [None]
    assert not guard.store.available
    assert scripts_sent(fake) == [b"EVALSHA"]
    await guard.aclose()
    await fake.stop()


async def test_an_outage_read_after_an_answer_leaves_the_store_down() -> None:
    """Two requests in one write: the first is answered, then the connection closes. The
    first's answer came before the outage: it must not lift the fail-fast."""
    fake, guard, chain = await qps_chain(scripted(ADMITTED, None))
    first = asyncio.ensure_future(chain.enter(Context("GET /r")))
    second = asyncio.ensure_future(chain.enter(Context("GET /r")))
    assert (await first)[0] is not None  # admitted by Redis
    assert await second == [None]  # met the outage: on_storage_error open
    assert not guard.store.available
    await guard.aclose()
    await fake.stop()
