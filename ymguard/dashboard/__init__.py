"""The live dashboard: ``guard.dashboard(authorize=...)`` is an ASGI app to mount.

It shows every resource's passed / blocked / error calls per second and response time over
the last 15 minutes, breakers, semaphores, the rules in force and their version, and the
processes reporting; its data is JSON at ``<mount>/api/snapshot``. On a Redis store each
process reports its per-second figures through Redis (:mod:`.reporter`) and the dashboard
sums the cluster; on ``memory://`` it shows this process. See ``docs/dashboard.md``.
"""

from __future__ import annotations

from .app import Authorize, Dashboard
from .monitor import Monitor, monitor_of, rules_digest, rules_version, stop_monitor
from .reporter import Cluster, Reporter
from .series import HISTORY_SECONDS, MAX_RESOURCES, SecondSeries

__all__ = [
    "HISTORY_SECONDS",
    "MAX_RESOURCES",
    "Authorize",
    "Cluster",
    "Dashboard",
    "Monitor",
    "Reporter",
    "SecondSeries",
    "monitor_of",
    "rules_digest",
    "rules_version",
    "stop_monitor",
]
