"""Anti-resubmit: submit tokens and Idempotency-Key, on the memory store and on Redis."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
import redis.asyncio

from tests.apps.antiresubmit_app import create_app
from tests.helpers import RedisServer, Uvicorn
from ymguard import Guard, RulesError, antiresubmit, idempotency
from ymguard.antiresubmit import SubmitTokens, scope_of
from ymguard.backends import responses
from ymguard.backends import tokens as token_tables
from ymguard.errors import PROBLEM_BASE
from ymguard.idempotency import parse_idempotency_key
from ymguard.storage import Store, store_from_uri


@pytest.fixture
def storage_uri(storage_uri_with_cluster: str) -> str:
    """Parity on memory, Redis and a Redis Cluster (``redis+cluster://``)."""
    return storage_uri_with_cluster


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def key() -> str:
    return f'"{uuid.uuid4()}"'


def problem(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json"
    type_uri: str = response.json()["type"]
    return type_uri.removeprefix(PROBLEM_BASE)


async def wait_for(predicate: Any, what: str, tries: int = 400) -> None:
    """Poll an async predicate (bounded), for states that need another task to progress."""
    for _ in range(tries):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


# -- submit tokens ---------------------------------------------------------------------


async def test_hundred_concurrent_consumes_of_one_token_exactly_one_wins(store: Store) -> None:
    tokens = SubmitTokens(storage=store, ttl_seconds=60)
    token = await tokens.issue("user-1:courses-1,2")
    results = await asyncio.gather(
        *(tokens.consume("user-1:courses-1,2", token) for _ in range(100))
    )
    assert results.count(True) == 1
    assert await tokens.consume("user-1:courses-1,2", token) is False


async def test_a_token_of_another_scope_never_matches(store: Store) -> None:
    tokens = SubmitTokens(storage=store)
    alice = await tokens.issue("alice")
    bob = await tokens.issue("bob")
    assert alice != bob and len(alice) >= 20
    assert await tokens.consume("bob", alice) is False
    assert await tokens.consume("alice", "") is False
    assert await tokens.consume("alice", alice) is True
    assert await tokens.consume("bob", bob) is True


async def test_issuing_again_replaces_the_scopes_token(store: Store) -> None:
    tokens = SubmitTokens(storage=store)
    first = await tokens.issue("alice")
    second = await tokens.issue("alice")
    assert await tokens.consume("alice", first) is False
    assert await tokens.consume("alice", second) is True


async def test_an_expired_token_is_refused(store: Store) -> None:
    tokens = SubmitTokens(storage=store, ttl_seconds=0.05)
    token = await tokens.issue("alice")
    await asyncio.sleep(0.15)
    assert await tokens.consume("alice", token) is False


async def test_tokens_on_two_objects_of_one_store_are_shared(store: Store) -> None:
    token = await SubmitTokens(storage=store).issue("alice")
    assert await SubmitTokens(storage=store).consume("alice", token) is True
    other_prefix = SubmitTokens(storage=store, prefix="other")
    token = await SubmitTokens(storage=store).issue("alice")
    assert await other_prefix.consume("alice", token) is False
    assert other_prefix.key("alice") != SubmitTokens(storage=store).key("alice")


async def test_submit_token_rule_spends_the_token_once(storage_uri: str, prefix: str) -> None:
    app = create_app(storage_uri, prefix)
    async with client(app) as c:
        alice = {"X-User": "alice"}
        token = (await c.get("/orders/confirm?course_ids=1,2", headers=alice)).json()["token"]
        headers = {**alice, "X-Submit-Token": token}
        first = await c.post("/orders?course_ids=1,2", headers=headers)
        again = await c.post("/orders?course_ids=1,2", headers=headers)
        missing = await c.post("/orders?course_ids=1,2", headers=alice)
    await app.state.guard.aclose()
    assert first.status_code == 200 and first.json()["courses"] == "1,2"
    assert again.status_code == 409 and problem(again) == "duplicate-submission"
    assert missing.status_code == 409 and problem(missing) == "duplicate-submission"
    assert app.state.runs["orders"] == 1


async def test_submit_token_is_bound_to_user_and_courses(storage_uri: str, prefix: str) -> None:
    app = create_app(storage_uri, prefix)
    async with client(app) as c:
        token = (await c.get("/orders/confirm?course_ids=1", headers={"X-User": "alice"})).json()
        headers = {"X-User": "bob", "X-Submit-Token": token["token"]}
        as_bob = await c.post("/orders?course_ids=1", headers=headers)
        headers["X-User"] = "alice"
        other_course = await c.post("/orders?course_ids=2", headers=headers)
        right = await c.post("/orders?course_ids=1", headers=headers)
    await app.state.guard.aclose()
    assert [as_bob.status_code, other_course.status_code, right.status_code] == [409, 409, 200]


async def test_concurrent_submits_with_one_token_place_one_order(
    storage_uri: str, prefix: str
) -> None:
    app = create_app(storage_uri, prefix)
    async with client(app) as c:
        alice = {"X-User": "alice"}
        token = (await c.get("/orders/confirm?course_ids=7", headers=alice)).json()["token"]
        headers = {**alice, "X-Submit-Token": token}
        responses = await asyncio.gather(
            *(c.post("/orders?course_ids=7", headers=headers) for _ in range(30))
        )
    await app.state.guard.aclose()
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * 29
    assert app.state.runs["orders"] == 1


# -- Idempotency-Key: the header -------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('  "a b\\"c"  ', 'a b"c'),
        ('"abc";v=1', "abc"),
        ('""', None),
        ('"abc', None),
        ("a b", None),
        ('"caf\u00e9"', None),
        ("", None),
        ('"' + "k" * 256 + '"', None),
        ('"' + "k" * 255 + '"', "k" * 255),
    ],
)
def test_the_header_is_an_sf_string_or_a_bare_token(value: str, expected: str | None) -> None:
    assert parse_idempotency_key(value) == expected


