"""Migrations on real PostgreSQL: the system server (or CITYOPS_TEST_DATABASE_URL) and embedded 18."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn, connection
from cityops.db.migrate import migrate, migration_files, status
from cityops.embedded import EmbeddedPostgres
from cityops.errors import MigrationError
from cityops.settings import Settings, StorageMode
from tests.conftest import create_database, drop_database

ALL_NATIVE = [f"{m.version:04d}_{m.name}" for m in migration_files(StorageMode.NATIVE)]
SCHEMA_FINGERPRINT = """
SELECT string_agg(format('%s:%s:%s', c.relname, c.relkind, c.relnatts), ',' ORDER BY c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema()
"""


@pytest.fixture(params=["server", "embedded-18"])
def any_server_db(request: pytest.FixtureRequest, postgres_admin_url: str) -> Iterator[str]:
    if request.param == "server":
        admin = postgres_admin_url
    else:
        server: EmbeddedPostgres = request.getfixturevalue("embedded_postgres")
        admin = server.admin_url
    name, url = create_database(admin)
    try:
        yield url
    finally:
        drop_database(admin, name)


async def fingerprint(conn: AsyncConn) -> tuple[object, ...]:
    cur = await conn.execute(SCHEMA_FINGERPRINT)
    relations = (await cur.fetchone() or [None])[0]
    cur = await conn.execute("SELECT version, checksum, applied_at FROM schema_migrations ORDER BY version")
    applied = tuple(await cur.fetchall())
    cur = await conn.execute("SELECT count(*), max(xmin::text) FROM metrics")
    metrics = await cur.fetchone()
    return relations, applied, metrics


async def test_migrate_twice_is_a_no_op(any_server_db: str, catalogue: Catalogue) -> None:
    settings = Settings(database_url=any_server_db)
    async with connection(any_server_db) as conn:
        first = await migrate(conn, settings, catalogue)
        assert first.mode is StorageMode.NATIVE
        assert [label.split(" ")[0] for label in first.applied] == ALL_NATIVE
        before = await fingerprint(conn)
        second = await migrate(conn, settings, catalogue)
        assert second.applied == [] and second.policies_changed == []
        assert await fingerprint(conn) == before
        st = await status(conn, settings)
        assert st.mode is StorageMode.NATIVE and st.pending == [] and len(st.applied) == len(ALL_NATIVE)


async def test_catalogue_is_in_the_database(migrated_conn: AsyncConn, catalogue: Catalogue) -> None:
    cur = await migrated_conn.execute("SELECT id, name, unit_code FROM metrics ORDER BY id")
    rows = await cur.fetchall()
    assert rows == [
        (m.id, m.name, m.unit_code) for m in sorted(catalogue.metrics.values(), key=lambda m: m.id)
    ]


async def test_timescale_demanded_without_the_extension_fails_clearly(
    database_url: str, catalogue: Catalogue
) -> None:
    settings = Settings(database_url=database_url, storage_mode=StorageMode.TIMESCALE)
    async with connection(database_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
        if await cur.fetchone():
            pytest.fail("this server has TimescaleDB: point CITYOPS_TEST_DATABASE_URL at plain PostgreSQL")
        with pytest.raises(MigrationError, match="CITYOPS_STORAGE_MODE=timescale but"):
            await migrate(conn, settings, catalogue)


async def test_recorded_mode_cannot_change(
    migrated_conn: AsyncConn, database_url: str, catalogue: Catalogue
) -> None:
    with pytest.raises(MigrationError, match="cannot change"):
        await migrate(migrated_conn, Settings(database_url=database_url, storage_mode="timescale"), catalogue)


async def test_edited_migration_is_detected(
    migrated_conn: AsyncConn, settings: Settings, catalogue: Catalogue
) -> None:
    await migrated_conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(migrated_conn, settings, catalogue)


async def test_one_open_alert_per_fingerprint_is_enforced(migrated_conn: AsyncConn) -> None:
    insert = """INSERT INTO alerts (fingerprint, state, severity, tenant, summary, started_at, last_seen_at)
                VALUES ('fp', %s, 'high', 'water', 's', now(), now())"""
    await migrated_conn.execute(insert, ("resolved",))
    await migrated_conn.execute(insert, ("firing",))
    with pytest.raises(Exception, match="alerts_one_open_per_fingerprint"):
        await migrated_conn.execute(insert, ("acknowledged",))
