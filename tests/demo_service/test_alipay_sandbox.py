"""The Alipay sandbox on the shared Redis, driven by the shop's AlipayClient over ASGI.

A small shop app mounts the sandbox at /sandbox/alipay beside a notify receiver, as the demo
does; every test has its own key prefix. Liveness bounds use pytest.fail, never the clock.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from alipay import AliPay  # type: ignore[import-untyped]  # python-alipay-sdk
from fastapi.testclient import TestClient
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from demo_service.alipay_client import AlipayClient, AlipayError, is_success
from demo_service.alipay_sandbox import (
    TRADE_CLOSED,
    TRADE_SUCCESS,
    WAIT_BUYER_PAY,
    AlipaySandbox,
    Notifier,
    create_sandbox_app,
    start_notifier,
)
from demo_service.alipay_sign import (
    AlipayKeys,
    load_or_create_keys,
    private_pem,
    public_pem,
    verify,
)
from demo_service.app import create_app
from tests.helpers import unique_prefix

APP_ID = "2021000000000000"
BASE = "http://shop.test"
GATEWAY = f"{BASE}/sandbox/alipay/gateway.do"
NOTIFY_URL = f"{BASE}/pay/notify/alipay"
RETURN_URL = f"{BASE}/pay/return?from=alipay"

#: DEMO-API's notify parameters, exactly.
NOTIFY_PARAMS = {
    "notify_time",
    "notify_type",
    "notify_id",
    "app_id",
    "charset",
    "version",
    "sign_type",
    "sign",
    "trade_no",
    "out_trade_no",
    "total_amount",
    "receipt_amount",
    "buyer_pay_amount",
    "subject",
    "trade_status",
    "gmt_create",
    "gmt_payment",
    "seller_id",
}


@pytest.fixture(scope="module")
def keys() -> AlipayKeys:
    return AlipayKeys.generate()


@dataclass
class Receiver:
    """The shop's notify endpoint: records every notify, answers from a script."""

    answers: list[tuple[int, str]] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    hold: asyncio.Event | None = None

    async def endpoint(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode()))
        self.forms.append(form)
        self.times.append(asyncio.get_running_loop().time())
        if self.hold is not None:
            await self.hold.wait()
        status, body = self.answers.pop(0) if self.answers else (200, "success")
        return PlainTextResponse(body, status_code=status)


@dataclass
class Env:
    sandbox_app: Starlette
    sandbox: AlipaySandbox
    receiver: Receiver
    shop: Starlette
    client: AlipayClient
    browser: httpx.AsyncClient

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.shop), base_url=BASE)

    def notifier(self, **options: float) -> Notifier:
        return start_notifier(self.sandbox_app, poll_seconds=0.05, **options)

    async def pay_url(self, out_trade_no: str, amount: str = "99.00") -> str:
        return await self.client.page_pay(
            out_trade_no, amount, "Python 高并发 <课程>", NOTIFY_URL, RETURN_URL
        )

    async def pay(self, out_trade_no: str, amount: str = "99.00") -> httpx.Response:
        url = await self.pay_url(out_trade_no, amount)
        return await self.browser.post(url, data={"action": "pay"})


async def returned(request: Request) -> Response:
    return PlainTextResponse("back to the shop")


@pytest.fixture
async def make_env(
    redis_url: str, keys: AlipayKeys
) -> AsyncIterator[Callable[..., Awaitable[Env]]]:
    prefixes: list[str] = []
    redis = Redis.from_url(redis_url)
    clients: list[httpx.AsyncClient] = []

    async def make(
        delays: tuple[float, ...] = (0.0,), answers: tuple[tuple[int, str], ...] = ()
    ) -> Env:
        prefixes.append(unique_prefix())  # one sandbox each: tests may run two side by side
        receiver = Receiver(answers=list(answers))
        sandbox_app = create_sandbox_app(
            keys=keys,
            app_id=APP_ID,
            redis=redis,
            notify_delays=delays,
            key_prefix=prefixes[-1] + ":",
        )
        shop = Starlette(
            routes=[
                Route("/pay/notify/alipay", receiver.endpoint, methods=["POST"]),
                Route("/pay/return", returned),
                Mount("/sandbox/alipay", app=sandbox_app),
            ]
        )

        def http() -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=shop), base_url=BASE)

        sandbox_app.state.http_client_factory = http
        client, browser = http(), http()
        clients.extend([client, browser])
        sandbox = sandbox_app.state.sandbox
        return Env(
            sandbox_app,
            sandbox,
            receiver,
            shop,
            AlipayClient(GATEWAY, APP_ID, keys, client),
            browser,
        )

    yield make
    for c in clients:
        await c.aclose()
    for prefix in prefixes:
        keys_left = [k async for k in redis.scan_iter(match=prefix + "*")]
        if keys_left:
            await redis.delete(*keys_left)
    await redis.aclose()


