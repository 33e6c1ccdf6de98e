"""The pub/sub service of a Redis store: patterns and channels on one connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.helpers import RedisServer
from ymguard.storage import RedisStore
from ymguard.storage.pubsub import PubSub, close_pubsub, pubsub_for


async def eventually(check: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Wait until ``check()`` holds; the deadline is a liveness bound, not a timing check."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"never: {what}")
        await asyncio.sleep(0.005)


class Watcher:
    """A pattern's two callbacks, recording what they were told."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.resyncs = 0

    def on_message(self, channel: str, data: bytes) -> None:
        self.messages.append((channel, data))

    async def resync(self) -> None:
        self.resyncs += 1


@pytest.fixture
async def store(redis_url: str, prefix: str) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_url, key_prefix=prefix)
    yield s
    await s.close_tasks()
    await s.aclose()


def deadline(seconds: float = 10.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def numsub(store: RedisStore, channel: str) -> int:
    reply = await store.client.execute_command("PUBSUB", "NUMSUB", channel)
    return int(reply[1])


async def test_a_pattern_and_a_channel_share_one_connection(store: RedisStore, prefix: str) -> None:
    service = pubsub_for(store)
    watcher = Watcher()
    assert service.watch(f"{prefix}:p:*", watcher.on_message, watcher.resync)
    await eventually(lambda: service.ready, "the pattern is subscribed")
    assert watcher.resyncs == 1  # told once the pattern listens
    reader, connection = service.task, service.pubsub
    event, confirmed = await service.listen(f"{prefix}:c", "w1", deadline())
    assert confirmed and service.listening(f"{prefix}:c")
    # One reader, one connection, both subscriptions on it.
    assert (service.task, service.pubsub) == (reader, connection)
    assert set(connection.patterns) == {f"{prefix}:p:*".encode()}
    assert set(connection.channels) == {f"{prefix}:c".encode()}
    assert pubsub_for(store) is service  # one service per store and loop

    await store.client.publish(f"{prefix}:p:x", b"1,0,0,0")
    await store.client.publish(f"{prefix}:c", b"someone-else w1")
    await eventually(lambda: bool(watcher.messages) and event.is_set(), "both delivered")
    assert watcher.messages == [(f"{prefix}:p:x", b"1,0,0,0")]
    service.unlisten(f"{prefix}:c", "w1")
    assert service.listeners == {}


async def test_patterns_resync_after_the_server_restarts(
    private_redis: RedisServer, prefix: str
) -> None:
    store = RedisStore(private_redis.url, key_prefix=prefix, retry_interval=0.1)
    try:
        service = pubsub_for(store)
        watcher = Watcher()
        service.watch(f"{prefix}:p:*", watcher.on_message, watcher.resync)
        await eventually(lambda: service.ready, "the pattern is subscribed")
        event, confirmed = await service.listen(f"{prefix}:c", "w1", deadline())
        assert confirmed and watcher.resyncs == 1

        private_redis.stop()
        # The channel went with the connection: its listener wakes to look again.
        await eventually(event.is_set, "the listener is woken")
        assert not service.listening(f"{prefix}:c")
        private_redis.start()  # the same port

        await eventually(lambda: service.ready and watcher.resyncs == 2, "resubscribed, resynced")
        await store.client.publish(f"{prefix}:p:y", b"after")
        await eventually(lambda: bool(watcher.messages), "a message after the restart")
        assert watcher.messages == [(f"{prefix}:p:y", b"after")]
        # The channel is subscribed again on demand, on the new connection.
        service.unlisten(f"{prefix}:c", "w1")
        event, confirmed = await service.listen(f"{prefix}:c", "w1", deadline())
        assert confirmed and not event.is_set()
        await store.client.publish(f"{prefix}:c", b"w1")
        await eventually(event.is_set, "the listener is woken by a message")
    finally:
        await store.close_tasks()
        await store.aclose()


async def test_a_channel_is_dropped_after_its_linger(
    store: RedisStore, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ymguard.storage.pubsub.LINGER", 0.2)
    monkeypatch.setattr("ymguard.storage.pubsub.IDLE_SECONDS", 0.05)
    service = pubsub_for(store)
    watcher = Watcher()
    service.watch(f"{prefix}:p:*", watcher.on_message, watcher.resync)
    channel = f"{prefix}:c"
    _, confirmed = await service.listen(channel, "w1", deadline())
    assert confirmed and await numsub(store, channel) == 1
    service.unlisten(channel, "w1")
    await eventually(lambda: not service.listening(channel), "the channel is dropped")
    for _ in range(200):
        if await numsub(store, channel) == 0:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the server still has the channel subscribed")
    assert service.running() and service.ready  # the pattern keeps the connection

    # Without a pattern, the reader ends once its last channel is dropped.
    await close_pubsub(store)
    bare = pubsub_for(store)
    assert bare is not service
    _, confirmed = await bare.listen(channel, "w2", deadline())
    assert confirmed
    bare.unlisten(channel, "w2")
    await eventually(lambda: bare.task is None and bare.pubsub is None, "the reader ends")


async def test_a_listener_back_within_the_linger_keeps_the_subscription(
    store: RedisStore, prefix: str
) -> None:
    service = pubsub_for(store)
    channel = f"{prefix}:c"
    _, confirmed = await service.listen(channel, "w1", deadline())
    assert confirmed
    connection = service.pubsub
    service.unlisten(channel, "w1")
    assert service.listening(channel)  # lingers
    # Confirmed at once: no new subscription (its deadline is already past).
    _, confirmed = await service.listen(channel, "w2", asyncio.get_running_loop().time())
    assert confirmed and service.pubsub is connection


async def test_a_client_without_pub_sub_is_reported_not_retried(
    store: RedisStore, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pubsub() -> Any:
        raise AttributeError("the asyncio cluster client has no pub/sub")

    monkeypatch.setattr(store.client, "pubsub", no_pubsub)
    service: PubSub = pubsub_for(store)
    _, confirmed = await service.listen(f"{prefix}:c", "w1", deadline(5))
    assert not confirmed and service.unsupported  # waiters nap instead
    watcher = Watcher()
    assert not service.watch(f"{prefix}:p:*", watcher.on_message, watcher.resync)
    assert service.task is not None and service.task.done()


async def test_a_pattern_added_to_a_live_connection_is_subscribed_and_resynced(
    store: RedisStore, prefix: str
) -> None:
    service = pubsub_for(store)
    _, confirmed = await service.listen(f"{prefix}:c", "w1", deadline())
    assert confirmed
    connection = service.pubsub
    watcher = Watcher()
    service.watch(f"{prefix}:p:*", watcher.on_message, watcher.resync)
    await eventually(lambda: service.ready and watcher.resyncs == 1, "subscribed, resynced")
    await store.client.publish(f"{prefix}:p:z", b"late")
    await eventually(lambda: bool(watcher.messages), "delivered")
    assert service.pubsub is connection  # the same connection
