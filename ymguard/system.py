"""System protection: the ``system:`` section (Sentinel's ``SystemRule``), per process.

One :class:`SystemProtection` per guard watches every guarded inbound (HTTP) resource
together, as Sentinel's ``ENTRY_NODE`` does; code resources (``@guard.resource``) are
not inbound and are not counted. Its check runs first in every HTTP resource's chain
(after ``authority``) and refuses a request when:

* ``max_concurrency``: that many requests are in flight already (503 ``system-overloaded``);
* ``max_qps``: that many were admitted in the last second (429 ``flow-limited``, with the
  ``RateLimit`` headers of the policy ``system``);
* ``max_avg_rt_ms``: the mean response time of the last second is over it (503);
* ``max_cpu_usage`` without ``adaptive``: the process's CPU is over it (503);
* ``adaptive``: while the event loop lags more than ``max_loop_lag_ms`` (the asyncio
  analogue of Sentinel's load trigger), or CPU is over ``max_cpu_usage``, Sentinel's BBR
  check: a request is admitted only while the requests in flight are at most 1 or at most
  ``max_success_qps * min_rt_ms / 1000`` (the throughput the process has shown times its
  best response time: the work it can have in flight without queueing) (503).

Loop lag and CPU are measured by one timer task per event loop, not per request: every
:data:`TICK_SECONDS` it sleeps and notes how late it woke (the lag; the largest of the
last :data:`LAG_MEMORY_SECONDS` counts), and once a second it samples the process's CPU
time (``os.times``) over wall time: 1.0 is one core busy, which is all an event loop can
use.

Everything is in process: each process protects itself, whichever store the guard uses.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Any

from pydantic import Field, model_validator

from ._kind import Env, Kind
from ._model import HTTP_METHODS, RuleModel
from .chain import CheckStatus, Context, has_outcome
from .errors import Blocked, FlowLimited, Quota, SystemOverloaded

#: How often the timer task wakes to measure the loop's lag.
TICK_SECONDS = 0.1
#: How long a measured lag counts (the largest of this span is the current lag).
LAG_MEMORY_SECONDS = 2.0
#: How often the process's CPU usage is sampled.
CPU_SAMPLE_SECONDS = 1.0
#: The default ``max_loop_lag_ms`` of an adaptive rule.
DEFAULT_LOOP_LAG_MS = 50.0

_BUCKETS = 10
_BUCKET_SECONDS = 1.0 / _BUCKETS


class SystemRule(RuleModel):
    """The ``system:`` section of the rules file; every field may be left out."""

    max_concurrency: int | None = Field(None, ge=0, description="requests in flight")
    max_qps: int | None = Field(None, ge=0, description="requests admitted per second")
    max_avg_rt_ms: float | None = Field(None, gt=0, description="mean response time")
    max_cpu_usage: float | None = Field(None, ge=0, le=1, description="process CPU, 0..1")
    adaptive: bool = Field(False, description="BBR while the loop lags or CPU is high")
    max_loop_lag_ms: float = Field(
        DEFAULT_LOOP_LAG_MS, gt=0, description="adaptive: the event-loop lag that triggers it"
    )

    @model_validator(mode="after")
    def _lag_needs_adaptive(self) -> SystemRule:
        if "max_loop_lag_ms" in self.model_fields_set and not self.adaptive:
            raise ValueError("max_loop_lag_ms only triggers adaptive: set adaptive: true")
        return self


def process_cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used."""
    times = os.times()
    return times.user + times.system


