"""The Guard: the rules, compiled into per-resource chains, swapped whole on reload.

A :class:`Guard` owns the rules, the store, the statistics and the compiled chains, and
their lifecycle. Rule kinds come from ``registry.py`` (the guard knows none by name);
``@guard.resource`` and ``guard.limit`` live in ``resource.py``, the exception mapper in
``mapper.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pybreaker
from opentelemetry.metrics import MeterProvider

from ._kind import Env
from .antiresubmit import SubmitTokenRule, SubmitTokens
from .breaker import BreakerCheck, BreakerStatus, PybreakerCheck
from .chain import (
    DEFAULT_ERROR_STATUSES,
    Chain,
    Check,
    Observer,
    cap_origin,
    current_context,
)
from .errors import ProblemResponse
from .mapper import ExceptionMapper
from .metrics import GuardMetrics
from .registry import build_checks
from .resource import RouteLimit, SyncBridge, guarded_resource
from .rules import ResourceRules, RulesFile, load_rules, parse_rules
from .rulesync import RulesRuntime, check_same_store
from .semaphore import Semaphore, semaphore_for_rule
from .shaping import note_relations
from .stats import ResourceStats
from .storage import Store, store_from_uri
from .storage.tasks import drain
from .system import SystemProtection
from .types import Scope

if TYPE_CHECKING:
    from .dashboard import Authorize, Dashboard

F = TypeVar("F", bound=Callable[..., Any])

_NO_RULES = ResourceRules()


class Guard:
    """Rules, store, statistics and compiled chains for one app.

    Args:
        rules: a dict in the shape of ``RULES.md``, a parsed :class:`RulesFile`, or None.
        storage: a storage URI or a :class:`Store`; ``YMGUARD_STORAGE`` in the
            environment wins over a URI given here or in the rules.
        source: the name problems in ``rules`` are reported against.
        follow_pushed: follow the rules pushed to the store (``ymguard push``,
            :meth:`publish_rules`): the newest pushed version replaces ``rules`` when
            the guard starts, and every later push swaps in (see ``docs/operations.md``).
        metrics: OpenTelemetry metrics (``metrics.py``): True (the default) records
            through the global meter provider, a no-op until the app sets an SDK one;
            a ``MeterProvider`` records into that one; False records nothing and costs
            nothing. ``guard.metrics`` is the :class:`~ymguard.metrics.GuardMetrics`.
    """

    def __init__(
        self,
        rules: Mapping[str, Any] | RulesFile | None = None,
        storage: str | Store | None = None,
        *,
        source: str = "<rules>",
        follow_pushed: bool = True,
        metrics: bool | MeterProvider = True,
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
        self._stats: dict[str, ResourceStats] = {}
        self._semaphores: dict[str, Semaphore] = {}
        self._breaker_listeners: list[tuple[str | None, Any]] = []
        self._attached: dict[str, list[PybreakerCheck]] = {}
        self._observers: list[Observer] = []
        #: Runs the chain steps of sync code on the app's event loop (:meth:`bind_loop`).
        self.sync_bridge = SyncBridge(self.store)
        # errors: comes from the app's own rules only (pushed rules cannot carry it).
        self._errors = self.rules.errors
        self._mapper = ExceptionMapper(lambda: self._errors)
        self._lock = threading.Lock()
        self._read_origin_of = self._compile_origin(self.rules)
        #: The process-wide protection of the ``system:`` section (one per guard).
        self.system = SystemProtection(self.rules.system)
        self._env = Env(
            store=self.store,
            stats=self.stats,
            semaphores=self._semaphores,
            submit_tokens=lambda: self.submit_tokens,
            listeners=self._listeners_for,
            attached=self._attached_to,
            system=self.system,
        )
        # Every resource of the rules is compiled now: a rules problem shows at once, and
        # a reload swaps complete sets.
        self._chains: dict[str, Chain] = self._compile_all(self.rules)
        self._runtime = RulesRuntime(self)
        self._runtime.follow_pushed = follow_pushed
        self.metrics: GuardMetrics | None = None
        if metrics is not False:
            self.metrics = GuardMetrics(self, None if metrics is True else metrics)
            self.observe(self.metrics)
            self.add_breaker_listener(self.metrics.breaker_listener)

    @classmethod
    def from_yaml(
        cls,
        path: str | Path,
        storage: str | Store | None = None,
        *,
        watch: bool = False,
        poll_seconds: float = 1.0,
    ) -> Guard:
        """A guard from a YAML rules file; raises :class:`RulesError` naming file and line.

        Args:
            path: the rules file.
            storage: a storage URI or store (see :class:`Guard`).
            watch: reload the file when it changes (looked at every ``poll_seconds``,
                from the guard's start on): a bad edit is refused and logged as
                ``FILE:LINE: field: why``, and the rules in force stay.
            poll_seconds: how often a watched file is looked at.
        """
        data = b""
        if watch:  # read before loading: an edit in between is then seen as one
            with contextlib.suppress(OSError):
                data = Path(path).read_bytes()
        guard = cls(load_rules(path), storage)
        if watch:
            guard._runtime.watch(path, data, poll_seconds)
        return guard

    def __repr__(self) -> str:
        return f"Guard({len(self.rules.resources)} resources, store={self.store!r})"

    # -- rules and chains ----------------------------------------------------------------

    def reload(self, rules: Mapping[str, Any] | RulesFile, *, source: str = "<rules>") -> None:
        """Swap the whole rule set at once; calls already inside a chain finish on the old one.

        The new chains are compiled before the swap, under the guard's lock; rules that did
        not change keep their state (window counts, breaker states, held permits), which
        is keyed by rule identity, not by position. A set with any problem is refused
        whole (:class:`RulesError`) and the old one stays; so is one naming another
        ``storage:`` or ``key_prefix:`` (a reload swaps rules, not stores).
        """
        new = rules if isinstance(rules, RulesFile) else parse_rules(rules, source=source)
        self._swap(new, pushed=None, source=source)

    def _swap(
        self, new: RulesFile, *, pushed: int | None, source: str, text: str | None = None
    ) -> None:
        """Swap to ``new``: the guard's own rules (``pushed`` None) or a pushed version."""
        check_same_store(new, self.store, self._runtime.storages, source=source, text=text)
        with self._lock:
            self.system.configure(new.system)
            chains = self._compile_all(new)
            origin_of = self._compile_origin(new)
            if new.on_storage_error != self.rules.on_storage_error:
                self.store.on_storage_error = new.on_storage_error
            self.rules, self._chains, self._read_origin_of = new, chains, origin_of
            if pushed is None:  # the app's own rules: their errors: apply
                self._errors = new.errors
            self._mapper.rules_changed()
            self._runtime.swapped(new, pushed)

    @property
    def rules_version(self) -> str:
        """The version of the rules in force, for dashboards and logs.

        The pushed version number (``"3"``) while pushed rules are in force, else
        ``sha256:`` and the first 12 hex digits of :attr:`rules_digest`.
        """
        return self._runtime.version

    @property
    def rules_digest(self) -> str:
        """The digest of the rules in force (``sha256:`` and 64 hex digits).

        Computed over every value that applies, defaults included: comments and
        formatting do not change it, and processes running the same rules show the same.
        """
        return self._runtime.digest

    async def publish_rules(
        self,
        rules: str | Mapping[str, Any] | RulesFile,
        *,
        source: str = "<published>",
        expected_version: int | None = None,
    ) -> int:
        """Store ``rules`` as the next pushed version on the store and swap every guard to it.

        On Redis every process on the same key prefix swaps within a second, and one
        started later begins with it; on the memory store the guards sharing the store
        do. Returns the new version once this guard runs it.

        Args:
            rules: YAML text (problems are reported against its lines), a dict in the
                shape of the rules file, or a :class:`RulesFile`.
            source: the name problems are reported against, stored with the version.
            expected_version: push only if this version is in force in the store now (0:
                nothing pushed yet), else raise :class:`~ymguard.rulesync.VersionConflict`.

        Raises:
            RulesError: the rules do not validate, carry ``errors:`` (it imports code:
                only the app's own rules may), or name another store; nothing is stored.
        """
        return await self._runtime.publish(rules, source, expected_version)

    async def start(self) -> None:
        """Start following pushed rules and watching the rules file, on the running loop.

        ``GuardMiddleware`` starts it at the app's first ASGI call (its lifespan); await
        it in the app's lifespan to be sure the newest pushed version is in force before
        the first request. Idempotent; :meth:`aclose` stops it.
        """
        await self._runtime.start()

    def stats(self, resource: str) -> ResourceStats:
        """The sliding-window statistics of a resource (created on first use)."""
        stats = self._stats.get(resource)
        if stats is None:
            stats = self._stats.setdefault(resource, ResourceStats())
        return stats

    def chain(self, resource: str) -> Chain:
        """The compiled chain of a resource (a resource without rules: compiled on first use)."""
        chain = self._chains.get(resource)
        if chain is None:
            with self._lock:
                chain = self._chains.get(resource)
                if chain is None:
                    chain = self._chains[resource] = self._compile(resource, self.rules)
        return chain

    def _compile_all(self, rules: RulesFile) -> dict[str, Chain]:
        note_relations(self.store, rules.resources)  # flow relate: who counts whose calls
        return {resource: self._compile(resource, rules) for resource in rules.resources}

    def _compile(self, resource: str, rules: RulesFile) -> Chain:
        found = rules.resources.get(resource)
        checks, statuses = build_checks(self._env, resource, found or _NO_RULES)
        return Chain(resource, checks, self.stats(resource), statuses, self._observers)

    def observe(self, observer: Observer) -> None:
        """Tell ``observer`` of every call of every chain: passed, blocked, finished.

        For metrics and dashboards (the statistics listen the same way). It stays through
        reloads; it is called on the event loop for every call, so keep it quick. An
        observer that keeps counts per resource may define ``bind(resource)``: each chain
        then calls the ``passed`` and ``finished`` of what it returns (see ``Observer``).
        """
        with self._lock:
            self._observers.append(observer)
            for chain in self._chains.values():
                chain.set_observers((*chain.observers, observer))

    def status(self) -> list[object]:
        """What every check of every resource shows a dashboard now (no store call).

        A :class:`~ymguard.chain.CheckStatus` per check, a
        :class:`~ymguard.breaker.BreakerStatus` per breaker.
        """
        return [check.status() for chain in list(self._chains.values()) for check in chain.checks]

    def _listeners_for(self, resource: str) -> list[Any]:
        return [x for name, x in self._breaker_listeners if name in (None, resource)]

    def _attached_to(self, resource: str) -> Sequence[Check]:
        return self._attached.get(resource, [])

    # -- origin --------------------------------------------------------------------------

    @staticmethod
    def _compile_origin(rules: RulesFile) -> Callable[[Scope], str] | None:
        """The capped origin of a scope, as the rules read it; None without an ``origin:``
        (every origin is "": the middleware then calls nothing)."""
        if rules.origin is None:
            return None
        read = Guard._read_origin(rules)
        return lambda scope: cap_origin(read(scope))

    @staticmethod
    def _read_origin(rules: RulesFile) -> Callable[[Scope], str]:
        rule = rules.origin
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
        read = self._read_origin_of
        return "" if read is None else read(scope)

    # -- breakers ------------------------------------------------------------------------

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

        return guarded_resource(
            self,
            name,
            fallback=fallback,
            block_handler=block_handler,
            exceptions_to_ignore=exceptions_to_ignore,
        )

    def bind_loop(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Run the chain steps of guarded sync code on ``loop`` (the running loop if None).

        ``GuardMiddleware`` binds the app's loop at its first request; an app that guards
        sync code without the middleware calls this once from its loop.
        """
        self.sync_bridge.loop = loop if loop is not None else asyncio.get_running_loop()

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

    # -- the exception mapper (mapper.py) -------------------------------------------------

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
        self._mapper.map_exception(exc_type, status=status, title=title, type=type, detail=detail)

    def problem_for(self, exc: BaseException) -> ProblemResponse | None:
        """The problem response for an exception, or None if it is not mapped."""
        return self._mapper.problem_for(exc)

    def install(self, app: Any, *, http_errors: bool = True) -> None:
        """Register the global exception mapper on a Starlette or FastAPI app.

        See :meth:`ExceptionMapper.install <ymguard.mapper.ExceptionMapper.install>`:
        ``Blocked`` errors, the ``errors:`` of the rules (imported when the app starts)
        and every ``map_exception`` become problem+json responses; ``http_errors`` also
        renders the framework's own errors.
        """
        self._mapper.install(app, http_errors=http_errors)

    def resolve_errors(self) -> None:
        """Import the classes ``errors:`` names and register them on installed apps."""
        self._mapper.resolve_errors()

    def startup_checks(self) -> None:
        """What ``GuardMiddleware`` checks on the app's first ASGI call (see the mapper).

        It also starts following pushed rules and watching the rules file (:meth:`start`).
        """
        self._mapper.startup_checks()
        self._runtime.start_soon()

    @property
    def installed(self) -> bool:
        """Whether :meth:`install` put the exception mapper on an app."""
        return bool(self._mapper.apps)

    # -- the dashboard (dashboard/) --------------------------------------------------------

    def dashboard(self, *, authorize: Authorize, title: str = "ymguard") -> Dashboard:
        """The live dashboard of this guard: an ASGI app to mount (``app.mount("/ymguard", ...)``).

        From this call on the guard keeps 15 minutes of per-second figures; on a Redis
        store each process also reports them through Redis once a second (a task on its
        event loop, stopped by :meth:`aclose`) and the dashboard shows the cluster's sum.
        See ``docs/dashboard.md``.

        Args:
            authorize: ``request -> bool``, sync or async: who may see the dashboard (its
                page and its JSON). False answers 403 problem+json; raising Starlette's
                ``HTTPException(401)`` answers 401.
            title: the page's title.
        """
        from .dashboard import Dashboard, monitor_of

        return Dashboard(self, monitor_of(self), authorize=authorize, title=title)

    async def aclose(self) -> None:
        """Stop the background tasks on the guard's store and close its connections.

        First it waits (up to 2 s, ``storage.tasks.DRAIN_SECONDS``) for the clean-ups of
        cancelled calls still running, so that what they took is given back; then it stops
        the breakers' subscriber, the semaphores' pub/sub reader and the lease keeper, and
        idempotency leases and writes still waiting for the store; the rules watcher and
        the follower of pushed rules; the system rule's timer; the dashboard's reporter.
        Last it closes the store, once the releases sent without waiting for their replies
        have been answered (``RedisStore.settle``).
        """
        from .dashboard import stop_monitor

        await drain()  # first: the give-backs of cancelled calls need the store
        await self._runtime.aclose()
        await self.system.aclose()
        await stop_monitor(self)
        await self.store.close_tasks()
        await self.store.aclose()


__all__ = ["Guard", "RouteLimit", "current_context"]
