"""Accounts: register, log in, bearer tokens, and who is calling.

- Passwords are hashed with Argon2id (``argon2-cffi``, RFC 9106's low-memory profile), in
  a worker thread so that a login storm never blocks the event loop, and never more at once
  than the machine has cores (each hash takes 64 MiB).
- Tokens are JWTs (``PyJWT``, HS256) carrying the user's id, name and role: the hot routes
  (seckill) learn who calls without a database query. The secret is ``DEMO_TOKEN_SECRET``,
  else one generated once and kept in the database, so every worker and host of one shop
  accepts every other's tokens.
- :class:`AuthMiddleware` reads the token before the guards run and sets
  ``request.state.user`` (the user id as a string): ``state:user`` scopes in ``rules.yaml``
  (submit tokens) see who is calling. :func:`current_user` and :func:`admin_user` are the
  FastAPI dependencies routes use.
- The ``admin`` account is created at startup with ``DEMO_ADMIN_PASSWORD``, or with a
  generated password printed once by the worker that created it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import BadCredentials, Forbidden, Unauthorized, UsernameTaken
from .models import ShopSecret, User
from .openapi import problems

log = logging.getLogger("demo_service.accounts")

#: The administrator's username.
ADMIN_USERNAME = "admin"
#: How long a bearer token is valid.
TOKEN_TTL_SECONDS = 24 * 3600
#: Verified tokens remembered per process.
VERIFIED_CACHE_SIZE = 10_000
_ALGORITHM = "HS256"
_SECRET_NAME = "token-signing-key"
_HASHER = PasswordHasher()
#: The threads that hash: at most one per core per process (each hash takes a core and
#: 64 MiB); a thread pool, not an asyncio semaphore, so it serves any event loop.
_HASH_POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="hash")


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the username does not exist, so that the answer takes as
    long as for a wrong password (no probing for usernames by timing)."""
    return _HASHER.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as the bearer token says."""

    id: int
    username: str
    is_admin: bool


class TokenCodec:
    """Issues and reads the shop's bearer tokens (HS256 JWTs)."""

    def __init__(self, secret: str, ttl_seconds: int = TOKEN_TTL_SECONDS) -> None:
        if len(secret) < 32:
            raise ValueError("the token secret must be at least 32 characters")
        self._secret = secret
        self.ttl_seconds = ttl_seconds
        #: token -> (principal, exp) of recently verified tokens: a buyer hammering the
        #: seckill button sends one token many times, and verifying it costs ~60 us.
        #: Only valid tokens enter (forged ones cannot fill it); bounded, oldest out.
        self._verified: OrderedDict[str, tuple[Principal, float, str | None]] = OrderedDict()

    def issue(
        self, user: User | Principal, *, scope: str | None = None, ttl_seconds: int | None = None
    ) -> str:
        """A token for ``user``, valid for ``ttl_seconds`` (default: the codec's).

        ``scope`` makes a token good for one purpose only (``"dashboard"``: the guards'
        dashboard cookie): :meth:`read` gives it back only to a reader asking for that
        scope, so the API never accepts it as a bearer token.
        """
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": str(user.id),
            "name": user.username,
            "adm": bool(user.is_admin),
            "iat": now,
            "exp": now + (ttl_seconds if ttl_seconds is not None else self.ttl_seconds),
        }
        if scope is not None:
            claims["scp"] = scope
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def read(self, token: str, scope: str | None = None) -> Principal | None:
        """The principal of a valid, unexpired token of ``scope``; None for anything else.

        The API reads with ``scope=None``: a token issued for a scope is refused there.
        """
        if len(token) > 2048:  # no token of ours is this long: do not parse it
            return None
        known = self._verified.get(token)
        if known is not None:
            principal, expires, scoped = known
            if time.time() < expires:
                self._verified.move_to_end(token)
                return principal if scoped == scope else None
            del self._verified[token]
            return None
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                options={"require": ["sub", "exp", "iat"]},
            )
            principal = Principal(int(claims["sub"]), str(claims["name"]), bool(claims["adm"]))
            expires = float(claims["exp"])
            scoped = claims.get("scp")
            if scoped is not None and not isinstance(scoped, str):
                return None
        except (jwt.InvalidTokenError, KeyError, TypeError, ValueError):
            return None
        self._verified[token] = (principal, expires, scoped)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal if scoped == scope else None


