"""The ``Blocked`` hierarchy and its rendering as RFC 9457 problem details.

Every refusal ymguard makes is a :class:`Blocked` subclass that knows the rule that
blocked, the resource, and how long the caller should wait. :func:`problem_response`
turns one (or any mapped application exception) into an ``application/problem+json``
response with ``Retry-After`` and the IETF ``RateLimit`` / ``RateLimit-Policy`` headers
(draft-ietf-httpapi-ratelimit-headers-10, structured-field syntax).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.responses import Response

#: Prefix of every problem ``type`` URI; the last path segment is the problem code.
PROBLEM_BASE = "https://ymguard.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class YmguardError(Exception):
    """Base of every error ymguard raises."""


class StorageUnavailable(YmguardError):
    """The store (Redis) refused, timed out or is in a known outage."""


class SyncResourceError(YmguardError, RuntimeError):
    """A sync guarded function was called where its guard cannot run.

    A sync ``@guard.resource`` (or sync ``@guard.limit`` endpoint) enters its chain by
    hopping to the app's event loop from the caller's thread. Called on the event loop's
    own thread that hop would deadlock and any store I/O would block the loop, so the call
    is refused the same way on every store; on Redis it is also refused when no app loop
    is running to hop to. Raised at call time, before anything is spent; a ``fallback``
    receives it like any other failure of the call.
    """


@dataclass(frozen=True, slots=True)
class RuleProblem:
    """One problem found in a rules file: where it is and why it is wrong."""

    file: str
    line: int
    field: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.why}"


class RulesError(YmguardError, ValueError):
    """A rules file (or dict) that does not validate; ``problems`` lists every problem."""

    def __init__(self, problems: list[RuleProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True, slots=True)
class Quota:
    """The quota a flow rule enforces, for the ``RateLimit`` headers."""

    name: str
    limit: int
    window_seconds: float
    remaining: int
    reset_seconds: float


class Blocked(YmguardError):
    """A request or call that a rule refused.

    Attributes:
        resource: the resource name (``METHOD /route/{template}`` or a code resource).
        rule: a short description of the rule that blocked (``flow[0] qps=10``).
        retry_after: seconds after which a retry may succeed, or ``None``.
        quota: the flow quota, when the rule has one (drives the ``RateLimit`` headers).
    """

    status: ClassVar[int] = 429
    code: ClassVar[str] = "blocked"
    title: ClassVar[str] = "Request blocked"

    def __init__(
        self,
        resource: str,
        rule: str = "",
        *,
        retry_after: float | None = None,
        detail: str | None = None,
        quota: Quota | None = None,
    ) -> None:
        self.resource = resource
        self.rule = rule
        self.retry_after = retry_after
        self.quota = quota
        self.detail = detail or (f"{self.title}: {resource} ({rule})" if rule else self.title)
        super().__init__(self.detail)


class FlowLimited(Blocked):
    """A ``flow`` rule (QPS or concurrency) refused the request."""

    code = "flow-limited"
    title = "Too many requests"


class ParamFlowLimited(Blocked):
    """A ``param_flow`` (hot parameter) rule refused the request."""

    code = "param-flow-limited"
    title = "Too many requests for this parameter value"


class SemaphoreFull(Blocked):
    """No semaphore permit was free in time."""

    code = "concurrency-limited"
    title = "Too many concurrent requests"


class CircuitOpen(Blocked):
    """A circuit breaker is open (or half-open with its probe already running)."""

    status = 503
    code = "circuit-open"
    title = "Circuit open"


class SystemOverloaded(Blocked):
    """System adaptive protection refused the request."""

    status = 503
    code = "system-overloaded"
    title = "System overloaded"


class OriginDenied(Blocked):
    """An ``authority`` rule refused the caller's origin."""

    status = 403
    code = "origin-denied"
    title = "Origin denied"


class StorageBlocked(Blocked):
    """The store is down and ``on_storage_error: closed`` blocks traffic."""

    status = 503
    code = "storage-unavailable"
    title = "Guard storage unavailable"


class IdempotencyKeyMissing(Blocked):
    """The ``Idempotency-Key`` header is required but missing or malformed."""

    status = 400
    code = "idempotency-key-missing"
    title = "Idempotency-Key missing"


class IdempotencyKeyMismatch(Blocked):
    """An ``Idempotency-Key`` was reused with another request."""

    status = 422
    code = "idempotency-key-mismatch"
    title = "Idempotency-Key reused with another request"


class IdempotencyKeyInFlight(Blocked):
    """The first request with this ``Idempotency-Key`` is still running."""

    status = 409
    code = "idempotency-key-in-flight"
    title = "A request with this Idempotency-Key is in flight"


