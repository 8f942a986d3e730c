"""The rule engine inside a running pipeline: rules changed in the database take effect without a
restart, and a restart in the middle of an incident neither loses nor duplicates its alert."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from cityops.catalogue import Catalogue
from cityops.codec import encode_values
from cityops.db.connection import AsyncConn
from cityops.topics import Topics
from tests.conftest import MqttServer
from tests.mqtt_helpers import publish, publisher
from tests.pipeline_helpers import pipeline_settings, running_pipeline
from tests.waiting import eventually

START_MS = (int(time.time()) // 60 - 30) * 60_000


def ts(step: int) -> int:
    return START_MS + step * 60_000


async def alerts(conn: AsyncConn) -> list[tuple[object, ...]]:
    cur = await conn.execute("SELECT labels->>'rule', state, count, last_value FROM alerts ORDER BY id")
    return await cur.fetchall()


async def test_a_rule_added_to_the_table_is_evaluated_without_restart(
    fleet_conn: AsyncConn,
    database_url: str,
    mqtt_server: MqttServer,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    settings = pipeline_settings(
        database_url, mqtt_server, topic_root, tmp_path, rules_install_defaults=False
    )
    topic = Topics(topic_root).telemetry("pd-1")
    async with running_pipeline(settings, catalogue) as running:
        assert running.pipeline.rule_metrics.rules_loaded._value.get() == 0
        spec = {
            "severity": "low",
            "source": "test",
            "selector": {"kinds": ["ponding_gauge"]},
            "condition": {"type": "threshold", "metric": "ponding_depth", "op": ">=", "value": 5},
        }
        await fleet_conn.execute(
            "INSERT INTO rules (name, spec, source) VALUES ('puddle', %s, 'test')",
            (orjson.dumps(spec).decode(),),
        )

        async def loaded() -> None:
            assert running.pipeline.rule_metrics.rules_loaded._value.get() == 1

        await eventually(loaded)
        with publisher(mqtt_server.url) as client:
            publish(client, topic, encode_values({"ponding_depth": 6}, ts(0)))

            async def raised() -> None:
                assert await alerts(fleet_conn) == [("puddle", "firing", 1, 6.0)]

            await eventually(raised)
            # Disabled in the table: the running pipeline drops the rule.
            await fleet_conn.execute("UPDATE rules SET enabled = false WHERE name = 'puddle'")

            async def dropped() -> None:
                assert running.pipeline.rule_metrics.rules_loaded._value.get() == 0

            await eventually(dropped)


async def test_restart_mid_incident_keeps_one_alert(
    fleet_conn: AsyncConn,
    database_url: str,
    mqtt_server: MqttServer,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    settings = pipeline_settings(database_url, mqtt_server, topic_root, tmp_path)
    topic = Topics(topic_root).telemetry("pd-1")
    with publisher(mqtt_server.url) as client:
        async with running_pipeline(settings, catalogue):
            for step, depth in enumerate([10.0, 16.0, 22.0]):
                publish(client, topic, encode_values({"ponding_depth": depth}, ts(step)))

            async def firing() -> None:
                assert await alerts(fleet_conn) == [("drainage-ponding-15cm", "firing", 2, 22.0)]

            await eventually(firing)
        # Restarted: 13 cm is between the clear level (12) and the firing level (15). The readings
        # are older than a threshold rule's replay horizon, so only the open alert tells the new
        # pipeline that the rule fires: it stays firing and counts the reading.
        async with running_pipeline(settings, catalogue) as running:
            assert running.pipeline.rule_metrics.replayed._value.get() == 0
            publish(client, topic, encode_values({"ponding_depth": 13.0}, ts(3)))

            async def updated() -> None:
                assert await alerts(fleet_conn) == [("drainage-ponding-15cm", "firing", 3, 13.0)]

            await eventually(updated)
            publish(client, topic, encode_values({"ponding_depth": 9.0}, ts(4)))

            async def resolved() -> None:
                assert await alerts(fleet_conn) == [("drainage-ponding-15cm", "resolved", 3, 9.0)]

            await eventually(resolved)
    cur = await fleet_conn.execute("SELECT kind FROM alert_events ORDER BY id")
    assert await cur.fetchall() == [("opened",), ("resolved",)]
