"""OpenTelemetry metrics of a guard, recorded from the chain's observers.

ymguard depends on ``opentelemetry-api`` only and records through the meter named
``ymguard``; the application chooses the SDK and its exporters (``docs/metrics.md``). A
:class:`Guard` makes one :class:`GuardMetrics` unless told not to (``metrics=False``) and
registers it as an observer of every chain, so no check records anything itself:

========================================  =================  ===========================
instrument                                kind               recorded
========================================  =================  ===========================
``ymguard.requests``                      Counter (*)        each call, once: ``passed``,
                                                             ``blocked``, ``shadow_blocked``
                                                             or ``replayed``
``ymguard.request.duration``              Histogram (s)      each admitted call, at its end
``ymguard.active_requests``               UpDownCounter (*)  admitted calls in flight
``ymguard.queue.duration``                Histogram (s)      each wait a check reports
                                                             (:func:`~ymguard.chain.report_wait`)
``ymguard.circuit_breaker.state``         observable Gauge   each breaker, when collected
``ymguard.circuit_breaker.transitions``   Counter            each state change this process sees
``ymguard.semaphore.permits``             observable Gauge   each rules semaphore (cached)
``ymguard.storage.outages``               Counter (*)        each outage of the store that
                                                             this process's calls meet
========================================  =================  ===========================

(*) Counted in process (one integer increment per call; outages by the store itself, as
each starts) and reported at each collection through observable counters and an
observable up-down counter: the same data (a monotonic sum, a non-monotonic sum) without
the SDK's per-call cost (some 10-20 us per instrument call). Durations are kept in
process too and recorded into the histogram in batches (:data:`DURATION_BATCH`, and at
every collection, before the SDK reads it); on the global provider, only once an SDK is
set (before, the histogram is a no-op).

Attribute values are resource names, rule kinds, problem codes, breaker and semaphore
names and the store's URI (without credentials): all come from the rules file and the
app's routes, never from clients, so the number of series is bounded by the rules.

With only the API installed (no SDK configured), every instrument is a no-op proxy; once
the app sets an SDK ``MeterProvider`` globally, the same instruments record into it.
``Guard(metrics=False)`` registers nothing at all (nothing is spent per call).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pybreaker
from opentelemetry import metrics as otel
from opentelemetry.metrics import _internal as otel_internal

from .chain import CLIENT_CLOSED_REQUEST, Check, Context, Observer, Outcome, WaitResult
from .errors import Blocked, StorageUnavailable

if TYPE_CHECKING:
    from .guard import Guard

#: The meter's name (the instrumentation scope).
METER_NAME = "ymguard"
#: The buckets of both histograms, in seconds (those of ``aspnetcore.rate_limiting.*``).
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
#: Durations are handed to the SDK at each collection, or once this many are kept for
#: one series (the SDK's per-value work costs less in a batch than amid a request).
DURATION_BATCH = 256
#: The breaker states the state gauge reports (1 for the current one, 0 for the others).
BREAKER_STATES = ("closed", "open", "half_open")
#: A semaphore's counts are read from the store at most this long per collection.
REFRESH_TIMEOUT = 2.0

RESOURCE = "ymguard.resource"
RESULT = "ymguard.result"
RULE_KIND = "ymguard.rule.kind"
ERROR_TYPE = "error.type"
OUTCOME = "ymguard.outcome"
STORAGE = "ymguard.storage"

Attributes = Mapping[str, str]


def storage_name(store: object) -> str:
    """The store as the ``ymguard.storage`` attribute: its URI without credentials."""
    uri = getattr(store, "uri", None)
    if not isinstance(uri, str):
        return f"{getattr(store, 'kind', 'memory')}://"
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _state_name(state: Any) -> str:
    """A breaker state (ours or a pybreaker state object) as the attribute says it."""
    name = getattr(state, "name", state)
    return str(getattr(name, "value", name)).replace("-", "_")


class _Instruments:
    """The instruments of the ``ymguard`` meter of one meter provider (made once each).

    Observable gauges call back once per collection; their callbacks report the guards
    that record into this provider (a process may have several).
    """

    def __init__(self, provider: otel.MeterProvider | None) -> None:
        from . import __version__

        meter = otel.get_meter(METER_NAME, __version__, meter_provider=provider)
        self.guards: weakref.WeakSet[GuardMetrics] = weakref.WeakSet()
        # Calls and calls in flight are counted in process (an increment per call) and
        # reported at each collection: the SDK's per-call cost stays off the request path.
        meter.create_observable_counter(
            "ymguard.requests",
            callbacks=[self._requests],
            unit="{request}",
            description="Calls that reached a guarded resource, by what the guard did.",
        )
        self.duration = meter.create_histogram(
            "ymguard.request.duration",
            unit="s",
            description="Time from entering the guard to the end of an admitted call.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        meter.create_observable_up_down_counter(
            "ymguard.active_requests",
            callbacks=[self._active],
            unit="{request}",
            description="Admitted calls in flight.",
        )
        self.queue = meter.create_histogram(
            "ymguard.queue.duration",
            unit="s",
            description="Time calls waited in a queue or for a permit.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.transitions = meter.create_counter(
            "ymguard.circuit_breaker.transitions",
            unit="{transition}",
            description="Circuit breaker state changes this process saw.",
        )
        meter.create_observable_counter(
            "ymguard.storage.outages",
            callbacks=[self._outages],
            unit="{outage}",
            description="Store outages that calls of this process ran into.",
        )
        meter.create_observable_gauge(
            "ymguard.circuit_breaker.state",
            callbacks=[self._breaker_states],
            unit="1",
            description="1 for each breaker's current state, 0 for its other states.",
        )
        meter.create_observable_gauge(
            "ymguard.semaphore.permits",
            callbacks=[self._permits],
            unit="{permit}",
            description="Permits of each semaphore: held, available, and callers waiting.",
        )

    def _requests(self, options: otel.CallbackOptions) -> Iterator[otel.Observation]:
        # Callbacks run before the SDK reads its synchronous instruments: the durations
        # kept since the last collection are recorded now, and are in this collection.
        for guard in list(self.guards):
            guard.flush_durations()
        yield from _summed(c for guard in list(self.guards) for c in guard.request_counts())

    def _outages(self, options: otel.CallbackOptions) -> Iterator[otel.Observation]:
        # Each store once, however many guards of this provider share it.
        stores = {id(guard._store): guard._store for guard in list(self.guards)}
        yield from _summed(
            [{STORAGE: storage_name(store)}, store.outages]
            for store in stores.values()
            if store.outages
        )

    def _active(self, options: otel.CallbackOptions) -> Iterator[otel.Observation]:
        yield from _summed(c for guard in list(self.guards) for c in guard.active_counts())

    def _breaker_states(self, options: otel.CallbackOptions) -> Iterator[otel.Observation]:
        for guard in list(self.guards):
            yield from guard.breaker_observations()

    def _permits(self, options: otel.CallbackOptions) -> Iterator[otel.Observation]:
        for guard in list(self.guards):
            yield from guard.permit_observations()


def _summed(counts: Iterable[list[Any]]) -> Iterator[otel.Observation]:
    """One observation per attribute set (two guards of one process may share some)."""
    totals: dict[frozenset[tuple[str, str]], list[Any]] = {}
    for attrs, value in counts:
        key = frozenset(attrs.items())
        found = totals.get(key)
        if found is None:
            totals[key] = [attrs, value]
        else:
            found[1] += value
    for attrs, value in totals.values():
        yield otel.Observation(value, attrs)


_by_provider: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()


_global: list[_Instruments] = []  # those of the global provider, made on first use


def _instruments(provider: otel.MeterProvider | None) -> _Instruments:
    """The instruments of ``provider`` (None: the global one, whenever an SDK is set)."""
    if provider is None:
        if not _global:
            _global.append(_Instruments(None))
        return _global[0]
    found = _by_provider.get(provider)
    if found is None:
        found = _by_provider[provider] = _Instruments(provider)
    return found


class _Resource:
    """The counts of one resource, each beside its attribute set (made once per series),
    and the observer of that resource's chains (:meth:`GuardMetrics.bind`).

    A count is a ``[attributes, n]`` pair: a call adds to ``n``, a collection reads it.
    """

    __slots__ = (
        "active",
        "durations",
        "metrics",
        "name",
        "outcome",
        "passes",
        "refusals",
        "replays",
    )

    def __init__(self, resource: str, metrics: GuardMetrics) -> None:
        self.name = resource
        self.metrics = metrics
        self.active: list[Any] = [{RESOURCE: resource}, 0]
        self.passes: list[Any] = [{RESOURCE: resource, RESULT: "passed"}, 0]
        self.replays: list[Any] = [{RESOURCE: resource, RESULT: "replayed"}, 0]
        self.refusals: dict[tuple[str, str, str], list[Any]] = {}
        self.outcome = {
            name: {RESOURCE: resource, OUTCOME: name} for name in ("success", "error", "cancelled")
        }
        # Durations (s) not yet handed to the histogram, by outcome. A deque: the loop
        # appends, a collection (maybe on an exporter's thread) pops, and no value is lost
        # or recorded twice without a lock.
        self.durations: dict[str, collections.deque[float]] = {
            name: collections.deque() for name in self.outcome
        }

    def refused(self, result: str, kind: str, code: str) -> list[Any]:
        """The count of refusals (``blocked`` or ``shadow_blocked``) by one kind and code."""
        count = self.refusals.get((result, kind, code))
        if count is None:
            attrs = {RESOURCE: self.name, RESULT: result, RULE_KIND: kind, ERROR_TYPE: code}
            count = self.refusals[(result, kind, code)] = [attrs, 0]
        return count

    def counts(self) -> Iterator[list[Any]]:
        """Every request count of the resource that has counted a call."""
        for count in (self.passes, self.replays, *list(self.refusals.values())):
            if count[1]:
                yield count

    def passed(self, ctx: Context) -> None:
        """:meth:`GuardMetrics.passed` for this resource."""
        if ctx.shadowed:
            error, check = ctx.shadowed[0]
            self.refused("shadow_blocked", _rule_kind(error, check), error.code)[1] += 1
        elif ctx.replayed:
            self.replays[1] += 1
        else:
            self.passes[1] += 1
        self.active[1] += 1

    def blocked(self, ctx: Context, error: Blocked, check: Check) -> None:
        """:meth:`GuardMetrics.blocked` for this resource."""
        self.refused("blocked", _rule_kind(error, check), error.code)[1] += 1

    def finished(self, ctx: Context, rt_ms: float, outcome: Outcome) -> None:
        """:meth:`GuardMetrics.finished` for this resource."""
        self.active[1] -= 1
        metrics = self.metrics
        if not metrics.record_durations:
            return
        if not metrics._sdk:  # the global provider: no SDK yet? (set once, never unset)
            if _OTEL_GLOBALS.get("_METER_PROVIDER", True) is None:
                return
            metrics._sdk = True
        if outcome == "success" or outcome == "error":
            name: str = outcome
        elif outcome == "blocked":
            name = "error"
        elif ctx.replayed and ctx.status != CLIENT_CLOSED_REQUEST:
            name = "error" if (ctx.status or 0) >= 500 else "success"
        else:
            name = "cancelled"
        kept = self.durations[name]
        kept.append(rt_ms / 1000.0)
        if len(kept) >= DURATION_BATCH:
            metrics._record_all(_drain(kept), self.outcome[name])


#: The API module's globals, read without a call per request (``_METER_PROVIDER`` is
#: None until ``set_meter_provider``; a version without it counts as set).
_OTEL_GLOBALS = vars(otel_internal)


def _drain(kept: collections.deque[float]) -> list[float]:
    """Pop every value of ``kept`` (thread-safe: each value is popped exactly once)."""
    values: list[float] = []
    pop = kept.popleft
    try:
        while True:
            values.append(pop())
    except IndexError:
        return values


def _rule_kind(error: Blocked, check: Check) -> str:
    """The ``ymguard.rule.kind`` of a refusal: the check's kind, or ``storage``."""
    return "storage" if error.code == "storage-unavailable" else check.kind


