"""The Lua scripts, one file per state change; each starts with its KEYS, ARGV and return."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_HERE = Path(__file__).parent


@cache
def lua(name: str, prelude: str | None = None) -> str:
    """The source of ``ymguard/lua/<name>.lua``.

    Args:
        name: the script.
        prelude: a script every script of one kind starts with (``permit_lib``,
            ``breaker_lib``): Redis runs one source per call, so the shared opening is
            prepended here rather than written out in each file.
    """
    source = (_HERE / f"{name}.lua").read_text(encoding="utf-8")
    return lua(prelude) + "\n" + source if prelude else source
