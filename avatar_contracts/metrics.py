"""What both services' /metrics share: a registry per app, request counting at the HTTP edge, the scrape answer.

Each app owns its own CollectorRegistry (never prometheus-client's global one), so several apps
in one process (the tests) count apart, and every family a service exposes is listed in its own
`metrics.py`. Requests are labelled by the route's template (`/api/v1/jobs/{task_id}`), never the
raw path, so ids cannot multiply the series; a path no route knows is `unmatched`.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.responses import Response
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Request latency buckets in seconds: health checks in milliseconds up to a sync generate of minutes."""

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
"""Pipeline stage buckets in seconds: a short chunk's speech to a long job's assembly."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods labelled as themselves; any other is `other`, so a client cannot invent series."""

UNMATCHED = "unmatched"
"""The route label of a path that no route serves."""


def new_registry() -> CollectorRegistry:
    """A registry of the app's own, with the process, platform and garbage-collector collectors."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def http_families(prefix: str, registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    """`<prefix>_http_requests_total{method,route,status}` and `<prefix>_http_request_duration_seconds{method,route}`."""
    requests = Counter(f"{prefix}_http_requests_total", "HTTP requests answered, by method, route template and status.",
                       ("method", "route", "status"), registry=registry)
    duration = Histogram(f"{prefix}_http_request_duration_seconds",
                         "Time from a request's arrival to the end of its answer's body, by method and route template.",
                         ("method", "route"), buckets=HTTP_BUCKETS, registry=registry)
    return requests, duration


def route_template(scope: Scope, router: Router) -> str:
    """The template of the route that served (or would serve) the request, e.g. `/artifacts/{art_id}`.

    The router records the matched route in the scope; a request answered before routing (the
    body limit, an API-key gate) is matched here against the same routes.
    """
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    for candidate in router.routes:
        match, _ = candidate.matches(scope)
        if match is not Match.NONE:  # PARTIAL: the path is known, the method is not allowed (405)
            return getattr(candidate, "path", UNMATCHED)
    return UNMATCHED


class HttpMetrics:
    """ASGI middleware: count every answered request and time it until its body's end.

    Placed outside the request-id middleware, so answers that middleware gives itself (413 before
    the body is read, 401 from the API-key gate, the last-resort 500) are counted too.
    """

    def __init__(self, app: ASGIApp, requests: Counter, duration: Histogram, router: Router,
                 log: Optional[logging.Logger] = None) -> None:
        self.app = app
        self.requests = requests
        self.duration = duration
        self.router = router
        self.log = log
        """When set, one debug line per request (method, route, status, ms) with its request id."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what a request that fails before answering is counted as (the server then answers 500)

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - started
            method = scope.get("method", "")
            method = method if method in METHODS else "other"
            route = route_template(scope, self.router)
            self.requests.labels(method, route, str(status)).inc()
            self.duration.labels(method, route).observe(elapsed)
            if self.log is not None and self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("request done", extra={
                    "method": method, "route": route, "status": status, "ms": round(elapsed * 1000, 1),
                    "request_id": scope.get("state", {}).get("request_id", "")})


def scrape(registry: CollectorRegistry) -> Response:
    """The registry in the Prometheus text format 0.0.4 (what every Prometheus and KEDA version reads)."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)
