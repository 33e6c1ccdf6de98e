"""The rules file: what it accepts, and errors that name file, line and field."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ymguard import Guard, GuardMiddleware, RulesError, load_rules, parse_rules
from ymguard.cli import main

GOOD = """\
storage: memory://
key_prefix: shop
on_storage_error: open
origin:
  from: header
  name: X-Caller
resources:
  "POST /kill/{course_id}":
    flow:
      - qps: 1000
        behavior: reject
      - concurrency: 200
        origin: app-a
errors:
  "builtins:KeyError": {status: 404, title: Not found}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(RulesError) as info:
        load_rules(write(tmp_path, text))
    return [str(p) for p in info.value.problems]


def test_a_good_file_loads_every_field(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, GOOD))
    assert rules.key_prefix == "shop"
    assert rules.on_storage_error == "open"
    assert rules.origin is not None and rules.origin.name == "X-Caller"
    flow = rules.resources["POST /kill/{course_id}"].flow
    assert flow[0].qps == 1000 and flow[1].concurrency == 200 and flow[1].origin == "app-a"
    assert rules.errors["builtins:KeyError"].status == 404


def test_a_dict_of_the_same_shape_is_accepted() -> None:
    rules = parse_rules({"resources": {"GET /x": {"flow": [{"qps": 5}]}}})
    assert rules.resources["GET /x"].flow[0].qps == 5


def test_unknown_key_names_file_line_and_field(tmp_path: Path) -> None:
    text = GOOD.replace("        behavior: reject\n", "        behavior: reject\n        qsp: 3\n")
    path = str(tmp_path / "rules.yaml")
    assert problems(tmp_path, text) == [
        f'{path}:12: resources."POST /kill/{{course_id}}".flow[0].qsp: unknown field'
    ]


def test_negative_limit_and_wrong_type_are_both_reported(tmp_path: Path) -> None:
    text = (
        "resources:\n"
        "  GET /a:\n"
        "    flow:\n"
        "      - qps: -1\n"
        "  GET /b:\n"
        "    flow:\n"
        "      - concurrency: lots\n"
    )
    found = problems(tmp_path, text)
    assert len(found) == 2
    assert (
        ':4: resources."GET /a".flow[0].qps: input should be greater than or equal to 0' in found[0]
    )
    assert ':7: resources."GET /b".flow[0].concurrency: input should be a valid integer' in found[1]


def test_unknown_behavior_is_refused(tmp_path: Path) -> None:
    text = "resources:\n  GET /a:\n    flow:\n      - qps: 1\n        behavior: sometimes\n"
    (found,) = problems(tmp_path, text)
    assert ":5: " in found and "flow[0].behavior" in found


def test_a_relate_rule_without_ref_resource_is_refused(tmp_path: Path) -> None:
    text = "resources:\n  GET /a:\n    flow:\n      - qps: 1\n        strategy: relate\n"
    (found,) = problems(tmp_path, text)
    assert ':4: resources."GET /a".flow[0].ref_resource: ' in found
    assert "strategy relate needs ref_resource" in found


def test_a_flow_rule_needs_exactly_one_grade(tmp_path: Path) -> None:
    (found,) = problems(
        tmp_path, "resources:\n  GET /a:\n    flow:\n      - qps: 1\n        concurrency: 2\n"
    )
    assert ":4: " in found and "exactly one of qps or concurrency" in found


def test_unknown_storage_scheme_is_refused(tmp_path: Path) -> None:
    (found,) = problems(tmp_path, "storage: mongodb://x\n")
    assert ":1: storage: " in found and "redis+sentinel://" in found


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    (found,) = problems(tmp_path, "resources:\n  GET /a:\n    flow: [\n")
    assert found.startswith(str(tmp_path / "rules.yaml") + ":4: (yaml): ")


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="No such file"):
        load_rules(tmp_path / "nope.yaml")


def test_ymguard_storage_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YMGUARD_STORAGE", "memory://")
    guard = Guard({"storage": "redis://127.0.0.1:1/0"})
    assert guard.store.kind == "memory"


