"""The pipeline's MQTT session: paho-mqtt 2 on its own network thread, acknowledged by hand.

paho's thread only timestamps each message and appends it to a deque; the event loop drains the
deque. A message is PUBACKed by :meth:`MqttSession.ack` once what it produced is committed. The
number of unacknowledged messages is bounded: MQTT 5 ``receive_maximum`` makes the broker hold the
rest, and a semaphore of the same size holds paho's thread should a broker send more than asked.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cityops.errors import CityopsError
from cityops.settings import MqttEndpoint, MqttProtocol, Settings
from cityops.topics import Topics
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

# Seconds to wait for a CONNACK before trying the next protocol version or giving up.
CONNECT_TIMEOUT_S = 10.0
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 30
ROOM_RECHECK_S = 0.5

NowUs = Callable[[], int]


class BrokerError(CityopsError):
    """The broker could not be reached or refused us."""


@dataclass(slots=True)
class InboundMessage:
    topic: str
    payload: bytes
    qos: int
    mid: int
    content_type: str | None
    received_us: int
    generation: int  # which connection delivered it: a PUBACK is only valid on that one


class MqttSession:
    """Connect, subscribe, deliver into :attr:`inbox`, acknowledge; reconnects by itself."""

    def __init__(
        self, settings: Settings, url: str, metrics: GatewayMetrics, now_us: NowUs, *, shared: bool = True
    ) -> None:
        self._settings = settings
        self._endpoint = MqttEndpoint.parse(url)
        self._group = (settings.subscription_group or None) if shared else None
        self._metrics = metrics
        self._now_us = now_us
        self._topics = Topics(settings.topic_root)
        self.inbox: collections.deque[InboundMessage] = collections.deque()
        self.has_mail = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limit = settings.receive_maximum
        self._room = threading.Event()  # set by ack(); awaited by paho's thread only when at the limit
        # In flight = received - released; each counter has one writer thread, so no lock is needed.
        self._received = 0
        self._released = 0
        self._generation = 0
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._answered = threading.Event()  # CONNACK of either kind, or the socket closed
        self._connack: ReasonCode | int | None = None
        self.protocol: int | None = None

    @property
    def inflight(self) -> int:
        return self._received - self._released

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        choices = {
            MqttProtocol.V5: [mqtt.MQTTv5],
            MqttProtocol.V311: [mqtt.MQTTv311],
            MqttProtocol.AUTO: [mqtt.MQTTv5, mqtt.MQTTv311],
        }[self._settings.mqtt_protocol]
        problems = []
        for protocol in choices:
            problem = await asyncio.to_thread(self._try_connect, protocol)
            if problem is None:
                self.protocol = protocol
                log.info(
                    "connected to the broker",
                    extra={
                        "broker": self._endpoint.url(),
                        "mqtt": "5" if protocol == mqtt.MQTTv5 else "3.1.1",
                        "client_id": self._settings.mqtt_client_id,
                    },
                )
                return
            problems.append(problem)
        raise BrokerError(f"cannot connect to {self._endpoint.url()}: " + "; ".join(problems))

    def _try_connect(self, protocol: MQTTProtocolVersion) -> str | None:
        client = self._new_client(protocol)
        self._connected.clear()
        self._answered.clear()
        self._connack = None
        try:
            if protocol == mqtt.MQTTv5:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = self._settings.mqtt_session_expiry
                props.ReceiveMaximum = self._settings.receive_maximum
                client.connect(
                    self._endpoint.host,
                    self._endpoint.port,
                    self._settings.mqtt_keepalive,
                    clean_start=False,
                    properties=props,
                )
            else:
                client.connect(self._endpoint.host, self._endpoint.port, self._settings.mqtt_keepalive)
        except (OSError, ValueError) as exc:
            return f"{'MQTT 5' if protocol == mqtt.MQTTv5 else 'MQTT 3.1.1'}: {exc}"
        client.loop_start()
        self._answered.wait(CONNECT_TIMEOUT_S)
        if self._connected.is_set():
            self._client = client
            return None
        client.disconnect()
        client.loop_stop()
        return f"{'MQTT 5' if protocol == mqtt.MQTTv5 else 'MQTT 3.1.1'}: no CONNACK ({self._connack})"

    def _new_client(self, protocol: MQTTProtocolVersion) -> mqtt.Client:
        s = self._settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.mqtt_client_id,
            protocol=protocol,
            clean_session=None if protocol == mqtt.MQTTv5 else False,  # persistent session either way
        )
        client.manual_ack_set(True)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        if self._endpoint.username:
            client.username_pw_set(self._endpoint.username, self._endpoint.password)
        if self._endpoint.tls:
            client.tls_set(
                ca_certs=str(s.mqtt_tls_ca_file) if s.mqtt_tls_ca_file else None,
                certfile=str(s.mqtt_tls_cert_file) if s.mqtt_tls_cert_file else None,
                keyfile=str(s.mqtt_tls_key_file) if s.mqtt_tls_key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            client.tls_insecure_set(s.mqtt_tls_insecure)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # --- paho's thread ---------------------------------------------------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._connack = reason
        if reason.is_failure:
            log.warning("broker refused the connection", extra={"reason": str(reason)})
            self._answered.set()
            return
        self._generation += 1
        group = self._group
        # Telemetry is shared across the pipelines of the group; status is retained and idempotent,
        # so every pipeline takes it (retained messages are not sent to shared subscriptions).
        client.subscribe([(self._topics.telemetry_filter(group), 1), (self._topics.status_filter(), 1)])
        self._metrics.connects.inc()
        if not flags.session_present:
            log.info("broker has no session for us: subscribing afresh")
        self._connected.set()
        self._answered.set()

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._connected.clear()
        self._answered.set()  # a broker that closes the socket on our CONNECT has answered too
        if reason.is_failure:
            log.warning("lost the broker; paho reconnects", extra={"reason": str(reason)})

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        received_us = self._now_us()
        if self._received - self._released >= self._limit:
            if message.qos == 0:
                self._metrics.qos0_dropped.inc()  # at-most-once by the device's choice; counted
                return
            # Only a broker that ignores our receive maximum gets here: hold its delivery (and so
            # the socket) until the writer frees room. Re-check periodically in case a wake is missed.
            self._room.clear()
            while self._received - self._released >= self._limit:
                self._room.wait(ROOM_RECHECK_S)
        self._received += 1
        props = getattr(message, "properties", None)
        # paho keeps the properties a packet carried in the instance dict: a lookup there avoids the
        # AttributeError that getattr(props, "ContentType", None) raises and swallows per message.
        content_type = props.__dict__.get("ContentType") if props is not None else None
        self.inbox.append(
            InboundMessage(
                topic=message.topic,
                payload=bytes(message.payload),
                qos=message.qos,
                mid=message.mid,
                content_type=content_type,
                received_us=received_us,
                generation=self._generation,
            )
        )
        if not self.has_mail.is_set() and self._loop is not None:
            self._loop.call_soon_threadsafe(self.has_mail.set)

    # --- the event loop --------------------------------------------------------------------------
    def ack(self, messages: list[InboundMessage]) -> None:
        """PUBACK every message (on the connection that delivered it) and free its slot."""
        client = self._client
        generation = self._generation
        current: list[int] = []
        stale = 0
        for m in messages:
            if m.qos == 0:
                continue
            if m.generation != generation:
                stale += 1
            elif m.qos == 1:
                current.append(m.mid)
            elif client is not None:
                client.ack(m.mid, 2)
        if client is not None and current:
            _send_pubacks(client, current)
        self._released += len(messages)
        if not self._room.is_set():
            self._room.set()
        if stale:
            # Their connection is gone: the broker redelivers them, and the staged merge dedups.
            self._metrics.stale_acks.inc(stale)

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        await asyncio.to_thread(_disconnect, client)


_PUBACK = struct.Struct("!BBH")  # fixed header 0x40, remaining length 2, packet id (MQTT 3.1.1 and 5)


def _send_pubacks(client: mqtt.Client, mids: list[int]) -> None:
    """All PUBACKs of a batch as one write.

    ``Client.ack`` queues one packet and wakes paho's thread once per message, which costs more than
    the rest of a small message's path through the pipeline. paho's own packet queue takes any bytes,
    so the batch's PUBACKs go in as one entry; a paho without it gets them one by one.
    """
    queue = getattr(client, "_packet_queue", None)
    if queue is None:
        for mid in mids:
            client.ack(mid, 1)
        return
    queue(mqtt.PUBACK, b"".join([_PUBACK.pack(mqtt.PUBACK, 2, mid) for mid in mids]), 0, 1)


def _disconnect(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()
