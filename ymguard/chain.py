"""The per-resource chain of checks, and the context one call carries through it.

A check is one rule kind's small object with ``enter`` and ``exit``. ``enter`` admits the
call (returning a token the check wants back at exit) or raises :class:`Blocked`.
``exit`` runs in reverse order after the call, or at once for the checks that had
admitted a call that a later check blocked: then ``ctx.blocked`` is set and the check
gives back what it took (no half-spent quota, no leaked permit).

A check may also answer the call itself (an idempotent replay) by raising
:class:`ShortCircuit`: for the checks before it that is a call that passed and finished.

On Redis a check may hand its store call to the chain instead (``stage_enter`` and
``stage_exit``, see :class:`Stage`): the chain sends the calls of consecutive such checks
in one round trip (one write on the pipelined connection; on a cluster, each call to its
node at once) and lets each check decide on its reply, in order. When one refuses, what
the others took is given back (an extra round trip only on refusal). The exits' calls go
out together too. A check without them (or one that declines, on the memory store or in
an outage) runs through plain ``enter`` and ``exit``, in its place in the order.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .errors import Blocked, StorageUnavailable
from .stats import ResourceStats
from .storage.redis import OUTAGE_ERRORS, Unanswered
from .storage.tasks import in_background
from .types import ASGIApp, Message, Receive, Scope

log = logging.getLogger("ymguard")

#: The chain's clock: ``Context.start`` and ``Context.now`` are its readings.
clock = time.perf_counter

#: Origin values longer than this (in characters) are replaced by a digest.
ORIGIN_MAX_CHARS = 128
# Kept as sent: 1-128 printable ASCII characters other than space and "~". A digest starts
# with "~", which a kept value never does, so two different origins never share state.
_PLAIN_ORIGIN = re.compile(rf"[!-}}]{{1,{ORIGIN_MAX_CHARS}}}")


def cap_origin(value: str) -> str:
    """The origin as rules and keys use it: bounded in size and safe in a key.

    Origins come from clients (a header, ``request.state``), so a 60 KB or binary value
    must not be kept whole in every per-origin structure and Redis key. A value of 1-128
    printable ASCII characters (no space, no ``~``) is kept as is; any other non-empty value
    becomes ``~`` and 32 hex digits of its SHA-256 (33 characters).
    """
    if not value or _PLAIN_ORIGIN.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return "~" + digest[:32]


class Context:
    """One call on its way through a chain.

    Attributes:
        resource: the resource name.
        origin: the caller's origin ("" when unknown).
        params: path parameters (HTTP) or call arguments by name (code resources: built
            from ``call_args`` when first read, as most calls never read them).
        scope: the ASGI scope for HTTP calls, else ``None``.
        start: ``time.perf_counter()`` when the call entered the chain.
        now: the chain's clock (``time.perf_counter()``) when it last told the observers
            of the call (it passed, was refused, finished): read once per event and
            shared, so that an observer need not read a clock of its own.
        status: the HTTP status the call answered with, once known (over HTTP: once the
            response has started).
        answered: over HTTP, the whole response has been sent (its last body message).
        error: the exception the call raised, if any.
        blocked: the error of a later check that blocked this call, if any.
        extras: per-check data for the rare check that needs more than its token.
        receive: the ASGI ``receive`` the app will get; a check that reads the body
            (idempotency) replaces it with one that hands the body on again.
        on_send: hooks that see every ASGI message the app sends (None, the usual case,
            costs nothing); a check that keeps the response (idempotency) adds one.
        replayed: a later check answered the call itself (an idempotent replay): the
            endpoint never ran.
        shadowed: the refusals of rules in shadow mode that let the call pass anyway, with
            the check of each (``shadow.py``); None, the usual case, when there were none.
        observers: the chain's observers, for a check that reports to them during the call
            (:func:`report_wait`).
        parent: the guarded call this one was entered from (a ``@guard.resource``
            called inside a guarded route), else ``None``; ``strategy: chain`` reads it.
    """

    # Hand-written rather than a dataclass: one is made per call, and setting the fields
    # in a plain __init__ costs 40% less than a dataclass's (keyword defaults, a factory).
    # Slots rather than class-level defaults: a default read through the class costs more
    # than twice a slot's read, and most fields are read on every call.
    __slots__ = (
        "_call_args",
        "_params",
        "answered",
        "blocked",
        "error",
        "extras",
        "now",
        "observers",
        "on_send",
        "origin",
        "parent",
        "receive",
        "replayed",
        "resource",
        "scope",
        "shadowed",
        "start",
        "status",
    )

    def __init__(
        self,
        resource: str,
        origin: str = "",
        params: Mapping[str, Any] | None = None,
        scope: Scope | None = None,
        start: float = 0.0,
        status: int | None = None,
        receive: Receive | None = None,
        parent: Context | None = None,
        call_args: tuple[Sequence[str], tuple[Any, ...], Mapping[str, Any]] | None = None,
    ) -> None:
        """``call_args``, for a guarded call (instead of ``params``): the names of the
        parameters its function takes by position, its positional arguments and its
        keyword arguments."""
        self.resource = resource
        self.origin = origin
        self._params = params
        self._call_args = call_args
        self.scope = scope
        self.start = self.now = start
        self.status = status
        self.answered = False
        self.error: BaseException | None = None
        self.blocked: Blocked | None = None
        self.extras: dict[str, Any] | None = None
        self.receive = receive
        self.on_send: list[Callable[[Message], None]] | None = None
        self.replayed = False
        self.shadowed: list[tuple[Blocked, Check]] | None = None
        self.observers: tuple[Observer, ...] = ()
        self.parent = parent

    @property
    def params(self) -> Mapping[str, Any]:
        """Path parameters (HTTP) or the call's arguments by name (built when first read)."""
        params = self._params
        if params is None:
            call_args = self._call_args
            if call_args is None:
                params = {}
            else:
                names, args, kwargs = call_args
                params = dict(zip(names, args, strict=False))
                params.update(kwargs)
            self._params = params
        return params

    @params.setter
    def params(self, value: Mapping[str, Any]) -> None:
        self._params = value

    def is_answered(self) -> bool:
        """Whether the whole response has been sent (``answered``), as a callable."""
        return self.answered

    def is_started(self) -> bool:
        """Whether the response has started (``status`` is set), as a callable."""
        return self.status is not None

    def __repr__(self) -> str:
        return f"Context({self.resource!r}, origin={self.origin!r}, status={self.status!r})"


