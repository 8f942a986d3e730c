"""``/api/v1/devices`` (list, one, latest values) and ``/api/v1/dead-letters``, read-only."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

import orjson
import psycopg
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from cityops.apikeys import Principal
from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn
from cityops.model import Domain, RejectReason
from cityops.settings import BrokerAdmin, Settings
from cityops.topics import Topics
from control_api.broker_accounts import BrokerAdminError, DynsecAdmin
from control_api.deps import Admin, Conn, Now, Viewer, scope_sql
from control_api.problems import Problem, invalid, not_found

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


# --- provisioning (admins) ----------------------------------------------------------------------------
class Credentials(BaseModel):
    mqtt_url: str | None
    username: str
    password: str = Field(description="shown once: only a hash is kept")
    publish_under: str
    commands_on: str


class Provisioned(DeviceOut):
    credentials: Credentials | None = Field(
        description="null when the broker has no account API (broker_admin=none)"
    )


class DeviceCreate(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    tenant: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$")
    kind: str
    name: str = Field(min_length=1, max_length=200)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    district: str | None = Field(default=None, max_length=100)
    tags: dict[str, str] = Field(default_factory=dict)


class DeviceUpdate(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    district: str | None = Field(default=None, max_length=100)
    tags: dict[str, str] | None = None


def _broker(request: Request) -> DynsecAdmin | None:
    settings: Settings = request.app.state.settings
    if settings.broker_admin is BrokerAdmin.NONE:
        return None
    url = settings.broker_admin_url or request.app.state.mqtt_url
    if not url:
        raise Problem(503, "broker-unavailable", "Broker unavailable", "no broker to create the account on",
                      headers={"Retry-After": "2"})  # fmt: skip
    return DynsecAdmin(url, Topics(settings.topic_root))


@router.post(
    "/devices",
    response_model=Provisioned,
    status_code=201,
    summary="Register a device, issue its credentials",
)
async def create_device(
    body: DeviceCreate, request: Request, caller: Admin, conn: Conn, at: Now
) -> Provisioned:
    catalogue: Catalogue = request.app.state.catalogue
    settings: Settings = request.app.state.settings
    if caller.tenants is not None and body.tenant not in caller.tenants:
        raise Problem(403, "forbidden", "Forbidden", f"this key cannot manage tenant {body.tenant!r}")
    if body.kind not in catalogue.kinds:
        raise invalid("kind", "body", f"unknown device kind {body.kind!r}")
    broker = _broker(request)
    password = secrets.token_urlsafe(24) if broker else None
    async with conn.transaction():
        try:
            await conn.execute(
                "INSERT INTO devices "
                "(external_id, tenant, kind, name, lat, lon, district, tags, credentials_hash) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (body.id, body.tenant, body.kind, body.name, body.lat, body.lon, body.district,
                 orjson.dumps(body.tags).decode(), _hash(password) if password else None),
            )  # fmt: skip
        except psycopg.errors.UniqueViolation:
            raise Problem(409, "conflict", "Conflict", f"device {body.id} exists") from None
        # Inside the transaction: if the broker refuses, the device is not registered either.
        if broker is not None and password is not None:
            try:
                await broker.create_device(body.id, password)
            except BrokerAdminError as exc:
                raise Problem(502, "broker-refused", "Broker refused", str(exc)) from None
        await _audit(conn, caller, "device.create", body.id, None, body.model_dump())
    device = await get_device(body.id, request, caller, conn, at)
    topics = Topics(settings.topic_root)
    credentials = (
        Credentials(
            mqtt_url=settings.device_mqtt_url or settings.mqtt_url,
            username=body.id,
            password=password,
            publish_under=topics.device_prefix(body.id),
            commands_on=topics.command(body.id, "+"),
        )
        if password
        else None
    )
    return Provisioned(**device.model_dump(), credentials=credentials)


@router.patch("/devices/{device_id}", response_model=DeviceOut, summary="Update a device's description")
async def update_device(
    device_id: str, body: DeviceUpdate, request: Request, caller: Admin, conn: Conn, at: Now
) -> DeviceOut:
    before = await get_device(device_id, request, caller, conn, at)
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        return before
    columns = ", ".join(f"{name} = %s" for name in changes)
    values = [orjson.dumps(v).decode() if name == "tags" else v for name, v in changes.items()]
    async with conn.transaction():
        await conn.execute(
            f"UPDATE devices SET {columns}, updated_at = now() WHERE external_id = %s", [*values, device_id]
        )
        await _audit(conn, caller, "device.update", device_id, before.model_dump(mode="json"), changes)
    return await get_device(device_id, request, caller, conn, at)


async def _set_enabled(
    device_id: str, enabled: bool, request: Request, caller: Principal, conn: AsyncConn, at: datetime
) -> DeviceOut:
    before = await get_device(device_id, request, caller, conn, at)
    broker = _broker(request)
    async with conn.transaction():
        await conn.execute(
            "UPDATE devices SET enabled = %s, updated_at = now() WHERE external_id = %s", (enabled, device_id)
        )
        if broker is not None:
            try:
                await broker.set_enabled(device_id, enabled)
            except BrokerAdminError as exc:
                raise Problem(502, "broker-refused", "Broker refused", str(exc)) from None
        await _audit(conn, caller, "device.enable" if enabled else "device.disable", device_id,
                     {"enabled": before.enabled}, {"enabled": enabled})  # fmt: skip
    return await get_device(device_id, request, caller, conn, at)


@router.post(
    "/devices/{device_id}/disable", response_model=DeviceOut, summary="Disable (revokes the broker account)"
)
async def disable_device(device_id: str, request: Request, caller: Admin, conn: Conn, at: Now) -> DeviceOut:
    return await _set_enabled(device_id, False, request, caller, conn, at)


@router.post("/devices/{device_id}/enable", response_model=DeviceOut, summary="Enable again")
async def enable_device(device_id: str, request: Request, caller: Admin, conn: Conn, at: Now) -> DeviceOut:
    return await _set_enabled(device_id, True, request, caller, conn, at)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def _audit(
    conn: AsyncConn, caller: Principal, action: str, object_id: str, before: object, after: object
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor, action, object_type, object_id, before, after) "
        "VALUES (%s, %s, 'device', %s, %s, %s)",
        (caller.actor, action, object_id, orjson.dumps(before).decode() if before is not None else None,
         orjson.dumps(after).decode()),
    )  # fmt: skip
