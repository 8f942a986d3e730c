"""``/api/v1/readings``: series of one or more devices and metrics over a range, raw or bucketed.

A bucketed query is answered from the rollups where whole rollup buckets fit (``readings_1h`` for
buckets that are whole hours, ``readings_1m`` for whole minutes), re-aggregated exactly (an average
is the sum of sums over the sum of counts, ``last`` is the value with the latest time), and from raw
rows for the recent part the rollups may not hold yet. So the answer is the same either way.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from cityops.catalogue import Catalogue
from control_api.deps import Conn, Now, Viewer, scope_sql
from control_api.problems import Problem, invalid

router = APIRouter(prefix="/api/v1", tags=["readings"])

MAX_POINTS = 50_000  # per response, all series together
MAX_RANGE = timedelta(days=400)
MAX_SERIES = 100
# Rollups lag the raw rows by up to the refresh interval: the last stretch is read raw.
ROLLUP_LAG = timedelta(minutes=5)


class Bucket(StrEnum):
    RAW = "raw"
    M1 = "1m"
    M5 = "5m"
    M15 = "15m"
    H1 = "1h"
    H6 = "6h"
    D1 = "1d"

    @property
    def width(self) -> timedelta:
        return {
            "1m": timedelta(minutes=1), "5m": timedelta(minutes=5), "15m": timedelta(minutes=15),
            "1h": timedelta(hours=1), "6h": timedelta(hours=6), "1d": timedelta(days=1),
        }[self.value]  # fmt: skip


class Agg(StrEnum):
    AVG = "avg"
    MIN = "min"
    MAX = "max"
    SUM = "sum"
    COUNT = "count"
    LAST = "last"


class Series(BaseModel):
    device: str
    metric: str
    unit: str
    points: list[tuple[datetime, float]] = Field(description="[time, value] pairs, oldest first")


class ReadingsResponse(BaseModel):
    bucket: Bucket
    agg: Agg | None
    source: str = Field(description="raw, or the rollup the bucketed part came from")
    series: list[Series]


# Each part (raw rows, rollup rows) yields sum, count, min, max and the latest value per output
# bucket; the outer query combines the parts, so a bucket spanning both is still exact.
RAW_PART = (
    "SELECT device_id, metric_id, date_bin(%s, time, %s) AS t, sum(value) AS s, count(*) AS c, "
    "min(value) AS mn, max(value) AS mx, (array_agg(value ORDER BY time DESC))[1] AS l, max(time) AS lt "
    "FROM readings "
    "WHERE device_id = ANY(%s) AND metric_id = ANY(%s) AND time >= %s AND time < %s GROUP BY 1, 2, 3"
)
ROLLUP_PART = (
    "SELECT device_id, metric_id, date_bin(%s, bucket, %s) AS t, sum(sum) AS s, sum(count) AS c, "
    "min(min) AS mn, max(max) AS mx, (array_agg(last ORDER BY last_time DESC))[1] AS l, "
    "max(last_time) AS lt FROM {table} "
    "WHERE device_id = ANY(%s) AND metric_id = ANY(%s) AND bucket >= %s AND bucket < %s GROUP BY 1, 2, 3"
)
COMBINE = {
    Agg.AVG: "sum(s) / sum(c)", Agg.MIN: "min(mn)", Agg.MAX: "max(mx)", Agg.SUM: "sum(s)",
    Agg.COUNT: "sum(c)::float8", Agg.LAST: "(array_agg(l ORDER BY lt DESC))[1]",
}  # fmt: skip


@router.get("/readings", response_model=ReadingsResponse, summary="Series over a range, raw or bucketed")
async def readings(
    request: Request,
    caller: Viewer,
    conn: Conn,
    at: Now,
    device: Annotated[list[str], Query(min_length=1, description="repeat for several")],
    metric: Annotated[list[str], Query(min_length=1, description="repeat for several")],
    start: Annotated[datetime, Query(alias="from", description="ISO 8601, inclusive")],
    end: Annotated[datetime, Query(alias="to", description="ISO 8601, exclusive")],
    bucket: Bucket = Bucket.RAW,
    agg: Agg = Agg.AVG,
) -> ReadingsResponse:
    catalogue: Catalogue = request.app.state.catalogue
    _check_range(start, end)
    unknown = [m for m in metric if m not in catalogue.metrics]
    if unknown:
        raise invalid("metric", "query", f"unknown metric(s): {', '.join(unknown)}")
    if len(device) * len(metric) > MAX_SERIES:
        raise invalid("device", "query", f"at most {MAX_SERIES} series (devices × metrics) per request")
    ids = await _visible_devices(conn, caller, device)
    metric_ids = {catalogue.metrics[m].id: m for m in metric}
    if bucket is Bucket.RAW:
        rows, source = await _raw(conn, list(ids), list(metric_ids), start, end), "raw"
    else:
        _check_points(len(ids) * len(metric_ids), start, end, bucket)
        rows, source = await _bucketed(conn, list(ids), list(metric_ids), start, end, bucket, agg, at)
    series: dict[tuple[int, int], list[tuple[datetime, float]]] = {}
    for device_id, metric_id, time, value in rows:
        series.setdefault((device_id, metric_id), []).append((time, value))
    return ReadingsResponse(
        bucket=bucket,
        agg=None if bucket is Bucket.RAW else agg,
        source=source,
        series=[
            Series(
                device=ids[d], metric=metric_ids[m], unit=catalogue.metrics[metric_ids[m]].unit, points=points
            )
            for (d, m), points in sorted(series.items())
        ],
    )


def _check_range(start: datetime, end: datetime) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise invalid("from", "query", "times need a UTC offset (e.g. +08:00 or Z)")
    if end <= start:
        raise invalid("to", "query", "must be after `from`")
    if end - start > MAX_RANGE:
        raise invalid("to", "query", f"a range is at most {MAX_RANGE.days} days")


def _check_points(series: int, start: datetime, end: datetime, bucket: Bucket) -> None:
    points = series * -(-(end - start) // bucket.width)
    if points > MAX_POINTS:
        raise Problem(
            422, "too-many-points", "Too many points",
            f"{points} points asked for, at most {MAX_POINTS}: a larger bucket, shorter range, fewer series",
        )  # fmt: skip


async def _visible_devices(conn: Conn, caller: Viewer, devices: list[str]) -> dict[int, str]:
    scope, params = scope_sql(caller)
    cur = await conn.execute(
        f"SELECT id, external_id FROM devices WHERE external_id = ANY(%s) AND {scope}", [devices, *params]
    )
    found: dict[int, str] = dict(await cur.fetchall())
    missing = sorted(set(devices) - set(found.values()))
    if missing:
        raise Problem(404, "not-found", "Not found", f"device(s) not found: {', '.join(missing)}")
    return found


async def _raw(
    conn: Conn, devices: list[int], metrics: list[int], start: datetime, end: datetime
) -> list[Any]:
    cur = await conn.execute(
        "SELECT device_id, metric_id, time, value FROM readings "
        "WHERE device_id = ANY(%s) AND metric_id = ANY(%s) AND time >= %s AND time < %s "
        "ORDER BY device_id, metric_id, time LIMIT %s",
        (devices, metrics, start, end, MAX_POINTS + 1),
    )
    rows = await cur.fetchall()
    if len(rows) > MAX_POINTS:
        raise Problem(
            422, "too-many-points", "Too many points",
            f"more than {MAX_POINTS} raw readings in the range: ask for a bucket (1m, 1h, …), or less time",
        )  # fmt: skip
    return rows


def _rollup_for(bucket: Bucket) -> tuple[str, timedelta] | None:
    width = bucket.width
    if width % timedelta(hours=1) == timedelta(0):
        return "readings_1h", timedelta(hours=1)
    if width % timedelta(minutes=1) == timedelta(0):
        return "readings_1m", timedelta(minutes=1)
    return None


async def _bucketed(
    conn: Conn,
    devices: list[int],
    metrics: list[int],
    start: datetime,
    end: datetime,
    bucket: Bucket,
    agg: Agg,
    now: datetime,
) -> tuple[list[Any], str]:
    """Buckets aligned to the Unix epoch: rollup rows for whole rollup buckets the rollup surely holds,
    raw rows for the partial bucket at the start and for the recent stretch."""
    origin = datetime(1970, 1, 1, tzinfo=start.tzinfo)
    rollup = _rollup_for(bucket)
    ranges: list[tuple[str, datetime, datetime]] = []
    if rollup is not None:
        table, step = rollup
        first = _ceil(start, step, origin)
        last = min(end, _floor(now - ROLLUP_LAG, step, origin))
        if first < last:
            ranges = [("raw", start, first), (table, first, last), ("raw", last, end)]
    if not ranges:
        ranges = [("raw", start, end)]
    parts, params = [], []
    for source, lo, hi in ranges:
        if lo >= hi:
            continue
        parts.append(RAW_PART if source == "raw" else ROLLUP_PART.format(table=source))
        params += [bucket.width, origin, devices, metrics, lo, hi]
    sql = (
        f"SELECT device_id, metric_id, t, {COMBINE[agg]} FROM ({' UNION ALL '.join(parts)}) u "
        "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    )
    cur = await conn.execute(sql, params)
    used = [source for source, lo, hi in ranges if lo < hi and source != "raw"]
    return await cur.fetchall(), used[0] if used else "raw"


def _ceil(moment: datetime, width: timedelta, origin: datetime) -> datetime:
    floor = _floor(moment, width, origin)
    return floor if floor == moment else floor + width


def _floor(moment: datetime, width: timedelta, origin: datetime) -> datetime:
    return origin + ((moment - origin) // width) * width
