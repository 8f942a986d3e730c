"""``/api/v1/rules`` (CRUD, enable/disable, validate, backtest) and ``/api/v1/silences``.

A rule row belongs to every tenant (``tenant`` null) or to one; keys see the rules of their tenants
and the shared ones, and admins scoped to tenants manage only their tenants' rules. Running
pipelines pick changes up at once (``NOTIFY cityops_rules``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

import orjson
import psycopg
from fastapi import APIRouter, Body, Request, Response
from pydantic import BaseModel, Field

from cityops.apikeys import Principal
from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn
from control_api.deps import Admin, Conn, Now, Operator, Viewer
from control_api.problems import Problem, invalid, not_found
from rules.backtest import backtest
from rules.repository import load_rule_table, rule_key
from rules.spec import RuleSpec, parse_rules

router = APIRouter(prefix="/api/v1", tags=["rules"])

BACKTEST_MAX_RANGE = timedelta(days=31)
BACKTEST_MAX_ROWS = 2_000_000
EXAMPLE_RULE = {
    "name": "ponding-20cm",
    "severity": "high",
    "source": "district drainage plan 2026",
    "selector": {"kinds": ["ponding_gauge"], "districts": ["tianhe"]},
    "condition": {"type": "threshold", "metric": "ponding_depth", "op": ">=", "value": 20, "clear": 15},
}


class RuleOut(BaseModel):
    id: int
    name: str
    tenant: str | None
    enabled: bool
    version: int
    spec: dict[str, Any]
    updated_at: datetime


class RuleIn(BaseModel):
    tenant: str | None = Field(default=None, description="the one tenant it applies to; null: every tenant")
    spec: dict[str, Any] = Field(
        description="a rule spec (see rules/packs for examples)", examples=[EXAMPLE_RULE]
    )


class Validation(BaseModel):
    valid: bool
    name: str


class BacktestIn(BaseModel):
    rules: list[int] = Field(default_factory=list, description="ids of installed rules")
    specs: list[dict[str, Any]] = Field(default_factory=list, description="rule specs not installed yet")
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    devices: list[str] | None = None
    resolution_s: float = Field(default=60.0, ge=1, le=3600)


class BacktestAlertOut(BaseModel):
    rule: str
    subject: str
    device: str | None
    severity: str
    started_at: datetime
    resolved_at: datetime | None
    fired: bool
    count: int
    flap_count: int
    last_value: float | None


class BacktestOut(BaseModel):
    readings: int
    alerts: list[BacktestAlertOut]


class SilenceIn(BaseModel):
    tenant: str | None = None
    matchers: dict[str, str] = Field(
        min_length=1,
        description="alert labels that must all match",
        examples=[{"district": "tianhe", "rule": "drainage-ponding-15cm"}],
    )
    starts_at: datetime
    ends_at: datetime
    comment: str = Field(default="", max_length=2000)


class SilenceOut(SilenceIn):
    id: int
    created_by: str


def _visible(caller: Principal) -> tuple[str, list[Any]]:
    if caller.tenants is None:
        return "TRUE", []
    return "(tenant IS NULL OR tenant = ANY(%s))", [sorted(caller.tenants)]


def _check_tenant(caller: Principal, tenant: str | None) -> None:
    """Scoped admins manage their tenants' rules and silences; shared ones need an all-tenant key."""
    if caller.tenants is not None and (tenant is None or tenant not in caller.tenants):
        raise Problem(
            403, "forbidden", "Forbidden", "a tenant-scoped key manages only its own tenants' rules"
        )


def _parse(spec: dict[str, Any], catalogue: Catalogue) -> RuleSpec:
    (parsed,) = parse_rules([spec], catalogue, origin="spec")
    return parsed


RULE_COLUMNS = "id, name, tenant, enabled, version, spec, updated_at"


def _rule(row: tuple[Any, ...]) -> RuleOut:
    return RuleOut(
        **dict(zip(("id", "name", "tenant", "enabled", "version", "spec", "updated_at"), row, strict=True))
    )


async def _get(conn: AsyncConn, caller: Principal, rule_id: int) -> RuleOut:
    scope, params = _visible(caller)
    cur = await conn.execute(
        f"SELECT {RULE_COLUMNS} FROM rules WHERE id = %s AND {scope}", [rule_id, *params]
    )
    row = await cur.fetchone()
    if row is None:
        raise not_found(f"rule {rule_id}")
    return _rule(row)


async def _audit(conn: AsyncConn, caller: Principal, action: str, kind: str, object_id: object,
                 before: object, after: object) -> None:  # fmt: skip
    await conn.execute(
        "INSERT INTO audit_log (actor, action, object_type, object_id, before, after) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (caller.actor, action, kind, str(object_id), _json(before), _json(after)),
    )


