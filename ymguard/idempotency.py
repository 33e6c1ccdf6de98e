"""Idempotency-Key (draft-ietf-httpapi-idempotency-key-header-06): a client sends a unique
key with an unsafe request and may retry it safely. The first request takes an in-flight
lease on the key, the endpoint runs, and the finished response is stored under the key
with the request's fingerprint; a retry with the same key and body gets the stored
response again (``Idempotent-Replayed: true``), one with another body gets 422, one that
comes while the first is running gets 409. If the first request's process dies, the lease
expires and the key can be used again. Each state change is one Lua call on Redis.

Keys are scoped like submit tokens (``docs/scopes.md``, ``antiresubmit.scope_of``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from ._kind import Env, Kind
from ._model import Rule
from .antiresubmit import (
    DEFAULT_SCOPE,
    _digest,
    _header,
    _scope_parts,
    _warn_unknown_params,
    scope_of,
)
from .backends import responses
from .backends.responses import Begun, KeptResponse, KeptResponses, MemoryResponses
from .chain import CheckStatus, Context, ShortCircuit
from .errors import (
    IdempotencyBodyTooLarge,
    IdempotencyKeyInFlight,
    IdempotencyKeyMismatch,
    IdempotencyKeyMissing,
    IdempotencyResponseNotKept,
    StorageBlocked,
    StorageUnavailable,
)
from .storage import MemoryStore, Store
from .storage.redis import Unanswered
from .types import Message, Receive, Scope

log = logging.getLogger("ymguard")


class IdempotencyRule(Rule):
    """The ``idempotency`` rule of a resource (draft-ietf-httpapi-idempotency-key-header)."""

    header: str = Field("Idempotency-Key", min_length=1)
    required: bool = Field(False, description="refuse (400) requests without a key")
    ttl_seconds: float = Field(86400, gt=0, description="how long a finished response is kept")
    lease_seconds: float = Field(
        60, gt=0, description="in-flight lease: a dead holder frees the key after this"
    )
    methods: list[str] = Field(default_factory=lambda: ["POST", "PATCH"], min_length=1)
    scope: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SCOPE),
        description="what, besides the route, keys are per (docs/scopes.md)",
    )
    max_key_length: int = Field(255, ge=1, le=4096)
    max_body_bytes: int = Field(
        1 << 20, ge=0, description="larger request bodies are refused with 413"
    )
    max_response_bytes: int = Field(
        1 << 20, ge=0, description="larger responses are sent but not kept for replay"
    )

    _scope = field_validator("scope", mode="before")(_scope_parts)

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [m.upper() for m in value]


# -- Idempotency-Key: parsing, fingerprint, the kept response ---------------------------

# RFC 8941 sf-string: printable ASCII, with \" and \\ the only escapes; then optional
# parameters, which RFC 8941 says to ignore when unknown.
_SF_STRING = re.compile(
    r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"'
    r"((?:;[ ]*[a-z*][a-z0-9_\-.*]*(?:=[^;]*)?)*)"
)
# The bare form clients also send (UUIDs start with a digit, so not an sf-token).
_BARE = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~:/=]+")


def parse_idempotency_key(value: str, max_length: int = 255) -> str | None:
    """The key in an ``Idempotency-Key`` header value, or None if it is malformed.

    Accepts the draft's structured-field String (``"8e03978e-..."``, parameters ignored)
    and the bare token form (``8e03978e-...``). Empty keys and keys longer than
    ``max_length`` are malformed.
    """
    value = value.strip(" \t")
    match = _SF_STRING.fullmatch(value)
    if match is not None:
        key = re.sub(r"\\(.)", r"\1", match.group(1))
    elif _BARE.fullmatch(value):
        key = value
    else:
        return None
    return key if 0 < len(key) <= max_length else None


def fingerprint(scope: Scope, body: bytes) -> str:
    """A hash of the request's method, path, query string and body."""
    return _digest(
        scope.get("method", ""),
        scope.get("raw_path") or scope.get("path", "").encode(),
        scope.get("query_string", b""),
        body,
    )


