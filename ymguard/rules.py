"""The rules file: pydantic models, YAML loading, and errors that name file, line and field.

The shape is the contract of the rules file, documented field by field in ``docs/rules.md``
(every field, its type, default, bounds and meaning); the same shape is accepted as a dict.
Each rule kind's model lives in the module of its check (``FlowRule`` in ``limiter.py``,
...); this module assembles them into :class:`RulesFile`.

A rules file that loads can be used: every value a check would trip over at run time
(infinite or absurd numbers, header names that are not ASCII, unknown methods, storage
URIs that do not parse, malformed resource names, duplicate keys) is a load error
``FILE:LINE: field: why``.

``errors:`` is a trust boundary: it names classes to import, and importing runs code.
Only rules written by the app's owner (a local file, a dict in code) may carry it; rules
that arrive at run time are parsed with ``allow_errors=False``, which refuses it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, ValidationInfo, field_validator

from ._model import HTTP_METHODS, RuleModel, check_header_name
from .antiresubmit import SubmitTokenRule
from .authority import AuthorityRule
from .breaker import BreakerRule
from .errors import RuleProblem, RulesError
from .idempotency import IdempotencyRule
from .limiter import FlowRule
from .param_flow import ParamFlowRule
from .semaphore import SemaphoreRule
from .storage import STORAGE_SCHEMES, check_key_prefix, check_storage_uri
from .system import SystemRule

#: Deepest nesting of mappings and lists a rules file may have (a real one needs 5).
MAX_DEPTH = 32
#: Most YAML nodes a rules file may expand to (aliases included), against alias bombs.
MAX_NODES = 100_000

_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z_][A-Za-z0-9_]*)?\}")


def check_resource_name(name: str) -> str:
    """``name`` if it is a resource name; raises ValueError saying what is wrong.

    A name with a ``/`` or starting with an HTTP method and a space is an HTTP resource
    and must read ``METHOD /route/{param}`` (the method in capitals, one space, the
    route template as the app declares it). Anything else names a code resource (the
    name given to ``@guard.resource``) and must be printable text.
    """
    if not name or name != name.strip() or not name.isprintable():
        raise ValueError("a resource name is printable text without leading or trailing spaces")
    first, _, path = name.partition(" ")
    if name.startswith("/"):
        raise ValueError(f"an HTTP resource names its method: write 'GET {name}'")
    if "/" not in name and first.upper() not in HTTP_METHODS:
        return name  # a code resource
    if first not in HTTP_METHODS:
        if first.upper() in HTTP_METHODS:
            raise ValueError(f"write the method in capitals: '{first.upper()} {path}'")
        raise ValueError(
            f"{first!r} is not an HTTP method (an HTTP resource is 'METHOD /route'): use "
            + ", ".join(sorted(HTTP_METHODS))
        )
    if not path.startswith("/") or any(c.isspace() for c in path):
        raise ValueError("an HTTP resource is 'METHOD /route/{param}' with one space")
    if "{" in _PARAM.sub("", path) or "}" in _PARAM.sub("", path):
        raise ValueError(
            "a route parameter is written {name} or {name:convertor} (a Python identifier)"
        )
    return name


def check_import_path(path: str) -> str:
    """``path`` if it reads ``package.module:ExceptionName``; raises ValueError otherwise."""
    module, sep, attr = path.partition(":")
    if not sep or not attr.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise ValueError(f"{path!r} must be 'package.module:ExceptionName'")
    return path


ResourceName = Annotated[str, AfterValidator(check_resource_name)]
ImportPath = Annotated[str, AfterValidator(check_import_path)]


class OriginRule(RuleModel):
    """Where the caller's origin (Sentinel's ``origin``) comes from."""

    from_: Literal["header", "client_ip", "state"] = Field("header", alias="from")
    name: str = Field("X-Caller", min_length=1)

    @field_validator("name")
    @classmethod
    def _header_name(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("from_", "header") == "header":
            check_header_name(value)
        return value


class ErrorMapping(RuleModel):
    """How the global exception mapper renders one of the app's own exceptions."""

    status: int = Field(ge=400, le=599)
    title: str = Field(min_length=1)
    type: str | None = None
    detail: str | None = None


class ResourceRules(RuleModel):
    """Every rule of one resource, in the order the chain runs them."""

    flow: list[FlowRule] = Field(default_factory=list)
    param_flow: list[ParamFlowRule] = Field(default_factory=list)
    authority: AuthorityRule | None = None
    semaphore: SemaphoreRule | None = None
    breaker: list[BreakerRule] = Field(default_factory=list)
    idempotency: IdempotencyRule | None = None
    submit_token: SubmitTokenRule | None = None


