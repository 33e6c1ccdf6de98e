"""The demo's configuration: environment variables with embedded defaults.

Everything has a default that runs on a fresh machine (SQLite and an embedded Redis under
``./var/``); pointing ``DATABASE_URL`` and ``REDIS_URL`` at PostgreSQL and a shared Redis
turns several workers or hosts into one shop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

#: The rules file that ships with the demo.
PACKAGED_RULES = Path(__file__).resolve().parent / "rules.yaml"

#: Seconds between the simulated Alipay's notify attempts (Alipay's real schedule, 4 min to
#: 15 h, shrunk so that a person watching the demo sees the retries).
DEFAULT_NOTIFY_DELAYS = (0.0, 2.0, 5.0, 15.0, 30.0, 60.0, 120.0)

#: A sandbox app id of Alipay's shape (16 digits).
DEFAULT_ALIPAY_APP_ID = "2021000000000000"

T = TypeVar("T")


class SettingsError(ValueError):
    """An environment variable has a value the demo cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    """The demo's configuration (read it with :meth:`Settings.from_env`)."""

    database_url: str = "sqlite+aiosqlite:///./var/demo.db"
    #: None means "start an embedded Redis under ``var_dir``".
    redis_url: str | None = None
    rules_path: Path = PACKAGED_RULES
    #: ``YMGUARD_STORAGE``: the guards' store when it must differ from ``redis_url``.
    guard_storage: str | None = None
    #: ``YMGUARD_KEY_PREFIX``: overrides the rules file's ``key_prefix``.
    key_prefix: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    order_pay_timeout_seconds: int = 1800
    sweeper_interval_seconds: float = 30.0
    #: ``KILL_ORDER_TIMEOUT_SECONDS``: a kill order not ordered within this expires.
    kill_order_timeout_seconds: int = 1800
    #: ``DEMO_CLAIM_IDLE_SECONDS``: a message pending this long on a consumer that does not
    #: ack it (it died) is taken over by another.
    claim_idle_seconds: float = 10.0
    alipay_notify_delays: tuple[float, ...] = DEFAULT_NOTIFY_DELAYS
    #: ``ALIPAY_NOTIFY_FAIL_FIRST``: fault injection, the sandbox loses the first this many
    #: attempts of every notify (0: none).
    alipay_notify_fail_first: int = 0
    #: ``ALIPAY_NOTIFY_SLOW_SECONDS``: fault injection, the sandbox posts every notify this
    #: much late (0: at once).
    alipay_notify_slow_seconds: float = 0.0
    #: ``ALIPAY_APP_ID``: the app the shop calls Alipay as (the sandbox knows only it).
    alipay_app_id: str = DEFAULT_ALIPAY_APP_ID
    #: ``ALIPAY_KEYS_DIR``: the four RSA2 PEMs; None means ``var_dir/alipay``.
    alipay_keys_dir: Path | None = None
    demo_admin_password: str | None = None
    #: ``DEMO_REDIS_PREFIX``: the first part of every key the shop itself keeps in Redis
    #: (stock, buyers, streams); tests use one per run on a shared Redis.
    redis_prefix: str = "demo"
    #: ``DEMO_TOKEN_SECRET``: signs bearer tokens; unset, one is generated and kept in
    #: the database so that every worker and host accepts every other's tokens.
    token_secret: str | None = None
    #: Where the default SQLite file and the embedded Redis live (relative to the working
    #: directory, like the default ``DATABASE_URL``).
    var_dir: Path = Path("var")
    #: ``DEMO_GC_FREEZE`` (``1`` unless set to ``0``): once started, the shop moves every
    #: object alive (FastAPI, SQLAlchemy, the rules) out of the garbage collector's full
    #: collections (``gc.freeze()``), which otherwise walk them all, tens of ms at a time,
    #: while requests wait on Redis. Off in a ``Settings()`` built by code (the tests).
    gc_freeze: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from environment variables (``os.environ`` unless given).

        Raises:
            SettingsError: naming the variable whose value is unusable.
        """
        env = os.environ if environ is None else environ
        d = cls()

        def get(name: str, parse: Callable[[str], T], default: T) -> T:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                return parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{name}={raw!r}: {exc}") from None

        return cls(
            database_url=get("DATABASE_URL", str, d.database_url),
            redis_url=get("REDIS_URL", str, d.redis_url),
            rules_path=get("YMGUARD_RULES", Path, d.rules_path),
            guard_storage=get("YMGUARD_STORAGE", str, d.guard_storage),
            key_prefix=get("YMGUARD_KEY_PREFIX", str, d.key_prefix),
            host=get("HOST", str, d.host),
            port=get("PORT", _port, d.port),
            workers=get("WORKERS", _positive_int, d.workers),
            order_pay_timeout_seconds=get(
                "ORDER_PAY_TIMEOUT_SECONDS", _positive_int, d.order_pay_timeout_seconds
            ),
            sweeper_interval_seconds=get(
                "SWEEPER_INTERVAL_SECONDS", _positive_float, d.sweeper_interval_seconds
            ),
            kill_order_timeout_seconds=get(
                "KILL_ORDER_TIMEOUT_SECONDS", _positive_int, d.kill_order_timeout_seconds
            ),
            claim_idle_seconds=get(
                "DEMO_CLAIM_IDLE_SECONDS", _positive_float, d.claim_idle_seconds
            ),
            alipay_notify_delays=get("ALIPAY_NOTIFY_DELAYS", _delays, d.alipay_notify_delays),
            alipay_notify_fail_first=get(
                "ALIPAY_NOTIFY_FAIL_FIRST", _non_negative_int, d.alipay_notify_fail_first
            ),
            alipay_notify_slow_seconds=get(
                "ALIPAY_NOTIFY_SLOW_SECONDS", _non_negative_float, d.alipay_notify_slow_seconds
            ),
            alipay_app_id=get("ALIPAY_APP_ID", str, d.alipay_app_id),
            alipay_keys_dir=get("ALIPAY_KEYS_DIR", Path, d.alipay_keys_dir),
            demo_admin_password=get("DEMO_ADMIN_PASSWORD", str, d.demo_admin_password),
            redis_prefix=get("DEMO_REDIS_PREFIX", str, d.redis_prefix),
            token_secret=get("DEMO_TOKEN_SECRET", str, d.token_secret),
            gc_freeze=get("DEMO_GC_FREEZE", _switch, True),
        )

    @property
    def alipay_keys_path(self) -> Path:
        """``ALIPAY_KEYS_DIR``, else ``var_dir/alipay``."""
        return self.alipay_keys_dir or self.var_dir / "alipay"

    def with_redis(self, url: str) -> Settings:
        """A copy of these settings using the Redis at ``url``."""
        return replace(self, redis_url=url)

    @property
    def redis_client_url(self) -> str | None:
        """``redis_url`` in redis-py's spelling (``unix://`` for a socket)."""
        if self.redis_url is None:
            return None
        return _respell(self.redis_url, "redis+unix://", "unix://")

    @property
    def guard_storage_url(self) -> str | None:
        """The guards' storage URI: ``YMGUARD_STORAGE``, else the Redis in ymguard's spelling."""
        if self.guard_storage:
            return self.guard_storage
        if self.redis_url is None:
            return None
        return _respell(self.redis_url, "unix://", "redis+unix://")


def _respell(url: str, old: str, new: str) -> str:
    return new + url[len(old) :] if url.startswith(old) else url


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _switch(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("must be 1 (on) or 0 (off)")
    return raw == "1"


def _port(raw: str) -> int:
    value = _int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port (1-65535)")
    return value


def _positive_int(raw: str) -> int:
    value = _int(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(raw: str) -> int:
    value = _int(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _non_negative_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be 0 or more seconds")
    return value


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _delays(raw: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in raw.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or any(v < 0 for v in values):
        raise ValueError("must be comma-separated seconds, none negative")
    return values


__all__ = ["PACKAGED_RULES", "Settings", "SettingsError"]
