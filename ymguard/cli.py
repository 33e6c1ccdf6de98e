"""The ymguard command line: check a rules file and show what will apply."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .errors import RuleProblem, RulesError
from .routecheck import (
    describe_unmatched,
    find_routes,
    import_exception,
    iter_routes,
    unmatched_rules,
)
from .rules import RulesFile, line_finder, load_rules

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

The rules file is documented in docs/rules.md.
"""


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("...").strip()


def _key(name: str) -> str:
    return json.dumps(name)  # resource names and import paths: always quoted


def _emit(model: BaseModel, indent: str) -> list[str]:
    lines: list[str] = []
    for name, field in type(model).model_fields.items():
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
    args = parser.parse_args(argv)
    return _check(args.file, args.app, args.factory)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
