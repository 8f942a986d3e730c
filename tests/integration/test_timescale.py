"""The TimescaleDB storage path against a real TimescaleDB (CITYOPS_TEST_TIMESCALE_URL).

In CI that is PostgreSQL 17 + TimescaleDB in WebAssembly: one session shared by all connections, so
each test uses one connection in a schema of its own, loads rows with INSERT … SELECT unnest (COPY
wedges it) and runs policy jobs with CALL run_job (it has no scheduler).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn, connect
from cityops.db.maintenance import maintain
from cityops.db.migrate import migrate, migration_files, status
from cityops.errors import DatabaseError
from cityops.settings import Settings, StorageMode
from ingest.rollups import RollupTracker, refresh_marks
from tests.waiting import eventually

pytestmark = [pytest.mark.timescale, pytest.mark.xdist_group("timescale")]


async def connect_when_free(url: str) -> AsyncConn:
    """The socket server takes one client at a time and frees the slot of a closed one asynchronously,
    so the next test's connection may be refused for a moment."""
    return await eventually(
        lambda: connect(url, autocommit=True, prepare_threshold=None),
        deadline_s=20,
        retry_on=(DatabaseError,),
    )


@pytest.fixture
async def ts_conn(timescale_url: str) -> AsyncIterator[AsyncConn]:
    schema = f"t_{uuid.uuid4().hex[:10]}"
    async with await connect_when_free(timescale_url) as conn:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb SCHEMA public")
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"SET search_path TO {schema}, public")
        try:
            yield conn
        finally:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
            await conn.execute("SET search_path TO public")


def settings_for(url: str) -> Settings:
    return Settings(database_url=url.split("?")[0], retention_raw_days=30, compress_after_days=7)


async def jobs(conn: AsyncConn) -> dict[tuple[str, str], int]:
    cur = await conn.execute(
        """
        SELECT j.proc_name, coalesce(ca.view_name, j.hypertable_name), j.job_id
        FROM timescaledb_information.jobs j
        LEFT JOIN timescaledb_information.continuous_aggregates ca
               ON ca.materialization_hypertable_name = j.hypertable_name
        WHERE j.hypertable_schema = current_schema() OR ca.view_schema = current_schema()
        """
    )
    return {(proc, rel): job for proc, rel, job in await cur.fetchall()}


async def test_timescale_migration_is_idempotent_with_policies(
    ts_conn: AsyncConn, timescale_url: str, catalogue: Catalogue
) -> None:
    settings = settings_for(timescale_url)
    first = await migrate(ts_conn, settings, catalogue)
    assert first.mode is StorageMode.TIMESCALE
    assert [a.split(" ")[0] for a in first.applied] == [
        f"{m.version:04d}_{m.name}" for m in migration_files(StorageMode.TIMESCALE)
    ]
    assert len(first.policies_changed) == 4
    cur = await ts_conn.execute(
        "SELECT hypertable_name, compression_enabled FROM timescaledb_information.hypertables "
        "WHERE hypertable_schema = current_schema()"
    )
    assert await cur.fetchall() == [("readings", True)]
    found = await jobs(ts_conn)
    assert {
        ("policy_compression", "readings"),
        ("policy_retention", "readings"),
        ("policy_refresh_continuous_aggregate", "readings_1m"),
        ("policy_refresh_continuous_aggregate", "readings_1h"),
        ("policy_retention", "readings_1m"),
        ("policy_retention", "readings_1h"),
    } <= set(found)

    second = await migrate(ts_conn, settings, catalogue)
    assert second.applied == [] and second.policies_changed == []
    assert await jobs(ts_conn) == found
    st = await status(ts_conn, settings)
    assert st.mode is StorageMode.TIMESCALE and st.timescaledb_version and st.pending == []

    longer = settings.model_copy(update={"retention_raw_days": 60})
    third = await migrate(ts_conn, longer, catalogue)
    assert third.policies_changed == ["policy_retention on readings: 60 days"]


