"""Per-second figures of every resource over the last 15 minutes: the dashboard's history.

:class:`SecondSeries` is a chain observer (``guard.observe``) that adds each call to the
row of the wall-clock second it happened in. Each resource has a ring of
:data:`HISTORY_SECONDS` rows, so memory is bounded by ``HISTORY_SECONDS x resources``, and
resources themselves are capped at :data:`MAX_RESOURCES` (they come from the rules and the
app's routes, never from client input, so the cap is a safety net only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..chain import Check, Context, Outcome
    from ..errors import Blocked

log = logging.getLogger("ymguard.dashboard")

#: How many seconds of history are kept (the dashboard's charts span this).
HISTORY_SECONDS = 900
#: The most resources the series keeps; calls of further resources are not charted.
MAX_RESOURCES = 512

#: A store clock this close to the one followed (seconds) is not followed further.
ALIGN_TOLERANCE = 0.25

#: The columns of one second's row.
FIELDS = ("passed", "blocked", "success", "errors", "rt_ms")
PASSED, BLOCKED, SUCCESS, ERRORS, RT_MS = range(len(FIELDS))
_ZEROS = (0.0,) * len(FIELDS)

#: One second's figures of one resource: ``[passed, blocked, success, errors, rt_ms]``.
Row = list[float]


class _Ring:
    """The last :data:`HISTORY_SECONDS` rows of one resource, reset lazily."""

    __slots__ = ("rows", "stamps")

    def __init__(self) -> None:
        self.stamps = [-1] * HISTORY_SECONDS
        self.rows: list[Row] = [[0.0] * len(FIELDS) for _ in range(HISTORY_SECONDS)]

    def row(self, second: int) -> Row:
        pos = second % HISTORY_SECONDS
        row = self.rows[pos]
        if self.stamps[pos] != second:
            self.stamps[pos] = second
            row[:] = _ZEROS
        return row

    def get(self, second: int) -> Row | None:
        pos = second % HISTORY_SECONDS
        return self.rows[pos] if self.stamps[pos] == second else None


class SecondSeries:
    """Per-resource, per-second counts of the calls this process saw (a chain observer).

    Seconds are wall-clock epoch seconds shifted by :attr:`offset` (the Redis server's
    clock minus ours, when a reporter measured it), so that the seconds of several
    processes line up when their figures are summed.

    Args:
        clock: wall-clock seconds (``time.time``); tests may pass their own.
        on_call: called on the event loop with every call seen (starts the reporter).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        on_call: Callable[[], None] | None = None,
    ) -> None:
        self._clock = clock
        self._rings: dict[str, _Ring] = {}
        self._on_call = on_call
        self._warned = False
        #: Seconds added to the local clock: the store's clock minus ours.
        self.offset = 0.0
        #: The first second this series recorded (or could have recorded).
        self.started = self.second()

    def second(self) -> int:
        """The current second on the (store-aligned) clock."""
        return int(self._clock() + self.offset)

    def now(self) -> float:
        """The current time on the (store-aligned) clock, in seconds."""
        return self._clock() + self.offset

    def align(self, server_time: float) -> None:
        """Follow the store's clock (``server_time``, epoch seconds, read just now).

        Small differences (a round trip) are ignored, so seconds do not jitter.
        """
        offset = server_time - self._clock()
        if abs(offset - self.offset) > ALIGN_TOLERANCE:
            self.offset = offset

    def _row(self, resource: str) -> Row | None:
        ring = self._rings.get(resource)
        if ring is None:
            if len(self._rings) >= MAX_RESOURCES:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "ymguard dashboard: more than %d resources; %r and later ones are "
                        "not charted",
                        MAX_RESOURCES,
                        resource,
                    )
                return None
            ring = self._rings[resource] = _Ring()
        second = int(self._clock() + self.offset)  # ring.row(second), inlined: every call
        pos = second % HISTORY_SECONDS
        row = ring.rows[pos]
        if ring.stamps[pos] != second:
            ring.stamps[pos] = second
            row[:] = _ZEROS
        return row

    # -- the chain's observer -------------------------------------------------------------

    def passed(self, ctx: Context) -> None:
        """A call passed every check."""
        if self._on_call is not None:
            self._on_call()
        row = self._row(ctx.resource)
        if row is not None:
            row[PASSED] += 1

    def blocked(self, ctx: Context, error: Blocked, check: Check) -> None:
        """A check refused a call."""
        if self._on_call is not None:
            self._on_call()
        row = self._row(ctx.resource)
        if row is not None:
            row[BLOCKED] += 1

    def finished(self, ctx: Context, rt_ms: float, outcome: Outcome) -> None:
        """A call that passed finished: successes and errors count, with their time."""
        if outcome == "success" or outcome == "error":
            row = self._row(ctx.resource)
            if row is not None:
                row[ERRORS if outcome == "error" else SUCCESS] += 1
                row[RT_MS] += rt_ms

    def __getattr__(self, name: str) -> Callable[..., None]:
        # Observer hooks added later (queue waits, shadow blocks) are not charted here:
        # any hook the chain calls that this class does not define does nothing.
        if name.startswith("_"):
            raise AttributeError(name)
        return _ignore

    # -- reading --------------------------------------------------------------------------

    @property
    def resources(self) -> list[str]:
        """The resources that have figures, in the order they were first seen."""
        return list(self._rings)

    def rows(self, first: int, last: int) -> dict[int, dict[str, Row]]:
        """The non-empty rows of seconds ``first..last`` (inclusive), by second and resource.

        Seconds older than :data:`HISTORY_SECONDS` are gone and left out.
        """
        first = max(first, self.second() - HISTORY_SECONDS + 1)
        out: dict[int, dict[str, Row]] = {}
        for resource, ring in list(self._rings.items()):
            for second in range(first, last + 1):
                row = ring.get(second)
                if row is not None and any(row):
                    out.setdefault(second, {})[resource] = list(row)
        return out


def _ignore(*args: object, **kwargs: object) -> None:
    """An observer hook this series does not use."""


def add_rows(total: dict[str, Row], rows: Iterable[tuple[str, Row]]) -> None:
    """Add ``rows`` (resource, row) into ``total`` (for summing processes or seconds)."""
    for resource, row in rows:
        acc = total.get(resource)
        if acc is None:
            total[resource] = list(row)
        else:
            for i, value in enumerate(row):
                acc[i] += value
