"""The ymguard demo: the flash-sale ("seckill") flow of an online-course shop.

``python -m demo_service`` serves it on 127.0.0.1:8000 with embedded defaults (SQLite and
a real Redis under ``./var/``); ``demo_service.app:create_app`` is the ASGI factory.
"""

from __future__ import annotations

from ymguard import __version__

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "__version__", "create_app"]
