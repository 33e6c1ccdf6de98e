"""Hot parameters: ``param_flow`` rules (Sentinel's ``ParamFlowRule``).

A ``param_flow`` rule limits each distinct value of one parameter of a call on its own:
``qps`` calls per ``duration_seconds`` (plus ``burst``) for every course id, user or
caller, so one hot value cannot take a route's whole quota. The parameter is read from the
call:

* ``NAME``: a path parameter of the route (``course_id`` of ``POST /kill/{course_id}``), or
  for a code resource (``@guard.resource``) the argument of that name;
* ``query:NAME``, ``header:NAME``, ``state:NAME`` (``request.state.NAME``);
* ``origin``: the caller's origin.

A call without the parameter is not limited by the rule (as in Sentinel). Values are
compared as text (``42`` and ``"42"`` are one value); a value longer than 128 characters or
with characters other than printable ASCII is replaced by a digest (``chain.cap_origin``),
so state and keys stay small whatever a client sends. ``items`` overrides the threshold of
single values, 0 refusing the value outright.

``behavior: reject`` is Sentinel's token bucket; ``behavior: queue`` spaces the calls of a
value ``duration / qps`` apart and makes a call wait (``await``, never blocking the loop)
for its slot, up to ``max_queue_ms``. A refused call gets 429 ``param-flow-limited`` with
``Retry-After``, ``RateLimit`` and ``RateLimit-Policy``. The per-value state is
``backends/param_bucket.py``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal
from urllib.parse import parse_qsl

from pydantic import Field, field_validator

from ._kind import Env, Kind
from ._model import HTTP_METHODS, Rule, check_header_name, rule_ids
from .backends.param_bucket import (
    BUCKET,
    PACING,
    BucketSpec,
    MemoryParamBuckets,
    ParamBuckets,
    ParamResult,
    param_buckets,
)
from .chain import CheckStatus, Context, cap_origin, report_wait
from .errors import ParamFlowLimited, Quota, StorageBlocked, StorageUnavailable
from .storage import Store
from .storage.tasks import in_background

log = logging.getLogger("ymguard")

#: The default bound on the values one rule keeps state for in process (about 300 bytes
#: each: 100,000 values take about 30 MB). Sentinel keeps min(4000 * duration, 200,000).
DEFAULT_MAX_VALUES = 100_000
#: The largest ``max_values`` accepted.
MAX_VALUES = 1_000_000

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SOURCES = ("query", "header", "state")


def check_param(param: str) -> str:
    """``param`` if it names where a call's parameter is read; raises ValueError otherwise."""
    if param == "origin":
        return param
    source, sep, name = param.partition(":")
    if not sep:
        if not _NAME.fullmatch(param):
            raise ValueError(
                f"{param!r} is not a parameter: use a path parameter or argument name (a "
                "Python identifier), query:NAME, header:NAME, state:NAME or origin"
            )
        return param
    if source not in _SOURCES:
        raise ValueError(f"{source!r} is not a parameter source: use query:, header: or state:")
    if not name:
        raise ValueError(f"{source}: needs a name ({source}:NAME)")
    if source == "header":
        check_header_name(name)
    elif source == "state" and not _NAME.fullmatch(name):
        raise ValueError(f"state:{name} must name an attribute (a Python identifier)")
    elif source == "query" and (len(name) > 256 or not name.isprintable()):
        raise ValueError("query:NAME needs a printable name of at most 256 characters")
    return param


def _item_keys(value: Any) -> Any:
    """``items`` with integer keys as text; any other key type is refused."""
    if not isinstance(value, Mapping):
        return value
    out: dict[str, Any] = {}
    for key, threshold in value.items():
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ValueError(f"items keys are values as text or integers, not {key!r}")
        text = str(key)
        if text in out:
            raise ValueError(f"items names the value {text!r} twice")
        out[text] = threshold
    return out


