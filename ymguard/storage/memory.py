"""The in-process store: state for one process, no I/O, the same semantics as Redis."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from .base import StoragePolicy, Store

if TYPE_CHECKING:
    from ..backends.breaker_state import BreakerStore
    from ..backends.permits import Permits
    from ..backends.responses import KeptResponses
    from ..backends.tokens import Tokens
    from ..backends.window import Window


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
        """Seconds on a monotonic clock (the memory store's equivalent of Redis ``TIME``).

        ``time.monotonic()`` read on each call (not the function itself, captured): a test
        that patches ``time.monotonic`` (freezegun, ``mock.patch``) moves this clock too.
        """
        return time.monotonic()

    def __repr__(self) -> str:
        return f"MemoryStore(key_prefix={self.key_prefix!r})"

    # The primitives are imported on first use: they import the storage package.

    def window(self) -> Window:
        """The sliding window in process."""
        from ..backends.window import MemoryWindow

        return MemoryWindow(self)

    def permits(self, name: str, kind: str = "sem") -> Permits:
        """Leased permits in process."""
        from ..backends.permits import MemoryPermits, permit_keys

        return MemoryPermits(self, permit_keys(self, name, kind))

    def tokens(self, family: str = "submit") -> Tokens:
        """Submit tokens in process."""
        from ..backends.tokens import MemoryTokens

        return MemoryTokens(self, self.key(family, "", "tokens"))

    def responses(self, resource: str = "") -> KeptResponses:
        """Idempotency records in process."""
        from ..backends.responses import MemoryResponses

        return MemoryResponses(self, self.key("idem", resource, "records"))

    def breaker(self, name: str) -> BreakerStore:
        """A breaker's state in process."""
        from ..backends.breaker_state import MemoryBreakerStore

        return MemoryBreakerStore(self, self.key("breaker", name))

    @property
    def local(self) -> MemoryStore:
        """The memory store never fails: it is its own fallback."""
        return self

    async def close_tasks(self) -> None:
        """Stop the spawned tasks and the lease keeper of this store."""
        from ..backends.permits import close_store_tasks

        await super().close_tasks()
        await close_store_tasks(self)