def test_rules_refuse_an_unknown_scope_part() -> None:
    with pytest.raises(RulesError) as info:
        Guard({"resources": {"POST /x": {"idempotency": {"scope": ["cookie:sid"]}}}})
    assert "idempotency.scope" in str(info.value)
    guard = Guard({"resources": {"POST /x": {"submit_token": {"scope": "state:user"}}}})
    rule = guard.rules.resources["POST /x"].submit_token
    assert rule is not None and rule.scope == ["state:user"] and rule.ttl_seconds == 900


@pytest.mark.parametrize("kind", ["idempotency", "submit_token"])
def test_the_default_scope_is_origin_and_credentials_and_parts_are_checked_at_load(
    kind: str,
) -> None:
    guard = Guard({"resources": {"POST /x": {kind: {}}}})
    rule = getattr(guard.rules.resources["POST /x"], kind)
    assert rule.scope == ["origin", "credentials"]
    scope = ["credentials", "origin", "state:user", "header:X-Tenant", "query:q", "param:id"]
    guard = Guard({"resources": {"POST /x": {kind: {"scope": scope}}}})
    assert getattr(guard.rules.resources["POST /x"], kind).scope == scope
    for bad in ["credential", "header:X Tenant", "header:", "cookie:sid", "user"]:
        with pytest.raises(RulesError) as info:
            Guard({"resources": {"POST /x": {kind: {"scope": ["origin", bad]}}}})
        assert f"{kind}.scope" in str(info.value) and repr(bad) in str(info.value)


def test_scope_values_are_encoded_injectively() -> None:
    def scope(headers: list[tuple[bytes, bytes]], query: bytes = b"") -> Any:
        return {"type": "http", "headers": headers, "query_string": query, "path_params": {}}

    parts = ["credentials", "header:x-t", "query:q"]
    seen = {
        scope_of(parts, "POST /x", "", scope(headers, query))
        for headers, query in [
            ([], b""),
            ([(b"authorization", b"a")], b""),
            ([(b"cookie", b"a")], b""),
            ([(b"authorization", b"a"), (b"authorization", b"b")], b""),
            ([(b"authorization", b"a,b")], b""),
            ([(b"x-t", b"a,b")], b""),
            ([(b"x-t", b"a"), (b"x-t", b"b")], b""),
            ([], b"q=a,b"),
            ([], b"q=a&q=b"),
            ([], b"q="),
        ]
    }
    assert len(seen) == 10
    assert scope_of(["origin"], "POST /x", "a", scope([])) != scope_of(
        ["origin"], "POST /x)", "", scope([])
    )
    # Credentials never appear in the scope, only their digest.
    secret = scope_of(["credentials"], "POST /x", "", scope([(b"authorization", b"Bearer s3")]))
    assert "s3" not in secret


def test_an_unset_state_part_is_reported_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The usual cause: the middleware that sets request.state.user runs inside the guard.
    monkeypatch.setattr(antiresubmit, "_unset_state_warned", set())
    bare: Any = {"type": "http", "headers": [], "state": {}}
    with caplog.at_level("WARNING", logger="ymguard"):
        for _ in range(3):
            scope_of(["state:user"], "POST /x", "", bare)
        scope_of(["state:user"], "POST /x", "", {**bare, "state": {"user": "alice"}})
    warnings = [r for r in caplog.records if "state:user" in r.getMessage()]
    assert len(warnings) == 1 and "docs/scopes.md" in warnings[0].getMessage()


def test_a_param_part_that_the_route_lacks_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    rules = {
        "POST /orders/{order_id}": {"idempotency": {"scope": ["param:id"]}},
        "POST /pay/{pay_id:int}": {"submit_token": {"scope": ["param:pay_id", "origin"]}},
    }
    with caplog.at_level("WARNING", logger="ymguard"):
        guard = Guard({"resources": rules})
        guard.chain("POST /orders/{order_id}")
        guard.chain("POST /pay/{pay_id:int}")
    messages = [r.getMessage() for r in caplog.records]
    assert any("'param:id'" in m and "order_id" in m for m in messages)
    assert not any("pay_id'" in m for m in messages)