def _json(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return orjson.dumps(value).decode()


@router.get("/rules", response_model=list[RuleOut], summary="Rules the key can see")
async def list_rules(caller: Viewer, conn: Conn) -> list[RuleOut]:
    scope, params = _visible(caller)
    cur = await conn.execute(f"SELECT {RULE_COLUMNS} FROM rules WHERE {scope} ORDER BY name, id", params)
    return [_rule(r) for r in await cur.fetchall()]


@router.get("/rules/{rule_id}", response_model=RuleOut, summary="One rule")
async def get_rule(rule_id: int, caller: Viewer, conn: Conn) -> RuleOut:
    return await _get(conn, caller, rule_id)


@router.post("/rules/validate", response_model=Validation, summary="Check a rule spec without installing it")
async def validate(
    request: Request, caller: Viewer, spec: Annotated[dict[str, Any], Body(examples=[EXAMPLE_RULE])]
) -> Validation:
    parsed = _parse(spec, request.app.state.catalogue)
    return Validation(valid=True, name=parsed.name)


@router.post("/rules", response_model=RuleOut, status_code=201, summary="Install a rule")
async def create_rule(body: RuleIn, request: Request, caller: Admin, conn: Conn) -> RuleOut:
    _check_tenant(caller, body.tenant)
    spec = _parse(body.spec, request.app.state.catalogue)
    doc = spec.model_dump(mode="json", exclude={"name", "enabled"})
    async with conn.transaction():
        try:
            cur = await conn.execute(
                "INSERT INTO rules (name, tenant, enabled, spec, source) VALUES (%s, %s, %s, %s, %s) "
                f"RETURNING {RULE_COLUMNS}",
                (spec.name, body.tenant, spec.enabled, orjson.dumps(doc).decode(), spec.source),
            )
        except psycopg.errors.UniqueViolation:
            raise Problem(
                409, "conflict", "Conflict", f"a rule {rule_key(spec.name, body.tenant)!r} exists"
            ) from None
        row = await cur.fetchone()
        assert row is not None
        created = _rule(row)
        await _audit(conn, caller, "rule.create", "rule", created.id, None, created)
    return created


@router.put("/rules/{rule_id}", response_model=RuleOut, summary="Replace a rule's spec")
async def update_rule(rule_id: int, body: RuleIn, request: Request, caller: Admin, conn: Conn) -> RuleOut:
    before = await _get(conn, caller, rule_id)
    _check_tenant(caller, before.tenant)
    if body.tenant != before.tenant:
        raise invalid("tenant", "body", "a rule's tenant cannot change: create it under the other tenant")
    spec = _parse(body.spec, request.app.state.catalogue)
    doc = spec.model_dump(mode="json", exclude={"name", "enabled"})
    async with conn.transaction():
        try:
            cur = await conn.execute(
                "UPDATE rules SET name = %s, enabled = %s, spec = %s, source = %s, version = version + 1, "
                f"updated_at = now() WHERE id = %s RETURNING {RULE_COLUMNS}",
                (spec.name, spec.enabled, orjson.dumps(doc).decode(), spec.source, rule_id),
            )
        except psycopg.errors.UniqueViolation:
            raise Problem(
                409, "conflict", "Conflict", f"a rule {rule_key(spec.name, body.tenant)!r} exists"
            ) from None
        row = await cur.fetchone()
        assert row is not None
        after = _rule(row)
        await _audit(conn, caller, "rule.update", "rule", rule_id, before, after)
    return after


async def _set_enabled(conn: AsyncConn, caller: Principal, rule_id: int, enabled: bool) -> RuleOut:
    before = await _get(conn, caller, rule_id)
    _check_tenant(caller, before.tenant)
    async with conn.transaction():
        cur = await conn.execute(
            f"UPDATE rules SET enabled = %s, updated_at = now() WHERE id = %s RETURNING {RULE_COLUMNS}",
            (enabled, rule_id),
        )
        row = await cur.fetchone()
        assert row is not None
        after = _rule(row)
        await _audit(
            conn, caller, "rule.enable" if enabled else "rule.disable", "rule", rule_id, before, after
        )
    return after


@router.post("/rules/{rule_id}/enable", response_model=RuleOut, summary="Enable")
async def enable(rule_id: int, caller: Admin, conn: Conn) -> RuleOut:
    return await _set_enabled(conn, caller, rule_id, True)


@router.post("/rules/{rule_id}/disable", response_model=RuleOut, summary="Disable")
async def disable(rule_id: int, caller: Admin, conn: Conn) -> RuleOut:
    return await _set_enabled(conn, caller, rule_id, False)


@router.delete("/rules/{rule_id}", status_code=204, response_class=Response, summary="Delete")
async def delete_rule(rule_id: int, caller: Admin, conn: Conn) -> Response:
    before = await _get(conn, caller, rule_id)
    _check_tenant(caller, before.tenant)
    async with conn.transaction():
        await conn.execute("DELETE FROM rules WHERE id = %s", (rule_id,))
        await _audit(conn, caller, "rule.delete", "rule", rule_id, before, None)
    return Response(status_code=204)


@router.post(
    "/rules/backtest", response_model=BacktestOut, summary="What rules would have raised over a range"
)
async def run_backtest(body: BacktestIn, request: Request, caller: Viewer, conn: Conn) -> BacktestOut:
    catalogue: Catalogue = request.app.state.catalogue
    if body.end <= body.start:
        raise invalid("to", "body", "must be after `from`")
    if body.end - body.start > BACKTEST_MAX_RANGE:
        raise invalid("to", "body", f"a backtest covers at most {BACKTEST_MAX_RANGE.days} days")
    specs = [_parse(s, catalogue) for s in body.specs]
    if body.rules:
        table = await load_rule_table(conn, catalogue)
        by_id = {rule_id: table.specs[key] for key, rule_id in table.ids.items()}
        for rule_id in body.rules:
            await _get(conn, caller, rule_id)  # 404 outside the key's scope
            if rule_id not in by_id:
                raise invalid("rules", "body", f"rule {rule_id} does not validate any more: fix it first")
            specs.append(by_id[rule_id])
    if not specs:
        raise invalid("rules", "body", "give installed rule ids (`rules`) or rule specs (`specs`)")
    devices = await _scoped_devices(conn, caller, body.devices)
    result = await backtest(
        conn, specs, catalogue, body.start, body.end, devices=devices,
        resolution_s=body.resolution_s, max_rows=BACKTEST_MAX_ROWS,
    )  # fmt: skip
    return BacktestOut(
        readings=result.readings,
        alerts=[
            BacktestAlertOut(**{f: getattr(a, f) for f in BacktestAlertOut.model_fields})
            for a in result.alerts
        ],
    )


async def _scoped_devices(conn: AsyncConn, caller: Principal, wanted: list[str] | None) -> list[str] | None:
    if caller.tenants is None:
        return wanted
    cur = await conn.execute(
        "SELECT external_id FROM devices WHERE tenant = ANY(%s)", (sorted(caller.tenants),)
    )
    mine = [row[0] for row in await cur.fetchall()]
    return mine if wanted is None else [d for d in wanted if d in set(mine)]


# --- silences ------------------------------------------------------------------------------------
SILENCE_COLUMNS = "id, tenant, matchers, starts_at, ends_at, comment, created_by"


def _silence(row: tuple[Any, ...]) -> SilenceOut:
    fields = ("id", "tenant", "matchers", "starts_at", "ends_at", "comment", "created_by")
    return SilenceOut(**dict(zip(fields, row, strict=True)))


@router.get(
    "/silences", response_model=list[SilenceOut], tags=["silences"], summary="Silences in force or to come"
)
async def list_silences(caller: Viewer, conn: Conn, at: Now) -> list[SilenceOut]:
    scope, params = _visible(caller)
    cur = await conn.execute(
        f"SELECT {SILENCE_COLUMNS} FROM silences WHERE ends_at > %s AND {scope} ORDER BY starts_at, id",
        [at, *params],
    )
    return [_silence(r) for r in await cur.fetchall()]


@router.post(
    "/silences", response_model=SilenceOut, status_code=201, tags=["silences"], summary="Silence alerts"
)
async def create_silence(body: SilenceIn, caller: Operator, conn: Conn, at: Now) -> SilenceOut:
    if caller.tenants is not None and body.tenant not in caller.tenants:
        raise Problem(
            403, "forbidden", "Forbidden", "a tenant-scoped key silences only its own tenants' alerts"
        )
    if body.ends_at <= body.starts_at or body.ends_at <= at:
        raise invalid("ends_at", "body", "must be after starts_at and in the future")
    async with conn.transaction():
        cur = await conn.execute(
            "INSERT INTO silences (tenant, matchers, starts_at, ends_at, created_by, comment) "
            f"VALUES (%s, %s, %s, %s, %s, %s) RETURNING {SILENCE_COLUMNS}",
            (
                body.tenant,
                orjson.dumps(body.matchers).decode(),
                body.starts_at,
                body.ends_at,
                caller.actor,
                body.comment,
            ),
        )
        row = await cur.fetchone()
        assert row is not None
        created = _silence(row)
        await _audit(conn, caller, "silence.create", "silence", created.id, None, created)
    return created


@router.delete(
    "/silences/{silence_id}",
    status_code=204,
    response_class=Response,
    tags=["silences"],
    summary="End a silence",
)
async def expire_silence(silence_id: int, caller: Operator, conn: Conn, at: Now) -> Response:
    scope, params = _visible(caller)
    async with conn.transaction():
        # One that has begun ends now (it stays on record); one that has not begun goes away.
        cur = await conn.execute(
            f"UPDATE silences SET ends_at = %s WHERE id = %s AND starts_at < %s AND ends_at > %s AND {scope} "
            "RETURNING id",
            [at, silence_id, at, at, *params],
        )
        if await cur.fetchone() is None:
            cur = await conn.execute(
                f"DELETE FROM silences WHERE id = %s AND starts_at >= %s AND {scope} RETURNING id",
                [silence_id, at, *params],
            )
            if await cur.fetchone() is None:
                raise not_found(f"silence {silence_id}")
        await _audit(conn, caller, "silence.expire", "silence", silence_id, None, {"ends_at": at.isoformat()})
    return Response(status_code=204)
