"""``python -m demo_service``: serve the shop with uvicorn on embedded defaults.

``HOST``/``PORT`` (127.0.0.1:8000) and ``WORKERS`` (1) say where and how wide. Without
``REDIS_URL`` an embedded Redis is started here, before uvicorn spawns any worker, and its
socket is handed to every worker in ``REDIS_URL``: all workers share that one server, which
is stopped after the last worker has gone. SIGTERM and SIGINT stop everything gracefully
(exit status 0).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import ExitStack
from types import FrameType

import uvicorn

from ymguard import RulesError

from .app import create_app
from .embedded_redis import EmbeddedRedis, EmbeddedRedisError
from .settings import Settings, SettingsError

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Stop(BaseException):
    """SIGTERM or SIGINT arrived outside uvicorn's own handling: unwind and clean up."""


def _stop(signum: int, frame: FrameType | None) -> None:
    for sig in _STOP_SIGNALS:  # one stop is enough; let the cleanup finish
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop(signum)


def serve(settings: Settings) -> None:
    """Run uvicorn until it is told to stop (one process, or ``settings.workers`` workers)."""
    if settings.workers == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, lifespan="on")
        return
    # Workers are fresh interpreters that build their own app from the environment.
    if settings.redis_url is not None:
        os.environ["REDIS_URL"] = settings.redis_url
    uvicorn.run(
        "demo_service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        lifespan="on",
    )


def main() -> int:
    """Start the demo; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)-9s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"demo_service: {exc}", file=sys.stderr)
        return 2
    previous = {sig: signal.signal(sig, _stop) for sig in _STOP_SIGNALS}
    try:
        with ExitStack() as stack:
            settings.var_dir.mkdir(parents=True, exist_ok=True)
            if settings.redis_url is None:
                redis = stack.enter_context(EmbeddedRedis(settings.var_dir))
                settings = settings.with_redis(redis.client_url)
            serve(settings)
    except _Stop:
        pass
    except (EmbeddedRedisError, RulesError) as exc:
        print(f"demo_service: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