#: The call being guarded in this task (set by the middleware and ``@guard.resource``).
current_context: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "ymguard_context", default=None
)


class ShortCircuit(Exception):
    """Raised by a check's ``enter`` to answer the call itself, without the endpoint.

    Attributes:
        response: the ASGI app that sends the answer.
        status: the answer's HTTP status (recorded as the call's outcome).
    """

    def __init__(self, response: ASGIApp, status: int) -> None:
        self.response = response
        self.status = status
        super().__init__(f"answered by a check with {status}")


@dataclass(frozen=True, slots=True)
class CheckStatus:
    """What a check shows a dashboard (a breaker shows a ``BreakerStatus``).

    Attributes:
        kind: the rule kind (``flow``, ``semaphore``, ...).
        resource: the resource it guards.
        rule: the rule, as refusals name it (``flow[0] qps=10``).
        state: what it knows now, without asking the store (limits, counts in process).
    """

    kind: str
    resource: str
    rule: str
    state: Mapping[str, Any]


class Check(Protocol):
    """One rule of one resource, as the chain sees it.

    ``kind`` names its rule kind; ``status()`` is what it shows a dashboard.
    """

    kind: str

    def status(self) -> object:
        """What the check shows a dashboard now (no store call)."""

    async def enter(self, ctx: Context) -> Any:
        """Admit the call and return a token for ``exit``, or raise :class:`Blocked`."""

    async def exit(self, ctx: Context, token: Any) -> None:
        """Record the outcome and release what ``enter`` took; never raises.

        A check whose class sets ``exit_after_call = False`` is only exited when a later
        check (or a guard inside the endpoint) blocked the call.

        Optionally a check also has ``stage_enter(ctx) -> Stage | None`` and
        ``stage_exit(ctx, token) -> Stage | NOTHING | None`` (attributes, None where it
        never stages): the same as ``enter``/``exit`` with the store call handed to the
        chain; returning None means "run my plain ``enter``/``exit``".

        A check may also enter without a coroutine: ``enter_now(ctx)`` when it always
        decides at once (a memory window), ``enter_fast(ctx)`` when it usually does (a
        closed breaker) and returns :data:`AWAIT` when its ``enter`` must run instead.
        Likewise ``exit_now(ctx, token)``: its ``exit`` without a coroutine (a memory
        permit's release), run by the chain in its place; and ``exit_fast(ctx, token)``
        when it usually has nothing to await (a closed breaker's good call): it returns
        :data:`AWAIT`, having done nothing, when its ``exit`` must run instead. Exits run
        after the chain set ``ctx.now``: they may read it rather than a clock.
        """


