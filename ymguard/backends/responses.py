"""Kept responses: Idempotency-Key records, in flight under a lease, then done.

On Redis one hash per key and one Lua call per state change (``responses_*.lua``); the
memory store keeps a record per key and sweeps expired ones now and then.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from ..types import Receive, Scope, Send
from ._lua import lua
from .tokens import SWEEP_BATCH, sweep

if TYPE_CHECKING:
    from ..storage.memory import MemoryStore
    from ..storage.redis import RedisStore


@dataclass(frozen=True, slots=True)
class KeptResponse:
    """A finished response kept under an idempotency key.

    Attributes:
        status: the HTTP status.
        headers: the kept headers (lower-case names), in order.
        body: the body, byte for byte; empty when ``kept`` is False.
        kept: False when the response was too large or not storable: only its status is
            known, and retries get :class:`IdempotencyResponseNotKept`.
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    kept: bool = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Replay the response, marked ``Idempotent-Replayed: true``."""
        headers = [
            *self.headers,
            (b"content-length", str(len(self.body)).encode()),
            (b"idempotent-replayed", b"true"),
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def _encode_headers(headers: list[tuple[bytes, bytes]]) -> str:
    return json.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers])


def _decode_headers(raw: bytes | str) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in json.loads(raw)]


@dataclass(frozen=True, slots=True)
class Begun:
    """What :meth:`begin` found under a key.

    Attributes:
        state: ``new`` (the lease is ours), ``mismatch`` (another fingerprint),
            ``in_flight`` (another holder's lease), or ``done``.
        lease_left: seconds left on another holder's lease (``in_flight``).
        response: the kept response (``done``).
    """

    state: Literal["new", "mismatch", "in_flight", "done"]
    lease_left: float = 0.0
    response: KeptResponse | None = None


@dataclass(slots=True)
class Record:
    fp: str
    expires_at: float
    lease: str | None = None
    response: KeptResponse | None = None


#: Most idempotency records kept in process per idempotent resource (the memory store;
#: on Redis, what this process holds while Redis is down). Past it new keys are refused
#: with 503 and ``Retry-After`` (keys already known are still answered). Each is about
#: 900 bytes plus its kept body.
MAX_LOCAL_RECORDS = 100_000
#: Most bytes of kept response bodies per idempotent resource in process; past it new
#: keys are refused (503), and a response that would cross it is kept as its status only.
MAX_KEPT_BYTES = 64 << 20


class KeptResponses(Protocol):
    """Idempotency records on one store: begin (take the lease), renew, complete, abort."""

    def refuses(self, key: str) -> float | None:
        """Seconds to wait if a new ``key`` is refused (a bound in process), else None."""

    async def begin(self, key: str, fp: str, lease_id: str, lease: float) -> Begun:
        """Look ``key`` up and, if it is new, take its in-flight lease."""

    async def renew(self, key: str, lease_id: str, lease: float) -> bool:
        """Extend the in-flight lease ``lease_id`` holds; whether it still held it."""

    async def complete(
        self,
        key: str,
        lease_id: str,
        fp: str,
        response: KeptResponse,
        ttl: float,
        *,
        always_try: bool = False,
    ) -> bool:
        """Keep ``response`` under ``key`` for ``ttl`` seconds; whether the lease was ours."""

    async def abort(self, key: str, lease_id: str, *, always_try: bool = False) -> bool:
        """Free the key for a retry; whether the lease was ours."""


@dataclass(slots=True)
class Records:
    """One idempotent resource's records in process, each kind in expiry order.

    One rule has one lease length and one ttl, so insertion order is expiry order in each
    dict (a renewal moves its lease to the end): the sweep only ever looks at the heads.
    """

    leases: OrderedDict[str, Record] = field(default_factory=OrderedDict)
    done: OrderedDict[str, Record] = field(default_factory=OrderedDict)
    kept_bytes: int = 0  # the bodies of ``done``

    def __len__(self) -> int:
        return len(self.leases) + len(self.done)

    def get(self, key: str) -> Record | None:
        """The record under ``key``, in flight or done."""
        return self.leases.get(key) or self.done.get(key)

    def pop(self, key: str) -> None:
        """Drop the record under ``key``."""
        self.leases.pop(key, None)
        record = self.done.pop(key, None)
        if record is not None and record.response is not None:
            self.kept_bytes -= len(record.response.body)

    def sweep(self, now: float) -> None:
        """Drop a bounded batch of expired records from the heads."""
        sweep(self.leases, now)
        for _ in range(SWEEP_BATCH):
            if not self.done:
                return
            key, record = next(iter(self.done.items()))
            if record.expires_at > now:
                return
            self.pop(key)


class MemoryResponses:
    """Idempotency records in process: a :class:`Record` under each key.

    The records of one resource live in one :class:`Records` in ``store.data`` (under
    ``table``), bounded by :data:`MAX_LOCAL_RECORDS` records and :data:`MAX_KEPT_BYTES` of
    kept bodies: past either, new keys are refused (:meth:`refuses`), never a record
    dropped (a dropped finished record would let its retry run again).
    """

    def __init__(self, store: MemoryStore, table: str = "") -> None:
        self.store = store
        self.table = table or store.key("idem", "", "records")

    @property
    def records(self) -> Records:
        """The table, made at first use."""
        records: Records | None = self.store.data.get(self.table)
        if records is None:
            records = self.store.data[self.table] = Records()
        return records

    def __len__(self) -> int:
        return len(self.records)

    def _live(self, key: str) -> Record | None:
        record = self.records.get(key)
        if record is not None and record.expires_at <= self.store.now():
            self.records.pop(key)
            return None
        return record

    def has(self, key: str) -> bool:
        """Whether a live record (in flight or done) is kept under ``key``."""
        return self._live(key) is not None

    def refuses(self, key: str) -> float | None:
        """Seconds to wait if a new ``key`` is refused (the bounds are reached), else None."""
        records = self.records
        now = self.store.now()
        records.sweep(now)
        if len(records) < MAX_LOCAL_RECORDS and records.kept_bytes < MAX_KEPT_BYTES:
            return None
        if self._live(key) is not None:
            return None  # known here: answered from its record, nothing new is kept
        # The soonest a record may expire (a lease), at least a second, at most a minute.
        heads = [next(iter(d.values())).expires_at for d in (records.leases, records.done) if d]
        return min(60.0, max(1.0, min(heads, default=now + 1.0) - now))

    def hold(self, key: str, fp: str, lease_id: str) -> None:
        """Mirror a lease this process holds on another store (it ends with :meth:`forget`)."""
        self.records.pop(key)
        self.records.leases[key] = Record(fp, math.inf, lease=lease_id)

    def forget(self, key: str) -> None:
        """Drop whatever is kept under ``key``."""
        self.records.pop(key)

    async def begin(self, key: str, fp: str, lease_id: str, lease: float) -> Begun:
        """Look ``key`` up and, if it is new, take its in-flight lease."""
        record = self._live(key)
        now = self.store.now()
        if record is None:
            self.records.sweep(now)
            self.records.leases[key] = Record(fp, now + lease, lease=lease_id)
            return Begun("new")
        if record.fp != fp:
            return Begun("mismatch")
        if record.lease is not None:
            return Begun("in_flight", lease_left=min(record.expires_at - now, lease))
        return Begun("done", response=record.response)

    async def renew(self, key: str, lease_id: str, lease: float) -> bool:
        """Extend the in-flight lease ``lease_id`` holds; whether it still held it."""
        record = self._live(key)
        if record is None or record.lease != lease_id:
            return False
        record.expires_at = max(record.expires_at, self.store.now() + lease)
        self.records.leases.move_to_end(key)  # still in expiry order
        return True

    async def complete(
        self,
        key: str,
        lease_id: str,
        fp: str,
        response: KeptResponse,
        ttl: float,
        *,
        always_try: bool = False,
    ) -> bool:
        """Keep ``response`` under ``key`` for ``ttl`` seconds; whether the lease was ours."""
        record = self._live(key)
        if record is not None and record.lease != lease_id:
            return False
        records = self.records
        records.pop(key)
        size = len(response.body)
        if response.kept and records.kept_bytes + size > MAX_KEPT_BYTES:
            # Over the bound: keep the status only (a retry gets 409 "not kept", never
            # a second run).
            response = KeptResponse(response.status, response.headers, b"", kept=False)
            size = 0
        records.done[key] = Record(fp, self.store.now() + ttl, response=response)
        records.kept_bytes += size
        return True

    async def abort(self, key: str, lease_id: str, *, always_try: bool = False) -> bool:
        """Free the key for a retry; whether the lease was ours."""
        record = self._live(key)
        if record is None or record.lease != lease_id:
            return False
        self.records.pop(key)
        return True


class RedisResponses:
    """Idempotency records on Redis: one hash per key, one Lua call per state change."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._begin = store.script(lua("responses_begin"))
        self._renew = store.script(lua("responses_renew"))
        self._complete = store.script(lua("responses_complete"))
        self._abort = store.script(lua("responses_abort"))

    def refuses(self, key: str) -> float | None:
        """Redis bounds its keys itself: nothing is refused here."""
        return None

    async def begin(self, key: str, fp: str, lease_id: str, lease: float) -> Begun:
        reply = await self.store.run(self._begin, (key,), (fp, lease_id, math.ceil(lease * 1000)))
        state = int(reply[0])
        if state == 0:
            return Begun("new")
        if state == 1:
            return Begun("mismatch")
        if state == 2:
            return Begun("in_flight", lease_left=max(0, int(reply[1])) / 1000.0)
        status, headers, body, kept = reply[1:5]
        return Begun(
            "done",
            response=KeptResponse(int(status), _decode_headers(headers), body, kept == b"1"),
        )

    async def renew(self, key: str, lease_id: str, lease: float) -> bool:
        return bool(await self.store.run(self._renew, (key,), (lease_id, math.ceil(lease * 1000))))

    async def complete(
        self,
        key: str,
        lease_id: str,
        fp: str,
        response: KeptResponse,
        ttl: float,
        *,
        always_try: bool = False,
    ) -> bool:
        args = (
            lease_id,
            fp,
            response.status,
            _encode_headers(response.headers),
            response.body,
            "1" if response.kept else "0",
            max(1, math.ceil(ttl * 1000)),
        )
        return bool(await self.store.run(self._complete, (key,), args, always_try=always_try))

    async def abort(self, key: str, lease_id: str, *, always_try: bool = False) -> bool:
        return bool(await self.store.run(self._abort, (key,), (lease_id,), always_try=always_try))


__all__ = [
    "MAX_KEPT_BYTES",
    "MAX_LOCAL_RECORDS",
    "Begun",
    "KeptResponse",
    "KeptResponses",
    "MemoryResponses",
    "Record",
    "Records",
    "RedisResponses",
]
