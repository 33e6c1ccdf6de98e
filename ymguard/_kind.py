"""What a rule kind is to the guard: one registry entry, and what its builder may use.

Each rule kind's module (``limiter.py``, ``breaker.py``, ...) holds its rule model, its
check(s), its public object and one :class:`Kind`; ``registry.py`` lists the kinds. The
guard compiles a resource's chain by asking every kind, in chain order, for the checks of
the resource's rules: it knows no kind by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._model import RuleModel

if TYPE_CHECKING:
    from .antiresubmit import SubmitTokens
    from .chain import Check
    from .semaphore import Semaphore
    from .stats import ResourceStats
    from .storage import Store
    from .system import SystemProtection


@dataclass(frozen=True, slots=True)
class Env:
    """What a kind's builder may use: the guard's store and the objects it shares.

    Attributes:
        store: where rule state lives.
        stats: a resource's statistics (one per resource, kept across reloads).
        semaphores: the guard's semaphores by name (``guard.semaphore(name)``).
        submit_tokens: the guard's submit tokens (made on first use).
        listeners: the breaker listeners registered for a resource.
        attached: the checks code attached to a resource (``guard.attach_breaker``).
        system: the guard's process-wide system protection (``system:``), if any.
    """

    store: Store
    stats: Callable[[str], ResourceStats]
    semaphores: dict[str, Semaphore]
    submit_tokens: Callable[[], SubmitTokens]
    listeners: Callable[[str], list[Any]]
    attached: Callable[[str], Sequence[Check]]
    system: SystemProtection | None = None


@dataclass(frozen=True, slots=True)
class Kind:
    """One rule kind, as the guard compiles it.

    Attributes:
        name: its key under a resource in the rules file (``flow``).
        order: its place in the chain (lower runs first): authority 10, system 20,
            param_flow 30, flow 40, breaker 50, semaphore 60, idempotency 70,
            submit_token 80.
        model: its rule model.
        build: ``build(env, resource, rules)``: the checks of a resource's rules of this
            kind (``rules`` is the resource's field: a list, a rule or None).
        error_statuses: the statuses the resource's statistics count as errors, when the
            kind decides them (breakers), else None.
    """

    name: str
    order: int
    model: type[RuleModel]
    build: Callable[[Env, str, Any], Sequence[Check]]
    error_statuses: Callable[[Any], frozenset[int] | None] | None = None


__all__ = ["Env", "Kind"]
