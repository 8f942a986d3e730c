"""Operator actions and silences on a real database: every lifecycle transition, allowed or refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn, connection
from cityops.model import Domain
from rules.actions import (
    Action,
    ActionRequest,
    AlertNotFoundError,
    AlertTransitionError,
    act,
    expire_shelves,
)
from rules.conditions import Status
from rules.evaluator import DeviceInfo, Signal
from rules.spec import RuleSpec, parse_rules
from rules.store import AlertStore

S = 1_000_000
T0 = datetime(2026, 7, 1, 12, tzinfo=UTC)
DEVICE = DeviceInfo(1, "pd-1", "water", "ponding_gauge", Domain.DRAINAGE, "tianhe")


@pytest.fixture
def rules(catalogue: Catalogue) -> dict[str, RuleSpec]:
    (spec,) = parse_rules(
        [
            {
                "name": "ponding",
                "severity": "high",
                "source": "test",
                "condition": {"type": "threshold", "metric": "ponding_depth", "op": ">=", "value": 15},
            }
        ],
        catalogue,
    )
    return {spec.name: spec}


def signal(status: Status, at: datetime, value: float = 20.0) -> Signal:
    return Signal("ponding", "pd-1", "pd-1", status, value, "ponding_depth", int(at.timestamp() * S))


async def open_alert(conn: AsyncConn, rules: dict[str, RuleSpec], status: Status = Status.FIRING) -> int:
    (t,) = await AlertStore().apply(conn, [signal(status, T0)], rules, {"pd-1": DEVICE})
    return t.alert_id


async def state_of(conn: AsyncConn, alert_id: int) -> str:
    cur = await conn.execute("SELECT state FROM alerts WHERE id = %s", (alert_id,))
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


LATER = T0 + timedelta(hours=1)
# (states to walk the alert through first, the action, the state it ends in, or None: refused)
LIFECYCLE = [
    ([], Action.ACKNOWLEDGE, "acknowledged"),
    (["pending"], Action.ACKNOWLEDGE, "acknowledged"),
    ([], Action.RESOLVE, "resolved"),
    ([Action.ACKNOWLEDGE], Action.RESOLVE, "resolved"),
    ([], Action.SHELVE, "shelved"),
    ([Action.ACKNOWLEDGE], Action.SHELVE, "shelved"),
    ([Action.SHELVE], Action.UNSHELVE, "firing"),
    ([Action.ACKNOWLEDGE, Action.SHELVE], Action.UNSHELVE, "acknowledged"),
    ([Action.SHELVE], Action.ACKNOWLEDGE, "acknowledged"),
    ([Action.SHELVE], Action.RESOLVE, "resolved"),
    ([], Action.ASSIGN, "firing"),
    ([], Action.COMMENT, "firing"),
    ([Action.RESOLVE], Action.COMMENT, "resolved"),
    ([Action.ACKNOWLEDGE], Action.ACKNOWLEDGE, None),
    ([Action.RESOLVE], Action.ACKNOWLEDGE, None),
    ([Action.RESOLVE], Action.RESOLVE, None),
    ([Action.RESOLVE], Action.SHELVE, None),
    ([], Action.UNSHELVE, None),
    ([Action.SHELVE], Action.SHELVE, None),
]


def request(action: Action) -> ActionRequest:
    return ActionRequest(
        action,
        "operator-7",
        until=LATER if action is Action.SHELVE else None,
        assignee="crew-3" if action is Action.ASSIGN else None,
        comment="pump truck on its way" if action is Action.COMMENT else None,
    )


@pytest.mark.parametrize(("before", "action", "after"), LIFECYCLE)
async def test_lifecycle_transition(
    migrated_conn: AsyncConn,
    rules: dict[str, RuleSpec],
    before: list[Action | str],
    action: Action,
    after: str | None,
) -> None:
    pending = before == ["pending"]
    alert_id = await open_alert(migrated_conn, rules, Status.PENDING if pending else Status.FIRING)
    for step in [b for b in before if isinstance(b, Action)]:
        await act(migrated_conn, alert_id, request(step), T0)
    state_before = await state_of(migrated_conn, alert_id)
    if after is None:
        with pytest.raises(
            AlertTransitionError, match=f"cannot {action.value} an alert that is {state_before}"
        ):
            await act(migrated_conn, alert_id, request(action), T0)
        assert await state_of(migrated_conn, alert_id) == state_before
        return
    t = await act(migrated_conn, alert_id, request(action), T0)
    assert (t.from_state, t.to_state) == (state_before, after)
    assert await state_of(migrated_conn, alert_id) == after
    cur = await migrated_conn.execute(
        "SELECT kind, from_state, to_state, actor, detail FROM alert_events WHERE id = %s", (t.event_id,)
    )
    kind, from_state, to_state, actor, detail = await cur.fetchone()  # type: ignore[misc]
    assert (from_state, to_state, actor) == (state_before, after, "operator-7")
    assert kind == t.kind
    if action is Action.ASSIGN:
        assert detail == {"assignee": "crew-3"}
    if action is Action.COMMENT:
        assert detail == {"comment": "pump truck on its way"}


async def test_actions_notify_and_are_scoped_by_tenant(
    migrated_conn: AsyncConn, database_url: str, rules: dict[str, RuleSpec]
) -> None:
    alert_id = await open_alert(migrated_conn, rules)
    with pytest.raises(AlertNotFoundError):
        await act(migrated_conn, alert_id, request(Action.ACKNOWLEDGE), T0, tenants={"gas"})
    with pytest.raises(AlertNotFoundError):
        await act(migrated_conn, alert_id + 1000, request(Action.ACKNOWLEDGE), T0)
    async with connection(database_url, autocommit=True) as listener:
        await listener.execute("LISTEN cityops_alerts")
        t = await act(migrated_conn, alert_id, request(Action.ACKNOWLEDGE), T0, tenants={"water"})
        (heard,) = [orjson.loads(n.payload) async for n in listener.notifies(timeout=10, stop_after=1)]
    assert heard == {
        "event_id": t.event_id,
        "alert_id": alert_id,
        "kind": "acknowledged",
        "state": "acknowledged",
    }


async def test_shelve_needs_a_future_time_and_comment_needs_text(
    migrated_conn: AsyncConn, rules: dict[str, RuleSpec]
) -> None:
    alert_id = await open_alert(migrated_conn, rules)
    with pytest.raises(AlertTransitionError, match="until"):
        await act(migrated_conn, alert_id, ActionRequest(Action.SHELVE, "op", until=T0), T0)
    with pytest.raises(AlertTransitionError, match="comment"):
        await act(migrated_conn, alert_id, ActionRequest(Action.COMMENT, "op", comment="  "), T0)


async def test_shelves_expire_by_the_injected_clock(
    migrated_conn: AsyncConn, rules: dict[str, RuleSpec]
) -> None:
    alert_id = await open_alert(migrated_conn, rules)
    await act(migrated_conn, alert_id, request(Action.SHELVE), T0)
    assert await expire_shelves(migrated_conn, LATER - timedelta(seconds=1)) == []
    (t,) = await expire_shelves(migrated_conn, LATER)
    assert (t.alert_id, t.kind, t.to_state) == (alert_id, "unshelved", "firing")
    assert await state_of(migrated_conn, alert_id) == "firing"


async def test_rules_update_but_never_undo_an_acknowledgement(
    migrated_conn: AsyncConn, rules: dict[str, RuleSpec]
) -> None:
    store, devices = AlertStore(), {"pd-1": DEVICE}
    alert_id = await open_alert(migrated_conn, rules)
    await act(migrated_conn, alert_id, request(Action.ACKNOWLEDGE), T0)
    assert await store.apply(migrated_conn, [signal(Status.FIRING, LATER, 30)], rules, devices) == []
    cur = await migrated_conn.execute(
        "SELECT state, count, last_value FROM alerts WHERE id = %s", (alert_id,)
    )
    assert await cur.fetchone() == ("acknowledged", 2, 30.0)
    (t,) = await store.apply(migrated_conn, [signal(Status.INACTIVE, LATER, 3)], rules, devices)
    assert (t.kind, t.from_state, t.to_state) == ("resolved", "acknowledged", "resolved")


async def test_an_alert_opened_under_a_matching_silence_is_recorded_as_silenced(
    migrated_conn: AsyncConn, database_url: str, rules: dict[str, RuleSpec]
) -> None:
    await migrated_conn.execute(
        "INSERT INTO silences (tenant, matchers, starts_at, ends_at, created_by, comment) "
        "VALUES ('water', '{\"district\": \"tianhe\", \"rule\": \"ponding\"}', %s, %s, 'op', 'drain works')",
        (T0 - timedelta(minutes=5), T0 + timedelta(minutes=30)),
    )
    await migrated_conn.execute(
        "INSERT INTO silences (tenant, matchers, starts_at, ends_at, created_by) "
        "VALUES ('water', '{\"district\": \"haizhu\"}', %s, %s, 'op')",
        (T0 - timedelta(minutes=5), T0 + timedelta(hours=5)),
    )
    store, devices = AlertStore(), {"pd-1": DEVICE}
    async with connection(database_url, autocommit=True) as listener:
        await listener.execute("LISTEN cityops_alerts")
        (silenced,) = await store.apply(migrated_conn, [signal(Status.FIRING, T0)], rules, devices)
        await store.apply(migrated_conn, [signal(Status.INACTIVE, T0 + timedelta(minutes=1))], rules, devices)
        # Past the silence's end (and the flap window): a new alert, not silenced.
        (loud,) = await store.apply(
            migrated_conn, [signal(Status.FIRING, T0 + timedelta(hours=2))], rules, devices
        )
        heard = [orjson.loads(n.payload) async for n in listener.notifies(timeout=10, stop_after=3)]
    assert silenced.silenced and not loud.silenced and loud.alert_id != silenced.alert_id
    assert [h.get("silenced", False) for h in heard] == [True, False, False]
    cur = await migrated_conn.execute("SELECT silence_id IS NOT NULL FROM alerts ORDER BY id")
    assert await cur.fetchall() == [(True,), (False,)]
