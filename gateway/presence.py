"""Device presence: ``last_seen`` written in one statement every few seconds, not per message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

import psycopg

from cityops.db.connection import connection

log = logging.getLogger(__name__)


async def run_presence_writer(
    database_url: str, last_seen: dict[int, int], stop: asyncio.Event, *, interval_s: float
) -> None:
    """Every ``interval_s`` (and once on stop), move the batcher's receive times to ``devices``."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if last_seen:
            seen = dict(last_seen)
            last_seen.clear()
            try:
                await write_last_seen(database_url, seen)
            except psycopg.Error as exc:
                for device, at in seen.items():  # keep them for the next round
                    last_seen[device] = max(at, last_seen.get(device, 0))
                log.warning("presence write failed; retrying next round", extra={"error": str(exc)[:200]})
        if stop.is_set():
            return


async def write_last_seen(database_url: str, seen: dict[int, int]) -> None:
    ids = sorted(seen)  # one lock order across pipelines
    times = [datetime.fromtimestamp(seen[i] / 1_000_000, tz=UTC) for i in ids]
    async with connection(database_url, autocommit=True) as conn:
        await conn.execute(
            """
            UPDATE devices d SET last_seen = s.at
            FROM unnest(%s::int[], %s::timestamptz[]) AS s(id, at)
            WHERE d.id = s.id AND (d.last_seen IS NULL OR d.last_seen < s.at)
            """,
            (ids, times),
        )
