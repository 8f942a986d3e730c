"""Small synchronous paho clients for tests: connect, publish, collect, all with deadlines."""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cityops.settings import MqttEndpoint

DEADLINE_S = 10.0


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    content_type: str | None


def _client(url: str, protocol: int, client_id: str | None = None) -> tuple[mqtt.Client, MqttEndpoint]:
    endpoint = MqttEndpoint.parse(url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{uuid.uuid4().hex[:10]}", protocol=protocol
    )
    if endpoint.username:
        client.username_pw_set(endpoint.username, endpoint.password)
    return client, endpoint


def _connect(client: mqtt.Client, endpoint: MqttEndpoint) -> None:
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p=None: connected.set()
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    if not connected.wait(DEADLINE_S):
        client.loop_stop()
        raise TimeoutError(f"no CONNACK from {endpoint.url()} within {DEADLINE_S} s")


@contextmanager
def publisher(url: str, protocol: int = mqtt.MQTTv5) -> Iterator[mqtt.Client]:
    client, endpoint = _client(url, protocol)
    _connect(client, endpoint)
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def publish(
    client: mqtt.Client, topic: str, payload: bytes, content_type: str | None = None, qos: int = 1
) -> None:
    properties = None
    if content_type and client.protocol == mqtt.MQTTv5:
        properties = Properties(PacketTypes.PUBLISH)
        properties.ContentType = content_type
    info = client.publish(topic, payload, qos=qos, properties=properties)
    info.wait_for_publish(DEADLINE_S)
    if not info.is_published():
        raise TimeoutError(f"publish to {topic} not acknowledged within {DEADLINE_S} s")


@contextmanager
def subscriber(url: str, topic_filter: str, protocol: int = mqtt.MQTTv5) -> Iterator[queue.Queue[Received]]:
    client, endpoint = _client(url, protocol)
    inbox: queue.Queue[Received] = queue.Queue(maxsize=10_000)
    subscribed = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        inbox.put(Received(msg.topic, msg.payload, getattr(props, "ContentType", None)))

    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    _connect(client, endpoint)
    client.subscribe(topic_filter, qos=1)
    if not subscribed.wait(DEADLINE_S):
        raise TimeoutError(f"no SUBACK for {topic_filter}")
    try:
        yield inbox
    finally:
        client.disconnect()
        client.loop_stop()


def collect(inbox: queue.Queue[Received], count: int) -> list[Received]:
    return [inbox.get(timeout=DEADLINE_S) for _ in range(count)]