# -- scopes: one caller never meets another caller's keys or tokens ---------------------


async def test_callers_with_other_credentials_never_share_an_idempotency_key(
    storage_uri: str, prefix: str
) -> None:
    app = create_app(storage_uri, prefix, origin=False)
    alice = {"Authorization": "Bearer alice-secret"}
    mallory = {"Authorization": "Bearer mallory"}
    k1, k2, k3, k4 = key(), key(), key(), key()

    async def pay(who: dict[str, str], k: str, amount: int) -> httpx.Response:
        return await c.post("/pay", json={"amount": amount}, headers={**who, "Idempotency-Key": k})

    async with client(app) as c:
        first = await pay(alice, k1, 1)
        same_key_same_body = await pay(mallory, k1, 1)
        await pay(alice, k2, 1)
        same_key_other_body = await pay(mallory, k2, 9)
        by_cookie_a = await pay({"Cookie": "sid=a"}, k3, 1)
        by_cookie_b = await pay({"Cookie": "sid=b"}, k3, 1)
        alice_again = await pay(alice, k1, 1)
        # In flight: alice's request holds k4; mallory's own k4 runs all the same.
        alice_slow = asyncio.ensure_future(
            c.post("/slow", headers={**alice, "Idempotency-Key": k4})
        )

        async def alice_runs() -> bool:
            return bool(app.state.runs["slow"] == 1)

        await wait_for(alice_runs, "alice's request runs")
        mallory_slow = asyncio.ensure_future(
            c.post("/slow", headers={**mallory, "Idempotency-Key": k4})
        )

        async def both_run() -> bool:
            return mallory_slow.done() or bool(app.state.runs["slow"] == 2)

        await wait_for(both_run, "mallory's request runs or is refused")
        app.state.release.set()
        slow = [await alice_slow, await mallory_slow]
        if storage_uri != "memory://":
            raw = app.state.guard.store.client
            keys = [k async for k in raw.scan_iter(match=f"{prefix}:*")]
    await app.state.guard.aclose()
    for response in (first, same_key_same_body, same_key_other_body, by_cookie_a, by_cookie_b):
        assert response.status_code == 201 and "idempotent-replayed" not in response.headers
    assert same_key_same_body.json()["pay_flow"] != first.json()["pay_flow"]
    assert by_cookie_b.json()["pay_flow"] != by_cookie_a.json()["pay_flow"]
    # The same caller's retry is still a replay.
    assert alice_again.headers["idempotent-replayed"] == "true"
    assert alice_again.content == first.content
    assert [r.status_code for r in slow] == [200, 200]
    assert app.state.runs["pay"] == 6 and app.state.runs["slow"] == 2
    if storage_uri != "memory://":
        # One record per caller and key; keys carry a digest, never the credentials.
        assert len([k for k in keys if b"idem" in k]) == 8
        assert not any(b"alice" in k or b"Bearer" in k or b"sid" in k for k in keys)


async def test_a_callers_submit_token_is_neither_replaced_nor_spent_by_another(
    storage_uri: str, prefix: str
) -> None:
    app = create_app(storage_uri, prefix, origin=False)
    alice = {"Cookie": "sid=alice"}
    bob = {"Authorization": "Bearer bob"}
    async with client(app) as c:
        alice_token = (await c.get("/checkout/confirm", headers=alice)).json()["token"]
        bob_token = (await c.get("/checkout/confirm", headers=bob)).json()["token"]
        bob_spends_alices = await c.post(
            "/checkout", headers={**bob, "X-Submit-Token": alice_token}
        )
        anonymous = await c.post("/checkout", headers={"X-Submit-Token": alice_token})
        alice_spends = await c.post("/checkout", headers={**alice, "X-Submit-Token": alice_token})
        bob_spends = await c.post("/checkout", headers={**bob, "X-Submit-Token": bob_token})
    await app.state.guard.aclose()
    assert bob_spends_alices.status_code == 409 and anonymous.status_code == 409
    assert problem(bob_spends_alices) == "duplicate-submission"
    assert [alice_spends.status_code, bob_spends.status_code] == [200, 200]
    assert app.state.runs["checkout"] == 2


# -- Idempotency-Key: behaviour --------------------------------------------------------


