from __future__ import annotations

from cityops.db.migrate import migration_files
from cityops.settings import StorageMode


def test_both_modes_have_every_version_in_order() -> None:
    native = migration_files(StorageMode.NATIVE)
    timescale = migration_files(StorageMode.TIMESCALE)
    assert [m.version for m in native] == [m.version for m in timescale] == sorted(m.version for m in native)
    assert native[0].version == 1


def test_mode_specific_files_differ_where_storage_differs() -> None:
    native = {m.version: m for m in migration_files(StorageMode.NATIVE)}
    timescale = {m.version: m for m in migration_files(StorageMode.TIMESCALE)}
    assert "PARTITION BY RANGE" in native[2].sql and "create_hypertable" in timescale[2].sql
    assert native[1].checksum == timescale[1].checksum
