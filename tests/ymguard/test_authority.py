"""Authority rules: allow and deny lists over the caller's origin (403 ``origin-denied``)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from ymguard import Guard, GuardMiddleware, RulesError, parse_rules
from ymguard.authority import AuthorityCheck, AuthorityRule
from ymguard.chain import cap_origin


def app_with(storage_uri: str, prefix: str, resources: dict[str, Any]) -> tuple[Guard, FastAPI]:
    guard = Guard(
        {
            "key_prefix": prefix,
            "origin": {"from": "header", "name": "X-Caller"},
            "resources": resources,
        },
        storage=storage_uri,
    )
    app = FastAPI()

    @app.get("/a")
    async def a() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/b")
    async def b() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(GuardMiddleware, guard=guard)
    guard.install(app)
    return guard, app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def status(c: httpx.AsyncClient, path: str, origin: str | None) -> int:
    headers = {"X-Caller": origin} if origin is not None else {}
    return (await c.get(path, headers=headers)).status_code


async def test_a_deny_list_refuses_its_origins_only(storage_uri: str, prefix: str) -> None:
    guard, app = app_with(storage_uri, prefix, {"GET /a": {"authority": {"deny": ["crawler"]}}})
    async with client(app) as c:
        assert await status(c, "/a", "crawler") == 403
        assert await status(c, "/a", "app-a") == 200
        assert await status(c, "/a", None) == 200  # no origin: not on the list
        assert await status(c, "/b", "crawler") == 200  # another resource
        refused = await c.get("/a", headers={"X-Caller": "crawler"})
    assert refused.headers["content-type"] == "application/problem+json"
    body = refused.json()
    assert body["type"].endswith("/origin-denied") and body["status"] == 403
    assert body["resource"] == "GET /a" and "crawler" in body["detail"]
    assert "Retry-After" not in refused.headers
    await guard.aclose()


async def test_an_allow_list_refuses_everyone_else_and_callers_without_origin(
    storage_uri: str, prefix: str
) -> None:
    rules = {"GET /a": {"authority": {"allow": ["app-a", "app-b"]}}}
    guard, app = app_with(storage_uri, prefix, rules)
    async with client(app) as c:
        assert await status(c, "/a", "app-a") == 200
        assert await status(c, "/a", "app-b") == 200
        assert await status(c, "/a", "app-c") == 403
        assert await status(c, "/a", None) == 403  # unlike Sentinel
        assert await status(c, "/a", "") == 403
    await guard.aclose()


async def test_a_denied_call_spends_nothing_of_later_rules(storage_uri: str, prefix: str) -> None:
    rules = {"GET /a": {"authority": {"deny": ["crawler"]}, "flow": [{"qps": 2}]}}
    guard, app = app_with(storage_uri, prefix, rules)
    async with client(app) as c:
        assert [await status(c, "/a", "crawler") for _ in range(5)] == [403] * 5
        assert [await status(c, "/a", "app") for _ in range(3)] == [200, 200, 429]
    assert isinstance(guard.chain("GET /a").checks[0], AuthorityCheck)
    await guard.aclose()


def test_long_and_odd_origin_names_match_the_capped_origin() -> None:
    long_name = "x" * 500
    check = AuthorityCheck("GET /a", AuthorityRule(allow=[long_name, "a b"]))
    assert check.admits(cap_origin(long_name)) and check.admits(cap_origin("a b"))
    assert not check.admits(cap_origin("x" * 499))


@pytest.mark.parametrize(
    ("authority", "why"),
    [
        ({"allow": ["a"], "deny": ["b"]}, "exactly one of allow and deny"),
        ({}, "exactly one of allow and deny"),
        ({"allow": []}, "empty list"),
        ({"deny": [""]}, "not empty"),
        ({"deny": "crawler"}, "must be a list"),
        ({"block": ["a"]}, "unknown field"),
    ],
)
def test_nonsense_is_refused(authority: dict[str, Any], why: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules({"resources": {"GET /a": {"authority": authority}}}, source="r.yaml")
    text = str(info.value)
    assert 'r.yaml:1: resources."GET /a".authority' in text and why in text, text
