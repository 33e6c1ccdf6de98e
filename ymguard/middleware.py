"""``GuardMiddleware``: the thin ASGI edge (pure ASGI, no ``BaseHTTPMiddleware``).

It names the resource (``METHOD /route/{template}`` from the matched route, mounted
sub-apps included), reads the caller's origin, runs the resource's chain, and renders a
refusal as problem+json. Everything else (algorithms, storage) lives behind the chain.

Methods and paths are client input, so only what the app serves becomes a resource: a
method the matched route does not serve passes through unguarded to the app's own 405, a
path no route matches to its 404, and a mounted app without routes is named only for the
standard HTTP methods. The resources, their chains and statistics are therefore bounded
by the app's routes, whatever clients send.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

from starlette.routing import Host, Match, Mount

from .chain import AWAIT, CLIENT_CLOSED_REQUEST, Context, ShortCircuit
from .errors import Blocked
from .guard import Guard, current_context
from .routecheck import warn_unmatched_rules
from .types import ASGIApp, Message, Receive, Scope, Send

#: Resolved (method, root path, path) entries the middleware keeps.
_CACHE_MAX = 4096
#: Longer paths are resolved every time rather than cached (the cache stays small).
_CACHE_PATH_MAX = 256
#: The methods a mounted app without routes (no method list to ask) is named for.
STANDARD_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
_background: set[asyncio.Task[None]] = set()


#: A resolved request: its resource, its path params, and whether its endpoint runs in a
#: worker thread (:func:`runs_in_thread`).
_Resolved = tuple[str, Mapping[str, Any], bool]


def _template(route: Any) -> str:
    return str(getattr(route, "path_format", None) or getattr(route, "path", ""))


def resolve_route(
    routes: Sequence[Any], scope: Scope, prefix: str = ""
) -> tuple[str, Mapping[str, Any]] | None:
    """The route template that serves ``scope`` and its path params, or None.

    Mounted apps are searched too; their templates are joined to the mount's path. A
    route that matches the path but not the method serves nothing (the app answers 405):
    None, so that invented methods never become resources.
    """
    found = _resolve_route(routes, scope, prefix)
    return None if found is None else (found[0], found[1])


def _resolve_route(
    routes: Sequence[Any], scope: Scope, prefix: str
) -> tuple[str, Mapping[str, Any], Any] | None:
    """:func:`resolve_route`, and the route found (a mount without routes: the mount)."""
    for route in routes:
        match, child = route.matches(scope)
        if match is not Match.FULL:
            continue
        candidates = getattr(route, "effective_candidates", None)
        if candidates is not None:
            # FastAPI >= 0.120 keeps included routers whole; their candidates carry the
            # prefixed templates and match the full path themselves.
            found = _resolve_route(candidates(), scope, prefix)
            if found is not None:
                return found
            continue
        params = child.get("path_params", {})
        if isinstance(route, Host):  # a virtual host: its routes name the resource
            return _resolve_route(route.routes, {**scope, **child}, prefix)
        if isinstance(route, Mount):
            found = _resolve_route(route.routes, {**scope, **child}, prefix + route.path)
            if found is not None:
                return found
            if route.routes or scope["method"] not in STANDARD_METHODS:
                return None  # its router answers 404/405; an invented method is no name
            return prefix + _template(route), params, route
        if getattr(route, "methods", None) is None and scope["method"] not in STANDARD_METHODS:
            return None  # a route of any method (an endpoint class): an invented one is no name
        return prefix + _template(route), params, route
    return None


def runs_in_thread(route: Any, method: str = "GET") -> bool:
    """Whether serving ``route`` (for ``method``) may run work in a worker thread, which
    cancelling its request does not stop: Starlette and FastAPI run plain functions there
    (a ``def`` endpoint, an endpoint class's ``def`` handler, a callable object with a
    plain ``__call__``, a ``def`` dependency)."""
    dependant = getattr(route, "dependant", None)  # FastAPI: the endpoint and what it needs
    if dependant is not None:
        return _threaded(dependant)
    endpoint = getattr(route, "endpoint", None)
    if endpoint is None:
        return False  # a mount: an ASGI app, in the request's task
    endpoint = _impartial(endpoint)
    if inspect.isclass(endpoint):  # an endpoint class (HTTPEndpoint): its method's handler
        handler = getattr(endpoint, method.lower(), None)
        if handler is None and method == "HEAD":
            handler = getattr(endpoint, "get", None)
        return handler is not None and not _is_async(handler)
    return not _is_async(endpoint)


def _threaded(dependant: Any) -> bool:
    """Whether a FastAPI dependant or any of its dependencies is called in a thread."""
    call = getattr(dependant, "call", None)
    if call is not None and not _is_async(call):
        return True
    return any(_threaded(sub) for sub in getattr(dependant, "dependencies", ()))


def _is_async(call: Any) -> bool:
    """Whether ``call`` runs in the caller's task (a coroutine or an async generator
    function, or an object whose ``__call__`` is one), as FastAPI tells: through
    ``functools.partial`` and ``__wrapped__`` (``guard.limit`` points FastAPI at a
    coroutine that way)."""
    for candidate in _callables(call):
        if inspect.iscoroutinefunction(candidate) or inspect.isasyncgenfunction(candidate):
            return True
    return False


def _callables(call: Any) -> Iterator[Any]:
    """``call`` and what it stands for: unwrapped, and its ``__call__`` (not a class's:
    FastAPI instantiates a class dependency in a thread)."""
    plain = _impartial(call)
    unwrapped = _unwrap(plain)
    yield plain
    yield unwrapped
    if inspect.isclass(unwrapped):
        return
    for outer in (plain, unwrapped):
        dunder = getattr(outer, "__call__", None)  # noqa: B004
        if dunder is not None:
            yield _impartial(dunder)
            yield _unwrap(_impartial(dunder))


def _impartial(call: Any) -> Any:
    while isinstance(call, functools.partial):
        call = call.func
    return call


def _unwrap(call: Any) -> Any:
    try:
        return inspect.unwrap(call)
    except ValueError:  # a cycle of __wrapped__
        return call


def routes_by_host(routes: Sequence[Any]) -> bool:
    """Whether any route (in mounts too) is a Starlette ``Host``: then the Host header,
    not only the method and path, decides which route serves a request."""
    for route in routes:
        if isinstance(route, Host):
            return True
        if isinstance(route, Mount) and routes_by_host(route.routes):
            return True
    return False


#: Seconds a call runs before its client is watched for a disconnect: the calls that end
#: sooner (nearly all) cost no task of their own; those that hold a permit longer are
#: cancelled when their client goes away.
WATCH_AFTER = 0.05


async def run_until_disconnect(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    finished: Callable[[], bool],
    started: Callable[[], bool] | None = None,
) -> bool:
    """Run ``app``, cancelling it if the client disconnects before the response is done.

    The app runs in this task. Once it has run :data:`WATCH_AFTER` seconds, a watcher task
    reads ``receive`` and hands every message on to the app; when it sees
    ``http.disconnect`` while the response is unfinished it cancels this task (a plain
    endpoint would otherwise run on, holding its permit, for nobody). A call that ends
    sooner never starts the watcher: no task, no queue and no timer of its own (one timer
    per event loop looks over the calls in flight). While the app itself waits in
    ``receive`` the watcher waits too (the app will see a disconnect itself).

    ``started``, for an app that may run work in a worker thread (:func:`runs_in_thread`),
    tells whether its response has started: a disconnect before then cancels the app only
    when it starts its response (its thread has returned by then), not while the thread
    runs on after a cancellation, holding what its permit guards.

    Returns:
        True if the client went away before the response was done: the app was cancelled,
        or it read the disconnect itself and ended (a streaming response).
    """
    this = asyncio.current_task()
    if this is None:  # not in a task: nothing to cancel
        await app(scope, receive, send)
        return False
    loop = this.get_loop()
    sweeper = _sweeper
    if sweeper is None or sweeper.loop is not loop:
        sweeper = _new_sweeper(loop)
    call = _Watched(this, receive, finished, sweeper, send, started)
    try:
        await app(scope, call.app_receive, send if started is None else call.app_send)
    except asyncio.CancelledError:
        if call.gone:
            this.uncancel()  # our own cancellation, taken back whatever else cancels
            if not this.cancelling():  # no one else's: the client went away
                return True
        raise
    finally:
        # No watching from now on (inline: every watched call ends here, and only here).
        sweeper.calls.pop(call, None)
        watcher = call.watcher
        if watcher is not None and not watcher.done():
            watcher.cancel()
    if call.gone:
        if this.cancelling():  # the app swallowed our cancellation
            this.uncancel()
        return True
    # An app that read the disconnect itself (a streaming response listens for it) and
    # ended before its response did: its client went away all the same.
    return call.left


class _Watched:
    """One call run by :func:`run_until_disconnect`, and its watcher once it has one."""

    __slots__ = (
        "arrived",
        "deferred",
        "ended",
        "finished",
        "gone",
        "inbox",
        "left",
        "reading",
        "receive",
        "send",
        "since",
        "started",
        "sweeper",
        "task",
        "watcher",
    )

    def __init__(
        self,
        task: asyncio.Task[Any],
        receive: Receive,
        finished: Callable[[], bool],
        sweeper: _Sweeper,
        send: Send,
        started: Callable[[], bool] | None = None,
    ) -> None:
        self.task = task
        self.receive = receive
        self.finished = finished
        self.sweeper = sweeper
        self.send = send
        self.started = started
        self.deferred = False  # its client left while a worker thread may run: cancel later
        self.since = sweeper.loop.time()
        self.reading = 0  # the app's own receive() calls in progress (before the watcher)
        self.watcher: asyncio.Task[None] | None = None
        self.inbox: collections.deque[Message] | None = None
        self.arrived: asyncio.Future[None] | None = None  # the app's wait for a message
        self.gone = False  # the watcher cancelled the call: its client went away
        self.left = False  # the app itself read a disconnect before its response ended
        # Once the watcher has stopped: True after a disconnect (the app gets another on
        # every later read, as from a server), or the error its receive() raised.
        self.ended: bool | BaseException = False
        # In the sweeper's calls (in start order); its timer armed if none is (inline:
        # every watched call starts here, and only here).
        sweeper.calls[self] = None
        if sweeper.timer is None:
            sweeper.timer = sweeper.loop.call_at(self.since + WATCH_AFTER, sweeper.sweep)

    async def app_receive(self) -> Message:
        """The ``receive`` the app gets: the server's, or the watcher's messages."""
        if self.watcher is None:
            self.reading += 1
            try:
                message = await self.receive()
            finally:
                self.reading -= 1
            if message["type"] == "http.disconnect" and not self.finished():
                self.left = True
            return message
        inbox = self.inbox
        assert inbox is not None
        while not inbox:
            ended = self.ended
            if isinstance(ended, BaseException):
                raise ended
            if ended:
                return {"type": "http.disconnect"}
            waiter = self.arrived = self.sweeper.loop.create_future()
            try:
                await waiter
            finally:
                self.arrived = None
        return inbox.popleft()

    def watch(self) -> None:
        """Start reading ``receive`` for a disconnect (the sweeper calls it)."""
        self.inbox = collections.deque()
        self.watcher = self.sweeper.loop.create_task(self._watch())
        self.watcher.add_done_callback(_retrieve)

    async def _watch(self) -> None:
        inbox = self.inbox
        assert inbox is not None
        try:
            while True:
                message = await self.receive()
                inbox.append(message)
                self._wake()
                if message["type"] == "http.disconnect":
                    self.ended = True
                    if not self.finished():
                        self.left = True
                        if self.started is not None and not self.started():
                            self.deferred = True  # at its response's start (app_send)
                        else:
                            self.gone = True
                            self.task.cancel()
                    return
        except Exception as exc:  # the server's receive failed: the app meets it
            self.ended = exc
            self._wake()
            raise

    def app_send(self, message: Message) -> Awaitable[None]:
        """The ``send`` an app that may run a worker thread gets: a cancellation deferred
        while its thread could run lands when its response starts (the thread is done)."""
        if self.deferred and message["type"] == "http.response.start":
            # Not sent (nobody reads it): the app meets a cancellation here, as if the
            # watcher had cancelled it. Not task.cancel(): from within the task it would
            # land at the task's next wait, maybe after the call (uvicorn's own code).
            self.deferred = False
            self.gone = True
            gone = self.sweeper.loop.create_future()
            gone.cancel()
            return gone
        return self.send(message)

    def _wake(self) -> None:
        waiter = self.arrived
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Sweeper:
    """Starts the watchers of an event loop's calls that have run :data:`WATCH_AFTER`.

    One timer per loop, armed while calls are in flight: a call costs an entry in a dict
    (in start order), not a timer of its own.
    """

    __slots__ = ("calls", "loop", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: dict[_Watched, None] = {}
        self.timer: asyncio.TimerHandle | None = None

    def sweep(self) -> None:
        self.timer = None
        due = self.loop.time() - WATCH_AFTER
        later: float | None = None
        for call in list(self.calls):  # the oldest first
            if call.since > due:
                later = call.since if later is None else min(later, call.since)
                break
            if call.reading:  # the app is reading: it will see a disconnect; look later
                continue
            del self.calls[call]
            call.watch()
        if self.calls:
            at = (later if later is not None else self.loop.time()) + WATCH_AFTER
            self.timer = self.loop.call_at(at, self.sweep)


_sweeper: _Sweeper | None = None


def _retrieve(task: asyncio.Task[None]) -> None:
    """Read a watcher's outcome (a failed ``receive`` is the app's to meet, not a log line)."""
    if not task.cancelled():
        task.exception()


def _new_sweeper(loop: asyncio.AbstractEventLoop) -> _Sweeper:
    global _sweeper
    sweeper = _sweeper = _Sweeper(loop)
    return sweeper


def _status_sender(ctx: Context, send: Send) -> Send:
    """The ``send`` the app gets: notes the status and the response's end, then sends.

    ``ctx.status`` is set by the response's start (so it is None until the response has
    started) and ``ctx.answered`` by its last body message. Hooks in ``ctx.on_send`` (a
    check that keeps the response) see every message first. It hands back the inner
    send's awaitable (no coroutine of its own).

    A closure, not a method of the context holding ``send`` (7273147 to ce4a210): with
    that, uvicorn serving 32 connections ran a young collection every 35 requests and a
    full one every 6,000 (8% of the server's CPU, 40-50 ms pauses in the p99), against
    3 young collections in 40,000 requests with the closure. It is a threshold, not a
    leak: nothing is left behind, and at 64 connections both run as many collections
    (plain FastAPI: at 128). The closure costs a few hundred instructions more.
    """
    hooks = ctx.on_send

    def sender(message: Message) -> Awaitable[None]:
        kind = message["type"]
        if kind == "http.response.start":
            ctx.status = message["status"]
        elif kind == "http.response.body" and not message.get("more_body"):
            ctx.answered = True
        if hooks is not None:
            for hook in hooks:
                hook(message)
        return send(message)

    return sender


class GuardMiddleware:
    """Run every HTTP request through its resource's chain.

    Args:
        app: the ASGI app to guard.
        guard: the :class:`Guard` with the rules.
    """

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard
        # By (method, root path, path): the resource, its path params, and whether its
        # endpoint runs in a worker thread (None: no route serves it).
        self._resources: dict[tuple[str, str, str], _Resolved | None] = {}
        self._router = getattr(app, "router", None)
        self._by_host: bool | None = None  # whether Host routes exist (known at first use)
        self._started = False

    def _resolve(self, scope: Scope) -> _Resolved | None:
        method = scope["method"]
        cache_key = (method, scope.get("root_path", ""), scope["path"])
        try:
            return self._resources[cache_key]
        except KeyError:
            pass
        router = getattr(scope.get("app"), "router", None) or self._router
        resolved: _Resolved | None = None
        if router is not None:
            found = _resolve_route(router.routes, scope, "")
            if found is not None:
                template, params, route = found
                resolved = (f"{method} {template}", params, runs_in_thread(route, method))
        elif f"{method} {scope['path']}" in self.guard.rules.resources:
            # No routes to ask: only paths the rules name.
            resolved = (f"{method} {scope['path']}", {}, False)
        if self._by_host is None:
            self._by_host = router is not None and routes_by_host(router.routes)
        # Cached by method and path, unless virtual hosts share paths: then never.
        if len(scope["path"]) <= _CACHE_PATH_MAX and not self._by_host:
            if len(self._resources) >= _CACHE_MAX:
                self._resources.clear()
            self._resources[cache_key] = resolved
        return resolved

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._started:  # the app's first ASGI call (its lifespan startup, usually)
            self._started = True
            self.guard.startup_checks()
        if scope["type"] != "http":
            if scope["type"] == "lifespan":  # the routes are known now: rules naming none?
                warn_unmatched_rules(self.guard, scope.get("app", self.app))
            await self.app(scope, receive, send)
            return
        resolved = self._resources.get((scope["method"], scope.get("root_path", ""), scope["path"]))
        if resolved is None:
            resolved = self._resolve(scope)
            if resolved is None:  # no route: a 404, not a resource worth counting
                await self.app(scope, receive, send)
                return
        guard = self.guard
        if guard.sync_bridge.loop is None:
            guard.bind_loop()
        resource, params, threaded = resolved
        # The guard's own lookups, without a method call each (they run on every request):
        # the chain (compiled on first use for a route without rules) and the origin (None
        # without an origin rule).
        chain = guard._chains.get(resource) or guard.chain(resource)
        read_origin = guard._read_origin_of
        origin = "" if read_origin is None else read_origin(scope)
        ctx = Context(resource, origin, params, scope, 0.0, None, receive)
        try:
            # A chain that decides without awaiting (no check, one memory window), or
            # usually does (prefetched permits, a closed breaker), is entered without a
            # coroutine where it can be.
            if chain.try_enter:
                tokens = chain.enter_now(ctx)
                if tokens is AWAIT:
                    tokens = await chain.enter(ctx)
            else:
                tokens = await chain.enter(ctx)
        except Blocked as exc:
            await guard.problem_for(exc)(scope, receive, send)  # type: ignore[misc]
            return
        except ShortCircuit as answer:  # a check answered itself (an idempotent replay)
            await answer.response(scope, receive, send)
            return
        sender = _status_sender(ctx, send)
        reset = current_context.set(ctx)
        try:
            if chain.release_on_disconnect:
                if await run_until_disconnect(
                    # Bound methods, not lambdas: a closure over ctx would cost a cell
                    # on every request, watched or not.
                    self.app,
                    scope,
                    ctx.receive or receive,
                    sender,
                    ctx.is_answered,
                    # Where the route may run a worker thread, a disconnect before the
                    # response starts cancels at its start: cancelled while the thread
                    # ran, the call would give its permit back with the thread running on.
                    ctx.is_started if threaded else None,
                ):
                    ctx.status = CLIENT_CLOSED_REQUEST
            else:
                await self.app(scope, ctx.receive or receive, sender)
        except Blocked as exc:  # raised inside the endpoint, and not mapped by install()
            if ctx.status is not None:  # the response has started
                raise
            await guard.problem_for(exc)(scope, receive, sender)  # type: ignore[misc]
        except Exception as exc:
            # A map_exception made after the app started is not in its handlers: render
            # it here, as install() would have (not counted as an error, like a handled one).
            started = ctx.status is not None
            response = None if started or not guard.installed else guard.problem_for(exc)
            if response is None:
                ctx.error = exc
                raise
            await response(scope, receive, sender)
        except BaseException as exc:
            ctx.error = exc
            raise
        finally:
            current_context.reset(reset)
            # Nothing left to await, usually: the observers have heard how it finished,
            # and releases on Redis went out without waiting for their replies.
            rest = chain.exit_now(ctx, tokens)
            if rest is None:
                pass
            elif isinstance(ctx.error, asyncio.CancelledError):
                # Our task is being cancelled: the rest in a task of its own.
                task = asyncio.ensure_future(rest)
                _background.add(task)
                task.add_done_callback(_background.discard)
            else:
                await rest


__all__ = ["GuardMiddleware", "resolve_route"]
