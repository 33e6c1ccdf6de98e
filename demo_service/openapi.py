"""The shop's error answers in its OpenAPI schema: one problem+json model for all of them.

Every error the shop answers is RFC 9457 ``application/problem+json`` (see
:mod:`demo_service.errors`; the guards' 429/503 come from ymguard in the same shape). The
routers declare them with ``responses=problems(401, 404, ...)``, so ``/openapi.json`` tells
a client (or a fuzzer, such as schemathesis) what each route may answer, all pointing at one
``Problem`` schema in ``components``. :func:`install` puts that schema there and documents
the 422 of every route as the problem the app's validation handler really answers (FastAPI's
default would promise its own ``HTTPValidationError`` as ``application/json``).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from ymguard.errors import PROBLEM_MEDIA_TYPE


class Problem(BaseModel):
    """An error answer, RFC 9457 problem details (``application/problem+json``).

    ``type`` ends with the error's code (``.../sold-out``, ``.../rate-limited``...); more
    members may follow (``resource``, ``errors`` of a validation error, ``retry_after``...).
    """

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="A URI whose last path segment is the error's code.")
    title: str = Field(description="A short summary of the kind of error.")
    status: int = Field(description="The HTTP status code.")
    detail: str | None = Field(None, description="What went wrong this time.")


#: Where the one ``Problem`` schema lives in the document.
PROBLEM_REF = "#/components/schemas/Problem"

#: What each status means in the shop, for the schema's descriptions.
_MEANING = {
    400: "Bad request",
    401: "No valid bearer token (``unauthorized``), or bad credentials",
    403: "Signed in, but not allowed (``forbidden``)",
    404: "No such thing, or not the caller's (``not-found``)",
    409: "A business rule said no (sold out, already purchased, duplicate submission...)",
    422: "The request is malformed (``validation-error``) or asks for the impossible",
    429: "A guard's limit was hit: retry later (``Retry-After``)",
    503: "A store or the payment provider is not answering, or a breaker is open: retry",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a router or route: each status answered as a :class:`Problem`."""
    return {
        status: {
            "description": _MEANING.get(status) or HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": PROBLEM_REF}}},
        }
        for status in statuses
    }


def install(app: FastAPI) -> None:
    """Add the ``Problem`` schema to ``app``'s OpenAPI document, and answer 422 with it.

    Call it once the routers are included; ``app.openapi()`` builds the document lazily.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        validation = problems(422)[422]
        for path in document.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses") if isinstance(operation, dict) else None
                if responses and "422" in responses and _fastapi_default(responses["422"]):
                    responses["422"] = validation
        for name in ("HTTPValidationError", "ValidationError"):
            if name not in json.dumps(document.get("paths", {})):
                schemas.pop(name, None)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _fastapi_default(response: dict[str, Any]) -> bool:
    return "HTTPValidationError" in json.dumps(response)


__all__ = ["PROBLEM_REF", "Problem", "install", "problems"]
