"""Guarding code: ``@guard.resource`` (any callable) and ``guard.limit`` (a route).

Both enter the resource's chain before the call and leave it after, on the guard's event
loop for sync code (:class:`SyncBridge`), never on the loop's own thread.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, TypeVar, cast

from limits import parse_many
from starlette.requests import Request

from .chain import Chain, Context, current_context
from .errors import Blocked, SyncResourceError
from .limiter import FlowRule, QpsCheck
from .stats import ResourceStats
from .storage import Store

if TYPE_CHECKING:
    from .guard import Guard

log = logging.getLogger("ymguard")

F = TypeVar("F", bound=Callable[..., Any])


def _accepts_exc(func: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "exc" or p.kind is p.VAR_KEYWORD for p in params)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _run_now(coro: Awaitable[Any]) -> Any:
    """Run a coroutine that never suspends (memory checks) to completion, synchronously."""
    gen = coro.__await__()
    try:
        gen.send(None)
    except StopIteration as stop:
        return stop.value
    gen.close()
    raise SyncResourceError(
        "ymguard: this guard needs I/O; call the guarded function from a worker thread of a "
        "running app, or make it async"
    )


class SyncBridge:
    """Runs chain steps for sync code: on the app's event loop from a worker thread.

    Attributes:
        loop: the app's event loop (``GuardMiddleware`` sets it at the first request).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.loop: asyncio.AbstractEventLoop | None = None
        self._warned: set[str] = set()

    def run(self, coro: Coroutine[Any, Any, Any], name: str) -> Any:
        """Run a chain step for sync code: on the guard's loop from another thread, or at
        once on the memory store when no loop runs at all. Refuse, before anything is
        spent, on the event loop's own thread (the same on every store: waiting there for
        the loop would deadlock it, and Redis I/O would block it), and on Redis with no
        loop to hop to."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            if name not in self._warned:
                self._warned.add(name)
                log.error("ymguard: sync resource %r called on the event loop's thread", name)
            raise SyncResourceError(
                f"ymguard: the sync function guarded as {name!r} was called on the event "
                "loop's thread, where its guard would block the loop: make it async, or "
                "call it from a worker thread (a sync endpoint, asyncio.to_thread)"
            )
        loop = self.loop
        if loop is not None and loop.is_running():
            return asyncio.run_coroutine_threadsafe(coro, loop).result()
        if self.store.remote:
            coro.close()
            raise SyncResourceError(
                f"ymguard: the sync function guarded as {name!r} on Redis must be called "
                "from a worker thread of a running app (or make it async)"
            )
        return _run_now(coro)


#: The step of :func:`_guarded_call` that runs the guarded function's body.
_BODY = object()


class _Handler:
    """The step of :func:`_guarded_call` that calls a fallback or block handler with ``exc``."""

    __slots__ = ("exc", "func")

    def __init__(self, func: Callable[..., Any], exc: BaseException) -> None:
        self.func = func
        self.exc = exc

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        extra = {"exc": self.exc} if _accepts_exc(self.func) else {}
        return self.func(*args, **kwargs, **extra)


#: What :func:`_guarded_call` yields: a chain step to run on the loop, the body, a handler.
_Step = Coroutine[Any, Any, Any] | object


def _guarded_call(
    guard: Guard,
    name: str,
    call_args: tuple[tuple[str, ...], tuple[Any, ...], dict[str, Any]],
    fallback: Callable[..., Any] | None,
    block_handler: Callable[..., Any] | None,
    exceptions_to_ignore: tuple[type[BaseException], ...],
) -> Generator[_Step, Any, Any]:
    """Enter, call, fall back and leave: the one path of async and sync ``@resource``.

    It only decides; the driver (:func:`_drive_async` or :func:`_drive_sync`) runs each
    yielded step its own way, sends back the result or throws in the exception, so both
    wrappers keep the same rules by construction.
    """
    outer = current_context.get()
    ctx = Context(name, outer.origin if outer else "", parent=outer, call_args=call_args)
    chain = guard.chain(name)
    try:
        tokens = yield chain.enter(ctx)
    except SyncResourceError as exc:  # sync code on the loop's thread: nothing was spent
        if fallback is None:
            raise
        return (yield _Handler(fallback, exc))
    except Blocked as exc:
        handler = block_handler or fallback
        if handler is None:
            raise
        return (yield _Handler(handler, exc))
    try:
        return (yield _BODY)
    except exceptions_to_ignore:
        raise
    except asyncio.CancelledError as exc:
        ctx.error = exc  # a cancelled call is no success (a probe re-opens)
        raise
    except Exception as exc:
        ctx.error = exc
        if fallback is None:
            raise
        return (yield _Handler(fallback, exc))
    finally:
        yield chain.exit(ctx, tokens)


async def _drive_async(
    steps: Generator[_Step, Any, Any],
    func: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run :func:`_guarded_call`'s steps on the running loop, awaiting each."""
    value: Any = None
    failure: BaseException | None = None
    while True:
        try:
            if failure is None:
                step: Any = steps.send(value)
            else:
                step, failure = steps.throw(failure), None
        except StopIteration as stop:
            return stop.value
        try:
            if step is _BODY:
                value = await func(*args, **kwargs)
            elif step.__class__ is _Handler:
                value = await _maybe_await(step(args, kwargs))
            else:  # a chain step (a coroutine): the hot path has two of them
                value = await step
        except BaseException as exc:
            failure = exc


