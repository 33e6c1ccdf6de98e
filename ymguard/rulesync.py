"""Rules at run time: the version in force, a watched rules file, and pushed rules.

Every guard has one :class:`RulesRuntime`. It knows which rules are in force (their
version and digest), and runs two optional background tasks on the guard's event loop:

- the **watcher** of a rules file (``Guard.from_yaml(path, watch=True)``): it polls the
  file's size, mtime and inode, and reads it when they change (or while its mtime is
  recent, as a coarse clock can hide an edit); a content digest tells a real edit from a
  touch. A good edit is reloaded; a bad one is refused and logged as
  ``FILE:LINE: field: why``, and the rules in force stay. Polling rather than inotify:
  it needs no dependency, works on every filesystem (NFS, bind mounts, Kubernetes
  ConfigMaps that swap a symlink) and costs one ``stat`` per second;
- the **follower** of pushed rules (``ymguard push``, ``Guard.publish_rules``): at start
  it reads the newest pushed version from the store, then every push nudges it through
  the store's pub/sub and it reads the newest version again; after a reconnection it
  reads it too, so a missed nudge costs nothing. Pushed rules are validated again here
  (no ``errors:``, the same store); a bad version is logged and skipped.

Both end in :meth:`Guard.reload <ymguard.guard.Guard.reload>`'s atomic swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .backends.rules_feed import MAX_RULES_BYTES, VersionConflict, rules_feed
from .errors import RuleProblem, RulesError
from .rules import RulesFile, _line_of, load_rules_text, parse_rules
from .storage.base import redact
from .storage.pubsub import pubsub_of
from .storage.tasks import stopped

if TYPE_CHECKING:
    from .guard import Guard
    from .storage import Store

log = logging.getLogger("ymguard")

#: How often a watched rules file is looked at, by default (seconds).
POLL_SECONDS = 1.0
#: How often pushed rules are read again while the store cannot be heard (seconds).
FOLLOW_SECONDS = 1.0
#: A file modified this recently is read at every poll even if its stat did not change:
#: some filesystems keep mtimes in whole seconds, so an edit may not move it.
_RECENT_NS = 2_000_000_000


def rules_digest(rules: RulesFile) -> str:
    """The digest of what rules mean: ``sha256:`` and 64 hex digits.

    Computed over every value that will apply (defaults included), so comments, key
    order and formatting do not change it, and two files with one meaning share it.
    """
    data = rules.model_dump(mode="json", by_alias=True)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _problem(text: str | None, source: str, loc: tuple[Any, ...], why: str) -> RuleProblem:
    node = None
    if text is not None:
        with contextlib.suppress(yaml.YAMLError, RecursionError):
            node = yaml.compose(text, Loader=yaml.SafeLoader)
    line = _line_of(node, loc) if node is not None else 0
    field = ".".join(str(part) for part in loc)
    return RuleProblem(source, line, field, why)


def check_same_store(
    rules: RulesFile,
    store: Store,
    storages: Iterable[str] = (),
    *,
    source: str,
    text: str | None = None,
) -> None:
    """Refuse rules that name another store than the one the guard runs on.

    A reload swaps rules, not stores: ``storage:`` and ``key_prefix:`` must be unset or
    name the guard's store (``storage:`` the store's URI or one of ``storages``, the
    values the guard's rules gave; ``key_prefix:`` the store's). Raises
    :class:`RulesError` naming the field.
    """
    problems = []
    given = rules.model_fields_set
    uri = getattr(store, "uri", f"{store.kind}://")
    if "storage" in given and rules.storage != uri and rules.storage not in storages:
        why = (
            f"is {redact(rules.storage)!r}, but the store here is {redact(uri)!r}: the "
            "store cannot change at run time (restart the process to move it)"
        )
        problems.append(_problem(text, source, ("storage",), why))
    if "key_prefix" in given and rules.key_prefix != store.key_prefix:
        why = (
            f"is {rules.key_prefix!r}, but the keys here start with {store.key_prefix!r}: "
            "the prefix cannot change at run time"
        )
        problems.append(_problem(text, source, ("key_prefix",), why))
    if problems:
        raise RulesError(problems)


def rules_text(rules: str | Mapping[str, Any] | RulesFile, *, source: str) -> tuple[str, RulesFile]:
    """Rules to push: their YAML text and the rules it validates to (no ``errors:``).

    Text is kept as given (receivers report problems against its lines); a dict or a
    :class:`RulesFile` is written out as YAML (only the fields that were set).
    Raises :class:`RulesError` if they do not validate or carry ``errors:``.
    """
    if isinstance(rules, str):
        if len(rules.encode("utf-8")) > MAX_RULES_BYTES:
            why = f"is larger than {MAX_RULES_BYTES} bytes"
            raise RulesError([RuleProblem(source, 1, "(file)", why)])
        return rules, load_rules_text(rules, source=source, allow_errors=False)
    if isinstance(rules, RulesFile):
        data: Mapping[str, Any] = rules.model_dump(mode="json", by_alias=True, exclude_unset=True)
    else:
        data = rules
    parsed = parse_rules(data, source=source, allow_errors=False)
    dumped = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return yaml.safe_dump(dumped, sort_keys=False, allow_unicode=True), parsed


async def push_rules(
    store: Store,
    rules: str | Mapping[str, Any] | RulesFile,
    *,
    source: str = "<pushed>",
    expected_version: int | None = None,
) -> tuple[int, str]:
    """Validate ``rules`` and store them as the next pushed version on ``store``.

    Every guard on the store (the same Redis and key prefix) hears of it and swaps. A bad
    set is refused before anything is stored.

    Args:
        store: the store to push to (a Redis store to reach other processes).
        rules: YAML text, a dict in the shape of the rules file, or a :class:`RulesFile`.
        source: the name problems are reported against (the file name).
        expected_version: push only if this version is in force now (0: nothing pushed
            yet); another one raises :class:`~ymguard.backends.rules_feed.VersionConflict`.

    Returns:
        The new version number and the rules' digest.

    Raises:
        RulesError: the rules do not validate, carry ``errors:``, or name another key
            prefix.
    """
    text, parsed = rules_text(rules, source=source)
    # The key prefix is checked here (it is where the rules are stored); ``storage:`` by
    # each receiving guard, which knows what its own rules call its store.
    check_same_store(parsed, store, {parsed.storage}, source=source, text=text)
    digest = rules_digest(parsed)
    version = await rules_feed(store).push(text, digest, source, expected_version)
    return version, digest


@dataclass(slots=True)
class _FileState:
    path: Path
    signature: tuple[int, int, int] | None = None
    content: str = ""  # the digest of the bytes last read (applied or refused)


def _file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RulesRuntime:
    """The rules-at-run-time side of one guard (see the module).

    Attributes:
        version: the version in force: the pushed version number (``"3"``) when pushed
            rules are in force, else ``sha256:`` and the first 12 hex digits of
            :attr:`digest`.
        digest: :func:`rules_digest` of the rules in force.
        pushed: the pushed version in force, or None (the guard's own rules).
        seen: the newest pushed version this guard has read (applied or refused).
        refused: the last refusal (a bad edit or push) as ``FILE:LINE: field: why``
            lines, or None since the last good change.
        watch_path: the watched rules file, or None.
        poll_seconds: how often the file is looked at.
        follow_pushed: whether pushed rules are followed.
    """

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.pushed: int | None = None
        self.seen = 0
        self.digest = rules_digest(guard.rules)
        #: The ``storage:`` values that name the guard's store: its own rules' and the
        #: store's URI (an environment variable or argument may override the rules').
        self.storages = {guard.rules.storage, getattr(guard.store, "uri", "memory://")}
        self.refused: str | None = None
        self.watch_path: Path | None = None
        self.poll_seconds = POLL_SECONDS
        self.follow_pushed = True
        self._file: _FileState | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._stale = False  # the last read of pushed rules failed: read again soon

    @property
    def version(self) -> str:
        """The version in force (see the class)."""
        return str(self.pushed) if self.pushed is not None else self.digest[:19]

    # -- what is in force ----------------------------------------------------------------

    def swapped(self, rules: RulesFile, pushed: int | None) -> None:
        """The guard swapped to ``rules`` (pushed version ``pushed``, or its own)."""
        self.digest = rules_digest(rules)
        self.pushed = pushed
        self.refused = None

    def _refuse(self, what: str, exc: RulesError) -> None:
        self.refused = str(exc)
        log.error(
            "ymguard: %s refused; the rules in force stay (version %s):\n%s",
            what,
            self.version,
            exc,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def watch(self, path: str | Path, text: bytes, poll_seconds: float = POLL_SECONDS) -> None:
        """Watch ``path``, whose content ``text`` is in force now."""
        if not poll_seconds > 0:
            raise ValueError("poll_seconds must be > 0")
        self.watch_path = Path(path)
        self.poll_seconds = poll_seconds
        state = self._file = _FileState(self.watch_path, content=_file_digest(text))
        with contextlib.suppress(OSError):
            st = os.stat(self.watch_path)
            state.signature = (st.st_mtime_ns, st.st_size, st.st_ino)

    def start_soon(self) -> None:
        """Start in a task of the running loop (from sync code on the loop); no-op if none."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._loop is loop:
            return
        self._spawn(loop, self.start())

    async def start(self) -> None:
        """Start watching and following; returns once the newest pushed version is read.

        Idempotent on one event loop. If the store does not answer, the guard keeps the
        rules it has and reads pushed ones again each second until it does.
        """
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._lock is not None:
            return
        self._loop = loop
        self._lock = asyncio.Lock()
        if self._file is not None:
            self._spawn(loop, self._watch(self._file))
        if self.follow_pushed:
            rules_feed(self.guard.store).listen(self._heard)
            if self.guard.store.remote:
                self._spawn(loop, self._follow())
            await self.sync()

    def _spawn(self, loop: asyncio.AbstractEventLoop, work: Any) -> None:
        task: asyncio.Task[None] = loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("ymguard: rules task failed", exc_info=task.exception())

    async def aclose(self) -> None:
        """Stop the background tasks; :meth:`start` may start them again."""
        if self.follow_pushed:
            feed = rules_feed(self.guard.store)
            feed.unlisten(self._heard)
        tasks, self._tasks = list(self._tasks), set()
        await stopped(tasks)
        self._loop = None
        self._lock = None

    # -- pushed rules ----------------------------------------------------------------------

    def _heard(self, version: int | None) -> None:
        if version is not None and version <= self.seen:
            return  # already read (our own push, or a duplicate nudge)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self._spawn(loop, self.sync())

    async def _follow(self) -> None:
        """Read pushed rules again each second while nudges cannot be trusted: the last
        read failed, or the store's client has no pub/sub (Redis Cluster)."""
        store = self.guard.store
        while True:
            await asyncio.sleep(FOLLOW_SECONDS)
            service = pubsub_of(store)
            if self._stale or (service is not None and service.unsupported):
                await self.sync()

    async def sync(self) -> None:
        """Read the newest pushed version and swap to it if it is new and good."""
        lock = self._lock
        if lock is None:
            lock = self._lock = asyncio.Lock()
        async with lock:
            try:
                record = await rules_feed(self.guard.store).latest()
            except Exception as exc:  # down, or a record this version cannot read
                if not self._stale:
                    log.warning("ymguard: could not read pushed rules (%s); trying again", exc)
                self._stale = True
                return
            self._stale = False
            if record is None or record.version <= self.seen:
                return
            self.seen = record.version
            source = record.source or "<pushed>"
            what = f"pushed rules version {record.version} from {source}"
            try:
                rules = load_rules_text(record.text, source=source, allow_errors=False)
                self.guard._swap(rules, pushed=record.version, source=source, text=record.text)
            except RulesError as exc:
                self._refuse(what, exc)
                return
            log.warning("ymguard: %s in force", what)

    async def publish(
        self, rules: str | Mapping[str, Any] | RulesFile, source: str, expected: int | None
    ) -> int:
        """Push ``rules`` from this guard; returns once this guard runs them."""
        text, parsed = rules_text(rules, source=source)
        guard = self.guard
        check_same_store(parsed, guard.store, self.storages, source=source, text=text)
        feed = rules_feed(guard.store)
        version = await feed.push(text, rules_digest(parsed), source, expected)
        if self.follow_pushed:
            await self.sync()
        return version

    # -- the watched file ------------------------------------------------------------------

    async def _watch(self, state: _FileState) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                data = await asyncio.to_thread(_read_if_changed, state)
            except OSError as exc:
                log.debug("ymguard: cannot read %s: %s", state.path, exc)
                continue
            if data is not None:
                self._apply_file(state.path, data)

    def _apply_file(self, path: Path, data: bytes) -> None:
        source = str(path)
        try:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = data[: exc.start].count(b"\n") + 1
                raise RulesError([RuleProblem(source, line, "(file)", "not UTF-8 text")]) from None
            rules = load_rules_text(text, source=source)
            self.guard._swap(rules, pushed=None, source=source, text=text)
        except RulesError as exc:
            self._refuse(f"the edit of {source}", exc)
            return
        log.warning("ymguard: reloaded %s (version %s)", source, self.version)


def _read_if_changed(state: _FileState) -> bytes | None:
    """The file's bytes if they changed since last read, else None (runs in a thread)."""
    st = os.stat(state.path)
    signature = (st.st_mtime_ns, st.st_size, st.st_ino)
    recent = time.time_ns() - st.st_mtime_ns < _RECENT_NS
    if signature == state.signature and not recent:
        return None
    data = state.path.read_bytes()
    state.signature = signature
    digest = _file_digest(data)
    if digest == state.content:
        return None
    state.content = digest
    return data


__all__ = [
    "POLL_SECONDS",
    "RulesRuntime",
    "VersionConflict",
    "check_same_store",
    "push_rules",
    "redact",
    "rules_digest",
    "rules_text",
]
