"""The shop's pages: server-rendered HTML for a person in a browser.

Pages live at the paths people expect (``/``, ``/activities/{id}``, ``/orders/{no}``,
``/me/courses``, ``/login``); where a path is also a JSON route of the API, the page is
served only to a request that asks for HTML (``Accept`` prefers ``text/html`` over JSON, as
every browser navigation does). API clients (``Accept: application/json`` or ``*/*``) get
the JSON as before: :class:`HtmlRoute` simply does not match them. Pages are left out of
``/openapi.json``.

How the pages authenticate, and why it is CSRF-safe:

- The pages use the API's own bearer tokens. ``/login`` posts to ``POST /auth/login`` with
  ``fetch`` and keeps the token in ``localStorage``; the scripts send it as
  ``Authorization: Bearer`` on every API call. The shop sets no cookie but the admin's
  dashboard session (``HttpOnly``, ``SameSite=Strict``, ``Path=/ymguard``, a token the
  API refuses: ``POST /auth/dashboard-session``), so a foreign
  site can make a browser send nothing that authenticates it: there is no ambient
  credential to forge a request with (no CSRF), and no CSRF token is needed.
- The price of ``localStorage`` is that a script injected into a page could read the token:
  so no page carries an inline script or an inline style, every page is sent with a strict
  ``Content-Security-Policy`` (scripts, styles and fetches from this origin only), Jinja
  autoescapes everything, data reaches scripts only through escaped ``data-*`` attributes,
  and the scripts write text with ``textContent``, never ``innerHTML``.
- Pages render only public data on the server (activities, stock, the server's clock);
  what belongs to a person (orders, courses) is fetched by the page's script with the
  token, so a page's HTML never differs by who asks and never leaks anyone's data.

A refusal on the way (the guards' 429/503, a 404) reaches a browser as a page in plain
words: :class:`HtmlErrors` renders a problem+json answer to a navigation as
``error.html``; the scripts turn the problems of their ``fetch`` calls into sentences
(``static/shop.js``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import activities

_HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = _HERE / "templates"
STATIC_DIR = _HERE / "static"

#: Sent with every page: scripts, styles, images and fetches from this origin only; no
#: inline script or style, no plugin, no framing, forms post only here.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Vary": "Accept",
}

#: Most bytes of a problem+json body :class:`HtmlErrors` reads to render it as a page.
MAX_PROBLEM_BYTES = 64 * 1024

templates = Jinja2Templates(
    env=jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # every template, whatever its file name
        undefined=jinja2.StrictUndefined,
    )
)


def _pattern_convertor(pattern: str) -> Convertor[str]:
    """A path segment that must match ``pattern`` (else the route does not match at all)."""

    class _Pattern(_PatternConvertor):
        regex = pattern

    return _Pattern()


class _PatternConvertor(Convertor[str]):
    """A path segment taken as it is; subclasses set ``regex``."""

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


#: An order number (``orders.new_order_no``) and a kill order number (``seckill``).
ORDER_NO = r"O[0-9]{13}[0-9a-f]{12}"
KILL_ORDER_NO = r"K[1-9][0-9]{0,9}-[0-9]{13}[0-9a-f]{12}"
register_url_convertor("demo_order_no", _pattern_convertor(ORDER_NO))
register_url_convertor("demo_any_order_no", _pattern_convertor(f"(?:{ORDER_NO}|{KILL_ORDER_NO})"))
register_url_convertor("demo_id", _pattern_convertor(r"[1-9][0-9]{0,9}"))


def _accept_quality(accept: str) -> dict[str, float]:
    qualities: dict[str, float] = {}
    for part in accept.split(",")[:32]:
        media, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        qualities.setdefault(media.strip().lower(), q)
    return qualities


def wants_html(scope: Scope) -> bool:
    """Whether a GET/HEAD request asks for HTML rather than JSON (a browser navigation).

    True when ``Accept`` names ``text/html`` and ranks it at least as high as
    ``application/json``; ``*/*`` alone (httpx, curl, ``fetch``) is not a wish for HTML.
    """
    if scope.get("type") != "http" or scope.get("method") not in ("GET", "HEAD"):
        return False
    accept = ""
    for name, value in scope.get("headers", ()):
        if name == b"accept":
            accept = bytes(value)[:1024].decode("latin-1")
            break
    qualities = _accept_quality(accept)
    html = qualities.get("text/html", 0.0)
    return html > 0 and html >= qualities.get("application/json", 0.0)


class HtmlRoute(APIRoute):
    """A page route that matches only requests wanting HTML (see :func:`wants_html`).

    Put before the API's routers, it shares their paths: JSON clients never see it.
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        """No match unless the request wants HTML; else as any route."""
        if not wants_html(scope):
            return Match.NONE, {}
        return super().matches(scope)


def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """The template ``name`` rendered with ``context``, with the pages' security headers."""
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers.update(PAGE_HEADERS)
    return response


router = APIRouter(include_in_schema=False)
#: The pages whose path is also a JSON route: they must come before the API's routers.
_negotiated = APIRouter(route_class=HtmlRoute, include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def home(request: Request) -> Response:
    """The published activities, newest first."""
    listing = await activities.list_activities(request)
    return page(request, "index.html", **listing)


@router.get("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Log in or register; the script then returns to ``?next=`` (a path of this site)."""
    return page(request, "login.html")


@_negotiated.get("/activities/{activity_id:demo_id}", response_class=HTMLResponse)
async def activity(activity_id: str, request: Request) -> Response:
    """The seckill page: countdown on the server's clock, live stock, the buy button."""
    described = await activities.get_activity(int(activity_id), request)
    return page(request, "activity.html", activity=described, server_time=described["server_time"])


@router.get("/orders/{order_no:demo_any_order_no}/confirm", response_class=HTMLResponse)
async def confirm(order_no: str, request: Request) -> Response:
    """Confirm the order of a kill order (``K...``): pay type, then place and pay it."""
    return page(request, "confirm.html", order_no=order_no)


@_negotiated.get("/orders/{order_no:demo_order_no}", response_class=HTMLResponse)
async def order(order_no: str, request: Request) -> Response:
    """An order's result: follows its status until it is PAID or cancelled."""
    return page(request, "order.html", order_no=order_no)


@_negotiated.get("/me/courses", response_class=HTMLResponse)
async def my_courses(request: Request) -> Response:
    """The courses the signed-in person owns."""
    return page(request, "courses.html")


router.include_router(_negotiated)

#: A page's title and sentence for each problem code (and status) a navigation may meet.
HUMAN_MESSAGES: dict[str, tuple[str, str]] = {
    "not-found": ("Not found", "There is nothing here. It may have been removed."),
    "unauthorized": ("Please log in", "This needs you to be logged in: use the Log in link above."),
    "forbidden": ("Not for you", "Your account may not open this page."),
    "flow-limited": (
        "A lot of people right now",
        "The shop is taking as many visitors as it can. Please wait a moment and reload.",
    ),
    "concurrency-limited": (
        "A lot of people right now",
        "The shop is taking as many visitors as it can. Please wait a moment and reload.",
    ),
    "system-overloaded": (
        "The shop is busy",
        "The shop is under heavy load. Please try again in a few seconds.",
    ),
    "storage-unavailable": (
        "Temporarily unavailable",
        "Part of the shop is not answering. Please try again in a few seconds.",
    ),
    "service-unavailable": (
        "Temporarily unavailable",
        "Part of the shop is not answering. Please try again in a few seconds.",
    ),
}
_BY_STATUS: dict[int, tuple[str, str]] = {
    404: HUMAN_MESSAGES["not-found"],
    429: HUMAN_MESSAGES["flow-limited"],
    503: HUMAN_MESSAGES["service-unavailable"],
}
_FALLBACK = ("Something went wrong", "The shop could not show this page. Please try again.")


def human_message(status: int, problem: dict[str, Any]) -> tuple[str, str]:
    """The title and sentence a person sees for a problem answer."""
    kind = problem.get("type")
    code = kind.rstrip("/").rsplit("/", 1)[-1] if isinstance(kind, str) else ""
    return HUMAN_MESSAGES.get(code) or _BY_STATUS.get(status) or _FALLBACK


class HtmlErrors:
    """Renders a problem+json answer to a browser navigation as a readable page.

    Wrap it around everything (the guards included): a navigation refused with 429 or 503,
    or one to a page that is not there, then shows a sentence and a way back, with the
    same status and ``Retry-After``. Requests that do not want HTML pass untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not wants_html(scope):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()

        async def send_or_hold(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and start is None:
                headers = dict(message.get("headers", ()))
                media = bytes(headers.get(b"content-type", b"")).split(b";")[0].strip()
                if media == b"application/problem+json":
                    start = message
                    return
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            if len(body) < MAX_PROBLEM_BYTES:
                body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                await self._render(scope, start, bytes(body), send)

        await self.app(scope, receive, send_or_hold)

    @staticmethod
    async def _render(scope: Scope, start: Message, body: bytes, send: Send) -> None:
        status = int(start["status"])
        try:
            problem = json.loads(body)
        except ValueError:
            problem = {}
        if not isinstance(problem, dict):
            problem = {}
        title, sentence = human_message(status, problem)
        retry = None  # kept only as delay-seconds (what the guards send)
        for name, value in start.get("headers", ()):
            text = bytes(value).decode("latin-1").strip()
            if bytes(name).lower() == b"retry-after" and re.fullmatch(r"[0-9]{1,6}", text):
                retry = text
        html = templates.get_template("error.html").render(
            status=status, title=title, sentence=sentence, retry_after=retry
        )
        response = HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)
        if retry is not None:
            response.headers["Retry-After"] = retry
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def install(app: FastAPI) -> None:
    """Serve ``/static`` (the CSS and scripts) and the pages (call before the API routers)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "HUMAN_MESSAGES",
    "HtmlErrors",
    "HtmlRoute",
    "human_message",
    "install",
    "page",
    "router",
    "templates",
    "wants_html",
]