def test_check_prints_what_it_understood(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(write(tmp_path, GOOD))]) == 0
    out = capsys.readouterr().out
    assert '"POST /kill/{course_id}":' in out and "- qps: 1000" in out
    assert "# ok: 1 resources" in out


def test_check_lists_every_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "key_prefix: ''\nresources:\n  GET /a:\n    flow:\n      - qps: -5\n        bogus: 1\n"
    assert main(["check", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    path = str(tmp_path / "rules.yaml")
    assert err[0].startswith(f"{path}:1: key_prefix: ")
    assert err[1].startswith(f'{path}:5: resources."GET /a".flow[0].qps: ')
    assert err[2] == f'{path}:6: resources."GET /a".flow[0].bogus: unknown field'


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"storage: memory://\nkey_prefix: caf\xe9\n")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value) == f"{path}:2: (file): not UTF-8 text"


# -- values that would fail at run time are load errors (issue 8, item 11) -------------

RUN_TIME_FAILURES = [
    (
        "resources:\n  GET /a:\n    semaphore: {permits: 1, lease_seconds: .inf}\n",
        3,
        'resources."GET /a".semaphore.lease_seconds',
        "finite",
    ),
    (
        "resources:\n  GET /a:\n    idempotency: {ttl_seconds: .inf, lease_seconds: .nan}\n",
        3,
        'resources."GET /a".idempotency.ttl_seconds',
        "finite",
    ),
    (
        "resources:\n  GET /a:\n    breaker:\n      - strategy: error_ratio\n"
        "        threshold: 0.5\n        window_seconds: .nan\n",
        6,
        'resources."GET /a".breaker[0].window_seconds',
        "finite",
    ),
    (
        "resources:\n  GET /a:\n    breaker:\n      - {strategy: error_count, threshold: .inf}\n",
        4,
        'resources."GET /a".breaker[0].threshold',
        "finite",
    ),
    (
        "resources:\n  GET /a:\n    flow: [{qps: .inf}]\n",
        3,
        'resources."GET /a".flow[0].qps',
        "finite",
    ),
    (
        "resources:\n  GET /a:\n    semaphore:\n      permits: 1\n"
        "      wait_ms: 100000000000000000000\n",
        5,
        'resources."GET /a".semaphore.wait_ms',
        "at most",
    ),
    (
        "resources:\n  GET /a:\n    semaphore: {permits: 1, wait_ms: 3600001}\n",
        3,
        'resources."GET /a".semaphore.wait_ms',
        "at most 3600000",
    ),
    (
        "resources:\n  GET /a:\n    semaphore: {permits: 1, lease_seconds: 1.0e-9}\n",
        3,
        'resources."GET /a".semaphore.lease_seconds',
        "at least 0.001",
    ),
    (
        "resources:\n  GET /a:\n    idempotency: {ttl_seconds: 31536001}\n",
        3,
        'resources."GET /a".idempotency.ttl_seconds',
        "at most 31536000",
    ),
    (
        "resources:\n  GET /a:\n    idempotency:\n      header: Idempotency-Schl\u00fcssel\n",
        4,
        'resources."GET /a".idempotency.header',
        "not an HTTP header name",
    ),
    (
        "resources:\n  GET /a:\n    submit_token: {header: X Token}\n",
        3,
        'resources."GET /a".submit_token.header',
        "not an HTTP header name",
    ),
    (
        "origin:\n  from: header\n  name: Anrufer-\u00e9\n",
        3,
        "origin.name",
        "not an HTTP header name",
    ),
    (
        "resources:\n  GET /a:\n    idempotency: {methods: [POST, POTS]}\n",
        3,
        'resources."GET /a".idempotency.methods',
        "'POTS' is not an HTTP method",
    ),
    ("storage: redis://h:abc/0\n", 1, "storage", "port 'abc' is not a number"),
    ("storage: redis://h:6379/zero\n", 1, "storage", "database 'zero' is not a number"),
    ("storage: redis://h/0?socket_timeout=.inf\n", 1, "storage", "socket_timeout"),
    ("storage: redis://h/0?pool=9\n", 1, "storage", "unknown storage URI option 'pool'"),
    (
        'errors:\n  ".x:Y": {status: 409, title: T}\n',
        2,
        'errors.".x:Y"',
        "must be 'package.module:ExceptionName'",
    ),
    (
        'errors:\n  "x:Y.z": {status: 409, title: T}\n',
        2,
        'errors."x:Y.z"',
        "must be 'package.module:ExceptionName'",
    ),
    # Malformed resource names match no route ever (item 12).
    ("resources:\n  get /items: {}\n", 2, 'resources."get /items"', "'GET /items'"),
    ("resources:\n  /items/{id}: {}\n", 2, 'resources."/items/{id}"', "'GET /items/{id}'"),
    ("resources:\n  FETCH /items: {}\n", 2, 'resources."FETCH /items"', "not an HTTP method"),
    ("resources:\n  GET  /items: {}\n", 2, 'resources."GET  /items"', "one space"),
    ("resources:\n  GET /items/{id: {}\n", 2, 'resources."GET /items/{id"', "{name}"),
]


