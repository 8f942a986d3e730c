"""Reconciling what a simulation sent with what the database holds, per device."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from cityops.db.connection import connection

# Poll the database this often while the pipeline catches up.
POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class Reconciliation:
    expected: int
    stored: int
    missing: int  # sent and accepted, not in the database
    duplicated: int  # in the database beyond what was sent
    devices_short: list[str]  # devices with missing readings (the first few)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicated == 0


async def stored_per_device(
    database_url: str, devices: list[str], start_ms: int, end_ms: int
) -> dict[str, int]:
    async with connection(database_url) as conn:
        cur = await conn.execute(
            "SELECT d.external_id, count(*) FROM readings r JOIN devices d ON d.id = r.device_id "
            "WHERE d.external_id = ANY(%s) AND r.time >= %s AND r.time < %s GROUP BY 1",
            (devices, _dt(start_ms), _dt(end_ms)),
        )
        return dict(await cur.fetchall())


def reconcile(expected: dict[str, int], stored: dict[str, int]) -> Reconciliation:
    missing = {d: n - stored.get(d, 0) for d, n in expected.items() if stored.get(d, 0) < n}
    duplicated = sum(max(0, n - expected.get(d, 0)) for d, n in stored.items())
    return Reconciliation(
        expected=sum(expected.values()),
        stored=sum(stored.values()),
        missing=sum(missing.values()),
        duplicated=duplicated,
        devices_short=sorted(missing)[:10],
    )


async def wait_and_reconcile(
    database_url: str,
    expected: dict[str, int],
    start_ms: int,
    end_ms: int,
    *,
    deadline_s: float,
) -> Reconciliation:
    """Reconcile once everything expected is stored, or at the deadline (the pipeline may lag)."""
    give_up = time.monotonic() + deadline_s
    devices = sorted(expected)
    while True:
        result = reconcile(expected, await stored_per_device(database_url, devices, start_ms, end_ms))
        if result.missing == 0 or time.monotonic() >= give_up:
            return result
        await asyncio.sleep(POLL_S)


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