# Headers never kept: they describe the connection or the moment, not the result, and a
# replayed Set-Cookie would hand out a session from storage.
_NOT_KEPT = frozenset(
    {
        b"connection",
        b"content-length",
        b"date",
        b"idempotent-replayed",
        b"keep-alive",
        b"ratelimit",
        b"ratelimit-policy",
        b"retry-after",
        b"server",
        b"set-cookie",
        b"transfer-encoding",
    }
)
# Statuses not kept (the key is freed for a retry): server errors and "try again later".
_RETRYABLE = frozenset({408, 425, 429})


class _Recorder:
    """Sees the response the app sends (a ``ctx.on_send`` hook) and keeps what it may."""

    __slots__ = ("body", "complete", "headers", "kept", "limit", "size", "status")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.kept = True
        self.complete = False

    def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.headers = [
                (bytes(k).lower(), bytes(v))
                for k, v in message.get("headers", ())
                if bytes(k).lower() not in _NOT_KEPT
            ]
            if message.get("trailers"):
                self.kept = False
        elif kind == "http.response.body":
            chunk = message.get("body", b"")
            if self.kept:
                self.size += len(chunk)
                if self.size > self.limit:
                    self.kept, self.body = False, []
                else:
                    self.body.append(chunk)
            if not message.get("more_body", False):
                self.complete = True
        else:
            # pathsend, zerocopysend, trailers: sent, but not as bytes we can keep.
            self.kept = False
            if kind == "http.response.pathsend":
                self.complete = True