async def token_secret(sessions: async_sessionmaker[AsyncSession], configured: str | None) -> str:
    """``configured`` if given; else the shop's shared secret, generated on first start.

    Kept in the database (``shop_secrets``), so every worker and host accepts every
    other's tokens; of several workers starting at once, the first insert wins.
    """
    if configured:
        return configured
    async with sessions() as session:
        row = await session.get(ShopSecret, _SECRET_NAME)
        if row is not None:
            return row.value
        session.add(ShopSecret(name=_SECRET_NAME, value=secrets.token_urlsafe(48)))
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()
        row = await session.get(ShopSecret, _SECRET_NAME, populate_existing=True)
        assert row is not None
        return row.value


async def hash_password(password: str) -> str:
    """The Argon2id hash of ``password`` (computed off the event loop)."""
    return await asyncio.get_running_loop().run_in_executor(_HASH_POOL, _HASHER.hash, password)


async def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``password_hash`` (computed off the event loop)."""

    def check() -> bool:
        try:
            return _HASHER.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.get_running_loop().run_in_executor(_HASH_POOL, check)


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, if any."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


class AuthMiddleware:
    """Reads the bearer token before the guards run: ``state.user`` and ``state.principal``.

    It never refuses a request (public routes need no token); :func:`current_user` does.
    It must wrap ``GuardMiddleware`` so that ``state:user`` scopes see the caller. The
    codec is ``app.state.tokens``, set when the app starts.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            token = bearer_token(scope)
            codec: TokenCodec | None = getattr(scope["app"].state, "tokens", None)
            if token is not None and codec is not None:
                principal = codec.read(token)
                if principal is not None:
                    state = scope.setdefault("state", {})
                    state["principal"] = principal
                    state["user"] = str(principal.id)
        await self.app(scope, receive, send)


async def current_user(request: Request) -> Principal:
    """FastAPI dependency: the signed-in caller; 401 ``unauthorized`` without a valid token.

    Async although it awaits nothing: FastAPI runs a plain ``def`` dependency in a worker
    thread, which would cost the hottest route (seckill) a thread hop per request.
    """
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise Unauthorized("a valid bearer token is required")
    request.state.user = str(principal.id)
    return principal


async def admin_user(user: Annotated[Principal, Depends(current_user)]) -> Principal:
    """FastAPI dependency: the signed-in administrator; 403 ``forbidden`` for anyone else."""
    if not user.is_admin:
        raise Forbidden("this needs the admin role")
    return user


CurrentUser = Annotated[Principal, Depends(current_user)]
AdminUser = Annotated[Principal, Depends(admin_user)]


def _sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    return sessions


class Credentials(BaseModel):
    """A username and password."""

    username: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    password: str = Field(min_length=1, max_length=1024)


router = APIRouter(tags=["accounts"], responses=problems(400, 401, 409, 422, 429, 503))


@router.post("/auth/register", status_code=201)
async def register(body: Credentials, request: Request) -> dict[str, Any]:
    """Create an account: 201 ``{"user_id"}``; 409 ``username-taken``."""
    sessions = _sessions(request)
    async with sessions() as session:
        taken = await session.scalar(select(User.id).where(User.username == body.username))
        if taken is not None:
            raise UsernameTaken(f"the username {body.username!r} is taken")
        user = User(username=body.username, password_hash=await hash_password(body.password))
        session.add(user)
        try:
            await session.commit()
        except IntegrityError:  # registered by someone else meanwhile
            raise UsernameTaken(f"the username {body.username!r} is taken") from None
    return {"user_id": user.id, "username": user.username}


