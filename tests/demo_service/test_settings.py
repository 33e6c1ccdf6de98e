"""The demo's settings: environment variables, defaults, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo_service.settings import PACKAGED_RULES, Settings, SettingsError
from ymguard.cli import main as ymguard_cli


def test_defaults_run_on_a_fresh_machine() -> None:
    settings = Settings.from_env({})
    assert settings.database_url == "sqlite+aiosqlite:///./var/demo.db"
    assert settings.redis_url is None  # the embedded Redis
    assert settings.rules_path == PACKAGED_RULES
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8000, 1)
    assert settings.order_pay_timeout_seconds == 1800


def test_environment_overrides_defaults() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql+asyncpg://shop@db/shop",
            "REDIS_URL": "redis://cache:6379/1",
            "YMGUARD_RULES": "/etc/shop/rules.yaml",
            "PORT": "9000",
            "WORKERS": "4",
            "ALIPAY_NOTIFY_DELAYS": "0, 1.5,10",
            "DEMO_ADMIN_PASSWORD": "s3cret",
        }
    )
    assert settings.redis_url == "redis://cache:6379/1"
    assert settings.rules_path == Path("/etc/shop/rules.yaml")
    assert (settings.port, settings.workers) == (9000, 4)
    assert settings.alipay_notify_delays == (0.0, 1.5, 10.0)
    assert settings.demo_admin_password == "s3cret"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "http"),
        ("PORT", "70000"),
        ("WORKERS", "0"),
        ("SWEEPER_INTERVAL_SECONDS", "soon"),
        ("ALIPAY_NOTIFY_DELAYS", "1,-2"),
        ("ALIPAY_NOTIFY_DELAYS", "1,x"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_a_unix_socket_is_spelled_for_each_client() -> None:
    settings = Settings().with_redis("unix:///srv/var/redis.sock")
    assert settings.redis_client_url == "unix:///srv/var/redis.sock"
    assert settings.guard_storage_url == "redis+unix:///srv/var/redis.sock"
    ymguard_spelling = Settings(redis_url="redis+unix:///srv/var/redis.sock")
    assert ymguard_spelling.redis_client_url == "unix:///srv/var/redis.sock"


def test_ymguard_storage_wins_for_the_guards_only() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://cache/0", "YMGUARD_STORAGE": "memory://"})
    assert settings.guard_storage_url == "memory://"
    assert settings.redis_client_url == "redis://cache/0"


def test_the_packaged_rules_file_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert ymguard_cli(["check", str(PACKAGED_RULES)]) == 0
    assert "POST /kill/{kill_course_id}" in capsys.readouterr().out
