"""The base of every rule model: strict, immutable, unknown keys refused, numbers sane.

Every rule model (``FlowRule`` in ``limiter.py``, ``SemaphoreRule``, ``BreakerRule``, the
anti-resubmit rules, the models of ``rules.py``) derives from :class:`RuleModel`, so the
checks here hold for every field of the rules file at once, by the field's name:

* numbers are finite (``.inf`` and ``.nan`` are refused) and at most :data:`MAX_NUMBER`;
* ``*_seconds`` is at most :data:`MAX_SECONDS` (365 days) and, when above 0, at least
  :data:`MIN_SECONDS` (1 ms, the resolution of every expiry in Redis);
* ``*_ms`` is at most :data:`MAX_MS` (one hour: no request should wait longer);
* ``header`` is an HTTP header name (an RFC 9110 token: ASCII, no spaces);
* ``methods`` lists HTTP methods (:data:`HTTP_METHODS`);
* ``scope`` parts ``header:NAME`` name a valid header.

A value that passes here can be used at run time: a rule that loads never fails later.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

#: The largest number any field accepts (integers are exact in a Lua double up to here).
MAX_NUMBER = 2**53 - 1
#: The longest duration in seconds (``*_seconds``): 365 days.
MAX_SECONDS = 365 * 86400
#: The shortest positive duration in seconds: Redis expiries have 1 ms resolution.
MIN_SECONDS = 0.001
#: The longest duration in milliseconds (``*_ms``): one hour.
MAX_MS = 3_600_000
#: The methods an HTTP resource name or a ``methods`` list may use.
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
#: The longest header name accepted.
MAX_HEADER_NAME = 256

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def check_header_name(name: str) -> str:
    """``name`` if it is a valid HTTP header name; raises ValueError saying why not."""
    if not _TOKEN.fullmatch(name) or len(name) > MAX_HEADER_NAME:
        raise ValueError(
            f"{name!r} is not an HTTP header name (ASCII letters, digits and "
            f"!#$%&'*+-.^_`|~, at most {MAX_HEADER_NAME} characters)"
        )
    return name


def _check_number(name: str, value: float) -> None:
    if abs(value) > MAX_NUMBER:
        raise ValueError(f"must be at most {MAX_NUMBER}")
    if name.endswith("_seconds"):
        if value > MAX_SECONDS:
            raise ValueError(f"must be at most {MAX_SECONDS} (365 days)")
        if 0 < value < MIN_SECONDS:
            raise ValueError(f"must be 0 or at least {MIN_SECONDS} (1 ms)")
    elif name.endswith("_ms") and value > MAX_MS:
        raise ValueError(f"must be at most {MAX_MS} (one hour)")


class RuleModel(BaseModel):
    """Base of the rule models: unknown fields are errors, instances are frozen.

    Numbers must be finite (``allow_inf_nan=False``) and are bounded by their name's
    unit; header names, methods and header scopes are checked (see the module doc).
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    @field_validator("*", mode="after")
    @classmethod
    def _sane(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_number(name, value)
        elif name == "header" and isinstance(value, str):
            check_header_name(value)
        elif name == "methods" and isinstance(value, list):
            for method in value:
                if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
                    raise ValueError(
                        f"{method!r} is not an HTTP method: use " + ", ".join(sorted(HTTP_METHODS))
                    )
        elif name == "scope" and isinstance(value, list):
            for part in value:
                if isinstance(part, str) and part.startswith("header:"):
                    check_header_name(part.removeprefix("header:"))
        return value


class Rule(RuleModel):
    """Base of the model of one rule (a ``flow`` item, a ``semaphore``...): what every rule has.

    ``shadow: true`` puts the rule in shadow mode (a dry run, Envoy's ``filter_enabled``
    without ``filter_enforced``): it is evaluated and reported (``ymguard.result =
    shadow_blocked``, a log line) but never blocks. See ``shadow.py`` and ``docs/metrics.md``.
    """

    shadow: bool = Field(False, description="evaluate and report, never block (a dry run)")


#: Fields that do not change what a rule's state means (see :func:`rule_ids`).
_NOT_IDENTITY = {"shadow", "prefetch"}


def rule_ids(rules: Sequence[RuleModel]) -> list[str]:
    """The identity of each of a resource's rules of one kind, which keys its state.

    A digest of the rule's content (16 hex digits of BLAKE2b over its canonical JSON), not
    its position: a rule inserted before it, or a reload that keeps it, leaves its state
    (window counts, breaker state, held permits) where it is. A rule repeated word for
    word gets ``~2``, ``~3``... after its digest, so the copies keep counting apart.
    ``shadow`` is not part of it: a rule moved from shadow to enforced keeps its state;
    nor is ``prefetch`` (the same window, counted the same way), which also keeps the
    identities of rules written before it existed.
    """
    ids: list[str] = []
    seen: dict[str, int] = {}
    for rule in rules:
        text = rule.model_dump_json(by_alias=True, exclude=_NOT_IDENTITY)
        digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
        n = seen[digest] = seen.get(digest, 0) + 1
        ids.append(digest if n == 1 else f"{digest}~{n}")
    return ids
