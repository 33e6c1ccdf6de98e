"""The auto-pipelined connection the request path uses on Redis."""

from __future__ import annotations

import asyncio

import hiredis
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.helpers import RedisServer
from ymguard.storage.pipeline import AutoPipeline
from ymguard.storage.redis import ArgsPacker, RedisStore, ScriptCall, evalsha


async def test_concurrent_commands_get_their_own_replies(redis_url: str, prefix: str) -> None:
    pipe = AutoPipeline(redis_url, 2.0, 2.0)
    keys = [f"{prefix}:{i}" for i in range(200)]
    await asyncio.gather(*(pipe.execute("SET", k, i) for i, k in enumerate(keys)))
    values = await asyncio.gather(*(pipe.execute("GET", k) for k in keys))
    assert values == [str(i).encode() for i in range(200)]
    await pipe.execute("DEL", *keys)
    pipe.close()


async def test_a_cancelled_caller_does_not_shift_the_replies(redis_url: str, prefix: str) -> None:
    pipe = AutoPipeline(redis_url, 2.0, 2.0)
    await pipe.execute("SET", f"{prefix}:a", "A")
    await pipe.execute("SET", f"{prefix}:b", "B")
    first = asyncio.ensure_future(pipe.execute("GET", f"{prefix}:a"))
    second = asyncio.ensure_future(pipe.execute("GET", f"{prefix}:b"))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == b"B"
    assert await pipe.execute("GET", f"{prefix}:a") == b"A"
    await pipe.execute("DEL", f"{prefix}:a", f"{prefix}:b")
    pipe.close()


async def test_batches_of_one_get_lists_of_their_own(redis_url: str, prefix: str) -> None:
    """A batch of one command waits without a list (the shared ``_ONE``); its reply
    comes in a list of its own, and batches of one and of more keep their order."""
    from ymguard.storage import pipeline

    pipe = AutoPipeline(redis_url, 2.0, 2.0)
    await pipe.execute("PING")
    key = f"{prefix}:one"
    sent = [pipe.send_many_now([pipeline.pack(("INCR", key))]) for _ in range(3)]
    sent.append(pipe.send_many_now([pipeline.pack(("INCR", key)), pipeline.pack(("GET", key))]))
    sent.append(pipe.send_many_now([pipeline.pack(("NOSUCHCOMMAND",))]))
    replies = [await f for f in sent if f is not None]
    assert replies[:4] == [[1], [2], [3], [4, b"4"]]
    assert isinstance(replies[4][0], ResponseError)
    assert len({id(r) for r in replies}) == 5 and not pipeline._ONE
    await pipe.execute("DEL", key)
    pipe.close()


async def test_errors_come_back_as_redis_errors(redis_url: str) -> None:
    pipe = AutoPipeline(redis_url, 2.0, 2.0)
    with pytest.raises(ResponseError):
        await pipe.execute("NOSUCHCOMMAND")
    assert await pipe.execute("PING") == b"PONG"
    pipe.close()


async def test_scripts_survive_a_script_cache_flush(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url)
    script = store.script("return ARGV[1] + 1")
    assert await store.run(script, (), (1,)) == 2
    await store.client.script_flush()
    assert await store.run(script, (), (41,)) == 42
    await store.aclose()


async def test_batches_survive_a_script_cache_flush(private_redis: RedisServer) -> None:

    store = RedisStore(private_redis.url)
    add = store.script("return ARGV[1] + 1")
    double = store.script("return ARGV[1] * 2")
    calls = [ScriptCall(add, (), (1,)), ScriptCall(double, (), (4,))]
    assert await store.run_many(calls) == [2, 8]
    await store.client.script_flush()
    assert await store.run_many(calls) == [2, 8]  # each lost script is sent again with EVAL
    await store.aclose()


async def test_a_batch_keeps_error_replies_in_their_places(redis_url: str) -> None:
    pipe = AutoPipeline(redis_url, 2.0, 2.0)
    assert await pipe.execute("PING") == b"PONG"  # connected: the batch goes out at once
    batch = pipe.send_many_now([_pack("PING"), _pack("NOSUCHCOMMAND"), _pack("PING")])
    assert batch is not None
    first, error, last = await batch
    assert first == last == b"PONG"
    assert isinstance(error, ResponseError)
    pipe.close()