async def eventually(check: Callable[[], bool], what: str, seconds: float = 15.0) -> None:
    """Wait until ``check()``; fail the test (not a timing assertion) if it never holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.02)


# -- the gateway refuses what it must --------------------------------------------------------


async def test_gateway_refuses_bad_signatures_and_unknown_apps(
    make_env: Callable[..., Awaitable[Env]], keys: AlipayKeys
) -> None:
    env = await make_env()
    fake = AlipayKeys.generate()
    # The impostor signs with a key of its own, and still reads the sandbox's signed refusals.
    mixed = AlipayKeys(fake.app_private, fake.app_public, keys.alipay_private, keys.alipay_public)
    impostor = AlipayClient(GATEWAY, APP_ID, mixed, env.client.http)
    refused = await impostor.query("O1")
    assert (refused["code"], refused["sub_code"]) == ("40002", "isv.invalid-signature")

    with pytest.raises(AlipayError) as info:
        await impostor.page_pay("O1", "99.00", "course", NOTIFY_URL, RETURN_URL)
    assert info.value.sub_code == "isv.invalid-signature"
    assert await env.sandbox.trade("O1") == {}  # nothing was created

    # A signed request changed in flight.
    params = env.client.signed_params("alipay.trade.close", {"out_trade_no": "O1"})
    params["biz_content"] = json.dumps({"out_trade_no": "O2"})
    answer = await env.client.http.post(GATEWAY, data=params)
    assert env.client._verified(answer, "alipay.trade.close")["sub_code"] == "isv.invalid-signature"

    stranger = AlipayClient(GATEWAY, "2021999999999999", env.client.keys, env.client.http)
    refused = await stranger.query("O1")
    assert (refused["code"], refused["sub_code"]) == ("40002", "isv.invalid-app-id")

    unsigned = {k: v for k, v in params.items() if k != "sign"}
    answer = await env.client.http.post(GATEWAY, data=unsigned)
    assert env.client._verified(answer, "alipay.trade.close")["sub_code"] == "isv.missing-signature"

    answer = await env.client.http.post(GATEWAY, data=dict(params, method="alipay.nope"))
    assert env.client._verified(answer, "alipay.nope")["sub_code"] == "isv.invalid-method"


# -- the whole payment -----------------------------------------------------------------------


async def test_page_pay_cashier_pay_redirects_and_notifies_with_a_valid_signature(
    make_env: Callable[..., Awaitable[Env]], keys: AlipayKeys
) -> None:
    env = await make_env()
    pay_url = await env.pay_url("O100", "99.00")
    assert pay_url.startswith(f"{BASE}/sandbox/alipay/cashier/")
    assert await env.pay_url("O100", "99.00") == pay_url  # asked again: the same cashier

    page = await env.browser.get(pay_url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Python 高并发 &lt;课程&gt;" in page.text and "99.00" in page.text
    assert '<button type="submit">Pay</button>' in page.text
    assert (await env.client.query("O100"))["trade_status"] == WAIT_BUYER_PAY

    notifier = env.notifier()
    try:
        paid = await env.browser.post(pay_url, data={"action": "pay"})
        assert paid.status_code == 303
        back = urlsplit(paid.headers["location"])
        assert f"{back.scheme}://{back.netloc}{back.path}" == f"{BASE}/pay/return"
        returned = dict(parse_qsl(back.query))
        assert returned.pop("from") == "alipay"  # the shop's own query is kept
        assert verify(returned, keys.alipay_public)
        assert (returned["out_trade_no"], returned["total_amount"]) == ("O100", "99.00")

        await eventually(lambda: len(env.receiver.forms) == 1, "the notify arrived")
    finally:
        await notifier.stop()

    [form] = env.receiver.forms
    assert set(form) == NOTIFY_PARAMS
    assert env.client.verify_notify(form)
    assert not env.client.verify_notify(dict(form, total_amount="0.01"))
    assert (form["out_trade_no"], form["total_amount"], form["trade_status"]) == (
        "O100",
        "99.00",
        TRADE_SUCCESS,
    )
    assert form["subject"] == "Python 高并发 <课程>" and form["app_id"] == APP_ID
    assert (form["notify_type"], form["charset"], form["version"], form["sign_type"]) == (
        "trade_status_sync",
        "utf-8",
        "1.0",
        "RSA2",
    )
    # An independent client library accepts it too.
    sdk = AliPay(
        appid=APP_ID,
        app_private_key_string=private_pem(keys.app_private).decode(),
        alipay_public_key_string=public_pem(keys.alipay_public).decode(),
    )
    unsigned = dict(form)
    assert sdk.verify(unsigned, unsigned.pop("sign"))

    query = await env.client.query("O100")
    assert (query["trade_status"], query["total_amount"], query["trade_no"]) == (
        TRADE_SUCCESS,
        "99.00",
        form["trade_no"],
    )
    # Paid: the page says so, paying again is refused, so is a new page-pay.
    again = await env.browser.get(pay_url)
    assert "already paid" in again.text and "<button" not in again.text
    assert (await env.browser.post(pay_url, data={"action": "pay"})).status_code == 409
    with pytest.raises(AlipayError) as info:
        await env.pay_url("O100")
    assert info.value.sub_code == "ACQ.TRADE_HAS_SUCCESS"
    await env.pay_url("O101", "1.00")
    with pytest.raises(AlipayError) as info:
        await env.pay_url("O101", "2.00")  # same trade, other amount
    assert info.value.sub_code == "ACQ.CONTEXT_INCONSISTENT"


async def test_python_alipay_sdk_requests_are_accepted_and_answers_verified_by_it(
    make_env: Callable[..., Awaitable[Env]], keys: AlipayKeys
) -> None:
    env = await make_env()
    sdk = AliPay(
        appid=APP_ID,
        app_private_key_string=private_pem(keys.app_private).decode(),
        alipay_public_key_string=public_pem(keys.alipay_public).decode(),
    )
    # The SDK's page-pay URL, as a browser would open it.
    query = sdk.api_alipay_trade_page_pay(
        "course", "O200", "12.50", return_url=RETURN_URL, notify_url=NOTIFY_URL
    )
    opened = await env.browser.get(f"{GATEWAY}?{query}")
    assert opened.status_code == 302
    assert urlsplit(opened.headers["location"]).path.startswith("/sandbox/alipay/cashier/")

    body = sdk.build_body("alipay.trade.query", {"out_trade_no": "O200"})
    answer = await env.browser.get(f"{GATEWAY}?{sdk.sign_data(body)}")
    checked = sdk._verify_and_return_sync_response(answer.text, "alipay_trade_query_response")
    assert (checked["code"], checked["trade_status"], checked["total_amount"]) == (
        "10000",
        WAIT_BUYER_PAY,
        "12.50",
    )


# -- notifies --------------------------------------------------------------------------------


async def test_notify_is_retried_on_the_schedule_until_the_body_is_exactly_success(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    delays = (0.0, 0.2, 0.4, 5.0)
    answers = ((200, "failure"), (200, "success\n"), (500, "success"))
    env = await make_env(delays=delays, answers=answers)
    notifier = env.notifier()
    try:
        assert (await env.pay("O300")).status_code == 303
        await eventually(lambda: len(env.receiver.forms) == 3, "three attempts")
        # Attempt 4 is 5 s away: only "success" with a 2xx status would have ended them.
        notify_id = env.receiver.forms[0]["notify_id"]
        state = await env.sandbox.notify_state(notify_id)
        assert (state["state"], state["attempts"]) == ("pending", "3")
    finally:
        await notifier.stop()
    assert {f["notify_id"] for f in env.receiver.forms} == {notify_id}
    times = env.receiver.times
    # Never early (Redis TIME schedules them); later is fine on a busy machine.
    assert times[1] - times[0] >= 0.19 and times[2] - times[1] >= 0.39


async def test_notify_stops_at_the_first_success_and_gives_up_after_the_schedule(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(delays=(0.0, 0.05, 0.05), answers=((503, "busy"), (200, "success")))
    failing = await make_env(delays=(0.0, 0.05, 0.05), answers=((500, "no"),) * 10)
    notifiers = [env.notifier(), failing.notifier()]
    try:
        await env.pay("O400")
        await failing.pay("O401")
        await eventually(lambda: len(env.receiver.forms) == 2, "delivered on attempt 2")
        await eventually(lambda: len(failing.receiver.forms) == 3, "three failed attempts")
        gave_up_id = failing.receiver.forms[0]["notify_id"]

        async def given_up() -> bool:
            return (await failing.sandbox.notify_state(gave_up_id))["state"] == "gave_up"

        for _ in range(500):
            if await given_up():
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the notify was never given up")
        delivered = await env.sandbox.notify_state(env.receiver.forms[0]["notify_id"])
        assert (delivered["state"], delivered["attempts"]) == ("delivered", "2")
        # Nothing more is sent once delivered or given up.
        for n in notifiers:
            assert await n.run_once() == 0
    finally:
        for n in notifiers:
            await n.stop()
    assert len(env.receiver.forms) == 2 and len(failing.receiver.forms) == 3


async def test_a_claimed_notify_is_not_delivered_twice_and_a_dropped_claim_comes_back(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env()
    await env.pay("O500")
    [notify_id] = [n.decode() for n in await env.sandbox.redis.zrange(env.sandbox.due_key, 0, -1)]

    # A worker claims it with a long lease and is "killed" (never delivers nor reports).
    dead = Notifier(env.sandbox, env.http, lease_seconds=60)
    assert await dead.claim(notify_id) is not None
    other = Notifier(env.sandbox, env.http, lease_seconds=60)
    other.start()
    try:
        assert await other.run_once() == 0  # leased: nobody else takes it
    finally:
        await other.stop()
    assert env.receiver.forms == []

    # A short lease that ends while its worker is gone: another notifier delivers it.
    await env.pay("O501")
    [_, short_id] = sorted(
        (n.decode() for n in await env.sandbox.redis.zrange(env.sandbox.due_key, 0, -1)),
        key=lambda n: n != notify_id,
    )
    dropped = Notifier(env.sandbox, env.http, lease_seconds=0.3)
    claim = await dropped.claim(short_id)
    assert claim is not None
    rescuer = env.notifier(lease_seconds=30)
    try:
        await eventually(lambda: len(env.receiver.forms) == 1, "delivered after the lease")
    finally:
        await rescuer.stop()
    [form] = env.receiver.forms
    assert form["notify_id"] == short_id and form["out_trade_no"] == "O501"
    state = await env.sandbox.notify_state(short_id)
    assert (state["state"], state["attempts"]) == ("delivered", "1")  # a lost lease is no attempt
    # The killed worker's late report changes nothing.
    assert await dropped.report(short_id, claim[1], delivered=False, status=500) == "stale"
    assert (await env.sandbox.notify_state(short_id))["state"] == "delivered"


async def test_many_notifiers_deliver_each_notify_once(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env()
    hold = asyncio.Event()
    env.receiver.hold = hold  # deliveries stay in flight while every notifier polls
    notifiers = [env.notifier() for _ in range(4)]
    try:
        for i in range(12):
            await env.pay(f"O6{i:02d}")
        await eventually(lambda: len(env.receiver.forms) == 12, "twelve notifies in flight")
        await asyncio.sleep(0.3)  # let every notifier poll again while they are held
        hold.set()

        async def all_delivered() -> bool:
            states = [await env.sandbox.notify_state(f["notify_id"]) for f in env.receiver.forms]
            return all(s["state"] == "delivered" for s in states)

        for _ in range(500):
            if await all_delivered():
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("not every notify was delivered")
    finally:
        for n in notifiers:
            await n.stop()
    counts = Counter(f["notify_id"] for f in env.receiver.forms)
    assert len(counts) == 12 and set(counts.values()) == {1}


# -- close and refund ------------------------------------------------------------------------


async def test_a_paid_trade_cannot_be_closed_and_a_closed_one_cannot_be_paid(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env()
    await env.pay("O700")
    refused = await env.client.close("O700")
    assert (refused["code"], refused["sub_code"]) == ("40004", "ACQ.TRADE_STATUS_ERROR")
    assert (await env.client.query("O700"))["trade_status"] == TRADE_SUCCESS

    pay_url = await env.pay_url("O701")
    closed = await env.client.close("O701")
    assert is_success(closed) and closed["out_trade_no"] == "O701"
    assert is_success(await env.client.close("O701"))  # closing again is harmless
    assert (await env.client.query("O701"))["trade_status"] == TRADE_CLOSED
    page = await env.browser.get(pay_url)
    assert "closed" in page.text and "<button" not in page.text
    assert (await env.browser.post(pay_url, data={"action": "pay"})).status_code == 409
    with pytest.raises(AlipayError) as info:
        await env.pay_url("O701")
    assert info.value.sub_code == "ACQ.TRADE_HAS_CLOSE"

    missing = await env.client.close("O702")
    assert missing["sub_code"] == "ACQ.TRADE_NOT_EXIST"
    assert (await env.client.query("O702"))["sub_code"] == "ACQ.TRADE_NOT_EXIST"
    assert (await env.browser.get(f"{BASE}/sandbox/alipay/cashier/{'x' * 32}")).status_code == 404


async def test_refund_is_idempotent_by_out_request_no_and_never_exceeds_the_payment(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env()
    unpaid = await env.pay_url("O800", "100.00")
    assert unpaid
    refused = await env.client.refund("O800", "1.00", "R0")
    assert refused["sub_code"] == "ACQ.TRADE_STATUS_ERROR"
    await env.pay("O800", "100.00")

    answers = await asyncio.gather(*(env.client.refund("O800", "30.00", "R1") for _ in range(8)))
    assert all(is_success(a) and a["refund_fee"] == "30.00" for a in answers)
    assert sorted(a["fund_change"] for a in answers) == ["N"] * 7 + ["Y"]  # money moved once

    assert (await env.client.refund("O800", "31.00", "R1"))["sub_code"] == "ACQ.INVALID_PARAMETER"
    over = await env.client.refund("O800", "70.01", "R2")
    assert over["sub_code"] == "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"
    rest = await env.client.refund("O800", "70.00", "R2")
    assert (rest["fund_change"], rest["refund_fee"]) == ("Y", "100.00")
    query = await env.client.query("O800")
    assert (query["trade_status"], query["refund_fee"]) == (TRADE_CLOSED, "100.00")
    assert (await env.client.refund("O800", "70.00", "R2"))["fund_change"] == "N"


# -- the demo mounts it ----------------------------------------------------------------------


def test_the_demo_mounts_the_sandbox_with_its_keys_and_runs_a_notifier(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = unique_prefix()
    monkeypatch.chdir(tmp_path)
    for name in ("DATABASE_URL", "YMGUARD_RULES", "YMGUARD_STORAGE", "ALIPAY_KEYS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("YMGUARD_KEY_PREFIX", prefix)
    monkeypatch.setenv("DEMO_REDIS_PREFIX", prefix)
    app = create_app()
    try:
        with TestClient(app) as browser:
            keys = load_or_create_keys(tmp_path / "var" / "alipay")  # the demo wrote them
            assert app.state.alipay_sandbox.state.sandbox.keys.app_public.public_numbers() == (
                keys.app_public.public_numbers()
            )
            assert app.state.alipay_notifier._task is not None
            shop = AlipayClient("http://testserver/sandbox/alipay/gateway.do", APP_ID, keys, None)  # type: ignore[arg-type]
            params = shop.signed_params("alipay.trade.query", {"out_trade_no": "O900"})
            answer = browser.post("/sandbox/alipay/gateway.do", data=params)
            assert shop._verified(answer, "alipay.trade.query")["sub_code"] == "ACQ.TRADE_NOT_EXIST"
            assert browser.get(f"/sandbox/alipay/cashier/{'x' * 32}").status_code == 404
        assert app.state.alipay_notifier._task is None  # stopped with the app
    finally:
        client = SyncRedis.from_url(redis_url)
        left = list(client.scan_iter(match=prefix + "*"))
        if left:
            client.delete(*left)
        client.close()
