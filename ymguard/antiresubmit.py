"""Anti-resubmit: the seed's submit tokens, and the request scopes keys and tokens use.

**Submit tokens** (the seed's ``checkRepeatSubmit``): the order page asks for a token, the
order submit spends it. The seed did GET-then-DEL, which lets two concurrent submits both
pass; here consuming is one compare-and-delete (one Lua call on Redis), so of any number of
concurrent submits exactly one wins. One live token per scope: issuing again replaces the
last one (a second tab's older token is then refused, which is what anti-resubmit wants),
and the store holds at most one token per scope however often the page is opened.

The ``Idempotency-Key`` header is ``idempotency.py``; it binds its keys the same way.

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

import hashlib
import json
import logging
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from pydantic import Field, field_validator

from ._kind import Env, Kind
from ._model import Rule
from .backends.tokens import Tokens
from .chain import CheckStatus, Context
from .errors import (
    DuplicateSubmission,
    StorageBlocked,
    StorageUnavailable,
)
from .storage import Store, store_from_uri
from .types import Scope

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


class SubmitTokenRule(Rule):
    """The ``submit_token`` rule of a resource: the seed's anti-resubmit token."""

    header: str = Field("X-Submit-Token", min_length=1, description="header carrying the token")
    scope: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SCOPE),
        description="what, besides the route, a token is bound to (docs/scopes.md)",
    )
    ttl_seconds: float = Field(900, gt=0, description="how long an issued token lives")

    _scope = field_validator("scope", mode="before")(_scope_parts)


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
        self._backend: Tokens = self.store.tokens(prefix)
        self._local: Tokens | None = None

    def __repr__(self) -> str:
        return f"SubmitTokens(store={self.store!r}, ttl_seconds={self.ttl_seconds})"

    def key(self, scope: str) -> str:
        """The store key of a scope's token (the scope is hashed: any length, no PII)."""
        return self.store.key(self.prefix, _digest(scope))

    def _local_backend(self) -> Tokens:
        if self._local is None:
            self._local = self.store.local.tokens(self.prefix)
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
        except StorageUnavailable as exc:
            self.store.on_outage(exc)  # closed: raised; open and local: issued in process
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
        except StorageUnavailable as exc:
            if self.store.on_outage(exc) == "open":
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

    kind = "submit_token"

    def __init__(self, tokens: SubmitTokens, resource: str, rule: SubmitTokenRule) -> None:
        self.tokens = tokens
        self.resource = resource
        self.rule = rule
        self.header = rule.header.lower().encode("latin-1")
        self.description = f"submit_token header={rule.header}"
        _warn_unknown_params(resource, "submit_token", rule.scope)

    def __repr__(self) -> str:
        return f"SubmitTokenCheck({self.resource!r}, {self.description!r})"

    def status(self) -> CheckStatus:
        """The header and the tokens' lifetime."""
        state = {"header": self.rule.header, "ttl_seconds": self.rule.ttl_seconds}
        return CheckStatus("submit_token", self.resource, self.description, state)

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


def _build_submit_token(
    env: Env, resource: str, rule: SubmitTokenRule | None
) -> list[SubmitTokenCheck]:
    return [] if rule is None else [SubmitTokenCheck(env.submit_tokens(), resource, rule)]


#: The ``submit_token`` kind's registry entry (after ``idempotency``, so that a retry with
#: the same key is replayed rather than refused as a duplicate submission).
SUBMIT_TOKEN_KIND = Kind("submit_token", 80, SubmitTokenRule, _build_submit_token)


__all__ = [
    "DEFAULT_SCOPE",
    "SUBMIT_TOKEN_KIND",
    "SubmitTokenCheck",
    "SubmitTokenRule",
    "SubmitTokens",
    "credentials_of",
    "scope_of",
]