class IdempotencyBodyTooLarge(Blocked):
    """A request with an ``Idempotency-Key`` has a body over ``max_body_bytes``."""

    status = 413
    code = "idempotency-body-too-large"
    title = "Request body too large for an Idempotency-Key"


class IdempotencyResponseNotKept(Blocked):
    """The first request with this key finished, but its response was not kept to replay."""

    status = 409
    code = "idempotency-response-not-kept"
    title = "The response to this Idempotency-Key was not kept"


class DuplicateSubmission(Blocked):
    """A submit token is missing or was already used."""

    status = 409
    code = "duplicate-submission"
    title = "Duplicate submission"


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` as delta-seconds: rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


def _sf_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c for c in escaped if " " <= c <= "~") + '"'


def _sf_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}".rstrip("0")


def ratelimit_headers(quota: Quota) -> dict[str, str]:
    """The IETF ``RateLimit-Policy`` and ``RateLimit`` headers (draft-10 syntax)."""
    name = _sf_string(quota.name)
    reset = max(0, math.ceil(quota.reset_seconds))
    return {
        "RateLimit-Policy": f"{name};q={quota.limit};w={_sf_number(quota.window_seconds)}",
        "RateLimit": f"{name};r={max(0, quota.remaining)};t={reset}",
    }


class ProblemResponse(Response):
    """An RFC 9457 ``application/problem+json`` response."""

    media_type = PROBLEM_MEDIA_TYPE

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str = "",
        *,
        resource: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
        type_uri: str | None = None,
    ) -> None:
        body: dict[str, Any] = {
            "type": type_uri or PROBLEM_BASE + code,
            "title": title,
            "status": status,
            "detail": detail or title,
        }
        if resource is not None:
            body["resource"] = resource
        if extra:
            body.update(extra)
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        super().__init__(content, status_code=status, headers=dict(headers or {}))


def blocked_response(exc: Blocked) -> ProblemResponse:
    """The problem response for a :class:`Blocked` error, with its headers."""
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = retry_after_header(exc.retry_after)
    if exc.quota is not None:
        headers.update(ratelimit_headers(exc.quota))
    extra: dict[str, Any] = {"rule": exc.rule} if exc.rule else {}
    if exc.retry_after is not None:
        extra["retry_after"] = max(1, math.ceil(exc.retry_after))
    return ProblemResponse(
        exc.status,
        exc.code,
        exc.title,
        exc.detail,
        resource=exc.resource,
        headers=headers,
        extra=extra,
    )


def install_http_problems(app: Any) -> None:
    """Render the framework's errors on ``app`` as problem+json.

    ``HTTPException`` keeps its status and headers; FastAPI's ``RequestValidationError``
    becomes 422 ``validation-error`` listing each invalid field; any other unhandled
    exception becomes 500 ``internal-error`` (the traceback goes to the log, never to the
    client).
    """
    from http import HTTPStatus

    from starlette.exceptions import HTTPException

    def phrase(status: int) -> str:
        try:
            return HTTPStatus(status).phrase
        except ValueError:
            return "Error"

    async def http_error(request: Any, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        title = phrase(exc.status_code)
        code = title.lower().replace(" ", "-").replace("'", "")
        if exc.status_code < 400:  # not an error: keep Starlette's plain response
            return Response(status_code=exc.status_code, headers=exc.headers)
        return ProblemResponse(exc.status_code, code, title, str(exc.detail), headers=exc.headers)

    async def internal_error(request: Any, exc: Exception) -> Response:
        return ProblemResponse(500, "internal-error", "Internal server error")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    try:
        from fastapi.encoders import jsonable_encoder
        from fastapi.exceptions import RequestValidationError
    except ImportError:  # a plain Starlette app
        return

    async def validation_error(request: Any, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in errors)
        return ProblemResponse(
            422,
            "validation-error",
            "Invalid request",
            f"invalid fields: {fields}" if fields else "the request is not valid",
            extra={"errors": jsonable_encoder(errors)},
        )

    app.add_exception_handler(RequestValidationError, validation_error)


__all__ = [
    "PROBLEM_BASE",
    "PROBLEM_MEDIA_TYPE",
    "Blocked",
    "CircuitOpen",
    "DuplicateSubmission",
    "FlowLimited",
    "IdempotencyBodyTooLarge",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyMismatch",
    "IdempotencyKeyMissing",
    "IdempotencyResponseNotKept",
    "OriginDenied",
    "ParamFlowLimited",
    "ProblemResponse",
    "Quota",
    "RuleProblem",
    "RulesError",
    "SemaphoreFull",
    "StorageBlocked",
    "StorageUnavailable",
    "SyncResourceError",
    "SystemOverloaded",
    "YmguardError",
    "blocked_response",
    "install_http_problems",
    "ratelimit_headers",
    "retry_after_header",
]
