"""``ymguard check FILE``: validate a rules file and show what it understood."""

from __future__ import annotations

import argparse
import sys

from .errors import RulesError
from .rules import RulesFile, load_rules


def describe(rules: RulesFile) -> list[str]:
    """Human-readable lines for every resource and rule in a parsed rules file."""
    lines = [
        f"storage: {rules.storage} (key_prefix {rules.key_prefix!r}, "
        f"on_storage_error {rules.on_storage_error})"
    ]
    if rules.origin is not None:
        lines.append(f"origin: from {rules.origin.from_} {rules.origin.name}")
    for resource, resource_rules in rules.resources.items():
        lines.append(f"{resource}")
        for kind in resource_rules.model_fields_set:
            value = getattr(resource_rules, kind)
            items = value if isinstance(value, list) else [value]
            for index, item in enumerate(items):
                shown = (
                    item.model_dump(exclude_defaults=True, by_alias=True)
                    if hasattr(item, "model_dump")
                    else item
                )
                label = f"{kind}[{index}]" if isinstance(value, list) else kind
                lines.append(f"  {label}: {shown}")
    for path, mapping in rules.errors.items():
        lines.append(f"error {path} -> {mapping.status} {mapping.title}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ymguard`` console script; returns the exit code."""
    parser = argparse.ArgumentParser(prog="ymguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a rules file")
    check.add_argument("file")
    args = parser.parse_args(argv)
    try:
        rules = load_rules(args.file)
    except RulesError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    for line in describe(rules):
        print(line)
    print(f"ok: {len(rules.resources)} resources")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
