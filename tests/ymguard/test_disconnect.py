"""``run_until_disconnect``: a call is cancelled when its client goes away, and a quick
call never starts a watcher task (issue 14: no per-request task where it can be avoided)."""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from starlette.endpoints import HTTPEndpoint
from starlette.responses import StreamingResponse

from tests.helpers import http_scope
from ymguard import Guard, GuardMiddleware
from ymguard.middleware import WATCH_AFTER, run_until_disconnect, runs_in_thread

BODY = {"type": "http.request", "body": b"", "more_body": False}
DISCONNECT = {"type": "http.disconnect"}


class Client:
    """A server's ``receive``: the given messages, then a disconnect once ``leave`` is set."""

    def __init__(self, *messages: dict[str, Any], delay: float = 0.0) -> None:
        self.messages = list(messages)
        self.delay = delay
        self.leave = asyncio.Event()
        self.calls = 0

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        if self.messages:
            if self.delay:
                await asyncio.sleep(self.delay)
            return self.messages.pop(0)
        await self.leave.wait()
        return DISCONNECT


async def send(message: Any) -> None:
    pass


async def test_a_quick_call_starts_no_task_and_never_reads_for_a_disconnect() -> None:
    client = Client(BODY)
    tasks: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert await receive() == BODY
        tasks.append(len(asyncio.all_tasks()))
        await send({"type": "http.response.start", "status": 200})

    before = len(asyncio.all_tasks())
    assert await run_until_disconnect(app, {}, client.receive, send, lambda: True) is False
    assert tasks == [before]  # no watcher ran beside the app
    assert client.calls == 1  # only the app's own read
    await asyncio.sleep(WATCH_AFTER * 2)  # the timer was cancelled: nothing reads later
    assert client.calls == 1


async def test_a_long_call_is_cancelled_when_its_client_goes_away() -> None:
    client = Client(BODY)
    cancelled = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        try:
            await asyncio.Event().wait()  # holds its permit until cancelled
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def leave_later() -> None:
        await asyncio.sleep(WATCH_AFTER * 3)
        client.leave.set()

    leaving = asyncio.ensure_future(leave_later())
    assert await run_until_disconnect(app, {}, client.receive, send, lambda: False) is True
    await leaving
    assert cancelled.is_set()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # our cancellation is taken back


async def test_a_disconnect_after_the_response_cancels_nothing() -> None:
    client = Client(BODY)
    done = False

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal done
        await receive()
        client.leave.set()  # the client leaves once it has its answer
        await asyncio.sleep(WATCH_AFTER * 3)  # background work after the response
        done = True

    assert await run_until_disconnect(app, {}, client.receive, send, lambda: True) is False
    assert done


async def test_a_body_read_slowly_reaches_the_app_whole_and_in_order() -> None:
    chunks = [{"type": "http.request", "body": b"%d" % i, "more_body": i < 4} for i in range(5)]
    client = Client(*chunks, delay=WATCH_AFTER * 0.6)
    got: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            got.append(message)
            if not message.get("more_body"):
                return
            await asyncio.sleep(WATCH_AFTER * 0.6)  # the watcher may start between reads

    assert await run_until_disconnect(app, {}, client.receive, send, lambda: True) is False
    assert got == chunks


async def test_an_app_that_swallows_the_cancellation_still_counts_as_gone() -> None:
    client = Client(BODY)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return  # a badly behaved app

    async def leave_later() -> None:
        await asyncio.sleep(WATCH_AFTER * 3)
        client.leave.set()

    leaving = asyncio.ensure_future(leave_later())
    assert await run_until_disconnect(app, {}, client.receive, send, lambda: False) is True
    await leaving
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_cancellation_from_outside_is_not_taken_for_a_disconnect() -> None:
    client = Client(BODY)
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        started.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(run_until_disconnect(app, {}, client.receive, send, lambda: False))
    await started.wait()
    await asyncio.sleep(WATCH_AFTER * 2)  # the watcher is running
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:  # pragma: no cover - the point of the test
        raise AssertionError("an outside cancellation was swallowed")
    assert task.cancelled()


async def test_calls_started_at_different_times_are_each_watched() -> None:
    clients = [Client(BODY) for _ in range(3)]
    cancelled: list[int] = []

    def app_for(i: int) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(i)
                raise

        return app

    runs = []
    for i, client in enumerate(clients):
        runs.append(
            asyncio.ensure_future(
                run_until_disconnect(app_for(i), {}, client.receive, send, lambda: False)
            )
        )
        await asyncio.sleep(WATCH_AFTER * 0.7)  # each one starts in a later sweep
    await asyncio.sleep(WATCH_AFTER * 2)
    for client in clients:
        client.leave.set()
    assert await asyncio.gather(*runs) == [True, True, True]
    assert sorted(cancelled) == [0, 1, 2]


async def test_after_a_disconnect_every_read_answers_disconnect() -> None:
    client = Client(BODY)
    got: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await asyncio.sleep(WATCH_AFTER * 3)  # the watcher reads for us now
        client.leave.set()
        got.append(await receive())
        got.append(await receive())  # a server answers disconnect again; so do we

    assert await run_until_disconnect(app, {}, client.receive, send, lambda: True) is False
    assert got == [DISCONNECT, DISCONNECT]


async def test_a_failing_receive_reaches_the_app() -> None:
    class Broken(Exception):
        pass

    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return BODY
        await asyncio.sleep(WATCH_AFTER)
        raise Broken("the server's receive failed")

    caught: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await asyncio.sleep(WATCH_AFTER * 2)  # the watcher starts, its read fails
        try:
            await receive()
        except Broken as exc:
            caught.append(exc)

    assert await run_until_disconnect(app, {}, receive, send, lambda: True) is False
    assert len(caught) == 1


