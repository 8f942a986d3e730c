"""Alerts end to end: a scripted ponding incident over MQTT through the real pipeline, its NOTIFY
payloads, a redelivery of the same readings, a restart, and the backtest of the same series."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

from cityops.catalogue import Catalogue
from cityops.codec import encode_values
from cityops.db.connection import AsyncConn, connection
from cityops.topics import Topics
from rules.backtest import backtest
from rules.repository import load_rule_table
from tests.conftest import MqttServer
from tests.mqtt_helpers import publish, publisher
from tests.pipeline_helpers import pipeline_settings, running_pipeline
from tests.waiting import eventually

RULE = "drainage-ponding-15cm"  # from the default drainage pack: >= 15 cm fires, <= 12 cm clears
START_MS = (int(time.time()) // 60 - 20) * 60_000  # twenty minutes ago, on a minute
# Ponding depth at pd-1 once a minute: rising past 15 cm, staying above the clear level, falling.
INCIDENT = [5.0, 10.0, 16.0, 18.0, 22.0, 13.0, 9.0]


def ts(step: int) -> int:
    return START_MS + step * 60_000


async def alert_rows(conn: AsyncConn) -> list[tuple[object, ...]]:
    cur = await conn.execute(
        "SELECT labels->>'rule', labels->>'subject', state, count, flap_count, last_value, started_at, resolved_at "
        "FROM alerts ORDER BY id"
    )
    return await cur.fetchall()


async def events(conn: AsyncConn) -> list[tuple[object, ...]]:
    cur = await conn.execute("SELECT id, alert_id, kind, from_state, to_state FROM alert_events ORDER BY id")
    return await cur.fetchall()


async def test_ponding_incident_opens_updates_and_resolves_one_alert(
    fleet_conn: AsyncConn,
    database_url: str,
    mqtt_server: MqttServer,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    settings = pipeline_settings(database_url, mqtt_server, topic_root, tmp_path)
    topic = Topics(topic_root).telemetry("pd-1")
    started = datetime.fromtimestamp(ts(2) / 1000, tz=UTC)
    resolved = datetime.fromtimestamp(ts(6) / 1000, tz=UTC)

    async def alert_is(*expected: object) -> None:
        rows = await alert_rows(fleet_conn)
        assert [r[2:6] for r in rows] == [expected], rows

    async with connection(database_url, autocommit=True) as listener:
        await listener.execute("LISTEN cityops_alerts")
        async with running_pipeline(settings, catalogue) as running:
            with publisher(mqtt_server.url) as client:
                for step, depth in enumerate(INCIDENT[:3]):
                    publish(
                        client, topic, encode_values({"ponding_depth": depth}, ts(step)), "application/json"
                    )
                await eventually(lambda: alert_is("firing", 1, 0, 16.0))
                for step in (3, 4, 5):  # still above the clear level: the same alert, updated
                    publish(client, topic, encode_values({"ponding_depth": INCIDENT[step]}, ts(step)))
                await eventually(lambda: alert_is("firing", 4, 0, 13.0))
                publish(client, topic, encode_values({"ponding_depth": INCIDENT[6]}, ts(6)))
                await eventually(lambda: alert_is("resolved", 4, 0, 9.0))
                heard = [orjson.loads(n.payload) async for n in listener.notifies(timeout=10, stop_after=2)]
                live_events = await events(fleet_conn)
                live_alerts = await alert_rows(fleet_conn)

                # A redelivery: the same readings again. Once the pipeline has committed and
                # acknowledged them (after writing any alert they changed), nothing may have changed.
                for step, depth in enumerate(INCIDENT):
                    publish(client, topic, encode_values({"ponding_depth": depth}, ts(step)))

                async def redelivery_handled() -> None:
                    pipeline = running.pipeline
                    assert pipeline.ingest_metrics.rows_duplicate._value.get() == len(INCIDENT)
                    assert pipeline.session.inflight == 0

                await eventually(redelivery_handled)
                assert await events(fleet_conn) == live_events
                assert await alert_rows(fleet_conn) == live_alerts
                assert [n async for n in listener.notifies(timeout=0.5)] == []

    assert [(e[2], e[3], e[4]) for e in live_events] == [
        ("opened", None, "firing"),
        ("resolved", "firing", "resolved"),
    ]
    assert [(h["event_id"], h["kind"], h["state"]) for h in heard] == [
        (live_events[0][0], "opened", "firing"),
        (live_events[1][0], "resolved", "resolved"),
    ]
    assert live_alerts == [(RULE, "pd-1", "resolved", 4, 0, 9.0, started, resolved)]

    # The backtest of the same series with the same rule gives the same alert.
    table = await load_rule_table(fleet_conn, catalogue)
    result = await backtest(
        fleet_conn,
        [table.specs[RULE]],
        catalogue,
        datetime.fromtimestamp(ts(-1) / 1000, tz=UTC),
        datetime.fromtimestamp(ts(10) / 1000, tz=UTC),
    )
    assert result.readings == len(INCIDENT)
    assert [
        (a.rule, a.subject, a.started_at, a.resolved_at, a.count, a.flap_count, a.last_value)
        for a in result.alerts
    ] == [(RULE, "pd-1", started, resolved, 4, 0, 9.0)]
