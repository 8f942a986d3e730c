"""The in-memory device registry of a pipeline, reloaded when the devices table changes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg

from cityops.db.connection import AsyncConn, connect
from cityops.db.listen import follow
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

CHANNEL = "cityops_devices"
# A device unknown to the cache triggers a reload at most this often: a misconfigured device
# publishing fast must not turn into a query per message.
MISS_RELOAD_MIN_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: int
    external_id: str
    tenant: str
    kind: str
    district: str | None
    enabled: bool
    tags: Mapping[str, str] = field(default_factory=dict)


class DeviceRegistry:
    def __init__(self, database_url: str, metrics: GatewayMetrics) -> None:
        self._url = database_url
        self._metrics = metrics
        self._devices: dict[str, DeviceInfo] = {}
        self._miss_reload_at = float("-inf")
        self.version = 0  # bumped on every load: consumers rebuild what they derived from it

    def get(self, external_id: str) -> DeviceInfo | None:
        return self._devices.get(external_id)

    def __len__(self) -> int:
        return len(self._devices)

    def all(self) -> list[DeviceInfo]:
        return list(self._devices.values())

    async def load(self, conn: AsyncConn | None = None) -> None:
        if conn is None:
            conn = await connect(self._url)
            try:
                await self._load(conn)
            finally:
                await conn.close()
        else:
            await self._load(conn)

    async def _load(self, conn: AsyncConn) -> None:
        cursor = await conn.execute(
            "SELECT id, external_id, tenant, kind, district, enabled, tags FROM devices"
        )
        self._devices = {row[1]: DeviceInfo(*row) for row in await cursor.fetchall()}
        self.version += 1
        self._metrics.devices_known.set(len(self._devices))

    async def reload_for_miss(self) -> bool:
        """Reload unless a miss reloaded very recently; True when it reloaded."""
        if time.monotonic() - self._miss_reload_at < MISS_RELOAD_MIN_INTERVAL_S:
            return False
        self._miss_reload_at = time.monotonic()
        try:
            await self.load()
        except (psycopg.Error, OSError) as exc:
            log.warning("registry reload failed", extra={"error": str(exc)[:200]})
            return False
        return True

    async def follow_changes(self, stop: asyncio.Event) -> None:
        """LISTEN for device changes and reload; reconnects when the connection drops."""
        await follow(self._url, CHANNEL, self._load, stop, what="registry")