@pytest.mark.parametrize(("text", "line", "field", "why"), RUN_TIME_FAILURES)
def test_values_that_fail_at_run_time_are_load_errors_everywhere(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    line: int,
    field: str,
    why: str,
) -> None:
    path = write(tmp_path, text)
    start = f"{path}:{line}: {field}: "
    for load in (load_rules, Guard.from_yaml):
        with pytest.raises(RulesError) as info:
            load(path)
        (found,) = [str(p) for p in info.value.problems if str(p).startswith(start)]
        assert why in found
    assert main(["check", str(path)]) == 2
    assert any(ln.startswith(start) and why in ln for ln in capsys.readouterr().err.splitlines())
    # The same shape as a dict: the same problem, against "<rules>".
    with pytest.raises(RulesError) as info:
        Guard(yaml.safe_load(text))
    assert any(str(p).startswith(f"<rules>:1: {field}: ") for p in info.value.problems)


def test_a_duplicate_key_is_an_error_not_a_silent_override(tmp_path: Path) -> None:
    text = (
        "resources:\n"
        "  GET /a:\n"
        "    flow: [{qps: 1}]\n"
        "  GET /b:\n"
        "    flow: [{qps: 2}]\n"
        "    flow: [{qps: 3}]\n"
        "  GET /a:\n"
        "    flow: [{qps: 4}]\n"
    )
    assert problems(tmp_path, text) == [
        f'{tmp_path / "rules.yaml"}:6: resources."GET /b".flow: '
        "duplicate key (first on line 5): a mapping names a key once",
        f'{tmp_path / "rules.yaml"}:7: resources."GET /a": '
        "duplicate key (first on line 2): a mapping names a key once",
    ]


def test_a_duplicate_key_in_a_flow_mapping_on_one_line_is_found(tmp_path: Path) -> None:
    text = "resources:\n  GET /a:\n    semaphore: {permits: 1, permits: 2}\n"
    (found,) = problems(tmp_path, text)
    assert ':3: resources."GET /a".semaphore.permits: duplicate key' in found


def test_three_thousand_nested_brackets_are_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "resources: " + "[" * 3000 + "]" * 3000 + "\n")
    assert main(["check", str(path)]) == 2
    assert capsys.readouterr().err == f"{path}:1: (yaml): nested more than 32 levels deep\n"


def test_an_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    lines += ["resources:", "  GET /a:", "    flow: *a7"]  # 10^8 rules to validate
    (found,) = problems(tmp_path, "\n".join(lines) + "\n")
    assert "(yaml): expands to more than 100000 values" in found


