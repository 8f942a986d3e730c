"""``cityops api``: the control API under uvicorn, as a component of ``cityops up``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator

import uvicorn

from cityops.catalogue import Catalogue
from cityops.components import Services
from cityops.settings import Settings
from control_api.app import create_app

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `cityops` owns the signals and sets ``stop``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ApiComponent:
    name = "api"
    help = "the control-centre HTTP API (OpenAPI at /docs)"
    order = 20

    def describe(self, settings: Settings, services: Services) -> str:
        return f"api: http://{settings.api_host}:{settings.api_port}/docs"

    async def run(
        self, settings: Settings, catalogue: Catalogue, services: Services, stop: asyncio.Event
    ) -> None:
        app = create_app(settings, catalogue, services.database_url, services.mqtt_url)
        config = uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,  # our logging, configured once
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=int(settings.shutdown_timeout),
        )
        server = _Server(config)
        serving = asyncio.create_task(server.serve(), name="api-server")
        stop_wait = asyncio.create_task(stop.wait(), name="api-stop-wait")
        await asyncio.wait([serving, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True  # stop accepting, finish requests in flight, then the lifespan closes
        stop_wait.cancel()
        await serving


component = ApiComponent()
