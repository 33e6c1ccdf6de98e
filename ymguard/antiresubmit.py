"""Anti-resubmit: the seed's submit tokens, and the ``Idempotency-Key`` header.

**Submit tokens** (the seed's ``checkRepeatSubmit``): the order page asks for a token, the
order submit spends it. The seed did GET-then-DEL, which lets two concurrent submits both
pass; here consuming is one compare-and-delete (one Lua call on Redis), so of any number of
concurrent submits exactly one wins. One live token per scope: issuing again replaces the
last one (a second tab's older token is then refused, which is what anti-resubmit wants),
and the store holds at most one token per scope however often the page is opened.

**Idempotency-Key** (draft-ietf-httpapi-idempotency-key-header-06): a client sends a unique
key with an unsafe request and may retry it safely. The first request takes an in-flight
lease on the key, the endpoint runs, and the finished response is stored under the key
with the request's fingerprint; a retry with the same key and body gets the stored
response again (``Idempotent-Replayed: true``), one with another body gets 422, one that
comes while the first is running gets 409. If the first request's process dies, the lease
expires and the key can be used again. Each state change is one Lua call on Redis.

Scopes (``docs/scopes.md``): a key or token is bound to the route (the resource) and to
the parts listed in ``scope:``, by default ``[origin, credentials]``: the guard's origin
and a digest of the request's ``Authorization`` and ``Cookie`` headers, so two callers
with different credentials never share a key or a token. The other parts are
``state:NAME`` (``request.state.NAME``), ``header:NAME``, ``query:NAME`` and
``param:NAME``. The seed binds its token to the user and the course ids:
``scope: [state:user, query:course_ids]`` with ``request.state.user`` set by an
authentication middleware that runs outside :class:`GuardMiddleware`. Scope values reach
the store only as a SHA-256 digest of a length-prefixed encoding: keys are injective and
of one size whatever the client sends, and hold no credentials.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import secrets
import weakref
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

from pydantic import Field, field_validator

from ._model import RuleModel
from .chain import Context, ShortCircuit
from .errors import (
    DuplicateSubmission,
    IdempotencyBodyTooLarge,
    IdempotencyKeyInFlight,
    IdempotencyKeyMismatch,
    IdempotencyKeyMissing,
    IdempotencyResponseNotKept,
    StorageBlocked,
    StorageUnavailable,
)
from .lua import lua
from .storage import MemoryStore, RedisStore, Store, store_from_uri
from .storage.redis import Unanswered
from .types import Message, Receive, Scope, Send

log = logging.getLogger("ymguard")

_SCOPE_KINDS = ("state", "header", "query", "param")
_SCOPE_WORDS = ("origin", "credentials")
#: The default ``scope``: one caller never meets another caller's keys or tokens.
DEFAULT_SCOPE = ("origin", "credentials")
# A header name as HTTP allows it (RFC 9110 token): anything else could never match.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _scope_parts(value: Any) -> Any:
    """Accept one part as a string; check every part names a known source."""
    parts = [value] if isinstance(value, str) else value
    if isinstance(parts, list):
        for part in parts:
            if not isinstance(part, str):
                continue  # pydantic reports the type
            kind, sep, name = part.partition(":")
            if part in _SCOPE_WORDS:
                continue
            if sep and kind in _SCOPE_KINDS and name:
                if kind == "header" and not _TOKEN.fullmatch(name):
                    raise ValueError(f"scope part {part!r}: not an HTTP header name")
                continue
            raise ValueError(
                f"scope part {part!r}: use origin, credentials, state:NAME, header:NAME, "
                "query:NAME or param:NAME (see docs/scopes.md)"
            )
    return parts


class SubmitTokenRule(RuleModel):
    """The ``submit_token`` rule of a resource: the seed's anti-resubmit token."""

    header: str = Field("X-Submit-Token", min_length=1, description="header carrying the token")
    scope: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SCOPE),
        description="what, besides the route, a token is bound to (docs/scopes.md)",
    )
    ttl_seconds: float = Field(900, gt=0, description="how long an issued token lives")

    _scope = field_validator("scope", mode="before")(_scope_parts)


class IdempotencyRule(RuleModel):
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


