"""The wire contract over a real broker: every shape, both encodings, MQTT 5 and 3.1.1."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest

from cityops.catalogue import Catalogue
from cityops.codec import Decoder, Encoding, encode_batch, encode_compact, encode_values
from cityops.topics import Topics
from tests.conftest import MqttServer
from tests.mqtt_helpers import collect, publish, publisher, subscriber

TS = 1_763_700_000_000


@pytest.mark.parametrize(
    ("protocol", "content_typed"), [(mqtt.MQTTv5, True), (mqtt.MQTTv5, False), (mqtt.MQTTv311, False)]
)
def test_every_shape_decodes_after_a_broker_round_trip(
    mqtt_server: MqttServer, topic_root: str, catalogue: Catalogue, protocol: int, content_typed: bool
) -> None:
    topics = Topics(topic_root)
    url = mqtt_server.url if protocol == mqtt.MQTTv5 else mqtt_server.url_v311
    payloads = [
        (encode_values({"ponding_depth": 16.5}, TS, seq=1), Encoding.JSON),
        (encode_values({"rainfall": 2.5}, encoding=Encoding.MSGPACK), Encoding.MSGPACK),
        (
            encode_batch([(TS, {"pm25": 40.0}), (TS + 60_000, {"pm25": 42.0})], encoding=Encoding.MSGPACK),
            Encoding.MSGPACK,
        ),
        (encode_compact([(TS, "laeq", 61.2), (TS + 1000, "lamax", 80.0)]), Encoding.MSGPACK),
        (encode_compact([(TS, "average_speed", 14.0)], encoding=Encoding.JSON), Encoding.JSON),
    ]
    decoder = Decoder(catalogue, 300)
    with (
        subscriber(url, topics.telemetry_filter("tests"), protocol) as inbox,
        publisher(url, protocol) as client,
    ):
        for i, (payload, encoding) in enumerate(payloads):
            publish(
                client,
                topics.telemetry(f"dev-{i}"),
                payload,
                encoding.content_type if content_typed else None,
            )
        received = collect(inbox, len(payloads))
    now_us = int(time.time() * 1_000_000)
    by_device = {topics.parse(m.topic).device_id: m for m in received}  # type: ignore[union-attr]
    assert sorted(by_device) == [f"dev-{i}" for i in range(len(payloads))]
    for i, (payload, encoding) in enumerate(payloads):
        message = by_device[f"dev-{i}"]
        assert message.payload == payload
        if content_typed:
            assert message.content_type == encoding.content_type
        out = decoder.decode(message.payload, message.content_type, now_us)
        assert out.rejects == {} and out.rows
    rows = decoder.decode(by_device["dev-3"].payload, None, now_us).rows
    assert rows == [
        (TS * 1000, catalogue.metrics["laeq"].id, 61.2, 0),
        ((TS + 1000) * 1000, catalogue.metrics["lamax"].id, 80.0, 0),
    ]
