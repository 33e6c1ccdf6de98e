"""Submit tokens: one-use tokens issued for a scope, spent by compare-and-delete.

On Redis ``SET PX`` issues and ``tokens_consume.lua`` spends; the memory store keeps a
token and its expiry under the same key and sweeps expired ones now and then.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ._lua import lua

if TYPE_CHECKING:
    from ..storage.memory import MemoryStore
    from ..storage.redis import RedisStore

# -- submit tokens, on each store ------------------------------------------------------

SWEEP_EVERY = 1024


def sweep(store: MemoryStore, kind: type[Any]) -> None:
    """Drop expired entries of one kind: Redis expires keys, the memory store must sweep.

    Called once per ``SWEEP_EVERY`` writes, so its cost (one pass over the store) is
    spread thin, and keys nobody reads again do not pile up.
    """
    now = store.now()
    data = store.data
    for key in [k for k, v in data.items() if isinstance(v, kind) and v.expires_at <= now]:
        del data[key]


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
    """Tokens in process: a :class:`_Token` under the scope's key."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self._writes = 0

    async def issue(self, key: str, token: str, ttl: float) -> None:
        self._writes += 1
        if self._writes % SWEEP_EVERY == 0:
            sweep(self.store, _Token)
        self.store.data[key] = _Token(token, self.store.now() + ttl)

    async def consume(self, key: str, token: str) -> bool:
        entry: _Token | None = self.store.data.get(key)
        if entry is None:
            return False
        if entry.expires_at <= self.store.now():
            del self.store.data[key]
            return False
        if not secrets.compare_digest(entry.token, token):
            return False
        del self.store.data[key]
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


__all__ = ["MemoryTokens", "RedisTokens", "Tokens", "sweep"]
