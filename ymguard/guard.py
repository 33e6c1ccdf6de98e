"""The Guard: rules compiled into per-resource chains, and the ways an app uses them.

A :class:`Guard` owns the rules, the store, the statistics and the compiled chains. The
middleware asks it for a resource's chain; ``@guard.resource`` and ``guard.limit`` guard
code and FastAPI endpoints; ``guard.install(app)`` registers the global exception mapper.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import importlib
import inspect
import logging
import os
import re
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import pybreaker
from limits import parse_many
from starlette.requests import Request

from .antiresubmit import (
    SubmitTokenRule,
    SubmitTokens,
    build_antiresubmit_checks,
    close_idempotency_tasks,
)
from .breaker import (
    BreakerCheck,
    BreakerRule,
    BreakerStatus,
    PybreakerCheck,
    breaker_error_statuses,
    build_breaker_checks,
    close_breakers,
)
from .chain import DEFAULT_ERROR_STATUSES, Chain, Context, cap_origin
from .errors import (
    Blocked,
    ProblemResponse,
    SyncResourceError,
    blocked_response,
    install_http_problems,
)
from .limiter import FlowRule, QpsCheck, build_flow_checks
from .rules import ErrorMapping, RulesFile, load_rules, parse_rules
from .semaphore import (
    Semaphore,
    build_semaphore_checks,
    close_store_tasks,
    semaphore_for_rule,
)
from .stats import ResourceStats
from .storage import Store, store_from_uri
from .types import Scope

log = logging.getLogger("ymguard")

F = TypeVar("F", bound=Callable[..., Any])

#: The call being guarded in this task (set by the middleware and ``@guard.resource``).
current_context: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "ymguard_context", default=None
)


def _import_exception(path: str) -> type[BaseException]:
    module_name, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # ImportError, AttributeError, or the module's own error
        raise ValueError(f"errors: cannot import {path!r}: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise ValueError(f"errors: {path!r} is not an exception class")
    return obj


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "error"


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


class Guard:
    """Rules, store, statistics and compiled chains for one app.

    Args:
        rules: a dict in the shape of ``RULES.md``, a parsed :class:`RulesFile`, or None.
        storage: a storage URI or a :class:`Store`; ``YMGUARD_STORAGE`` in the
            environment wins over a URI given here or in the rules.
        source: the name problems in ``rules`` are reported against.
    """

    def __init__(
        self,
        rules: Mapping[str, Any] | RulesFile | None = None,
        storage: str | Store | None = None,
        *,
        source: str = "<rules>",
    ) -> None:
        self.rules = rules if isinstance(rules, RulesFile) else parse_rules(rules, source=source)
        if isinstance(storage, Store):
            self.store = storage
        else:
            uri = os.environ.get("YMGUARD_STORAGE") or storage or self.rules.storage
            self.store = store_from_uri(
                uri,
                key_prefix=self.rules.key_prefix,
                on_storage_error=self.rules.on_storage_error,
            )
        self._chains: dict[str, Chain] = {}
        self._stats: dict[str, ResourceStats] = {}
        self._semaphores: dict[str, Semaphore] = {}
        self._exception_map: dict[type[BaseException], ErrorMapping] = {}
        self._breaker_listeners: list[tuple[str | None, Any]] = []
        self._attached: dict[str, list[PybreakerCheck]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._origin_of = self._compile_origin()
        # Apps that install() registered the exception mapper on; errors: is imported at
        # their startup (not at install: the classes may live in the app's own module).
        self._apps: list[Any] = []
        self._errors_resolved = False
        self._warned_sync: set[str] = set()

    @classmethod
    def from_yaml(cls, path: str | Path, storage: str | Store | None = None) -> Guard:
        """A guard from a YAML rules file; raises :class:`RulesError` naming file and line."""
        return cls(load_rules(path), storage)

    def __repr__(self) -> str:
        return f"Guard({len(self.rules.resources)} resources, store={self.store!r})"

    # -- rules and chains ----------------------------------------------------------------

    def reload(self, rules: Mapping[str, Any] | RulesFile) -> None:
        """Swap the whole rule set at once; calls already inside a chain finish on the old one."""
        self.rules = rules if isinstance(rules, RulesFile) else parse_rules(rules)
        self._origin_of = self._compile_origin()
        self._chains = {}
        self._errors_resolved = False

    def stats(self, resource: str) -> ResourceStats:
        """The sliding-window statistics of a resource (created on first use)."""
        stats = self._stats.get(resource)
        if stats is None:
            stats = self._stats.setdefault(resource, ResourceStats())
        return stats

    def chain(self, resource: str) -> Chain:
        """The compiled chain of a resource (compiled once, cached until ``reload``)."""
        chain = self._chains.get(resource)
        if chain is None:
            with self._lock:
                chain = self._chains.get(resource)
                if chain is None:
                    chain = self._chains[resource] = self._compile(resource)
        return chain

    def _compile(self, resource: str) -> Chain:
        rules = self.rules.resources.get(resource)
        checks: list[Any] = []
        if rules is not None:
            # authority → system → param_flow → flow → breaker → semaphore → idempotency
            checks += build_flow_checks(self.store, resource, rules.flow)
            checks += self._breaker_checks(resource, rules.breaker)
            checks += build_semaphore_checks(
                self.store, resource, rules.semaphore, self._semaphores
            )
            checks += build_antiresubmit_checks(
                self.store, resource, rules.idempotency, rules.submit_token, self.submit_tokens
            )
        else:
            checks += self._attached.get(resource, [])  # pybreakers attached by code
        statuses = breaker_error_statuses(rules.breaker if rules is not None else [])
        return Chain(resource, checks, self.stats(resource), statuses)

    # -- origin --------------------------------------------------------------------------

    def _compile_origin(self) -> Callable[[Scope], str]:
        if self.rules.origin is None:
            return lambda scope: ""
        read = self._read_origin()
        return lambda scope: cap_origin(read(scope))

    def _read_origin(self) -> Callable[[Scope], str]:
        rule = self.rules.origin
        if rule is None:
            return lambda scope: ""
        if rule.from_ == "header":
            header = rule.name.lower().encode("latin-1")

            def from_header(scope: Scope) -> str:
                for name, value in scope.get("headers", ()):
                    if name == header:  # UTF-8 like the rules file; odd bytes stay distinct
                        return cast(bytes, value).decode("utf-8", "surrogateescape")
                return ""

            return from_header
        if rule.from_ == "client_ip":
            return lambda scope: (scope.get("client") or ("",))[0] or ""
        attr = rule.name

        def from_state(scope: Scope) -> str:
            value = (scope.get("state") or {}).get(attr)
            return "" if value is None else str(value)

        return from_state

    def origin_of(self, scope: Scope) -> str:
        """The caller's origin for an ASGI scope, as the ``origin:`` rule says.

        Capped by :func:`~ymguard.chain.cap_origin`: over 128 characters, or with
        characters other than printable ASCII, it is a 33-character digest.
        """
        return self._origin_of(scope)

    # -- breakers ------------------------------------------------------------------------

    def _breaker_checks(self, resource: str, rules: list[BreakerRule]) -> list[Any]:
        listeners = [x for name, x in self._breaker_listeners if name in (None, resource)]
        checks: list[Any] = build_breaker_checks(
            self.store, resource, rules, self.stats(resource), listeners
        )
        return checks + self._attached.get(resource, [])

    def breakers(self) -> list[BreakerStatus]:
        """Every breaker of every resource: name, strategy, state, counts (for metrics).

        Resources that no request has reached yet are compiled here, so the list is
        complete from the start. On Redis, ``state`` is this process's fresh copy.
        """
        for resource in (*self.rules.resources, *self._attached):
            self.chain(resource)
        return [
            check.status()
            for chain in list(self._chains.values())
            for check in chain.checks
            if isinstance(check, (BreakerCheck, PybreakerCheck))
        ]

    def add_breaker_listener(self, listener: Any, resource: str | None = None) -> None:
        """Register a ``pybreaker.CircuitBreakerListener`` on the breakers of the rules.

        Args:
            listener: an object with pybreaker's ``state_change(cb, old, new)``,
                ``failure(cb, exc)`` and ``success(cb)``; ``cb`` is our
                :class:`~ymguard.breaker.Breaker` (``name``, ``current_state``), the states
                are pybreaker's state objects. Called on the event loop: keep it quick.
            resource: only this resource's breakers (default: all, also after a reload).
        """
        self._breaker_listeners.append((resource, listener))
        for chain in list(self._chains.values()):
            if resource is None or chain.resource == resource:
                for check in chain.checks:
                    if isinstance(check, BreakerCheck):
                        check.breaker.add_listener(listener)

    def attach_breaker(
        self,
        resource: str,
        breaker: pybreaker.CircuitBreaker,
        error_statuses: Iterable[int] = DEFAULT_ERROR_STATUSES,
    ) -> None:
        """Guard a resource with an existing ``pybreaker.CircuitBreaker`` too.

        It opens after its own ``fail_max`` failures and answers ``circuit-open`` like
        our breakers; see :class:`~ymguard.breaker.PybreakerCheck` for how it is driven
        without blocking the event loop. Only in-memory pybreaker storage is accepted.

        Args:
            resource: the resource name (``METHOD /route/{template}`` or a code resource).
            breaker: the pybreaker breaker; its listeners and ``exclude`` keep working.
            error_statuses: HTTP statuses that count as failures (exceptions always do).
        """
        check = PybreakerCheck(resource, breaker, error_statuses, self.stats(resource))
        self._attached.setdefault(resource, []).append(check)
        with self._lock:
            self._chains.pop(resource, None)

    # -- code resources ------------------------------------------------------------------

    def resource(
        self,
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
            async def run(args: tuple[Any, ...], kwargs: dict[str, Any], call: Any) -> Any:
                outer = current_context.get()
                ctx = Context(name, outer.origin if outer else "", kwargs)
                chain = self.chain(name)
                try:
                    tokens = await chain.enter(ctx)
                except Blocked as exc:
                    handler = block_handler or fallback
                    if handler is None:
                        raise
                    extra = {"exc": exc} if _accepts_exc(handler) else {}
                    return await _maybe_await(handler(*args, **kwargs, **extra))
                try:
                    return await call()
                except exceptions_to_ignore:
                    raise
                except asyncio.CancelledError as exc:
                    ctx.error = exc  # a cancelled call is no success (a probe re-opens)
                    raise
                except Exception as exc:
                    ctx.error = exc
                    if fallback is None:
                        raise
                    extra_err: dict[str, Any] = {"exc": exc} if _accepts_exc(fallback) else {}
                    return await _maybe_await(fallback(*args, **kwargs, **extra_err))
                finally:
                    await chain.exit(ctx, tokens)

            if inspect.iscoroutinefunction(func):

                @functools.wraps(func)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    return await run(args, kwargs, lambda: func(*args, **kwargs))

                return cast(F, async_wrapper)

            @functools.wraps(func)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                # Only entering and leaving the chain hop to the event loop; the body runs
                # here, in the caller's thread (a sync endpoint's worker thread).
                outer = current_context.get()
                ctx = Context(name, outer.origin if outer else "", kwargs)
                chain = self.chain(name)
                try:
                    tokens = self._run_sync(chain.enter(ctx), name)
                except SyncResourceError as exc:
                    if fallback is None:
                        raise
                    return fallback(
                        *args, **kwargs, **({"exc": exc} if _accepts_exc(fallback) else {})
                    )
                except Blocked as exc:
                    handler = block_handler or fallback
                    if handler is None:
                        raise
                    return handler(
                        *args, **kwargs, **({"exc": exc} if _accepts_exc(handler) else {})
                    )
                try:
                    return func(*args, **kwargs)
                except exceptions_to_ignore:
                    raise
                except Exception as exc:
                    ctx.error = exc
                    if fallback is None:
                        raise
                    return fallback(
                        *args, **kwargs, **({"exc": exc} if _accepts_exc(fallback) else {})
                    )
                finally:
                    self._run_sync(chain.exit(ctx, tokens), name)

            return cast(F, sync_wrapper)

        return decorate

    def _run_sync(self, coro: Coroutine[Any, Any, Any], name: str) -> Any:
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
            if name not in self._warned_sync:
                self._warned_sync.add(name)
                log.error("ymguard: sync resource %r called on the event loop's thread", name)
            raise SyncResourceError(
                f"ymguard: the sync function guarded as {name!r} was called on the event "
                "loop's thread, where its guard would block the loop: make it async, or "
                "call it from a worker thread (a sync endpoint, asyncio.to_thread)"
            )
        loop = self._loop
        if loop is not None and loop.is_running():
            return asyncio.run_coroutine_threadsafe(coro, loop).result()
        if self.store.kind != "memory":
            coro.close()
            raise SyncResourceError(
                f"ymguard: the sync function guarded as {name!r} on Redis must be called "
                "from a worker thread of a running app (or make it async)"
            )
        return _run_now(coro)

    def limit(self, spec: str) -> RouteLimit:
        """A limit such as ``"100/second"`` or ``"10/second;500/minute"`` (``limits`` syntax).

        Use it as a decorator on an endpoint, below ``@app.get(...)`` (above it raises
        ``TypeError``: the route would call the undecorated function), or as a FastAPI
        dependency (``dependencies=[Depends(guard.limit("10/second"))]``); the endpoint
        need not take a ``request`` parameter either way. Both forms count per route and
        name it the same: ``METHOD /route/{template} limit SPEC`` in a refusal's
        ``resource``.
        """
        return RouteLimit(self, spec)

    # -- submit tokens -------------------------------------------------------------------

    @functools.cached_property
    def submit_tokens(self) -> SubmitTokens:
        """The anti-resubmit tokens on the guard's store, which ``submit_token`` rules spend.

        ``await guard.submit_tokens.issue_for(request, "POST /orders")`` issues a token
        bound the way that resource's rule says.
        """
        return SubmitTokens(self.store, rules=self._submit_token_rule, origin_of=self.origin_of)

    def _submit_token_rule(self, resource: str) -> SubmitTokenRule | None:
        rules = self.rules.resources.get(resource)
        return None if rules is None else rules.submit_token

    # -- semaphores ----------------------------------------------------------------------

    def semaphore(
        self, name: str, permits: int | None = None, lease_seconds: float = 30.0
    ) -> Semaphore:
        """The guard's semaphore called ``name`` on its store (created on first use).

        A ``semaphore:`` rule's semaphore is found by its ``name`` (default: the resource),
        and is the very object the rule's requests hold permits of.
        """
        sem = self._semaphores.get(name)
        if sem is None:
            for resource, rules in self.rules.resources.items():
                rule = rules.semaphore
                if rule is not None and (rule.name or resource) == name:
                    return semaphore_for_rule(self.store, resource, rule, self._semaphores)
            if permits is None:
                raise KeyError(f"no semaphore {name!r} in the rules; give permits= to create one")
            sem = self._semaphores[name] = Semaphore(name, permits, lease_seconds, self.store)
        return sem

    # -- the exception mapper ------------------------------------------------------------

    def map_exception(
        self,
        exc_type: type[BaseException],
        *,
        status: int,
        title: str,
        type: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Render ``exc_type`` (raised by the app) as problem+json with this status and title.

        Works before or after :meth:`install`: a mapping added later is registered on
        every installed app, and once an app has started, ``GuardMiddleware`` renders it.
        """
        self._exception_map[exc_type] = ErrorMapping(
            status=status, title=title, type=type, detail=detail
        )
        for app in self._apps:
            app.add_exception_handler(exc_type, self._handle_exception)

    def problem_for(self, exc: BaseException) -> ProblemResponse | None:
        """The problem response for an exception, or None if it is not mapped."""
        if not self._errors_resolved:
            self.resolve_errors()
        if isinstance(exc, Blocked):
            ctx = current_context.get()
            if ctx is not None and ctx.blocked is None and ctx.status is None:
                # A guard inside the endpoint refused: the request's answer is that
                # refusal, which the outer resource must not count (its breakers).
                ctx.blocked = exc
            return blocked_response(exc)
        for cls in type(exc).__mro__:
            mapping = self._exception_map.get(cls)
            if mapping is not None:
                code = getattr(exc, "code", None)
                code = code if isinstance(code, str) and code else _slug(mapping.title)
                type_uri = mapping.type if mapping.type and "/" in mapping.type else None
                if mapping.type and type_uri is None:
                    code = mapping.type
                ctx = current_context.get()
                return ProblemResponse(
                    mapping.status,
                    code,
                    mapping.title,
                    str(exc) or mapping.detail or mapping.title,
                    resource=ctx.resource if ctx else None,
                    type_uri=type_uri,
                )
        return None

    def install(self, app: Any, *, http_errors: bool = True) -> None:
        """Register the global exception mapper on a Starlette or FastAPI app.

        Maps :class:`Blocked` errors raised inside endpoints, the ``errors:`` of the rules
        and every ``map_exception`` (also one made after this call) to problem+json
        responses. The classes ``errors:`` names are imported when the app starts (its
        first ASGI call), not here, so they may live in the module that calls
        ``install``; one that does not import stops the startup with a ``ValueError``
        naming the entry. ``errors:`` imports code: it is a trust boundary, so rules
        that arrive at run time must never carry it.

        Args:
            app: the Starlette or FastAPI application.
            http_errors: also render the framework's own errors as problem+json
                (``HTTPException`` such as 404 and 405, FastAPI's request validation
                errors as 422 ``validation-error``, and unhandled exceptions as a 500
                ``internal-error`` without a stack trace).
        """
        if http_errors:
            install_http_problems(app)
        if app not in self._apps:
            self._apps.append(app)
        app.add_exception_handler(Blocked, self._handle_exception)
        for exc_type in self._exception_map:
            app.add_exception_handler(exc_type, self._handle_exception)
        build = getattr(app, "build_middleware_stack", None)
        if self._errors_resolved or build is None or getattr(app, "middleware_stack", None):
            self.resolve_errors()  # already started, or not Starlette: no startup to wait for
            return

        # Starlette builds its middleware stack (and copies the exception handlers into
        # it) on its first ASGI call: import errors: just before, once every module is in.
        def build_after_resolving() -> Any:
            self.resolve_errors()
            return build()

        app.build_middleware_stack = build_after_resolving

    def resolve_errors(self) -> None:
        """Import the classes ``errors:`` names and register them on installed apps.

        Runs once per rule set, at the app's startup (or the first mapped error).

        Raises:
            ValueError: naming the entry whose class does not import.
        """
        if self._errors_resolved:
            return
        for path, mapping in self.rules.errors.items():
            exc_type = _import_exception(path)
            if exc_type not in self._exception_map:
                self._exception_map[exc_type] = mapping
                for app in self._apps:
                    app.add_exception_handler(exc_type, self._handle_exception)
        self._errors_resolved = True

    def startup_checks(self) -> None:
        """What ``GuardMiddleware`` checks on the app's first ASGI call.

        Imports ``errors:`` (a clear ``ValueError`` if an entry does not import) and warns
        when ``errors:`` maps exceptions but :meth:`install` was never called, so they
        would answer 500.
        """
        self.resolve_errors()
        if self.rules.errors and not self._apps:
            log.warning(
                "ymguard: errors: maps %d exception(s) but guard.install(app) was never "
                "called: they will answer 500 instead of problem+json",
                len(self.rules.errors),
            )

    async def _handle_exception(self, request: Any, exc: Exception) -> Any:
        response = self.problem_for(exc)
        if response is None:  # pragma: no cover - only registered for mapped types
            raise exc
        return response

    async def aclose(self) -> None:
        """Stop the background tasks on the guard's store and close its connections.

        The breakers' subscriber, the semaphores' pub/sub reader and the lease keeper,
        and idempotency leases and writes still waiting for the store.
        """
        await close_breakers(self.store)
        await close_store_tasks(self.store)
        await close_idempotency_tasks(self.store)
        await self.store.aclose()


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
            self.guard._run_sync(self._check(self._resource_of(request, name)), name)
            return func(*args, **kwargs)

        sync_wrapper.__signature__ = signature  # type: ignore[attr-defined]
        return cast(F, sync_wrapper)


__all__ = ["Guard", "RouteLimit", "current_context"]
