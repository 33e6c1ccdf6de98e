"""The demo mounts the guards' dashboard at /ymguard/, for the admin only."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo_service.accounts import DASHBOARD_COOKIE
from tests.demo_service.conftest import Shop


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The dashboard does not touch the database: SQLite is enough."""
    return f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}"


async def test_only_the_admin_sees_the_dashboard(shop: Shop) -> None:
    (buyer,) = await shop.users(1)
    admin = await shop.admin()
    c = shop.client
    for path in ("/ymguard/", "/ymguard/api/snapshot"):
        anonymous = await c.get(path)
        assert anonymous.status_code == 401, path
        assert anonymous.headers["content-type"] == "application/problem+json"
        assert anonymous.headers["www-authenticate"] == "Bearer"
        forged = await c.get(path, headers=shop.auth("not-a-token"))
        assert forged.status_code == 401
        refused = await c.get(path, headers=buyer)
        assert refused.status_code == 403
        assert refused.json()["type"].endswith("/forbidden")
        assert (await c.get(path, headers=admin)).status_code == 200
    # A browser carries a dashboard session (it sends no Authorization header on a visit):
    # only the admin gets one, and only a session's token opens the page by cookie.
    assert (await c.post("/auth/dashboard-session", headers=buyer)).status_code == 403
    opened = await c.post("/auth/dashboard-session", headers=admin)
    assert opened.status_code == 204
    cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ymguard" in cookie
    session = opened.cookies[DASHBOARD_COOKIE]
    c.cookies.clear()
    page = await c.get("/ymguard/", headers={"Cookie": f"{DASHBOARD_COOKIE}={session}"})
    assert page.status_code == 200 and "ymguard demo shop" in page.text
    # The API refuses the session's token, and the page refuses the API's token by cookie.
    assert (await c.get("/me", headers=shop.auth(session))).status_code == 401
    bearer = admin["Authorization"].removeprefix("Bearer ")
    cookie_with_bearer = {"Cookie": f"{DASHBOARD_COOKIE}={bearer}"}
    assert (await c.get("/ymguard/", headers=cookie_with_bearer)).status_code == 401
    snapshot = (await c.get("/ymguard/api/snapshot", headers=admin)).json()
    assert snapshot["store"] == "redis" and snapshot["cluster"] is True
    assert "POST /kill/{kill_course_id}" in snapshot["rules"]["resources"]
