"""The FastAPI factory: settings, guards, routers, and the lifespan that opens DB and Redis.

``create_app()`` is what uvicorn imports (``demo_service.app:create_app`` with
``--factory``); ``python -m demo_service`` calls it for you.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from fastapi import FastAPI, Request
from opentelemetry.metrics import MeterProvider
from redis.asyncio import BlockingConnectionPool, Redis
from starlette.exceptions import HTTPException

from ymguard import Guard, GuardMiddleware, __version__, load_rules, store_from_uri

from . import (
    accounts,
    activities,
    alipay_sandbox,
    db,
    health,
    messaging,
    orders,
    pages,
    payments,
    seckill,
    timeouts,
)
from .embedded_redis import EmbeddedRedis
from .errors import install_problem_handlers
from .openapi import install as install_openapi
from .settings import Settings
from .telemetry import Telemetry

log = logging.getLogger("demo_service")

#: Socket timeouts of the app's own Redis client (the guards' store has its own, 0.5 s).
REDIS_TIMEOUT_SECONDS = 1.0
#: Connections of the app's own Redis client per process, and the longest a request waits
#: for one in a burst before it is answered 503 (a queue, not a failure, up to then).
REDIS_MAX_CONNECTIONS = 128
REDIS_POOL_WAIT_SECONDS = 5.0


def _shown(url: str) -> str:
    """A URL fit for a log line (no password)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def build_guard(settings: Settings, metrics: bool | MeterProvider = True) -> Guard:
    """The guards of ``settings.rules_path``, on the demo's Redis.

    The store is ``YMGUARD_STORAGE`` if set, else the demo's Redis, else the rules file's
    ``storage:``; ``YMGUARD_KEY_PREFIX`` overrides the file's ``key_prefix``.
    """
    rules = load_rules(settings.rules_path)
    if settings.key_prefix:
        rules = rules.model_copy(update={"key_prefix": settings.key_prefix})
    store = store_from_uri(
        settings.guard_storage_url or rules.storage,
        key_prefix=rules.key_prefix,
        on_storage_error=rules.on_storage_error,
    )
    return Guard(rules, store, metrics=metrics)


#: Shops started in this process that froze the heap: the last one to stop thaws it.
_frozen_by = 0


def _freeze_heap() -> None:
    global _frozen_by
    gc.collect()
    gc.freeze()
    _frozen_by += 1