class ParamFlowRule(Rule):
    """One ``param_flow`` rule of a resource (see ``docs/rules.md``)."""

    param: str = Field(description="where the value is read (see the module doc)")
    qps: int = Field(ge=0, description="calls per value per duration_seconds")
    burst: int = Field(0, ge=0, description="extra tokens a value may spend at once")
    duration_seconds: float = Field(1, gt=0)
    behavior: Literal["reject", "queue"] = "reject"
    max_queue_ms: int = Field(500, ge=0, description="queue: longest wait for a slot")
    items: dict[str, int] = Field(default_factory=dict, description="per-value thresholds")
    max_values: int = Field(
        DEFAULT_MAX_VALUES, ge=1, le=MAX_VALUES, description="values kept in process"
    )
    name: str | None = Field(None, min_length=1, description="policy name in RateLimit")

    @field_validator("param")
    @classmethod
    def _param(cls, value: str) -> str:
        return check_param(value)

    @field_validator("items", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        return _item_keys(value)

    @field_validator("items")
    @classmethod
    def _thresholds(cls, value: dict[str, int]) -> dict[str, int]:
        for key, threshold in value.items():
            if threshold < 0:
                raise ValueError(f"the threshold of {key!r} must be 0 (refused) or more")
        return value


# -- reading the parameter -------------------------------------------------------------


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def param_reader(param: str) -> Callable[[Context], str | None]:
    """A function reading the parameter ``param`` of a call as text (None: not there)."""
    if param == "origin":
        return lambda ctx: ctx.origin or None
    source, _, name = param.partition(":")
    if source == "query" and name:

        def query(ctx: Context) -> str | None:
            raw: bytes = (ctx.scope or {}).get("query_string", b"")
            if not raw:
                return None
            for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
                if key == name:
                    return value
            return None

        return query
    if source == "header" and name:
        header = name.lower().encode("latin-1")

        def from_header(ctx: Context) -> str | None:
            for key, value in (ctx.scope or {}).get("headers", ()):
                if key == header:
                    text: str = bytes(value).decode("utf-8", "surrogateescape")
                    return text
            return None

        return from_header
    if source == "state" and name:
        return lambda ctx: _text(((ctx.scope or {}).get("state") or {}).get(name))
    return lambda ctx: _text(ctx.params.get(param))


def _route_params(resource: str) -> frozenset[str] | None:
    """The path parameter names of an HTTP resource's template (None: a code resource)."""
    method, _, path = resource.partition(" ")
    if method not in HTTP_METHODS or not path.startswith("/"):
        return None
    return frozenset(m.split(":")[0] for m in re.findall(r"\{([^}]*)\}", path))


# -- the check -------------------------------------------------------------------------


class ParamFlowCheck:
    """One ``param_flow`` rule of one resource: a bucket (or a schedule) per value."""

    kind = "param_flow"

    #: A finished call has nothing to give back: exit only runs when a later check blocks.
    exit_after_call = False

    def __init__(
        self, store: Store, resource: str, index: int, rule: ParamFlowRule, identity: str
    ) -> None:
        self.store = store
        self.resource = resource
        self.index = index
        self.rule = rule
        self.read = param_reader(rule.param)
        # Compared capped, as values are: an item key of 200 characters still matches.
        self.items = {cap_origin(key): n for key, n in rule.items.items()}
        self.name = f"{resource}#{identity}"
        self.buckets: ParamBuckets = param_buckets(store, self.name, rule.max_values)
        self._local: ParamBuckets | None = None
        # The memory store decides without a coroutine (as the flow window does).
        self._decide = self.buckets.decide if isinstance(self.buckets, MemoryParamBuckets) else None
        self.mode = PACING if rule.behavior == "queue" else BUCKET
        self.duration_ms = rule.duration_seconds * 1000.0
        self.policy_name = rule.name or ("param_flow" if index == 0 else f"param_flow-{index}")
        self.description = f"param_flow[{index}] {rule.param} qps={rule.qps}"
        self._specs: dict[int, BucketSpec] = {}

    def __repr__(self) -> str:
        return f"ParamFlowCheck({self.resource!r}, {self.description!r})"

    def status(self) -> CheckStatus:
        """The rule's numbers, and how many values it keeps in process (memory store)."""
        state: dict[str, Any] = {
            "param": self.rule.param,
            "qps": self.rule.qps,
            "burst": self.rule.burst,
            "behavior": self.rule.behavior,
            "items": len(self.items),
        }
        size = getattr(self.buckets, "__len__", None)
        if size is not None:
            state["values"] = size()
        return CheckStatus("param_flow", self.resource, self.description, state)

    def _spec(self, count: int) -> BucketSpec:
        spec = self._specs.get(count)
        if spec is None:
            rule = self.rule
            spec = BucketSpec(self.mode, count, rule.burst, self.duration_ms, rule.max_queue_ms)
            if len(self._specs) < 64:  # the rule's threshold and its items: bounded
                self._specs[count] = spec
        return spec

    def _refuse(self, count: int, wait: float) -> ParamFlowLimited:
        limit = count + self.rule.burst if count else 0
        quota = Quota(self.policy_name, limit, self.rule.duration_seconds, 0, wait)
        return ParamFlowLimited(self.resource, self.description, retry_after=wait, quota=quota)

    def _local_buckets(self) -> ParamBuckets:
        if self._local is None:
            self._local = param_buckets(self.store.local, self.name, self.rule.max_values)
        return self._local

    async def enter(self, ctx: Context) -> Any:
        raw = self.read(ctx)
        if raw is None:
            return None
        value = cap_origin(raw) if raw else raw
        count = self.items.get(value, self.rule.qps)
        if count == 0:  # a refused value (or qps: 0): no state at all
            raise self._refuse(0, self.rule.duration_seconds)
        spec = self._spec(count)
        buckets = self.buckets
        if self._decide is not None:  # the memory store: no coroutine per call
            result = self._decide(value, spec)
        else:
            try:
                result = await buckets.acquire(value, spec)
            except StorageUnavailable:
                refusal = StorageBlocked(self.resource, self.description, retry_after=1.0)
                if self.store.on_outage(refusal) == "open":
                    return None
                buckets = self._local_buckets()
                result = await buckets.acquire(value, spec)
        queued = self.rule.behavior == "queue"
        if not result.admitted:
            if queued:
                report_wait(ctx, self, 0.0, "rejected")
            raise self._refuse(count, result.wait_seconds)
        if result.wait_seconds > 0:
            started = time.perf_counter()
            try:
                await self._wait(buckets, value, spec, result)
            except asyncio.CancelledError:
                report_wait(ctx, self, time.perf_counter() - started, "cancelled")
                raise
        if queued:
            report_wait(ctx, self, result.wait_seconds, "acquired")
        return (buckets, value, spec, result.slot)

    @staticmethod
    async def _wait(
        buckets: ParamBuckets, value: str, spec: BucketSpec, result: ParamResult
    ) -> None:
        """Sleep until the call's slot (pacing); a waiter that leaves gives its slot back."""
        try:
            await asyncio.sleep(result.wait_seconds)
        except asyncio.CancelledError:
            in_background(buckets.refund(value, spec, result.slot))
            raise

    async def exit(self, ctx: Context, token: Any) -> None:
        if token is not None and ctx.blocked is not None:
            buckets, value, spec, slot = token
            try:
                await buckets.refund(value, spec, slot)
            except StorageUnavailable:
                pass


def build_param_flow_checks(
    store: Store, resource: str, rules: list[ParamFlowRule]
) -> list[ParamFlowCheck]:
    """The checks for a resource's ``param_flow`` rules, in file order."""
    params = _route_params(resource)
    checks = []
    for index, (rule, identity) in enumerate(zip(rules, rule_ids(rules), strict=True)):
        if params is not None and ":" not in rule.param and rule.param != "origin":
            if rule.param not in params:
                log.warning(
                    "ymguard: param_flow[%d] of %r reads path parameter %r, which the route "
                    "does not have: the rule never applies",
                    index,
                    resource,
                    rule.param,
                )
        checks.append(ParamFlowCheck(store, resource, index, rule, identity))
    return checks


def _build(env: Env, resource: str, rules: list[ParamFlowRule]) -> list[ParamFlowCheck]:
    return build_param_flow_checks(env.store, resource, rules)


#: The ``param_flow`` kind's registry entry.
KIND = Kind("param_flow", 30, ParamFlowRule, _build)

__all__ = [
    "DEFAULT_MAX_VALUES",
    "KIND",
    "MAX_VALUES",
    "ParamFlowCheck",
    "ParamFlowRule",
    "build_param_flow_checks",
    "check_param",
    "param_reader",
]