class RulesFile(RuleModel):
    """The whole rules file (see ``docs/rules.md``)."""

    storage: str = "memory://"
    key_prefix: str = "ymguard"
    on_storage_error: Literal["local", "open", "closed"] = "local"
    origin: OriginRule | None = None
    resources: dict[ResourceName, ResourceRules] = Field(default_factory=dict)
    system: SystemRule | None = None
    errors: dict[ImportPath, ErrorMapping] = Field(default_factory=dict)

    @field_validator("storage")
    @classmethod
    def _usable_storage(cls, value: str) -> str:
        return check_storage_uri(value)

    @field_validator("key_prefix")
    @classmethod
    def _usable_prefix(cls, value: str) -> str:
        return check_key_prefix(value)


# -- problems -----------------------------------------------------------------------

_MODEL_NAMES: frozenset[str] = frozenset()


def _model_names() -> frozenset[str]:
    global _MODEL_NAMES
    if not _MODEL_NAMES:
        found: set[str] = {"RuleModel"}
        stack = list(RuleModel.__subclasses__())
        while stack:
            cls = stack.pop()
            found.add(cls.__name__)
            stack += cls.__subclasses__()
        _MODEL_NAMES = frozenset(found)
    return _MODEL_NAMES


_PLAIN = {
    "extra_forbidden": "unknown field",
    "missing": "required field is missing",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "finite_number": "must be a finite number (not .inf or .nan)",
    "int_parsing_size": "is too large",
    "recursion_loop": f"is nested too deeply (at most {MAX_DEPTH} levels)",
}