# -- scopes ----------------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> list[bytes]:
    return [v for k, v in scope.get("headers", ()) if k == name]


def credentials_of(scope: Scope) -> str:
    """A digest of the request's ``Authorization`` and ``Cookie`` headers (the ``credentials``
    scope part): equal for equal credentials, and never the credentials themselves."""
    auth = _header(scope, b"authorization")
    cookie = _header(scope, b"cookie")
    # The counts make the encoding injective: no split of values between the two headers
    # (or between repeated headers) digests like another.
    return _digest(
        b"authorization", b"%d" % len(auth), *auth, b"cookie", b"%d" % len(cookie), *cookie
    )


# The state names already warned about: names come from the rules file, so it is bounded.
_unset_state_warned: set[str] = set()


def _warn_unset_state(name: str) -> None:
    """Say once per name that a ``state:`` scope part was unset: every caller without it
    shares one scope, which is right for anonymous callers and wrong when it is because
    the middleware that sets it runs inside :class:`GuardMiddleware` (or is a dependency,
    which runs after the guard)."""
    if name not in _unset_state_warned:
        _unset_state_warned.add(name)
        log.warning(
            "ymguard: scope part state:%s is not set on a request; callers without it share "
            "idempotency keys and submit tokens. Set request.state.%s in a middleware added "
            "after GuardMiddleware (so it runs first), see docs/scopes.md",
            name,
            name,
        )


_ROUTE_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


def _warn_unknown_params(resource: str, kind: str, parts: Sequence[str]) -> None:
    """Warn about a ``param:NAME`` part that names no parameter of the resource's route:
    its value would be unset for every request, so every caller would share it."""
    path = resource.partition(" ")[2]
    if not path.startswith("/"):
        return  # a code resource: no route to compare with
    names = set(_ROUTE_PARAM.findall(path))
    for part in parts:
        kind_, _, name = part.partition(":")
        if kind_ == "param" and name not in names:
            log.warning(
                "ymguard: %s: %s.scope part %r names no parameter of the route (it has %s); "
                "see docs/scopes.md",
                resource,
                kind,
                part,
                ", ".join(sorted(names)) or "none",
            )


def scope_of(
    parts: Sequence[str],
    resource: str,
    origin: str,
    scope: Scope,
    params: Mapping[str, Any] | None = None,
) -> str:
    """The scope a rule's keys are bound to: the resource and each part's value.

    See ``docs/scopes.md`` for the parts.

    Args:
        parts: the rule's ``scope`` list (``origin``, ``credentials``, ``state:NAME``, ...).
        resource: the resource the rule guards (``POST /orders``).
        origin: the caller's origin.
        scope: the ASGI scope of the request.
        params: path parameters (default: ``scope["path_params"]``).

    Returns:
        An unambiguous string (JSON), the same for the request that gets a token and the
        request that spends it, as long as both see the same part values. Stores only
        ever see its digest.
    """
    if params is None:
        params = scope.get("path_params") or {}
    values: list[Any] = [resource]
    for part in parts:
        kind, _, name = part.partition(":")
        if part == "origin":
            values.append(origin)
        elif part == "credentials":
            values.append(credentials_of(scope))
        elif kind == "state":
            value = (scope.get("state") or {}).get(name)
            if value is None:
                _warn_unset_state(name)
            values.append(None if value is None else str(value))
        elif kind == "header":
            raw = _header(scope, name.lower().encode("latin-1"))
            values.append([v.decode("latin-1") for v in raw])
        elif kind == "query":
            query = scope.get("query_string", b"").decode("latin-1")
            values.append([v for k, v in parse_qsl(query, keep_blank_values=True) if k == name])
        else:
            value = params.get(name)
            values.append(None if value is None else str(value))
    # ASCII escapes: a lone surrogate in a state value still encodes (and digests).
    return json.dumps(values, separators=(",", ":"))


