"""The rules file: what it accepts, and errors that name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from ymguard import Guard, RulesError, load_rules, parse_rules
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


def test_behaviors_of_a_later_issue_say_not_supported_yet(tmp_path: Path) -> None:
    text = "resources:\n  GET /a:\n    flow:\n      - qps: 1\n        behavior: warm_up\n"
    (found,) = problems(tmp_path, text)
    assert "not supported yet" in found


@pytest.mark.parametrize("kind", ["param_flow", "authority"])
def test_rule_kinds_of_a_later_issue_are_refused_not_ignored(tmp_path: Path, kind: str) -> None:
    text = f"resources:\n  GET /a:\n    {kind}:\n      - x: 1\n"
    (found,) = problems(tmp_path, text)
    assert f':3: resources."GET /a".{kind}: ' in found and "not supported yet" in found


def test_system_rule_is_refused_not_ignored(tmp_path: Path) -> None:
    (found,) = problems(tmp_path, "system:\n  max_qps: 10\n")
    assert ":1: system: " in found and "not supported yet" in found


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
    assert "POST /kill/{course_id}" in out and "'qps': 1000" in out and "ok: 1 resources" in out


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
