"""The shop's business errors, and problem+json for every error the app answers with.

Business code raises a :class:`BusinessError` subclass (the seed's ``BusinessException``)
and never builds a response; ``rules.yaml`` maps each one under ``errors:`` and ymguard's
exception mapper renders it as RFC 9457 ``application/problem+json`` whose ``type`` ends
with the error's ``code``. :func:`install_problem_handlers` renders everything else the same
way: unknown routes, validation errors, business errors the rules do not name, crashes.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from ymguard.errors import ProblemResponse


class BusinessError(Exception):
    """A business rule said no (the seed's ``BusinessException``).

    Subclasses name a ``code`` (the last segment of the problem ``type``), a ``status``
    and a ``title``; ``rules.yaml`` maps them under ``errors:``. The message, if any, is
    the problem's ``detail``.
    """

    code: ClassVar[str] = "business-error"
    status: ClassVar[int] = 400
    title: ClassVar[str] = "Business rule violated"


class SoldOut(BusinessError):
    """The kill course has no stock left."""

    code = "sold-out"
    status = 409
    title = "Sold out"


class NotFound(BusinessError):
    """The activity, course or order asked for does not exist (or is not the caller's)."""

    code = "not-found"
    status = 404
    title = "Not found"


class AlreadyPurchased(BusinessError):
    """The buyer already holds as many of this kill course as ``kill_limit`` allows."""

    code = "already-purchased"
    status = 409
    title = "Already purchased"


class ActivityNotOngoing(BusinessError):
    """The activity has not started yet, or has ended (by the server's clock)."""

    code = "activity-not-ongoing"
    status = 409
    title = "Activity not ongoing"


class AlreadyPublished(BusinessError):
    """The activity was published before (publishing warms the cache exactly once)."""

    code = "already-published"
    status = 409
    title = "Already published"


class UsernameTaken(BusinessError):
    """Another account has this username."""

    code = "username-taken"
    status = 409
    title = "Username taken"


class BadCredentials(BusinessError):
    """No account has this username and password."""

    code = "bad-credentials"
    status = 401
    title = "Bad credentials"


class Unauthorized(BusinessError):
    """The request carries no valid bearer token."""

    code = "unauthorized"
    status = 401
    title = "Unauthorized"


class Forbidden(BusinessError):
    """The caller is signed in but lacks the role (``/admin/*`` needs the admin)."""

    code = "forbidden"
    status = 403
    title = "Forbidden"


class InvalidRequest(BusinessError):
    """The request is well-formed but asks for something that cannot be (end before start)."""

    code = "invalid-request"
    status = 422
    title = "Invalid request"


class ServiceUnavailable(BusinessError):
    """A store the answer depends on (Redis for seckill) did not answer in time: retry."""

    code = "service-unavailable"
    status = 503
    title = "Service unavailable"


def problem(status: int, code: str, title: str, detail: str = "", **extra: Any) -> Response:
    """An ``application/problem+json`` response in the same shape as ymguard's."""
    return ProblemResponse(status, code, title, detail, extra=extra or None)


def _code_of(status: int) -> tuple[str, str]:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return phrase.lower().replace(" ", "-").replace("'", ""), phrase


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code, title = _code_of(exc.status_code)
    detail = exc.detail if isinstance(exc.detail, str) else title
    response = problem(exc.status_code, code, title, detail)
    response.headers.update(exc.headers or {})
    return response


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return problem(422, "validation-error", "Validation error", "invalid request", errors=errors)


async def _business_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BusinessError)
    return problem(exc.status, exc.code, exc.title, str(exc) or exc.title)


async def _crash(request: Request, exc: Exception) -> Response:
    # Starlette re-raises the exception after this response, and uvicorn logs it.
    return problem(500, "internal-error", "Internal server error")


def install_problem_handlers(app: FastAPI) -> None:
    """Answer HTTP errors, validation errors, business errors and crashes as problem+json.

    Call it before ``guard.install(app)``: the guard's mapper then takes over the business
    errors that ``rules.yaml`` names, and this handler keeps the ones it does not. The
    codes (``not-found``, ``validation-error``, ``internal-error``) are ymguard's own, so
    an app answers the same whichever of the two renders an error.
    """
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(BusinessError, _business_error)
    app.add_exception_handler(Exception, _crash)


__all__ = [
    "ActivityNotOngoing",
    "AlreadyPublished",
    "AlreadyPurchased",
    "BadCredentials",
    "BusinessError",
    "Forbidden",
    "InvalidRequest",
    "NotFound",
    "ServiceUnavailable",
    "SoldOut",
    "Unauthorized",
    "UsernameTaken",
    "install_problem_handlers",
    "problem",
]