async def test_rollup_query_matches_raw_after_policy_run(
    ts_conn: AsyncConn, timescale_url: str, catalogue: Catalogue
) -> None:
    settings = settings_for(timescale_url)
    await migrate(ts_conn, settings, catalogue)
    rng = random.Random(3)
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    start = end - timedelta(hours=2)
    times, devices, metrics, values = [], [], [], []
    for device in (1, 2):
        for i in range(480):
            times.append(start + timedelta(seconds=15 * i))
            devices.append(device)
            metrics.append(60)
            values.append(rng.uniform(0, 150))
    await ts_conn.execute(
        "INSERT INTO readings (time, device_id, metric_id, value) "
        "SELECT * FROM unnest(%s::timestamptz[], %s::int[], %s::smallint[], %s::float8[])",
        (times, devices, metrics, values),
    )
    found = await jobs(ts_conn)
    await ts_conn.execute(f"CALL run_job({found[('policy_refresh_continuous_aggregate', 'readings_1m')]})")
    await ts_conn.execute(f"CALL run_job({found[('policy_refresh_continuous_aggregate', 'readings_1h')]})")
    # Materialised rows exist now, and the rollup answers what raw rows answer.
    cur = await ts_conn.execute(
        "SELECT count(*) FROM _timescaledb_internal._materialized_hypertable_"
        "%s" % await _materialization_id(ts_conn, "readings_1m")
    )
    assert (await cur.fetchone() or (0,))[0] >= 118
    for view, unit in (("readings_1m", "minute"), ("readings_1h", "hour")):
        cur = await ts_conn.execute(
            f"""
            SELECT count(*) FROM (
                SELECT device_id, metric_id, bucket, count, round(avg::numeric, 6), min, max, last, last_time
                FROM {view}
                EXCEPT
                SELECT device_id, metric_id, date_trunc('{unit}', time), count(*), round(avg(value)::numeric, 6),
                       min(value), max(value), (array_agg(value ORDER BY time DESC))[1], max(time)
                FROM readings GROUP BY 1, 2, 3) AS mismatch
            """
        )
        assert (await cur.fetchone()) == (0,), view
        cur = await ts_conn.execute(f"SELECT sum(count) FROM {view}")
        assert (await cur.fetchone()) == (len(times),)
    report = await maintain(ts_conn, settings, datetime.now(UTC))
    assert report.mode is StorageMode.TIMESCALE and report.partitions_created == 0


async def _materialization_id(conn: AsyncConn, view: str) -> int:
    cur = await conn.execute(
        "SELECT materialization_hypertable_name FROM timescaledb_information.continuous_aggregates "
        "WHERE view_name = %s AND view_schema = current_schema()",
        (view,),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(str(row[0]).rsplit("_", 1)[1])


async def test_backfill_days_old_reaches_the_rollups(
    ts_conn: AsyncConn, timescale_url: str, catalogue: Catalogue
) -> None:
    """Backfill older than the refresh policy's window is materialised by the ingest's refresher."""
    await migrate(ts_conn, settings_for(timescale_url), catalogue)
    now = datetime.now(UTC)
    old = [now - timedelta(days=10, minutes=i) for i in range(5)] + [now - timedelta(days=400)]
    await ts_conn.execute(
        "INSERT INTO readings (time, device_id, metric_id, value) "
        "SELECT t, 7, 60, 1.5 FROM unnest(%s::timestamptz[]) AS t",
        (old,),
    )
    cur = await ts_conn.execute("SELECT count(*) FROM readings")
    assert await cur.fetchone() == (6,)
    table = await _materialization_id(ts_conn, "readings_1m")
    materialised = f"SELECT count(*) FROM _timescaledb_internal._materialized_hypertable_{table}"
    cur = await ts_conn.execute(materialised)
    assert await cur.fetchone() == (0,)
    tracker = RollupTracker()
    tracker.note_everything(min(old), max(old))
    await refresh_marks(ts_conn, StorageMode.TIMESCALE, tracker.take(), now)
    cur = await ts_conn.execute(materialised)
    assert await cur.fetchone() == (6,)
    cur = await ts_conn.execute(
        "SELECT sum(count) FROM readings_1h WHERE bucket < %s", (now - timedelta(days=3),)
    )
    assert await cur.fetchone() == (6,)