async def test_fifty_concurrent_requests_with_one_new_key_run_once(
    storage_uri: str, prefix: str
) -> None:
    app = create_app(storage_uri, prefix)
    headers = {"Idempotency-Key": key(), "X-User": "alice"}
    async with client(app) as c:
        responses = await asyncio.gather(
            *(c.post("/pay", json={"amount": 42}, headers=headers) for _ in range(50))
        )
        retry = await c.post("/pay", json={"amount": 42}, headers=headers)
    await app.state.guard.aclose()
    assert app.state.runs["pay"] == 1
    firsts = [
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    assert len(firsts) == 1
    for r in responses:
        if r.status_code == 409:
            assert problem(r) == "idempotency-key-in-flight"
        else:
            assert r.status_code == 201 and r.content == firsts[0].content
    assert retry.status_code == 201 and retry.content == firsts[0].content
    assert retry.headers["idempotent-replayed"] == "true"


async def test_a_replay_is_the_same_response_without_cookies(storage_uri: str, prefix: str) -> None:
    app = create_app(storage_uri, prefix)
    headers = {"Idempotency-Key": key(), "X-User": "alice"}
    async with client(app) as c:
        first = await c.post("/pay", json={"amount": 1}, headers=headers)
        replay = await c.post("/pay", json={"amount": 1}, headers=headers)
        other_user = await c.post("/pay", json={"amount": 1}, headers={**headers, "X-User": "b"})
    await app.state.guard.aclose()
    assert (replay.status_code, replay.content) == (first.status_code, first.content)
    assert json.loads(replay.content) == {"pay_flow": 1, "amount": 1}
    assert replay.headers["location"] == first.headers["location"] == "/pay/1"
    assert replay.headers["x-run"] == "1"
    assert replay.headers["content-type"] == first.headers["content-type"]
    assert "set-cookie" in first.headers and "set-cookie" not in replay.headers
    assert "idempotent-replayed" not in first.headers
    # Keys are per caller: another user's same key is a request of its own.
    assert other_user.status_code == 201 and other_user.json()["pay_flow"] == 2


async def test_same_key_with_another_body_is_422(storage_uri: str, prefix: str) -> None:
    app = create_app(storage_uri, prefix)
    headers = {"Idempotency-Key": key()}
    async with client(app) as c:
        await c.post("/pay", json={"amount": 1}, headers=headers)
        other = await c.post("/pay", json={"amount": 2}, headers=headers)
    await app.state.guard.aclose()
    assert other.status_code == 422 and problem(other) == "idempotency-key-mismatch"
    assert app.state.runs["pay"] == 1


async def test_missing_malformed_or_overlong_key_is_400(storage_uri: str, prefix: str) -> None:
    app = create_app(storage_uri, prefix)
    async with client(app) as c:
        missing = await c.post("/pay", json={"amount": 1})
        junk = await c.post("/pay", json={"amount": 1}, headers={"Idempotency-Key": '"a'})
        long = await c.post("/pay", json={"amount": 1}, headers={"Idempotency-Key": "k" * 300})
        bare = await c.post("/pay", json={"amount": 1}, headers={"Idempotency-Key": "8e03-ab"})
    await app.state.guard.aclose()
    for response in (missing, junk, long):
        assert response.status_code == 400 and problem(response) == "idempotency-key-missing"
    assert bare.status_code == 201 and app.state.runs["pay"] == 1


async def test_a_request_that_outlives_its_lease_keeps_its_key(
    storage_uri: str, prefix: str
) -> None:
    # Two "processes" on one store: A's request runs for many leases (it is renewed);
    # B's retries get 409 all along, then the response A stores once it finishes.
    store = store_from_uri(storage_uri, key_prefix=prefix)
    app_a = create_app(store, prefix, lease_seconds=1)
    app_b = create_app(store, prefix, lease_seconds=1)
    app_b.state.release.set()  # were B to run the request, it would not hang
    headers = {"Idempotency-Key": key()}
    async with client(app_a) as a, client(app_b) as b:
        first = asyncio.ensure_future(a.post("/slow", headers=headers))

        async def a_runs() -> bool:
            return bool(app_a.state.runs["slow"] == 1)

        await wait_for(a_runs, "A runs")
        retries = []
        for _ in range(3):  # three leases, each renewed every third of a second
            await asyncio.sleep(1)
            retries.append(await b.post("/slow", headers=headers))
        app_a.state.release.set()
        done = await first
        replay = await b.post("/slow", headers=headers)
    await store.aclose()
    for retry in retries:
        assert retry.status_code == 409 and problem(retry) == "idempotency-key-in-flight"
    assert app_a.state.runs["slow"] == 1 and app_b.state.runs["slow"] == 0
    assert done.status_code == 200 and replay.content == done.content
    assert replay.headers["idempotent-replayed"] == "true"


async def test_a_server_error_frees_the_key_for_a_retry(storage_uri: str, prefix: str) -> None:
    app = create_app(storage_uri, prefix)
    headers = {"Idempotency-Key": key()}
    async with client(app) as c:
        failed = await c.post("/fail", headers=headers)
        retried = await c.post("/fail", headers=headers)
        replay = await c.post("/fail", headers=headers)
    await app.state.guard.aclose()
    assert failed.status_code == 500 and retried.status_code == 200
    assert replay.content == retried.content and replay.headers["idempotent-replayed"] == "true"
    assert app.state.runs["fail"] == 2


async def test_a_large_response_is_sent_but_not_kept(storage_uri: str, prefix: str) -> None:
    app = create_app(storage_uri, prefix)
    headers = {"Idempotency-Key": key()}
    async with client(app) as c:
        first = await c.post("/big", headers=headers)
        retry = await c.post("/big", headers=headers)
    await app.state.guard.aclose()
    assert first.status_code == 200 and len(first.content) == 5000
    assert retry.status_code == 409 and problem(retry) == "idempotency-response-not-kept"
    assert app.state.runs["big"] == 1


async def test_a_streamed_response_is_kept_whole(storage_uri: str, prefix: str) -> None:
    app = create_app(storage_uri, prefix)
    headers = {"Idempotency-Key": key()}
    async with client(app) as c:
        first = await c.post("/stream", headers=headers)
        replay = await c.post("/stream", headers=headers)
    await app.state.guard.aclose()
    assert first.content == b"chunk-0;chunk-1;chunk-2;chunk-3;chunk-4;"
    assert replay.content == first.content and replay.headers["idempotent-replayed"] == "true"
    assert app.state.runs["stream"] == 1


async def test_only_the_configured_methods_are_guarded(storage_uri: str, prefix: str) -> None:
    app = create_app(storage_uri, prefix)
    headers = {"Idempotency-Key": key()}
    async with client(app) as c:
        statuses = [(await c.put("/pay", headers=headers)).status_code for _ in range(2)]
        no_key = await c.put("/pay")
    await app.state.guard.aclose()
    assert statuses == [200, 200] and no_key.status_code == 200
    assert app.state.runs["put"] == 3


async def test_an_over_limit_body_is_413(storage_uri: str, prefix: str) -> None:
    guard = Guard(
        {"key_prefix": prefix, "resources": {"POST /pay": {"idempotency": {"max_body_bytes": 10}}}},
        storage=storage_uri,
    )
    from fastapi import FastAPI

    from ymguard import GuardMiddleware

    app = FastAPI()

    @app.post("/pay")
    async def pay() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(GuardMiddleware, guard=guard)
    async with client(app) as c:
        big = await c.post("/pay", content=b"x" * 11, headers={"Idempotency-Key": key()})
        small = await c.post("/pay", content=b"x" * 10, headers={"Idempotency-Key": key()})
    await guard.aclose()
    assert big.status_code == 413 and problem(big) == "idempotency-body-too-large"
    assert small.status_code == 200


async def test_a_replay_passes_the_earlier_checks(storage_uri: str, prefix: str) -> None:
    app = create_app(storage_uri, prefix)
    headers = {"Idempotency-Key": key()}
    async with client(app) as c:
        for _ in range(3):
            await c.post("/pay", json={"amount": 5}, headers=headers)
    guard: Guard = app.state.guard
    await guard.aclose()
    counts = guard.stats("POST /pay").counts()
    assert counts.passed == 3 and counts.blocked == 0


async def test_a_remote_request_keeps_its_key_past_the_lease_until_its_process_is_killed(
    redis_url: str, prefix: str
) -> None:
    lease = 1.5
    env = {"YMGUARD_STORAGE": redis_url, "ANTIRESUBMIT_PREFIX": prefix, "ANTIRESUBMIT_LEASE": "1.5"}
    server = Uvicorn("tests.apps.antiresubmit_app:app_from_env", env=env, factory=True).start()
    app = create_app(redis_url, prefix, lease_seconds=lease)
    app.state.release.set()  # were this process to run the request, it would not hang
    headers = {"Idempotency-Key": key()}
    try:
        async with httpx.AsyncClient(base_url=server.url) as remote, client(app) as local:
            hung = asyncio.ensure_future(remote.post("/slow", headers=headers, timeout=30))

            async def remote_runs() -> bool:
                return bool((await remote.get("/runs")).json().get("slow") == 1)

            await wait_for(remote_runs, "the remote process runs the request")
            in_flight = [await local.post("/slow", headers=headers)]
            for _ in range(3):  # three leases, renewed by the remote process
                await asyncio.sleep(lease)
                in_flight.append(await local.post("/slow", headers=headers))
            server.kill()
            with pytest.raises(httpx.TransportError):
                await hung

            async def retried() -> bool:
                return (await local.post("/slow", headers=headers)).status_code == 200

            await wait_for(retried, "the dead process's lease expires")
    finally:
        server.stop()
        await app.state.guard.aclose()
    assert [r.status_code for r in in_flight] == [409] * 4
    assert app.state.runs["slow"] == 1


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # local: tokens work in process (a token from before the outage is refused); a
        # key this process does not hold cannot be proven free (another may hold it): 503
        ("local", {"pay": [503, 503], "runs": 0, "old_token": 409, "new_token": 200}),
        # open: no token check while the store is down, and a key this process does not
        # hold passes unguarded (the one policy that can run a key twice)
        ("open", {"pay": [201, 201], "runs": 2, "old_token": 200, "new_token": 200}),
        # closed: refuse what cannot be checked
        ("closed", {"pay": [503, 503], "runs": 0, "old_token": 503, "new_token": None}),
    ],
)
async def test_a_storage_outage_follows_on_storage_error(
    private_redis: RedisServer, prefix: str, policy: str, expected: dict[str, Any]
) -> None:
    app = create_app(private_redis.url, prefix, on_storage_error=policy)
    alice = {"X-User": "alice"}
    headers = {**alice, "Idempotency-Key": key()}
    async with client(app) as c:
        old = (await c.get("/orders/confirm?course_ids=1", headers=alice)).json()["token"]
        private_redis.stop()
        pay = [await c.post("/pay", json={"amount": 1}, headers=headers) for _ in range(2)]
        spend_old = await c.post("/orders?course_ids=1", headers={**alice, "X-Submit-Token": old})
        new_token = None
        if policy != "closed":  # closed: issuing raises StorageUnavailable to the app
            new = (await c.get("/orders/confirm?course_ids=1", headers=alice)).json()["token"]
            submit = {**alice, "X-Submit-Token": new}
            new_token = (await c.post("/orders?course_ids=1", headers=submit)).status_code
    await app.state.guard.aclose()
    assert [r.status_code for r in pay] == expected["pay"]
    assert app.state.runs["pay"] == expected["runs"]
    if policy != "open":
        assert problem(pay[0]) == "storage-unavailable" and pay[0].headers["retry-after"]
    else:
        assert "idempotent-replayed" not in pay[1].headers
    assert spend_old.status_code == expected["old_token"]
    assert new_token == expected["new_token"]


