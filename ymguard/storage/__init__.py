"""Stores: where guard state lives, chosen by URI scheme (as in ``limits.storage``).

Algorithms never talk to Redis directly through a client of their own: they ask the
store for a script and run it with :meth:`RedisStore.run`, which owns timeouts, the
outage bookkeeping and ``on_storage_error``. The memory store keeps the same state in
process, keyed by the same key strings, so that two objects with one name on one store
share their state on either backend.
"""

from __future__ import annotations

import math
from urllib.parse import parse_qsl, urlsplit

from .base import StoragePolicy, Store, check_key_prefix, encode_key_part
from .memory import MemoryStore
from .redis import RedisStore

__all__ = [
    "STORAGE_SCHEMES",
    "MemoryStore",
    "RedisStore",
    "StoragePolicy",
    "Store",
    "check_key_prefix",
    "check_storage_uri",
    "encode_key_part",
    "store_from_uri",
]

#: The URI schemes a store can be made from.
STORAGE_SCHEMES = (
    "memory",
    "redis",
    "rediss",
    "redis+unix",
    "redis+cluster",
    "redis+sentinel",
)

#: Query options of a Redis URI; anything else would only fail at the first connection.
_OPTIONS = frozenset(
    {
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "health_check_interval",
        "max_connections",
        "client_name",
        "protocol",
        "service_name",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "ssl_min_version",
    }
)
_SECONDS = ("socket_timeout", "socket_connect_timeout", "health_check_interval")
#: The longest socket timeout a URI may give: a guard waits at most this on a dead Redis.
MAX_SOCKET_TIMEOUT = 60.0


def _check_port(hostport: str) -> None:
    if hostport.startswith("["):  # [ipv6]:port
        port = hostport.partition("]")[2].removeprefix(":")
    else:
        port = hostport.rpartition(":")[2] if ":" in hostport else ""
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"port {port!r} is not a number in 1-65535")


def check_storage_uri(uri: str) -> str:
    """``uri`` if a store can be made from it; raises ValueError saying what is wrong.

    Everything a store would only trip over later (a port that is not a number, a db
    that is not one, an unknown or non-finite option) is refused here, before any
    connection is tried.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in STORAGE_SCHEMES:
        raise ValueError(
            f"unknown storage {uri!r}: use one of " + ", ".join(s + "://" for s in STORAGE_SCHEMES)
        )
    if scheme == "memory":
        if rest:
            raise ValueError("memory:// takes nothing after the scheme")
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise ValueError(f"storage URI: {exc}") from None
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if scheme == "redis+unix":
        if not parts.path:
            raise ValueError("redis+unix:// needs a socket path, e.g. redis+unix:///run/redis.sock")
    else:
        for hostport in netloc.split(",") if scheme == "redis+sentinel" else [netloc]:
            _check_port(hostport)
        db = parts.path.strip("/")
        if db and not (scheme == "redis+sentinel" or db.isdigit()):
            raise ValueError(f"the database {db!r} is not a number (redis://host:6379/0)")
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _OPTIONS:
            raise ValueError(f"unknown storage URI option {name!r}")
        if name == "db" and not value.isdigit():
            raise ValueError(f"db={value!r} is not a number")
        if name in _SECONDS:
            try:
                seconds = float(value)
            except ValueError:
                seconds = math.nan
            if not 0 < seconds <= MAX_SOCKET_TIMEOUT:
                raise ValueError(
                    f"{name}={value!r} must be a number of seconds in (0, {MAX_SOCKET_TIMEOUT:g}]"
                )
        if name == "max_connections" and not (value.isdigit() and int(value) > 0):
            raise ValueError(f"max_connections={value!r} must be a whole number > 0")
    return uri


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
        key_prefix: the first part of every key (no braces: it is outside the hash tag).
        on_storage_error: ``local`` | ``open`` | ``closed``, what checks do while the
            store is unavailable.

    Returns:
        A :class:`MemoryStore` or :class:`RedisStore`.

    Raises:
        ValueError: the URI or the prefix cannot be used (see :func:`check_storage_uri`).
    """
    check_storage_uri(uri)
    if uri.startswith("memory://"):
        return MemoryStore(key_prefix=key_prefix, on_storage_error=on_storage_error)
    return RedisStore(uri, key_prefix=key_prefix, on_storage_error=on_storage_error)