class Stage:
    """A check's store call, handed to the chain to send with its neighbours' calls.

    Attributes:
        store: the store to run it on (a :class:`~ymguard.storage.RedisStore`).
        call: the call (a :class:`~ymguard.storage.redis.ScriptCall`), or None for a check
            that decides without the store (``decide(None)``) within a batch.
        decide: on ``enter``: called with the reply, returns the check's token or raises
            :class:`Blocked` (an error reply is raised before it is called). On ``exit``:
            None (the reply is not read), and the call must be idempotent (a release by
            id): a batch of exits whose sender is cancelled is sent again.
        undo: gives back what the call may have taken when its reply is never read (the
            caller was cancelled, or Redis went silent): run in the background.

    A check that stages a call on every request may subclass this and define ``decide``
    and ``undo`` as methods (setting ``store`` and ``call`` itself, not calling
    ``__init__``): the stage is then one object, not two closures and a cell per captured
    variable, which stay alive while the request waits for Redis and so feed the garbage
    collector's full collections.
    """

    __slots__ = ("call", "decide", "store", "undo")

    #: Takes the reply of an ``enter`` call whose caller was cancelled before it was read,
    #: when it comes (a class attribute; a subclass may define it as a method): for a call
    #: whose ``undo`` cannot know what to give back (a prefetch's fetch: its permits are
    #: stocked for the other calls).
    late: Callable[[Any], None] | None = None

    def __init__(
        self,
        store: Any,
        call: Any,
        decide: Callable[[Any], Any] | None = None,
        undo: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.store = store
        self.call = call
        self.decide = decide
        self.undo = undo


#: What ``stage_exit`` returns when its check had nothing to give back.
NOTHING: Any = object()

#: What a check's ``enter_fast`` returns when it cannot decide without awaiting: the
#: chain then awaits its ``enter``.
AWAIT: Any = object()


#: How a call that passed the chain finished: ``success`` or ``error`` (an outcome the
#: statistics count), ``none`` (cancelled, abandoned by its client, or replayed: nothing
#: learnt), ``blocked`` (a guard inside the endpoint refused it).
Outcome = Literal["success", "error", "none", "blocked"]


class Observer(Protocol):
    """Something that listens to a chain: statistics, metrics, a dashboard.

    Called on the event loop for every call: keep each method quick and never raise.

    An observer that keeps something per resource may also define ``bind(resource)`` (a
    method of its class), returning an object whose ``passed`` and ``finished`` the
    resource's chains call instead of its own (no look-up by name on every call), or None.
    """

    def passed(self, ctx: Context) -> None:
        """The call passed every check (or a check answered it itself).

        ``ctx.shadowed`` lists the rules in shadow mode that would have refused it.
        """

    def blocked(self, ctx: Context, error: Blocked, check: Check) -> None:
        """``check`` refused the call (``check.kind`` names its rule kind)."""

    def finished(self, ctx: Context, rt_ms: float, outcome: Outcome) -> None:
        """A call that passed has finished (``ctx.status``, ``ctx.error`` say how)."""


#: How a wait for a queue or a permit ended: ``acquired``, ``rejected`` or ``cancelled``.
WaitResult = Literal["acquired", "rejected", "cancelled"]


class WaitObserver(Observer, Protocol):
    """An observer that also hears how long calls waited (an optional part of observing).

    A check that can make a call wait (a semaphore with ``wait_ms``, a queueing flow rule)
    reports each wait with :func:`report_wait`; observers that define ``waited`` hear it.
    """

    def waited(self, ctx: Context, check: Check, seconds: float, result: WaitResult) -> None:
        """``check`` made the call wait ``seconds``, and the wait ended with ``result``."""


def report_wait(ctx: Context, check: Check, seconds: float, result: WaitResult) -> None:
    """Tell the call's observers that ``check`` made it wait (for ``ymguard.queue.duration``).

    Called by a check from its ``enter``, for every call its rule could make wait (also
    those admitted at once, after 0 s). Observers without a ``waited`` method are skipped.
    """
    for observer in ctx.observers:
        waited = getattr(observer, "waited", None)
        if waited is not None:
            waited(ctx, check, seconds, result)


#: The status recorded for a call whose client went away first (nginx's 499).
CLIENT_CLOSED_REQUEST = 499


def has_outcome(ctx: Context) -> bool:
    """Whether the endpoint ran to an answer that says something about the resource.

    Not when a check refused the call, answered it itself (a replay), or when it was
    cancelled or its client went away: a breaker's probe learns nothing from those.
    """
    return (
        ctx.blocked is None
        and not ctx.replayed
        and ctx.status != CLIENT_CLOSED_REQUEST
        and not isinstance(ctx.error, asyncio.CancelledError)
    )


def is_error(ctx: Context, error_statuses: frozenset[int] | None = None) -> bool:
    """Whether a finished call counts as an error (an exception, or a listed status)."""
    if ctx.error is not None:
        return True
    statuses = error_statuses if error_statuses is not None else DEFAULT_ERROR_STATUSES
    return ctx.status in statuses


DEFAULT_ERROR_STATUSES = frozenset({500, 502, 503, 504})


class Chain:
    """The compiled checks of one resource, and its statistics."""

    __slots__ = (
        "_after_call",
        "_enter_now",
        "_exit_fast",
        "_fast",
        "_finished",
        "_passed",
        "_stage_in",
        "_stage_out",
        "_staging",
        "checks",
        "error_statuses",
        "observers",
        "release_on_disconnect",
        "resource",
        "stats",
        "sync_enter",
        "sync_exit",
        "try_enter",
    )

    def __init__(
        self,
        resource: str,
        checks: Sequence[Check],
        stats: ResourceStats,
        error_statuses: frozenset[int] = DEFAULT_ERROR_STATUSES,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.resource = resource
        self.checks = tuple(checks)
        self.stats = stats
        self.error_statuses = error_statuses
        # The statistics listen first: breakers decide on them in their exit.
        self.observers: tuple[Observer, ...] = ()
        self._passed: tuple[Callable[[Context], None], ...] = ()
        self._finished: tuple[Callable[[Context, float, Outcome], None], ...] = ()
        self.set_observers((stats, *observers))
        # The checks whose exit has work after a finished call, last first; a check with
        # exit_after_call = False only undoes when a later check blocks.
        self._after_call = tuple(
            i
            for i in range(len(self.checks) - 1, -1, -1)
            if getattr(self.checks[i], "exit_after_call", True)
        )
        # The checks that can hand their store calls to the chain (Redis), by index.
        self._stage_in: tuple[Callable[[Context], Stage | None] | None, ...] = tuple(
            getattr(check, "stage_enter", None) for check in self.checks
        )
        self._stage_out: tuple[Callable[[Context, Any], Any] | None, ...] = tuple(
            getattr(check, "stage_exit", None) for check in self.checks
        )
        self._staging = any(f is not None for f in (*self._stage_in, *self._stage_out))
        # A check that holds a scarce thing for the call (a semaphore permit) asks the edge
        # to cancel the call when its client goes away, so the thing comes back at once.
        self.release_on_disconnect = any(
            getattr(check, "release_on_disconnect", False) for check in self.checks
        )
        # A chain of no check, or of one check that decides without awaiting (a memory
        # window's ``enter_now``), is entered without a coroutine (:meth:`enter_now`): a
        # refusal then has nothing to give back. Likewise one whose finished calls leave
        # no exit to run, or only ``exit_now``s, is left without one (:meth:`exit_now`).
        # A check in shadow mode (``shadow.py``) turns refusals into reports in its own
        # ``enter``: it always runs through it.
        single = len(self.checks) == 1 and not getattr(type(self.checks[0]), "shadow", False)
        enter_now = getattr(self.checks[0], "enter_now", None) if single else None
        # One check that usually decides at once (``enter_fast``: prefetched permits, a
        # closed breaker) may be tried without a coroutine too (:attr:`try_enter`).
        enter_fast = getattr(self.checks[0], "enter_fast", None) if single else None
        self._enter_now: Callable[[Context], Any] | None = enter_now or enter_fast
        # Per check, a way in without a coroutine where it has one: ``enter_now`` (always
        # decides) or ``enter_fast`` (decides, or answers AWAIT: then ``enter`` runs).
        self._fast: tuple[Callable[[Context], Any] | None, ...] = tuple(
            None
            if getattr(type(check), "shadow", False)
            else getattr(check, "enter_now", None) or getattr(check, "enter_fast", None)
            for check in self.checks
        )
        # Per check, a way out without a coroutine where it has one: ``exit_now`` (a
        # memory permit's release: always done) or ``exit_fast`` (a closed breaker's good
        # call: done, or AWAIT having done nothing: then ``exit`` is awaited).
        exit_now = [
            None if getattr(type(check), "shadow", False) else getattr(check, "exit_now", None)
            for check in self.checks
        ]
        self._exit_fast: tuple[Callable[[Context, Any], Any] | None, ...] = tuple(
            now
            or (
                None if getattr(type(check), "shadow", False) else getattr(check, "exit_fast", None)
            )
            for now, check in zip(exit_now, self.checks, strict=True)
        )
        self.sync_enter = not self.checks or (enter_now is not None and not self._staging)
        # (A staged chain too: staging only batches exits, and there are none to run.)
        self.sync_exit = all(exit_now[i] is not None for i in self._after_call)
        #: Whether :meth:`enter_now` may be tried first: it then decides, or answers
        #: :data:`AWAIT` (await :meth:`enter`).
        self.try_enter = self.sync_enter or enter_fast is not None

    def set_observers(self, observers: Sequence[Observer]) -> None:
        """Replace the chain's observers (the statistics first)."""
        self.observers = tuple(observers)
        # Bound once: every call runs them (an observer's own for this resource, if it
        # keeps one: see ``Observer``).
        bound = []
        for observer in self.observers:
            # Looked up on the class: an object that makes attributes on demand (a mock,
            # a proxy's __getattr__) has not asked to be bound.
            bind = getattr(type(observer), "bind", None)
            own = bind(observer, self.resource) if callable(bind) else None
            bound.append(observer if own is None else own)
        self._passed = tuple(observer.passed for observer in bound)
        self._finished = tuple(observer.finished for observer in bound)

    def __repr__(self) -> str:
        names = ", ".join(type(c).__name__ for c in self.checks)
        return f"Chain({self.resource!r}, [{names}])"

    async def enter(self, ctx: Context) -> list[Any]:
        """Run every check's ``enter``; on a block, undo the ones that passed and re-raise."""
        ctx.start = clock()
        ctx.observers = self.observers
        tokens: list[Any] = []
        checks = self.checks
        try:
            if self._staging:
                # Consecutive staged checks in one round trip each (_batch), the
                # others through their own enter. Here, not in a coroutine of its own: one
                # fewer per call on Redis (1.7k instructions of a one-rule call's 70k).
                stagers = self._stage_in
                i, n = 0, len(checks)
                stage: Stage | None = None
                asked = False  # whether ``stage`` is checks[i]'s stage_enter's answer
                while i < n:
                    if not asked:
                        stager = stagers[i]
                        stage = stager(ctx) if stager is not None else None
                    if stage is None:
                        fast = self._fast[i]
                        token = AWAIT if fast is None else fast(ctx)
                        tokens.append(await checks[i].enter(ctx) if token is AWAIT else token)
                        i += 1
                        asked = False
                        continue
                    # Consecutive staged checks in one round trip. The batch is awaited
                    # here, on a future (send_many_now), not in coroutines of its own: a
                    # request waiting for Redis holds fewer objects, and with 32 waiting
                    # the garbage collector's young generation no longer overflows (a
                    # young collection every 60 requests under uvicorn, 1 in 6,000).
                    stages, store, j, following, asked = self._batch(ctx, i, stage)
                    replies: Any = ()  # no list to make when no check of the batch calls
                    if store is not None:
                        # A batch of one stage (the usual batch) sends a tuple of its
                        # call, with no comprehension to run. ``late`` hears the replies
                        # of a batch with a stage that takes them after a cancel.
                        calls: Sequence[Any]
                        if len(stages) == 1:
                            calls = (stage.call,)
                            late = None if stage.late is None else _LateReplies(stages)
                        else:  # one loop: no comprehension, no helper call
                            listed: list[Any] = []
                            takes_late = False
                            for staged in stages:
                                if staged.call is not None:
                                    listed.append(staged.call)
                                    takes_late = takes_late or staged.late is not None
                            calls = listed
                            late = _LateReplies(stages) if takes_late else None
                        sent = store.send_many_now(calls, late)
                        # Whether a task of its own runs the batch to its end (_for_late):
                        # then a cancel leaves the give-backs and ``late`` to it.
                        detached = False
                        try:
                            if sent is None:  # connecting, or down: run_many knows what to do
                                if late is None:
                                    replies = await store.run_many(calls)
                                else:
                                    detached = True
                                    replies = await _for_late(store.run_many(calls), late, stages)
                            else:  # run_many's part, inline
                                try:
                                    replies = await sent
                                except OUTAGE_ERRORS as exc:  # the connection failed
                                    raise store.lost(exc) from exc
                                if not store.replied(replies):
                                    mended = store.mended(calls, replies)
                                    if late is None:
                                        replies = await mended
                                    else:
                                        detached = True
                                        replies = await _for_late(mended, late, stages, replies)
                        except asyncio.CancelledError:
                            if not detached:
                                _undo_all(stages)
                                if late is not None and sent is not None:
                                    _hear_late(sent, late)
                            raise
                        except StorageUnavailable as exc:
                            if detached and sent is not None:  # met while mending
                                assert late is not None
                                late.set_result(replies)  # what was answered, stocked
                            await self._batch_unavailable(ctx, tokens, i, stages, exc)
                            i, stage = j, following
                            continue
                        except Exception:  # a bug, met after the calls may have run
                            _undo_all(stages)  # (a task of _for_late's has ended with it)
                            raise
                    rest = self._decide_batch(ctx, tokens, i, stages, replies)
                    if rest is not None:
                        await rest
                    i, stage = j, following
            else:
                for check, fast in zip(checks, self._fast, strict=True):
                    if fast is None:
                        tokens.append(await check.enter(ctx))
                        continue
                    token = fast(ctx)
                    tokens.append(await check.enter(ctx) if token is AWAIT else token)
        except Blocked as exc:
            check = checks[len(tokens)]  # the tokens end before the check that refused
            ctx.blocked = exc
            await self._unwind(ctx, tokens)
            ctx.now = clock()
            for observer in self.observers:
                observer.blocked(ctx, exc, check)
            raise
        except ShortCircuit as exc:
            # Answered without the endpoint: the earlier checks saw a call that passed.
            ctx.status = exc.status
            ctx.replayed = True
            ctx.now = clock()
            for passed in self._passed:
                passed(ctx)
            await self.exit(ctx, tokens)
            raise
        except asyncio.CancelledError as exc:
            # Give back what was taken in a task of its own: awaiting it here could
            # be cancelled again, leaking a permit until its lease ends.
            ctx.error = exc
            in_background(self._unwind(ctx, tokens))
            raise
        except BaseException as exc:
            ctx.error = exc  # e.g. a Redis bug reply: no probe may count it a success
            await self._unwind(ctx, tokens)
            raise
        ctx.now = clock()
        for passed in self._passed:
            passed(ctx)
        return tokens

    def enter_now(self, ctx: Context) -> Any:
        """:meth:`enter` without a coroutine, for a chain whose ``try_enter`` is true.

        The same outcomes as :meth:`enter`: the tokens, or :class:`Blocked` raised after
        the observers heard of it (one check at most, so nothing to give back). Or
        :data:`AWAIT`, having done nothing the call must undo, where the chain's
        ``sync_enter`` is false and its check could not decide at once: then await
        :meth:`enter`.
        """
        ctx.start = ctx.now = clock()
        ctx.observers = self.observers
        enter = self._enter_now
        if enter is None:
            for passed in self._passed:
                passed(ctx)
            return ()
        try:
            token = enter(ctx)
        except Blocked as exc:
            ctx.blocked = exc
            for observer in self.observers:
                observer.blocked(ctx, exc, self.checks[0])
            raise
        except BaseException as exc:
            ctx.error = exc
            raise
        if token is AWAIT:
            return AWAIT
        for passed in self._passed:
            passed(ctx)
        return [token]

    def exit_now(self, ctx: Context, tokens: Sequence[Any]) -> Coroutine[Any, Any, None] | None:
        """Leave the chain as far as it can without awaiting: None when that is all.

        Otherwise it returns what is left, a coroutine the caller must await (or run in a
        task of its own, its own task being cancelled): :meth:`exit` itself, having done
        nothing, for a call blocked inside the endpoint; else the rest of an exit begun
        here, from a check whose exit must be awaited (no ``exit_now``, or an
        ``exit_fast`` that answered :data:`AWAIT`) or store calls that must be awaited.
        Staged exits (releases on Redis) are sent without waiting for their replies
        where the store can (``send_many_detached``): a usual call on Redis then leaves
        without awaiting anything.
        """
        if ctx.blocked is not None:
            return self.exit(ctx, tokens)
        now = ctx.now = clock()
        rt_ms = (now - ctx.start) * 1000.0
        outcome: Outcome = "none"  # cancelled, abandoned by its client, or replayed
        if ctx.error is None:  # has_outcome and is_error, for the usual case
            status = ctx.status
            if not ctx.replayed and status != CLIENT_CLOSED_REQUEST:
                outcome = "error" if status in self.error_statuses else "success"
        elif has_outcome(ctx):
            outcome = "error"  # an exception is an error
        for finished in self._finished:
            finished(ctx, rt_ms, outcome)
        order = self._after_call
        if not tokens or not order:  # nothing entered, or no exit after a call (qps)
            return None
        entered = len(tokens)  # fewer than the checks when one answered the call
        if entered < len(self.checks):  # no comprehension: it would cost a cell
            order = tuple(filter(entered.__gt__, order))
        return self._exits_now(ctx, tokens, order, 0, None)

    def _batch(
        self, ctx: Context, first: int, stage: Stage
    ) -> tuple[Sequence[Stage], Any, int, Stage | None, bool]:
        """The stages of checks ``first``, ``first + 1``, ... that go out in one round trip.

        Returns them, the store of their calls (None if none calls), the next check's
        index, its stage if it was asked already, and whether it was.
        """
        checks, stagers = self.checks, self._stage_in
        store = stage.store if stage.call is not None else None
        j, n = first + 1, len(checks)
        if j == n or stagers[j] is None:  # the usual batch, one stage: a tuple (see enter)
            return (stage,), store, j, None, False
        stages = [stage]
        following: Stage | None = None
        asked = False
        while j < n:
            stager = stagers[j]
            if stager is None:
                break
            following = stager(ctx)
            if following is None or (
                following.call is not None and store is not None and following.store is not store
            ):
                asked = True
                break
            if store is None and following.call is not None:
                store = following.store
            stages.append(following)
            following = None
            j += 1
        return stages, store, j, following, asked

    async def _batch_unavailable(
        self, ctx: Context, tokens: list[Any], first: int, stages: Sequence[Stage], exc: Exception
    ) -> None:
        """A batch met an outage: each check with a call meets it on its own."""
        if isinstance(exc, Unanswered):  # the calls may have run
            _undo_all([s for s in stages if s.call is not None])
        # Each check with a call meets the outage on its own: its plain enter follows the
        # store's on_storage_error (the store now fails fast). One that decided without a
        # call (a prefetched permit) keeps its decision.
        for k, st in enumerate(stages, first):
            try:
                if st.call is None:
                    assert st.decide is not None
                    tokens.append(st.decide(None))
                else:
                    tokens.append(await self.checks[k].enter(ctx))
            except BaseException:
                # Refused (or cancelled): enter's handler gives back what the tokens hold;
                # the later checks that decided without a call took something already (a
                # prefetched permit), which no token holds yet: given back here.
                _undo_all([s for s in stages[k - first + 1 :] if s.call is None])
                raise

    def _decide_batch(
        self, ctx: Context, tokens: list[Any], first: int, stages: Sequence[Stage], replies: Any
    ) -> Coroutine[Any, Any, None] | None:
        """Hand a batch's replies to its checks, appending the tokens of those that
        admitted the call, in order.

        When one refuses (or its reply is an error), it raises, with ``tokens`` ending
        before the refusing check; or, if later checks of the batch took something,
        returns a coroutine that gives that back and then raises.
        """
        failure: BaseException | None = None
        later: list[tuple[int, Any]] = []
        answers = iter(replies)
        for k, st in enumerate(stages, first):
            reply = next(answers) if st.call is not None else None
            try:
                if isinstance(reply, BaseException):
                    raise reply
                assert st.decide is not None
                token = st.decide(reply)
            except BaseException as exc:
                if failure is None:
                    failure = exc
                continue
            if failure is None:
                tokens.append(token)
            else:
                later.append((k, token))
        if failure is None:
            return None
        if isinstance(failure, Blocked):
            ctx.blocked = failure
        else:
            ctx.error = failure
        if later:  # what checks after the failed one took: given back, latest first
            return self._give_back_then_raise(ctx, later, failure)
        raise failure

    async def _give_back_then_raise(
        self, ctx: Context, later: list[tuple[int, Any]], failure: BaseException
    ) -> None:
        taken: list[Any] = [None] * (later[-1][0] + 1)  # by check, as exits read
        for k, token in later:
            taken[k] = token
        # Staged like an unwind: one round trip, and cancelled it still gives back
        # everything, in a task of its own.
        await self._exits(ctx, taken, [k for k, _ in reversed(later)])
        raise failure

    async def exit(self, ctx: Context, tokens: Sequence[Any]) -> None:
        """Record the call's outcome and run every ``exit`` in reverse order
        (:meth:`exit_now`, awaited)."""
        if ctx.blocked is None:
            rest = self.exit_now(ctx, tokens)
            if rest is not None:
                await rest
            return
        # Blocked inside the endpoint (a nested guard answered for it): a refusal by
        # ymguard is neither a success nor an error of this resource.
        now = ctx.now = clock()
        rt_ms = (now - ctx.start) * 1000.0
        for finished in self._finished:  # bound like passed (see set_observers)
            finished(ctx, rt_ms, "blocked")
        await self._unwind(ctx, tokens)

    async def _exit_one(self, i: int, ctx: Context, token: Any) -> None:
        try:
            await self.checks[i].exit(ctx, token)
        except Exception:  # an exit must never turn a response into a 500
            log.exception("ymguard: exit of %r failed", self.checks[i])

    def _exits_now(
        self,
        ctx: Context,
        tokens: Sequence[Any],
        order: Sequence[int],
        start: int,
        batches: dict[int, tuple[Any, list[Any]]] | None,
    ) -> Coroutine[Any, Any, None] | None:
        """Run the exits of checks ``order[start:]`` as far as can be done without awaiting.

        A check's ``exit_now`` or ``exit_fast`` runs in its place; the store calls of
        staged exits are gathered in ``batches`` (by store) and go out together at the
        end, without waiting for their replies where the store can. Returns None when
        all is done, else a coroutine for the rest: from the first exit that must be
        awaited on (the batches go out after it), or the batches that must be awaited.
        """
        stagers, fast = self._stage_out, self._exit_fast
        for n in range(start, len(order)):
            i = order[n]
            stager = stagers[i]
            if stager is not None:
                try:
                    stage = stager(ctx, tokens[i])
                except Exception:
                    log.exception("ymguard: exit of %r failed", self.checks[i])
                    continue
                if stage is NOTHING:
                    continue
                if stage is not None:
                    if batches is None:
                        batches = {}
                    batch = batches.get(id(stage.store))
                    if batch is None:
                        batch = batches[id(stage.store)] = (stage.store, [])
                    batch[1].append(stage.call)
                    continue
            # Its exit_now or exit_fast, if it has one; else (or when exit_fast answers
            # AWAIT, having done nothing) its exit is awaited, and the rest after it.
            exit_now = fast[i]
            if exit_now is None:
                return self._exit_awaiting(ctx, tokens, order, n, batches)
            try:
                if exit_now(ctx, tokens[i]) is AWAIT:
                    return self._exit_awaiting(ctx, tokens, order, n, batches)
            except Exception:  # an exit must never turn a response into a 500
                log.exception("ymguard: exit of %r failed", self.checks[i])
        if batches:
            waiting = []
            for batch in batches.values():
                try:
                    if batch[0].send_many_detached(batch[1]):
                        continue
                except Exception:  # an exit must never turn a response into a 500
                    log.exception("ymguard: the exits of %s failed", self.resource)
                    continue
                waiting.append(batch)
            if waiting:
                return self._send_exits(waiting)
        return None

    async def _exit_awaiting(
        self,
        ctx: Context,
        tokens: Sequence[Any],
        order: Sequence[int],
        n: int,
        batches: dict[int, tuple[Any, list[Any]]] | None,
    ) -> None:
        """:meth:`_exits_now` from ``order[n]``, whose exit must be awaited, on.

        Cancelled while it awaits, it still runs the rest (and sends the batches), in a
        task of its own: what it skipped would otherwise stay held until its lease ends.
        """
        i = order[n]
        try:
            await self._exit_one(i, ctx, tokens[i])
        except asyncio.CancelledError:
            in_background(self._exits(ctx, tokens, order, n + 1, batches))
            raise
        await self._exits(ctx, tokens, order, n + 1, batches)

    async def _exits(
        self,
        ctx: Context,
        tokens: Sequence[Any],
        order: Sequence[int],
        start: int = 0,
        batches: dict[int, tuple[Any, list[Any]]] | None = None,
    ) -> None:
        """:meth:`_exits_now`, awaited to the end."""
        rest = self._exits_now(ctx, tokens, order, start, batches)
        if rest is not None:
            await rest

    async def _send_exits(self, batches: Sequence[tuple[Any, list[Any]]]) -> None:
        """Send each store's batch of exit calls (releases are idempotent: a batch that
        may not have gone out when the caller is cancelled is sent again, in the
        background)."""
        for n, (store, calls) in enumerate(batches):
            try:
                for reply in await store.run_many(calls, always_try=True):
                    if isinstance(reply, BaseException):  # an error reply: a bug, seen
                        log.error("ymguard: an exit of %s failed: %s", self.resource, reply)
            except asyncio.CancelledError:
                in_background(self._send_exits(batches[n:]))
                raise
            except StorageUnavailable:
                pass  # the leases free what could not be given back
            except Exception:
                log.exception("ymguard: the exits of %s failed", self.resource)

    async def _unwind(self, ctx: Context, tokens: Sequence[Any]) -> None:
        """Give back what the checks that admitted a blocked call took, the last first."""
        await self._exits(ctx, tokens, range(len(tokens) - 1, -1, -1))


def _hear_late(sent: asyncio.Future[Any], late: _LateReplies) -> None:
    """A batch whose caller was cancelled: its replies go to ``late``. If the cancel came
    first, the connection hands them over itself (``send_many_now``'s ``late``); here,
    those the future had already taken when the cancel reached its caller."""
    if sent.done() and not sent.cancelled() and sent.exception() is None:
        late.set_result(sent.result())


async def _for_late(
    running: Awaitable[list[Any]],
    late: _LateReplies,
    stages: Sequence[Stage],
    replies: list[Any] | None = None,
) -> list[Any]:
    """Await a batch's replies (``running``: ``store.run_many``, or ``store.mended`` of
    ``replies``) in a task of its own, which goes on if the caller is cancelled meanwhile:
    its end then gives back what the calls took and hands the replies to ``late``."""
    task = asyncio.ensure_future(running)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # Not before its end: a script it sends again would take a permit after its release.
        task.add_done_callback(functools.partial(_late_end, stages, replies, late))
        in_background(task)  # Guard.aclose waits for it
        raise


def _late_end(
    stages: Sequence[Stage],
    replies: list[Any] | None,
    late: _LateReplies,
    task: asyncio.Future[list[Any]],
) -> None:
    """The end of a cancelled caller's batch: its calls' takings given back, and the
    replies (or as far as mending got before an outage) handed to ``late``."""
    _undo_all(stages)
    if not task.cancelled() and task.exception() is None:
        replies = task.result()
    if replies is not None:
        late.set_result(replies)  # error replies in it are skipped


class _LateReplies:
    """The replies of a cancelled batch, handed to its stages' ``late`` (no task waits)."""

    __slots__ = ("stages",)

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = stages

    def set_result(self, replies: list[Any]) -> None:
        answers = iter(replies)
        for stage in self.stages:
            if stage.call is None:
                continue
            reply = next(answers, None)
            late = stage.late
            if late is None or reply is None or isinstance(reply, BaseException):
                continue
            try:
                late(reply)
            except Exception:
                log.exception("ymguard: a late reply could not be taken")


def _undo_all(stages: Sequence[Stage]) -> None:
    """Give back, in the background, what calls whose replies were not read may have taken."""
    for stage in stages:
        if stage.undo is not None:
            in_background(stage.undo())
