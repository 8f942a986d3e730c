"""Plain PostgreSQL storage: daily partitions, backfill, retention, rollups equal to raw aggregates."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta

import pytest

from cityops.db.connection import AsyncConn
from cityops.db.maintenance import ensure_partitions, maintain, refresh_rollups
from cityops.settings import Settings

NOW = datetime(2026, 11, 21, 10, 30, tzinfo=UTC)


async def partitions(conn: AsyncConn) -> list[str]:
    cur = await conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'readings'::regclass ORDER BY 1"
    )
    return [r[0] for r in await cur.fetchall()]


async def test_maintain_creates_days_ahead_and_is_repeatable(
    migrated_conn: AsyncConn, settings: Settings
) -> None:
    report = await maintain(migrated_conn, settings, NOW)
    assert report.partitions_created == settings.partitions_ahead_days + 2
    names = await partitions(migrated_conn)
    assert names[0] == "readings_p20261120" and names[-1] == "readings_p20261128"
    again = await maintain(migrated_conn, settings, NOW)
    assert again.partitions_created == 0 and await partitions(migrated_conn) == names


async def test_backfill_days_old_lands_in_its_own_partition(migrated_conn: AsyncConn) -> None:
    old = NOW - timedelta(days=40)
    assert await ensure_partitions(migrated_conn, old.date(), old.date()) == 1
    await migrated_conn.execute(
        "INSERT INTO readings (time, device_id, metric_id, value) VALUES (%s, 1, 60, 12.5)", (old,)
    )
    cur = await migrated_conn.execute("SELECT count(*) FROM readings_p20261012")
    assert (await cur.fetchone()) == (1,)


async def test_a_reading_without_its_partition_is_refused(migrated_conn: AsyncConn) -> None:
    with pytest.raises(Exception, match="no partition"):
        await migrated_conn.execute(
            "INSERT INTO readings VALUES (%s, 1, 60, 1, 0)", (NOW - timedelta(days=400),)
        )


async def test_retention_drops_whole_old_days(migrated_conn: AsyncConn, settings: Settings) -> None:
    first = (NOW - timedelta(days=settings.retention_raw_days + 3)).date()
    await ensure_partitions(migrated_conn, first, NOW.date())
    report = await maintain(migrated_conn, settings, NOW)
    assert len(report.partitions_dropped) == 3
    remaining = await partitions(migrated_conn)
    cutoff = (NOW - timedelta(days=settings.retention_raw_days)).date()
    assert all(
        date(int(n[10:14]), int(n[14:16]), int(n[16:18])) >= cutoff - timedelta(days=1) for n in remaining
    )


async def test_duplicates_are_refused_by_the_series_key(migrated_conn: AsyncConn) -> None:
    await ensure_partitions(migrated_conn, NOW.date(), NOW.date())
    await migrated_conn.execute("INSERT INTO readings VALUES (%s, 1, 60, 1, 0)", (NOW,))
    with pytest.raises(Exception, match="readings"):
        await migrated_conn.execute("INSERT INTO readings VALUES (%s, 1, 60, 2, 0)", (NOW,))


async def test_rollups_match_raw_aggregates(migrated_conn: AsyncConn) -> None:
    rng = random.Random(7)
    start = NOW - timedelta(hours=3)
    await ensure_partitions(migrated_conn, start.date(), NOW.date())
    rows = [
        (start + timedelta(seconds=15 * i), device, metric, rng.uniform(-5, 100))
        for device in (1, 2)
        for metric in (60, 61)
        for i in range(720)
    ]
    async with migrated_conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO readings (time, device_id, metric_id, value) VALUES (%s,%s,%s,%s)", rows
        )
    await refresh_rollups(migrated_conn, start, NOW)
    for table, unit in (("readings_1m", "minute"), ("readings_1h", "hour")):
        cur = await migrated_conn.execute(
            f"""
            SELECT count(*) FROM (
                SELECT device_id, metric_id, bucket, count, round(sum::numeric, 6), round(avg::numeric, 6), min,
                       max, last, last_time FROM {table}
                EXCEPT
                SELECT device_id, metric_id, date_trunc('{unit}', time), count(*), round(sum(value)::numeric, 6),
                       round(avg(value)::numeric, 6), min(value), max(value),
                       (array_agg(value ORDER BY time DESC))[1], max(time)
                FROM readings GROUP BY 1, 2, 3) AS mismatch
            """
        )
        assert (await cur.fetchone()) == (0,), table
        cur = await migrated_conn.execute(f"SELECT sum(count) FROM {table}")
        assert (await cur.fetchone()) == (len(rows),)
    # A late reading changes one bucket; refreshing just that device's range brings the rollup back in step.
    await migrated_conn.execute(
        "INSERT INTO readings VALUES (%s, 1, 60, 1000, 0)", (start + timedelta(seconds=7),)
    )
    await refresh_rollups(migrated_conn, start, start, [1])
    cur = await migrated_conn.execute(
        "SELECT count, max FROM readings_1m WHERE device_id = 1 AND metric_id = 60 AND bucket = %s", (start,)
    )
    assert (await cur.fetchone()) == (5, 1000.0)