def patient(server: RedisServer) -> str:
    """The server's URL with 2 s timeouts: on a loaded machine a slow answer must not look
    like the outage a test is about to cause."""
    return server.url + "?socket_timeout=2&socket_connect_timeout=2"


async def stored_in(url: str, prefix: str, count: int) -> bool:
    """Whether ``count`` idempotency records under ``prefix`` hold a stored response."""
    raw = redis.asyncio.Redis.from_url(url)
    try:
        keys = [k async for k in raw.scan_iter(match=f"{prefix}:*")]
        statuses = [await raw.hget(k, "status") for k in keys if b"idem" in k]
        return len([s for s in statuses if s is not None]) == count
    finally:
        await raw.aclose()


@pytest.mark.parametrize("outage", ["hang", "restart"])
@pytest.mark.parametrize("policy", ["closed", "open", "local"])
async def test_a_response_finished_while_redis_is_out_is_stored_once_it_answers(
    private_redis: RedisServer, prefix: str, policy: str, outage: str
) -> None:
    # The endpoint finishes while Redis hangs (SIGSTOP) or is restarted empty: its
    # response is answered from this process meanwhile, and written to Redis once it
    # answers, so another process replays it too. One run per key, whatever the policy.
    app = create_app(patient(private_redis), prefix, on_storage_error=policy)
    slow = {"Idempotency-Key": key(), "X-User": "alice"}
    fresh = {"Idempotency-Key": key(), "X-User": "alice"}
    async with client(app) as c:
        first = asyncio.ensure_future(c.post("/slow", headers=slow))

        async def runs() -> bool:
            return bool(app.state.runs["slow"] == 1)

        await wait_for(runs, "the request runs")
        private_redis.pause() if outage == "hang" else private_redis.stop()
        app.state.release.set()
        done = await first
        during = await c.post("/slow", headers=slow)
        # A key first seen during the outage: refused (local, closed), unguarded (open).
        new = [await c.post("/pay", json={"amount": 3}, headers=fresh) for _ in range(2)]
        private_redis.resume() if outage == "hang" else private_redis.start()
        if outage == "restart":
            # A restart lost the lease, so another process may take the key until the
            # write lands (docs/scopes.md); a hang kept it, and the next part shows that.
            await wait_for(
                lambda: stored_in(patient(private_redis), prefix, 1),
                "the responses are written to the restarted Redis",
            )
        other = create_app(patient(private_redis), prefix, on_storage_error=policy)
        other.state.release.set()  # were it to run the request, it would not hang
        async with client(other) as o:

            async def replayed(path: str, headers: dict[str, str]) -> httpx.Response | None:
                body = {"amount": 3} if path == "/pay" else None
                response = await o.post(path, json=body, headers=headers)
                return response if "idempotent-replayed" in response.headers else None

            async def slow_stored() -> bool:
                return await replayed("/slow", slow) is not None

            await wait_for(slow_stored, "another process replays the response")
            after = await c.post("/slow", headers=slow)
        await other.state.guard.aclose()
    await app.state.guard.aclose()
    assert done.status_code == 200
    for replay in (during, after):
        assert replay.status_code == 200 and replay.content == done.content
        assert replay.headers["idempotent-replayed"] == "true"
    assert app.state.runs["slow"] == 1 and other.state.runs["slow"] == 0
    if policy != "open":
        assert [r.status_code for r in new] == [503, 503] and app.state.runs["pay"] == 0
    else:
        assert [r.status_code for r in new] == [201, 201] and app.state.runs["pay"] == 2


