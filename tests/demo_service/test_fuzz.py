"""A fuzzing client no one here wrote: schemathesis against the demo's ``/openapi.json``.

``python -m demo_service`` runs for real (SQLite, the shared Redis under this run's
prefixes) with a published activity in it; schemathesis's own command line (``st run``)
then sends a bounded number of generated requests to every operation of the schema, as
the admin (so the admin routes are reached too), and must find no server error (5xx) and
no answer the schema does not describe: status, content type and body (every error is the
documented ``Problem``, as ``application/problem+json``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_redis
from tests.demo_service.conftest import ADMIN_PASSWORD, TOKEN_SECRET
from tests.helpers import ROOT, check_run_prefixes, free_port, unique_prefix

#: Generated requests per operation (about 20 operations): keeps the run under ~2 min.
MAX_EXAMPLES = 10
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


@pytest.fixture
def running_shop(tmp_path: Path) -> Iterator[str]:
    """The shop as a real process on SQLite and the shared Redis; yields its URL."""
    port = free_port()
    prefixes = {"DEMO_REDIS_PREFIX": unique_prefix(), "YMGUARD_KEY_PREFIX": unique_prefix()}
    check_run_prefixes(prefixes)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEMO_", "YMGUARD_", "ALIPAY_")) and k != "REDIS_URL"
    }
    env.update(
        PYTHONPATH=str(ROOT),
        PORT=str(port),
        REDIS_URL=require_redis(),
        DEMO_ADMIN_PASSWORD=ADMIN_PASSWORD,
        DEMO_TOKEN_SECRET=TOKEN_SECRET,
        **prefixes,
    )
    log = (tmp_path / "shop.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo_service"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the shop did not start:\n" + (tmp_path / "shop.log").read_text())
            time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def admin_with_a_sale(url: str) -> str:
    """Log in as the admin and publish an ongoing activity; the admin's bearer token."""
    with httpx.Client(base_url=url, timeout=30) as client:
        token = client.post(
            "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        ).json()["token"]
        admin = {"Authorization": f"Bearer {token}"}
        course = client.post(
            "/admin/courses", json={"name": "Fuzzing", "price": "10.00"}, headers=admin
        ).json()
        start = datetime.now(UTC) - timedelta(minutes=1)
        activity = client.post(
            "/admin/activities",
            json={
                "name": "Fuzz sale",
                "start_time": start.isoformat(),
                "end_time": (start + timedelta(hours=1)).isoformat(),
                "courses": [
                    {"course_id": course["course_id"], "kill_price": "1.00", "kill_count": 5}
                ],
            },
            headers=admin,
        ).json()
        published = client.post(
            f"/admin/activities/{activity['activity_id']}/publish", headers=admin
        )
        assert published.status_code == 200, published.text
    return str(token)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    running_shop: str, tmp_path: Path
) -> None:
    token = admin_with_a_sale(running_shop)
    st = Path(sys.executable).with_name("st")
    command = [
        str(st) if st.exists() else "st",
        "run",
        running_shop + "/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--phases",
        "examples,coverage,fuzzing",
        "--seed",
        "20261130",
        "--generation-database",
        "none",
        "--workers",
        "2",
        "--request-timeout",
        "30",
        "--no-color",
        "--header",
        f"Authorization: Bearer {token}",
        "--suppress-health-check",
        "all",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    assert "No issues found" in output or "passed" in output, output[-5000:]
