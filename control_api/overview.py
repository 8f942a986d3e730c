"""``/api/v1/overview`` (per domain and district) and ``/api/v1/map/devices.geojson`` (the ops map)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from cityops.catalogue import Catalogue
from control_api.deps import Conn, Now, Viewer, scope_sql
from control_api.devices import OFFLINE_AFTER, STALE_AFTER, presence_of

router = APIRouter(prefix="/api/v1", tags=["overview"])
SEVERITIES = ("critical", "high", "medium", "low", "informational")


class Cell(BaseModel):
    domain: str | None
    district: str | None
    devices: int
    online: int
    stale: int
    offline: int
    open_alerts: dict[str, int]


@router.get("/overview", response_model=list[Cell], summary="Devices and open alerts per domain and district")
async def overview(request: Request, caller: Viewer, conn: Conn, at: Now) -> list[Cell]:
    catalogue: Catalogue = request.app.state.catalogue
    kinds = [k.name for k in catalogue.kinds.values()]
    domains = [k.domain.value for k in catalogue.kinds.values()]
    scope, params = scope_sql(caller, "d.tenant")
    cur = await conn.execute(
        "SELECT k.domain, d.district, count(*), "
        "count(*) FILTER (WHERE d.last_seen > %s), "
        "count(*) FILTER (WHERE d.last_seen <= %s AND d.last_seen > %s) "
        "FROM devices d LEFT JOIN unnest(%s::text[], %s::text[]) AS k(kind, domain) ON k.kind = d.kind "
        f"WHERE {scope} GROUP BY 1, 2",
        [at - STALE_AFTER, at - STALE_AFTER, at - OFFLINE_AFTER, kinds, domains, *params],
    )
    cells: dict[tuple[str | None, str | None], Cell] = {}
    for domain, district, total, online, stale in await cur.fetchall():
        cells[(domain, district)] = Cell(
            domain=domain, district=district, devices=total, online=online, stale=stale,
            offline=total - online - stale, open_alerts={},
        )  # fmt: skip
    scope, params = scope_sql(caller, "tenant")
    cur = await conn.execute(
        "SELECT labels->>'domain', labels->>'district', severity, count(*) FROM alerts "
        f"WHERE state <> 'resolved' AND {scope} GROUP BY 1, 2, 3",
        params,
    )
    for domain, district, severity, count in await cur.fetchall():
        cell = cells.setdefault(
            (domain, district),
            Cell(domain=domain, district=district, devices=0, online=0, stale=0, offline=0, open_alerts={}),
        )
        cell.open_alerts[severity] = count
    return sorted(cells.values(), key=lambda c: (c.domain or "", c.district or ""))


@router.get(
    "/map/devices.geojson",
    summary="Devices with their presence and worst open alert, as GeoJSON",
    responses={200: {"content": {"application/geo+json": {}}}},
)
async def devices_geojson(request: Request, caller: Viewer, conn: Conn, at: Now) -> dict[str, Any]:
    catalogue: Catalogue = request.app.state.catalogue
    scope, params = scope_sql(caller, "d.tenant")
    rank = "array_position(%s::text[], a.severity)"
    cur = await conn.execute(
        "SELECT d.external_id, d.name, d.kind, d.tenant, d.district, d.lon, d.lat, d.last_seen, "
        "(SELECT a.severity FROM alerts a "
        f"WHERE a.state <> 'resolved' AND a.labels->>'device' = d.external_id ORDER BY {rank} LIMIT 1), "
        "(SELECT count(*) FROM alerts a WHERE a.state <> 'resolved' AND a.labels->>'device' = d.external_id) "
        f"FROM devices d WHERE d.lat IS NOT NULL AND d.lon IS NOT NULL AND {scope} ORDER BY d.external_id",
        [list(SEVERITIES), *params],
    )
    features = []
    for ext, name, kind, tenant, district, lon, lat, last_seen, worst, open_count in await cur.fetchall():
        domain = catalogue.kinds[kind].domain.value if kind in catalogue.kinds else None
        features.append({
            "type": "Feature",
            "id": ext,
            "geometry": {"type": "Point", "coordinates": [lon, lat]},
            "properties": {
                "name": name, "kind": kind, "domain": domain, "tenant": tenant, "district": district,
                "presence": presence_of(last_seen, at).value, "worst_open_alert": worst,
                "open_alerts": open_count,
            },
        })  # fmt: skip
    return {"type": "FeatureCollection", "features": features}
