"""``/api/v1/devices`` (list, one, latest values) and ``/api/v1/dead-letters``, read-only."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from cityops.catalogue import Catalogue
from cityops.model import Domain, RejectReason
from control_api.deps import Conn, Now, Viewer, scope_sql
from control_api.problems import invalid, not_found

router = APIRouter(prefix="/api/v1", tags=["devices"])
MAX_LIMIT = 1000
# A device that has not reported for this long is stale; three times as long, offline.
STALE_AFTER = timedelta(minutes=15)
OFFLINE_AFTER = 3 * STALE_AFTER


class Presence(StrEnum):
    ONLINE = "online"
    STALE = "stale"
    OFFLINE = "offline"


class DeviceOut(BaseModel):
    id: str = Field(description="the device id devices publish under")
    tenant: str
    kind: str
    domain: Domain | None
    name: str
    lat: float | None
    lon: float | None
    district: str | None
    tags: dict[str, str]
    enabled: bool
    last_seen: datetime | None
    presence: Presence


class DevicePage(BaseModel):
    items: list[DeviceOut]
    next_cursor: str | None


class LatestValue(BaseModel):
    metric: str
    unit: str
    value: float
    time: datetime
    quality: int


class DeadLetterOut(BaseModel):
    id: int
    received_at: datetime
    topic: str
    device: str | None
    reason: str
    detail: str
    readings: int
    content_type: str | None
    payload_preview: str = Field(description="the first 200 bytes, decoded leniently")


class DeadLetterPage(BaseModel):
    items: list[DeadLetterOut]
    next_cursor: str | None


def presence_of(last_seen: datetime | None, now: datetime) -> Presence:
    if last_seen is None or now - last_seen >= OFFLINE_AFTER:
        return Presence.OFFLINE
    return Presence.STALE if now - last_seen >= STALE_AFTER else Presence.ONLINE


DEVICE_COLUMNS = "external_id, tenant, kind, name, lat, lon, district, tags, enabled, last_seen"


def device_of(row: tuple[Any, ...], catalogue: Catalogue, now: datetime) -> DeviceOut:
    ext, tenant, kind, name, lat, lon, district, tags, enabled, last_seen = row
    domain = catalogue.kinds[kind].domain if kind in catalogue.kinds else None
    return DeviceOut(
        id=ext, tenant=tenant, kind=kind, domain=domain, name=name, lat=lat, lon=lon, district=district,
        tags=tags, enabled=enabled, last_seen=last_seen, presence=presence_of(last_seen, now),
    )  # fmt: skip


@router.get("/devices", response_model=DevicePage, summary="List devices (keyset pagination by id)")
async def list_devices(
    request: Request,
    caller: Viewer,
    conn: Conn,
    at: Now,
    tenant: str | None = None,
    domain: Domain | None = None,
    kind: str | None = None,
    district: str | None = None,
    presence: Presence | None = None,
    bbox: Annotated[str | None, Query(description="min_lon,min_lat,max_lon,max_lat")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 200,
    cursor: Annotated[str | None, Query(description="the last id of the previous page")] = None,
) -> DevicePage:
    catalogue: Catalogue = request.app.state.catalogue
    scope, params = scope_sql(caller)
    where = [scope]
    if domain is not None:
        where.append("kind = ANY(%s)")
        params.append([k.name for k in catalogue.kinds.values() if k.domain is domain])
    for clause, value in (
        ("tenant = %s", tenant),
        ("kind = %s", kind),
        ("district = %s", district),
        ("external_id > %s", cursor),
    ):
        if value is not None:
            where.append(clause)
            params.append(value)
    if presence is not None:
        where.append(_presence_sql(presence))
        params += [at - STALE_AFTER, at - OFFLINE_AFTER][: 2 if presence is Presence.STALE else 1]
    if bbox is not None:
        where.append("lon BETWEEN %s AND %s AND lat BETWEEN %s AND %s")
        min_lon, min_lat, max_lon, max_lat = _bbox(bbox)
        params += [min_lon, max_lon, min_lat, max_lat]
    cur = await conn.execute(
        f"SELECT {DEVICE_COLUMNS} FROM devices WHERE {' AND '.join(where)} ORDER BY external_id LIMIT %s",
        [*params, limit + 1],
    )
    rows = await cur.fetchall()
    items = [device_of(r, catalogue, at) for r in rows[:limit]]
    return DevicePage(items=items, next_cursor=items[-1].id if len(rows) > limit else None)


def _presence_sql(presence: Presence) -> str:
    if presence is Presence.ONLINE:
        return "last_seen > %s"
    if presence is Presence.STALE:
        return "last_seen <= %s AND last_seen > %s"
    return "(last_seen IS NULL OR last_seen <= %s)"


def _bbox(text: str) -> tuple[float, float, float, float]:
    try:
        min_lon, min_lat, max_lon, max_lat = (float(p) for p in text.split(","))
    except ValueError:
        raise invalid(
            "bbox", "query", "four comma-separated numbers: min_lon,min_lat,max_lon,max_lat"
        ) from None
    if not (-180 <= min_lon <= max_lon <= 180 and -90 <= min_lat <= max_lat <= 90):
        raise invalid("bbox", "query", "out of range, or a minimum above its maximum")
    return min_lon, min_lat, max_lon, max_lat


@router.get("/devices/{device_id}", response_model=DeviceOut, summary="One device")
async def get_device(device_id: str, request: Request, caller: Viewer, conn: Conn, at: Now) -> DeviceOut:
    scope, params = scope_sql(caller)
    cur = await conn.execute(
        f"SELECT {DEVICE_COLUMNS} FROM devices WHERE external_id = %s AND {scope}", [device_id, *params]
    )
    row = await cur.fetchone()
    if row is None:
        raise not_found(f"device {device_id}")
    return device_of(row, request.app.state.catalogue, at)


@router.get(
    "/devices/{device_id}/latest", response_model=list[LatestValue], summary="Latest value per metric"
)
async def latest(device_id: str, request: Request, caller: Viewer, conn: Conn, at: Now) -> list[LatestValue]:
    device = await get_device(device_id, request, caller, conn, at)
    catalogue: Catalogue = request.app.state.catalogue
    metrics = (
        [catalogue.metrics[m] for m in catalogue.kinds[device.kind].metrics]
        if device.kind in catalogue.kinds
        else []
    )
    out = []
    for metric in metrics:  # one index probe per metric: the newest row of each series
        cur = await conn.execute(
            "SELECT r.value, r.time, r.quality FROM readings r JOIN devices d ON d.id = r.device_id "
            "WHERE d.external_id = %s AND r.metric_id = %s ORDER BY r.time DESC LIMIT 1",
            (device_id, metric.id),
        )
        row = await cur.fetchone()
        if row is not None:
            out.append(
                LatestValue(metric=metric.name, unit=metric.unit, value=row[0], time=row[1], quality=row[2])
            )
    return out


@router.get(
    "/dead-letters", response_model=DeadLetterPage, tags=["dead letters"], summary="Rejected messages"
)
async def dead_letters(
    caller: Viewer,
    conn: Conn,
    reason: Annotated[list[RejectReason] | None, Query()] = None,
    device: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    cursor: Annotated[int | None, Query(ge=1, description="the last id of the previous page")] = None,
) -> DeadLetterPage:
    # A dead letter belongs to a tenant through its device; one from an unknown device has none,
    # so only all-tenant keys see those.
    scope, params = scope_sql(caller, "d.tenant")
    where = [scope if caller.tenants is None else f"d.id IS NOT NULL AND {scope}"]
    for clause, value in (
        ("l.reason = ANY(%s)", [r.value for r in reason] if reason else None),
        ("l.device = %s", device),
        ("l.id < %s", cursor),
    ):
        if value is not None:
            where.append(clause)
            params.append(value)
    cur = await conn.execute(
        "SELECT l.id, l.received_at, l.topic, l.device, l.reason, l.detail, l.readings, l.content_type, "
        "substring(l.payload FROM 1 FOR 200) "
        "FROM dead_letters l LEFT JOIN devices d ON d.external_id = l.device "
        f"WHERE {' AND '.join(where)} ORDER BY l.id DESC LIMIT %s",
        [*params, limit + 1],
    )
    rows = await cur.fetchall()
    fields = ("id", "received_at", "topic", "device", "reason", "detail", "readings", "content_type")
    items = [
        DeadLetterOut(
            **dict(zip(fields, r[:8], strict=True)), payload_preview=bytes(r[8]).decode(errors="replace")
        )
        for r in rows[:limit]
    ]
    return DeadLetterPage(items=items, next_cursor=str(items[-1].id) if len(rows) > limit else None)
