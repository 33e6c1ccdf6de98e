"""The shop's pages, in a real headless Chromium against the shop on a real socket.

The shop runs in-process under uvicorn on a free port (SQLite, the shared Redis under
prefixes of its own); the browser is Debian's Chromium driven by Playwright (the
``browser`` fixture). Each page is saved under ``var/screenshots/`` on a desktop and a
phone viewport. A few cheap checks (content negotiation, error pages, headers) go over
ASGI with httpx and need no browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from demo_service.models import Order
from demo_service.settings import Settings
from tests.browser import screenshot
from tests.conftest import require_redis
from tests.demo_service.conftest import ADMIN_PASSWORD, TOKEN_SECRET, Shop, delete_prefixed
from tests.helpers import free_port, unique_prefix

#: A browser navigation's Accept header (Chromium's).
NAVIGATION = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
#: Liveness bound of anything the browser waits for (a loaded CI machine is slow).
WAIT_MS = 30_000


class LiveShop(Shop):
    """The shop served by uvicorn on 127.0.0.1 (a browser needs a socket)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def buyer(self) -> tuple[int, str]:
        """A new buyer's user id and bearer token."""
        (headers,) = await self.users(1)
        token = headers["Authorization"].removeprefix("Bearer ")
        principal = self.app.state.tokens.read(token)
        return principal.id, token

    async def orders_of(self, user_id: int) -> int:
        """How many orders ``user_id`` has."""
        async with self.app.state.sessionmaker() as session:
            count = await session.scalar(
                select(func.count()).select_from(Order).where(Order.user_id == user_id)
            )
        return int(count or 0)


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}",
        redis_url=require_redis(),
        key_prefix=unique_prefix(),
        redis_prefix=unique_prefix(),
        demo_admin_password=ADMIN_PASSWORD,
        token_secret=TOKEN_SECRET,
        var_dir=tmp_path / "var",
    )


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[LiveShop]:
    """The shop of ``settings`` on a real socket (its lifespan run by uvicorn)."""
    shop = LiveShop(settings)
    server = uvicorn.Server(
        uvicorn.Config(shop.app, host="127.0.0.1", port=shop.port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(600):  # up to 60 s on a loaded machine
            if server.started or task.done():
                break
            await asyncio.sleep(0.1)
        assert server.started, "the shop did not start under uvicorn"
        yield shop
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)
        await shop.client.aclose()
        assert settings.redis_url is not None
        await delete_prefixed(settings.redis_url, settings.key_prefix or "", settings.redis_prefix)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[LiveShop]:
    """The shop with its packaged rules on a real socket."""
    async with serve(_settings(tmp_path)) as shop:
        yield shop


#: Rules that refuse every buy and every look at one's courses (qps 0): the guards' 429.
REFUSING_RULES = """\
resources:
  "POST /kill/{kill_course_id}":
    flow:
      - qps: 0
        name: kill
  "GET /me/courses":
    flow:
      - qps: 0
        name: my-courses
  "orders.submit":
    submit_token:
      header: X-Submit-Token
      ttl_seconds: 900
      scope: [state:user]
"""


@pytest.fixture
async def refusing(tmp_path: Path) -> AsyncIterator[LiveShop]:
    """The shop on a real socket with :data:`REFUSING_RULES`."""
    rules = tmp_path / "refusing.yaml"
    rules.write_text(REFUSING_RULES)
    async with serve(replace(_settings(tmp_path), rules_path=rules)) as shop:
        yield shop


async def _context(
    browser: Any, live: LiveShop, viewport: dict[str, int], token: str = "", state: Any = None
) -> Any:
    """A browser context on the shop; signed in with ``token``, or with the storage
    ``state`` of another context (the same person's browser), when given."""
    phone = viewport == PHONE
    context = await browser.new_context(
        viewport=viewport,
        is_mobile=phone,
        has_touch=phone,
        base_url=live.url,
        storage_state=state,
    )
    context.set_default_timeout(WAIT_MS)
    if token:
        await context.add_init_script(f"localStorage.setItem('ymshop.token', {token!r});")
    return context


def _watch(page: Any) -> list[str]:
    """Console errors and failed page scripts of ``page`` (a page must have none)."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        # A refused fetch (401, 409) is logged by Chromium itself; the page handles it.
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and "Failed to load resource" not in m.text
            else None
        ),
    )
    return errors


async def test_a_journey_from_login_to_a_paid_order(browser: Any, live: LiveShop) -> None:
    activity = await live.activity(kill_count=5)
    aid = activity["activity_id"]
    context = await _context(browser, live, DESKTOP)
    page = await context.new_page()
    errors = _watch(page)

    await page.goto("/")
    await page.get_by_role("link", name="Go to the sale").click()
    await page.wait_for_url(f"**/activities/{aid}")
    buy = page.locator("[data-buy]")
    await buy.filter(has_text="Buy now").wait_for()
    await screenshot(page, "desktop-activity")
    await buy.click()  # not logged in: off to the login page, and back afterwards
    await page.wait_for_url(re.compile(r"/login\?next="))

    username = "ada_" + unique_prefix().replace(":", "")[-10:]
    register = page.locator("[data-register-form]")
    await register.get_by_label("Username").fill(username)
    await register.get_by_label("Password").fill("correct horse battery staple")
    await screenshot(page, "desktop-login")
    await register.get_by_role("button", name="Create account").click()
    await page.wait_for_url(f"**/activities/{aid}")
    assert await page.locator("[data-who]").text_content() == username

    await page.locator("[data-buy]").filter(has_text="Buy now").click()
    go = page.get_by_role("link", name="Go to order")
    await go.wait_for()
    await page.locator("[data-stock-left]").filter(has_text="4").wait_for()
    await screenshot(page, "desktop-activity-bought")
    await go.click()

    await page.wait_for_url(re.compile(r"/orders/K[0-9-a-f]+/confirm$"))
    confirm = page.get_by_role("button", name="Confirm and pay")
    await confirm.wait_for()
    await screenshot(page, "desktop-confirm")
    await confirm.click()

    await page.wait_for_url(re.compile(r"/sandbox/alipay/cashier/"))
    assert "9.90" in (await page.locator(".amount").text_content() or "")
    await screenshot(page, "desktop-cashier")
    await page.get_by_role("button", name="Pay").click()

    await page.wait_for_url(re.compile(r"/orders/O[0-9a-f]+"))
    order_no = re.search(r"/orders/(O[0-9a-f]+)", page.url).group(1)  # type: ignore[union-attr]
    await page.locator("main[data-order-status=PAID]").wait_for()  # follows the notify
    assert "Paid" in (await page.locator("[data-status]").text_content() or "")
    await screenshot(page, "desktop-order-paid")

    await page.get_by_role("link", name="Go to my courses").click()
    await page.wait_for_url("**/me/courses")
    owned = page.locator("[data-courses] li")
    await owned.first.wait_for()
    assert await owned.count() == 1
    assert order_no in (await owned.first.text_content() or "")
    await screenshot(page, "desktop-courses")

    # The same pages on a phone, signed in as the same person.
    phone = await _context(browser, live, PHONE, state=await context.storage_state())
    small = await phone.new_page()
    errors += _watch(small)
    for path, name, ready in [
        ("/", "phone-index", ".activity-card"),
        (f"/activities/{aid}", "phone-activity", "a.go"),
        (f"/orders/{order_no}", "phone-order-paid", "main[data-order-status=PAID]"),
        ("/me/courses", "phone-courses", "[data-courses] li"),
        ("/login", "phone-login", "[data-login-form]"),
        ("/no-such-page", "phone-not-found", ".problem"),
    ]:
        await small.goto(path)
        await small.locator(ready).first.wait_for()
        await screenshot(small, name)
    await phone.close()
    await context.close()
    assert errors == []


async def test_the_countdown_follows_the_server_clock_and_flips_to_buy(
    browser: Any, live: LiveShop
) -> None:
    # The browser's clock is an hour fast: a countdown on the browser's clock would show
    # the sale as open at once. It must wait for the server's start time.
    _, token = await live.buyer()
    context = await _context(browser, live, DESKTOP, token)
    page = await context.new_page()
    await page.clock.install(time=datetime.now(UTC) + timedelta(hours=1))
    # Starts soon, but late enough for a loaded machine to have shown the page before.
    activity = await live.activity(start=timedelta(seconds=15))
    await page.goto(f"/activities/{activity['activity_id']}")
    countdown = page.locator("[data-countdown]")
    await countdown.filter(has_text="Starts in 00:00:").wait_for()
    assert await page.locator("[data-buy]").text_content() == "Not started"
    assert await page.locator("[data-buy]").is_disabled()
    await screenshot(page, "desktop-activity-countdown")

    buy = page.locator("[data-buy]").filter(has_text="Buy now")
    await buy.wait_for()  # flips at the server's start time
    assert await countdown.text_content() != ""
    await buy.click()  # and the server agrees: the sale is open
    await page.get_by_role("link", name="Go to order").wait_for()
    await context.close()


async def test_a_sold_out_course_says_so(browser: Any, live: LiveShop) -> None:
    activity = await live.activity(kill_count=1)
    kill_course_id = activity["courses"][0]["kill_course_id"]
    _, token = await live.buyer()
    context = await _context(browser, live, DESKTOP, token)
    page = await context.new_page()
    await page.goto(f"/activities/{activity['activity_id']}")
    await page.locator("[data-buy]").filter(has_text="Buy now").wait_for()

    # Someone else takes the last unit while the page is open.
    (other,) = await live.users(1)
    taken = await live.client.post(f"/kill/{kill_course_id}", headers=other)
    assert taken.status_code == 200, taken.text

    await page.locator("[data-buy]").click()
    message = page.locator("[data-message]")
    await message.filter(has_text="Sold out").wait_for()
    assert "{" not in (await message.text_content() or "")  # words, not JSON
    assert await page.locator("[data-buy]").text_content() == "Sold out"
    await screenshot(page, "desktop-activity-sold-out-click")

    await page.reload()
    await page.locator("[data-buy]").filter(has_text="Sold out").wait_for()
    assert await page.locator("[data-buy]").is_disabled()
    assert await page.locator("[data-stock-left]").text_content() == "0"
    await screenshot(page, "desktop-activity-sold-out")
    await context.close()


async def test_a_double_click_on_confirm_places_one_order(browser: Any, live: LiveShop) -> None:
    activity = await live.activity()
    user_id, token = await live.buyer()
    killed = await live.client.post(
        f"/kill/{activity['courses'][0]['kill_course_id']}", headers=live.auth(token)
    )
    assert killed.status_code == 200, killed.text
    kill_order_no = killed.json()["kill_order_no"]

    context = await _context(browser, live, PHONE, token)
    page = await context.new_page()
    placed: list[str] = []
    page.on(
        "request",
        lambda r: placed.append(r.url) if r.method == "POST" and r.url.endswith("/orders") else 0,
    )
    await page.goto(f"/orders/{kill_order_no}/confirm")
    confirm = page.get_by_role("button", name="Confirm and pay")
    await confirm.wait_for()
    await screenshot(page, "phone-confirm")
    await confirm.dblclick()
    await page.wait_for_url(re.compile(r"/sandbox/alipay/cashier/"))
    await screenshot(page, "phone-cashier")

    # Back on the confirm page, it offers the order placed, not a second one.
    await page.goto(f"/orders/{kill_order_no}/confirm")
    await page.get_by_role("link", name="Go to your order").click()
    await page.wait_for_url(re.compile(r"/orders/O[0-9a-f]+$"))
    await page.get_by_role("button", name="Pay now").wait_for()
    await screenshot(page, "phone-order-to-pay")
    await context.close()

    assert len(placed) == 1
    assert await live.orders_of(user_id) == 1


# -- no browser: content negotiation, error pages, headers ------------------------------------


async def test_pages_and_the_json_api_share_paths_by_accept(live: LiveShop) -> None:
    activity = await live.activity()
    path = f"/activities/{activity['activity_id']}"
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
        api = await http.get(path)
        assert api.headers["content-type"] == "application/json"
        assert api.json()["activity_id"] == activity["activity_id"]
        assert (await http.get(path, headers={"Accept": "application/json"})).json()

        html = await http.get(path, headers=NAVIGATION)
        assert html.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in html.headers["content-security-policy"]
        assert html.headers["vary"] == "Accept"
        assert "<script>" not in html.text  # no inline script on any page
        assert 'data-server-time="' in html.text

        # The JSON routes under page paths still answer JSON (and 401 without a token).
        courses = await http.get("/me/courses")
        assert courses.status_code == 401
        assert courses.headers["content-type"] == "application/problem+json"
        assert (await http.get("/me/courses", headers=NAVIGATION)).status_code == 200

        # A missing page is a page; a missing API resource stays problem+json.
        missing = await http.get("/activities/999999", headers=NAVIGATION)
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("text/html")
        assert "Not found" in missing.text and '"type"' not in missing.text
        assert (await http.get("/activities/999999")).headers["content-type"] == (
            "application/problem+json"
        )
        schema = (await http.get("/openapi.json")).json()
        assert "/" not in schema["paths"] and "/login" not in schema["paths"]


async def test_names_are_escaped_everywhere(live: LiveShop) -> None:
    evil = "<script>alert(1)</script>\"'&"
    course = await live.client.post(
        "/admin/courses", json={"name": evil, "price": "1.00"}, headers=await live.admin()
    )
    start = datetime.now(UTC) - timedelta(minutes=1)
    created = await live.client.post(
        "/admin/activities",
        json={
            "name": evil,
            "start_time": start.isoformat(),
            "end_time": (start + timedelta(hours=1)).isoformat(),
            "courses": [
                {"course_id": course.json()["course_id"], "kill_price": "1.00", "kill_count": 1}
            ],
        },
        headers=await live.admin(),
    )
    aid = created.json()["activity_id"]
    await live.client.post(f"/admin/activities/{aid}/publish", headers=await live.admin())
    for path in ("/", f"/activities/{aid}"):
        page = await live.client.get(path, headers=NAVIGATION)
        assert "<script>alert" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&#39;&amp;" in page.text


async def test_refusals_read_as_words_in_the_browser(browser: Any, refusing: LiveShop) -> None:
    activity = await refusing.activity()
    _, token = await refusing.buyer()
    context = await _context(browser, refusing, PHONE, token)
    page = await context.new_page()

    # A fetch refused by the guards: a sentence under the button, which stays usable.
    await page.goto(f"/activities/{activity['activity_id']}")
    buy = page.locator("[data-buy]").filter(has_text="Buy now")
    await buy.click()
    message = page.locator("[data-message]")
    await message.filter(has_text="try again in a moment").wait_for()
    assert "{" not in (await message.text_content() or "")
    await buy.wait_for()  # enabled again: the person may retry
    assert await buy.is_enabled()
    await screenshot(page, "phone-activity-refused")

    # A navigation refused by the guards: a page in words, not problem+json.
    answer = await page.goto("/me/courses")
    assert answer is not None and answer.status == 429
    assert answer.headers["content-type"].startswith("text/html")
    await page.get_by_role("heading", name="A lot of people right now").wait_for()
    await screenshot(page, "phone-refused-page")
    await context.close()

    # The same refusal to an API client stays problem+json.
    async with httpx.AsyncClient(base_url=refusing.url, timeout=60) as http:
        api = await http.get("/me/courses", headers=refusing.auth(token))
    assert api.status_code == 429
    assert api.headers["content-type"] == "application/problem+json"


async def test_the_admin_opens_the_dashboard_after_logging_in(browser: Any, live: LiveShop) -> None:
    """The admin's login also lets the browser open /ymguard/; a buyer's does not."""
    context = await _context(browser, live, DESKTOP)
    page = await context.new_page()
    assert (await page.goto("/ymguard/")).status == 401  # type: ignore[union-attr]

    await page.goto("/login")
    form = page.locator("[data-login-form]")
    await form.get_by_label("Username").fill("admin")
    await form.get_by_label("Password").fill(ADMIN_PASSWORD)
    await form.get_by_role("button", name="Log in").click()
    await page.wait_for_url(re.compile(r"/$"))
    cookies = {c["name"]: c for c in await context.cookies()}
    session = cookies["ymguard_dashboard"]
    assert session["path"] == "/ymguard" and session["sameSite"] == "Strict"
    assert session["httpOnly"] is True  # no script on any page can read it
    # The session's token is good for the dashboard only: the API refuses it.
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
        me = await http.get("/me", headers={"Authorization": f"Bearer {session['value']}"})
        assert me.status_code == 401
    response = await page.goto("/ymguard/")
    assert response is not None and response.status == 200
    await page.get_by_role("heading", name=re.compile("guards dashboard")).wait_for()
    await screenshot(page, "desktop-dashboard")

    await page.goto("/")
    await page.locator("[data-logout]").click()
    for _ in range(100):  # the DELETE that forgets it is sent without waiting for it
        if "ymguard_dashboard" not in {c["name"] for c in await context.cookies()}:
            break
        await asyncio.sleep(0.1)
    assert "ymguard_dashboard" not in {c["name"] for c in await context.cookies()}

    # A buyer signs in: no cookie, and the dashboard stays closed.
    username = "bob_" + unique_prefix().replace(":", "")[-10:]
    await page.goto("/login")
    register = page.locator("[data-register-form]")
    await register.get_by_label("Username").fill(username)
    await register.get_by_label("Password").fill("correct horse battery staple")
    await register.get_by_role("button", name="Create account").click()
    await page.wait_for_url(re.compile(r"/$"))
    assert "ymguard_dashboard" not in {c["name"] for c in await context.cookies()}
    assert (await page.goto("/ymguard/")).status == 401  # type: ignore[union-attr]
    await context.close()


@pytest.mark.parametrize(
    "trick", ["%2F%09%2Fevil.example%2Fphish", "%2F%0A%2Fevil.example", "%2F%0D%5Cevil.example"]
)
async def test_login_never_sends_a_person_to_another_site(
    browser: Any, live: LiveShop, trick: str
) -> None:
    """``next=`` is read as the browser reads it: tabs, newlines, backslashes lead nowhere."""
    context = await _context(browser, live, DESKTOP)
    page = await context.new_page()
    await page.goto(f"/login?next={trick}")
    username = "eve_" + unique_prefix().replace(":", "")[-10:]
    register = page.locator("[data-register-form]")
    await register.get_by_label("Username").fill(username)
    await register.get_by_label("Password").fill("correct horse battery staple")
    await register.get_by_role("button", name="Create account").click()
    await page.wait_for_url(re.compile(r"/$"))
    assert page.url == live.url + "/"
    await context.close()