def _replaying(chunks: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that hands out ``chunks`` again, then defers to the real one."""
    pending = list(chunks)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


#: Most bytes of kept bodies waiting in process for the store per idempotent resource;
#: past it a response waits with its status only (a retry then gets 409 "not kept", but
#: never a second run).
MAX_WAITING_BYTES = 64 << 20
# First pause between two rounds of writes that wait for the store; it doubles up to 1 s
# while the store stays down.
_SYNC_PAUSE = 0.1


@dataclass(eq=False, slots=True)
class _Held:
    """What the idempotency check's ``enter`` gives its ``exit``: a lease, kept alive.

    The lease is renewed every third of its length while the request runs (a timer that
    starts a renewal task only for requests that live that long), and while a finished
    response waits for the store to answer.
    """

    backend: KeptResponses
    key: str
    lease_id: str
    fp: str
    recorder: _Recorder
    timer: asyncio.TimerHandle | None = None
    renewer: asyncio.Task[None] | None = None
    renewing: bool = False
    stopped: bool = False

    def stop(self) -> None:
        """Stop renewing (the lease is released, stored over, or left to expire)."""
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        # Not while a renewal is on the wire: it sees ``stopped`` when it returns.
        if self.renewer is not None and not self.renewing:
            self.renewer.cancel()


@dataclass(eq=False, slots=True)
class _Waiting:
    """A finished request whose outcome the store has not taken yet."""

    lease_id: str
    fp: str
    response: KeptResponse | None  # None: free the key (the request failed)
    deadline: float  # event-loop clock: the response would have expired by then
    held: _Held | None
    # The record's key when it is not the queue's key: the abort of a lease an unanswered
    # begin may have taken, queued beside whatever else waits for that record.
    key: str | None = None


class _InProcess:
    """What one idempotent resource keeps in this process, for every check made of it.

    On a remote store: the keys this process holds and the responses the store has not
    taken yet (its own records, whose count bounds what the resource keeps during an
    outage), and the task that writes them once the store answers.
    """

    def __init__(self, store: Store) -> None:
        self.local: MemoryResponses | None = None
        if store.remote:
            self.local = MemoryResponses(MemoryStore(key_prefix=store.key_prefix))
        self.waiting: dict[str, _Waiting] = {}
        self.waiting_bytes = 0
        self.syncer: asyncio.Task[None] | None = None


class IdempotencyCheck:
    """``idempotency``: run each ``Idempotency-Key`` once, replay its response to retries.

    Keys are scoped as ``docs/scopes.md`` says. On Redis this process also remembers, in
    memory, the keys it holds and the responses the store has not taken yet (Redis hung
    or down while they were stored): a retry in this process is answered from there (409
    while in flight, the response once done), and a background task writes the response
    to Redis once it answers again, keeping the lease until then. While Redis is down a
    key this process does not hold cannot be proven free (another process may hold it or
    have finished it): ``local`` and ``closed`` refuse it (503 with ``Retry-After``;
    idempotent requests are retryable by design), ``open`` lets it pass unguarded, so
    ``open`` is the one policy under which an outage can run a key twice. Otherwise one
    key runs once, across processes, as long as the outage is shorter than
    ``lease_seconds`` (the lease on Redis is what tells other processes). A begin that got
    no answer may still run when Redis resumes; its lease is then aborted.

    On the memory store the records of one resource are bounded
    (``backends.responses.MAX_LOCAL_RECORDS`` records, ``MAX_KEPT_BYTES`` of kept bodies):
    past either, new keys are refused with 503 and ``Retry-After`` while known keys are
    still answered.
    """

    kind = "idempotency"

    def __init__(self, store: Store, resource: str, rule: IdempotencyRule) -> None:
        self.store = store
        self.resource = resource
        self.rule = rule
        self.methods = frozenset(rule.methods)
        self.header = rule.header.lower().encode("latin-1")
        self.backend: KeptResponses = store.responses(resource)
        # What this process keeps for the resource: owned by the store, so that a reload
        # (a new check) still answers the keys held here and writes what waits.
        self._kept = store.keep(f"idempotency:{resource}", lambda: _InProcess(store))
        self._local = self._kept.local
        self.description = f"idempotency header={rule.header}"
        _warn_unknown_params(resource, "idempotency", rule.scope)

    def __repr__(self) -> str:
        return f"IdempotencyCheck({self.resource!r}, {self.description!r})"

    def status(self) -> CheckStatus:
        """Keys held in process and responses still waiting for the store."""
        state = {
            "local_records": len(self._local) if self._local is not None else 0,
            "waiting_for_store": len(self._kept.waiting),
            "waiting_bytes": self._kept.waiting_bytes,
        }
        return CheckStatus("idempotency", self.resource, self.description, state)

    def _refusal(self) -> StorageBlocked:
        return StorageBlocked(self.resource, self.description, retry_after=1.0)

    def _missing(self, detail: str) -> IdempotencyKeyMissing:
        return IdempotencyKeyMissing(self.resource, self.description, detail=detail)

    async def _read_body(self, ctx: Context, scope: Scope) -> bytes | None:
        """The whole request body (and a ``ctx.receive`` that gives it again), or None
        if the client went away before sending it all."""
        limit = self.rule.max_body_bytes
        for value in _header(scope, b"content-length"):
            if value.isdigit() and int(value) > limit:
                raise IdempotencyBodyTooLarge(self.resource, self.description)
        receive = ctx.receive
        if receive is None:
            return None
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # http.disconnect
                ctx.receive = _replaying(messages, receive)
                return None
            size += len(message.get("body", b""))
            if size > limit:
                raise IdempotencyBodyTooLarge(self.resource, self.description)
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages)
        ctx.receive = _replaying(
            [{"type": "http.request", "body": body, "more_body": False}], receive
        )
        return body

    async def _begin(self, key: str, fp: str, lease_id: str) -> tuple[KeptResponses, Begun]:
        """Look the key up where it lives: this process first, then the store."""
        lease = self.rule.lease_seconds
        local = self._local
        if local is None:
            wait = self.backend.refuses(key)
            if wait is not None:
                raise StorageBlocked(
                    self.resource,
                    self.description,
                    retry_after=wait,
                    detail=f"too many idempotency keys kept for {self.resource} "
                    f"(at most {responses.MAX_LOCAL_RECORDS} records and "
                    f"{responses.MAX_KEPT_BYTES} bytes of responses); try again later",
                )
            return self.backend, await self.backend.begin(key, fp, lease_id, lease)
        if local.has(key):  # held here, or finished while the store was down
            return local, await local.begin(key, fp, lease_id, lease)
        try:
            begun = await self.backend.begin(key, fp, lease_id, lease)
        except StorageUnavailable as exc:
            if isinstance(exc, Unanswered):
                # The begin may still run when Redis resumes and take a lease nobody
                # holds (every retry 409 for lease_seconds): queue its abort.
                self._wait_for_store(
                    f"{key}\n{lease_id}", _Waiting(lease_id, fp, None, 0, None, key=key)
                )
            # Another process may hold this key, or have finished it: nothing here can
            # prove it free. Refuse (idempotent requests are retryable), unless the user
            # chose availability over protection (open: it passes unguarded).
            if self.store.on_outage(self._refusal()) == "open":
                return self.backend, Begun("done")  # pass, unguarded (see enter)
            raise self._refusal() from None
        if begun.state == "new":
            local.hold(key, fp, lease_id)
        return self.backend, begun

    async def enter(self, ctx: Context) -> Any:
        """Take the key's lease (token: what ``exit`` needs to keep the response), or
        answer from the kept response (:class:`ShortCircuit`), or refuse (400/409/413/422).
        """
        scope = ctx.scope
        if scope is None or scope.get("method") not in self.methods:
            return None
        raw = _header(scope, self.header)
        if not raw:
            if self.rule.required:
                raise self._missing(f"{self.rule.header} is required")
            return None
        key = parse_idempotency_key(raw[0].decode("latin-1"), self.rule.max_key_length)
        if key is None or len(raw) > 1:
            raise self._missing(
                f"{self.rule.header} must be one structured-field String of 1 to "
                f"{self.rule.max_key_length} characters"
            )
        body = await self._read_body(ctx, scope)
        if body is None:
            return None
        fp = fingerprint(scope, body)
        caller = scope_of(self.rule.scope, self.resource, ctx.origin, scope, ctx.params)
        record_key = self.store.key("idem", f"{self.resource}:{_digest(caller, key)}")
        lease_id = secrets.token_hex(8)
        backend, begun = await self._begin(record_key, fp, lease_id)
        if begun.state == "new":
            recorder = _Recorder(self.rule.max_response_bytes)
            if ctx.on_send is None:
                ctx.on_send = []
            ctx.on_send.append(recorder)
            held = _Held(backend, record_key, lease_id, fp, recorder)
            held.timer = asyncio.get_running_loop().call_later(
                self.rule.lease_seconds / 3, self._start_renewing, held
            )
            return held
        if begun.state == "mismatch":
            raise IdempotencyKeyMismatch(
                self.resource,
                self.description,
                detail=f"{self.rule.header} was already used with another request",
            )
        if begun.state == "in_flight":
            raise IdempotencyKeyInFlight(
                self.resource, self.description, retry_after=min(1.0, begun.lease_left)
            )
        response = begun.response
        if response is None:  # open, store down, a key not held here: pass unguarded
            return None
        if not response.kept:
            raise IdempotencyResponseNotKept(
                self.resource,
                self.description,
                detail=f"the first request answered {response.status}; its response was "
                "too large or streamed in a way that cannot be kept",
            )
        raise ShortCircuit(response, response.status)

    # -- the lease, kept while the request runs ------------------------------------------

    def _start_renewing(self, held: _Held) -> None:
        held.timer = None
        if not held.stopped:
            held.renewer = self.store.spawn(self._renew(held))

    async def _renew(self, held: _Held) -> None:
        """Renew the lease every third of its length until ``held.stop()``."""
        lease = self.rule.lease_seconds
        while not held.stopped:
            held.renewing = True
            try:
                renewed = await held.backend.renew(held.key, held.lease_id, lease)
            except StorageUnavailable:
                renewed = None  # try again sooner, while two thirds of the lease remain
            except Exception:
                log.exception("ymguard: %s: renewing an in-flight lease failed", self)
                return
            finally:
                held.renewing = False
            if held.stopped:
                return
            if renewed is False:
                log.warning("ymguard: %s: an in-flight lease expired before its renewal", self)
                return
            await asyncio.sleep(lease / 6 if renewed is None else lease / 3)

    # -- exit: keep the response, or free the key ----------------------------------------

    async def exit(self, ctx: Context, token: Any) -> None:
        """Keep the finished response under the key, or free the key for a retry."""
        if token is None:
            return
        held: _Held = token
        rec = held.recorder
        # A complete response is the outcome even if the app raised afterwards
        # (a background task): the client saw it, so a retry must not run it again.
        keep = (
            ctx.blocked is None
            and rec.complete
            and rec.status < 500
            and rec.status not in _RETRYABLE
        )
        response = None
        if keep:
            response = KeptResponse(rec.status, rec.headers, b"".join(rec.body), rec.kept)
        ttl = self.rule.ttl_seconds
        local = self._local
        try:
            if response is not None:
                stored = await held.backend.complete(
                    held.key, held.lease_id, held.fp, response, ttl
                )
            else:
                stored = await held.backend.abort(held.key, held.lease_id)
        except StorageUnavailable:
            if local is None:  # pragma: no cover - the memory store is never unavailable
                raise
            # The client has its answer; the store must learn it before the lease ends.
            # Until then the lease stays held (renewed) and this process answers retries.
            if response is not None:
                await local.complete(held.key, held.lease_id, held.fp, response, ttl)
            else:
                local.forget(held.key)
            self._wait_for_store(held.key, _Waiting(held.lease_id, held.fp, response, 0, held))
            return
        except BaseException:
            # A bug reply, or cancelled: nothing is kept here, the lease runs out.
            held.stop()
            if local is not None:
                local.forget(held.key)
            raise
        held.stop()
        if local is not None:
            local.forget(held.key)
        if not stored and response is not None:
            log.warning(
                "ymguard: %s: a response was not kept: its lease had expired and another "
                "request took the key",
                self,
            )

    def _wait_for_store(self, key: str, waiting: _Waiting) -> None:
        """Queue an outcome for the store, bounded in bytes; the sync task writes it."""
        response = waiting.response
        if response is not None and response.kept:
            size = len(response.body)
            if self._kept.waiting_bytes + size > MAX_WAITING_BYTES:
                response = KeptResponse(response.status, response.headers, b"", kept=False)
                waiting.response = response
                records = self._local.records if self._local is not None else None
                record = records.done.get(key) if records is not None else None
                if records is not None and record is not None and record.response is not None:
                    records.kept_bytes -= len(record.response.body)
                    record.response = response
            else:
                self._kept.waiting_bytes += size
        waiting.deadline = asyncio.get_running_loop().time() + self.rule.ttl_seconds
        self._forget_waiting(key)
        self._kept.waiting[key] = waiting
        if self._kept.syncer is None or self._kept.syncer.done():
            self._kept.syncer = self.store.spawn(self._sync())

    def _forget_waiting(self, key: str) -> None:
        waiting = self._kept.waiting.pop(key, None)
        if waiting is None:
            return
        if waiting.response is not None and waiting.response.kept:
            self._kept.waiting_bytes -= len(waiting.response.body)
        if waiting.held is not None:
            waiting.held.stop()

    async def _sync(self) -> None:
        """Write what waited for the store, as soon as it answers; then forget it here."""
        backend = self.backend
        local = self._local
        assert local is not None
        loop = asyncio.get_running_loop()
        pause = _SYNC_PAUSE
        while self._kept.waiting:
            down = False
            for key, waiting in list(self._kept.waiting.items()):
                left = waiting.deadline - loop.time()
                try:
                    if left <= 0:  # expired here too, unwritten: nothing to keep
                        pass
                    # Past the store's fail-fast window: the write lands as soon as
                    # Redis answers, before other processes' retries find the key free.
                    elif waiting.response is None:
                        await backend.abort(waiting.key or key, waiting.lease_id, always_try=True)
                    else:
                        await backend.complete(
                            key,
                            waiting.lease_id,
                            waiting.fp,
                            waiting.response,
                            left,
                            always_try=True,
                        )
                except StorageUnavailable:
                    down = True
                    break  # still down: the next round tries again
                except Exception:
                    log.exception("ymguard: %s: storing a response that waited failed", self)
                if self._kept.waiting.get(key) is waiting:
                    self._forget_waiting(key)
                    record = local.records.get(key)
                    if record is not None and record.lease is None:
                        local.forget(key)  # the store answers for it from now on
            if self._kept.waiting:
                # A long outage costs a connection attempt a second, not ten.
                pause = min(pause * 2, 1.0) if down else _SYNC_PAUSE
                await asyncio.sleep(pause)


def _build(env: Env, resource: str, rule: IdempotencyRule | None) -> list[IdempotencyCheck]:
    return [] if rule is None else [IdempotencyCheck(env.store, resource, rule)]


#: The ``idempotency`` kind's registry entry. It runs before ``submit_token``, so that a
#: retry with the same key is replayed rather than refused as a duplicate submission (its
#: token was spent by the first request).
KIND = Kind("idempotency", 70, IdempotencyRule, _build)


__all__ = [
    "KIND",
    "MAX_WAITING_BYTES",
    "Begun",
    "IdempotencyCheck",
    "IdempotencyRule",
    "KeptResponse",
    "fingerprint",
    "parse_idempotency_key",
]
