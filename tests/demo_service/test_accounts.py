"""Accounts: register, log in, bearer tokens, roles, the admin account, the shared secret.

On SQLite and PostgreSQL (``database_url``), on the shared Redis under prefixes of its own.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import httpx
import jwt
import pytest
from sqlalchemy import select

from demo_service import accounts
from demo_service.accounts import Principal, TokenCodec, bearer_token
from demo_service.models import User
from tests.demo_service.conftest import TOKEN_SECRET, Shop, settings_for
from ymguard.errors import PROBLEM_BASE


def code(response: httpx.Response) -> str:
    """The problem code of an error response."""
    return str(response.json()["type"]).removeprefix(PROBLEM_BASE)


async def test_register_login_and_me(shop: Shop) -> None:
    registered = await shop.client.post(
        "/auth/register", json={"username": "carol", "password": "s3cret-pass"}
    )
    logged_in = await shop.client.post(
        "/auth/login", json={"username": "carol", "password": "s3cret-pass"}
    )
    me = await shop.client.get("/me", headers=shop.auth(logged_in.json()["token"]))

    assert registered.status_code == 201
    assert logged_in.status_code == 200
    assert logged_in.json()["user_id"] == registered.json()["user_id"]
    assert me.json() == {
        "user_id": registered.json()["user_id"],
        "username": "carol",
        "is_admin": False,
    }


async def test_passwords_are_stored_as_argon2id_hashes(shop: Shop) -> None:
    await shop.client.post("/auth/register", json={"username": "dave", "password": "pw-dave-1"})
    async with shop.app.state.sessionmaker() as session:
        stored = await session.scalar(select(User.password_hash).where(User.username == "dave"))
    assert stored is not None
    assert stored.startswith("$argon2id$")
    assert "pw-dave-1" not in stored


async def test_a_taken_username_is_409(shop: Shop) -> None:
    body = {"username": "erin", "password": "pw-erin-1"}
    first = await shop.client.post("/auth/register", json=body)
    second = await shop.client.post("/auth/register", json=body | {"password": "other"})
    admin = await shop.client.post("/auth/register", json={"username": "admin", "password": "x"})

    assert first.status_code == 201
    assert (second.status_code, code(second)) == (409, "username-taken")
    assert (admin.status_code, code(admin)) == (409, "username-taken")


async def test_wrong_password_and_unknown_user_are_both_bad_credentials(shop: Shop) -> None:
    await shop.client.post("/auth/register", json={"username": "frank", "password": "pw-frank"})
    wrong = await shop.client.post(
        "/auth/login", json={"username": "frank", "password": "pw-frank!"}
    )
    unknown = await shop.client.post(
        "/auth/login", json={"username": "nobody", "password": "pw-frank"}
    )
    assert (wrong.status_code, code(wrong)) == (401, "bad-credentials")
    assert (unknown.status_code, code(unknown)) == (401, "bad-credentials")
    assert wrong.json()["detail"] == unknown.json()["detail"]  # no hint which one was wrong


async def test_missing_forged_or_expired_tokens_are_unauthorized(shop: Shop) -> None:
    (user,) = await shop.users(1)
    principal = shop.app.state.tokens.read(user["Authorization"].split()[1])
    forged = TokenCodec("another-secret-" + "y" * 40).issue(principal)
    expired = jwt.encode(
        {"sub": str(principal.id), "name": "x", "adm": True, "iat": 1, "exp": int(time.time()) - 5},
        TOKEN_SECRET,
        algorithm="HS256",
    )
    unsigned = jwt.encode(
        {"sub": str(principal.id), "name": "x", "adm": True, "iat": 1, "exp": 2**40},
        None,
        algorithm="none",
    )

    for headers in [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Bearer " + "a" * 5000},
        shop.auth(forged),
        shop.auth(expired),
        shop.auth(unsigned),
    ]:
        response = await shop.client.get("/me", headers=headers)
        assert (response.status_code, code(response)) == (401, "unauthorized"), headers

    assert (await shop.client.get("/me", headers=user)).status_code == 200


async def test_admin_routes_need_the_admin_role(shop: Shop) -> None:
    (user,) = await shop.users(1)
    as_user = await shop.client.post(
        "/admin/courses", json={"name": "x", "price": "1.00"}, headers=user
    )
    anonymous = await shop.client.post("/admin/courses", json={"name": "x", "price": "1.00"})
    as_admin = await shop.client.post(
        "/admin/courses", json={"name": "x", "price": "1.00"}, headers=await shop.admin()
    )
    assert (as_user.status_code, code(as_user)) == (403, "forbidden")
    assert (anonymous.status_code, code(anonymous)) == (401, "unauthorized")
    assert as_admin.status_code == 201


async def test_the_token_secret_is_generated_once_and_shared_through_the_database(
    shop: Shop,
) -> None:
    # Two more "workers" on the same database, neither given DEMO_TOKEN_SECRET.
    first = Shop(settings_for(shop, token_secret=None))
    second = Shop(settings_for(shop, token_secret=None))
    async with AsyncExitStack() as stack:
        for s in (first, second):
            await stack.enter_async_context(s.app.router.lifespan_context(s.app))
            stack.push_async_callback(s.client.aclose)
        await first.client.post("/auth/register", json={"username": "gina", "password": "pw-g"})
        login = await first.client.post(
            "/auth/login", json={"username": "gina", "password": "pw-g"}
        )
        me = await second.client.get("/me", headers=first.auth(login.json()["token"]))
        assert me.status_code == 200
        assert me.json()["username"] == "gina"


async def test_without_demo_admin_password_one_is_generated_and_printed_once(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    async with shop.app.state.sessionmaker() as session:
        admin = await session.scalar(select(User).where(User.username == "admin"))
        assert admin is not None
        await session.delete(admin)
        await session.commit()
    capsys.readouterr()

    fresh = Shop(settings_for(shop, demo_admin_password=None))
    again = Shop(settings_for(shop, demo_admin_password=None))
    for s in (fresh, again):
        async with s.app.router.lifespan_context(s.app):
            await s.client.aclose()

    printed = [line for line in capsys.readouterr().out.splitlines() if "admin password" in line]
    assert len(printed) == 1
    password = printed[0].rsplit(" ", 1)[1]
    login = await shop.client.post("/auth/login", json={"username": "admin", "password": password})
    assert login.status_code == 200
    assert login.json()["is_admin"] is True


def test_bearer_token_reads_only_the_bearer_scheme() -> None:
    def scope(value: bytes) -> dict[str, object]:
        return {"headers": [(b"authorization", value)]}

    assert bearer_token(scope(b"Bearer abc")) == "abc"
    assert bearer_token(scope(b"bearer  abc ")) == "abc"
    assert bearer_token(scope(b"Basic abc")) is None
    assert bearer_token(scope(b"Bearer ")) is None
    assert bearer_token({"headers": []}) is None


def test_verified_tokens_are_remembered_bounded_and_never_past_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    codec = TokenCodec(TOKEN_SECRET, ttl_seconds=60)
    monkeypatch.setattr(accounts, "VERIFIED_CACHE_SIZE", 5)
    tokens = [codec.issue(Principal(i, f"u{i}", False)) for i in range(1, 9)]
    assert [p.id for t in tokens if (p := codec.read(t)) is not None] == list(range(1, 9))
    assert len(codec._verified) == 5  # the oldest went out
    assert codec.read("forged." + tokens[-1]) is None
    assert len(codec._verified) == 5  # refused tokens are never remembered

    remembered = tokens[-1]
    expiry = codec._verified[remembered][1]
    monkeypatch.setattr(accounts.time, "time", lambda: expiry + 1)
    assert codec.read(remembered) is None
    assert remembered not in codec._verified