@router.post("/auth/login")
async def login(body: Credentials, request: Request) -> dict[str, Any]:
    """Log in: 200 ``{"token", "user_id"}``; 401 ``bad-credentials``."""
    sessions = _sessions(request)
    async with sessions() as session:
        user = await session.scalar(select(User).where(User.username == body.username))
    ok = await verify_password(user.password_hash if user else _dummy_hash(), body.password)
    if user is None or not ok:
        raise BadCredentials("wrong username or password")
    codec: TokenCodec = request.app.state.tokens
    return {
        "token": codec.issue(user),
        "token_type": "Bearer",
        "expires_in": codec.ttl_seconds,
        "user_id": user.id,
        "is_admin": user.is_admin,
    }


#: The cookie of the admin's dashboard session (``POST /auth/dashboard-session``).
DASHBOARD_COOKIE = "ymguard_dashboard"
#: The scope of the token in that cookie: good for the dashboard only, never the API.
DASHBOARD_SCOPE = "dashboard"
#: How long a dashboard session lasts.
DASHBOARD_SESSION_SECONDS = 8 * 3600


@router.post("/auth/dashboard-session", status_code=204, responses=problems(403))
async def open_dashboard_session(user: AdminUser, request: Request) -> Response:
    """The admin's browser session for the guards' dashboard at ``/ymguard/``.

    A browser opening a page sends no bearer header, so the dashboard reads a cookie: an
    ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site makes the
    browser send it) cookie for ``/ymguard`` only (``Secure`` over HTTPS), holding a token
    scoped to the dashboard that the API refuses. 204; 403 for anyone but the admin.
    """
    codec: TokenCodec = request.app.state.tokens
    token = codec.issue(user, scope=DASHBOARD_SCOPE, ttl_seconds=DASHBOARD_SESSION_SECONDS)
    response = Response(status_code=204)
    response.set_cookie(
        DASHBOARD_COOKIE,
        token,
        max_age=DASHBOARD_SESSION_SECONDS,
        path="/ymguard",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.delete("/auth/dashboard-session", status_code=204)
async def close_dashboard_session() -> Response:
    """Forget the dashboard cookie (log out); 204 whoever asks."""
    response = Response(status_code=204)
    response.delete_cookie(DASHBOARD_COOKIE, path="/ymguard", httponly=True, samesite="strict")
    return response


@router.get("/me")
async def me(user: CurrentUser) -> dict[str, Any]:
    """The caller's account."""
    return {"user_id": user.id, "username": user.username, "is_admin": user.is_admin}


async def ensure_admin(sessions: async_sessionmaker[AsyncSession], password: str | None) -> None:
    """Create ``admin`` if missing (safe with several workers starting at once).

    With ``password`` (``DEMO_ADMIN_PASSWORD``) the admin's password is set to it, also on
    an existing account; without it a new admin gets a generated password, printed once.
    """
    async with sessions() as session:
        admin = await session.scalar(select(User).where(User.username == ADMIN_USERNAME))
        if admin is not None:
            if not admin.is_admin:
                admin.is_admin = True
                await session.commit()
            if password is not None and not await verify_password(admin.password_hash, password):
                admin.password_hash = await hash_password(password)
                await session.commit()
            return
        chosen = password or secrets.token_urlsafe(12)
        session.add(
            User(username=ADMIN_USERNAME, password_hash=await hash_password(chosen), is_admin=True)
        )
        try:
            await session.commit()
        except IntegrityError:  # another worker created it first
            return
    if password is None:
        # Printed, not only logged: this is the one time anyone can see it.
        print(f"demo_service: admin password (generated, shown once): {chosen}", flush=True)
        log.warning("created the admin account with a generated password (printed above)")


__all__ = [
    "ADMIN_USERNAME",
    "AdminUser",
    "AuthMiddleware",
    "CurrentUser",
    "Principal",
    "TokenCodec",
    "admin_user",
    "bearer_token",
    "current_user",
    "ensure_admin",
    "hash_password",
    "router",
    "token_secret",
    "verify_password",
]