def _digest(*parts: str | bytes) -> str:
    """SHA-256 of the length-prefixed parts (injective: no two part lists share an input)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:32]


# -- submit tokens, on each store ------------------------------------------------------

#: Most expired entries one write drops (memory store): each write drops at least as many
#: as it adds, so the expired never pile up, and no write scans the whole store.
_SWEEP_BATCH = 64
#: Most live submit tokens kept per :class:`SubmitTokens` on the memory store (and in
#: process while Redis is down); past it the oldest is dropped (spending it is then a
#: 409 duplicate submission: safe). Each is about 300 bytes.
MAX_TOKENS = 100_000


def _sweep(entries: OrderedDict[str, Any], now: float) -> None:
    """Drop expired entries from the head of ``entries`` (kept in expiry order).

    Redis expires keys; the memory store drops them here, a bounded batch per write.
    """
    for _ in range(_SWEEP_BATCH):
        if not entries:
            return
        key, entry = next(iter(entries.items()))
        if entry.expires_at > now:
            return
        del entries[key]


@dataclass(frozen=True, slots=True)
class _Token:
    token: str
    expires_at: float


class _MemoryTokens:
    """Tokens in process: a :class:`_Token` per scope key, oldest first.

    The tokens of one token family live in one ordered dict in ``store.data`` (under
    ``table``), so that objects of one store and prefix share them, the expired ones are
    dropped from the head, and the oldest is dropped past :data:`MAX_TOKENS`. (With one
    ``ttl_seconds`` insertion order is expiry order; with several, an expired token behind
    a live one waits for its read or for the bound.)
    """

    def __init__(self, store: MemoryStore, table: str = "") -> None:
        self.store = store
        self.table = table or store.key("submit", "", "tokens")

    @property
    def tokens(self) -> OrderedDict[str, _Token]:
        """The table, made at first use (a guard that issues no token keeps none)."""
        tokens: OrderedDict[str, _Token] | None = self.store.data.get(self.table)
        if tokens is None:
            tokens = self.store.data[self.table] = OrderedDict()
        return tokens

    async def issue(self, key: str, token: str, ttl: float) -> None:
        tokens = self.tokens
        now = self.store.now()
        _sweep(tokens, now)
        tokens.pop(key, None)
        tokens[key] = _Token(token, now + ttl)
        while len(tokens) > MAX_TOKENS:
            tokens.popitem(last=False)

    async def consume(self, key: str, token: str) -> bool:
        entry = self.tokens.get(key)
        if entry is None:
            return False
        if entry.expires_at <= self.store.now():
            del self.tokens[key]
            return False
        if not secrets.compare_digest(entry.token, token):
            return False
        del self.tokens[key]
        return True


class _RedisTokens:
    """Tokens on Redis: ``SET PX`` to issue, ``antiresubmit_consume.lua`` to spend."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._consume = store.script(lua("antiresubmit_consume"))

    async def issue(self, key: str, token: str, ttl: float) -> None:
        await self.store.call("SET", key, token, "PX", math.ceil(ttl * 1000))

    async def consume(self, key: str, token: str) -> bool:
        return bool(await self.store.run(self._consume, (key,), (token,)))


def _tokens_backend(store: Store, prefix: str) -> _MemoryTokens | _RedisTokens:
    if isinstance(store, RedisStore):
        return _RedisTokens(store)
    assert isinstance(store, MemoryStore)
    return _MemoryTokens(store, store.key(prefix, "", "tokens"))


_MAX_TOKEN_LENGTH = 256


