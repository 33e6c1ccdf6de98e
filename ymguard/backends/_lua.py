"""The Lua scripts of the Redis primitives, one file per state change, beside their module.

Each script starts with a comment on its KEYS, ARGV and return. The wheel ships them
(``pyproject.toml`` package-data ``**/*.lua``).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

_HERE = Path(__file__).parent


@cache
def lua(name: str, prelude: str | None = None) -> str:
    """The source of ``ymguard/backends/<name>.lua``.

    Args:
        name: the script.
        prelude: a script every script of one primitive starts with (``permit_lib``,
            ``breaker_lib``): Redis runs one source per call, so the shared opening is
            prepended here rather than written out in each file.
    """
    source = (_HERE / f"{name}.lua").read_text(encoding="utf-8")
    return lua(prelude) + "\n" + source if prelude else source
