"""``ymguard check``: what it shows, how it fails, and the check against an app."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ymguard import load_rules
from ymguard.cli import main

RULES = """\
storage: memory://
key_prefix: shop
origin: {from: header, name: X-Caller}
resources:
  "GET /items/{item_id}":
    flow:
      - qps: 100
    semaphore: {permits: 5}
    breaker:
      - {strategy: error_ratio, threshold: 0.5}
  payments.charge:
    idempotency: {required: true}
  "DELETE /items/{item_id}": {}
errors:
  "builtins:KeyError": {status: 404, title: Not found}
"""


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_check_shows_every_value_that_will_apply_defaults_included(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(write(tmp_path, RULES))]) == 0
    out = capsys.readouterr().out
    for line in (
        "on_storage_error: local  # default",
        "      - qps: 100",
        "        behavior: reject  # default",
        "      permits: 5",
        "      lease_seconds: 5  # default",
        "      wait_ms: 0  # default",
        "        window_seconds: 1  # default",
        "        min_requests: 5  # default",
        "        open_seconds: 10  # default",
        "        error_statuses: [500, 502, 503, 504]  # default",
        "      required: true",
        "      header: Idempotency-Key  # default",
        "      ttl_seconds: 86400  # default",
        "      lease_seconds: 60  # default",
    ):
        assert line in out.splitlines(), line
    assert out.splitlines()[-1] == "# ok: 3 resources"


def test_what_check_shows_is_a_rules_file_with_the_same_meaning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(write(tmp_path, RULES))]) == 0
    shown = write(tmp_path, capsys.readouterr().out, "shown.yaml")
    assert load_rules(shown) == load_rules(tmp_path / "rules.yaml")


def test_check_without_origin_says_what_that_means(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(write(tmp_path, "resources:\n  GET /a: {}\n"))]) == 0
    assert "origin: null  # default: no origin, every caller is one" in capsys.readouterr().out


def test_check_warns_about_a_file_without_resources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "storage: memory://\n")
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().err == f"warning: {path} has no resources: nothing is guarded\n"


def test_check_refuses_an_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "\n# nothing yet\n")
    assert main(["check", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"{path}:1: (file): the file is empty")


def test_check_prints_problems_sorted_by_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        "resources:\n"
        "  GET /a:\n"
        "    flow: [{qps: .inf}]\n"
        "    semaphore: {permits: 1, wait_ms: 99999999}\n"
        "storage: redis://h:abc/0\n"
        "key_prefix: 'a{b}'\n"
    )
    assert main(["check", str(write(tmp_path, text))]) == 2
    lines = [int(line.split(":")[1]) for line in capsys.readouterr().err.splitlines()]
    assert lines == [3, 4, 5, 6]


@pytest.mark.parametrize("argv", [["--help"], ["check", "--help"]])
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ymguard")
    assert "check" in out and "FILE:LINE: field: why" in out and "--app" in out
    for markup in ("``", ":class:", ":func:", "**"):
        assert markup not in out


# -- --app: route names and errors: imports ------------------------------------------

APP = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route


class SoldOut(Exception):
    pass


async def ok(request):
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/items/{item_id}", ok, methods=["GET"]),
        Mount("/api", routes=[Route("/orders/{order_id}", ok, methods=["POST"])]),
    ]
)


def create_app():
    return app
"""


@pytest.fixture
def shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module with a Starlette app, importable from the working directory, as uvicorn does."""
    name = "shop_" + uuid.uuid4().hex[:8]
    write(tmp_path, APP, f"{name}.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


def test_check_app_accepts_rules_that_name_its_routes(
    tmp_path: Path, shop: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        "resources:\n"
        "  GET /items/{item_id}: {flow: [{qps: 1}]}\n"
        "  POST /api/orders/{order_id}: {flow: [{qps: 1}]}\n"
        "  payments.charge: {flow: [{qps: 1}]}\n"
        f"errors:\n  {shop}:SoldOut: {{status: 409, title: Sold out}}\n"
    )
    path = write(tmp_path, text)
    assert main(["check", str(path), "--app", f"{shop}:app"]) == 0
    assert capsys.readouterr().out.endswith(f"# ok: 3 resources, checked against {shop}:app\n")
    assert main(["check", str(path), "--app", f"{shop}:create_app", "--factory"]) == 0


def test_check_app_names_rules_without_a_route_and_errors_that_do_not_import(
    tmp_path: Path, shop: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        "resources:\n"
        "  GET /item/{id}: {flow: [{qps: 1}]}\n"
        "  POST /orders/{order_id}: {flow: [{qps: 1}]}\n"
        "errors:\n"
        f"  {shop}:Gone: {{status: 410, title: Gone}}\n"
        "  no_such_module_x:Boom: {status: 500, title: Boom}\n"
        f"  {shop}:ok: {{status: 500, title: Not a class}}\n"
    )
    path = write(tmp_path, text)
    assert main(["check", str(path), "--app", f"{shop}:app"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f'{path}:2: resources."GET /item/{{id}}": matches no route of the app: it guards '
        "nothing; nearest route: 'GET /items/{item_id}'"
    )
    assert err[1] == (
        f'{path}:3: resources."POST /orders/{{order_id}}": matches no route of the app: it '
        "guards nothing; nearest route: 'POST /api/orders/{order_id}'"
    )
    assert err[2].startswith(f"{path}:5: errors: cannot import '{shop}:Gone': AttributeError")
    assert err[3].startswith(f"{path}:6: errors: cannot import 'no_such_module_x:Boom'")
    assert err[4] == f"{path}:7: errors: '{shop}:ok' is not an exception class"
    assert len(err) == 5


def test_check_app_that_does_not_import_is_one_clear_error(
    tmp_path: Path, shop: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "resources:\n  GET /a: {}\n")
    assert main(["check", str(path), "--app", f"{shop}:nope"]) == 2
    assert capsys.readouterr().err.startswith(f"--app '{shop}:nope': cannot import: ")