async def test_our_cancellation_is_taken_back_when_another_lands_too() -> None:
    # An outer timeout (asyncio.timeout, anyio.fail_after) knows its own cancellation by
    # the task's cancel count: ours must be taken back even when both land.
    client = Client(BODY)
    cleaning = asyncio.Event()
    counts: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await asyncio.Event().wait()  # cleanup, cancelled in turn from outside
            raise

    async def guarded() -> None:
        try:
            await run_until_disconnect(app, {}, client.receive, send, lambda: False)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            counts.append(task.cancelling())
            raise

    task = asyncio.ensure_future(guarded())
    client.leave.set()  # our cancellation first, once the watcher runs ...
    await cleaning.wait()
    task.cancel()  # ... then another one
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counts == [1]  # only the outside cancellation is left


async def test_a_stream_that_reads_the_disconnect_itself_counts_as_gone() -> None:
    client = Client(BODY)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        # A streaming response listening for the disconnect itself, from the start.
        await receive()
        message = await receive()
        assert message == DISCONNECT  # it stops streaming: its client went away

    async def leave_later() -> None:
        await asyncio.sleep(WATCH_AFTER * 3)
        client.leave.set()

    leaving = asyncio.ensure_future(leave_later())
    assert await run_until_disconnect(app, {}, client.receive, send, lambda: False) is True
    await leaving


def test_endpoints_run_in_a_worker_thread_are_told_apart() -> None:
    def plain() -> None: ...

    async def coroutine() -> None: ...

    class Endpoint:
        pass

    class SyncGet(HTTPEndpoint):
        def get(self, request: Any) -> None: ...

    class AsyncGet(HTTPEndpoint):
        async def get(self, request: Any) -> None: ...

    class Handler:
        def __call__(self) -> None: ...

    def route(endpoint: Any) -> Any:
        return type("Route", (), {"endpoint": endpoint})()

    assert runs_in_thread(route(plain)) and runs_in_thread(route(functools.partial(plain)))
    assert not runs_in_thread(route(coroutine)) and not runs_in_thread(route(Endpoint))
    assert not runs_in_thread(object())  # a mount: an ASGI app, in the request's task
    assert runs_in_thread(route(SyncGet)) and runs_in_thread(route(SyncGet), "HEAD")
    assert not runs_in_thread(route(AsyncGet)) and not runs_in_thread(route(SyncGet), "POST")
    assert runs_in_thread(route(Handler()))  # FastAPI calls a plain __call__ in a thread
    # FastAPI: a def dependency of an async endpoint runs in a thread too.
    app = FastAPI()

    def dependency() -> int:
        return 1

    async def needs(x: int = Depends(dependency)) -> None: ...

    async def alone() -> None: ...

    app.get("/needs")(needs)
    app.get("/alone")(alone)
    # guard.limit as a dependency: FastAPI awaits it (through __wrapped__), no thread.
    guard = Guard({"resources": {}}, storage="memory://")
    app.get("/limited", dependencies=[Depends(guard.limit("10/second"))])(alone)
    by_path = {r.path: r for r in app.routes if isinstance(r, APIRoute)}
    assert runs_in_thread(by_path["/needs"]) and not runs_in_thread(by_path["/alone"])
    assert not runs_in_thread(by_path["/limited"])


async def test_a_sync_endpoint_keeps_its_permit_until_its_thread_is_done() -> None:
    # Cancelling the request would not stop the worker thread running the endpoint: the
    # permit given back at the disconnect would let a second copy of what it guards run.
    release, entered = threading.Event(), threading.Event()
    app = FastAPI()

    @app.get("/slow")
    def slow() -> dict[str, bool]:
        entered.set()
        release.wait(30)
        return {"ok": True}

    guard = Guard({"resources": {"GET /slow": {"semaphore": {"permits": 1}}}}, storage="memory://")
    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    scope = http_scope("/slow")
    client = Client(BODY)
    call = asyncio.ensure_future(app(scope, client.receive, send))
    assert await asyncio.to_thread(entered.wait, 30)  # the thread runs the endpoint
    await asyncio.sleep(WATCH_AFTER * 3)  # long enough to be watched, were it watched
    client.leave.set()
    for _ in range(20):
        await asyncio.sleep(0)
    sem = guard.semaphore("GET /slow")
    assert not call.done() and await sem.held() == 1  # not cancelled: the thread runs on
    release.set()
    async with asyncio.timeout(30):  # a bound, not a measure
        await call
    assert await sem.held() == 0
    await guard.aclose()


async def test_a_sync_endpoints_stream_is_still_cancelled_when_its_client_goes() -> None:
    # A def endpoint returns at once a stream over an async generator that may wait for
    # ever (a feed): no thread runs once the response has started, and a disconnect then
    # cancels the call as for any other, giving its permit back.
    app = FastAPI()

    async def feed() -> Any:
        yield b"hello\n"
        await asyncio.Event().wait()  # nothing more, for ever
        yield b"never"

    @app.get("/feed")
    def stream() -> StreamingResponse:
        return StreamingResponse(feed())

    guard = Guard({"resources": {"GET /feed": {"semaphore": {"permits": 1}}}}, storage="memory://")
    app.add_middleware(GuardMiddleware, guard=guard)
    scope = http_scope("/feed", asgi={"version": "3.0", "spec_version": "2.4"})
    client = Client(BODY)
    call = asyncio.ensure_future(app(scope, client.receive, send))
    await asyncio.sleep(WATCH_AFTER * 3)  # streaming, and watched
    sem = guard.semaphore("GET /feed")
    assert not call.done() and await sem.held() == 1
    client.leave.set()
    async with asyncio.timeout(30):  # a bound, not a measure
        await call
    assert await sem.held() == 0
    await guard.aclose()
