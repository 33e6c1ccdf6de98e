"""Stores: where guard state lives, chosen by URI scheme (as in ``limits.storage``).

Algorithms never talk to Redis directly through a client of their own: they ask the
store for a script and run it with :meth:`RedisStore.run`, which owns timeouts, the
outage bookkeeping and ``on_storage_error``. The memory store keeps the same state in
process, keyed by the same key strings, so that two objects with one name on one store
share their state on either backend.
"""

from __future__ import annotations

from .base import StoragePolicy, Store
from .memory import MemoryStore
from .redis import RedisStore

__all__ = ["MemoryStore", "RedisStore", "StoragePolicy", "Store", "store_from_uri"]


def store_from_uri(
    uri: str,
    *,
    key_prefix: str = "ymguard",
    on_storage_error: StoragePolicy = "local",
) -> Store:
    """Create the store a URI names.

    Args:
        uri: ``memory://``, ``redis://``, ``rediss://``, ``redis+unix://``,
            ``redis+cluster://`` or ``redis+sentinel://``.
        key_prefix: the first part of every key.
        on_storage_error: ``local`` | ``open`` | ``closed``, what checks do while the
            store is unavailable.

    Returns:
        A :class:`MemoryStore` or :class:`RedisStore`.
    """
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme == "memory":
        return MemoryStore(key_prefix=key_prefix, on_storage_error=on_storage_error)
    if scheme in ("redis", "rediss", "redis+unix", "redis+cluster", "redis+sentinel"):
        return RedisStore(uri, key_prefix=key_prefix, on_storage_error=on_storage_error)
    raise ValueError(f"unknown storage URI {uri!r}")