class SystemProtection:
    """The process-wide statistics and triggers the ``system:`` section decides on.

    One per guard (``Guard.system``); :meth:`configure` swaps its rule on a reload and
    keeps its counts. Read by the :class:`SystemCheck` of every HTTP resource.

    Attributes:
        rule: the ``system:`` section, or None (no check is then compiled).
        inflight: guarded inbound requests in flight now.
        loop_lag_ms: the largest event-loop lag measured in the last
            :data:`LAG_MEMORY_SECONDS` (0 until the timer runs).
        cpu_usage: the process's CPU over the last sample, 0..1 (one core = 1).
    """

    def __init__(self, rule: SystemRule | None = None) -> None:
        self.rule = rule
        self.inflight = 0
        self.loop_lag_ms = 0.0
        self.cpu_usage = 0.0
        self._stamps = [-1] * _BUCKETS
        self._passed = [0] * _BUCKETS
        self._done = [0] * _BUCKETS
        self._rt = [0.0] * _BUCKETS
        self._min_rt = [math.inf] * _BUCKETS
        self._lags: list[tuple[float, float]] = []
        self._timer: asyncio.Task[None] | None = None

    def configure(self, rule: SystemRule | None) -> None:
        """Use ``rule`` from now on (a reload); the counts and the timer stay."""
        self.rule = rule

    @property
    def watches(self) -> bool:
        """Whether the rule needs the timer (loop lag or CPU)."""
        rule = self.rule
        return rule is not None and (rule.adaptive or rule.max_cpu_usage is not None)

    # -- the sliding second ------------------------------------------------------------

    def _slot(self, now: float) -> int:
        slot = int(now / _BUCKET_SECONDS)
        pos = slot % _BUCKETS
        if self._stamps[pos] != slot:
            self._stamps[pos] = slot
            self._passed[pos] = self._done[pos] = 0
            self._rt[pos] = 0.0
            self._min_rt[pos] = math.inf
        return slot

    def _live(self, now: float) -> list[int]:
        first = int(now / _BUCKET_SECONDS) - _BUCKETS + 1
        return [pos for pos in range(_BUCKETS) if self._stamps[pos] >= first]

    def passed_qps(self, now: float | None = None) -> int:
        """Requests admitted in the last second."""
        now = time.monotonic() if now is None else now
        return sum(self._passed[pos] for pos in self._live(now))

    def avg_rt_ms(self, now: float | None = None) -> float:
        """The mean response time of the requests that finished in the last second."""
        now = time.monotonic() if now is None else now
        live = self._live(now)
        done = sum(self._done[pos] for pos in live)
        return sum(self._rt[pos] for pos in live) / done if done else 0.0

    def max_success_qps(self, now: float | None = None) -> float:
        """The most requests finished in one bucket of the last second, per second."""
        now = time.monotonic() if now is None else now
        return max((self._done[pos] for pos in self._live(now)), default=0) * _BUCKETS

    def min_rt_ms(self, now: float | None = None) -> float:
        """The best response time of the last second (inf when none finished)."""
        now = time.monotonic() if now is None else now
        return min((self._min_rt[pos] for pos in self._live(now)), default=math.inf)

    def bbr_admits(self, now: float | None = None) -> bool:
        """Sentinel's BBR check: in flight <= 1 or <= max_success_qps * min_rt / 1000."""
        if self.inflight <= 1:
            return True
        qps = self.max_success_qps(now)
        # Nothing finished in the last second: no capacity shown, one call at a time.
        capacity = qps * self.min_rt_ms(now) / 1000.0 if qps > 0 else 0.0
        return not self.inflight > capacity

    def on_pass(self, now: float) -> int:
        """A request was admitted; returns the slot it was counted in."""
        slot = self._slot(now)
        self._passed[slot % _BUCKETS] += 1
        self.inflight += 1
        return slot

    def on_undo(self, slot: int) -> None:
        """A request this counted was blocked by a later check: it never ran."""
        self.inflight -= 1
        pos = slot % _BUCKETS
        if self._stamps[pos] == slot:
            self._passed[pos] -= 1

    def on_exit(self, now: float, rt_ms: float | None) -> None:
        """A request left; ``rt_ms`` when it finished with an outcome."""
        self.inflight -= 1
        if rt_ms is None:
            return
        pos = self._slot(now) % _BUCKETS
        self._done[pos] += 1
        self._rt[pos] += rt_ms
        if rt_ms < self._min_rt[pos]:
            self._min_rt[pos] = rt_ms

    # -- the timer ----------------------------------------------------------------------

    def ensure_timer(self) -> None:
        """Start the lag and CPU timer on the running loop if it does not run there."""
        timer = self._timer
        loop = asyncio.get_running_loop()
        if timer is not None and not timer.done():
            if timer.get_loop() is loop:
                return
            _cancel(timer)  # a timer of another (maybe closed) loop: this loop gets its own
        self._timer = loop.create_task(self._watch())

    def note_lag(self, lag_ms: float, now: float) -> None:
        """Record one measured lag (the timer does; tests may too)."""
        lags = [item for item in self._lags if item[0] > now - LAG_MEMORY_SECONDS]
        lags.append((now, lag_ms))
        self._lags = lags
        self.loop_lag_ms = max(lag for _, lag in lags)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        cpu_at, wall_at = process_cpu_seconds(), loop.time()
        while self.watches:
            start = loop.time()
            await asyncio.sleep(TICK_SECONDS)
            now = loop.time()
            self.note_lag(max(0.0, (now - start - TICK_SECONDS) * 1000.0), time.monotonic())
            if now - wall_at >= CPU_SAMPLE_SECONDS:
                cpu = process_cpu_seconds()
                self.cpu_usage = min(1.0, max(0.0, (cpu - cpu_at) / (now - wall_at)))
                cpu_at, wall_at = cpu, now
        self._timer = None

    async def aclose(self) -> None:
        """Stop the timer (it starts again with the next request that needs it)."""
        timer, self._timer = self._timer, None
        if timer is not None and not timer.done():
            _cancel(timer)
            if timer.get_loop() is asyncio.get_running_loop():
                await asyncio.gather(timer, return_exceptions=True)

    # -- the decision ------------------------------------------------------------------

    def refusal(self, resource: str, now: float) -> Blocked | None:
        """Why a new request of ``resource`` is refused now, or None."""
        rule = self.rule
        if rule is None:
            return None
        if rule.max_concurrency is not None and self.inflight >= rule.max_concurrency:
            return self._overloaded(resource, f"max_concurrency={rule.max_concurrency}")
        if rule.max_qps is not None and self.passed_qps(now) >= rule.max_qps:
            quota = Quota("system", rule.max_qps, 1.0, 0, 1.0)
            return FlowLimited(
                resource, f"system max_qps={rule.max_qps}", retry_after=1.0, quota=quota
            )
        if rule.max_avg_rt_ms is not None and self.avg_rt_ms(now) > rule.max_avg_rt_ms:
            return self._overloaded(resource, f"max_avg_rt_ms={rule.max_avg_rt_ms:g}")
        cpu_high = rule.max_cpu_usage is not None and self.cpu_usage > rule.max_cpu_usage
        if rule.adaptive:
            lagging = self.loop_lag_ms > rule.max_loop_lag_ms
            if (lagging or cpu_high) and not self.bbr_admits(now):
                why = "loop lag" if lagging else "cpu"
                return self._overloaded(resource, f"adaptive ({why})")
        elif cpu_high:
            return self._overloaded(resource, f"max_cpu_usage={rule.max_cpu_usage:g}")
        return None

    @staticmethod
    def _overloaded(resource: str, why: str) -> SystemOverloaded:
        return SystemOverloaded(resource, f"system {why}", retry_after=1.0)

    def status(self) -> dict[str, Any]:
        """What the protection sees now."""
        now = time.monotonic()
        return {
            "inflight": self.inflight,
            "qps": self.passed_qps(now),
            "avg_rt_ms": round(self.avg_rt_ms(now), 3),
            "loop_lag_ms": round(self.loop_lag_ms, 3),
            "cpu_usage": round(self.cpu_usage, 3),
        }


