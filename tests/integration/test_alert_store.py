"""The alert store on a real database: lifecycle, flapping, events, NOTIFY, and racing writers."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn, connection
from cityops.model import Domain
from rules.conditions import Status
from rules.evaluator import DeviceInfo, Signal
from rules.spec import RuleSpec, parse_rules
from rules.store import AlertStore

S = 1_000_000
DEVICE = DeviceInfo(1, "pd-1", "water", "ponding_gauge", Domain.DRAINAGE, "tianhe")


@pytest.fixture
def ponding(catalogue: Catalogue) -> dict[str, RuleSpec]:
    (spec,) = parse_rules(
        [
            {
                "name": "ponding",
                "severity": "high",
                "source": "test",
                "flap_window_s": 600,
                "message": "Ponding {value} cm at {device}",
                "condition": {"type": "threshold", "metric": "ponding_depth", "op": ">=", "value": 15},
            }
        ],
        catalogue,
    )
    return {spec.name: spec}


def signal(status: Status, at_s: float, value: float, observations: int = 1) -> Signal:
    return Signal(
        "ponding",
        "pd-1",
        "pd-1",
        status,
        value,
        "ponding_depth",
        int(1_763_700_000 * S + at_s * S),
        observations,
    )


async def alerts(conn: AsyncConn) -> list[tuple[object, ...]]:
    cur = await conn.execute("SELECT id, state, count, flap_count, last_value FROM alerts ORDER BY id")
    return await cur.fetchall()


async def test_lifecycle_with_repeat_and_flap(migrated_conn: AsyncConn, ponding: dict[str, RuleSpec]) -> None:
    store, devices = AlertStore(), {"pd-1": DEVICE}
    t = await store.apply(migrated_conn, [signal(Status.PENDING, 0, 15)], ponding, devices)
    assert [(x.kind, x.to_state) for x in t] == [("opened", "pending")]
    t = await store.apply(migrated_conn, [signal(Status.FIRING, 60, 18, 3)], ponding, devices)
    assert [(x.kind, x.from_state, x.to_state) for x in t] == [("firing", "pending", "firing")]
    assert (
        await store.apply(migrated_conn, [signal(Status.FIRING, 120, 22)], ponding, devices) == []
    )  # repeat
    (first,) = await alerts(migrated_conn)
    assert first[1:] == ("firing", 5, 0, 22.0)
    t = await store.apply(migrated_conn, [signal(Status.INACTIVE, 180, 10)], ponding, devices)
    assert [(x.kind, x.to_state) for x in t] == [("resolved", "resolved")]
    t = await store.apply(migrated_conn, [signal(Status.FIRING, 300, 17)], ponding, devices)  # within 600 s
    assert [(x.kind, x.alert_id) for x in t] == [("reopened", first[0])]
    assert (await alerts(migrated_conn))[0][1:4] == ("firing", 6, 1)
    await store.apply(migrated_conn, [signal(Status.INACTIVE, 400, 9)], ponding, devices)
    t = await store.apply(
        migrated_conn, [signal(Status.FIRING, 2000, 30.5)], ponding, devices
    )  # past the window
    assert [x.kind for x in t] == ["opened"] and t[0].alert_id != first[0]
    cur = await migrated_conn.execute(
        "SELECT summary, labels->>'district' FROM alerts WHERE id = %s", (t[0].alert_id,)
    )
    assert await cur.fetchone() == ("Ponding 30.5 cm at pd-1", "tianhe")


async def test_notify_carries_committed_events(
    migrated_conn: AsyncConn, database_url: str, ponding: dict[str, RuleSpec]
) -> None:
    async with connection(database_url, autocommit=True) as listener:
        await listener.execute("LISTEN cityops_alerts")
        store = AlertStore()
        opened = await store.apply(migrated_conn, [signal(Status.FIRING, 0, 20)], ponding, {"pd-1": DEVICE})
        resolved = await store.apply(
            migrated_conn, [signal(Status.INACTIVE, 60, 5)], ponding, {"pd-1": DEVICE}
        )
        heard = [orjson.loads(n.payload) async for n in listener.notifies(timeout=10, stop_after=2)]
    assert [(h["event_id"], h["kind"], h["state"]) for h in heard] == [
        (opened[0].event_id, "opened", "firing"),
        (resolved[0].event_id, "resolved", "resolved"),
    ]
    cur = await migrated_conn.execute("SELECT id, kind FROM alert_events ORDER BY id")
    assert await cur.fetchall() == [(opened[0].event_id, "opened"), (resolved[0].event_id, "resolved")]


async def test_two_writers_one_open_alert(
    migrated_conn: AsyncConn, database_url: str, ponding: dict[str, RuleSpec]
) -> None:
    async with connection(database_url) as a, connection(database_url) as b:
        results = await asyncio.gather(
            *(
                AlertStore().apply(conn, [signal(Status.FIRING, 0, 20)], ponding, {"pd-1": DEVICE})
                for conn in (a, b)
            )
        )
    assert sorted(len(r) for r in results) == [0, 1]  # one opened it; the other's trigger was counted on it
    ((_, state, count, _, _),) = await alerts(migrated_conn)
    assert (state, count) == ("firing", 2)
    cur = await migrated_conn.execute("SELECT count(*) FROM alert_events WHERE kind = 'opened'")
    assert await cur.fetchone() == (1,)


async def test_several_signals_of_one_alert_in_one_write_apply_in_order(
    migrated_conn: AsyncConn, ponding: dict[str, RuleSpec]
) -> None:
    store, devices = AlertStore(), {"pd-1": DEVICE}
    await store.apply(migrated_conn, [signal(Status.FIRING, 0, 20)], ponding, devices)
    # Three repeats from three messages of one batch: all counted, the latest value kept.
    repeats = [
        signal(Status.FIRING, 60, 21),
        signal(Status.FIRING, 120, 23, 2),
        signal(Status.FIRING, 90, 22),
    ]
    assert await store.apply(migrated_conn, repeats, ponding, devices) == []
    ((alert_id, state, count, _, last),) = await alerts(migrated_conn)
    assert (state, count, last) == ("firing", 5, 23.0)
    # A resolve then a new trigger in the same write: resolved, then reopened (a flap), in that order.
    t = await store.apply(
        migrated_conn, [signal(Status.INACTIVE, 180, 5), signal(Status.FIRING, 240, 19)], ponding, devices
    )
    assert [(x.kind, x.alert_id) for x in t] == [("resolved", alert_id), ("reopened", alert_id)]
    assert (await alerts(migrated_conn))[0][1:4] == ("firing", 6, 1)