def test_an_empty_file_is_an_error(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", "---\n"):
        (found,) = problems(tmp_path, text)
        assert found.endswith(
            ":1: (file): the file is empty: it guards nothing (write "
            "resources: ..., see docs/rules.md)"
        )


def test_problems_are_sorted_by_line(tmp_path: Path) -> None:
    text = "resources:\n  GET /a:\n    flow: [{qps: -1}]\nstorage: bogus://\norigin: 3\n"
    found = problems(tmp_path, text)
    assert [int(p.split(":")[1]) for p in found] == [3, 4, 5]


MALFORMED = [
    {"resources": {"GET /a": 5}},
    {"resources": {"GET /a": {"semaphore": 3, "flow": {"qps": 1}, "idempotency": []}}},
    {"resources": {"GET /a": {"breaker": ["x"], "submit_token": "y"}}},
    {"origin": "x", "errors": {"a:B": 3}, "resources": []},
]


@pytest.mark.parametrize("data", MALFORMED)
def test_internal_class_names_never_leak_into_messages(data: dict[str, Any]) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(data)
    text = str(info.value)
    for name in (
        "Rule",
        "RulesFile",
        "ErrorMapping",
        "dictionary",
        "instance of",
        "function-",
        "[key]",
    ):
        assert name not in text, text
    assert "must be a mapping" in text or "must be a list" in text


# -- errors: is a trust boundary (item 5) ----------------------------------------------


def test_rules_from_outside_cannot_carry_errors(tmp_path: Path) -> None:
    data = {"errors": {"os:error": {"status": 500, "title": "x"}}}
    with pytest.raises(RulesError) as info:
        parse_rules(data, allow_errors=False)
    assert str(info.value).startswith("<rules>:1: errors: not allowed here: errors: imports code")
    path = write(
        tmp_path, "resources:\n  GET /a: {}\nerrors:\n  os:error: {status: 500, title: x}\n"
    )
    with pytest.raises(RulesError) as info:
        load_rules(path, allow_errors=False)
    assert str(info.value).startswith(f"{path}:3: errors: not allowed here")
    # The app's own rules keep their errors: section.
    assert load_rules(path).errors["os:error"].status == 500
    assert parse_rules(data).errors["os:error"].status == 500


# -- rules that name no route warn at startup (item 12) ------------------------------


async def _ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _shop() -> FastAPI:
    app = FastAPI()
    router = APIRouter(prefix="/api")

    @router.post("/orders/{order_id}")
    async def pay(order_id: int) -> str:
        return "paid"

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> str:
        return "item"

    app.include_router(router)
    app.mount("/sub", Starlette(routes=[Route("/hello/{name}", _ok)]))
    return app


async def _lifespan(app: Any) -> None:
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_rules_naming_no_route_are_warned_about_once_at_startup(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = Guard(
        {
            "resources": {
                "GET /items/{item_id}": {"flow": [{"qps": 5}]},
                "POST /api/orders/{order_id}": {"flow": [{"qps": 5}]},
                "GET /sub/hello/{name}": {"flow": [{"qps": 5}]},
                "GET /item/{id}": {"flow": [{"qps": 5}]},
                "DELETE /items/{item_id}": {"flow": [{"qps": 5}]},
                "POST /orders/{order_id}": {"flow": [{"qps": 5}]},
                "payments.charge": {"flow": [{"qps": 5}]},
            }
        }
    )
    app = _shop()
    app.add_middleware(GuardMiddleware, guard=guard)
    with caplog.at_level(logging.WARNING, logger="ymguard"):
        await _lifespan(app)
        await _lifespan(app)  # a second startup of the same rules says nothing new
    warned = [r.getMessage() for r in caplog.records if r.name == "ymguard"]
    assert warned == [
        "ymguard: rule 'GET /item/{id}' matches no route of the app: it guards nothing; "
        "nearest route: 'GET /items/{item_id}'",
        "ymguard: rule 'DELETE /items/{item_id}' matches no route of the app: it guards "
        "nothing; nearest route: 'GET /items/{item_id}'",
        "ymguard: rule 'POST /orders/{order_id}' matches no route of the app: it guards "
        "nothing; nearest route: 'POST /api/orders/{order_id}'",
    ]


@pytest.mark.parametrize("uri", ["redis://h:abc/0", "redis://h/0?socket_timeout=nan", "memory://x"])
def test_a_bad_storage_uri_given_in_code_or_the_environment_says_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, uri: str
) -> None:
    with pytest.raises(ValueError, match=r"port 'abc'|socket_timeout='nan'|nothing after"):
        Guard(storage=uri)
    monkeypatch.setenv("YMGUARD_STORAGE", uri)
    with pytest.raises(ValueError, match=r"port 'abc'|socket_timeout='nan'|nothing after"):
        Guard()
