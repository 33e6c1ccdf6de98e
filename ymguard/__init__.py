"""ymguard: Sentinel-style resilience for ASGI apps.

Flow limits (QPS, concurrency), leased distributed semaphores, circuit breakers,
anti-resubmit tokens and Idempotency-Key, one problem+json exception mapper; rules from
YAML; one process on memory, many on Redis.
"""

from __future__ import annotations

from .antiresubmit import SubmitTokenRule, SubmitTokens
from .breaker import Breaker, BreakerRule, BreakerState, BreakerStatus
from .chain import Check, Context, ShortCircuit
from .errors import (
    Blocked,
    CircuitOpen,
    DuplicateSubmission,
    FlowLimited,
    IdempotencyKeyInFlight,
    IdempotencyKeyMismatch,
    IdempotencyKeyMissing,
    OriginDenied,
    ParamFlowLimited,
    ProblemResponse,
    RulesError,
    SemaphoreFull,
    StorageBlocked,
    StorageUnavailable,
    SyncResourceError,
    SystemOverloaded,
)
from .guard import Guard, RouteLimit
from .idempotency import IdempotencyRule
from .limiter import FlowRule
from .middleware import GuardMiddleware
from .rules import RulesFile, load_rules, parse_rules
from .semaphore import Permit, Semaphore, SemaphoreRule
from .stats import Counts, ResourceStats
from .storage import MemoryStore, RedisStore, Store, store_from_uri

__version__ = "0.1.0"

__all__ = [
    "Blocked",
    "Breaker",
    "BreakerRule",
    "BreakerState",
    "BreakerStatus",
    "Check",
    "CircuitOpen",
    "Context",
    "Counts",
    "DuplicateSubmission",
    "FlowLimited",
    "FlowRule",
    "Guard",
    "GuardMiddleware",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyMismatch",
    "IdempotencyKeyMissing",
    "IdempotencyRule",
    "MemoryStore",
    "OriginDenied",
    "ParamFlowLimited",
    "Permit",
    "ProblemResponse",
    "RedisStore",
    "ResourceStats",
    "RouteLimit",
    "RulesError",
    "RulesFile",
    "Semaphore",
    "SemaphoreFull",
    "SemaphoreRule",
    "ShortCircuit",
    "StorageBlocked",
    "StorageUnavailable",
    "Store",
    "SubmitTokenRule",
    "SubmitTokens",
    "SyncResourceError",
    "SystemOverloaded",
    "load_rules",
    "parse_rules",
    "store_from_uri",
]
