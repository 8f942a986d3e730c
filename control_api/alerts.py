"""``/api/v1/alerts``: list and filter, one alert with its history, and the operators' actions."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from cityops.apikeys import Principal
from cityops.db.connection import AsyncConn
from cityops.model import AlertState, Domain, Severity
from control_api.deps import Conn, Now, Operator, Viewer, scope_sql
from control_api.problems import invalid, not_found
from rules.actions import Action, ActionRequest, act

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])

MAX_LIMIT = 500
ALERT_COLUMNS = (
    "a.id, a.fingerprint, a.labels->>'rule', a.state, a.severity, a.tenant, a.labels, a.summary, a.evidence, "
    "a.count, a.flap_count, a.last_value, a.assignee, a.started_at, a.last_seen_at, a.acknowledged_at, "
    "a.acknowledged_by, a.resolved_at, a.shelved_until, a.silence_id"
)


class Alert(BaseModel):
    id: int
    fingerprint: str
    rule: str | None
    state: AlertState
    severity: Severity
    tenant: str
    labels: dict[str, str]
    summary: str
    evidence: dict[str, Any]
    count: int
    flap_count: int
    last_value: float | None
    assignee: str | None
    started_at: datetime
    last_seen_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    resolved_at: datetime | None
    shelved_until: datetime | None
    silenced: bool


class AlertEvent(BaseModel):
    id: int = Field(description="the live feed's event id")
    alert_id: int
    at: datetime
    kind: str
    from_state: str | None
    to_state: str | None
    actor: str | None
    detail: dict[str, Any]


class AlertDetail(Alert):
    events: list[AlertEvent]


class AlertPage(BaseModel):
    items: list[Alert]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


def alert_of(row: tuple[Any, ...]) -> Alert:
    (id_, fp, rule, state, severity, tenant, labels, summary, evidence, count, flaps, last, assignee,
     started, seen, acked_at, acked_by, resolved, shelved, silence) = row  # fmt: skip
    return Alert(
        id=id_, fingerprint=fp, rule=rule, state=state, severity=severity, tenant=tenant, labels=labels,
        summary=summary, evidence=evidence, count=count, flap_count=flaps, last_value=last, assignee=assignee,
        started_at=started, last_seen_at=seen, acknowledged_at=acked_at, acknowledged_by=acked_by,
        resolved_at=resolved, shelved_until=shelved, silenced=silence is not None,
    )  # fmt: skip


def _cursor(started: datetime, alert_id: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([started.isoformat(), alert_id])).decode().rstrip("=")


def _uncursor(cursor: str) -> tuple[datetime, int]:
    try:
        started, alert_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(started), int(alert_id)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise invalid("cursor", "query", "not a cursor this API gave out") from None


@dataclass
class AlertFilter:
    """The filters the alert list and both live feeds share (query parameters)."""

    state: Annotated[list[AlertState] | None, Query(description="repeat for several")] = None
    severity: Annotated[list[Severity] | None, Query(description="repeat for several")] = None
    tenant: str | None = None
    domain: Domain | None = None
    district: str | None = None
    device: str | None = None
    rule: str | None = None

    def where(self, caller: Principal) -> tuple[list[str], list[Any]]:
        """WHERE clauses (on ``alerts a``), scoped to the caller."""
        scope, params = scope_sql(caller, "a.tenant")
        where = [scope]
        for clause, value in (
            ("a.state = ANY(%s)", [s.value for s in self.state] if self.state else None),
            ("a.severity = ANY(%s)", [s.value for s in self.severity] if self.severity else None),
            ("a.tenant = %s", self.tenant),
            ("a.labels->>'domain' = %s", self.domain.value if self.domain else None),
            ("a.labels->>'district' = %s", self.district),
            ("a.labels->>'device' = %s", self.device),
            ("a.labels->>'rule' = %s", self.rule),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        return where, params


Filters = Annotated[AlertFilter, Depends()]


@router.get("", response_model=AlertPage, summary="List alerts, newest first")
async def list_alerts(
    caller: Viewer,
    conn: Conn,
    filters: Filters,
    since: Annotated[datetime | None, Query(description="started at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="started before")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    cursor: str | None = None,
) -> AlertPage:
    where, params = filters.where(caller)
    if since is not None:
        where.append("a.started_at >= %s")
        params.append(since)
    if until is not None:
        where.append("a.started_at < %s")
        params.append(until)
    if cursor is not None:
        started, alert_id = _uncursor(cursor)
        where.append("(a.started_at, a.id) < (%s, %s)")
        params += [started, alert_id]
    cur = await conn.execute(
        f"SELECT {ALERT_COLUMNS} FROM alerts a WHERE {' AND '.join(where)} "
        "ORDER BY a.started_at DESC, a.id DESC LIMIT %s",
        [*params, limit + 1],
    )
    rows = await cur.fetchall()
    items = [alert_of(r) for r in rows[:limit]]
    more = len(rows) > limit
    return AlertPage(items=items, next_cursor=_cursor(items[-1].started_at, items[-1].id) if more else None)


async def _visible_alert(conn: AsyncConn, caller: Principal, alert_id: int) -> Alert:
    scope, params = scope_sql(caller, "a.tenant")
    cur = await conn.execute(
        f"SELECT {ALERT_COLUMNS} FROM alerts a WHERE a.id = %s AND {scope}", [alert_id, *params]
    )
    row = await cur.fetchone()
    if row is None:
        raise not_found(f"alert {alert_id}")
    return alert_of(row)


@router.get("/{alert_id}", response_model=AlertDetail, summary="One alert and its history")
async def get_alert(alert_id: int, caller: Viewer, conn: Conn) -> AlertDetail:
    alert = await _visible_alert(conn, caller, alert_id)
    cur = await conn.execute(
        "SELECT id, alert_id, at, kind, from_state, to_state, actor, detail FROM alert_events "
        "WHERE alert_id = %s ORDER BY id",
        (alert_id,),
    )
    fields = ("id", "alert_id", "at", "kind", "from_state", "to_state", "actor", "detail")
    events = [AlertEvent(**dict(zip(fields, r, strict=True))) for r in await cur.fetchall()]
    return AlertDetail(**alert.model_dump(), events=events)


class ActionBody(BaseModel):
    comment: str | None = Field(default=None, max_length=2000, description="a note recorded with the action")


class ShelveBody(ActionBody):
    until: datetime = Field(description="when the alert comes back (ISO 8601, in the future)")


class AssignBody(ActionBody):
    assignee: str | None = Field(max_length=200, description="who handles it; null unassigns")


class CommentBody(BaseModel):
    comment: str = Field(min_length=1, max_length=2000)


async def _act(
    conn: AsyncConn, caller: Principal, alert_id: int, request: ActionRequest, at: datetime
) -> AlertDetail:
    async with conn.transaction():
        before = await _visible_alert(conn, caller, alert_id)
        transition = await act(conn, alert_id, request, at, caller.tenants)
        await conn.execute(
            "INSERT INTO audit_log (actor, action, object_type, object_id, before, after) "
            "VALUES (%s, %s, 'alert', %s, %s, %s)",
            (
                caller.actor,
                f"alert.{request.action.value}",
                str(alert_id),
                orjson.dumps({"state": before.state, "assignee": before.assignee}).decode(),
                orjson.dumps({"state": transition.to_state, "event_id": transition.event_id}).decode(),
            ),
        )
    return await get_alert(alert_id, caller, conn)


@router.post("/{alert_id}/ack", response_model=AlertDetail, summary="Acknowledge")
async def acknowledge(
    alert_id: int, caller: Operator, conn: Conn, at: Now, body: ActionBody | None = None
) -> AlertDetail:
    comment = body.comment if body else None
    return await _act(
        conn, caller, alert_id, ActionRequest(Action.ACKNOWLEDGE, caller.actor, comment=comment), at
    )


@router.post("/{alert_id}/resolve", response_model=AlertDetail, summary="Resolve by hand")
async def resolve(
    alert_id: int, caller: Operator, conn: Conn, at: Now, body: ActionBody | None = None
) -> AlertDetail:
    comment = body.comment if body else None
    return await _act(
        conn, caller, alert_id, ActionRequest(Action.RESOLVE, caller.actor, comment=comment), at
    )


@router.post("/{alert_id}/shelve", response_model=AlertDetail, summary="Shelve until a time")
async def shelve(alert_id: int, body: ShelveBody, caller: Operator, conn: Conn, at: Now) -> AlertDetail:
    request = ActionRequest(Action.SHELVE, caller.actor, until=body.until, comment=body.comment)
    return await _act(conn, caller, alert_id, request, at)


@router.post("/{alert_id}/unshelve", response_model=AlertDetail, summary="Unshelve")
async def unshelve(alert_id: int, caller: Operator, conn: Conn, at: Now) -> AlertDetail:
    return await _act(conn, caller, alert_id, ActionRequest(Action.UNSHELVE, caller.actor), at)


@router.post("/{alert_id}/assign", response_model=AlertDetail, summary="Assign (or unassign)")
async def assign(alert_id: int, body: AssignBody, caller: Operator, conn: Conn, at: Now) -> AlertDetail:
    request = ActionRequest(Action.ASSIGN, caller.actor, assignee=body.assignee, comment=body.comment)
    return await _act(conn, caller, alert_id, request, at)


@router.post("/{alert_id}/comment", response_model=AlertDetail, summary="Comment")
async def comment(alert_id: int, body: CommentBody, caller: Operator, conn: Conn, at: Now) -> AlertDetail:
    return await _act(
        conn, caller, alert_id, ActionRequest(Action.COMMENT, caller.actor, comment=body.comment), at
    )
