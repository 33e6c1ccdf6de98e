"""``ymguard push`` and ``ymguard rules``: versions in Redis, refusals that store nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import free_port
from ymguard.cli import main

RULES = """\
storage: {storage}
key_prefix: {prefix}
resources:
  "GET /items":
    flow:
      - qps: {qps}
"""


def rules_file(tmp_path: Path, storage: str, prefix: str, qps: int = 5, extra: str = "") -> Path:
    path = tmp_path / f"rules-{qps}.yaml"
    path.write_text(RULES.format(storage=storage, prefix=prefix, qps=qps) + extra)
    return path


def test_push_stores_numbered_versions_and_rules_shows_the_newest(
    tmp_path: Path, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = rules_file(tmp_path, redis_url, prefix, qps=5)
    assert main(["push", str(first)]) == 0
    out = capsys.readouterr().out
    assert f"pushed {first} as version 1 to {redis_url} (key prefix {prefix})" in out
    assert "digest sha256:" in out
    second = rules_file(tmp_path, redis_url, prefix, qps=6)
    assert main(["push", str(second)]) == 0
    assert "as version 2" in capsys.readouterr().out

    assert main(["rules", str(first)]) == 0  # Redis and prefix read from the file
    out = capsys.readouterr().out
    assert out.startswith(f"# version 2 in force on {redis_url} (key prefix {prefix})\n")
    assert f"from {second}, digest sha256:" in out
    assert out.endswith(second.read_text())  # the text as pushed, comments and all
    assert main(["rules", "--storage", redis_url, "--key-prefix", prefix]) == 0
    assert "# version 2 in force" in capsys.readouterr().out


def test_push_refuses_errors_and_bad_fields_and_stores_nothing(
    tmp_path: Path, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mapped = rules_file(
        tmp_path, redis_url, prefix, extra='errors:\n  "os:error": {status: 500, title: x}\n'
    )
    assert main(["push", str(mapped)]) == 2
    err = capsys.readouterr().err
    assert f"{mapped}:7: errors: not allowed here: errors: imports code" in err
    assert f"ymguard push: {mapped} refused; nothing was pushed" in err
    bad = rules_file(tmp_path, redis_url, prefix, qps=-1)
    assert main(["push", str(bad)]) == 2
    assert f'{bad}:6: resources."GET /items".flow[0].qps: ' in capsys.readouterr().err
    assert main(["rules", str(mapped)]) == 1
    assert "no rules pushed to" in capsys.readouterr().out


def test_push_needs_redis_and_the_key_prefix_the_file_names(
    tmp_path: Path, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    memory = rules_file(tmp_path, "memory://", prefix)
    assert main(["push", str(memory)]) == 2
    assert "needs a Redis store" in capsys.readouterr().err
    named = rules_file(tmp_path, redis_url, prefix)
    assert main(["push", str(named), "--key-prefix", prefix + "-other"]) == 2
    assert f"{named}:2: key_prefix: is '{prefix}', but the keys here start with" in (
        capsys.readouterr().err
    )
    # Without key_prefix: in the file, --key-prefix says where the guards are.
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text(named.read_text().replace(f"key_prefix: {prefix}\n", ""))
    assert main(["push", str(unnamed), "--key-prefix", prefix]) == 0
    assert f"(key prefix {prefix})" in capsys.readouterr().out


def test_expect_version_refuses_a_push_over_another(
    tmp_path: Path, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = rules_file(tmp_path, redis_url, prefix)
    assert main(["push", str(path), "--expect-version", "0"]) == 0
    assert main(["push", str(path), "--expect-version", "0"]) == 1
    assert "expected version 0, but 1 is in force; nothing was pushed" in capsys.readouterr().err


def test_push_to_a_redis_that_does_not_answer_fails_cleanly(
    tmp_path: Path, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    down = f"redis://:secret@127.0.0.1:{free_port()}/0"
    path = rules_file(tmp_path, down, prefix)
    assert main(["push", str(path)]) == 1
    err = capsys.readouterr().err
    assert "nothing was pushed" in err and "secret" not in err
    assert main(["rules", str(path)]) == 1
    assert "secret" not in capsys.readouterr().err
