"""What operators do to alerts: acknowledge, resolve, shelve until a time, unshelve, assign, comment.

Each action is one transaction that locks the alert, checks the transition is allowed from its
current state, updates it, appends to ``alert_events`` and sends ``NOTIFY cityops_alerts``. Shelved
alerts whose time is up come back through :func:`expire_shelves` (the pipeline's rule ticker calls
it with the injected clock).

    pending ──► firing ──► acknowledged ──► resolved
       │          │             │              ▲
       └──────────┴─────► shelved (until) ─────┘      (any open state can be resolved)
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from cityops.db.connection import AsyncConn
from cityops.errors import CityopsError
from cityops.model import AlertState
from rules.store import Transition, notify, record_event


class AlertNotFoundError(CityopsError):
    """No such alert (or none the caller's tenant scope can see)."""


class AlertTransitionError(CityopsError):
    """The action is not allowed from the alert's current state; the message says which state."""


class Action(StrEnum):
    ACKNOWLEDGE = "acknowledge"
    RESOLVE = "resolve"
    SHELVE = "shelve"
    UNSHELVE = "unshelve"
    ASSIGN = "assign"
    COMMENT = "comment"


_OPEN = frozenset({AlertState.PENDING, AlertState.FIRING, AlertState.ACKNOWLEDGED, AlertState.SHELVED})
# From which states each action may start; assign and comment do not change the state.
ALLOWED_FROM: dict[Action, frozenset[AlertState]] = {
    Action.ACKNOWLEDGE: frozenset({AlertState.PENDING, AlertState.FIRING, AlertState.SHELVED}),
    Action.RESOLVE: _OPEN,
    Action.SHELVE: frozenset({AlertState.PENDING, AlertState.FIRING, AlertState.ACKNOWLEDGED}),
    Action.UNSHELVE: frozenset({AlertState.SHELVED}),
    Action.ASSIGN: frozenset(AlertState),
    Action.COMMENT: frozenset(AlertState),
}
_EVENT_KIND = {
    Action.ACKNOWLEDGE: "acknowledged",
    Action.RESOLVE: "resolved",
    Action.SHELVE: "shelved",
    Action.UNSHELVE: "unshelved",
    Action.ASSIGN: "assigned",
    Action.COMMENT: "commented",
}


@dataclass(frozen=True, slots=True)
class ActionRequest:
    action: Action
    actor: str
    until: datetime | None = None  # shelve
    assignee: str | None = None  # assign (None unassigns)
    comment: str | None = None  # comment; a note on any other action


async def act(
    conn: AsyncConn,
    alert_id: int,
    request: ActionRequest,
    now: datetime,
    tenants: Collection[str] | None = None,
) -> Transition:
    """Apply ``request`` to an alert within ``tenants`` (None: any tenant); the transition it made."""
    _check_arguments(request, now)
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT state, acknowledged_at IS NOT NULL, tenant FROM alerts WHERE id = %s FOR UPDATE",
            (alert_id,),
        )
        row = await cur.fetchone()
        if row is None or (tenants is not None and row[2] not in tenants):
            raise AlertNotFoundError(f"alert {alert_id} not found")
        before = AlertState(row[0])
        if before not in ALLOWED_FROM[request.action]:
            raise AlertTransitionError(f"cannot {request.action.value} an alert that is {before.value}")
        after = await _apply(conn, alert_id, request, before, bool(row[1]), now)
        detail: dict[str, object] = {}
        if request.until is not None:
            detail["until"] = request.until.isoformat()
        if request.action is Action.ASSIGN:
            detail["assignee"] = request.assignee
        if request.comment:
            detail["comment"] = request.comment
        kind = _EVENT_KIND[request.action]
        event_id = await record_event(
            conn, alert_id, kind, before.value, after.value, request.actor, detail, now
        )
        transition = Transition(event_id, alert_id, kind, before.value, after.value)
        await notify(conn, [transition])
    return transition


def _check_arguments(request: ActionRequest, now: datetime) -> None:
    if request.action is Action.SHELVE and (request.until is None or request.until <= now):
        raise AlertTransitionError("shelve needs `until` in the future")
    if request.action is Action.COMMENT and not (request.comment or "").strip():
        raise AlertTransitionError("comment needs a non-empty `comment`")


async def _apply(
    conn: AsyncConn,
    alert_id: int,
    request: ActionRequest,
    before: AlertState,
    was_acknowledged: bool,
    now: datetime,
) -> AlertState:
    action = request.action
    if action is Action.ACKNOWLEDGE:
        await conn.execute(
            "UPDATE alerts SET state = 'acknowledged', acknowledged_at = %s, acknowledged_by = %s, "
            "shelved_until = NULL, updated_at = now() WHERE id = %s",
            (now, request.actor, alert_id),
        )
        return AlertState.ACKNOWLEDGED
    if action is Action.RESOLVE:
        await conn.execute(
            "UPDATE alerts SET state = 'resolved', resolved_at = %s, shelved_until = NULL, "
            "updated_at = now() "
            "WHERE id = %s",
            (now, alert_id),
        )
        return AlertState.RESOLVED
    if action is Action.SHELVE:
        await conn.execute(
            "UPDATE alerts SET state = 'shelved', shelved_until = %s, updated_at = now() WHERE id = %s",
            (request.until, alert_id),
        )
        return AlertState.SHELVED
    if action is Action.UNSHELVE:
        return await _unshelve(conn, alert_id, was_acknowledged)
    if action is Action.ASSIGN:
        await conn.execute(
            "UPDATE alerts SET assignee = %s, updated_at = now() WHERE id = %s", (request.assignee, alert_id)
        )
    return before


async def _unshelve(conn: AsyncConn, alert_id: int, was_acknowledged: bool) -> AlertState:
    """Back to where it was: acknowledged if someone had acknowledged it, firing otherwise."""
    state = AlertState.ACKNOWLEDGED if was_acknowledged else AlertState.FIRING
    await conn.execute(
        "UPDATE alerts SET state = %s, shelved_until = NULL, updated_at = now() WHERE id = %s",
        (state.value, alert_id),
    )
    return state


async def expire_shelves(conn: AsyncConn, now: datetime) -> list[Transition]:
    """Unshelve every alert whose shelving time is up (actor ``system``); one transaction."""
    transitions: list[Transition] = []
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT id, acknowledged_at IS NOT NULL FROM alerts "
            "WHERE state = 'shelved' AND shelved_until <= %s ORDER BY id FOR UPDATE SKIP LOCKED",
            (now,),
        )
        for alert_id, was_acknowledged in await cur.fetchall():
            after = await _unshelve(conn, alert_id, was_acknowledged)
            event_id = await record_event(
                conn,
                alert_id,
                "unshelved",
                "shelved",
                after.value,
                "system",
                {"reason": "shelve expired"},
                now,
            )
            transitions.append(Transition(event_id, alert_id, "unshelved", "shelved", after.value))
        await notify(conn, transitions)
    return transitions
