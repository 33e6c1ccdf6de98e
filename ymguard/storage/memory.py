"""The in-process store: state for one process, no I/O, the same semantics as Redis."""

from __future__ import annotations

import time
from typing import Any, Literal

from .base import StoragePolicy, Store


class MemoryStore(Store):
    """In-process state, keyed like Redis keys so objects of one name share it.

    ``data`` is a plain dict owned by the algorithms (each algorithm stores its own
    structure under its own keys). ``now`` is a monotonic clock in seconds.
    """

    kind: Literal["memory", "redis"] = "memory"

    def __init__(self, *, key_prefix: str = "ymguard", on_storage_error: StoragePolicy = "local"):
        super().__init__(key_prefix=key_prefix, on_storage_error=on_storage_error)
        self.data: dict[str, Any] = {}

    @staticmethod
    def now() -> float:
        """Seconds on a monotonic clock (the memory store's equivalent of Redis ``TIME``)."""
        return time.monotonic()

    def __repr__(self) -> str:
        return f"MemoryStore(key_prefix={self.key_prefix!r})"
