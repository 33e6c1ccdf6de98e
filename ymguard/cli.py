"""The ymguard command line: check a rules file, push rules to Redis, show the pushed rules."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ._model import Rule
from .errors import RuleProblem, RulesError
from .routecheck import (
    describe_unmatched,
    find_routes,
    import_exception,
    iter_routes,
    unmatched_rules,
)
from .rules import RulesFile, line_finder, load_rules, load_rules_text
from .rulesync import redact

_DESCRIPTION = """\
Sentinel-style resilience for ASGI apps.

ymguard check FILE validates a rules file. On success it prints the rules that will
apply, every default included (marked "# default"), and exits 0. Otherwise it prints
every problem as FILE:LINE: field: why, sorted by line, and exits 2.

With --app module:app it also checks the rules against the app: each HTTP rule must
name a route the app serves, and each errors: entry must import (this imports the
app and those modules, so it runs their code).
"""

_EPILOG = """\
examples:
  ymguard check rules.yaml
  ymguard check rules.yaml --app myshop.main:app
  ymguard check rules.yaml --app myshop.main:create_app --factory
  ymguard push rules.yaml          # every process on that Redis swaps to it
  ymguard rules rules.yaml         # the pushed version in force

The rules file is documented in docs/rules.md, rules at run time in docs/operations.md.
"""


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("...").strip()


def _key(name: str) -> str:
    return json.dumps(name)  # resource names and import paths: always quoted


def _emit(model: BaseModel, indent: str) -> list[str]:
    lines: list[str] = []
    fields = type(model).model_fields.items()
    # What every rule has (``shadow``) after the rule's own fields, which say what it is.
    for name, field in sorted(fields, key=lambda item: item[0] in Rule.model_fields):
        key = field.alias or name
        value = getattr(model, name)
        default = name not in model.model_fields_set
        if default and (value is None or value == [] or value == {}):
            # Unset rule kinds and empty sections would only be noise; a missing origin
            # changes what origin-scoped rules do, so it is said.
            if name == "origin":
                lines.append(f"{indent}origin: null  # default: no origin, every caller is one")
            continue
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{key}:")
            lines += _emit(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"{indent}{key}:")
            for item in value:
                inner = _emit(item, indent + "    ")
                lines.append(f"{indent}  - " + inner[0].removeprefix(indent + "    "))
                lines += inner[1:]
        elif (
            isinstance(value, dict) and value and isinstance(next(iter(value.values())), BaseModel)
        ):
            lines.append(f"{indent}{key}:")
            for sub, item in value.items():
                inner = _emit(item, indent + "    ")
                lines.append(f"{indent}  {_key(sub)}:" + ("" if inner else " {}"))
                lines += inner
        else:
            lines.append(f"{indent}{key}: {_scalar(value)}" + ("  # default" if default else ""))
    return lines


def describe(rules: RulesFile) -> list[str]:
    """The rules as YAML with every value that will apply, defaults marked ``# default``.

    The output is itself a valid rules file with the same meaning.
    """
    return _emit(rules, "")


def _import_app(spec: str, factory: bool = False) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--app {spec!r} must be 'module:attribute'")
    if os.getcwd() not in sys.path:  # like uvicorn: the app's package is in the cwd
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if factory:
            obj = obj()
    except Exception as exc:  # whatever importing the app raises is the answer
        raise ValueError(f"--app {spec!r}: cannot import: {type(exc).__name__}: {exc}") from None
    return obj


def check_against_app(
    rules: RulesFile, app: Any, source: str, line_of: Callable[[tuple[Any, ...]], int]
) -> list[RuleProblem]:
    """Problems of ``rules`` against an app: rules naming no route, errors that do not import."""
    problems: list[RuleProblem] = []
    routes = find_routes(app)
    if routes is None:
        problems.append(RuleProblem(source, 0, "--app", "has no routes (not a Starlette app)"))
    else:
        for name, nearest in unmatched_rules(rules.resources, iter_routes(routes)):
            loc = ("resources", name)
            why = describe_unmatched(name, nearest).removeprefix(f"rule {name!r} ")
            problems.append(RuleProblem(source, line_of(loc), f'resources."{name}"', why))
    for path in rules.errors:
        why_not = import_exception(path)
        if why_not is not None:
            problems.append(RuleProblem(source, line_of(("errors", path)), "errors", why_not))
    return sorted(problems, key=lambda p: p.line)


def _check(file: str, app_spec: str | None, factory: bool = False) -> int:
    try:
        rules = load_rules(file)
    except RulesError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if app_spec is not None:
        try:
            app = _import_app(app_spec, factory)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        problems = check_against_app(rules, app, file, line_finder(Path(file)))
        if problems:
            for problem in problems:
                print(problem, file=sys.stderr)
            return 2
    print(f"# {file}: the rules that will apply (defaults marked)")
    for line in describe(rules):
        print(line)
    if not rules.resources:
        print(f"warning: {file} has no resources: nothing is guarded", file=sys.stderr)
    checked = f", checked against {app_spec}" if app_spec else ""
    print(f"# ok: {len(rules.resources)} resources{checked}")
    return 0


_PUSH_DESCRIPTION = """\
ymguard push FILE stores FILE in Redis as the next version of the rules, and every
guard on that Redis and key prefix swaps to it within a second (a process started
later begins with it). The file is validated first, as every process validates it
again: a bad file is refused (problems as FILE:LINE: field: why, exit 2) and nothing
changes. Pushed rules cannot carry errors: (it imports code).

