"""Cluster-wide figures through Redis: each process reports once a second, the dashboard sums.

Every process whose guard serves a dashboard runs one :class:`Reporter` task per event
loop. Once a second it sends, in one atomic script (``report.lua``):

* the figures of the seconds that ended since its last report, added into one hash per
  second shared by the whole cluster (``prefix:{dash:cluster}:s:<epoch second>``, a field
  per resource and figure, expiring after :data:`SERIES_TTL_SECONDS`);
* its description (host, pid, rules version, in-flight calls, breakers) under its own key,
  expiring after :data:`PROCESS_TTL_SECONDS`, and its id in the index of processes: a
  process that dies vanishes from the dashboard within that TTL.

The fields are bounded by the resources the process guards (its rules and routes), the
keys by the 15 minutes of history: nothing in them comes from client input. Seconds are
counted on the Redis server's clock (each report returns ``TIME``), so the seconds of
processes on several hosts line up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StorageUnavailable
from ..storage.redis import RedisStore, Unanswered
from ..storage.tasks import stopped
from .series import FIELDS, HISTORY_SECONDS, Row, SecondSeries

if TYPE_CHECKING:
    from ..guard import Guard

log = logging.getLogger("ymguard.dashboard")

#: A process that has not reported for this long is gone from the dashboard.
PROCESS_TTL_SECONDS = 5.0
#: How long a second's cluster-wide figures are kept in Redis.
SERIES_TTL_SECONDS = HISTORY_SECONDS + 60
#: How often a process reports.
REPORT_INTERVAL_SECONDS = 1.0
#: Seconds that could not be sent are kept for a retry for at most this long.
MAX_BACKLOG_SECONDS = 60

_HERE = Path(__file__).parent
_REPORT = (_HERE / "report.lua").read_text(encoding="utf-8")
_READ = (_HERE / "read.lua").read_text(encoding="utf-8")


def process_id() -> str:
    """An id for this process, unique in the cluster: ``host/pid/random``."""
    host = socket.gethostname()[:64] or "host"
    return f"{host}/{os.getpid()}/{secrets.token_hex(3)}"


def encode_rows(rows: Mapping[str, Row]) -> str:
    """One second's rows as the script's flat JSON ``[field, increment, ...]``."""
    flat: list[Any] = []
    for resource, row in rows.items():
        for name, value in zip(FIELDS, row, strict=True):
            if value:
                flat.append(f"{resource}\n{name}")
                flat.append(round(value, 3) if name == "rt_ms" else int(value))
    return json.dumps(flat, ensure_ascii=False, separators=(",", ":"))


#: Where a hash field goes: (resource, column), or None for a field of no known figure.
FieldNames = dict[Any, tuple[str, int] | None]


def _field(name: Any) -> tuple[str, int] | None:
    text = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else str(name)
    resource, _, figure = text.rpartition("\n")
    return (resource, FIELDS.index(figure)) if figure in FIELDS else None


def decode_hash(flat: list[Any], names: FieldNames | None = None) -> dict[str, Row]:
    """A second's hash (``HGETALL``, flat) as rows by resource.

    Args:
        flat: field, value, field, value, ...
        names: field names already decoded (the same few recur in every second's hash).
    """
    names = {} if names is None else names
    rows: dict[str, Row] = {}
    for i in range(0, len(flat) - 1, 2):
        key = flat[i]
        where = names.get(key)
        if where is None:
            if key in names:  # a field of no known figure
                continue
            where = names[key] = _field(key)
            if where is None:
                continue
        row = rows.get(where[0])
        if row is None:
            row = rows[where[0]] = [0.0] * len(FIELDS)
        row[where[1]] += float(flat[i + 1])
    return rows


#: A read of more seconds than this is decoded in a worker thread.
_DECODE_IN_THREAD = 60


def _decode_all(seconds: list[int], hashes: list[list[Any]]) -> dict[int, dict[str, Row]]:
    names: FieldNames = {}
    return {s: decode_hash(h, names) for s, h in zip(seconds, hashes, strict=True) if h}


class Cluster:
    """The keys of the cluster's reports on one Redis store (reading and writing)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.index = store.key("dash", "cluster", "procs")
        self._report = store.script(_REPORT)
        self._read = store.script(_READ)

    def second_key(self, second: int) -> str:
        """The hash of one second's cluster-wide figures."""
        return self.store.key("dash", "cluster", f"s:{second}")

    def process_key(self, pid: str) -> str:
        """The key of one process's description."""
        return self.store.key("dash", "cluster", f"p:{pid}")

    async def report(
        self, pid: str, description: Mapping[str, Any], seconds: Mapping[int, Mapping[str, Row]]
    ) -> float:
        """Send one report; returns the Redis server's time (epoch seconds)."""
        ordered = sorted(seconds)
        keys = [self.index, self.process_key(pid), *(self.second_key(s) for s in ordered)]
        args: list[Any] = [
            pid,
            json.dumps(description, ensure_ascii=False, separators=(",", ":")),
            int(PROCESS_TTL_SECONDS * 1000),
            SERIES_TTL_SECONDS,
            *(encode_rows(seconds[s]) for s in ordered),
        ]
        sec, usec = await self.store.run(self._report, keys, args)
        return int(sec) + int(usec) / 1e6

    async def read(
        self, first: int, last: int
    ) -> tuple[float, list[dict[str, Any]], dict[int, dict[str, Row]]]:
        """The server time, the live processes, and the figures of seconds ``first..last``."""
        seconds = list(range(first, last + 1))
        keys = [self.index, *(self.second_key(s) for s in seconds)]
        (sec, usec), ids, hashes = await self.store.run(
            self._read, keys, [int(PROCESS_TTL_SECONDS * 1000)]
        )
        processes: list[dict[str, Any]] = []
        if ids:
            found = await self.store.call("MGET", *(self.process_key(_text(i)) for i in ids))
            for raw in found or ():
                if raw:
                    with contextlib.suppress(ValueError):
                        processes.append(json.loads(raw))
        if len(seconds) > _DECODE_IN_THREAD:  # a whole window: keep the loop free meanwhile
            rows = await asyncio.to_thread(_decode_all, seconds, hashes)
        else:
            rows = _decode_all(seconds, hashes)
        return int(sec) + int(usec) / 1e6, processes, rows


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


class Reporter:
    """Reports a guard's per-second figures to its Redis store from one event loop.

    Args:
        guard: the guard whose calls the series counts.
        series: the guard's :class:`SecondSeries`.
        describe: what this process says about itself (merged into each report).
    """

    def __init__(
        self,
        guard: Guard,
        series: SecondSeries,
        cluster: Cluster,
        describe: Callable[[], dict[str, Any]],
    ) -> None:
        self.guard = guard
        self.series = series
        self.cluster = cluster
        self.describe = describe
        self.id = process_id()
        # Seconds up to this one were sent (or given up on).
        self._sent_through = series.started - 1
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Report from the running loop; a task still running on another loop is cancelled."""
        loop = asyncio.get_running_loop()
        old = self._task
        if old is not None and not old.done():
            if old.get_loop() is loop:
                return
            if not old.get_loop().is_closed():
                old.get_loop().call_soon_threadsafe(old.cancel)
        self._task = loop.create_task(self._run())

    async def stop(self) -> None:
        """Stop the task (also from another loop)."""
        task, self._task = self._task, None
        if task is not None:
            await stopped([task])

    async def _run(self) -> None:
        while True:
            # Just after a second boundary, so each report carries whole seconds.
            now = self.series.now()
            await asyncio.sleep(REPORT_INTERVAL_SECONDS - (now % 1.0) + 0.05)
            try:
                await self.report_once()
            except asyncio.CancelledError:
                raise
            except StorageUnavailable:
                pass  # the store logs its outages once; the next second tries again
            except Exception:
                log.exception("ymguard dashboard: a report failed")

    async def report_once(self) -> None:
        """Send the seconds that ended since the last report, and this process's description."""
        last = self.series.second() - 1
        first = max(self._sent_through + 1, last - MAX_BACKLOG_SECONDS + 1)
        seconds = self.series.rows(first, last) if first <= last else {}
        description = {**self.describe(), "id": self.id, "reported_at": time.time()}
        try:
            server_time = await self.cluster.report(self.id, description, seconds)
        except Unanswered:
            # It may have been applied: sending it again could count it twice.
            self._sent_through = last
            raise
        self._sent_through = last
        self.series.align(server_time)
