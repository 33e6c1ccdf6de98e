"""Submit tokens: one-use tokens issued for a scope, spent by compare-and-delete.

On Redis ``SET PX`` issues and ``tokens_consume.lua`` spends; the memory store keeps one
table per token family, in expiry order, bounded, and drops expired tokens from its head.
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ._lua import lua

if TYPE_CHECKING:
    from ..storage.memory import MemoryStore
    from ..storage.redis import RedisStore

#: Most expired entries one write drops (memory store): each write drops at least as many
#: as it adds, so the expired never pile up, and no write scans the whole store.
SWEEP_BATCH = 64
#: Most live submit tokens kept per token family on the memory store (and in process
#: while Redis is down); past it the oldest is dropped (spending it is then a 409
#: duplicate submission: safe). Each is about 300 bytes.
MAX_TOKENS = 100_000


def sweep(entries: OrderedDict[str, Any], now: float) -> None:
    """Drop expired entries from the head of ``entries`` (kept in expiry order).

    Redis expires keys; the memory store drops them here, a bounded batch per write.
    """
    for _ in range(SWEEP_BATCH):
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


class Tokens(Protocol):
    """One-use tokens on one store."""

    async def issue(self, key: str, token: str, ttl: float) -> None:
        """Store ``token`` under ``key`` for ``ttl`` seconds (replacing an older one)."""

    async def consume(self, key: str, token: str) -> bool:
        """Spend ``token`` if it is the live one under ``key``; whether it was."""


class MemoryTokens:
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
        """Store ``token`` under ``key`` for ``ttl`` seconds (replacing an older one)."""
        tokens = self.tokens
        now = self.store.now()
        sweep(tokens, now)
        tokens.pop(key, None)
        tokens[key] = _Token(token, now + ttl)
        while len(tokens) > MAX_TOKENS:
            tokens.popitem(last=False)

    async def consume(self, key: str, token: str) -> bool:
        """Spend ``token`` if it is the live one under ``key``; whether it was."""
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


class RedisTokens:
    """Tokens on Redis: ``SET PX`` to issue, ``tokens_consume.lua`` to spend."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._consume = store.script(lua("tokens_consume"))

    async def issue(self, key: str, token: str, ttl: float) -> None:
        await self.store.call("SET", key, token, "PX", math.ceil(ttl * 1000))

    async def consume(self, key: str, token: str) -> bool:
        return bool(await self.store.run(self._consume, (key,), (token,)))


__all__ = ["MAX_TOKENS", "SWEEP_BATCH", "MemoryTokens", "RedisTokens", "Tokens", "sweep"]
