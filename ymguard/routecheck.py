"""Rules that name no route: found at startup (a warning) and by ``ymguard check --app``.

A rule for ``GET /item/{id}`` when the app serves ``/items/{item_id}`` guards nothing, and
nothing else would say so. Once the app's routes are known (the ASGI lifespan startup),
:func:`warn_unmatched_rules` logs one warning per HTTP rule that matches no route, naming
the nearest route. Code resources (``@guard.resource`` names) are not routes and are
not checked.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from starlette.routing import Mount, WebSocketRoute

from ._model import HTTP_METHODS

if TYPE_CHECKING:
    from .guard import Guard
    from .rules import RulesFile

log = logging.getLogger("ymguard")

#: A route: the methods it serves (None: every method) and its full template.
Route = tuple[frozenset[str] | None, str]

# The rules each guard was last checked with: a reload checks the new rules once more.
_checked: weakref.WeakKeyDictionary[Guard, RulesFile] = weakref.WeakKeyDictionary()


def find_routes(app: Any) -> list[Any] | None:
    """The route list of a Starlette or FastAPI app, looking through middleware wrappers.

    Returns None when ``app`` has no router (a plain ASGI callable).
    """
    for _ in range(32):  # a wrapper chain longer than this is not an app stack
        if app is None:
            return None
        router = getattr(app, "router", None)
        routes = getattr(router if router is not None else app, "routes", None)
        if isinstance(routes, list):
            return routes
        app = getattr(app, "app", None)
    return None


def iter_routes(routes: Iterable[Any], prefix: str = "") -> Iterator[Route]:
    """Every HTTP route under ``routes`` with its full template, as the middleware names it.

    Mounted apps are walked with the mount's path as prefix (a mount whose app has no
    routes is one route for every method), as are FastAPI's included routers.
    """
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if candidates is not None:
            yield from iter_routes(candidates(), prefix)
            continue
        if isinstance(route, WebSocketRoute):
            continue
        template = str(getattr(route, "path_format", None) or getattr(route, "path", ""))
        if isinstance(route, Mount):
            inner = route.routes
            if inner:
                yield from iter_routes(inner, prefix + route.path)
            else:
                yield None, prefix + template
            continue
        if not template:
            continue  # a Host, or something else that is not a path route
        methods = getattr(route, "methods", None)
        yield (frozenset(m.upper() for m in methods) if methods else None), prefix + template


def is_http_resource(name: str) -> bool:
    """Whether a resource name is an HTTP resource (``METHOD /route``) rather than code."""
    method, _, path = name.partition(" ")
    return method in HTTP_METHODS and path.startswith("/")


def unmatched_rules(names: Iterable[str], routes: Iterable[Route]) -> list[tuple[str, str | None]]:
    """Each HTTP resource name that no route serves, with the nearest route's name (or None).

    Args:
        names: resource names of the rules (code resources are skipped).
        routes: the app's routes (:func:`iter_routes`).
    """
    routes = list(routes)
    served = [f"{m} {t}" for methods, t in routes for m in sorted(methods or {"GET", "POST"})]
    out: list[tuple[str, str | None]] = []
    for name in names:
        if not is_http_resource(name):
            continue
        method, _, path = name.partition(" ")
        if any(t == path and (ms is None or method in ms) for ms, t in routes):
            continue
        nearest = difflib.get_close_matches(name, served, n=1, cutoff=0.5)
        out.append((name, nearest[0] if nearest else None))
    return out


def describe_unmatched(name: str, nearest: str | None) -> str:
    """The sentence for one rule that matches no route."""
    hint = f"; nearest route: {nearest!r}" if nearest else ""
    return f"rule {name!r} matches no route of the app: it guards nothing{hint}"


def warn_unmatched_rules(guard: Guard, app: Any) -> None:
    """Log a warning for each HTTP rule of ``guard`` that no route of ``app`` serves.

    Called at the ASGI lifespan startup by :class:`~ymguard.GuardMiddleware`; it checks a
    guard's rules once (again after a reload). An app without a router is not checked.
    """
    rules = guard.rules
    if _checked.get(guard) is rules:
        return
    _checked[guard] = rules
    try:
        routes = find_routes(app)
        if routes is None:
            return
        unmatched = unmatched_rules(rules.resources, iter_routes(routes))
    except Exception:  # an odd router must never stop the app from starting
        log.warning("ymguard: could not check the rules against the app's routes", exc_info=True)
        return
    for name, nearest in unmatched:
        log.warning("ymguard: %s", describe_unmatched(name, nearest))


def import_exception(path: str) -> str | None:
    """Why ``module:ExceptionName`` of an ``errors:`` entry does not import (None if it does).

    This imports the module, so it runs its code: only for rules the app's owner wrote.
    """
    module_name, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # whatever the module raises on import is the answer
        return f"cannot import {path!r}: {type(exc).__name__}: {exc}"
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        return f"{path!r} is not an exception class"
    return None


__all__ = [
    "find_routes",
    "import_exception",
    "is_http_resource",
    "iter_routes",
    "unmatched_rules",
    "warn_unmatched_rules",
]
