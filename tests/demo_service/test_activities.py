"""Courses and activities: create, publish (warm-up, once), and the public listing.

On SQLite and PostgreSQL (``database_url``), on the shared Redis under prefixes of its own.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx

from demo_service.seckill import course_keys
from tests.demo_service.conftest import Shop
from ymguard.errors import PROBLEM_BASE


def code(response: httpx.Response) -> str:
    """The problem code of an error response."""
    return str(response.json()["type"]).removeprefix(PROBLEM_BASE)


async def test_publish_warms_redis_and_the_listing_shows_stock_left(shop: Shop) -> None:
    activity = await shop.activity(kill_count=7, kill_limit=2, publish=False)
    kc = activity["courses"][0]["kill_course_id"]
    keys = course_keys(shop.settings.redis_prefix, kc)
    assert await shop.redis.exists(keys["stock"]) == 0
    assert (await shop.client.get("/activities")).json()["activities"] == []

    published = await shop.client.post(
        f"/admin/activities/{activity['activity_id']}/publish", headers=await shop.admin()
    )

    assert published.status_code == 200
    assert await shop.redis.get(keys["stock"]) == b"7"
    meta = await shop.redis.hgetall(keys["meta"])
    assert meta[b"limit"] == b"2"
    start = datetime.fromisoformat(activity["start_time"])
    assert int(meta[b"start_ms"]) == int(start.timestamp() * 1000)
    listing = (await shop.client.get("/activities")).json()
    server_time = datetime.fromisoformat(listing["server_time"])
    assert server_time.tzinfo is not None
    assert abs(server_time - datetime.now(UTC)) < timedelta(minutes=5)
    (listed,) = listing["activities"]
    assert listed["activity_id"] == activity["activity_id"]
    assert listed["status"] == "ongoing"
    assert listed["courses"] == [
        {
            "kill_course_id": kc,
            "course_id": activity["courses"][0]["course_id"],
            "name": "Python",
            "kill_price": "9.90",
            "kill_count": 7,
            "kill_limit": 2,
            "stock_left": 7,
        }
    ]


async def test_publishing_twice_is_409_and_concurrent_publishes_succeed_once(shop: Shop) -> None:
    activity = await shop.activity(publish=False)
    url = f"/admin/activities/{activity['activity_id']}/publish"
    admin = await shop.admin()

    answers = await asyncio.gather(*(shop.client.post(url, headers=admin) for _ in range(8)))
    again = await shop.client.post(url, headers=admin)

    assert sorted(r.status_code for r in answers) == [200] + [409] * 7
    assert (again.status_code, code(again)) == (409, "already-published")
    kc = activity["courses"][0]["kill_course_id"]
    assert await shop.redis.get(course_keys(shop.settings.redis_prefix, kc)["stock"]) == b"10"


async def test_activity_times_keep_their_instant_and_are_answered_in_utc(shop: Shop) -> None:
    course_id = await shop.course()
    response = await shop.client.post(
        "/admin/activities",
        json={
            "name": "Beijing time",
            "start_time": "2030-01-01T08:00:00+08:00",
            "end_time": "2030-01-01T09:00:00+08:00",
            "courses": [{"course_id": course_id, "kill_price": "1", "kill_count": 1}],
        },
        headers=await shop.admin(),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["start_time"] == "2030-01-01T00:00:00+00:00"
    assert body["courses"][0]["kill_limit"] == 1  # the default
    await shop.client.post(
        f"/admin/activities/{body['activity_id']}/publish", headers=await shop.admin()
    )
    listed = (await shop.client.get(f"/activities/{body['activity_id']}")).json()
    assert listed["status"] == "not_started"
    assert listed["start_time"] == "2030-01-01T00:00:00+00:00"
    assert listed["courses"][0]["kill_price"] == "1.00"


async def test_invalid_activities_are_refused(shop: Shop) -> None:
    course_id = await shop.course()
    admin = await shop.admin()
    now = datetime.now(UTC)

    def body(**changes: object) -> dict[str, object]:
        return {
            "name": "x",
            "start_time": now.isoformat(),
            "end_time": (now + timedelta(hours=1)).isoformat(),
            "courses": [{"course_id": course_id, "kill_price": "1.00", "kill_count": 5}],
        } | changes

    backwards = await shop.client.post(
        "/admin/activities",
        json=body(end_time=(now - timedelta(hours=1)).isoformat()),
        headers=admin,
    )
    unknown = await shop.client.post(
        "/admin/activities",
        json=body(courses=[{"course_id": 99999, "kill_price": "1.00", "kill_count": 5}]),
        headers=admin,
    )
    no_stock = await shop.client.post(
        "/admin/activities",
        json=body(courses=[{"course_id": course_id, "kill_price": "1.00", "kill_count": 0}]),
        headers=admin,
    )
    fractional = await shop.client.post(
        "/admin/courses", json={"name": "x", "price": "1.001"}, headers=admin
    )

    assert backwards.status_code == 422
    assert (unknown.status_code, code(unknown)) == (404, "not-found")
    assert no_stock.status_code == 422
    assert fractional.status_code == 422


async def test_unpublished_and_unknown_activities_are_not_found(shop: Shop) -> None:
    activity = await shop.activity(publish=False)
    hidden = await shop.client.get(f"/activities/{activity['activity_id']}")
    unknown = await shop.client.get("/activities/424242")
    publish_unknown = await shop.client.post(
        "/admin/activities/424242/publish", headers=await shop.admin()
    )
    assert (hidden.status_code, code(hidden)) == (404, "not-found")
    assert (unknown.status_code, code(unknown)) == (404, "not-found")
    assert (publish_unknown.status_code, code(publish_unknown)) == (404, "not-found")
