"""Keeping ``readings_1m`` and ``readings_1h`` current.

Native mode: committed batches mark what they touched (per UTC day: time span and devices); a
refresher folds the marks into the rollup tables every few seconds with ``cityops_refresh_rollups``,
which recomputes whole buckets from raw rows and so is idempotent under redelivery and retries.
TimescaleDB mode: its refresh policy covers recent data; only backfill older than the policy's window
needs an explicit ``refresh_continuous_aggregate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg

from cityops.db.connection import AsyncConn, connection
from cityops.db.maintenance import refresh_rollups
from cityops.db.retry import is_transient
from cityops.settings import StorageMode
from ingest.metrics import IngestMetrics
from ingest.writer import DAY_US, WriteResult

log = logging.getLogger(__name__)

# The TimescaleDB refresh policies of migration 0002 look back this far; older backfill needs help.
TIMESCALE_POLICY_WINDOW = timedelta(days=3)
# After a restart the marks of the last run are gone: recompute this much recent history once.
RESTART_LOOKBACK = timedelta(hours=1)
# Past this many devices in one day's mark, refreshing all devices is cheaper than listing them.
DEVICE_LIST_MAX = 50_000


@dataclass(slots=True)
class _DayMark:
    first_us: int
    last_us: int
    devices: set[int] | None = field(default_factory=set)  # None: every device


class RollupTracker:
    """What committed batches touched and the rollups do not reflect yet."""

    def __init__(self) -> None:
        self._days: dict[int, _DayMark] = {}

    def note(self, result: WriteResult) -> None:
        if result.time_range_us is None or result.rows_inserted == 0:
            return
        first, last = result.time_range_us
        for day in range(first // DAY_US, last // DAY_US + 1):
            lo, hi = max(first, day * DAY_US), min(last, (day + 1) * DAY_US - 1)
            self._mark(day, lo, hi, set(result.device_ids))

    def note_everything(self, start: datetime, end: datetime) -> None:
        first, last = _us(start), _us(end)
        for day in range(first // DAY_US, last // DAY_US + 1):
            self._mark(day, max(first, day * DAY_US), min(last, (day + 1) * DAY_US - 1), None)

    def _mark(self, day: int, lo: int, hi: int, devices: set[int] | None) -> None:
        mark = self._days.get(day)
        if mark is None:
            self._days[day] = _DayMark(lo, hi, devices)
            return
        mark.first_us, mark.last_us = min(mark.first_us, lo), max(mark.last_us, hi)
        if mark.devices is None or devices is None:
            mark.devices = None
        else:
            mark.devices |= devices
            if len(mark.devices) > DEVICE_LIST_MAX:
                mark.devices = None

    def take(self) -> list[tuple[datetime, datetime, list[int] | None]]:
        marks, self._days = self._days, {}
        return [
            (_dt(m.first_us), _dt(m.last_us), sorted(m.devices) if m.devices is not None else None)
            for _, m in sorted(marks.items())
        ]

    def oldest_pending(self) -> datetime | None:
        return _dt(min(m.first_us for m in self._days.values())) if self._days else None

    def restore(self, marks: list[tuple[datetime, datetime, list[int] | None]]) -> None:
        for start, end, devices in marks:
            first, last = _us(start), _us(end)
            self._mark(first // DAY_US, first, last, set(devices) if devices is not None else None)


async def run_rollup_refresher(
    database_url: str,
    mode: StorageMode,
    tracker: RollupTracker,
    metrics: IngestMetrics,
    stop: asyncio.Event,
    *,
    interval_s: float,
    clock: Callable[[], datetime],
) -> None:
    """Every ``interval_s``, and once more on stop, fold the tracker's marks into the rollups."""
    if mode is StorageMode.NATIVE:
        tracker.note_everything(clock() - RESTART_LOOKBACK, clock())
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        oldest = tracker.oldest_pending()
        metrics.rollup_lag_seconds.set((clock() - oldest).total_seconds() if oldest else 0)
        marks = tracker.take()
        if marks:
            try:
                await _refresh(database_url, mode, marks, clock())
                metrics.rollup_refreshes.inc()
            except psycopg.Error as exc:
                tracker.restore(marks)
                level = logging.WARNING if is_transient(exc) else logging.ERROR
                log.log(level, "rollup refresh failed; will retry", extra={"error": str(exc).strip()[:200]})
        if stop.is_set():
            return


Marks = list[tuple[datetime, datetime, list[int] | None]]


async def _refresh(url: str, mode: StorageMode, marks: Marks, now: datetime) -> None:
    async with connection(url, autocommit=True) as conn:
        await refresh_marks(conn, mode, marks, now)


async def refresh_marks(conn: AsyncConn, mode: StorageMode, marks: Marks, now: datetime) -> None:
    """Fold ``marks`` into the rollups over ``conn`` (in autocommit mode)."""
    if mode is StorageMode.NATIVE:
        for start, end, devices in marks:
            await refresh_rollups(conn, start, end, devices)
        return
    policy_floor = now - TIMESCALE_POLICY_WINDOW
    for start, end, _ in marks:
        if start >= policy_floor:
            continue  # the refresh policy covers it
        upto = min(end, policy_floor)
        for view, unit in (("readings_1m", timedelta(minutes=1)), ("readings_1h", timedelta(hours=1))):
            await conn.execute(
                "CALL refresh_continuous_aggregate(%s, %s, %s)",
                (view, _floor(start, unit), _floor(upto, unit) + unit),
            )


def _floor(moment: datetime, unit: timedelta) -> datetime:
    seconds = int(unit.total_seconds())
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, tz=UTC)


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _dt(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)