def _thaw_heap() -> None:
    """``gc.unfreeze()`` once no shop of this process wants the heap frozen (it is
    process-wide: one shop stopping must not thaw another's)."""
    global _frozen_by
    _frozen_by -= 1
    if _frozen_by == 0:
        gc.unfreeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The demo shop as a FastAPI app.

    Args:
        settings: the configuration; read from the environment when None. Without a
            ``redis_url`` the app starts an embedded Redis of its own and stops it on
            shutdown (``python -m demo_service`` starts one before the app instead, so
            that all workers share it).
    """
    settings = settings or Settings.from_env()
    embedded: EmbeddedRedis | None = None
    if settings.redis_url is None:
        embedded = EmbeddedRedis(settings.var_dir).start()
        settings = settings.with_redis(embedded.client_url)
    redis_url = settings.redis_client_url
    assert redis_url is not None
    telemetry = Telemetry()  # METRICS: the SDK and GET /metrics (telemetry.py)
    try:
        guard = build_guard(settings, telemetry.provider)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if embedded is not None:  # last out: everything below may still talk to it
                stack.push_async_callback(asyncio.to_thread, embedded.stop)
            stack.push_async_callback(guard.aclose)
            stack.callback(telemetry.shutdown)
            settings.var_dir.mkdir(parents=True, exist_ok=True)

            engine = db.make_engine(settings.database_url)
            stack.push_async_callback(engine.dispose)
            try:
                await db.ping(engine)
            except Exception as exc:
                where = engine.url.render_as_string(hide_password=True)
                raise RuntimeError(f"the database at {where} does not answer: {exc}") from exc

            # A blocking pool: a burst (a flash sale) waits a moment for a connection
            # instead of failing with "too many connections".
            redis = Redis.from_pool(
                BlockingConnectionPool.from_url(
                    redis_url,
                    max_connections=REDIS_MAX_CONNECTIONS,
                    timeout=REDIS_POOL_WAIT_SECONDS,
                    socket_timeout=REDIS_TIMEOUT_SECONDS,
                    socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                )
            )
            stack.push_async_callback(redis.aclose)
            try:
                await redis.ping()
            except Exception as exc:  # the guards fall back to local limits meanwhile
                log.warning("Redis at %s does not answer yet: %s", _shown(redis_url), exc)

            app.state.engine = engine
            app.state.redis = redis
            await db.create_schema(engine)
            sessions = db.make_sessionmaker(engine)
            app.state.sessionmaker = sessions
            secret = await accounts.token_secret(sessions, settings.token_secret)
            app.state.tokens = accounts.TokenCodec(secret)
            await accounts.ensure_admin(sessions, settings.demo_admin_password)
            await seckill.start(app)
            stack.push_async_callback(seckill.stop, app)
            # FLOW: the outbox relay, the consumers and the sweeper of this process.
            stack.push_async_callback(payments.stop, app)
            stack.push_async_callback(messaging.stop, app)
            await messaging.start(app)
            await orders.start(app)
            await payments.start(app)
            await timeouts.start(app)
            # ALIPAY: the sandbox's notifier of this process (and its Redis client).
            stack.push_async_callback(alipay_sandbox.stop, app)
            await alipay_sandbox.start(app)
            # Rules pushed with `ymguard push` are in force before the first request.
            await guard.start()
            if settings.gc_freeze:
                # What start-up built lives as long as the process: out of the full
                # collections' walk (their pauses were the p99 of every Redis-guarded route).
                _freeze_heap()
                stack.callback(_thaw_heap)
            yield

    app = FastAPI(title="ymguard demo shop", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.guard = guard
    install_problem_handlers(app)
    guard.install(app)
    app.add_middleware(GuardMiddleware, guard=guard)
    # Outside the guards: late buyers of a sold-out course cost no Redis call at all.
    app.add_middleware(seckill.SoldOutShortcut)
    # Outside the guards: they see who calls (``state:user``) before they decide.
    app.add_middleware(accounts.AuthMiddleware)
    # PAGES: a refused or missing page reaches a browser as a page, not as JSON.
    app.add_middleware(pages.HtmlErrors)
    health.add_health(app)
    pages.install(app)  # PAGES: HTML for browsers; before the API routers that share paths
    telemetry.install(app)
    app.include_router(accounts.router)
    app.include_router(activities.router)
    app.include_router(seckill.router)
    app.include_router(orders.router)
    app.include_router(payments.router)
    alipay_sandbox.install(app, settings, redis_url)  # /sandbox/alipay: its own ASGI app
    # DASHBOARD: the guards' live dashboard, for the admin only (docs/dashboard.md).
    app.mount("/ymguard", guard.dashboard(authorize=dashboard_admin, title="ymguard demo shop"))
    install_openapi(app)  # the problem+json answers in /openapi.json
    return app


def dashboard_admin(request: Request) -> bool:
    """Who may see ``/ymguard/``: the admin, by bearer token or by dashboard session.

    A bearer token (``Authorization``) as for the API; or, for a browser, the
    ``ymguard_dashboard`` cookie of ``POST /auth/dashboard-session``, whose token is good
    for the dashboard only. Anyone else gets 403, a caller with neither 401, problem+json.
    """
    principal = getattr(request.state, "principal", None)
    if principal is None:
        token = request.cookies.get(accounts.DASHBOARD_COOKIE)
        codec: accounts.TokenCodec | None = getattr(request.app.state, "tokens", None)
        if token and codec is not None:
            principal = codec.read(token, scope=accounts.DASHBOARD_SCOPE)
    if not isinstance(principal, accounts.Principal):
        raise HTTPException(401, "sign in as the admin", headers={"WWW-Authenticate": "Bearer"})
    return principal.is_admin


__all__ = ["build_guard", "create_app", "dashboard_admin"]
