"""Migrations: ordered SQL files, applied once each, recorded with their checksum.

A version is either one file, ``NNNN_name.sql``, or a pair for the two storage modes,
``NNNN_name.native.sql`` and ``NNNN_name.timescale.sql``. The storage mode is chosen on the first
migration (TimescaleDB when the extension can be created, unless settings say otherwise) and then
recorded: it never changes under existing data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn
from cityops.errors import MigrationError
from cityops.settings import Settings, StorageMode

_FILE_RE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+?)(?:\.(?P<mode>native|timescale))?\.sql$")
# Any constant works; it only has to be the same in every cityops process.
_MIGRATION_LOCK = 0x63_69_74_79  # "city"

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS cityops_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    mode       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True, slots=True)
class MigrationFile:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class MigrationReport:
    mode: StorageMode
    applied: list[str]
    policies_changed: list[str]


def migration_files(mode: StorageMode) -> list[MigrationFile]:
    """The files for ``mode`` in version order."""
    by_version: dict[int, dict[str | None, tuple[str, str]]] = {}
    folder = resources.files("cityops.db").joinpath("migrations")
    for entry in folder.iterdir():
        match = _FILE_RE.match(entry.name)
        if match is None:
            continue
        variants = by_version.setdefault(int(match["version"]), {})
        variants[match["mode"]] = (match["name"], entry.read_text(encoding="utf-8"))
    files = []
    for version in sorted(by_version):
        variants = by_version[version]
        chosen = variants.get(mode.value) or variants.get(None)
        if chosen is None:
            raise MigrationError(f"migration {version:04d} has no file for storage mode {mode.value}")
        files.append(MigrationFile(version, chosen[0], chosen[1]))
    return files


async def migrate(conn: AsyncConn, settings: Settings, catalogue: Catalogue) -> MigrationReport:
    """Bring the schema up to date; a second run applies nothing and changes nothing.

    ``conn`` must not be inside a transaction: each migration runs in a transaction of its own.
    """
    await conn.set_autocommit(True)
    await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
    try:
        await conn.execute(_BOOTSTRAP)
        mode = await _storage_mode(conn, settings)
        applied = await _apply_files(conn, mode)
        await sync_catalogue(conn, catalogue)
        changed = await _apply_timescale_policies(conn, settings) if mode is StorageMode.TIMESCALE else []
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return MigrationReport(mode, applied, changed)


async def recorded_mode(conn: AsyncConn) -> StorageMode | None:
    """The storage mode the database was migrated in, or None before the first migration."""
    if await _scalar(conn, "SELECT to_regclass('cityops_meta')") is None:
        return None
    value = await _scalar(conn, "SELECT value FROM cityops_meta WHERE key = 'storage_mode'")
    return StorageMode(value) if value else None


async def _storage_mode(conn: AsyncConn, settings: Settings) -> StorageMode:
    recorded = await recorded_mode(conn)
    if recorded is not None:
        if settings.storage_mode not in (StorageMode.AUTO, recorded):
            raise MigrationError(
                f"CITYOPS_STORAGE_MODE={settings.storage_mode.value} but this database was migrated in "
                f"{recorded.value} mode; the mode of a database cannot change under its data"
            )
        return recorded
    mode = await _choose_mode(conn, settings.storage_mode)
    await conn.execute(
        "INSERT INTO cityops_meta (key, value) VALUES ('storage_mode', %s) ON CONFLICT (key) DO NOTHING",
        (mode.value,),
    )
    return mode


async def _choose_mode(conn: AsyncConn, wanted: StorageMode) -> StorageMode:
    if wanted is StorageMode.NATIVE:
        return StorageMode.NATIVE
    installed = await _scalar(conn, "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    if installed:
        return StorageMode.TIMESCALE
    available = await _scalar(conn, "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
    problem = "the timescaledb extension is not installed on the server"
    if available:
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            return StorageMode.TIMESCALE
        except psycopg.Error as exc:  # e.g. not in shared_preload_libraries
            problem = f"CREATE EXTENSION timescaledb failed: {exc}"
    if wanted is StorageMode.TIMESCALE:
        raise MigrationError(f"CITYOPS_STORAGE_MODE=timescale but {problem}")
    return StorageMode.NATIVE


async def _apply_files(conn: AsyncConn, mode: StorageMode) -> list[str]:
    cursor = await conn.execute("SELECT version, checksum FROM schema_migrations")
    done: dict[int, str] = {int(row[0]): str(row[1]) for row in await cursor.fetchall()}
    applied = []
    for migration in migration_files(mode):
        label = f"{migration.version:04d}_{migration.name} ({mode.value})"
        if migration.version in done:
            if done[migration.version] != migration.checksum:
                raise MigrationError(f"migration {label} was changed after it was applied")
            continue
        try:
            async with conn.transaction():
                await conn.execute(migration.sql.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, mode, checksum) VALUES (%s, %s, %s, %s)",
                    (migration.version, migration.name, mode.value, migration.checksum),
                )
        except psycopg.Error as exc:
            raise MigrationError(f"migration {label} failed: {exc}") from exc
        applied.append(label)
    return applied


async def sync_catalogue(conn: AsyncConn, catalogue: Catalogue) -> None:
    """Upsert the shipped metric catalogue (ids are stable; tenant-registered metrics are left alone)."""
    rows = [
        (
            m.id,
            m.name,
            m.domain.value,
            m.unit,
            m.unit_code,
            m.unit_text,
            m.min,
            m.max,
            m.fiware_attribute,
            m.sample_interval_s,
            m.description,
        )
        for m in catalogue.metrics.values()
    ]
    async with conn.cursor() as cur:
        await cur.executemany(
            """
            INSERT INTO metrics (id, name, domain, unit, unit_code, unit_text, min, max,
                                 fiware_attribute, sample_interval_s, description)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (id) DO UPDATE SET
                name = excluded.name, domain = excluded.domain, unit = excluded.unit,
                unit_code = excluded.unit_code, unit_text = excluded.unit_text, min = excluded.min,
                max = excluded.max, fiware_attribute = excluded.fiware_attribute,
                sample_interval_s = excluded.sample_interval_s, description = excluded.description
            WHERE (metrics.name, metrics.domain, metrics.unit, metrics.unit_code, metrics.unit_text,
                   metrics.min, metrics.max, metrics.fiware_attribute, metrics.sample_interval_s,
                   metrics.description)
              IS DISTINCT FROM
                  (excluded.name, excluded.domain, excluded.unit, excluded.unit_code, excluded.unit_text,
                   excluded.min, excluded.max, excluded.fiware_attribute, excluded.sample_interval_s,
                   excluded.description)
            """,
            rows,
        )


# (relation, policy proc, config key, setting) - intervals that come from settings.
def _wanted_policies(settings: Settings) -> list[tuple[str, str, str, timedelta]]:
    return [
        ("readings", "policy_compression", "compress_after", timedelta(days=settings.compress_after_days)),
        ("readings", "policy_retention", "drop_after", timedelta(days=settings.retention_raw_days)),
        ("readings_1m", "policy_retention", "drop_after", timedelta(days=settings.retention_1m_days)),
        ("readings_1h", "policy_retention", "drop_after", timedelta(days=settings.retention_1h_days)),
    ]


_ADD_POLICY = {
    "policy_compression": "SELECT add_compression_policy({rel}, compress_after => {interval})",
    "policy_retention": "SELECT add_retention_policy({rel}, drop_after => {interval})",
}
_REMOVE_POLICY = {
    "policy_compression": "SELECT remove_compression_policy({rel}, if_exists => true)",
    "policy_retention": "SELECT remove_retention_policy({rel}, if_exists => true)",
}


async def _apply_timescale_policies(conn: AsyncConn, settings: Settings) -> list[str]:
    """Make the compression and retention jobs match the settings; untouched when they already do."""
    changed = []
    for relation, proc, key, wanted in _wanted_policies(settings):
        current = await _current_policy_interval(conn, relation, proc, key)
        if current == wanted:
            continue
        params = {"rel": sql.Literal(relation), "interval": sql.Literal(wanted)}
        if current is not None:
            await conn.execute(sql.SQL(_REMOVE_POLICY[proc]).format(**params))
        await conn.execute(sql.SQL(_ADD_POLICY[proc]).format(**params))
        changed.append(f"{proc} on {relation}: {wanted.days} days")
    return changed


async def _current_policy_interval(conn: AsyncConn, relation: str, proc: str, key: str) -> timedelta | None:
    # Continuous aggregates are jobs on their materialisation hypertable; resolve the view name first.
    value = await _scalar(
        conn,
        """
        SELECT (j.config ->> %(key)s)::interval
        FROM timescaledb_information.jobs j
        WHERE j.proc_name = %(proc)s
          AND (j.hypertable_name = %(rel)s OR j.hypertable_name = (
                SELECT materialization_hypertable_name FROM timescaledb_information.continuous_aggregates
                WHERE view_name = %(rel)s AND view_schema = current_schema()))
          AND j.hypertable_schema IN (current_schema(), '_timescaledb_internal')
        LIMIT 1
        """,
        {"key": key, "proc": proc, "rel": relation},
    )
    return value if isinstance(value, timedelta) else None


async def _scalar(conn: AsyncConn, query: str, params: Any = None) -> Any:
    cursor = await conn.execute(query, params)
    row = await cursor.fetchone()
    return row[0] if row else None


@dataclass(frozen=True, slots=True)
class DatabaseStatus:
    server_version: str
    mode: StorageMode | None
    timescaledb_version: str | None
    applied: list[tuple[int, str, str]]
    pending: list[str]


async def status(conn: AsyncConn, settings: Settings) -> DatabaseStatus:
    server = str(await _scalar(conn, "SHOW server_version"))
    tsdb = await _scalar(conn, "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    mode = await recorded_mode(conn)
    applied: list[tuple[int, str, str]] = []
    if mode is not None:
        cursor = await conn.execute("SELECT version, name, mode FROM schema_migrations ORDER BY version")
        applied = [(int(v), str(n), str(m)) for v, n, m in await cursor.fetchall()]
    planned_mode = mode or (
        StorageMode.NATIVE
        if settings.storage_mode is StorageMode.NATIVE
        else StorageMode.TIMESCALE
        if tsdb
        else StorageMode.NATIVE
    )
    done = {version for version, _, _ in applied}
    pending = [f"{m.version:04d}_{m.name}" for m in migration_files(planned_mode) if m.version not in done]
    return DatabaseStatus(server, mode, str(tsdb) if tsdb else None, applied, pending)
