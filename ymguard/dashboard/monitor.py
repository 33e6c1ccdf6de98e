"""What the dashboard shows, gathered from one guard (and, on Redis, the whole cluster).

One :class:`Monitor` per guard (:func:`monitor_of`): it observes the guard's chains with a
:class:`~ymguard.dashboard.series.SecondSeries`, runs the :class:`Reporter` on a Redis
store, and builds the snapshot that ``<mount>/api/snapshot`` answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
import weakref
from typing import TYPE_CHECKING, Any

from ..breaker import BreakerStatus
from ..chain import CheckStatus
from ..errors import StorageUnavailable
from ..storage.redis import RedisStore
from .reporter import PROCESS_TTL_SECONDS, Cluster, Reporter
from .series import (
    BLOCKED,
    ERRORS,
    FIELDS,
    HISTORY_SECONDS,
    PASSED,
    RT_MS,
    SUCCESS,
    Row,
    SecondSeries,
)

if TYPE_CHECKING:
    from ..guard import Guard

log = logging.getLogger("ymguard.dashboard")

#: The "per second" figures are the mean over this many whole seconds.
RATE_SECONDS = 10
#: A snapshot of more seconds than this is laid out in a worker thread.
_DENSE_IN_THREAD = 60

_monitors: weakref.WeakKeyDictionary[Guard, Monitor] = weakref.WeakKeyDictionary()


def monitor_of(guard: Guard) -> Monitor:
    """The guard's monitor, made (and observing its chains) on first use."""
    monitor = _monitors.get(guard)
    if monitor is None:
        monitor = _monitors[guard] = Monitor(guard)
    return monitor


async def stop_monitor(guard: Guard) -> None:
    """Stop the guard's reporter, if it has a monitor (``Guard.aclose`` calls this)."""
    monitor = _monitors.get(guard)
    if monitor is not None:
        await monitor.aclose()


def rules_digest(guard: Guard) -> str:
    """A short SHA-256 digest of the rules in force (the same rules give the same digest)."""
    data = guard.rules.model_dump(mode="json", by_alias=True)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def rules_version(guard: Guard) -> str:
    """The version of the rules in force: ``guard.rules_version``, else their digest."""
    version = getattr(guard, "rules_version", None)
    if version is not None:
        return str(version)
    digest = getattr(guard, "rules_digest", None)
    return digest if isinstance(digest, str) else rules_digest(guard)


