"""Authority: allow or deny callers by origin (Sentinel's ``AuthorityRule``).

``authority: {deny: [crawler]}`` refuses the listed origins; ``authority: {allow: [app-a,
app-b]}`` admits only them. The origin is the guard's (``origin:`` in the rules file),
capped like everywhere else (``chain.cap_origin``), so the names of the lists are compared
capped too. Unlike Sentinel, which lets a caller without an origin through a white list,
an allow list refuses a caller that has no origin at all: an allow list is a promise that
only those callers get in. A refusal is 403 ``origin-denied``; nothing is stored.
"""

from __future__ import annotations

from typing import Any

from pydantic import field_validator, model_validator

from ._kind import Env, Kind
from ._model import Rule
from .chain import CheckStatus, Context, cap_origin
from .errors import OriginDenied


def _names(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    if not value:
        raise ValueError("an empty list names no origin: leave the field out instead")
    for name in value:
        if not name:
            raise ValueError("an origin name is not empty")
    return value


class AuthorityRule(Rule):
    """The ``authority`` rule of a resource: exactly one of ``allow`` and ``deny``."""

    allow: list[str] | None = None
    deny: list[str] | None = None

    _allow = field_validator("allow")(_names)
    _deny = field_validator("deny")(_names)

    @model_validator(mode="after")
    def _one_list(self) -> AuthorityRule:
        if (self.allow is None) == (self.deny is None):
            raise ValueError("set exactly one of allow and deny")
        return self


class AuthorityCheck:
    """Refuse a call whose origin the resource's ``authority`` rule does not admit."""

    kind = "authority"

    #: Nothing taken, nothing to give back.
    exit_after_call = False

    def __init__(self, resource: str, rule: AuthorityRule) -> None:
        self.resource = resource
        self.rule = rule
        self.allow = rule.allow is not None
        names = rule.allow if rule.allow is not None else rule.deny or []
        self.names = frozenset(cap_origin(name) for name in names)
        self.description = f"authority {'allow' if self.allow else 'deny'}"

    def __repr__(self) -> str:
        return f"AuthorityCheck({self.resource!r}, {self.description!r})"

    def status(self) -> CheckStatus:
        """The list's kind and length."""
        state = {"mode": "allow" if self.allow else "deny", "origins": len(self.names)}
        return CheckStatus("authority", self.resource, self.description, state)

    def admits(self, origin: str) -> bool:
        """Whether a caller with this (capped) origin gets in."""
        if self.allow:
            return bool(origin) and origin in self.names
        return origin not in self.names

    async def enter(self, ctx: Context) -> Any:
        if not self.admits(ctx.origin):
            who = f"origin {ctx.origin!r}" if ctx.origin else "a caller without an origin"
            detail = f"Origin denied: {who} may not call {self.resource}"
            raise OriginDenied(self.resource, self.description, detail=detail)
        return None

    async def exit(self, ctx: Context, token: Any) -> None:
        return None


def _build(env: Env, resource: str, rule: AuthorityRule | None) -> list[AuthorityCheck]:
    return [] if rule is None else [AuthorityCheck(resource, rule)]


#: The ``authority`` kind's registry entry.
KIND = Kind("authority", 10, AuthorityRule, _build)

__all__ = ["KIND", "AuthorityCheck", "AuthorityRule"]