@pytest.mark.parametrize("policy", ["closed", "open", "local"])
async def test_what_an_outage_keeps_in_process_is_bounded(
    private_redis: RedisServer, prefix: str, policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only keys this process held before the outage are kept in process, and the bodies
    # that wait for Redis are bounded in bytes: past the bound a body waits as its status
    # (a retry gets 409 "not kept", never a second run).
    monkeypatch.setattr(idempotency, "MAX_WAITING_BYTES", 15)
    app = create_app(patient(private_redis), prefix, on_storage_error=policy)
    keys = [{"Idempotency-Key": key()} for _ in range(2)]
    async with client(app) as c:
        first = [asyncio.ensure_future(c.post("/slow", headers=h)) for h in keys]

        async def both_run() -> bool:
            return bool(app.state.runs["slow"] == 2)

        await wait_for(both_run, "both requests run")
        private_redis.stop()
        app.state.release.set()
        done = [await f for f in first]
        again = [await c.post("/slow", headers=h) for h in keys]
    await app.state.guard.aclose()
    assert [r.status_code for r in done] == [200, 200]
    assert app.state.runs["slow"] == 2
    # One body ({"slow":N}, 10 bytes) fits the 15 bytes; the other waits as its status.
    replayed = [r for r in again if r.status_code == 200]
    assert len(replayed) == 1 and replayed[0].headers["idempotent-replayed"] == "true"
    assert replayed[0].content in {d.content for d in done}
    not_kept = [r for r in again if r.status_code == 409]
    assert len(not_kept) == 1 and problem(not_kept[0]) == "idempotency-response-not-kept"


@pytest.mark.parametrize("case", ["held_before", "first_seen_during"])
@pytest.mark.parametrize("policy", ["local", "closed"])
async def test_an_outage_never_runs_a_key_twice_across_processes(
    private_redis: RedisServer, prefix: str, policy: str, case: str
) -> None:
    # Two processes (two guards) on one Redis, which hangs (SIGSTOP). A key this process
    # does not hold cannot be proven free while Redis hangs: refused (503, retryable),
    # never run. A begin that got no answer may still run when Redis resumes: its lease
    # is aborted, so a retry afterwards runs (once), not 409 for lease_seconds.
    one = create_app(patient(private_redis), prefix, on_storage_error=policy)
    two = create_app(patient(private_redis), prefix, on_storage_error=policy)
    two.state.release.set()  # were it to run the request, it would not hang
    headers = {"Idempotency-Key": key(), "X-User": "alice"}
    async with client(one) as c1, client(two) as c2:
        for c in (c1, c2):  # connect both, load the scripts
            await c.post("/pay", json={"amount": 0}, headers={"Idempotency-Key": key()})
        first = None
        during: list[httpx.Response] = []
        if case == "held_before":
            first = asyncio.ensure_future(c1.post("/slow", headers=headers))

            async def runs() -> bool:
                return bool(one.state.runs["slow"] == 1)

            await wait_for(runs, "the request runs")
            private_redis.pause()
        else:
            private_redis.pause()
            one.state.release.set()
            during.append(await c1.post("/slow", headers=headers))
        during += [await c2.post("/slow", headers=headers) for _ in range(2)]
        if first is not None:
            one.state.release.set()
            during.append(await first)
        during.append(await c1.post("/slow", headers=headers))
        private_redis.resume()

        async def answered() -> bool:
            # A store in its fail-fast second after the outage still answers 503: ask again.
            responses = [await c.post("/slow", headers=headers) for c in (c2, c1)]
            return all(r.status_code == 200 for r in responses)

        await wait_for(answered, "both processes answer the key after the outage", tries=100)
        after = [await c1.post("/slow", headers=headers), await c2.post("/slow", headers=headers)]
    await one.state.guard.aclose()
    await two.state.guard.aclose()
    assert one.state.runs["slow"] + two.state.runs["slow"] == 1
    refused = [r for r in during if r.status_code == 503]
    assert refused and all(problem(r) == "storage-unavailable" for r in refused)
    assert all(r.headers["retry-after"] for r in refused)
    assert all(r.status_code in {200, 409, 503} for r in during)
    assert [r.status_code for r in after] == [200, 200]
    assert after[0].content == after[1].content
    assert all(r.headers["idempotent-replayed"] == "true" for r in after)


@pytest.mark.parametrize("policy", ["local", "open", "closed"])
async def test_a_reload_during_an_outage_still_answers_the_keys_held_here(
    private_redis: RedisServer, prefix: str, policy: str
) -> None:
    # What the process keeps for an idempotent resource while Redis is down (the keys it
    # held, the responses waiting for Redis) belongs to the store, not to the check: the
    # check a reload makes replays the key instead of refusing or running it again.
    app = create_app(patient(private_redis), prefix, on_storage_error=policy)
    headers = {"Idempotency-Key": key(), "X-User": "alice"}
    async with client(app) as c:
        first = asyncio.ensure_future(c.post("/slow", headers=headers))

        async def runs() -> bool:
            return bool(app.state.runs["slow"] == 1)

        await wait_for(runs, "the request runs")
        private_redis.stop()
        app.state.release.set()
        done = await first
        app.state.guard.reload(app.state.guard.rules)
        again = await c.post("/slow", headers=headers)
    await app.state.guard.aclose()
    assert done.status_code == 200 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true" and again.content == done.content
    assert app.state.runs["slow"] == 1


# -- the memory store: bounded against client input ------------------------------------


async def test_memory_idempotency_keys_are_bounded_in_number(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A unique key per request must not grow the process without bound: past the cap
    # new keys are refused (503, Retry-After), known keys are still replayed, and no
    # finished record is dropped (that would let its retry run again).
    monkeypatch.setattr(responses, "MAX_LOCAL_RECORDS", 5)
    app = create_app("memory://", prefix)
    keys = [{"Idempotency-Key": key()} for _ in range(6)]
    async with client(app) as c:
        first = [await c.post("/pay", json={"amount": 1}, headers=h) for h in keys]
        again = await c.post("/pay", json={"amount": 1}, headers=keys[0])
    guard: Guard = app.state.guard
    store = guard.store
    await guard.aclose()
    assert [r.status_code for r in first] == [201] * 5 + [503]
    assert problem(first[5]) == "storage-unavailable" and first[5].headers["retry-after"]
    assert again.headers["idempotent-replayed"] == "true" and again.content == first[0].content
    assert app.state.runs["pay"] == 5
    tables = [v for v in store.data.values() if isinstance(v, responses.Records)]
    assert [len(t) for t in tables] == [5]


async def test_memory_idempotency_kept_bytes_are_bounded(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # {"pay_flow":1,"amount":1} is 25 bytes: the first response fills the bound, so the
    # next new key is refused until it expires; the first is still replayed.
    monkeypatch.setattr(responses, "MAX_KEPT_BYTES", 25)
    app = create_app("memory://", prefix)
    keys = [{"Idempotency-Key": key()} for _ in range(2)]
    async with client(app) as c:
        first = [await c.post("/pay", json={"amount": 1}, headers=h) for h in keys]
        again = await c.post("/pay", json={"amount": 1}, headers=keys[0])
    await app.state.guard.aclose()
    assert len(first[0].content) == 25
    assert [r.status_code for r in first] == [201, 503]
    assert again.headers["idempotent-replayed"] == "true" and again.content == first[0].content
    assert app.state.runs["pay"] == 1


async def test_a_response_over_the_memory_byte_bound_is_kept_as_its_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two requests in flight at once may both finish past the bound: the second keeps
    # its status only, so its retry is refused (409), never run again.
    monkeypatch.setattr(responses, "MAX_KEPT_BYTES", 10)
    backend = store_from_uri("memory://").responses("POST /x")
    body = responses.KeptResponse(200, [], b"0123456789")
    assert (await backend.begin("a", "fp", "l1", 60)).state == "new"
    assert (await backend.begin("b", "fp", "l2", 60)).state == "new"
    assert await backend.complete("a", "l1", "fp", body, 60)
    assert await backend.complete("b", "l2", "fp", body, 60)
    a, b = await backend.begin("a", "fp", "l3", 60), await backend.begin("b", "fp", "l4", 60)
    assert a.response is not None and a.response.kept and a.response.body == body.body
    assert b.response is not None and not b.response.kept and b.response.status == 200


async def test_expired_memory_records_are_dropped_a_batch_per_write() -> None:
    # Expired records go from the head of an expiry-ordered table, a bounded batch per
    # new key: 1,000 expired records are gone after 16 new keys (64 each), without any
    # write scanning the live ones.
    backend = store_from_uri("memory://").responses("POST /x")
    response = responses.KeptResponse(200, [], b"ok")
    for i in range(1000):
        assert (await backend.begin(f"old{i}", "fp", "l", 60)).state == "new"
        assert await backend.complete(f"old{i}", "l", "fp", response, 0.01)
    await asyncio.sleep(0.05)  # past their ttl (no timing is asserted)
    for i in range(16):
        assert (await backend.begin(f"new{i}", "fp", "l", 60)).state == "new"
    assert len(backend) == 16


async def test_memory_submit_tokens_are_bounded_the_oldest_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One token per unique cookie must not grow the process without bound: past the cap
    # the oldest token is dropped (spending it is then a duplicate submission: safe).
    monkeypatch.setattr(token_tables, "MAX_TOKENS", 100)
    store = store_from_uri("memory://")
    tokens = SubmitTokens(storage=store, ttl_seconds=60)
    issued = [await tokens.issue(f"cookie-{i}") for i in range(150)]
    assert sum(len(v) for v in store.data.values()) == 100  # type: ignore[attr-defined]
    assert await tokens.consume("cookie-0", issued[0]) is False
    assert await tokens.consume("cookie-149", issued[149]) is True
