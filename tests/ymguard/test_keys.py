"""Store keys: injective, one hash tag per rule, bounded whatever a client sends."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import redis.asyncio as aioredis

from ymguard import Blocked, Context, FlowRule, Guard, RulesError, parse_rules
from ymguard._model import rule_ids
from ymguard.storage import MemoryStore, Store, encode_key_part, store_from_uri
from ymguard.storage.base import MAX_KEY_PART

# -- Redis Cluster's slot function (CRC16/XMODEM of the hash tag, mod 16384) -------------


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def keyslot(key: str) -> int:
    """What ``CLUSTER KEYSLOT`` answers (the spec's algorithm, hash tags included)."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16(raw) % 16384


def test_the_slot_helper_agrees_with_redis_cluster() -> None:
    # Vectors from the Redis Cluster specification and CLUSTER KEYSLOT.
    assert crc16(b"123456789") == 0x31C3
    assert keyslot("somekey") == 11058
    assert keyslot("foo{hash_tag}") == 2515 == keyslot("bar{hash_tag}")
    assert keyslot("foo{}{bar}") == crc16(b"foo{}{bar}") % 16384


# -- the layout -----------------------------------------------------------------------

NASTY = [
    "GET /items/{id}",
    "GET /items/(id)",
    "GET /items/%7Bid%7D",
    "victim)",
    "victim}",
    "victim{",
    "}{",
    "a:b",
    "%",
    "%25",
    "caf\u00e9",
    "caf%C3%A9",
    "\x00\n",
    "x" * 500,
    "x" * 500 + "y",
    "x" * 64 + "%~" + "0" * 32,
    "",
]


def test_different_parts_never_share_a_key() -> None:
    store = MemoryStore(key_prefix="p")
    keys = {
        (kind, name, suffix): store.key(kind, name, suffix)
        for kind in ("flow", "fl:ow", "fl")
        for name, suffix in itertools.product(NASTY, ["", "holders", *NASTY[:6]])
    }
    assert len(set(keys.values())) == len(keys)


def test_every_key_has_exactly_one_hash_tag_and_stays_short() -> None:
    store = MemoryStore(key_prefix="p")
    for name, suffix in itertools.product(NASTY, NASTY):
        key = store.key("sem", name, suffix)
        assert key.count("{") == 1 and key.count("}") == 1, key
        assert key.isascii() and key.isprintable(), key
        assert len(key) <= len("p:{sem:}:") + 2 * MAX_KEY_PART


def test_route_braces_are_escaped_readably() -> None:
    assert encode_key_part("GET /items/{id}") == "GET /items/%7Bid%7D"
    assert encode_key_part("plain-name #0") == "plain-name #0"


@pytest.mark.parametrize("name", NASTY)
def test_all_keys_of_one_rule_hash_to_one_cluster_slot(name: str) -> None:
    store = MemoryStore(key_prefix="ymguard")
    suffixes = ["", "holders", "permits", "line", "places", "wake", "events", *NASTY]
    assert len({keyslot(store.key("sem", name, s)) for s in suffixes}) == 1


@pytest.mark.parametrize("prefix", ["a{b}", "{", "}", "x{}"])
def test_a_key_prefix_with_braces_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="braces"):
        store_from_uri("memory://", key_prefix=prefix)
    with pytest.raises(RulesError) as info:
        parse_rules({"key_prefix": prefix})
    assert str(info.value).startswith("<rules>:1: key_prefix: must not contain braces")


# -- state is not shared on either store ----------------------------------------------


async def attempt(guard: Guard, resource: str, origin: str = "") -> Any:
    """Enter the chain and stay in (a held call); the tokens, or None if blocked."""
    chain = guard.chain(resource)
    try:
        return await chain.enter(Context(resource, origin))
    except Blocked:
        return None


@pytest.mark.parametrize(
    "rule",
    [{"flow": [{"qps": 1}]}, {"flow": [{"concurrency": 1}]}, {"semaphore": {"permits": 1}}],
    ids=["qps", "concurrency", "semaphore"],
)
async def test_routes_differing_only_in_braces_do_not_share_state(
    store: Store, rule: dict[str, Any]
) -> None:
    a, b = "GET /items/{id}", "GET /items/(id)"
    guard = Guard({"resources": {a: rule, b: rule}}, storage=store)
    assert await attempt(guard, a) is not None
    assert await attempt(guard, a) is None  # the limit is 1
    assert await attempt(guard, b) is not None  # another route, its own count


@pytest.mark.parametrize("grade", ["qps", "concurrency"])
async def test_origins_differing_only_in_a_brace_do_not_share_a_count(
    store: Store, grade: str
) -> None:
    guard = Guard(
        {"resources": {"GET /c": {"flow": [{grade: 1, "origin": "other"}]}}}, storage=store
    )
    assert await attempt(guard, "GET /c", "victim}") is not None
    assert await attempt(guard, "GET /c", "victim}") is None
    assert await attempt(guard, "GET /c", "victim)") is not None
    assert await attempt(guard, "GET /c", "victim{") is not None


async def test_redis_keys_of_a_route_carry_one_tag_and_one_slot_per_rule(
    redis_url: str, prefix: str
) -> None:
    resource = "POST /items/{id}"
    guard = Guard(
        {
            "key_prefix": prefix,
            "resources": {
                resource: {
                    "flow": [{"qps": 5}, {"concurrency": 5, "origin": "other"}],
                    "semaphore": {"permits": 3},
                }
            },
        },
        storage=redis_url,
    )
    client = aioredis.Redis.from_url(redis_url)
    window = f":{{flow:{resource.replace('{', '%7B').replace('}', '%7D')}#"
    for _ in range(5):  # the window's key lives 1.1 s: a loaded machine may scan too late
        for origin in ("a}", "a)", "{b"):
            assert await attempt(guard, resource, origin) is not None
        keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}:*")]
        if any(window in key for key in keys):
            break
    await guard.aclose()
    if keys:
        await client.delete(*keys)
    await client.aclose()
    assert keys
    by_tag: dict[str, set[int]] = {}
    for key in keys:
        assert key.count("{") == 1 and key.count("}") == 1, key
        tag = key[key.index("{") : key.index("}") + 1]
        by_tag.setdefault(tag, set()).add(keyslot(key))
    assert all(len(slots) == 1 for slots in by_tag.values())
    (rule_id, _) = rule_ids([FlowRule(qps=5), FlowRule(concurrency=5, origin="other")])
    assert f"{{flow:{resource.replace('{', '%7B').replace('}', '%7D')}#{rule_id}}}" in by_tag
