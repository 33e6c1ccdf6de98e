"""The rules file: pydantic models, YAML loading, and errors that name file, line and field.

The shape is the contract of ``RULES.md``; the same shape is accepted as a dict. Each rule
kind's model lives in the module of its check (``FlowRule`` in ``limiter.py``, ...);
this module assembles them into :class:`RulesFile`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from ._model import RuleModel, not_supported_yet
from .antiresubmit import IdempotencyRule, SubmitTokenRule
from .breaker import BreakerRule
from .errors import RuleProblem, RulesError
from .limiter import FlowRule
from .semaphore import SemaphoreRule

STORAGE_SCHEMES = (
    "memory",
    "redis",
    "rediss",
    "redis+unix",
    "redis+cluster",
    "redis+sentinel",
)


class OriginRule(RuleModel):
    """Where the caller's origin (Sentinel's ``origin``) comes from."""

    from_: Literal["header", "client_ip", "state"] = Field("header", alias="from")
    name: str = "X-Caller"


class ErrorMapping(RuleModel):
    """How the global exception mapper renders one of the app's own exceptions."""

    status: int = Field(ge=400, le=599)
    title: str
    type: str | None = None
    detail: str | None = None


def _refuse(kind: str) -> Any:
    def check(value: Any) -> Any:
        if value is not None:
            raise not_supported_yet(kind)
        return value

    return check


class ResourceRules(RuleModel):
    """Every rule of one resource, in the order the chain runs them."""

    flow: list[FlowRule] = Field(default_factory=list)
    param_flow: Any = None
    authority: Any = None
    semaphore: SemaphoreRule | None = None
    breaker: list[BreakerRule] = Field(default_factory=list)
    idempotency: IdempotencyRule | None = None
    submit_token: SubmitTokenRule | None = None

    _param_flow = field_validator("param_flow")(_refuse("param_flow"))
    _authority = field_validator("authority")(_refuse("authority"))


class RulesFile(RuleModel):
    """The whole rules file (``RULES.md``)."""

    storage: str = "memory://"
    key_prefix: str = Field("ymguard", min_length=1)
    on_storage_error: Literal["local", "open", "closed"] = "local"
    origin: OriginRule | None = None
    resources: dict[str, ResourceRules] = Field(default_factory=dict)
    system: Any = None
    errors: dict[str, ErrorMapping] = Field(default_factory=dict)

    _system = field_validator("system")(_refuse("system"))

    @field_validator("storage")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in STORAGE_SCHEMES:
            raise ValueError(
                f"unknown storage {value!r}: use one of "
                + ", ".join(s + "://" for s in STORAGE_SCHEMES)
            )
        return value

    @field_validator("errors")
    @classmethod
    def _import_paths(cls, value: dict[str, ErrorMapping]) -> dict[str, ErrorMapping]:
        for path in value:
            if ":" not in path:
                raise ValueError(f"{path!r} must be 'module:ExceptionName'")
        return value


# -- loading ------------------------------------------------------------------------


def _why(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    msg = str(error.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (isinstance(part, str) and any(c in part for c in " /{}.")) or part == "":
            out += f'."{part}"' if out else f'"{part}"'
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


def parse_rules(
    data: Mapping[str, Any] | None, *, source: str = "<rules>", node: yaml.Node | None = None
) -> RulesFile:
    """Validate a rules dict; raises :class:`RulesError` listing every problem.

    Args:
        data: the rules in the shape of ``RULES.md``.
        source: the file name the problems are reported against.
        node: the YAML node tree, so that problems carry line numbers.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RulesError([RuleProblem(source, 1, "(top level)", "must be a mapping")])
    try:
        return RulesFile.model_validate(dict(data))
    except ValidationError as exc:
        problems = [
            RuleProblem(source, _line_of(node, tuple(e["loc"])), _field(tuple(e["loc"])), _why(e))
            for e in exc.errors()
        ]
        raise RulesError(problems) from None


def load_rules(path: str | Path) -> RulesFile:
    """Load and validate a YAML rules file; problems name file, line and field."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError([RuleProblem(source, 0, "(file)", exc.strerror or str(exc))]) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise RulesError([RuleProblem(source, line, "(file)", "not UTF-8 text")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise RulesError([RuleProblem(source, line, "(yaml)", str(exc.problem))]) from None
    except yaml.YAMLError as exc:
        raise RulesError([RuleProblem(source, 1, "(yaml)", str(exc))]) from None
    return parse_rules(data, source=source, node=node)


__all__ = [
    "ErrorMapping",
    "OriginRule",
    "ResourceRules",
    "RulesFile",
    "load_rules",
    "parse_rules",
]
