"""The demo's OpenTelemetry wiring: an SDK meter provider, the Prometheus exporter, ``/metrics``.

ymguard records its metrics through the OpenTelemetry API (``ymguard.metrics``); an app
chooses the SDK and where the numbers go. The demo keeps them in the process and serves
them to Prometheus: ``GET /metrics`` answers in the Prometheus text format, through
OpenTelemetry's Prometheus exporter, e.g.::

    ymguard_requests_total{ymguard_resource="POST /kill/{kill_course_id}",
        ymguard_result="blocked",ymguard_rule_kind="flow",error_type="flow-limited"} 12.0

Each worker process has its own provider and answers ``/metrics`` with its own counts
(``target_info`` names the process: ``service_instance_id`` is ``host:pid``). With
several workers behind one port, a scrape reaches one of them: scrape each worker on a
port of its own, or read the whole cluster on the guards dashboard.

The provider is the guard's own (``Guard(metrics=provider)``), not the global one: an app
made twice in one process (the tests) keeps its numbers apart.
"""

from __future__ import annotations

import os
import socket

from fastapi import FastAPI, Request
from fastapi.responses import Response
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ymguard import Guard, __version__

#: The ``service.name`` of the demo's metrics.
SERVICE_NAME = "ymguard-demo"


class Telemetry:
    """The demo's meter provider and its Prometheus registry (one per app)."""

    def __init__(self) -> None:
        # A registry of its own: the exporter's default is prometheus_client's global one,
        # where a second app in one process would clash with the first.
        self.registry = CollectorRegistry(auto_describe=False)
        # Without the otel_scope_* labels: every metric here is of the one scope "ymguard".
        self.reader = PrometheusMetricReader(scope_info_enabled=False, registry=self.registry)
        resource = Resource.create(
            {
                "service.name": SERVICE_NAME,
                "service.version": __version__,
                "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
            }
        )
        # No exemplars: the demo records no traces, and the default filter (trace-based)
        # looks for a sampled span on every recording.
        self.provider = MeterProvider(
            metric_readers=[self.reader],
            resource=resource,
            exemplar_filter=AlwaysOffExemplarFilter(),
        )

    async def metrics(self, request: Request) -> Response:
        """``GET /metrics``: this process's metrics in the Prometheus text format."""
        guard: Guard = request.app.state.guard
        if guard.metrics is not None:
            await guard.metrics.refresh()  # the semaphores' counts, read from Redis now
        body = generate_latest(self.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})

    def install(self, app: FastAPI) -> None:
        """Serve ``GET /metrics`` on ``app`` (not in the OpenAPI schema: it is not JSON)."""
        app.add_api_route("/metrics", self.metrics, methods=["GET"], include_in_schema=False)

    def shutdown(self) -> None:
        """Stop the provider (on the app's shutdown)."""
        self.provider.shutdown()


__all__ = ["SERVICE_NAME", "Telemetry"]
