"""The pipeline end to end: real broker, real PostgreSQL, every shape stored exactly, every reject
reason in dead_letters, presence and status recorded."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import paho.mqtt.client as paho_mqtt

from cityops.catalogue import Catalogue
from cityops.codec import Encoding, encode_batch, encode_compact, encode_values
from cityops.db.connection import AsyncConn
from cityops.embedded import EmbeddedBroker
from cityops.model import DeviceSpec, Quality
from cityops.topics import Topics
from tests.conftest import MqttServer
from tests.mqtt_helpers import publish, publisher
from tests.pipeline_helpers import pipeline_settings, register_fleet, running_pipeline
from tests.waiting import eventually

NOW_MS = int(time.time() * 1000)
TS = NOW_MS - 3_600_000  # an hour ago: inside today's or yesterday's partition
RFC3339_TS = datetime.fromtimestamp(TS // 1000, tz=timezone(timedelta(hours=8))).isoformat()  # China time


async def rows(conn: AsyncConn) -> list[tuple[object, ...]]:
    cur = await conn.execute(
        "SELECT d.external_id, m.name, (extract(epoch FROM r.time) * 1000)::bigint, r.value, r.quality "
        "FROM readings r JOIN devices d ON d.id = r.device_id JOIN metrics m ON m.id = r.metric_id "
        "ORDER BY 1, 2, 3"
    )
    return await cur.fetchall()


async def dead_letters(conn: AsyncConn) -> list[tuple[object, ...]]:
    cur = await conn.execute("SELECT reason, device, readings, payload FROM dead_letters ORDER BY id")
    return await cur.fetchall()


async def test_every_shape_is_stored_exactly(
    fleet_conn: AsyncConn,
    database_url: str,
    mqtt_server: MqttServer,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    settings = pipeline_settings(database_url, mqtt_server, topic_root, tmp_path)
    topics = Topics(topic_root)
    async with running_pipeline(settings, catalogue):
        with publisher(mqtt_server.url) as client:
            publish(
                client,
                topics.telemetry("aq-1"),
                encode_values({"pm25": 35.2, "pm10": 61}, TS, seq=1),
                "application/json",
            )
            publish(
                client,
                topics.telemetry("aq-1"),
                encode_batch(
                    [(TS + 1000, {"o3": 120.5}), (TS + 2000, {"o3": 121})], encoding=Encoding.MSGPACK
                ),
            )
            publish(client, topics.telemetry("aq-2"), encode_compact([(TS, "no2", 40), (TS + 1, "so2", 9.5)]))
            publish(client, topics.telemetry("pd-1"), b'[[%d, "ponding_depth", 400]]' % TS)  # out of range
            publish(
                client,
                topics.telemetry("pd-1"),
                orjson.dumps({"ts": RFC3339_TS, "values": {"battery_level": 0.8}}),
            )
            publish(
                client, topics.telemetry("aq-2"), encode_values({"relative_humidity": 0.5})
            )  # receive time

        async def all_stored() -> list[tuple[object, ...]]:
            got = await rows(fleet_conn)
            assert len(got) == 9
            return got

        stored = await eventually(all_stored)
    by_key = {(d, m, t): (v, q) for d, m, t, v, q in stored}
    assert by_key[("aq-1", "pm25", TS)] == (35.2, 0)
    assert by_key[("aq-1", "pm10", TS)] == (61.0, 0)
    assert by_key[("aq-1", "o3", TS + 1000)] == (120.5, 0)
    assert by_key[("aq-1", "o3", TS + 2000)] == (121.0, 0)
    assert by_key[("aq-2", "no2", TS)] == (40.0, 0)
    assert by_key[("aq-2", "so2", TS + 1)] == (9.5, 0)
    assert by_key[("pd-1", "ponding_depth", TS)] == (400.0, Quality.OUT_OF_RANGE)
    assert by_key[("pd-1", "battery_level", TS - TS % 1000)] == (0.8, 0)
    ((rh_time, (rh, rh_quality)),) = [(t, vq) for (d, m, t), vq in by_key.items() if m == "relative_humidity"]
    assert (rh, rh_quality) == (0.5, Quality.RECEIVE_TIME) and abs(rh_time - time.time() * 1000) < 60_000
    assert await dead_letters(fleet_conn) == []


REJECTS = [
    ("aq-1", b"{not json", "malformed_payload"),
    ("aq-1", b"", "empty_payload"),
    ("aq-1", orjson.dumps({"ts": TS, "values": {"bogus_metric": 1}}), "unknown_metric"),
    ("aq-1", orjson.dumps({"ts": TS, "values": {"pm25": "high"}}), "invalid_value"),
    ("aq-1", encode_compact([(TS, "pm25", float("nan"))]), "non_finite_value"),
    ("aq-1", orjson.dumps({"ts": "tomorrow", "values": {"pm25": 1}}), "invalid_timestamp"),
    ("aq-1", orjson.dumps({"ts": NOW_MS + 3_600_000, "values": {"pm25": 1}}), "clock_skew"),
    ("nobody-9", orjson.dumps({"pm25": 1}), "unknown_device"),
    ("off-1", orjson.dumps({"ponding_depth": 1}), "device_disabled"),
]


async def test_every_reject_reason_lands_in_dead_letters(
    fleet_conn: AsyncConn,
    database_url: str,
    mqtt_server: MqttServer,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    settings = pipeline_settings(database_url, mqtt_server, topic_root, tmp_path)
    topics = Topics(topic_root)
    async with running_pipeline(settings, catalogue) as running:
        with publisher(mqtt_server.url) as client:
            for device, payload, _ in REJECTS:
                publish(client, topics.telemetry(device), payload)
            publish(client, topics.telemetry("aq-1"), b"{}", "text/csv")
            publish(client, f"{topic_root}/v1/aq-1/weird", b"{}")  # not a topic the pipeline takes
            publish(client, topics.status("aq-1"), b"sleepy")
            # A batch with one bad reading still stores the good one.
            publish(client, topics.telemetry("aq-2"), encode_compact([(TS, "pm25", 5), (TS, "nope", 1)]))

        async def all_dead() -> list[tuple[object, ...]]:
            got = await dead_letters(fleet_conn)
            assert len(got) == len(REJECTS) + 3
            return got

        letters = await eventually(all_dead)
        counted = running.pipeline.gateway_metrics.dead_letters
    reasons = [reason for reason, *_ in letters]
    assert sorted(reasons) == sorted(
        [r for *_, r in REJECTS] + ["unsupported_content_type", "malformed_payload", "unknown_metric"]
    )
    for device, payload, reason in REJECTS:
        assert (reason, device, payload) in [(r, d, bytes(p)) for r, d, _, p in letters]
    for reason in set(reasons):
        assert counted.labels(reason)._value.get() == reasons.count(reason)
    assert [r[:2] for r in await rows(fleet_conn)] == [("aq-2", "pm25")]


async def test_status_and_presence_are_recorded(
    fleet_conn: AsyncConn,
    database_url: str,
    mqtt_server: MqttServer,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    settings = pipeline_settings(database_url, mqtt_server, topic_root, tmp_path)
    topics = Topics(topic_root)
    async with running_pipeline(settings, catalogue):
        with publisher(mqtt_server.url) as client:
            publish(client, topics.status("aq-1"), b"online")
            publish(client, topics.telemetry("aq-2"), encode_values({"pm25": 3}, TS))
            publish(client, topics.status("pd-1"), b"offline")

        async def recorded() -> None:
            cur = await fleet_conn.execute(
                "SELECT external_id, status, last_seen IS NOT NULL FROM devices ORDER BY external_id"
            )
            assert await cur.fetchall() == [
                ("aq-1", "online", False),
                ("aq-2", None, True),
                ("off-1", None, False),
                ("pd-1", "offline", False),
            ]

        await eventually(recorded)


async def test_a_device_registered_while_running_is_accepted(
    fleet_conn: AsyncConn,
    database_url: str,
    mqtt_server: MqttServer,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    settings = pipeline_settings(database_url, mqtt_server, topic_root, tmp_path)
    topics = Topics(topic_root)
    async with running_pipeline(settings, catalogue):
        await register_fleet(
            fleet_conn, [DeviceSpec(external_id="new-1", tenant="gas", kind="gas_detector", name="New")]
        )
        with publisher(mqtt_server.url) as client:
            publish(client, topics.telemetry("new-1"), encode_values({"combustible_gas_lel": 3}, TS))

        async def stored() -> None:
            assert [r[:2] for r in await rows(fleet_conn)] == [("new-1", "combustible_gas_lel")]

        await eventually(stored)
    assert await dead_letters(fleet_conn) == []


async def test_a_permanent_data_error_dead_letters_only_its_message(
    fleet_conn: AsyncConn,
    database_url: str,
    mqtt_server: MqttServer,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    # A constraint the decoder knows nothing of stands in for any permanent data error (SQLSTATE 22/23).
    await fleet_conn.execute("ALTER TABLE readings ADD CONSTRAINT test_cap CHECK (value < 1000000)")
    settings = pipeline_settings(database_url, mqtt_server, topic_root, tmp_path, batch_interval=0.5)
    topics = Topics(topic_root)
    bad = encode_compact([(TS, "pm25", 5e6), (TS + 1, "pm25", 1)])
    async with running_pipeline(settings, catalogue) as running:
        with publisher(mqtt_server.url) as client:
            for i in range(6):  # one batch (0.5 s interval): the bad message among good ones
                publish(client, topics.telemetry("aq-2"), encode_compact([(TS + 10 + i, "pm10", float(i))]))
                if i == 3:
                    publish(client, topics.telemetry("aq-1"), bad)

        async def settled() -> None:
            assert len(await rows(fleet_conn)) == 6
            assert len(await dead_letters(fleet_conn)) == 1

        await eventually(settled)
        assert running.pipeline.ingest_metrics.data_errors._value.get() == 1
    ((reason, device, readings, payload),) = await dead_letters(fleet_conn)
    assert (reason, device, readings, bytes(payload)) == ("data_error", "aq-1", 2, bad)
    assert {r[1] for r in await rows(fleet_conn)} == {"pm10"}


async def test_falls_back_to_mqtt_311_when_the_broker_does_not_speak_5(
    fleet_conn: AsyncConn, database_url: str, topic_root: str, tmp_path: Path, catalogue: Catalogue
) -> None:
    with EmbeddedBroker(tmp_path / "broker") as broker:  # its 3.1.1 listener refuses MQTT 5
        server = MqttServer(broker.url_v311, broker.url_v311, shared_subscriptions=False)
        settings = pipeline_settings(database_url, server, topic_root, tmp_path)
        async with running_pipeline(settings, catalogue) as running:
            assert running.pipeline.session.protocol == paho_mqtt.MQTTv311
            with publisher(server.url_v311, paho_mqtt.MQTTv311) as client:
                publish(client, Topics(topic_root).telemetry("aq-1"), encode_values({"pm25": 7}, TS))

            async def stored() -> None:
                assert [r[:2] for r in await rows(fleet_conn)] == [("aq-1", "pm25")]

            await eventually(stored)
