"""Flow rules beyond a plain reject: Sentinel's traffic shaping and flow strategies.

The checks that ``limiter.build_flow_checks`` picks for a ``flow`` rule whose behaviour is
not ``reject`` or whose strategy is not ``direct`` (see ``docs/rules.md``):

* ``behavior: warm_up`` -- :class:`WarmUpCheck`, Sentinel's ``WarmUpController``
  (:mod:`ymguard.backends.warmup`): a cold resource starts at ``qps / cold_factor`` and
  rises to ``qps`` over ``warm_up_seconds``; idle, it cools again.
* ``behavior: queue`` -- :class:`PacedCheck`, Sentinel's ``RateLimiterController``
  (:mod:`ymguard.backends.pacer`): calls pass ``1000 / qps`` ms apart; a call whose turn
  is more than ``max_queue_ms`` away is refused. The call ``await``\\ s its turn.
* ``behavior: warm_up_queue`` -- :class:`PacedCheck` with a warm-up curve (Sentinel's
  ``WarmUpRateLimiterController``): the spacing follows the warm-up rate.
* ``concurrency`` with ``behavior: queue`` -- :class:`QueuedConcurrencyCheck`: wait up to
  ``max_queue_ms`` for a slot, first come first served across processes (the permits'
  line of :mod:`ymguard.backends.permits`).
* ``strategy: relate`` -- :class:`RelateCheck`: the rule limits this resource by the
  calls per second of ``ref_resource`` (counted by a :class:`RefRecorder` in the
  referenced resource's chain, on the store: every process's calls count).
* ``strategy: chain`` -- :class:`ChainScoped`: the rule only applies to calls entered
  from ``ref_resource`` (a ``@guard.resource`` called inside that route, or nested deeper).

A waiter that leaves (its task cancelled, or its HTTP client gone while it waits) gives
its place back at once: it holds nothing afterwards. Each queued check keeps what the
wait was in ``ctx.extras["queue_wait"]``: ``(rule, seconds waited, result)`` with result
``acquired``, ``rejected`` or ``cancelled`` (for metrics: see :func:`record_wait`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from ._model import MAX_NUMBER
from .backends.pacer import MemoryPacer, Pacer, pacer_for
from .backends.pacer import ttl_ms as pacer_ttl_ms
from .backends.warmup import MemoryWarmUp, WarmUp, WarmUpCurve, warmup_for
from .backends.window import BUCKETS, Window
from .chain import Check, CheckStatus, Context, report_wait
from .errors import FlowLimited, Quota, SemaphoreFull, StorageBlocked, StorageUnavailable
from .limiter import FlowRule, OriginTable, _FlowCheckBase
from .semaphore import Permit, Semaphore
from .storage import Store
from .storage.tasks import finish, in_background
from .types import Message, Receive

T = TypeVar("T")

#: How a queued call's wait ended.
WaitResult = Literal["acquired", "rejected", "cancelled"]


def record_wait(ctx: Context, check: Any, seconds: float, result: WaitResult) -> None:
    """Report a queued call's wait: to the chain's observers and in ``ctx.extras``.

    The one place a shaping check reports a wait. Observers with a ``waited`` method (the
    metrics' ``ymguard.queue.duration``) hear it through :func:`~ymguard.chain.report_wait`;
    ``ctx.extras["queue_wait"]`` keeps ``(rule, seconds, result)`` for the endpoint.
    """
    if ctx.extras is None:
        ctx.extras = {}
    ctx.extras["queue_wait"] = (check.description, seconds, result)
    report_wait(ctx, check, seconds, result)


# -- waiting, and seeing the client leave -------------------------------------------------


def _replay(buffered: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that hands on ``buffered`` messages first, then reads ``receive``."""

    async def replayed() -> Message:
        if buffered:
            return buffered.pop(0)
        return await receive()

    return replayed


async def until_gone(
    ctx: Context,
    work: Awaitable[T],
    undo: Callable[[Any], Awaitable[Any]] | None = None,
) -> tuple[bool, T | None]:
    """Await ``work``; if the HTTP client disconnects first, cancel it.

    Returns ``(gone, result)``: ``(True, None)`` when the client left first. While it
    waits it reads the request's messages (a body, a disconnect) and hands them on to the
    app afterwards (``ctx.receive`` is replaced), so nothing is lost. A code resource
    (no ASGI scope) just awaits ``work``. If the caller is cancelled just as ``work``
    finished, ``undo`` gives back what it got (a permit nobody would release).
    """
    receive = ctx.receive
    if receive is None or ctx.scope is None:
        return False, await work
    task = asyncio.ensure_future(work)
    buffered: list[Message] = []

    async def read() -> bool:
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] == "http.disconnect":
                return True

    reader = asyncio.ensure_future(read())
    try:
        await asyncio.wait({task, reader}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and reader.done() and not reader.cancelled():
            if reader.exception() is None:  # the client went away
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                if not task.cancelled() and task.exception() is None:
                    return False, task.result()  # it finished meanwhile: keep it
                return True, None
        return False, await task
    except asyncio.CancelledError:
        if not task.done():
            task.cancel()
        elif undo is not None and not task.cancelled() and task.exception() is None:
            in_background(undo(task.result()))
        raise
    finally:
        if not reader.done():
            reader.cancel()
        elif not reader.cancelled():
            reader.exception()  # retrieved: a broken receive is the app's to see
        if buffered:
            ctx.receive = _replay(buffered, receive)


# -- behaviours ---------------------------------------------------------------------------


class _ShapedCheck(_FlowCheckBase):
    """What the warm-up and pacing checks share: a key per origin, a local fallback."""

    kind = "flow"
    #: A pass only gives back when a later check blocks the call.
    exit_after_call = False

    def __init__(
        self,
        store: Store,
        resource: str,
        index: int,
        rule: FlowRule,
        named: frozenset[str],
        identity: str | None,
        idle_seconds: float,
    ) -> None:
        super().__init__(store, resource, index, rule, named, identity)
        assert rule.qps is not None
        self.limit = rule.qps
        self.description += f" {rule.behavior}"
        self._default = store.key("flow", self.key_base)
        # Per origin suffix: its key. An entry idle past the state's time to live has
        # expired on Redis too: dropping it changes no answer.
        self._origins: OriginTable[str] = OriginTable(
            lambda suffix: store.key("flow", self.key_base, suffix),
            self._forget,
            idle_seconds=idle_seconds,
        )

    def _forget(self, key: str) -> None:
        raise NotImplementedError

    def _key(self, ctx: Context) -> str | None:
        suffix = self.scope.key_for(ctx.origin)
        if suffix is None:
            return None
        return self._origins.get(suffix) if suffix else self._default


class WarmUpCheck(_ShapedCheck):
    """``behavior: warm_up``: Sentinel's warm-up token bucket (see :mod:`.backends.warmup`)."""

    def __init__(
        self,
        store: Store,
        resource: str,
        index: int,
        rule: FlowRule,
        named: frozenset[str],
        identity: str | None = None,
    ) -> None:
        assert rule.qps is not None
        self.curve = WarmUpCurve(rule.qps, rule.warm_up_seconds, rule.cold_factor)
        super().__init__(store, resource, index, rule, named, identity, self.curve.ttl_ms / 1000.0)
        self.warmup: WarmUp = warmup_for(store)
        # In process the decision never waits: called without a coroutine.
        self._now = self.warmup.decide if isinstance(self.warmup, MemoryWarmUp) else None
        self._local: WarmUp | None = None

    def _forget(self, key: str) -> None:
        self.warmup.forget(key)
        if self._local is not None:
            self._local.forget(key)

    async def enter(self, ctx: Context) -> Any:
        """Pass the call if the warm-up curve allows it now, else :class:`FlowLimited`."""
        key = self._key(ctx)
        if key is None:
            return None
        warmup = self.warmup
        try:
            if self._now is not None:
                result = self._now(key, self.curve)
            else:
                result = await warmup.acquire(key, self.curve)
        except StorageUnavailable:
            if self._on_outage() == "open":
                return None
            warmup = self._local = self._local or warmup_for(self.store.local)
            result = await warmup.acquire(key, self.curve)
        if not result.admitted:
            wait = result.wait_seconds
            quota = Quota(self.policy_name, self.limit, 1.0, 0, wait)
            raise FlowLimited(self.resource, self.description, retry_after=wait, quota=quota)
        return (warmup, key, result.bucket)

    async def exit(self, ctx: Context, token: Any) -> None:
        """Give the pass back when a later check blocked the call."""
        if token is not None and ctx.blocked is not None:
            warmup, key, bucket = token
            with contextlib.suppress(StorageUnavailable):
                await warmup.refund(key, bucket)


class PacedCheck(_ShapedCheck):
    """``behavior: queue`` / ``warm_up_queue``: calls spaced ``1000 / rate`` ms apart.

    ``enter`` reserves the call's turn (one store call) and awaits it; a turn further than
    ``max_queue_ms`` away is refused with :class:`FlowLimited`. A waiter cancelled, or
    whose HTTP client leaves, gives its turn back before it goes.
    """

    def __init__(
        self,
        store: Store,
        resource: str,
        index: int,
        rule: FlowRule,
        named: frozenset[str],
        identity: str | None = None,
    ) -> None:
        assert rule.qps is not None
        self.curve: WarmUpCurve | None = None
        if rule.behavior == "warm_up_queue":
            self.curve = WarmUpCurve(rule.qps, rule.warm_up_seconds, rule.cold_factor)
        idle = pacer_ttl_ms(rule.qps, rule.max_queue_ms, self.curve) / 1000.0
        super().__init__(store, resource, index, rule, named, identity, idle)
        self.max_queue_ms = rule.max_queue_ms
        self.pacer: Pacer = pacer_for(store)
        # In process the reservation never waits: called without a coroutine.
        self._now = self.pacer.decide if isinstance(self.pacer, MemoryPacer) else None
        self._local: Pacer | None = None

    def _forget(self, key: str) -> None:
        self.pacer.forget(key)
        if self._local is not None:
            self._local.forget(key)

    async def enter(self, ctx: Context) -> Any:
        """Reserve the call's turn and wait for it, or raise :class:`FlowLimited`."""
        key = self._key(ctx)
        if key is None:
            return None
        pacer = self.pacer
        qps = self.limit
        try:
            if self._now is not None:
                turn = self._now(key, qps, self.max_queue_ms, self.curve)
            else:
                turn = await pacer.reserve(key, qps, self.max_queue_ms, self.curve)
        except StorageUnavailable:
            if self._on_outage() == "open":
                return None
            pacer = self._local = self._local or pacer_for(self.store.local)
            turn = await pacer.reserve(key, qps, self.max_queue_ms, self.curve)
        if not turn.admitted:
            record_wait(ctx, self, 0.0, "rejected")
            wait = turn.wait_seconds
            quota = Quota(self.policy_name, self.limit, 1.0, 0, wait)
            raise FlowLimited(self.resource, self.description, retry_after=wait, quota=quota)
        token = (pacer, key, turn.slot, turn.cost)
        if turn.wait_seconds <= 0:
            report_wait(ctx, self, 0.0, "acquired")  # its turn at once: waited 0 s
            return token
        try:
            gone, _ = await until_gone(ctx, asyncio.sleep(turn.wait_seconds))
        except asyncio.CancelledError:
            record_wait(ctx, self, turn.wait_seconds, "cancelled")
            if pacer is self.pacer and not self.store.available:
                in_background(self._give_back(token))  # never wait on a store that is down
            else:  # given back before the cancellation goes on (finish: even if cancelled again)
                await finish(self._give_back(token))
            raise
        if gone:
            record_wait(ctx, self, turn.wait_seconds, "cancelled")
            await self._give_back(token)
            raise FlowLimited(self.resource, f"{self.description} (the client left)")
        record_wait(ctx, self, turn.wait_seconds, "acquired")
        return token

    async def _give_back(self, token: tuple[Pacer, str, int, int]) -> None:
        pacer, key, slot, cost = token
        with contextlib.suppress(StorageUnavailable):
            await pacer.release(key, slot, cost, self.curve is not None)

    async def exit(self, ctx: Context, token: Any) -> None:
        """Give the turn back when a later check blocked the call."""
        if token is not None and ctx.blocked is not None:
            await self._give_back(token)


class _FlowQueue(Semaphore):
    """The permits of a ``concurrency`` rule, with the semaphore's first-come line.

    The same keys (``conc``) as a reject ``concurrency`` rule's count.
    """

    def __init__(self, name: str, permits: int, lease_seconds: float, store: Store) -> None:
        super().__init__(name, permits, lease_seconds, store)
        self._backend = store.permits(name, "conc")

    def _local_backend(self) -> Any:
        if self._local is None:
            self._local = self.store.local.permits(self.name, "conc")
        return self._local

    def busy(self) -> bool:
        """Whether calls hold or wait for its permits in process."""
        return self._backend.busy() or (self._local is not None and self._local.busy())

    def forget(self) -> None:
        """Free the in-process state (on Redis its keys expire)."""
        self._backend.forget()
        if self._local is not None:
            self._local.forget()


class QueuedConcurrencyCheck(_FlowCheckBase):
    """``concurrency`` with ``behavior: queue``: wait up to ``max_queue_ms`` for a slot.

    Waiters stand in one line across processes and are served first come, first served
    (the permits' line; a release wakes the next through pub/sub). A waiter cancelled or
    whose client leaves gives its place back; a holder's slot is leased, so a process that
    dies frees it.
    """

    kind = "flow"
    #: The middleware cancels a call whose client went away, so its slot comes back.
    release_on_disconnect = True

    def __init__(
        self,
        store: Store,
        resource: str,
        index: int,
        rule: FlowRule,
        named: frozenset[str],
        identity: str | None = None,
    ) -> None:
        super().__init__(store, resource, index, rule, named, identity)
        assert rule.concurrency is not None
        self.limit = rule.concurrency
        self.description += " queue"
        self.wait_seconds = rule.max_queue_ms / 1000.0
        self._default: _FlowQueue | None = None
        self._origins: OriginTable[_FlowQueue] = OriginTable(
            self._queue, _FlowQueue.forget, idle_seconds=1.0, busy=_FlowQueue.busy
        )

    def _queue(self, suffix: str) -> _FlowQueue:
        name = f"{self.key_base}:{suffix}" if suffix else self.key_base
        return _FlowQueue(name, self.limit, self.rule.lease_seconds, self.store)

    async def enter(self, ctx: Context) -> Any:
        """Take a slot, waiting in line up to ``max_queue_ms``, or raise :class:`FlowLimited`."""
        suffix = self.scope.key_for(ctx.origin)
        if suffix is None:
            return None
        if suffix:
            queue = self._origins.get(suffix)
        else:
            queue = self._default = self._default or self._queue("")
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            gone, permit = await until_gone(
                ctx, queue.acquire(self.wait_seconds), undo=Permit.release
            )
        except SemaphoreFull as exc:
            record_wait(ctx, self, loop.time() - started, "rejected")
            raise FlowLimited(
                self.resource, self.description, retry_after=exc.retry_after
            ) from None
        except StorageUnavailable:  # on_storage_error: closed
            raise StorageBlocked(self.resource, self.description, retry_after=1.0) from None
        except asyncio.CancelledError:
            record_wait(ctx, self, loop.time() - started, "cancelled")
            raise
        waited = loop.time() - started
        if gone or permit is None:
            record_wait(ctx, self, waited, "cancelled")
            raise FlowLimited(self.resource, f"{self.description} (the client left)")
        if self.wait_seconds > 0:
            record_wait(ctx, self, waited, "acquired")
        permit.keep_alive()
        return permit

    async def exit(self, ctx: Context, token: Any) -> None:
        """Give the slot back (the call finished, failed, or a later check blocked it)."""
        if token is not None:
            await token.release()


# -- strategies ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Relations:
    """The resources whose traffic ``relate`` rules count, for one store (see below)."""

    refs: frozenset[str] = frozenset()


def _relations(store: Store) -> _Relations:
    return store.keep("flow:relate", _Relations)


def note_relations(store: Store, resources: Mapping[str, Any]) -> None:
    """Note which resources ``relate`` rules count, before a rule set is compiled.

    The guard calls it with the resources of the rules it is about to compile: a resource
    named as ``ref_resource`` gets a :class:`RefRecorder` in its chain (whichever order
    the resources are compiled in), one that no rule names any more loses it.
    """
    refs = {
        rule.ref_resource
        for rules in resources.values()
        for rule in getattr(rules, "flow", ())
        if rule.strategy == "relate" and rule.ref_resource is not None
    }
    _relations(store).refs = frozenset(refs)


def ref_key(store: Store, resource: str) -> str:
    """The key of the calls per second of a resource that ``relate`` rules count."""
    return store.key("flowref", resource)


class _RefWindow:
    """The store's sliding window of one referenced resource, and its local fallback."""

    def __init__(self, store: Store, resource: str) -> None:
        self.store = store
        self.key = ref_key(store, resource)
        self.window: Window = store.window()
        self._local: Window | None = None

    def local(self) -> Window:
        if self._local is None:
            self._local = self.store.local.window()
        return self._local


class RefRecorder:
    """Counts a resource's passed calls on the store, for the ``relate`` rules naming it.

    In the chain of every resource some rule names as ``ref_resource`` (one sliding
    window of a second per resource, on the store: every process's calls count). A call
    that a later check blocks is taken back out, as Sentinel counts only passed calls.
    """

    kind = "flow"
    exit_after_call = False

    def __init__(self, store: Store, resource: str) -> None:
        self.resource = resource
        self.description = "relate: counts this resource's calls"
        self._ref = _RefWindow(store, resource)

    def __repr__(self) -> str:
        return f"RefRecorder({self.resource!r})"

    def status(self) -> CheckStatus:
        """What it counts for (the counts themselves live on the store)."""
        return CheckStatus("flow", self.resource, self.description, {})

    async def enter(self, ctx: Context) -> Any:
        """Count the call (never blocks)."""
        ref = self._ref
        window = ref.window
        try:
            result = await window.acquire(ref.key, MAX_NUMBER, 1.0)
        except StorageUnavailable:
            window = ref.local()
            result = await window.acquire(ref.key, MAX_NUMBER, 1.0)
        return (window, result.slot)

    async def exit(self, ctx: Context, token: Any) -> None:
        """Take the call back out when a later check blocked it."""
        if token is not None and ctx.blocked is not None:
            window, slot = token
            with contextlib.suppress(StorageUnavailable):
                await window.refund(self._ref.key, slot)


class RelateCheck(_FlowCheckBase):
    """``strategy: relate``: limit this resource by ``ref_resource``'s calls per second.

    Sentinel's relate strategy reads the referenced resource's node: a call passes iff
    ``ref passQps + 1 <= qps``. The referenced resource's calls are counted on the store
    by its :class:`RefRecorder`, so the calls of every process count. This resource's own
    calls are not counted against it.
    """

    kind = "flow"
    exit_after_call = False

    def __init__(
        self,
        store: Store,
        resource: str,
        index: int,
        rule: FlowRule,
        named: frozenset[str],
        identity: str | None = None,
    ) -> None:
        super().__init__(store, resource, index, rule, named, identity)
        assert rule.qps is not None and rule.ref_resource is not None
        self.limit = rule.qps
        self.ref_resource = rule.ref_resource
        self.description += f" relate {rule.ref_resource}"
        self._ref = _RefWindow(store, rule.ref_resource)
        self._origins: OriginTable[None] = OriginTable(lambda s: None, lambda e: None, 1.0)

    async def enter(self, ctx: Context) -> Any:
        """Pass the call iff ``ref_resource`` passed fewer than ``qps`` calls in the last second."""
        if self.scope.key_for(ctx.origin) is None:
            return None
        ref = self._ref
        # n = 0 against qps - 1: reads the count (nothing is added) and says when it fits.
        try:
            result = await ref.window.acquire(ref.key, self.limit - 1, 1.0, 0)
        except StorageUnavailable:
            if self._on_outage() == "open":
                return None
            result = await ref.local().acquire(ref.key, self.limit - 1, 1.0, 0)
        if not result.admitted:
            wait = max(result.wait_seconds, 1.0 / BUCKETS)
            quota = Quota(self.policy_name, self.limit, 1.0, 0, wait)
            raise FlowLimited(self.resource, self.description, retry_after=wait, quota=quota)
        return None

    async def exit(self, ctx: Context, token: Any) -> None:
        """Nothing to give back: this resource's calls were not counted."""


def entered_from(ctx: Context, resource: str) -> bool:
    """Whether the call was entered (directly or further down) from ``resource``."""
    parent = ctx.parent
    while parent is not None:
        if parent.resource == resource:
            return True
        parent = parent.parent
    return False


class ChainScoped:
    """``strategy: chain``: the rule's check, only for calls entered from ``ref_resource``.

    A ``@guard.resource`` called while a guarded route (or another code resource) runs
    has that call as its parent context; the rule applies when ``ref_resource`` is among
    its parents (Sentinel: the context's entrance), and lets every other call through.
    """

    kind = "flow"

    def __init__(self, check: Check, ref_resource: str) -> None:
        self.check = check
        self.ref_resource = ref_resource
        self.exit_after_call = getattr(check, "exit_after_call", True)
        self.release_on_disconnect = getattr(check, "release_on_disconnect", False)

    def __repr__(self) -> str:
        return f"ChainScoped({self.check!r}, from {self.ref_resource!r})"

    def status(self) -> object:
        """The wrapped check's status."""
        return self.check.status()

    async def enter(self, ctx: Context) -> Any:
        """The wrapped check's ``enter`` for calls from ``ref_resource``; else pass."""
        if not entered_from(ctx, self.ref_resource):
            return None
        return await self.check.enter(ctx)

    async def exit(self, ctx: Context, token: Any) -> None:
        """The wrapped check's ``exit`` if it entered."""
        if token is not None:
            await self.check.exit(ctx, token)


# -- build ----------------------------------------------------------------------------------


def build_shaped_check(
    store: Store,
    resource: str,
    index: int,
    rule: FlowRule,
    named: frozenset[str],
    identity: str,
    direct: Check | None = None,
) -> Check | None:
    """The check of a flow rule this module handles, or None for a direct reject rule.

    Args:
        direct: the plain check (``QpsCheck`` / ``ConcurrencyCheck``) of a reject rule,
            which ``strategy: chain`` wraps.
    """
    check: Check | None
    if rule.strategy == "relate":
        return RelateCheck(store, resource, index, rule, named, identity)
    if rule.behavior == "warm_up":
        check = WarmUpCheck(store, resource, index, rule, named, identity)
    elif rule.behavior in ("queue", "warm_up_queue") and rule.qps is not None:
        check = PacedCheck(store, resource, index, rule, named, identity)
    elif rule.behavior == "queue":
        check = QueuedConcurrencyCheck(store, resource, index, rule, named, identity)
    else:
        check = direct
    if rule.strategy == "chain" and check is not None:
        assert rule.ref_resource is not None
        return ChainScoped(check, rule.ref_resource)
    return check


def recorder_for(store: Store, resource: str) -> RefRecorder | None:
    """A :class:`RefRecorder` when ``relate`` rules count ``resource``'s traffic."""
    if resource in _relations(store).refs:
        return RefRecorder(store, resource)
    return None


__all__ = [
    "ChainScoped",
    "PacedCheck",
    "QueuedConcurrencyCheck",
    "RefRecorder",
    "RelateCheck",
    "WaitResult",
    "WarmUpCheck",
    "build_shaped_check",
    "entered_from",
    "note_relations",
    "record_wait",
    "recorder_for",
    "ref_key",
    "until_gone",
]
