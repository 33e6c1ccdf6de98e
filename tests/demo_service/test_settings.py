"""The demo's settings: environment variables, defaults, and errors that name the variable."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from demo_service.app import create_app
from demo_service.settings import PACKAGED_RULES, Settings, SettingsError
from tests.conftest import require_redis
from tests.demo_service.conftest import ADMIN_PASSWORD, TOKEN_SECRET, delete_prefixed
from tests.helpers import unique_prefix
from ymguard.cli import main as ymguard_cli


def test_defaults_run_on_a_fresh_machine() -> None:
    settings = Settings.from_env({})
    assert settings.database_url == "sqlite+aiosqlite:///./var/demo.db"
    assert settings.redis_url is None  # the embedded Redis
    assert settings.rules_path == PACKAGED_RULES
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8000, 1)
    assert settings.order_pay_timeout_seconds == 1800
    assert settings.gc_freeze  # a served shop freezes its start-up heap
    assert not Settings().gc_freeze  # a shop built by code (tests) does not


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
        ("DEMO_GC_FREEZE", "yes"),
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


def test_the_collector_can_be_left_alone() -> None:
    assert not Settings.from_env({"DEMO_GC_FREEZE": "0"}).gc_freeze


async def test_a_started_shop_freezes_its_heap_and_thaws_it_when_it_stops(tmp_path: Path) -> None:
    redis_url, guard_prefix, shop_prefix = require_redis(), unique_prefix(), unique_prefix()
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}",
        redis_url=redis_url,
        key_prefix=guard_prefix,
        redis_prefix=shop_prefix,
        demo_admin_password=ADMIN_PASSWORD,
        token_secret=TOKEN_SECRET,
        var_dir=tmp_path / "var",
        gc_freeze=True,
    )
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            # everything start-up built is out of the collector's walks
            assert gc.get_freeze_count() > 0
            assert app not in gc.get_objects()
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        await delete_prefixed(redis_url, guard_prefix, shop_prefix)


async def test_one_shop_stopping_leaves_anothers_heap_frozen(tmp_path: Path) -> None:
    redis_url = require_redis()
    prefixes = [unique_prefix() for _ in range(4)]
    apps = []
    for name, (guard_prefix, shop_prefix) in (("a", prefixes[:2]), ("b", prefixes[2:])):
        apps.append(
            create_app(
                Settings(
                    database_url=f"sqlite+aiosqlite:///{tmp_path / name}.db",
                    redis_url=redis_url,
                    key_prefix=guard_prefix,
                    redis_prefix=shop_prefix,
                    demo_admin_password=ADMIN_PASSWORD,
                    token_secret=TOKEN_SECRET,
                    var_dir=tmp_path / name,
                    gc_freeze=True,
                )
            )
        )
    first, second = apps
    try:
        async with second.router.lifespan_context(second):
            async with first.router.lifespan_context(first):
                pass
            assert gc.get_freeze_count() > 0  # the second shop still serves, frozen
        assert gc.get_freeze_count() == 0  # the last one out thawed it
    finally:
        gc.unfreeze()
        await delete_prefixed(redis_url, *prefixes)