def _drive_sync(
    steps: Generator[_Step, Any, Any],
    bridge: SyncBridge,
    name: str,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run :func:`_guarded_call`'s steps for sync code: only the chain steps hop to the
    event loop (:class:`SyncBridge`); the body and handlers run here, in the caller's
    thread (a sync endpoint's worker thread)."""
    value: Any = None
    failure: BaseException | None = None
    while True:
        try:
            if failure is None:
                step = steps.send(value)
            else:
                step, failure = steps.throw(failure), None
        except StopIteration as stop:
            return stop.value
        try:
            if step is _BODY:
                value = func(*args, **kwargs)
            elif isinstance(step, _Handler):
                value = step(args, kwargs)
            else:
                value = bridge.run(cast(Coroutine[Any, Any, Any], step), name)
        except BaseException as exc:
            failure = exc


def _positional_names(func: Callable[..., Any]) -> tuple[str, ...]:
    """The names of the parameters ``func`` takes by position, in order."""
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind in kinds)


def guarded_resource(
    guard: Guard,
    name: str,
    *,
    fallback: Callable[..., Any] | None = None,
    block_handler: Callable[..., Any] | None = None,
    exceptions_to_ignore: tuple[type[BaseException], ...] = (),
) -> Callable[[F], F]:
    """Guard any async or sync callable as resource ``name`` (``@SentinelResource``).

    Args:
        name: the resource name its rules are under.
        fallback: called with the same arguments (and ``exc=`` if it takes it) when the
            call fails, and when it is blocked if there is no ``block_handler``. A sync
            function called on the event loop's thread fails with
            :class:`~ymguard.errors.SyncResourceError` on every store (its guard would
            block the loop): the fallback gets that error, or it is raised.
        block_handler: called the same way when a rule blocks the call.
        exceptions_to_ignore: exceptions that pass through untouched and do not count
            as errors.
    """

    def decorate(func: F) -> F:
        positional = _positional_names(func)

        def steps(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Generator[_Step, Any, Any]:
            call_args = (positional, args, kwargs)
            return _guarded_call(
                guard, name, call_args, fallback, block_handler, exceptions_to_ignore
            )

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                # On every call (a reload replaces the chains); the guard's dict read
                # without a method call (compiled on first use for a resource without rules).
                chain = guard._chains.get(name) or guard.chain(name)
                if not chain.sync_enter or not chain.sync_exit:
                    return await _drive_async(steps(args, kwargs), func, args, kwargs)
                # The chain decides without awaiting (no rule, one memory window): the
                # steps of _guarded_call inline, without a generator or a coroutine each.
                # The arguments by name (``ctx.params``) are only built if a check reads them.
                # Positional arguments: keywords cost a third more in a call this cheap.
                outer = current_context.get()
                origin = outer.origin if outer is not None else ""
                call_args = (positional, args, kwargs)
                ctx = Context(name, origin, None, None, 0.0, None, None, outer, call_args)
                try:
                    tokens = chain.enter_now(ctx)
                except Blocked as exc:
                    handler = block_handler or fallback
                    if handler is None:
                        raise
                    return await _maybe_await(_Handler(handler, exc)(args, kwargs))
                try:
                    return await func(*args, **kwargs)
                except exceptions_to_ignore:
                    raise
                except asyncio.CancelledError as exc:
                    ctx.error = exc  # a cancelled call is no success (a probe re-opens)
                    raise
                except Exception as exc:
                    ctx.error = exc
                    if fallback is None:
                        raise
                    return await _maybe_await(_Handler(fallback, exc)(args, kwargs))
                finally:
                    rest = chain.exit_now(ctx, tokens)
                    if rest is not None:
                        await rest

            return cast(F, async_wrapper)

        @functools.wraps(func)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            return _drive_sync(steps(args, kwargs), guard.sync_bridge, name, func, args, kwargs)

        return cast(F, sync_wrapper)

    return decorate


#: The keyword the decorator form adds to an endpoint's signature so FastAPI hands it the
#: request (the route names the limit); removed before the endpoint is called.
_REQUEST_PARAM = "ymguard_limit_request"


def _route_holding(func: Callable[..., Any], refs: int) -> Any:
    """A route object that already holds ``func`` as its endpoint, or None.

    ``@app.get`` registers the function it is given and returns it unchanged, so a
    decorator placed above it wraps a function no route calls. The route is found among
    the objects referring to ``func``. That search walks the heap (tens of ms in a big
    app), so it only runs when ``func`` has more references (``refs``) than a function
    fresh from its ``def`` has on its way through ``RouteLimit`` (measured once, with a
    probe taking the same path): a registered endpoint has several more.
    """
    if refs <= _fresh_refs():
        return None
    for ref in gc.get_referrers(func):
        if isinstance(ref, dict):  # an instance __dict__ that was materialised
            if ref.get("endpoint") is func and "path" in ref:
                return ref
        elif getattr(ref, "endpoint", None) is func and hasattr(ref, "path"):
            return ref
    return None


def _with_request_param(func: Callable[..., Any]) -> inspect.Signature:
    """``func``'s signature plus a keyword-only ``Request`` parameter for FastAPI."""
    try:
        sig = inspect.signature(func, eval_str=True)
    except Exception:  # a forward reference not defined yet: FastAPI resolves it later
        sig = inspect.signature(func)
    params = list(sig.parameters.values())
    extra = inspect.Parameter(_REQUEST_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Request)
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        params.insert(len(params) - 1, extra)
    else:
        params.append(extra)
    return sig.replace(parameters=params)


@functools.cache
def _fresh_refs() -> int:
    def probe() -> None:  # pragma: no cover - never called
        pass

    limit = RouteLimit.__new__(RouteLimit)
    limit._measure_only = True
    # The same way in as ``@limit``; the probe is held by a local name too, which a
    # function under a decorator is not.
    return cast(int, limit(probe)) - 1


class RouteLimit:
    """``guard.limit(spec)``: a FastAPI dependency and an endpoint decorator in one.

    Both forms limit the route they guard, under one name: ``METHOD /route/{template}``
    (the resource name of ``RULES.md``), so the same spec counts the same way either way.
    As a dependency FastAPI calls it with the request; as a decorator it wraps the
    endpoint, keeping its parameters and adding one for the request, which FastAPI fills
    in. Called outside a request (a plain call in a test or a script), the decorated
    function is limited under ``module.qualname``.

    The decorator must sit below ``@app.get(...)`` (nearer the function): above it, the
    route already holds the undecorated function, so it raises ``TypeError`` at once.
    ``__wrapped__`` points at the dependency coroutine so that FastAPI sees
    ``(request: Request)`` and awaits it.
    """

    #: Routes one limit keeps counters for (a limit object is normally on one route).
    MAX_ROUTES = 1024

    def __init__(self, guard: Guard, spec: str) -> None:
        self.guard = guard
        self.spec = spec
        self.items = parse_many(spec)
        self._chains: dict[str, Chain] = {}
        self.__wrapped__ = self._dependency

    def _chain(self, resource: str) -> Chain:
        chain = self._chains.get(resource)
        if chain is None:
            checks = []
            for index, item in enumerate(self.items):
                rule = FlowRule(qps=item.amount, name=f"{item.amount}/{item.get_expiry()}s")
                checks.append(
                    QpsCheck(
                        self.guard.store,
                        f"{resource} limit {self.spec}",
                        index,
                        rule,
                        frozenset(),
                        window_seconds=float(item.get_expiry()),
                    )
                )
            if len(self._chains) >= self.MAX_ROUTES:  # stays bounded whatever happens
                self._chains.clear()
            chain = self._chains[resource] = Chain(resource, checks, ResourceStats())
        return chain

    async def _check(self, resource: str) -> None:
        outer = current_context.get()
        ctx = Context(resource, outer.origin if outer else "")
        chain = self._chain(resource)
        # A limit only admits: leave the chain at once (nothing to give back, and the
        # statistics must not count the call in flight forever).
        await chain.exit(ctx, await chain.enter(ctx))

    @staticmethod
    def _resource_of(request: Request | None, default: str) -> str:
        if request is not None:
            route = request.scope.get("route")
            path = getattr(route, "path_format", None)
            # Without a route template the raw path is client input: never a name.
            return f"{request.method} {path}" if path else default
        outer = current_context.get()
        if outer is not None and outer.scope is not None:  # inside GuardMiddleware
            return outer.resource
        return default

    async def _dependency(self, request: Request) -> None:
        await self._check(self._resource_of(request, f"{request.method} (no route)"))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "request" in kwargs and not args:
            return self._dependency(kwargs["request"])
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return self._decorate(args[0])
        raise TypeError("guard.limit(...) decorates a function or is used with Depends()")

    #: Set on the one probe that measures how many references a fresh function has here.
    _measure_only = False

    @staticmethod
    def _refs_of(func: Any) -> int:
        return sys.getrefcount(func)

    def _decorate(self, func: F) -> F:
        refs = self._refs_of(func)
        if self._measure_only:
            return cast(F, refs)
        name = f"{func.__module__}.{func.__qualname__}"
        if _route_holding(func, refs) is not None:
            raise TypeError(
                f"@guard.limit({self.spec!r}) is above the route decorator of {name}: the "
                "route already holds the undecorated function, so the limit would never run. "
                "Put @guard.limit(...) below @app.get(...), or use "
                "dependencies=[Depends(guard.limit(...))]"
            )
        signature = _with_request_param(func)
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                request = kwargs.pop(_REQUEST_PARAM, None)
                await self._check(self._resource_of(request, name))
                return await func(*args, **kwargs)

            async_wrapper.__signature__ = signature  # type: ignore[attr-defined]
            return cast(F, async_wrapper)

        @functools.wraps(func)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            request = kwargs.pop(_REQUEST_PARAM, None)
            self.guard.sync_bridge.run(self._check(self._resource_of(request, name)), name)
            return func(*args, **kwargs)

        sync_wrapper.__signature__ = signature  # type: ignore[attr-defined]
        return cast(F, sync_wrapper)


__all__ = ["RouteLimit", "SyncBridge", "guarded_resource"]
