"""``/healthz`` (the process answers), ``/readyz`` (database and broker reachable), ``/metrics``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from cityops.settings import MqttEndpoint

router = APIRouter(tags=["ops"])
# From a cached lookup to a 24 h series: request latencies span 1 ms to seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BROKER_CHECK_TIMEOUT_S = 2.0
NOT_CONFIGURED = "not configured"  # an API without a broker reads and acts; only provisioning needs one


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "cityops_api_requests",
            "API requests, by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "cityops_api_request_seconds", "API request latency, by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.feed_clients = Gauge(
            "cityops_api_feed_clients", "Connected live-feed clients", registry=registry
        )


def instrument(app: FastAPI, metrics: ApiMetrics) -> None:
    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        return response


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Database and broker reachable",
    responses={503: {"description": "not ready: the body says which", "content": {"application/json": {}}}},
)
async def readyz(request: Request, response: Response) -> dict[str, str]:
    checks = {"database": await _database_ok(request), "broker": await _broker_ok(request.app.state.mqtt_url)}
    if not all(v in ("ok", NOT_CONFIGURED) for v in checks.values()):
        response.status_code = 503
        response.headers["Retry-After"] = "2"
    return checks


async def _database_ok(request: Request) -> str:
    try:
        async with request.app.state.pool.connection(timeout=BROKER_CHECK_TIMEOUT_S) as conn:
            await conn.execute("SELECT 1")
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"
    return "ok"


async def _broker_ok(url: str | None) -> str:
    if not url:
        return NOT_CONFIGURED
    endpoint = MqttEndpoint.parse(url)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port), BROKER_CHECK_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        return f"unavailable: {type(exc).__name__}"
    writer.close()
    return "ok"


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
