"""A real headless Chromium for page and dashboard tests (Debian's ``chromium``, Playwright).

Tests take the ``browser`` fixture (``tests/conftest.py``) and open pages of a server they
started themselves; :func:`screenshot` saves what the page looked like under
``var/screenshots/`` (not committed) so that a person can look at it.

Chromium is a system package: ``CHROMIUM`` (default ``/usr/bin/chromium``) names it. Where it
is missing the browser tests skip, except in CI (``YMGUARD_REQUIRE_REDIS=1`` there, and
``CI`` set), where they fail: ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from tests.helpers import ROOT

#: The Chromium binary Playwright drives.
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: Where screenshots of the run go (ignored by git).
SCREENSHOTS = ROOT / "var" / "screenshots"
#: Launch flags for a container without a user namespace sandbox.
LAUNCH_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]


def chromium_path() -> str | None:
    """The Chromium executable, or None when the machine has none."""
    return CHROMIUM if Path(CHROMIUM).exists() else None


async def screenshot(page: object, name: str, full_page: bool = True) -> Path:
    """Save ``page`` (a Playwright page) as ``var/screenshots/<name>.png``; return the path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "page"
    path = SCREENSHOTS / f"{safe}.png"
    await page.screenshot(path=str(path), full_page=full_page)  # type: ignore[attr-defined]
    return path
