"""The dashboard as a mountable ASGI app: one page, its static files, and ``api/snapshot``.

Every request, the page's included, is first put to the ``authorize`` callable the app
passes in; a refusal is answered with problem+json (403, or the status of an
``HTTPException`` it raised, e.g. 401). The page needs no build step and no network
access beyond its own mount: its script draws the charts on canvases.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from ..errors import ProblemResponse
from ..types import Receive, Scope, Send
from .monitor import Monitor

if TYPE_CHECKING:
    from ..guard import Guard

#: Decides whether a request may see the dashboard: True lets it in, False answers 403.
#: It may be async, and may raise ``starlette.exceptions.HTTPException`` (e.g. 401).
Authorize = Callable[[Request], bool | Awaitable[bool]]

STATIC = Path(__file__).parent / "static"
_FILES = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
#: The longest ``since`` value accepted (digits).
_MAX_SINCE_DIGITS = 12


class Dashboard:
    """The live dashboard of a guard, an ASGI app to mount (``app.mount("/ymguard", ...)``).

    Routes, relative to the mount: ``/`` the page, ``/static/...`` its script and style,
    ``/api/snapshot`` the data as JSON (``?since=<epoch second>`` for the seconds after
    it only). Made by :meth:`Guard.dashboard <ymguard.Guard.dashboard>`.

    Args:
        guard: the guard to show.
        monitor: its :class:`~ymguard.dashboard.monitor.Monitor`.
        authorize: ``request -> bool`` (sync or async) deciding who may see it.
        title: the page's title.
    """

    def __init__(
        self, guard: Guard, monitor: Monitor, *, authorize: Authorize, title: str = "ymguard"
    ) -> None:
        if not callable(authorize):
            raise TypeError("authorize must be a callable: request -> bool (sync or async)")
        self.guard = guard
        self.monitor = monitor
        self.authorize = authorize
        self.title = title
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        self._page = page.replace("{{title}}", _escape(title)).encode()
        self._files = {name: (STATIC / name).read_bytes() for name in _FILES}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # served on its own: nothing to start
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        response = await self._respond(Request(scope, receive))
        await response(scope, receive, send)

    async def _respond(self, request: Request) -> Response:
        try:
            verdict = self.authorize(request)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except HTTPException as exc:
            code = "unauthorized" if exc.status_code == 401 else "forbidden"
            return ProblemResponse(
                exc.status_code,
                code,
                _title(exc.status_code),
                str(exc.detail or ""),
                headers=exc.headers,
            )
        if verdict is not True:
            return ProblemResponse(
                403, "forbidden", "Forbidden", "not allowed to see the dashboard"
            )
        if request.method not in ("GET", "HEAD"):
            return ProblemResponse(
                405, "method-not-allowed", "Method not allowed", headers={"Allow": "GET, HEAD"}
            )
        path = _route_path(request)
        if path == "":  # relative links need the trailing slash
            return RedirectResponse(request.url.path + "/", status_code=307)
        if path == "/":
            return Response(self._page, media_type="text/html; charset=utf-8", headers=_HEADERS)
        if path == "/api/snapshot":
            raw = request.query_params.get("since")
            since = None
            if raw is not None:
                if not (raw.isdigit() and len(raw) <= _MAX_SINCE_DIGITS):
                    return ProblemResponse(
                        400, "bad-request", "Bad request", "since must be an epoch second"
                    )
                since = int(raw)
            data = await self.monitor.snapshot(since)
            data["title"] = self.title
            return JSONResponse(data, headers=_HEADERS)
        name = path.removeprefix("/static/")
        if name in _FILES:
            headers = {**_HEADERS, "Cache-Control": "no-cache"}
            return Response(self._files[name], media_type=_FILES[name], headers=headers)
        return ProblemResponse(404, "not-found", "Not found", f"no dashboard page {path!r}")


def _route_path(request: Request) -> str:
    """The request's path below the mount point."""
    path: str = request.scope["path"]
    root: str = request.scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :]
    return path


def _title(status: int) -> str:
    return {401: "Unauthorized", 403: "Forbidden"}.get(status, "Refused")


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#x27;")
    )
