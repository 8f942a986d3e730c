"""Where the database and the broker are: configured, or embedded under the data directory.

``cityops up`` records the endpoints it brought up in ``<data_dir>/runtime.json`` so that other
commands run beside it (``cityops devices import``, ``cityops db status``) find the same services.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from cityops.components import Services
from cityops.db.connection import reachable, redact
from cityops.embedded import EmbeddedBroker, EmbeddedPostgres, port_open
from cityops.errors import ConfigError
from cityops.settings import MqttEndpoint, Settings

log = logging.getLogger(__name__)
RUNTIME_FILE = "runtime.json"


@dataclass(frozen=True, slots=True)
class Endpoints:
    database_url: str
    mqtt_url: str
    mqtt_v311_url: str | None = None
    embedded: list[str] = field(default_factory=list)

    @property
    def services(self) -> Services:
        return Services(
            self.database_url,
            self.mqtt_url,
            shared_subscriptions="mqtt" not in self.embedded,
            mqtt_v311_url=self.mqtt_v311_url,
        )


def runtime_path(settings: Settings) -> Path:
    return settings.data_dir / RUNTIME_FILE


def write_runtime(settings: Settings, endpoints: Endpoints) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    runtime_path(settings).write_bytes(orjson.dumps(asdict(endpoints), option=orjson.OPT_INDENT_2))


def read_runtime(settings: Settings) -> Endpoints | None:
    path = runtime_path(settings)
    if not path.exists():
        return None
    try:
        doc = orjson.loads(path.read_bytes())
        return Endpoints(**doc)
    except (orjson.JSONDecodeError, TypeError):
        return None


def database_url(settings: Settings) -> str:
    """The configured database, else the one a running ``cityops up`` recorded."""
    return _configured_or_running(settings, settings.database_url, "database_url")


def mqtt_url(settings: Settings) -> str:
    """The configured broker, else the one a running ``cityops up`` recorded."""
    return _configured_or_running(settings, settings.mqtt_url, "mqtt_url")


def mqtt_v311_url(settings: Settings) -> str:
    """A broker URL that takes MQTT 3.1.1 clients (the embedded broker listens for them apart)."""
    if settings.mqtt_url:
        return settings.mqtt_url
    runtime = read_runtime(settings)
    if runtime is not None and runtime.mqtt_v311_url:
        return runtime.mqtt_v311_url
    return mqtt_url(settings)


def _configured_or_running(settings: Settings, configured: str | None, field: str) -> str:
    if configured:
        return configured
    runtime = read_runtime(settings)
    if runtime is not None:
        return str(getattr(runtime, field))
    raise ConfigError(
        f"CITYOPS_{field.upper()} is not set and no `cityops up` is running in "
        f"{settings.data_dir.resolve()}: set it, or start `cityops up` first"
    )


def configured_services(settings: Settings) -> Services:
    """Configured services, completed from a running ``cityops up`` where a URL is unset."""
    runtime = read_runtime(settings)
    embedded_broker = settings.mqtt_url is None and runtime is not None and "mqtt" in runtime.embedded
    return Services(database_url(settings), mqtt_url(settings), shared_subscriptions=not embedded_broker)


def mqtt_reachable(url: str) -> bool:
    endpoint = MqttEndpoint.parse(url)
    return port_open(endpoint.host, endpoint.port, timeout_s=2.0)


@asynccontextmanager
async def resolve_services(settings: Settings) -> AsyncIterator[Endpoints]:
    """Configured services when reachable; embedded ones when unset (or unreachable, if allowed)."""
    async with AsyncExitStack() as stack:
        embedded: list[str] = []
        db_url = settings.database_url
        if db_url and not await reachable(db_url):
            if not settings.embedded_fallback:
                raise ConfigError(
                    f"CITYOPS_DATABASE_URL {redact(db_url)} is unreachable "
                    "(set CITYOPS_EMBEDDED_FALLBACK=true to start an embedded PostgreSQL instead)"
                )
            log.warning(
                "configured database unreachable; starting embedded PostgreSQL", extra={"url": redact(db_url)}
            )
            db_url = None
        if not db_url:
            pg = EmbeddedPostgres(settings.data_dir / "postgres")
            await asyncio.to_thread(pg.start)
            stack.push_async_callback(asyncio.to_thread, pg.stop)
            db_url = pg.url
            embedded.append("postgresql")
        mqtt_url, mqtt_v311 = settings.mqtt_url, None
        if mqtt_url and not await asyncio.to_thread(mqtt_reachable, mqtt_url):
            if not settings.embedded_fallback:
                raise ConfigError(
                    f"CITYOPS_MQTT_URL {MqttEndpoint.parse(mqtt_url).url()} is unreachable "
                    "(set CITYOPS_EMBEDDED_FALLBACK=true to start an embedded broker instead)"
                )
            log.warning("configured broker unreachable; starting the embedded broker")
            mqtt_url = None
        if not mqtt_url:
            broker = EmbeddedBroker(settings.data_dir / "broker")
            await asyncio.to_thread(broker.start)
            stack.push_async_callback(asyncio.to_thread, broker.stop)
            mqtt_url, mqtt_v311 = broker.url, broker.url_v311
            embedded.append("mqtt")
        yield Endpoints(db_url, mqtt_url, mqtt_v311, embedded)
