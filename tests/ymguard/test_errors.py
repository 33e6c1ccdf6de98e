"""The global exception mapper: ``errors:``, ``map_exception`` and ``install`` in any order."""

from __future__ import annotations

import importlib
import logging
import textwrap
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from ymguard import Guard, GuardMiddleware


class Late(Exception):
    """An app exception mapped only after ``install()``."""


class SoldOut(Exception):
    """An app exception named by ``errors:``."""


def client(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def late_app(guard: Guard, *, middleware: bool) -> FastAPI:
    app = FastAPI()

    @app.get("/late")
    async def late() -> None:
        raise Late("too late")

    if middleware:
        app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    return app


async def test_map_exception_after_install_is_rendered() -> None:
    guard = Guard()
    app = late_app(guard, middleware=False)
    guard.map_exception(Late, status=409, title="Too late")
    async with client(app) as c:
        response = await c.get("/late")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/too-late")


async def test_map_exception_after_the_app_started_is_rendered_by_the_middleware() -> None:
    guard = Guard()
    app = late_app(guard, middleware=True)
    async with client(app, raise_app_exceptions=False) as c:
        assert (await c.get("/late")).status_code == 500  # not mapped yet
        guard.map_exception(Late, status=409, title="Too late")
        response = await c.get("/late")
    assert response.status_code == 409
    body = response.json()
    assert body["detail"] == "too late" and body["resource"] == "GET /late"


APP_MODULE = """
from fastapi import FastAPI

from ymguard import Guard, GuardMiddleware

# errors: names a class of this very module, defined below install().
guard = Guard({"errors": {"%(name)s:SoldOut": {"status": 409, "title": "Sold out"}}})
app = FastAPI()
app.add_middleware(GuardMiddleware, guard=guard)
guard.install(app)


class SoldOut(Exception):
    pass


@app.get("/buy")
async def buy() -> None:
    raise SoldOut("course 7 is sold out")
"""


async def test_errors_naming_a_class_of_the_apps_own_module_resolve_at_startup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"ymguard_errors_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(APP_MODULE % {"name": name}))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)  # install() ran before SoldOut existed
    async with client(module.app) as c:
        response = await c.get("/buy")
    assert response.status_code == 409
    assert response.json()["detail"] == "course 7 is sold out"


async def test_forgetting_install_is_a_startup_warning(caplog: pytest.LogCaptureFixture) -> None:
    guard = Guard({"errors": {f"{__name__}:SoldOut": {"status": 409, "title": "Sold out"}}})
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> str:
        return "ok"

    app.add_middleware(GuardMiddleware, guard=guard)
    with caplog.at_level(logging.WARNING, logger="ymguard"):
        async with client(app) as c:
            assert (await c.get("/ok")).status_code == 200
            await c.get("/ok")
    warnings = [r for r in caplog.records if "guard.install(app) was never called" in r.message]
    assert len(warnings) == 1  # once, at startup


async def test_no_warning_when_install_was_called(caplog: pytest.LogCaptureFixture) -> None:
    guard = Guard({"errors": {f"{__name__}:SoldOut": {"status": 409, "title": "Sold out"}}})
    app = FastAPI()
    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    with caplog.at_level(logging.WARNING, logger="ymguard"):
        async with client(app) as c:
            await c.get("/nowhere")
    assert not [r for r in caplog.records if "never called" in r.message]


async def test_a_bad_errors_entry_names_the_path_at_startup() -> None:
    guard = Guard({"errors": {f"{__name__}:NoSuchClass": {"status": 400, "title": "x"}}})
    app = FastAPI()
    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    with pytest.raises(ValueError, match=f"errors: cannot import '{__name__}:NoSuchClass'"):
        async with client(app) as c:
            await c.get("/")
