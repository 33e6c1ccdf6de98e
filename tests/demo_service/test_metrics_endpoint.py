"""``GET /metrics`` of the demo: ymguard's metrics in the Prometheus text format.

The shop runs in-process on the shared Redis with the demo's rules file, changed in one
place: ``GET /activities`` admits nothing (``qps: 0``), so every call to it is blocked by
a flow rule, whatever the machine's speed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from demo_service.settings import PACKAGED_RULES, Settings
from tests.demo_service.conftest import Shop


@pytest.fixture
async def database_url(tmp_path: Path) -> AsyncIterator[str]:
    """SQLite only: what is measured here does not depend on the database."""
    yield f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}"


@pytest.fixture
def shop_settings(shop_settings: Settings, tmp_path: Path) -> Settings:
    rules = yaml.safe_load(PACKAGED_RULES.read_text())
    rules["resources"]["GET /activities"] = {"flow": [{"qps": 0, "name": "activities"}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return replace(shop_settings, rules_path=path)


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples called ``name`` by their labels (an empty label is no label)."""
    out: dict[frozenset[tuple[str, str]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = frozenset((k, v) for k, v in sample.labels.items() if v != "")
                out[key] = sample.value
    return out


def labels(**items: Any) -> frozenset[tuple[str, str]]:
    return frozenset((k, str(v)) for k, v in items.items())


async def test_metrics_expose_requests_by_resource_result_and_kind(shop: Shop) -> None:
    for _ in range(3):
        assert (await shop.client.get("/health")).status_code == 200
    for _ in range(4):
        assert (await shop.client.get("/activities")).status_code == 429

    response = await shop.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    text = response.text
    requests = samples(text, "ymguard_requests_total")
    blocked = labels(
        ymguard_resource="GET /activities",
        ymguard_result="blocked",
        ymguard_rule_kind="flow",
        error_type="flow-limited",
    )
    assert requests[blocked] == 4
    assert requests[labels(ymguard_resource="GET /health", ymguard_result="passed")] == 3
    # Durations in seconds, with the contract's buckets; nothing left in flight.
    buckets = samples(text, "ymguard_request_duration_seconds_bucket")
    bounds = {dict(k)["le"] for k in buckets if dict(k)["ymguard_resource"] == "GET /health"}
    assert {"0.005", "0.25", "10.0", "+Inf"} <= bounds
    active = samples(text, "ymguard_active_requests")
    assert active[labels(ymguard_resource="GET /health")] == 0
    # The seckill's semaphore, read from Redis for this scrape: all 200 permits free.
    permits = samples(text, "ymguard_semaphore_permits")
    state = labels(ymguard_semaphore="killSem", ymguard_semaphore_state="available")
    assert permits[state] == 200
    # No per-user label anywhere: every label is a resource, a result, a kind, a code...
    names = {name for key in requests for name, _ in key}
    assert names <= {"ymguard_resource", "ymguard_result", "ymguard_rule_kind", "error_type"}

    # A second scrape counts the first one (GET /metrics is a resource like any other).
    again = samples((await shop.client.get("/metrics")).text, "ymguard_requests_total")
    assert again[labels(ymguard_resource="GET /metrics", ymguard_result="passed")] >= 1