Redis is --storage, else $YMGUARD_STORAGE, else the file's storage:; the key prefix is
--key-prefix, else the file's key_prefix:. Each process refuses a version whose
storage: or key_prefix: (when set) names another store than its own.
"""

_RULES_DESCRIPTION = """\
ymguard rules shows the version of the pushed rules in force on a Redis and key prefix,
and the rules themselves. Redis and the prefix come from --storage / --key-prefix, else
from FILE's storage: and key_prefix:, else $YMGUARD_STORAGE and "ymguard". Exits 1 if
nothing was pushed there.
"""


def _redis_store(uri: str | None, key_prefix: str) -> Any:
    """A Redis store for the command, or a message saying why there is none."""
    from .storage import check_storage_uri, store_from_uri

    if not uri or uri.startswith("memory://"):
        return (
            "needs a Redis store: give --storage redis://HOST:6379/0, set YMGUARD_STORAGE, "
            "or write storage: in the rules file"
        )
    try:
        check_storage_uri(uri)
        return store_from_uri(uri, key_prefix=key_prefix)
    except ValueError as exc:
        return str(exc)


def _push(file: str, storage: str | None, key_prefix: str | None, expected: int | None) -> int:
    from .backends.rules_feed import VersionConflict
    from .errors import StorageUnavailable
    from .rulesync import push_rules

    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{file}:0: (file): {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 2
    try:
        rules = load_rules_text(text, source=file, allow_errors=False)
    except RulesError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"ymguard push: {file} refused; nothing was pushed", file=sys.stderr)
        return 2
    uri = storage or os.environ.get("YMGUARD_STORAGE") or rules.storage
    prefix = key_prefix or rules.key_prefix
    store = _redis_store(uri, prefix)
    if isinstance(store, str):
        print(f"ymguard push: {store}", file=sys.stderr)
        return 2

    async def push() -> tuple[int, str]:
        try:
            return await push_rules(store, text, source=file, expected_version=expected)
        finally:
            await store.aclose()

    try:
        version, digest = asyncio.run(push())
    except RulesError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"ymguard push: {file} refused; nothing was pushed", file=sys.stderr)
        return 2
    except VersionConflict as exc:
        print(
            f"ymguard push: expected version {expected}, but {exc.current} is in force; "
            "nothing was pushed",
            file=sys.stderr,
        )
        return 1
    except StorageUnavailable as exc:
        print(f"ymguard push: {redact(str(exc))}; nothing was pushed", file=sys.stderr)
        return 1
    where = f"{redact(store.uri)} (key prefix {prefix})"
    print(f"pushed {file} as version {version} to {where}")
    print(f"digest {digest}")
    return 0


def _show(file: str | None, storage: str | None, key_prefix: str | None) -> int:
    from .backends.rules_feed import rules_feed
    from .errors import StorageUnavailable

    rules = None
    if file is not None:
        try:
            rules = load_rules(file)
        except RulesError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 2
    uri = storage or (rules.storage if rules and "storage" in rules.model_fields_set else None)
    uri = uri or os.environ.get("YMGUARD_STORAGE")
    prefix = key_prefix or (rules.key_prefix if rules else "ymguard")
    store = _redis_store(uri, prefix)
    if isinstance(store, str):
        print(f"ymguard rules: {store}", file=sys.stderr)
        return 2

    async def read() -> Any:
        try:
            return await rules_feed(store).latest()
        finally:
            await store.aclose()

    where = f"{redact(store.uri)} (key prefix {prefix})"
    try:
        record = asyncio.run(read())
    except StorageUnavailable as exc:
        print(f"ymguard rules: {redact(str(exc))}", file=sys.stderr)
        return 1
    if record is None:
        print(f"# no rules pushed to {where}: every guard runs its own rules")
        return 1
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.pushed_ms / 1000))
    print(f"# version {record.version} in force on {where}")
    print(f"# pushed {when} from {record.source}, digest {record.digest}")
    print(record.text, end="" if record.text.endswith("\n") else "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ymguard`` console script; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="ymguard",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser(
        "check",
        help="validate a rules file and show what will apply",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("file", metavar="FILE", help="the rules file (YAML)")
    check.add_argument(
        "--app",
        metavar="MODULE:APP",
        help="also check route names and errors: imports against this app",
    )
    check.add_argument(
        "--factory",
        action="store_true",
        help="MODULE:APP is a function that returns the app (called with no arguments)",
    )
    push = sub.add_parser(
        "push",
        help="store a rules file in Redis as the next version; every process swaps to it",
        description=_PUSH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("file", metavar="FILE", help="the rules file (YAML)")
    push.add_argument("--storage", metavar="URI", help="the Redis to push to")
    push.add_argument("--key-prefix", metavar="PREFIX", help="the key prefix of the guards")
    push.add_argument(
        "--expect-version",
        metavar="N",
        type=int,
        help="push only if version N is in force (0: nothing pushed yet)",
    )
    show = sub.add_parser(
        "rules",
        help="show the version of the pushed rules in force, and the rules",
        description=_RULES_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("file", metavar="FILE", nargs="?", help="read Redis and prefix from it")
    show.add_argument("--storage", metavar="URI", help="the Redis to read")
    show.add_argument("--key-prefix", metavar="PREFIX", help="the key prefix (default ymguard)")
    args = parser.parse_args(argv)
    if args.command == "push":
        return _push(args.file, args.storage, args.key_prefix, args.expect_version)
    if args.command == "rules":
        return _show(args.file, args.storage, args.key_prefix)
    return _check(args.file, args.app, args.factory)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