class _BreakerListener(pybreaker.CircuitBreakerListener):
    """A pybreaker listener counting breaker transitions. Outcomes are counted from the
    chain: it keeps the base class's ``success`` and ``failure`` (which do nothing), so a
    breaker does not call it for each call."""

    def __init__(self, metrics: GuardMetrics) -> None:
        self._metrics = weakref.ref(metrics)

    def state_change(self, cb: Any, old: Any, new: Any) -> None:
        metrics = self._metrics()
        if metrics is not None:
            metrics.transition(str(getattr(cb, "resource", cb.name)), old, new)


class GuardMetrics:
    """The metrics of one guard: an observer of its chains (see the module doc).

    Made by :class:`~ymguard.guard.Guard` (``guard.metrics``); its methods are called on
    the event loop for every call, and do a few dictionary look-ups and instrument calls.

    Args:
        guard: the guard whose chains it observes.
        meter_provider: where to record; None is the global provider
            (``opentelemetry.metrics.get_meter_provider()``, a no-op until an SDK is set).
    """

    def __init__(self, guard: Guard, meter_provider: otel.MeterProvider | None = None) -> None:
        self._guard = weakref.ref(guard)
        self._store = guard.store
        self._instruments = ins = _instruments(meter_provider)
        self._duration = ins.duration.record
        # On the global provider, durations are kept only once an SDK is set: before,
        # the histogram is the API's no-op.
        self._sdk = meter_provider is not None
        self._resources: dict[str, _Resource] = {}
        self._permits: dict[str, tuple[int, int, int]] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.breaker_listener = _BreakerListener(self)
        #: Record ``ymguard.request.duration`` (True); False skips it. The histogram is
        #: the one instrument the SDK records value by value (some 7 us a value); the
        #: values are kept and recorded together, in batches and at each collection.
        self.record_durations = True
        ins.guards.add(self)

    def _of(self, resource: str) -> _Resource:
        found = self._resources.get(resource)
        if found is None:
            found = self._resources[resource] = _Resource(resource, self)
        return found

    # -- the chain's observer ----------------------------------------------------------

    def bind(self, resource: str) -> Observer:
        """The observer of one resource's chains: :meth:`passed` and :meth:`finished`
        without looking the resource up by name (the chain's hot path)."""
        return self._of(resource)

    def passed(self, ctx: Context) -> None:
        """Count the call (``passed``, ``replayed`` or ``shadow_blocked``); one more in flight."""
        (self._resources.get(ctx.resource) or self._of(ctx.resource)).passed(ctx)

    def blocked(self, ctx: Context, error: Blocked, check: Check) -> None:
        """Count a refusal, with the rule's kind and the problem code."""
        (self._resources.get(ctx.resource) or self._of(ctx.resource)).blocked(ctx, error, check)

    def finished(self, ctx: Context, rt_ms: float, outcome: Outcome) -> None:
        """Record the call's duration and outcome; one fewer in flight.

        ``ymguard.outcome`` is ``success`` or ``error`` as the statistics judge the call
        (an exception, or a status the breakers count as an error), ``cancelled`` for a
        call cancelled or abandoned by its client; a replay counts by its status, and a
        call a guard inside the endpoint refused is an ``error``.
        """
        (self._resources.get(ctx.resource) or self._of(ctx.resource)).finished(ctx, rt_ms, outcome)

    def _record_all(self, durations: list[float], attrs: Attributes) -> None:
        record = self._duration
        for seconds in durations:
            record(seconds, attrs)

    def flush_durations(self) -> None:
        """Hand the durations kept since the last collection to the histogram.

        Run by every collection (before the SDK reads the histogram), and by a call that
        fills a batch of :data:`DURATION_BATCH`; call it yourself before reading a
        histogram outside a collection.
        """
        for res in list(self._resources.values()):
            for name, attrs in res.outcome.items():
                kept = res.durations[name]
                if kept:
                    self._record_all(_drain(kept), attrs)

    def request_counts(self) -> list[list[Any]]:
        """``[attributes, calls]`` of every ``ymguard.requests`` series so far."""
        return [count for res in list(self._resources.values()) for count in res.counts()]

    def active_counts(self) -> list[list[Any]]:
        """``[attributes, calls in flight]`` of every resource called so far."""
        # Every call is counted as passed, replayed or refused (shadow refusals too); a
        # resource bound to its chain but never called has no series.
        return [
            list(res.active)
            for res in list(self._resources.values())
            if res.passes[1] or res.replays[1] or res.refusals
        ]

    def waited(self, ctx: Context, check: Check, seconds: float, result: WaitResult) -> None:
        """Record a wait a check reported (:func:`~ymguard.chain.report_wait`)."""
        attrs = {RESOURCE: ctx.resource, RULE_KIND: check.kind, RESULT: result}
        self._instruments.queue.record(seconds, attrs)

    # -- breakers, semaphores, the store ---------------------------------------------------

    def transition(self, resource: str, old: Any, new: Any) -> None:
        """Count a breaker's change from ``old`` to ``new`` (states or their names)."""
        attrs = {
            RESOURCE: resource,
            "ymguard.circuit_breaker.from": _state_name(old),
            "ymguard.circuit_breaker.to": _state_name(new),
        }
        self._instruments.transitions.add(1, attrs)

    def breaker_observations(self) -> Iterator[otel.Observation]:
        """The state gauge's values: for each breaker, 1 for its state and 0 for the others."""
        guard = self._guard()
        if guard is None:
            return
        for status in guard.breakers():
            state = _state_name(status.state)
            for name in BREAKER_STATES:
                attrs = {
                    RESOURCE: status.resource,
                    "ymguard.circuit_breaker": status.name,
                    "ymguard.circuit_breaker.state": name,
                }
                yield otel.Observation(1 if name == state else 0, attrs)

    def semaphore_names(self) -> list[str]:
        """The semaphores of the rules (a ``semaphore:`` rule's ``name``, else its resource)."""
        guard = self._guard()
        if guard is None:
            return []
        names = {
            rules.semaphore.name or resource
            for resource, rules in guard.rules.resources.items()
            if rules.semaphore is not None
        }
        return sorted(names)

    def permit_observations(self) -> Iterator[otel.Observation]:
        """The permits gauge's values, as last read from the store; starts the next read.

        A collection cannot wait for the store, so it reports the counts the last
        :meth:`refresh` read and starts another on the guard's event loop (the values
        are at most one collection old). ``await guard.metrics.refresh()`` before a
        collection makes them current.
        """
        for name, (held, available, waiting) in sorted(self._permits.items()):
            for state, value in (("held", held), ("available", available), ("waiting", waiting)):
                attrs = {"ymguard.semaphore": name, "ymguard.semaphore.state": state}
                yield otel.Observation(value, attrs)
        self._refresh_soon()

    def _refresh_soon(self) -> None:
        guard = self._guard()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # collected on another thread (an exporter's)
            loop = guard.sync_bridge.loop if guard is not None else None
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._start_refresh)

    def _start_refresh(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = self._store.spawn(self.refresh())

    async def refresh(self) -> None:
        """Read every rules semaphore's held, available and waiting counts from the store.

        A semaphore the store cannot answer for keeps its last counts.
        """
        guard = self._guard()
        if guard is None:
            return
        for name in self.semaphore_names():
            sem = guard.semaphore(name)
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT):
                    held, available, waiting = await asyncio.gather(
                        sem.held(), sem.available(), sem.waiting()
                    )
            except (StorageUnavailable, TimeoutError):
                continue
            self._permits[name] = (held, available, waiting)


__all__ = [
    "BREAKER_STATES",
    "DURATION_BATCH",
    "DURATION_BUCKETS",
    "METER_NAME",
    "GuardMetrics",
    "storage_name",
]