class SubmitTokens:
    """One-time submit tokens: issued for a scope, spent exactly once.

    Args:
        storage: a :class:`Store` or a storage URI.
        ttl_seconds: how long an issued token lives (the seed: 15 minutes).
        prefix: the key family (``prefix:{prefix:<scope hash>}``), so that token sets
            with different prefixes on one store never meet.
        rules: resource → its :class:`SubmitTokenRule` (set by :class:`Guard`, for
            :meth:`issue_for`).
        origin_of: ASGI scope → caller origin (set by :class:`Guard`).

    While the store is unavailable, ``on_storage_error`` decides: ``local`` issues and
    spends tokens in process (tokens issued before the outage are refused, which errs on
    the side of no duplicate order), ``open`` lets every submit through, ``closed`` raises
    :class:`StorageUnavailable`.
    """

    def __init__(
        self,
        storage: Store | str = "memory://",
        ttl_seconds: float = 900,
        prefix: str = "submit",
        *,
        rules: Callable[[str], SubmitTokenRule | None] | None = None,
        origin_of: Callable[[Scope], str] | None = None,
    ) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be > 0")
        self._owned = not isinstance(storage, Store)
        self.store = store_from_uri(storage) if isinstance(storage, str) else storage
        self.ttl_seconds = ttl_seconds
        self.prefix = prefix
        self._rules = rules
        self._origin_of = origin_of
        self._backend = _tokens_backend(self.store, prefix)
        self._local: _MemoryTokens | None = None

    def __repr__(self) -> str:
        return f"SubmitTokens(store={self.store!r}, ttl_seconds={self.ttl_seconds})"

    def key(self, scope: str) -> str:
        """The store key of a scope's token (the scope is hashed: any length, no PII)."""
        return self.store.key(self.prefix, _digest(scope))

    def _local_backend(self) -> _MemoryTokens:
        if self._local is None:
            local = MemoryStore(key_prefix=self.store.key_prefix)
            self._local = _MemoryTokens(local, local.key(self.prefix, "", "tokens"))
        return self._local

    async def issue(self, scope: str, ttl_seconds: float | None = None) -> str:
        """Issue a new token for ``scope``, replacing the scope's previous one.

        Args:
            scope: what the token is bound to (for the ``submit_token`` rule, see
                :meth:`scope_for`).
            ttl_seconds: this token's lifetime (default: the instance's).

        Returns:
            An unguessable token (128 random bits, URL-safe).
        """
        token = secrets.token_urlsafe(16)
        ttl = ttl_seconds or self.ttl_seconds
        key = self.key(scope)
        try:
            await self._backend.issue(key, token, ttl)
        except StorageUnavailable:
            if self.store.on_storage_error == "closed":
                raise
            await self._local_backend().issue(key, token, ttl)
        return token

    async def consume(self, scope: str, token: str) -> bool:
        """Spend ``token`` if it is the live token of ``scope``; atomic compare-and-delete.

        Of any number of concurrent consumes of one token exactly one returns True. A token
        issued for another scope, an expired one and a spent one return False.
        """
        if not token or len(token) > _MAX_TOKEN_LENGTH:
            return False
        key = self.key(scope)
        try:
            return await self._backend.consume(key, token)
        except StorageUnavailable:
            if self.store.on_storage_error == "closed":
                raise
            if self.store.on_storage_error == "open":
                return True
            return await self._local_backend().consume(key, token)

    def _rule(self, resource: str) -> SubmitTokenRule:
        rule = self._rules(resource) if self._rules is not None else None
        if rule is None:
            raise KeyError(f"resource {resource!r} has no submit_token rule")
        return rule

    def scope_for(self, request: Any, resource: str) -> str:
        """The scope the ``submit_token`` rule of ``resource`` binds a token to.

        Args:
            request: a Starlette ``Request`` or an ASGI scope, of the request that asks
                for the token (the order page); its origin, state, headers, query and
                path params supply the rule's ``scope`` parts.
            resource: the resource that spends the token (``POST /orders``).
        """
        scope: Scope = getattr(request, "scope", request)
        origin = self._origin_of(scope) if self._origin_of is not None else ""
        return scope_of(self._rule(resource).scope, resource, origin, scope)

    async def issue_for(self, request: Any, resource: str) -> str:
        """Issue a token that the ``submit_token`` rule of ``resource`` will accept once.

        The token is bound as the rule says (see :meth:`scope_for`) and lives the rule's
        ``ttl_seconds``.
        """
        rule = self._rule(resource)
        return await self.issue(self.scope_for(request, resource), rule.ttl_seconds)

    async def aclose(self) -> None:
        """Close the store if these tokens created it from a URI."""
        if self._owned:
            await self.store.aclose()


