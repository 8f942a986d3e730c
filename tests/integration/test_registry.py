"""Device import into a real database: all or nothing, idempotent, parents linked."""

from __future__ import annotations

import pytest

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn
from cityops.errors import ImportFileError
from cityops.registry import FileFormat, import_fleet, list_devices, parse_fleet

FLEET = """external_id,tenant,kind,name,lat,lon,district,tags,parent
gw-tianhe-1,water,edge_gateway,Tianhe gateway,23.13,113.36,tianhe,,
pl-001,water,pressure_logger,Zhujiang New Town,23.12,113.32,tianhe,dma=ZJ01,gw-tianhe-1
pd-001,water,ponding_gauge,Tiyu West underpass,23.14,113.32,tianhe,,gw-tianhe-1
"""


async def test_import_then_reimport_then_update(migrated_conn: AsyncConn, catalogue: Catalogue) -> None:
    specs = parse_fleet(FLEET, FileFormat.CSV, catalogue)
    first = await import_fleet(migrated_conn, specs)
    assert (first.created, first.updated, first.unchanged) == (3, 0, 0)
    again = await import_fleet(migrated_conn, specs)
    assert (again.created, again.updated, again.unchanged) == (0, 0, 3)
    renamed = parse_fleet(FLEET.replace("Zhujiang New Town", "ZNT logger"), FileFormat.CSV, catalogue)
    third = await import_fleet(migrated_conn, renamed)
    assert (third.created, third.updated, third.unchanged) == (0, 1, 2)

    devices = {d.external_id: d for d in await list_devices(migrated_conn)}
    assert devices["pl-001"].name == "ZNT logger" and devices["pl-001"].parent == "gw-tianhe-1"
    assert devices["pl-001"].tags == {"dma": "ZJ01"} and devices["gw-tianhe-1"].parent is None
    assert [d.external_id for d in await list_devices(migrated_conn, kind="ponding_gauge")] == ["pd-001"]
    assert await list_devices(migrated_conn, tenant="gas") == []


async def test_unknown_parent_imports_nothing(migrated_conn: AsyncConn, catalogue: Catalogue) -> None:
    text = FLEET.replace(",gw-tianhe-1\n", ",gw-nowhere\n", 1)
    specs = parse_fleet(text, FileFormat.CSV, catalogue)
    with pytest.raises(ImportFileError, match="gw-nowhere"):
        await import_fleet(migrated_conn, specs)
    assert await list_devices(migrated_conn) == []


async def test_parent_already_registered(migrated_conn: AsyncConn, catalogue: Catalogue) -> None:
    gateway, *children = FLEET.splitlines(keepends=True)[1:]
    header = FLEET.splitlines(keepends=True)[0]
    await import_fleet(migrated_conn, parse_fleet(header + gateway, FileFormat.CSV, catalogue))
    await import_fleet(migrated_conn, parse_fleet(header + "".join(children), FileFormat.CSV, catalogue))
    parents = {d.external_id: d.parent for d in await list_devices(migrated_conn)}
    assert parents == {"gw-tianhe-1": None, "pl-001": "gw-tianhe-1", "pd-001": "gw-tianhe-1"}
