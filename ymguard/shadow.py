"""Shadow mode: a rule with ``shadow: true`` is evaluated and reported, but never blocks.

Envoy calls this ``filter_enabled`` without ``filter_enforced``: the way to try a new
limit on live traffic. It is done once for every rule kind, here: ``registry.build_checks``
passes each check of a shadow rule through :func:`shadowed`, which gives the check a
subclass of its own class (:func:`shadow_class`) whose ``enter`` turns a refusal into a
report:

* the refusal (a :class:`~ymguard.errors.Blocked`) is added to ``ctx.shadowed`` and the
  call goes on to the next check, as if the rule had admitted it; observers see the call
  in ``passed`` with ``ctx.shadowed`` set (metrics count it as ``shadow_blocked``, with
  the rule's kind and problem code);
* a line is logged (logger ``ymguard.shadow``, WARNING) at most once per
  :data:`LOG_INTERVAL` seconds per rule, with how many refusals it stands for.

What a shadow rule takes and gives back is exactly what the enforced rule would (the
semantics of Envoy's local rate limit in shadow): a call it would admit counts in its
window, holds its permit or concurrency count, and is seen by its breaker; a call it
would refuse took nothing (a check that refuses takes nothing, by the chain's contract),
so a shadow limit measures the traffic it would let through, never more. Its state is its
own (keyed by the rule's identity, like any rule's), so it never spends another rule's
quota; the one exception is a shadow ``semaphore`` rule that names a semaphore other
resources share: the permits it holds are real ones (give a shadow semaphore a name of
its own). Its identity leaves ``shadow`` out, so enforcing a rule (``shadow: false``)
keeps the state it gathered.

A check that answers the call itself (an idempotency rule replaying a kept response)
still does in shadow mode: a replay is an answer, not a refusal. A shadow idempotency
rule therefore reports missing keys, mismatches and keys in flight, and still keeps and
replays responses.

The subclass is made by class assignment, so ``isinstance`` checks on the kind's class
(``guard.breakers()``, ``add_breaker_listener``, a dashboard's) keep working.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence
from typing import Any, Final

from .chain import Check, Context
from .errors import Blocked

log = logging.getLogger("ymguard.shadow")

#: A shadow rule logs what it would have refused at most once per this many seconds.
LOG_INTERVAL: float = 10.0


class _Shadowed:
    """The token a shadow check's ``enter`` returns for a call its rule would have refused."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SHADOWED"


#: The token of a call a shadow rule would have refused: its ``exit`` has nothing to undo.
SHADOWED: Final = _Shadowed()

# Per check: [when its last line was logged, refusals not logged since]. Checks are made
# from the rules file (a reload makes new ones), never from clients: the maps stay bounded.
_last_logged: weakref.WeakKeyDictionary[object, list[float]] = weakref.WeakKeyDictionary()
_last_logged_by_name: dict[tuple[str, str], list[float]] = {}  # checks without weakrefs


def _log(check: object, error: Blocked, kind: str) -> None:
    now = time.monotonic()
    try:
        entry = _last_logged.get(check)
        if entry is None:
            entry = _last_logged[check] = [now - LOG_INTERVAL, 0.0]
    except TypeError:  # a check class with __slots__ and no __weakref__
        entry = _last_logged_by_name.setdefault(
            (error.resource, error.rule), [now - LOG_INTERVAL, 0.0]
        )
    entry[1] += 1
    if now - entry[0] < LOG_INTERVAL:
        return
    count = int(entry[1])
    entry[0], entry[1] = now, 0.0
    log.warning(
        "ymguard shadow: %s rule %s of %s would have refused %d call(s) (%s); not enforced",
        kind,
        error.rule or "?",
        error.resource,
        count,
        error.code,
    )


def _shadow_methods(cls: Any) -> dict[str, Any]:
    """``enter`` and ``exit`` of the shadow subclass of ``cls`` (``super`` is ``cls``)."""

    async def enter(self: Any, ctx: Context) -> Any:
        """Run the rule; a refusal is reported (``ctx.shadowed``, the log) and the call passes."""
        try:
            return await cls.enter(self, ctx)
        except Blocked as exc:
            if ctx.shadowed is None:
                ctx.shadowed = []
            ctx.shadowed.append((exc, self))
            _log(self, exc, self.kind)
            return SHADOWED

    async def exit(self: Any, ctx: Context, token: Any) -> None:
        """The rule's ``exit``, unless it had refused the call (then it took nothing)."""
        if token is not SHADOWED:
            await cls.exit(self, ctx, token)

    return {"enter": enter, "exit": exit}


_classes: dict[type, type] = {}


def shadow_class(cls: type) -> type:
    """The shadow subclass of a check class (made once per class; ``shadow`` is True).

    It adds no state (``__slots__ = ()``), so an existing check can take it on.
    """
    if getattr(cls, "shadow", False) is True:
        return cls
    found = _classes.get(cls)
    if found is None:
        namespace = {
            **_shadow_methods(cls),
            "shadow": True,
            "__slots__": (),
            "__module__": cls.__module__,
            "__doc__": f"{cls.__name__} of a rule in shadow mode (``ymguard.shadow``).",
        }
        found = _classes[cls] = type(f"Shadow{cls.__name__}", (cls,), namespace)
    return found


def shadowed(check: Check) -> Check:
    """``check`` in shadow mode: the same object, its class now its shadow subclass."""
    check.__class__ = shadow_class(type(check))
    # Its refusals become reports in its plain enter/exit, so it never hands its store
    # call to the chain (a staged decision would refuse for real).
    for name in ("stage_enter", "stage_exit"):
        if getattr(check, name, None) is not None:
            setattr(check, name, None)
    return check


def is_shadow(check: object) -> bool:
    """Whether ``check`` belongs to a rule in shadow mode."""
    return getattr(type(check), "shadow", False) is True


def shadow_checks(checks: Sequence[Check]) -> list[Check]:
    """``checks`` with each check of a rule marked ``shadow: true`` put in shadow mode.

    A check's rule is its ``rule`` attribute (every kind's checks have one; checks without
    a rule, such as an attached pybreaker, are left as they are).
    """
    return [
        shadowed(check) if getattr(getattr(check, "rule", None), "shadow", False) else check
        for check in checks
    ]


__all__ = ["LOG_INTERVAL", "SHADOWED", "is_shadow", "shadow_checks", "shadow_class", "shadowed"]