class SubmitTokenCheck:
    """``submit_token``: spend the request's token before the endpoint; none or spent → 409."""

    def __init__(self, tokens: SubmitTokens, resource: str, rule: SubmitTokenRule) -> None:
        self.tokens = tokens
        self.resource = resource
        self.rule = rule
        self.header = rule.header.lower().encode("latin-1")
        self.description = f"submit_token header={rule.header}"
        _warn_unknown_params(resource, "submit_token", rule.scope)

    def __repr__(self) -> str:
        return f"SubmitTokenCheck({self.resource!r}, {self.description!r})"

    async def enter(self, ctx: Context) -> Any:
        """Spend the token in the header for this caller's scope, or raise 409."""
        scope = ctx.scope
        if scope is None:  # code resources have no header to carry a token
            return None
        raw = _header(scope, self.header)
        if len(raw) != 1 or not raw[0]:
            raise DuplicateSubmission(
                self.resource, self.description, detail=f"{self.rule.header} is missing"
            )
        key_scope = scope_of(self.rule.scope, self.resource, ctx.origin, scope, ctx.params)
        try:
            spent = await self.tokens.consume(key_scope, raw[0].decode("latin-1").strip())
        except StorageUnavailable:
            raise StorageBlocked(self.resource, self.description, retry_after=1.0) from None
        if not spent:
            raise DuplicateSubmission(
                self.resource,
                self.description,
                detail=f"{self.rule.header} was already used, expired, or is not this caller's",
            )
        return None

    async def exit(self, ctx: Context, token: Any) -> None:
        """Nothing to give back: a spent token stays spent (as in the seed)."""


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
class _Record:
    fp: str
    expires_at: float
    lease: str | None = None
    response: KeptResponse | None = None


@dataclass(slots=True)
class _Records:
    """One idempotent resource's records in process, each kind in expiry order.

    One rule has one lease length and one ttl, so insertion order is expiry order in each
    dict (a renewal moves its lease to the end): the sweep only ever looks at the heads.
    """

    leases: OrderedDict[str, _Record] = field(default_factory=OrderedDict)
    done: OrderedDict[str, _Record] = field(default_factory=OrderedDict)
    kept_bytes: int = 0  # the bodies of ``done``

    def __len__(self) -> int:
        return len(self.leases) + len(self.done)

    def get(self, key: str) -> _Record | None:
        return self.leases.get(key) or self.done.get(key)

    def pop(self, key: str) -> None:
        self.leases.pop(key, None)
        record = self.done.pop(key, None)
        if record is not None and record.response is not None:
            self.kept_bytes -= len(record.response.body)

    def sweep(self, now: float) -> None:
        _sweep(self.leases, now)
        for _ in range(_SWEEP_BATCH):
            if not self.done:
                return
            key, record = next(iter(self.done.items()))
            if record.expires_at > now:
                return
            self.pop(key)


class _MemoryIdempotency:
    """Idempotency records in process: a :class:`_Record` under each key.

    The records of one resource live in one :class:`_Records` in ``store.data`` (under
    ``table``), bounded by :data:`MAX_LOCAL_RECORDS` records and :data:`MAX_KEPT_BYTES` of
    kept bodies: past either, new keys are refused (:meth:`refuses`), never a record
    dropped (a dropped finished record would let its retry run again).
    """

    def __init__(self, store: MemoryStore, table: str = "") -> None:
        self.store = store
        self.table = table or store.key("idem", "", "records")

    @property
    def records(self) -> _Records:
        """The table, made at first use."""
        records: _Records | None = self.store.data.get(self.table)
        if records is None:
            records = self.store.data[self.table] = _Records()
        return records

    def __len__(self) -> int:
        return len(self.records)

    def _live(self, key: str) -> _Record | None:
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
        self.records.leases[key] = _Record(fp, math.inf, lease=lease_id)

    def forget(self, key: str) -> None:
        """Drop whatever is kept under ``key``."""
        self.records.pop(key)

    async def begin(self, key: str, fp: str, lease_id: str, lease: float) -> Begun:
        record = self._live(key)
        now = self.store.now()
        if record is None:
            self.records.sweep(now)
            self.records.leases[key] = _Record(fp, now + lease, lease=lease_id)
            return Begun("new")
        if record.fp != fp:
            return Begun("mismatch")
        if record.lease is not None:
            return Begun("in_flight", lease_left=min(record.expires_at - now, lease))
        return Begun("done", response=record.response)

    async def renew(self, key: str, lease_id: str, lease: float) -> bool:
        record = self._live(key)
        if record is None or record.lease != lease_id:
            return False
        record.expires_at = max(record.expires_at, self.store.now() + lease)
        self.records.leases.move_to_end(key)  # still in expiry order
        return True

    async def complete(
        self, key: str, lease_id: str, fp: str, response: KeptResponse, ttl: float
    ) -> bool:
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
        records.done[key] = _Record(fp, self.store.now() + ttl, response=response)
        records.kept_bytes += size
        return True

    async def abort(self, key: str, lease_id: str) -> bool:
        record = self._live(key)
        if record is None or record.lease != lease_id:
            return False
        self.records.pop(key)
        return True