def _why(error: Mapping[str, Any]) -> str:
    plain = _PLAIN.get(str(error.get("type", "")))
    if plain is not None:
        return plain
    msg = str(error.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    for name in _model_names():  # our model names are internals, never the user's words
        msg = re.sub(rf"\b(?:instance of )?{name}\b", "mapping", msg)
    return msg[:1].lower() + msg[1:]


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` without the ``[key]`` pydantic appends when a mapping's key is invalid."""
    return loc[:-1] if loc and loc[-1] == "[key]" else loc


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part == "" or not re.fullmatch(r"[A-Za-z0-9_-]+", part)):
            quoted = '"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"'
            out += f".{quoted}" if out else quoted
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """The 1-based line of the deepest node of ``loc`` found in the YAML tree."""
    if node is None:
        return 1
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part or key.value == str(part):
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _problem(source: str, node: yaml.Node | None, loc: tuple[Any, ...], why: str) -> RuleProblem:
    return RuleProblem(source, _line_of(node, loc), _field(loc), why)


def parse_rules(
    data: Mapping[str, Any] | None,
    *,
    source: str = "<rules>",
    node: yaml.Node | None = None,
    allow_errors: bool = True,
) -> RulesFile:
    """Validate a rules dict; raises :class:`RulesError` listing every problem, by line.

    Args:
        data: the rules in the shape of ``docs/rules.md``.
        source: the file name the problems are reported against.
        node: the YAML node tree, so that problems carry line numbers.
        allow_errors: accept an ``errors:`` section. It names classes that
            ``Guard.install`` imports, which runs code: pass False for rules that do not
            come from the app's owner (anything received at run time), so that such rules
            can never make the process import a module.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RulesError([RuleProblem(source, 1, "(top level)", "must be a mapping")])
    if not allow_errors and "errors" in data:
        why = (
            "not allowed here: errors: imports code, so only the app's own rules (a local "
            "file or Guard(rules=...)) may carry it"
        )
        raise RulesError([_problem(source, node, ("errors",), why)])
    try:
        return RulesFile.model_validate(dict(data))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = _clean_loc(tuple(error["loc"]))
            problems.append(_problem(source, node, loc, _why(error)))
        problems.sort(key=lambda p: p.line)
        raise RulesError(problems) from None
    except RecursionError:
        raise RulesError(
            [RuleProblem(source, 1, "(top level)", _PLAIN["recursion_loop"])]
        ) from None


# -- YAML ---------------------------------------------------------------------------

_OPEN = (
    yaml.BlockMappingStartToken,
    yaml.BlockSequenceStartToken,
    yaml.FlowMappingStartToken,
    yaml.FlowSequenceStartToken,
)
_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
_MERGE = "tag:yaml.org,2002:merge"


def _check_depth(text: str, source: str) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` before the (recursive) composer runs."""
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                line = token.start_mark.line + 1
                why = f"nested more than {MAX_DEPTH} levels deep"
                raise RulesError([RuleProblem(source, line, "(yaml)", why)])
        elif isinstance(token, _CLOSE):
            depth -= 1


def _walk(root: yaml.Node) -> Iterator[tuple[yaml.Node, tuple[Any, ...]]]:
    """Every node with its path, aliases expanded; at most :data:`MAX_NODES` of them."""
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())]
    seen = 0
    while stack:
        node, loc = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise ValueError(f"expands to more than {MAX_NODES} values (aliases?)")
        yield node, loc
        if isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):
                stack.append((value, (*loc, key.value)))
        elif isinstance(node, yaml.SequenceNode):
            for index, value in reversed(list(enumerate(node.value))):
                stack.append((value, (*loc, index)))


def _duplicates(root: yaml.Node, source: str) -> list[RuleProblem]:
    """A problem for each key that a mapping repeats (YAML loaders keep the last).

    Raises :class:`RulesError` at once if the tree expands to more than :data:`MAX_NODES`.
    """
    problems: list[RuleProblem] = []
    checked: set[int] = set()
    try:
        for node, loc in _walk(root):
            if not isinstance(node, yaml.MappingNode) or id(node) in checked:
                continue
            checked.add(id(node))
            first: dict[tuple[str, str], int] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE:
                    continue
                line = key.start_mark.line + 1
                where = first.get((key.tag, key.value))
                if where is None:
                    first[(key.tag, key.value)] = line
                else:
                    why = f"duplicate key (first on line {where}): a mapping names a key once"
                    problems.append(RuleProblem(source, line, _field((*loc, key.value)), why))
    except ValueError as exc:  # an alias bomb: validating it would never end either
        raise RulesError([RuleProblem(source, 1, "(yaml)", str(exc))]) from None
    return problems


def _read_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    try:
        _check_depth(text, source)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, None
            return loader.construct_document(node), node
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise RulesError([RuleProblem(source, line, "(yaml)", str(exc.problem))]) from None
    except yaml.YAMLError as exc:
        raise RulesError([RuleProblem(source, 1, "(yaml)", str(exc))]) from None


def load_rules(path: str | Path, *, allow_errors: bool = True) -> RulesFile:
    """Load and validate a YAML rules file; problems name file, line and field.

    An empty file (or one with only comments) is an error: it guards nothing, which is
    never what a rules file is written for.

    Args:
        path: the file.
        allow_errors: accept an ``errors:`` section (see :func:`parse_rules`).
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError([RuleProblem(source, 0, "(file)", exc.strerror or str(exc))]) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise RulesError([RuleProblem(source, line, "(file)", "not UTF-8 text")]) from None
    return load_rules_text(text, source=source, allow_errors=allow_errors)


def load_rules_text(text: str, *, source: str = "<rules>", allow_errors: bool = True) -> RulesFile:
    """Validate rules given as YAML text (a pushed version, a file just read).

    The same checks as :func:`load_rules`, with problems reported against ``source``.
    """
    data, node = _read_yaml(text, source)
    if data is None:
        why = "the file is empty: it guards nothing (write resources: ..., see docs/rules.md)"
        raise RulesError([RuleProblem(source, 1, "(file)", why)])
    # A repeated key is reported with every other problem (the loader kept the last).
    problems = _duplicates(node, source) if node is not None else []
    try:
        rules = parse_rules(data, source=source, node=node, allow_errors=allow_errors)
    except RulesError as exc:
        problems += exc.problems
        rules = None
    if problems:
        raise RulesError(sorted(problems, key=lambda p: p.line))
    assert rules is not None
    return rules


def line_finder(path: Path) -> Callable[[tuple[Any, ...]], int]:
    """A function giving the line of a field path (``("resources", name)``) in a YAML file.

    For problems found after loading (a rule naming no route); lines are 0 if the file
    no longer parses.
    """
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return lambda loc: 0
    return lambda loc: _line_of(node, loc)


__all__ = [
    "MAX_DEPTH",
    "STORAGE_SCHEMES",
    "ErrorMapping",
    "OriginRule",
    "ResourceRules",
    "RulesFile",
    "check_import_path",
    "check_resource_name",
    "line_finder",
    "load_rules",
    "load_rules_text",
    "parse_rules",
]
