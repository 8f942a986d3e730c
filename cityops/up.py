"""``cityops up``: everything a newcomer needs, in one process tree, stopped cleanly by Ctrl-C.

It starts embedded services where none are configured, migrates, and runs every component that
exists. Components are long-lived tasks with names; on a stop signal each is cancelled and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime

from cityops.apikeys import Role, create_key, has_admin_key
from cityops.catalogue import Catalogue
from cityops.components import Component, discover, enabled
from cityops.db.connection import connection, redact
from cityops.db.maintenance import maintain
from cityops.db.migrate import migrate
from cityops.errors import CityopsError
from cityops.services import Endpoints, resolve_services, runtime_path, write_runtime
from cityops.settings import Settings

log = logging.getLogger(__name__)

FIRST_KEY_NAME = "first admin (cityops up)"
# Housekeeping cadence: partitions are created a week ahead, so every few minutes is plenty.
MAINTENANCE_INTERVAL_S = 300.0

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


async def maintenance_loop(
    db_url: str,
    settings: Settings,
    stop: asyncio.Event,
    clock: Clock = utc_now,
    interval_s: float = MAINTENANCE_INTERVAL_S,
) -> None:
    while not stop.is_set():
        try:
            async with connection(db_url, autocommit=True) as conn:
                report = await maintain(conn, settings, clock())
            if report.partitions_created or report.partitions_dropped:
                log.info(
                    "maintenance",
                    extra={
                        "partitions_created": report.partitions_created,
                        "partitions_dropped": len(report.partitions_dropped),
                    },
                )
        except Exception:
            log.exception("maintenance round failed; retrying next round")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


def banner(endpoints: Endpoints, mode: str, settings: Settings, components: list[Component]) -> str:
    def where(name: str) -> str:
        return "embedded" if name in endpoints.embedded else "configured"

    lines = [
        "cityops is up",
        f"  PostgreSQL ({where('postgresql')}, {mode} storage): {redact(endpoints.database_url)}",
        f"  MQTT broker ({where('mqtt')}): {endpoints.mqtt_url}"
        + (f"  (MQTT 3.1.1: {endpoints.mqtt_v311_url})" if endpoints.mqtt_v311_url else ""),
        f"  devices publish to: {settings.topic_root}/v1/<device_id>/telemetry",
        *(f"  {c.describe(settings, endpoints.services)}" for c in components),
        f"  maintenance: every {int(MAINTENANCE_INTERVAL_S)} s",
        f"  runtime file: {runtime_path(settings).resolve()}",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


async def run_up(
    settings: Settings,
    catalogue: Catalogue,
    *,
    ready: Callable[[Endpoints], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGINT/SIGTERM (or ``stop`` is set); ``ready`` is awaited once everything runs."""
    stop = stop or asyncio.Event()
    with stop_on_signals(stop):
        async with resolve_services(settings) as endpoints:
            async with connection(endpoints.database_url) as conn:
                report = await migrate(conn, settings, catalogue)
                await maintain(conn, settings, utc_now())
                first_key = (
                    None
                    if await has_admin_key(conn)
                    else await create_key(conn, FIRST_KEY_NAME, Role.ADMIN, None)
                )
            write_runtime(settings, endpoints)
            services = endpoints.services
            components = [c for c in discover() if enabled(c, settings)]
            maintenance = asyncio.create_task(
                maintenance_loop(endpoints.database_url, settings, stop), name="maintenance"
            )
            running = [
                asyncio.create_task(c.run(settings, catalogue, services, stop), name=c.name)
                for c in components
            ]
            print(banner(endpoints, report.mode.value, settings, components), file=sys.stderr, flush=True)
            if first_key is not None:
                print(
                    f"First admin API key (shown once, keep it): {first_key[1]}\n"
                    "  more: cityops apikey create --name NAME --role viewer|operator|admin [--tenant T]",
                    file=sys.stderr,
                    flush=True,
                )
            try:
                if ready is not None:
                    await ready(endpoints)
                stop_wait = asyncio.create_task(stop.wait(), name="up-stop-wait")
                await asyncio.wait([stop_wait, *running], return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
            finally:
                log.info("stopping")
                stop.set()
                # Components drain by themselves once stop is set, each within its own deadline.
                results = await asyncio.gather(*running, return_exceptions=True)
                maintenance.cancel()
                await asyncio.gather(maintenance, return_exceptions=True)
                runtime_path(settings).unlink(missing_ok=True)
            failed = [
                (c.name, r) for c, r in zip(components, results, strict=True) if isinstance(r, BaseException)
            ]
            if failed:
                name, error = failed[0]
                raise CityopsError(f"component {name} failed: {error!r}")
    log.info("stopped")


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not a Unix loop
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