def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` from its own loop or another; a closed loop's task is left alone."""
    loop = task.get_loop()
    if loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is running:
        task.cancel()
    else:
        loop.call_soon_threadsafe(task.cancel)


class SystemCheck:
    """The system protection's place in one HTTP resource's chain."""

    kind = "system"

    def __init__(self, system: SystemProtection, resource: str) -> None:
        self.system = system
        self.resource = resource

    def __repr__(self) -> str:
        return f"SystemCheck({self.resource!r})"

    def status(self) -> CheckStatus:
        """The process-wide figures the protection decides on."""
        return CheckStatus("system", self.resource, "system", self.system.status())

    async def enter(self, ctx: Context) -> Any:
        system = self.system
        if system.watches:
            system.ensure_timer()
        now = time.monotonic()
        refusal = system.refusal(self.resource, now)
        if refusal is not None:
            raise refusal
        return system.on_pass(now)

    async def exit(self, ctx: Context, token: Any) -> None:
        system = self.system
        if ctx.blocked is not None:
            system.on_undo(token)
            return
        rt_ms = (time.perf_counter() - ctx.start) * 1000.0 if has_outcome(ctx) else None
        system.on_exit(time.monotonic(), rt_ms)


def is_inbound(resource: str) -> bool:
    """Whether ``resource`` names an HTTP route (``METHOD /path``), not a code resource."""
    method, _, path = resource.partition(" ")
    return method in HTTP_METHODS and path.startswith("/")


def _build(env: Env, resource: str, rule: Any) -> list[SystemCheck]:
    system = env.system
    if system is None or system.rule is None or not is_inbound(resource):
        return []
    return [SystemCheck(system, resource)]


#: The ``system`` kind's registry entry: not a field of a resource but of the file, so
#: ``build`` ignores its value and reads the guard's :class:`SystemProtection`.
KIND = Kind("system", 20, SystemRule, _build)

__all__ = [
    "KIND",
    "SystemCheck",
    "SystemProtection",
    "SystemRule",
    "is_inbound",
    "process_cpu_seconds",
]
