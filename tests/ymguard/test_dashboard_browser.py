"""The dashboard page in a real headless Chromium: two processes on one Redis, summed.

Two uvicorn processes serve ``tests/apps/dashboard_app.py`` on the shared Redis; traffic
goes to both, and the numbers are read from the page as a person sees them (the rendered
table), not from the JSON. Screenshots go to ``var/screenshots/``.

``YMGUARD_DOCS_SCREENSHOT=1`` also sends a few minutes of varied traffic first and saves
the README's picture, ``docs/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.apps.dashboard_app import TOKEN
from tests.browser import screenshot
from tests.helpers import ROOT, Uvicorn, running, unique_prefix

#: The liveness bound: the page shows the sums within this (reports land once a second).
WAIT_SECONDS = 60.0
DOCS_SCREENSHOT = os.environ.get("YMGUARD_DOCS_SCREENSHOT") == "1"

ITEMS = "GET /items/{item_id}"


async def send(c: httpx.AsyncClient, url: str, path: str, times: int, status: int) -> None:
    for _ in range(times):
        response = await c.get(url + path)
        assert response.status_code == status, response.text


async def cell(page: Any, resource: str, field: str) -> str:
    selector = f'#resources tr[data-resource="{resource}"] td[data-field="{field}"]'
    locator = page.locator(selector)
    if await locator.count() != 1:
        return ""
    return str(await locator.inner_text()).strip()


async def shown(page: Any) -> dict[str, str]:
    """The figures the test expects, as the page shows them now."""
    return {
        "items passed": await cell(page, ITEMS, "passed_total"),
        "closed blocked": await cell(page, "GET /closed", "blocked_total"),
        "fail errors": await cell(page, "GET /fail", "errors_total"),
        "processes": str(await page.locator("#processes tbody tr[data-process]").count()),
    }


async def docs_traffic(c: httpx.AsyncClient, urls: list[str], seconds: float) -> Counter[str]:
    """Varied traffic for the README's picture: a rising and falling rate, some refusals.

    Returns how many calls of each path answered each status (``"/closed 429"``).
    """
    rng = random.Random(13)
    answered: Counter[str] = Counter()
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        phase = 1 - abs(1 - 2 * (end - now) / seconds)  # 0 -> 1 -> 0
        calls = [c.get(rng.choice(urls) + f"/items/{rng.randrange(100)}") for _ in range(4)]
        calls += [c.get(rng.choice(urls) + "/pool") for _ in range(2)]
        if rng.random() < 0.2 + 0.6 * phase:
            calls.append(c.get(rng.choice(urls) + "/closed"))
        if rng.random() < 0.1 + 0.3 * phase:
            calls.append(c.get(rng.choice(urls) + "/fail"))
        for response in await asyncio.gather(*calls):
            path = "/items" if response.url.path.startswith("/items") else response.url.path
            answered[f"{path} {response.status_code}"] += 1
        await asyncio.sleep(0.25 - 0.2 * phase)
    return answered


async def test_traffic_to_two_processes_appears_summed_on_the_page(
    browser: Any, redis_url: str
) -> None:
    env = {"YMGUARD_TEST_REDIS": redis_url, "YMGUARD_TEST_PREFIX": unique_prefix()}
    servers = [
        Uvicorn("tests.apps.dashboard_app:app", env=env),
        Uvicorn("tests.apps.dashboard_app:app", env=env),
    ]
    with running(servers):
        a, b = (s.url for s in servers)
        before: Counter[str] = Counter()
        async with httpx.AsyncClient(timeout=30) as c:
            if DOCS_SCREENSHOT:
                before = await docs_traffic(c, [a, b], seconds=240)
            await send(c, a, "/items/1", 7, 200)
            await send(c, b, "/items/2", 5, 200)
            await send(c, a, "/closed", 1, 429)
            await send(c, b, "/closed", 3, 429)
            await send(c, a, "/fail", 2, 500)
            await send(c, b, "/fail", 1, 500)
            # Who is not let in gets a problem, not the page.
            refused = await c.get(a + "/ymguard/")
            assert refused.status_code == 403
            assert refused.headers["content-type"] == "application/problem+json"

        context = await browser.new_context(
            viewport={"width": 1440, "height": 900},
            extra_http_headers={"X-Dashboard-Token": TOKEN},
        )
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        try:
            response = await page.goto(b + "/ymguard/")
            assert response is not None and response.status == 200
            want = {
                "items passed": str(12 + before["/items 200"]),
                "closed blocked": str(4 + before["/closed 429"]),
                "fail errors": str(3 + before["/fail 500"]),
                "processes": "2",
            }
            deadline = time.monotonic() + WAIT_SECONDS
            while True:
                figures = await shown(page)
                if figures == want or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            await screenshot(page, "dashboard-two-processes")
            assert figures == want
            # Both processes are listed, the one serving the page marked as such.
            rows = page.locator("#processes tbody tr[data-process]")
            assert await rows.filter(has_text="this").count() == 1
            # The rules, their version, the breaker and the semaphores are on the page.
            version = (await page.locator("#rules-version").inner_text()).strip()
            assert len(version) >= 1 and version != "…"
            assert await page.locator('#rules tr[data-rules="GET /closed"]').count() == 1
            state = page.locator('#breakers tr[data-breaker="GET /fail#0"] [data-field="state"]')
            assert "closed" in await state.inner_text()
            pool = page.locator('#semaphores tr[data-semaphore="pool"] [data-field="permits"]')
            assert (await pool.inner_text()).strip() == "4"
            assert (await page.locator("#store").inner_text()).strip() == "redis (cluster)"
            # One chart per resource, drawn (a canvas with pixels set).
            assert await page.locator(f'.chart[data-resource="{ITEMS}"] canvas').count() == 2
            drawn = await page.evaluate(
                """(name) => {
                    const canvas = document.querySelector(
                        `.chart[data-resource="${CSS.escape(name)}"] canvas.calls`);
                    const data = canvas.getContext("2d").getImageData(
                        0, 0, canvas.width, canvas.height).data;
                    let set = 0;
                    for (let i = 3; i < data.length; i += 4) if (data[i]) set++;
                    return set;
                }""",
                ITEMS,
            )
            assert drawn > 100
            assert errors == []
            if DOCS_SCREENSHOT:
                await page.screenshot(path=str(ROOT / "docs" / "dashboard.png"), full_page=True)
        finally:
            await context.close()


@pytest.mark.parametrize("width", [1280])
async def test_the_page_works_on_memory_and_fits_a_laptop(browser: Any, width: int) -> None:
    # memory://: one process, shown as such; and nothing wider than a laptop screen.
    env = {"YMGUARD_TEST_REDIS": "memory://"}
    with running([Uvicorn("tests.apps.dashboard_app:app", env=env)]) as [server]:
        async with httpx.AsyncClient(timeout=30) as c:
            await send(c, server.url, "/items/3", 3, 200)
        context = await browser.new_context(
            viewport={"width": width, "height": 800},
            extra_http_headers={"X-Dashboard-Token": TOKEN},
        )
        page = await context.new_page()
        try:
            await page.goto(server.url + "/ymguard/")
            deadline = time.monotonic() + WAIT_SECONDS
            while await cell(page, ITEMS, "passed_total") != "3":
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            await screenshot(page, f"dashboard-memory-{width}")
            assert await cell(page, ITEMS, "passed_total") == "3"
            assert (await page.locator("#store").inner_text()).strip() == "memory"
            assert await page.locator("#processes tbody tr[data-process]").count() == 1
            scroll_width = await page.evaluate("document.documentElement.scrollWidth")
            assert scroll_width <= width
        finally:
            await context.close()
