"""The device registry: fleet files (CSV, JSON lines) and their import, all or nothing."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from pydantic import ValidationError

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn
from cityops.errors import ImportFileError
from cityops.model import Device, DeviceSpec

CSV_REQUIRED = ("external_id", "tenant", "kind", "name", "lat", "lon", "district")
CSV_OPTIONAL = ("tags", "parent", "enabled")


class FileFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"

    @classmethod
    def guess(cls, filename: str) -> FileFormat:
        lowered = filename.lower()
        return cls.JSONL if lowered.endswith((".jsonl", ".ndjson", ".json")) else cls.CSV


@dataclass(frozen=True, slots=True)
class ImportResult:
    created: int
    updated: int
    unchanged: int


def parse_fleet(text: str, fmt: FileFormat, catalogue: Catalogue) -> list[DeviceSpec]:
    """Every device of the file, or :class:`ImportFileError` listing every bad line by number."""
    problems: list[tuple[int, str]] = []
    numbered = _csv_records(text, problems) if fmt is FileFormat.CSV else _jsonl_records(text, problems)
    specs: list[tuple[int, DeviceSpec]] = []
    for line, record in numbered:
        try:
            spec = DeviceSpec.model_validate(record)
        except ValidationError as exc:
            problems.append((line, _describe(exc)))
            continue
        if spec.kind not in catalogue.kinds:
            problems.append((line, f"kind: unknown device kind {spec.kind!r}"))
            continue
        specs.append((line, spec))
    seen: dict[str, int] = {}
    for line, spec in specs:
        if spec.external_id in seen:
            problems.append(
                (line, f"external_id: {spec.external_id!r} already on line {seen[spec.external_id]}")
            )
        seen.setdefault(spec.external_id, line)
        if spec.parent == spec.external_id:
            problems.append((line, "parent: a device cannot be its own parent"))
    if problems:
        raise ImportFileError(sorted(problems))
    return [spec for _, spec in specs]


def _csv_records(text: str, problems: list[tuple[int, str]]) -> Iterable[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [h for h in CSV_REQUIRED if h not in header]
    unknown = [h for h in header if h not in CSV_REQUIRED + CSV_OPTIONAL]
    if missing or unknown:
        why = []
        if missing:
            why.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            why.append(f"unknown column(s) {', '.join(unknown)}")
        problems.append((1, "header: " + "; ".join(why)))
        return []
    reader.fieldnames = header
    records = []
    for row in reader:
        line = reader.line_num
        if None in row:
            problems.append((line, "more values than the header has columns"))
            continue
        if any(value is None for value in row.values()):
            problems.append((line, "fewer values than the header has columns"))
            continue
        if not any(value.strip() for value in row.values()):
            continue
        record: dict[str, Any] = {k: (v.strip() or None) for k, v in row.items()}
        try:
            record["tags"] = _parse_tags(record.get("tags"))
        except ValueError as exc:
            problems.append((line, f"tags: {exc}"))
            continue
        if record.get("enabled") is None:
            record.pop("enabled", None)
        records.append((line, record))
    return records


def _parse_tags(raw: str | None) -> dict[str, str]:
    """``key=value;key=value`` (the CSV form) or a JSON object."""
    if not raw:
        return {}
    if raw.startswith("{"):
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object: {exc}") from None
        if not isinstance(parsed, dict):
            raise ValueError("not a JSON object")
        return {str(k): str(v) for k, v in parsed.items()}
    tags = {}
    for part in raw.split(";"):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {part!r}")
        tags[key.strip()] = value.strip()
    return tags


def _jsonl_records(text: str, problems: list[tuple[int, str]]) -> Iterable[tuple[int, dict[str, Any]]]:
    records = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            problems.append((line, f"not JSON: {exc}"))
            continue
        if not isinstance(record, dict):
            problems.append((line, "not a JSON object"))
            continue
        records.append((line, record))
    return records


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "record"
        parts.append(f"{field}: {error['msg']}")
    return "; ".join(parts)


_UPSERT = """
INSERT INTO devices (external_id, tenant, kind, name, lat, lon, district, tags, enabled)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (external_id) DO UPDATE SET
    tenant = excluded.tenant, kind = excluded.kind, name = excluded.name, lat = excluded.lat,
    lon = excluded.lon, district = excluded.district, tags = excluded.tags, enabled = excluded.enabled,
    updated_at = now()
WHERE (devices.tenant, devices.kind, devices.name, devices.lat, devices.lon, devices.district,
       devices.tags, devices.enabled)
  IS DISTINCT FROM
      (excluded.tenant, excluded.kind, excluded.name, excluded.lat, excluded.lon, excluded.district,
       excluded.tags, excluded.enabled)
RETURNING (xmax = 0) AS created
"""


async def import_fleet(conn: AsyncConn, specs: list[DeviceSpec]) -> ImportResult:
    """Register or update every device in one transaction; parents may be in the file or the registry."""
    created = updated = 0
    async with conn.transaction(), conn.cursor() as cur:
        for spec in specs:
            await cur.execute(
                _UPSERT,
                (
                    spec.external_id,
                    spec.tenant,
                    spec.kind,
                    spec.name,
                    spec.lat,
                    spec.lon,
                    spec.district,
                    orjson.dumps(spec.tags).decode(),
                    spec.enabled,
                ),
            )
            row = await cur.fetchone()
            if row is not None:
                created += 1 if row[0] else 0
                updated += 0 if row[0] else 1
        parented = [(s.parent, s.external_id) for s in specs if s.parent]
        if parented:
            await cur.execute(
                "SELECT external_id FROM devices WHERE external_id = ANY(%s)", ([p for p, _ in parented],)
            )
            known = {r[0] for r in await cur.fetchall()}
            unknown = sorted({p for p, _ in parented} - known)
            if unknown:
                raise ImportFileError([(0, f"parent: unknown device(s) {', '.join(unknown)}")])
        await cur.execute(
            """
                UPDATE devices d SET parent_id = p.id, updated_at = now()
                FROM unnest(%s::text[], %s::text[]) AS link(child, parent)
                LEFT JOIN devices p ON p.external_id = link.parent
                WHERE d.external_id = link.child AND d.parent_id IS DISTINCT FROM p.id
                """,
            ([s.external_id for s in specs], [s.parent for s in specs]),
        )
    return ImportResult(created, updated, len(specs) - created - updated)


async def list_devices(
    conn: AsyncConn, *, tenant: str | None = None, kind: str | None = None, district: str | None = None
) -> list[Device]:
    cursor = await conn.execute(
        """
        SELECT d.id, d.external_id, d.tenant, d.kind, d.name, d.lat, d.lon, d.district, d.tags,
               p.external_id, d.enabled, d.last_seen, d.created_at, d.updated_at
        FROM devices d LEFT JOIN devices p ON p.id = d.parent_id
        WHERE (%(tenant)s::text IS NULL OR d.tenant = %(tenant)s)
          AND (%(kind)s::text IS NULL OR d.kind = %(kind)s)
          AND (%(district)s::text IS NULL OR d.district = %(district)s)
        ORDER BY d.external_id
        """,
        {"tenant": tenant, "kind": kind, "district": district},
    )
    return [
        Device(
            id=r[0],
            external_id=r[1],
            tenant=r[2],
            kind=r[3],
            name=r[4],
            lat=r[5],
            lon=r[6],
            district=r[7],
            tags=r[8],
            parent=r[9],
            enabled=r[10],
            last_seen=r[11],
            created_at=r[12],
            updated_at=r[13],
        )
        for r in await cursor.fetchall()
    ]
