"""Reading an ``application/x-www-form-urlencoded`` body strictly.

Alipay's notify and the sandbox's gateway and cashier take form bodies; FastAPI's own form
parsing needs ``python-multipart`` and accepts a repeated key (which value is signed?).
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.requests import Request


async def read_form(request: Request, max_bytes: int) -> dict[str, str] | None:
    """The urlencoded body as a dict; None if over ``max_bytes``, not UTF-8, or a key repeats."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    form = dict(pairs)
    return form if len(form) == len(pairs) else None


__all__ = ["read_form"]
