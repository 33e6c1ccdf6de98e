"""The part every store shares: key layout and the storage-error policy."""

from __future__ import annotations

from typing import Literal

StoragePolicy = Literal["local", "open", "closed"]


class Store:
    """Base of the stores.

    Attributes:
        kind: ``"memory"`` or ``"redis"``; a rule kind picks its implementation by it.
        key_prefix: the first part of every key.
        on_storage_error: ``local`` | ``open`` | ``closed``.
    """

    kind: Literal["memory", "redis"]

    def __init__(self, *, key_prefix: str = "ymguard", on_storage_error: StoragePolicy = "local"):
        self.key_prefix = key_prefix
        self.on_storage_error: StoragePolicy = on_storage_error

    def key(self, kind: str, name: str, suffix: str = "") -> str:
        """The key of one rule's state: ``prefix:{kind:name}:suffix``.

        Everything in braces is the Redis Cluster hash tag, so every key of one rule
        lands in one slot. Braces inside ``name`` (route templates have them) become
        parentheses so that they cannot end the tag early.
        """
        tag = f"{kind}:{name}".replace("{", "(").replace("}", ")")
        return f"{self.key_prefix}:{{{tag}}}" + (f":{suffix}" if suffix else "")

    @property
    def available(self) -> bool:
        """Whether the store is believed to answer now."""
        return True

    async def aclose(self) -> None:
        """Release connections; the store is unusable afterwards."""
