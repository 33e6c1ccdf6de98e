"""The Lua scripts, one file per state change; each starts with its KEYS, ARGV and return."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_HERE = Path(__file__).parent


@cache
def lua(name: str) -> str:
    """The source of ``ymguard/lua/<name>.lua``."""
    return (_HERE / f"{name}.lua").read_text(encoding="utf-8")
