"""The rule kinds, one line each, and the compilation of a resource's chain from them.

A new kind (``param_flow``) is its own module (rule model, check, ``KIND``), one line
here, and its field in ``rules.ResourceRules``.
"""

from __future__ import annotations

from . import antiresubmit, authority, breaker, idempotency, limiter, param_flow, semaphore, system
from ._kind import Env, Kind
from .chain import DEFAULT_ERROR_STATUSES, Check
from .rules import ResourceRules
from .shadow import shadow_checks

#: Every rule kind, in chain order.
KINDS: tuple[Kind, ...] = tuple(
    sorted(
        (
            authority.KIND,
            system.KIND,
            param_flow.KIND,
            limiter.KIND,
            breaker.KIND,
            semaphore.KIND,
            idempotency.KIND,
            antiresubmit.SUBMIT_TOKEN_KIND,
        ),
        key=lambda kind: kind.order,
    )
)


def build_checks(
    env: Env, resource: str, rules: ResourceRules
) -> tuple[list[Check], frozenset[int]]:
    """The checks of a resource's rules in chain order, and the statuses that are errors."""
    checks: list[Check] = []
    statuses: set[int] = set()
    decided = False
    for kind in KINDS:
        value = getattr(rules, kind.name, None)  # system: a field of the file, not here
        checks += shadow_checks(kind.build(env, resource, value))  # shadow: true (shadow.py)
        found = kind.error_statuses(value) if kind.error_statuses is not None else None
        if found is not None:
            statuses |= found
            decided = True
    return checks, frozenset(statuses) if decided else DEFAULT_ERROR_STATUSES


__all__ = ["KINDS", "build_checks"]