class Monitor:
    """The dashboard's view of one guard: its history, its reporter, its snapshot."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.series = SecondSeries(on_call=self.ensure_reporting)
        self.cluster = Cluster(guard.store) if isinstance(guard.store, RedisStore) else None
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started_at = time.time()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reporter: Reporter | None = None
        self._digest: tuple[object, str] | None = None
        guard.observe(self.series)

    # -- reporting ------------------------------------------------------------------------

    def ensure_reporting(self) -> None:
        """Report from the running loop (on Redis): one reporter per guard, on its last loop.

        Called with every call the guard sees, so the usual case is one comparison. A
        guard used from a new loop (a test's next event loop) moves its reporter there;
        the reporter keeps its id and what it has sent, so nothing is counted twice.
        """
        if self.cluster is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop: the next call on one starts it
            return
        if loop is self._loop:
            return
        self._loop = loop
        if self._reporter is None:
            self._reporter = Reporter(self.guard, self.series, self.cluster, self.describe)
        self._reporter.start()

    async def aclose(self) -> None:
        """Stop reporting (a later call starts it again)."""
        reporter, self._loop = self._reporter, None
        if reporter is not None:
            await reporter.stop()

    def rules_version(self) -> tuple[str, str]:
        """The version of the rules in force and their digest.

        The guard's own ``rules_version`` and ``rules_digest`` when it has them (rules at
        run time), else :func:`rules_digest` for both (kept until the rules change).
        """
        guard = self.guard
        digest = getattr(guard, "rules_digest", None)
        if not isinstance(digest, str):
            rules = guard.rules
            if self._digest is None or self._digest[0] is not rules:
                self._digest = (rules, rules_digest(guard))
            digest = self._digest[1]
        version = getattr(guard, "rules_version", None)
        return (str(version) if version is not None else digest), digest

    @property
    def process_id(self) -> str:
        """This process's id in the cluster's reports ("" before it reports)."""
        return self._reporter.id if self._reporter is not None else ""

    def describe(self) -> dict[str, Any]:
        """What this process reports about itself."""
        guard = self.guard
        inflight = sum(
            guard.stats(r).inflight for r in {*guard.rules.resources, *self.series.resources}
        )
        breakers = {
            b.name: {
                "state": b.state,
                "passed": b.counts.passed,
                "blocked": b.counts.blocked,
                "success": b.counts.success,
                "errors": b.counts.errors,
            }
            for b in guard.breakers()
        }
        return {
            "host": self.host,
            "pid": self.pid,
            "started_at": self.started_at,
            "rules_version": self.rules_version()[0],
            "store": guard.store.kind,
            "inflight": inflight,
            "breakers": breakers,
        }

    # -- the snapshot ---------------------------------------------------------------------

    async def snapshot(self, since: int | None = None) -> dict[str, Any]:
        """Everything the dashboard shows, as JSON-ready data.

        Args:
            since: only the seconds after this one (epoch seconds) in ``series`` (the page
                asks for what it has not seen yet); by default the whole 15 minutes. The
                last :data:`RATE_SECONDS` + 2 seconds always come along, as figures of
                other processes may still arrive for them.
        """
        if self.cluster is not None:
            self.ensure_reporting()
        last = self.series.second()  # the current second too (it fills up; asked again)
        oldest = last - HISTORY_SECONDS + 1
        first = oldest if since is None else max(oldest, min(since + 1, last - RATE_SECONDS - 2))
        processes: list[dict[str, Any]]
        cluster_error = None
        rows: dict[int, dict[str, Row]]
        if self.cluster is not None:
            try:
                _, processes, rows = await self.cluster.read(first, last)
            except StorageUnavailable as exc:
                cluster_error = f"the store does not answer ({exc}): this process only"
                processes, rows = [self._this_process()], self.series.rows(first, last)
        else:
            processes, rows = [self._this_process()], self.series.rows(first, last)
        for process in processes:
            process["this"] = process.get("id") == self.process_id or self.cluster is None
        processes.sort(key=lambda p: (p.get("host", ""), p.get("pid", 0)))

        names = sorted({*self.guard.rules.resources, *self.series.resources, *_names(rows)})
        if last - first > _DENSE_IN_THREAD:  # a whole window: keep the loop free meanwhile
            series = await asyncio.to_thread(_dense, names, rows, first, last)
        else:
            series = _dense(names, rows, first, last)
        return {
            "generated_at": time.time(),
            "store": self.guard.store.kind,
            "cluster": self.cluster is not None and cluster_error is None,
            "cluster_error": cluster_error,
            "rules": self._rules(),
            "processes": processes,
            "resources": [
                _resource(name, series["resources"][name], whole=since is None) for name in names
            ],
            "series": series,
            "breakers": self._breakers(processes),
            "semaphores": await self._semaphores(),
        }

    def _this_process(self) -> dict[str, Any]:
        return {**self.describe(), "id": self.process_id or f"{self.host}/{self.pid}"}

    def _rules(self) -> dict[str, Any]:
        by_resource: dict[str, list[dict[str, str]]] = {}
        for status in self.guard.status():
            if isinstance(status, CheckStatus):
                entry = {"kind": status.kind, "rule": status.rule}
                resource = status.resource
            elif isinstance(status, BreakerStatus):
                threshold = _number(status.threshold)
                entry = {
                    "kind": "breaker",
                    "rule": f"{status.name} {status.strategy} threshold={threshold}",
                }
                resource = status.resource
            else:
                continue
            by_resource.setdefault(resource, []).append(entry)
        version, digest = self.rules_version()
        return {"version": version, "digest": digest, "resources": by_resource}

    def _breakers(self, processes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for b in self.guard.breakers():
            counts = {"passed": 0, "blocked": 0, "success": 0, "errors": 0}
            states: dict[str, int] = {}
            reported = [p.get("breakers", {}).get(b.name) for p in processes]
            if any(reported):
                for r in reported:
                    if isinstance(r, dict):
                        for k in counts:
                            counts[k] += int(r.get(k, 0))
                        states[str(r.get("state"))] = states.get(str(r.get("state")), 0) + 1
            else:
                counts = {
                    "passed": b.counts.passed,
                    "blocked": b.counts.blocked,
                    "success": b.counts.success,
                    "errors": b.counts.errors,
                }
                states = {b.state: 1}
            out.append(
                {
                    "name": b.name,
                    "resource": b.resource,
                    "strategy": b.strategy,
                    "state": b.state,
                    "states": states,
                    "threshold": b.threshold,
                    "retry_after": b.retry_after,
                    **counts,
                }
            )
        return out

    async def _semaphores(self) -> list[dict[str, Any]]:
        users: dict[str, list[str]] = {}
        for status in self.guard.status():
            if isinstance(status, CheckStatus) and status.kind == "semaphore":
                users.setdefault(str(status.state["name"]), []).append(status.resource)
        out = []
        for name, resources in sorted(users.items()):
            sem = self.guard.semaphore(name)
            entry: dict[str, Any] = {
                "name": name,
                "resources": sorted(resources),
                "permits": sem.permits,
                "held": None,
                "available": None,
                "waiting": None,
            }
            try:
                entry["held"] = await sem.held()
                entry["available"] = await sem.available()
                entry["waiting"] = await sem.waiting()
                entry["permits"] = sem.permits
            except StorageUnavailable:
                pass
            out.append(entry)
        return out


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _names(rows: dict[int, dict[str, Row]]) -> set[str]:
    return {name for by_resource in rows.values() for name in by_resource}


def _dense(
    names: list[str], rows: dict[int, dict[str, Row]], first: int, last: int
) -> dict[str, Any]:
    span = max(0, last - first + 1)
    resources: dict[str, dict[str, list[float]]] = {
        name: {field: [0] * span for field in FIELDS} for name in names
    }
    counts = FIELDS[:RT_MS]
    for second, by_resource in rows.items():
        i = second - first
        if not 0 <= i < span:
            continue
        for name, row in by_resource.items():
            columns = resources.get(name)
            if columns is None:
                continue
            for column, field in enumerate(counts):
                if row[column]:
                    columns[field][i] = int(row[column])
            if row[RT_MS]:
                columns["rt_ms"][i] = round(row[RT_MS], 3)
    return {"first": first, "last": last, "resources": resources}


def _resource(name: str, columns: dict[str, list[float]], *, whole: bool) -> dict[str, Any]:
    """One resource's current rates (and, over the whole window, its totals)."""
    span = len(columns["passed"])
    # The last two seconds may still be partial (a report arrives just after its second).
    lo, hi = max(0, span - 2 - RATE_SECONDS), max(0, span - 2)
    sums = [sum(columns[field][lo:hi]) for field in FIELDS]
    seconds = max(1, hi - lo)
    completed = sums[SUCCESS] + sums[ERRORS]
    out: dict[str, Any] = {
        "name": name,
        "per_second": {
            "passed": round(sums[PASSED] / seconds, 2),
            "blocked": round(sums[BLOCKED] / seconds, 2),
            "errors": round(sums[ERRORS] / seconds, 2),
        },
        "avg_rt_ms": round(sums[RT_MS] / completed, 2) if completed else None,
    }
    if whole:
        totals = [sum(columns[field]) for field in FIELDS]
        done = totals[SUCCESS] + totals[ERRORS]
        out["total"] = {
            "passed": int(totals[PASSED]),
            "blocked": int(totals[BLOCKED]),
            "success": int(totals[SUCCESS]),
            "errors": int(totals[ERRORS]),
            "avg_rt_ms": round(totals[RT_MS] / done, 2) if done else None,
        }
    return out


__all__ = ["PROCESS_TTL_SECONDS", "Monitor", "monitor_of", "rules_digest", "rules_version"]
