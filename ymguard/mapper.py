"""The global exception mapper: Blocked, the ``errors:`` of the rules and ``map_exception``.

Renders every mapped exception as an RFC 9457 ``application/problem+json`` response; one
per guard (``guard.install(app)`` registers it on an app).
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from .chain import current_context
from .errors import Blocked, ProblemResponse, blocked_response, install_http_problems
from .rules import ErrorMapping

log = logging.getLogger("ymguard")


def _import_exception(path: str) -> type[BaseException]:
    module_name, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # ImportError, AttributeError, or the module's own error
        raise ValueError(f"errors: cannot import {path!r}: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise ValueError(f"errors: {path!r} is not an exception class")
    return obj


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "error"


class ExceptionMapper:
    """Exception classes → problem+json, registered on every installed app.

    Args:
        errors: the ``errors:`` section of the current rules (read again after a reload).
    """

    def __init__(self, errors: Callable[[], Mapping[str, ErrorMapping]]) -> None:
        self._errors = errors
        self._exception_map: dict[type[BaseException], ErrorMapping] = {}
        # Apps that install() registered the mapper on; errors: is imported at their
        # startup (not at install: the classes may live in the app's own module).
        self.apps: list[Any] = []
        self._errors_resolved = False

    def rules_changed(self) -> None:
        """The rules were swapped: import their ``errors:`` again at the next use."""
        self._errors_resolved = False

    def map_exception(
        self,
        exc_type: type[BaseException],
        *,
        status: int,
        title: str,
        type: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Render ``exc_type`` (raised by the app) as problem+json with this status and title.

        Works before or after :meth:`install`: a mapping added later is registered on
        every installed app, and once an app has started, ``GuardMiddleware`` renders it.
        """
        self._exception_map[exc_type] = ErrorMapping(
            status=status, title=title, type=type, detail=detail
        )
        for app in self.apps:
            app.add_exception_handler(exc_type, self._handle_exception)

    def problem_for(self, exc: BaseException) -> ProblemResponse | None:
        """The problem response for an exception, or None if it is not mapped."""
        if not self._errors_resolved:
            self.resolve_errors()
        if isinstance(exc, Blocked):
            ctx = current_context.get()
            if ctx is not None and ctx.blocked is None and ctx.status is None:
                # A guard inside the endpoint refused: the request's answer is that
                # refusal, which the outer resource must not count (its breakers).
                ctx.blocked = exc
            return blocked_response(exc)
        for cls in type(exc).__mro__:
            mapping = self._exception_map.get(cls)
            if mapping is not None:
                code = getattr(exc, "code", None)
                code = code if isinstance(code, str) and code else _slug(mapping.title)
                type_uri = mapping.type if mapping.type and "/" in mapping.type else None
                if mapping.type and type_uri is None:
                    code = mapping.type
                ctx = current_context.get()
                return ProblemResponse(
                    mapping.status,
                    code,
                    mapping.title,
                    str(exc) or mapping.detail or mapping.title,
                    resource=ctx.resource if ctx else None,
                    type_uri=type_uri,
                )
        return None

    def install(self, app: Any, *, http_errors: bool = True) -> None:
        """Register the global exception mapper on a Starlette or FastAPI app.

        Maps :class:`Blocked` errors raised inside endpoints, the ``errors:`` of the rules
        and every ``map_exception`` (also one made after this call) to problem+json
        responses. The classes ``errors:`` names are imported when the app starts (its
        first ASGI call), not here, so they may live in the module that calls
        ``install``; one that does not import stops the startup with a ``ValueError``
        naming the entry. ``errors:`` imports code: it is a trust boundary, so rules
        that arrive at run time must never carry it.

        Args:
            app: the Starlette or FastAPI application.
            http_errors: also render the framework's own errors as problem+json
                (``HTTPException`` such as 404 and 405, FastAPI's request validation
                errors as 422 ``validation-error``, and unhandled exceptions as a 500
                ``internal-error`` without a stack trace).
        """
        if http_errors:
            install_http_problems(app)
        if app not in self.apps:
            self.apps.append(app)
        app.add_exception_handler(Blocked, self._handle_exception)
        for exc_type in self._exception_map:
            app.add_exception_handler(exc_type, self._handle_exception)
        build = getattr(app, "build_middleware_stack", None)
        if self._errors_resolved or build is None or getattr(app, "middleware_stack", None):
            self.resolve_errors()  # already started, or not Starlette: no startup to wait for
            return

        # Starlette builds its middleware stack (and copies the exception handlers into
        # it) on its first ASGI call: import errors: just before, once every module is in.
        def build_after_resolving() -> Any:
            self.resolve_errors()
            return build()

        app.build_middleware_stack = build_after_resolving

    def resolve_errors(self) -> None:
        """Import the classes ``errors:`` names and register them on installed apps.

        Runs once per rule set, at the app's startup (or the first mapped error).

        Raises:
            ValueError: naming the entry whose class does not import.
        """
        if self._errors_resolved:
            return
        for path, mapping in self._errors().items():
            exc_type = _import_exception(path)
            if exc_type not in self._exception_map:
                self._exception_map[exc_type] = mapping
                for app in self.apps:
                    app.add_exception_handler(exc_type, self._handle_exception)
        self._errors_resolved = True

    def startup_checks(self) -> None:
        """What ``GuardMiddleware`` checks on the app's first ASGI call.

        Imports ``errors:`` (a clear ``ValueError`` if an entry does not import) and warns
        when ``errors:`` maps exceptions but :meth:`install` was never called, so they
        would answer 500.
        """
        self.resolve_errors()
        if self._errors() and not self.apps:
            log.warning(
                "ymguard: errors: maps %d exception(s) but guard.install(app) was never "
                "called: they will answer 500 instead of problem+json",
                len(self._errors()),
            )

    async def _handle_exception(self, request: Any, exc: Exception) -> Any:
        response = self.problem_for(exc)
        if response is None:  # pragma: no cover - only registered for mapped types
            raise exc
        return response


__all__ = ["ExceptionMapper"]
