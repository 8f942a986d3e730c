"""The control-centre API application: ``create_app`` builds it; its lifespan owns the pool and feed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from cityops import __version__
from cityops.catalogue import Catalogue
from cityops.db.connection import open_pool
from cityops.settings import Settings
from control_api import alerts, devices, feed, limits, ops, overview, problems, readings, rules_api
from control_api.feed import FeedHub
from control_api.ops import ApiMetrics

DESCRIPTION = """The control-centre API of cityops: devices, readings, alerts and their live feed.

Authenticate with an API key: `Authorization: Bearer cok_…` (`cityops apikey create`). Keys have a
role (viewer reads; operator acts on alerts; admin manages) and a tenant scope: anything outside the
scope does not exist for the key (404). Errors are RFC 9457 problem details.
"""


def _utc_now() -> datetime:
    return datetime.now(UTC)


def create_app(
    settings: Settings,
    catalogue: Catalogue,
    database_url: str,
    mqtt_url: str | None = None,
    *,
    clock: Callable[[], datetime] = _utc_now,
) -> FastAPI:
    metrics = ApiMetrics(CollectorRegistry())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_pool(
            database_url, min_size=settings.db_pool_min, max_size=settings.db_pool_max, name="cityops-api"
        ) as pool:
            app.state.pool = pool
            hub = FeedHub(database_url, metrics.feed_clients)
            app.state.feed = hub
            stop = asyncio.Event()
            listener = asyncio.create_task(hub.run(stop), name="api-feed-listener")
            try:
                yield
            finally:
                stop.set()
                await asyncio.gather(listener, return_exceptions=True)

    app = FastAPI(
        title="cityops control API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.catalogue = catalogue
    app.state.clock = clock
    app.state.mqtt_url = mqtt_url
    app.state.metrics = metrics
    problems.install(app)
    ops.instrument(app, metrics)
    if settings.api_rate_limit > 0:
        limits.install(app, limits.RateLimiter(settings.api_rate_limit, settings.api_rate_burst))
    app.include_router(ops.router)
    app.include_router(feed.router)  # before /alerts/{id}: "stream" is not an alert id
    app.include_router(alerts.router)
    app.include_router(devices.router)
    app.include_router(readings.router)
    app.include_router(rules_api.router)
    app.include_router(overview.router)
    return app