class _RedisIdempotency:
    """Idempotency records on Redis: one hash per key, one Lua call per state change."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._begin = store.script(lua("idempotency_begin"))
        self._renew = store.script(lua("idempotency_renew"))
        self._complete = store.script(lua("idempotency_complete"))
        self._abort = store.script(lua("idempotency_abort"))

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


IdempotencyBackend = _MemoryIdempotency | _RedisIdempotency


def idempotency_backend(store: Store, resource: str = "") -> IdempotencyBackend:
    """The idempotency-record implementation for a store (memory or Redis).

    On the memory store the records of ``resource`` are bounded together (one table).
    """
    if isinstance(store, RedisStore):
        return _RedisIdempotency(store)
    assert isinstance(store, MemoryStore)
    return _MemoryIdempotency(store, store.key("idem", resource, "records"))


def _replaying(chunks: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that hands out ``chunks`` again, then defers to the real one."""
    pending = list(chunks)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


# -- background work: lease renewals and writes that waited for the store ---------------

# The tasks of each store, so that Guard.aclose can stop them (close_idempotency_tasks).
_tasks: weakref.WeakKeyDictionary[Store, set[asyncio.Task[None]]] = weakref.WeakKeyDictionary()


def _spawn(store: Store, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(work)
    running = _tasks.setdefault(store, set())
    running.add(task)
    task.add_done_callback(running.discard)
    return task


async def close_idempotency_tasks(store: Store) -> None:
    """Stop the idempotency work left running on ``store`` (renewals, pending writes).

    ``Guard.aclose`` calls it. A response whose write still waited for the store is then
    kept by no one: its lease expires on the store, and the key can run again after it.
    """
    running = _tasks.pop(store, set())
    for task in running:
        task.cancel()
    if running:
        await asyncio.gather(*running, return_exceptions=True)


#: Most idempotency records kept in process per idempotent resource (the memory store;
#: on Redis, what this process holds while Redis is down). Past it new keys are refused
#: with 503 and ``Retry-After`` (keys already known are still answered). Each is about
#: 900 bytes plus its kept body.
MAX_LOCAL_RECORDS = 100_000
#: Most bytes of kept response bodies per idempotent resource in process; past it new
#: keys are refused (503), and a response that would cross it is kept as its status only.
MAX_KEPT_BYTES = 64 << 20
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

    backend: IdempotencyBackend
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

    On the memory store the records of one resource are bounded (:data:`MAX_LOCAL_RECORDS`
    records, :data:`MAX_KEPT_BYTES` of kept bodies): past either, new keys are refused
    with 503 and ``Retry-After`` while known keys are still answered.
    """

    def __init__(self, store: Store, resource: str, rule: IdempotencyRule) -> None:
        self.store = store
        self.resource = resource
        self.rule = rule
        self.methods = frozenset(rule.methods)
        self.header = rule.header.lower().encode("latin-1")
        self.backend = idempotency_backend(store, resource)
        # On Redis: the keys this process holds, and the responses Redis has not taken.
        self._local: _MemoryIdempotency | None = None
        if isinstance(self.backend, _RedisIdempotency):
            self._local = _MemoryIdempotency(MemoryStore(key_prefix=store.key_prefix))
        self._waiting: dict[str, _Waiting] = {}
        self._waiting_bytes = 0
        self._syncer: asyncio.Task[None] | None = None
        self.description = f"idempotency header={rule.header}"
        _warn_unknown_params(resource, "idempotency", rule.scope)

    def __repr__(self) -> str:
        return f"IdempotencyCheck({self.resource!r}, {self.description!r})"

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

    async def _begin(self, key: str, fp: str, lease_id: str) -> tuple[IdempotencyBackend, Begun]:
        """Look the key up where it lives: this process first, then the store."""
        lease = self.rule.lease_seconds
        local = self._local
        if local is None:
            assert isinstance(self.backend, _MemoryIdempotency)
            wait = self.backend.refuses(key)
            if wait is not None:
                raise StorageBlocked(
                    self.resource,
                    self.description,
                    retry_after=wait,
                    detail=f"too many idempotency keys kept for {self.resource} "
                    f"(at most {MAX_LOCAL_RECORDS} records and {MAX_KEPT_BYTES} bytes of "
                    "responses); try again later",
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
            if self.store.on_storage_error == "open":
                return self.backend, Begun("done")  # pass, unguarded (see enter)
            raise StorageBlocked(self.resource, self.description, retry_after=1.0) from None
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
            held.renewer = _spawn(self.store, self._renew(held))

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
            if self._waiting_bytes + size > MAX_WAITING_BYTES:
                response = KeptResponse(response.status, response.headers, b"", kept=False)
                waiting.response = response
                records = self._local.records if self._local is not None else None
                record = records.done.get(key) if records is not None else None
                if records is not None and record is not None and record.response is not None:
                    records.kept_bytes -= len(record.response.body)
                    record.response = response
            else:
                self._waiting_bytes += size
        waiting.deadline = asyncio.get_running_loop().time() + self.rule.ttl_seconds
        self._forget_waiting(key)
        self._waiting[key] = waiting
        if self._syncer is None or self._syncer.done():
            self._syncer = _spawn(self.store, self._sync())

    def _forget_waiting(self, key: str) -> None:
        waiting = self._waiting.pop(key, None)
        if waiting is None:
            return
        if waiting.response is not None and waiting.response.kept:
            self._waiting_bytes -= len(waiting.response.body)
        if waiting.held is not None:
            waiting.held.stop()

    async def _sync(self) -> None:
        """Write what waited for the store, as soon as it answers; then forget it here."""
        backend = self.backend
        local = self._local
        assert local is not None and isinstance(backend, _RedisIdempotency)
        loop = asyncio.get_running_loop()
        pause = _SYNC_PAUSE
        while self._waiting:
            down = False
            for key, waiting in list(self._waiting.items()):
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
                if self._waiting.get(key) is waiting:
                    self._forget_waiting(key)
                    record = local.records.get(key)
                    if record is not None and record.lease is None:
                        local.forget(key)  # the store answers for it from now on
            if self._waiting:
                # A long outage costs a connection attempt a second, not ten.
                pause = min(pause * 2, 1.0) if down else _SYNC_PAUSE
                await asyncio.sleep(pause)


def build_antiresubmit_checks(
    store: Store,
    resource: str,
    idempotency: IdempotencyRule | None,
    submit_token: SubmitTokenRule | None,
    tokens: SubmitTokens,
) -> list[IdempotencyCheck | SubmitTokenCheck]:
    """The checks for a resource's ``idempotency`` and ``submit_token`` rules.

    Idempotency comes first, so that a retry with the same key is replayed rather than
    refused as a duplicate submission (its token was spent by the first request).
    """
    checks: list[IdempotencyCheck | SubmitTokenCheck] = []
    if idempotency is not None:
        checks.append(IdempotencyCheck(store, resource, idempotency))
    if submit_token is not None:
        checks.append(SubmitTokenCheck(tokens, resource, submit_token))
    return checks


__all__ = [
    "DEFAULT_SCOPE",
    "MAX_KEPT_BYTES",
    "MAX_LOCAL_RECORDS",
    "MAX_TOKENS",
    "MAX_WAITING_BYTES",
    "Begun",
    "IdempotencyBodyTooLarge",
    "IdempotencyCheck",
    "IdempotencyResponseNotKept",
    "IdempotencyRule",
    "KeptResponse",
    "SubmitTokenCheck",
    "SubmitTokenRule",
    "SubmitTokens",
    "build_antiresubmit_checks",
    "close_idempotency_tasks",
    "credentials_of",
    "fingerprint",
    "idempotency_backend",
    "parse_idempotency_key",
    "scope_of",
]
