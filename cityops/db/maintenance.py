"""Housekeeping that TimescaleDB does by its own jobs and plain PostgreSQL needs from us:
partitions created ahead, retention by dropping partitions, rollups kept current."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from cityops.db.connection import AsyncConn
from cityops.db.migrate import recorded_mode
from cityops.errors import MigrationError
from cityops.settings import Settings, StorageMode

# Dead letters are for diagnosis, not archives: a month lets an operator look back over an incident.
DEAD_LETTER_RETENTION = timedelta(days=30)


@dataclass(slots=True)
class MaintenanceReport:
    mode: StorageMode
    partitions_created: int = 0
    partitions_dropped: list[str] = field(default_factory=list)
    rollup_rows_deleted: int = 0
    dead_letters_deleted: int = 0


async def ensure_partitions(conn: AsyncConn, first: date, last: date) -> int:
    """Create the daily partitions of ``first..last`` that are missing (native mode)."""
    cursor = await conn.execute("SELECT cityops_ensure_partitions(%s, %s)", (first, last))
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def refresh_rollups(
    conn: AsyncConn, start: datetime, end: datetime, device_ids: list[int] | None = None
) -> None:
    """Recompute the rollups that cover ``start..end`` (native mode)."""
    await conn.execute("SELECT cityops_refresh_rollups(%s, %s, %s)", (start, end, device_ids))


async def maintain(conn: AsyncConn, settings: Settings, now: datetime) -> MaintenanceReport:
    """One round of housekeeping at ``now``; safe to run concurrently and repeatedly."""
    mode = await recorded_mode(conn)
    if mode is None:
        raise MigrationError("the database is not migrated: run `cityops db migrate` first")
    report = MaintenanceReport(mode)
    async with conn.transaction():
        if mode is StorageMode.NATIVE:
            today = now.date()
            report.partitions_created = await ensure_partitions(
                conn, today - timedelta(days=1), today + timedelta(days=settings.partitions_ahead_days)
            )
            cursor = await conn.execute(
                "SELECT cityops_drop_partitions_before(%s)",
                (now - timedelta(days=settings.retention_raw_days),),
            )
            report.partitions_dropped = [str(r[0]) for r in await cursor.fetchall()]
            for table, days in (
                ("readings_1m", settings.retention_1m_days),
                ("readings_1h", settings.retention_1h_days),
            ):
                cursor = await conn.execute(
                    f"DELETE FROM {table} WHERE bucket < %s", (now - timedelta(days=days),)
                )
                report.rollup_rows_deleted += cursor.rowcount
        cursor = await conn.execute(
            "DELETE FROM dead_letters WHERE received_at < %s", (now - DEAD_LETTER_RETENTION,)
        )
        report.dead_letters_deleted = cursor.rowcount
    return report