async def test_an_empty_batch_takes_no_reply(redis_url: str) -> None:
    pipe = AutoPipeline(redis_url, 2.0, 2.0)
    assert await pipe.execute("PING") == b"PONG"
    empty = pipe.send_many_now([])
    assert empty is not None
    assert await pipe.execute("ECHO", "mine") == b"mine"  # not taken by the empty batch
    assert await empty == []
    pipe.close()


async def test_a_cancelled_batch_does_not_shift_the_replies(redis_url: str, prefix: str) -> None:
    pipe = AutoPipeline(redis_url, 2.0, 2.0)
    await pipe.execute("SET", f"{prefix}:a", "A")
    await pipe.execute("SET", f"{prefix}:b", "B")
    batch = pipe.send_many_now([_pack("GET", f"{prefix}:a"), _pack("GET", f"{prefix}:a")])
    assert batch is not None
    after = asyncio.ensure_future(pipe.execute("GET", f"{prefix}:b"))
    batch.cancel()
    assert await after == b"B"
    assert await pipe.execute("GET", f"{prefix}:a") == b"A"
    await pipe.execute("DEL", f"{prefix}:a", f"{prefix}:b")
    pipe.close()


def _pack(*args: str) -> bytes:
    from ymguard.storage.pipeline import pack

    return pack(args)


class Heard:
    """A ``late`` receiver that keeps what it is handed."""

    def __init__(self) -> None:
        self.replies: list[list[object]] = []

    def set_result(self, replies: list[object]) -> None:
        self.replies.append(replies)


async def test_a_cancelled_batchs_replies_go_to_late_in_either_order(
    redis_url: str, prefix: str
) -> None:
    """A batch sent with ``late``: its caller's future gets the replies, or, cancelled
    before they came (even in the loop turn that reads them, before they are read),
    ``late`` does; never both, and the replies after it keep their order."""
    pipe = AutoPipeline(redis_url, 2.0, 2.0)
    key = f"{prefix}:late"
    await pipe.execute("PING")
    kept, dropped = Heard(), Heard()
    answered = pipe.send_many_now([_pack("INCR", key)], kept)
    cancelled = pipe.send_many_now([_pack("INCR", key), _pack("INCR", key)], dropped)
    after = pipe.send_many_now([_pack("GET", key)])
    assert answered is not None and cancelled is not None and after is not None
    cancelled.cancel()
    assert await answered == [1] and kept.replies == []
    assert await after == [b"3"]
    assert dropped.replies == [[2, 3]]
    await pipe.execute("DEL", key)
    pipe.close()


async def test_password_and_database_from_the_url() -> None:
    server = RedisServer().start()
    try:
        redis.Redis(port=server.port).config_set("requirepass", "s3cret")
        pipe = AutoPipeline(f"redis://:s3cret@127.0.0.1:{server.port}/3", 2.0, 2.0)
        await pipe.execute("SET", "k", "v")
        assert b" db=3 " in await pipe.execute("CLIENT", "INFO")
        pipe.close()
    finally:
        server.close()


async def test_a_hung_server_times_out_and_the_next_call_reconnects(
    private_redis: RedisServer,
) -> None:
    pipe = AutoPipeline(private_redis.url, 0.3, 0.3)
    assert await pipe.execute("PING") == b"PONG"
    private_redis.pause()
    try:
        with pytest.raises(RedisTimeoutError):
            await pipe.execute("PING")
    finally:
        private_redis.resume()
    assert await pipe.execute("PING") == b"PONG"
    private_redis.stop()
    with pytest.raises(RedisConnectionError):
        await pipe.execute("PING")
    pipe.close()


# -- calls sent without waiting for their replies (the releases after a call) ---------------


def _counting(server: RedisServer) -> tuple[RedisStore, ScriptCall]:
    """A store on ``server`` and a call that counts in the key ``n`` (INCR)."""
    store = RedisStore(server.url)
    return store, ScriptCall(store.script("return redis.call('INCR', KEYS[1])"), ("n",), ())


async def test_detached_calls_run_in_order_and_aclose_waits_for_them(
    private_redis: RedisServer,
) -> None:
    store, call = _counting(private_redis)
    assert not store.send_many_detached([call])  # not connected yet: the caller awaits
    assert await store.run_many([call]) == [1]
    assert all(store.send_many_detached([call]) for _ in range(50))
    # Sent after them on the same connection: it sees every one of them.
    assert await store.run_many([call]) == [52]
    assert all(store.send_many_detached([call, call]) for _ in range(10))
    await store.aclose()  # waits for their replies before it drops the connection
    assert redis.Redis(port=private_redis.port).get("n") == b"72"


