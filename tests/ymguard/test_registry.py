"""The registry of rule kinds: one entry per kind, in chain order."""

from __future__ import annotations

from ymguard import Guard
from ymguard.registry import KINDS
from ymguard.rules import ResourceRules, RulesFile


def test_the_kinds_run_in_the_chain_order_of_the_architecture() -> None:
    assert [kind.name for kind in KINDS] == [
        "authority",
        "system",
        "param_flow",
        "flow",
        "breaker",
        "semaphore",
        "idempotency",
        "submit_token",
    ]
    assert [kind.order for kind in KINDS] == sorted(kind.order for kind in KINDS)


def test_every_kind_is_a_field_of_a_resources_rules_with_its_model() -> None:
    fields = ResourceRules.model_fields
    for kind in KINDS:
        if kind.name == "system":  # the whole process's: a field of the file
            assert kind.model.__name__ in str(RulesFile.model_fields["system"].annotation)
            continue
        assert kind.name in fields
        assert kind.model.__name__ in str(fields[kind.name].annotation)


def test_a_chain_holds_the_checks_of_every_kind_in_registry_order() -> None:
    guard = Guard(
        {
            "resources": {
                "POST /orders": {
                    "submit_token": {},
                    "idempotency": {},
                    "semaphore": {"permits": 1},
                    "breaker": [{"strategy": "error_count", "threshold": 3}],
                    "flow": [{"qps": 5}],
                }
            }
        }
    )
    kinds = [check.kind for check in guard.chain("POST /orders").checks]
    assert kinds == ["flow", "breaker", "semaphore", "idempotency", "submit_token"]