async def test_a_detached_call_whose_script_the_server_lost_is_sent_again(
    private_redis: RedisServer,
) -> None:
    from ymguard.storage import tasks

    store, call = _counting(private_redis)
    assert await store.run_many([call]) == [1]
    await store.client.script_flush()
    assert store.send_many_detached([call])  # NOSCRIPT: sent again with EVAL
    await store.settle()
    await tasks.drain()
    assert await store.run_many([call]) == [3]
    assert store.available
    await store.aclose()


async def test_a_detached_call_failing_is_logged_and_a_lost_connection_marks_the_store_down(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from ymguard.storage import tasks

    store = RedisStore(private_redis.url)
    bug = store.script("return redis.call('INCR', KEYS[1])")  # on a string: an error
    ok = store.script("return 1")
    assert await store.run_many([ScriptCall(ok, (), ())]) == [1]
    redis.Redis(port=private_redis.port).set("s", "text")
    # The bug's script is not loaded yet: sent again with EVAL, and its error seen then.
    assert store.send_many_detached([ScriptCall(bug, ("s",), ()), ScriptCall(ok, (), ())])
    await store.settle()
    await tasks.drain()
    assert "a give-back on" in caplog.text and "not an integer" in caplog.text
    caplog.clear()
    assert store.send_many_detached([ScriptCall(bug, ("s",), ()), ScriptCall(ok, (), ())])
    await store.settle()
    assert "a give-back on" in caplog.text and "not an integer" in caplog.text
    assert store.available  # a bug in one call is no outage
    assert store.send_many_detached([ScriptCall(ok, (), ())])
    private_redis.stop()  # before the write goes out: the connection is lost under it
    await store.settle()  # returns once the loss is read (no reply will come)
    await asyncio.sleep(0)  # the mark-down queued when the connection failed has run
    assert not store.available  # the leases free what was not given back
    assert not store.send_many_detached([ScriptCall(ok, (), ())])  # down: awaited
    assert store.outages == 1
    await store.aclose()


async def test_an_empty_detached_batch_takes_no_reply(redis_url: str) -> None:
    store = RedisStore(redis_url)
    assert await store.call("PING") == b"PONG"
    assert store.send_many_detached([])  # nothing to send, nothing to wait for
    assert await store.call("ECHO", "mine") == b"mine"  # not taken by the empty batch
    await store.aclose()


async def test_aclose_waits_for_a_give_back_sent_again_after_a_lost_script(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by review: the EVAL sent again after NOSCRIPT went out after aclose's wait,
    met the closed connection, and the close marked the store down."""
    store, call = _counting(private_redis)
    assert await store.call("PING") == b"PONG"  # connected; the script never loaded
    assert store.send_many_detached([call])
    await store.aclose()
    assert redis.Redis(port=private_redis.port).get("n") == b"1"
    assert store.outages == 0 and "unavailable" not in caplog.text


async def test_an_outage_met_by_a_detached_call_outlasts_the_calls_answered_before_it(
    private_redis: RedisServer,
) -> None:
    """Found by review: a detached release met an unavailable reply in the same read as
    an earlier caller's answer, marked the store down at once, and that caller, waking up
    after, took the outage for over (and lifted the fail-fast while Redis still failed)."""
    store = RedisStore(private_redis.url)
    ok = store.script("return 1")
    readonly = store.script("return redis.error_reply('READONLY You cannot write')")
    assert await store.run_many([ScriptCall(ok, (), ())]) == [1]
    await store.client.script_load(readonly.script)  # loaded: EVALSHA meets no NOSCRIPT
    answered = asyncio.ensure_future(store.run_many([ScriptCall(ok, (), ())]))
    await asyncio.sleep(0)  # queued: the detached call goes out in the same write
    assert store.send_many_detached([ScriptCall(readonly, (), ())])
    assert await answered == [1]
    await store.settle()
    await asyncio.sleep(0)
    assert not store.available  # down, and not over
    assert store.outages == 1
    await store.aclose()


@pytest.mark.parametrize(
    "args",
    [
        (3, 5000, "0123abcd", 0, "ymt:{p}:wake"),
        (True, False, 1.5, b"raw", "caf\u00e9 \u2603"),  # bools (packed in Python), non-ASCII
        tuple(range(12)),  # ten arguments and more: a longer header
    ],
)
async def test_a_packer_packs_what_evalsha_packs(redis_url: str, prefix: str, args: tuple) -> None:
    store = RedisStore(redis_url, key_prefix=prefix)
    script = store.script("return {KEYS[1], KEYS[2], unpack(ARGV)}")
    keys = (store.key("t", "a"), store.key("t", "b\u00e9"))
    packer = store.packer(script, keys, len(args))
    assert packer is not None
    assert packer.pack(args) == evalsha(script, keys, args)
    # Redis reads it as it reads the call packed whole (a wrong header would shift every
    # later reply on the connection: the second call checks that too).
    packed = ScriptCall(script, keys, args, packer.pack(args))
    whole = ScriptCall(script, keys, args)
    first, second = await store.run_many([packed, whole])
    assert first == second and len(first) == 2 + len(args)
    with pytest.raises(ValueError, match="arguments for a packer"):
        packer.pack(args[:-1])
    await store.aclose()


def test_a_store_without_a_pipelined_connection_packs_nothing() -> None:
    store = RedisStore("redis+cluster://127.0.0.1:1", key_prefix="x")
    assert store.packer(store.script("return 1"), ("k",), 1) is None
    assert isinstance(ArgsPacker(store.script("return 1"), ("k",), 1).pack((1,)), bytes)


async def test_a_connection_lost_right_after_its_setup_fails_its_callers() -> None:
    """The server accepts, answers AUTH and closes at once (a restart, a proxy): the
    callers that waited for the connection get it already lost. They fail with the loss,
    not wait forever (the watchdog the setup had armed was cancelled and never re-armed),
    and the next call connects again."""
    closing = True

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        while True:
            data = await reader.read(65536)
            if not data:
                break
            parser.feed(data)
            while (command := parser.gets()) is not False:
                writer.write(b"+OK\r\n" if command[0].upper() == b"AUTH" else b":1\r\n")
            await writer.drain()
            if closing:
                break
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pipe = AutoPipeline(f"redis://:pw@127.0.0.1:{port}", timeout=0.5, connect_timeout=2)
    async with asyncio.timeout(10):  # a bound, not a measure: they hung before
        outcomes = await asyncio.gather(
            *(pipe.execute("PING") for _ in range(3)), return_exceptions=True
        )
    assert all(isinstance(o, RedisConnectionError) for o in outcomes), outcomes
    closing = False
    async with asyncio.timeout(10):
        assert await pipe.execute("PING") == 1  # a new connection
    pipe.close()
    server.close()
    await server.wait_closed()


async def test_a_detached_call_finds_its_script_loaded_on_a_new_server(
    private_redis: RedisServer,
) -> None:
    """Every registered script is loaded first on a new connection, and a script
    registered later on the open one, so a give-back sent without waiting runs in its
    place: the next call sees it (not NOSCRIPT, sent again a round trip later)."""
    store, call = _counting(private_redis)
    read = ScriptCall(store.script("return redis.call('GET', KEYS[1])"), ("n",), ())
    assert await store.run_many([read]) == [None]  # connected; neither script ran before
    assert store.send_many_detached([call])
    assert await store.run_many([read]) == [b"1"]
    # Registered while the connection is open: loaded on it before any later command.
    later = ScriptCall(store.script("return redis.call('INCRBY', KEYS[1], 10)"), ("n",), ())
    assert store.send_many_detached([later])
    assert await store.run_many([read]) == [b"11"]
    await store.aclose()


async def test_a_flushed_script_cache_is_loaded_again_at_the_first_noscript(
    private_redis: RedisServer,
) -> None:
    store, call = _counting(private_redis)
    read = ScriptCall(store.script("return redis.call('GET', KEYS[1])"), ("n",), ())
    assert await store.run_many([call]) == [1]
    redis.Redis(port=private_redis.port).script_flush()  # as a restarted server, connected
    assert await store.run_many([read]) == [b"1"]  # NOSCRIPT: sent again with EVAL...
    assert store.send_many_detached([call])  # ...and every script loaded again before this
    assert await store.run_many([read]) == [b"2"]
    assert redis.Redis(port=private_redis.port).script_exists(call.script.sha) == [True]
    await store.aclose()
