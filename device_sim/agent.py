"""``cityops agent``: the program on a field device (a Raspberry Pi beside its sensors).

It reads readings from a source (stdin JSON lines, a command run every few seconds, or a plugin),
keeps every one in an on-disk spool until the broker has acknowledged it (QoS 1), and publishes
``online``/``offline`` (the will) on its retained status topic. While the broker is unreachable the
spool fills (bounded; the oldest are dropped and counted). On reconnect it sends what arrived since
the reconnect first, and the backlog oldest first at ``replay_rate`` messages a second beside it,
each with its original timestamp: live readings are never starved by a long replay.

Commands arrive on ``…/cmd/{id}`` as JSON (``{"command": "ping"}``, ``{"command": "set_interval",
"interval_s": 30}``) and are answered on ``…/cmd/{id}/result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cityops.codec import encode_values
from cityops.settings import MqttEndpoint
from cityops.topics import Topics
from device_sim.sources import Reading, Source
from device_sim.spool import Spool

log = logging.getLogger(__name__)

# Messages published and not yet acknowledged, at most: enough to fill a link, few to resend.
MAX_INFLIGHT = 100
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 30
KEEPALIVE_S = 30


@dataclass(frozen=True, slots=True)
class AgentOptions:
    device_id: str
    mqtt_url: str
    topic_root: str
    spool_path: Path
    spool_max: int = 100_000
    replay_rate: float = 50.0  # backlog messages per second beside live ones


class Agent:
    def __init__(
        self, options: AgentOptions, source: Source, clock_ms: Callable[[], int] | None = None
    ) -> None:
        self.options = options
        self.source = source
        self.clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.topics = Topics(options.topic_root)
        self.spool = Spool(options.spool_path, options.spool_max)
        self.connected = asyncio.Event()
        self.listening = asyncio.Event()  # the broker confirmed the command subscription
        self.sent = 0
        self.acknowledged = 0
        self._wake = asyncio.Event()
        self._inflight: dict[int, int] = {}  # paho mid -> spool row id
        self._live_cursor = 0  # rows after the reconnect mark already sent
        self._backlog_cursor = 0
        self._backlog_mark = 0  # rows up to here were waiting when we (re)connected
        self._tokens = 0.0
        self._tokens_at = time.monotonic()
        self._seq = self.spool.last_id()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = self._make_client()

    # --- MQTT (paho's thread hands everything to the event loop) ---------------------------------
    def _make_client(self) -> mqtt.Client:
        o = self.options
        endpoint = MqttEndpoint.parse(o.mqtt_url)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"agent-{o.device_id}-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if endpoint.username:
            client.username_pw_set(endpoint.username, endpoint.password)
        client.will_set(self.topics.status(o.device_id), b"offline", qos=1, retain=True)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = lambda c, u, f, rc, p=None: self._call(self._on_connect, rc)
        client.on_disconnect = lambda c, u, f, rc, p=None: self._call(self._on_disconnect)
        client.on_publish = lambda c, u, mid, rc=None, p=None: self._call(self._on_ack, mid)
        client.on_message = lambda c, u, msg: self._call(self._on_command, msg.topic, msg.payload)
        client.on_subscribe = lambda c, u, mid, rc, p=None: self._call(self.listening.set)
        self._endpoint = endpoint
        return client

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, reason: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker refused the connection", extra={"reason": str(reason)})
            return
        o = self.options
        self._client.publish(self.topics.status(o.device_id), b"online", qos=1, retain=True)
        self._client.subscribe(self.topics.command(o.device_id, "+"), qos=1)
        # Everything spooled so far is backlog; what arrives from now on is live.
        self._inflight.clear()
        self._backlog_mark = self._live_cursor = self.spool.last_id()
        self._backlog_cursor = 0
        self.connected.set()
        self._wake.set()
        log.info("connected", extra={"backlog": len(self.spool), "dropped": self.spool.dropped})

    def _on_disconnect(self) -> None:
        if self.connected.is_set():
            log.warning("broker connection lost; spooling", extra={"spooled": len(self.spool)})
        self.connected.clear()
        self.listening.clear()
        self._inflight.clear()  # unacknowledged rows are still in the spool: sent again on reconnect

    def _on_ack(self, mid: int) -> None:
        row = self._inflight.pop(mid, None)
        if row is not None:
            self.spool.remove([row])
            self.acknowledged += 1
            self._wake.set()

    # --- commands --------------------------------------------------------------------------------
    def _on_command(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse(topic)
        if parsed is None or parsed.command_id is None:
            return
        reply = self.handle_command(payload)
        result_topic = self.topics.command_result(self.options.device_id, parsed.command_id)
        self._client.publish(result_topic, orjson.dumps(reply), qos=1)

    def handle_command(self, payload: bytes) -> dict[str, Any]:
        try:
            doc = orjson.loads(payload)
            command = doc["command"] if isinstance(doc, dict) else None
        except (orjson.JSONDecodeError, KeyError):
            return {"ok": False, "error": 'a command is a JSON object: {"command": "ping"}'}
        if command == "ping":
            return {
                "ok": True,
                "command": "ping",
                "result": {"ts": self.clock_ms(), "spooled": len(self.spool)},
            }
        if command == "set_interval":
            interval = doc.get("interval_s")
            if not isinstance(interval, int | float) or not 0.1 <= interval <= 86400:
                return {
                    "ok": False,
                    "command": command,
                    "error": "interval_s must be a number in [0.1, 86400]",
                }
            if not self.source.set_interval(float(interval)):
                return {"ok": False, "command": command, "error": "this source has no sampling interval"}
            return {"ok": True, "command": command, "result": {"interval_s": float(interval)}}
        return {"ok": False, "command": command, "error": f"unknown command {command!r} (ping, set_interval)"}

    # --- running ---------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self._endpoint.host, self._endpoint.port, KEEPALIVE_S)
        self._client.loop_start()
        reader = asyncio.create_task(self._read(stop), name="agent-source")
        sender = asyncio.create_task(self._send(stop), name="agent-sender")
        try:
            await stop.wait()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await self._drain(sender)
            if self.connected.is_set():
                info = self._client.publish(
                    self.topics.status(self.options.device_id), b"offline", qos=1, retain=True
                )
                with contextlib.suppress(RuntimeError, ValueError):
                    await asyncio.to_thread(info.wait_for_publish, 5)
            self._client.disconnect()
            self._client.loop_stop()
            self.spool.close()

    async def _drain(self, sender: asyncio.Task[None]) -> None:
        """Give what is in flight a moment to be acknowledged; the rest stays spooled for next time."""
        deadline = time.monotonic() + 5
        while self._inflight and self.connected.is_set() and time.monotonic() < deadline:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.2)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender

    async def _read(self, stop: asyncio.Event) -> None:
        async for reading in self.source.readings(stop):
            self.keep(reading)

    def keep(self, reading: Reading) -> None:
        """Spool a reading (durably) and wake the sender."""
        ts_ms, values = reading
        self._seq += 1
        self.spool.put(ts_ms, encode_values(values, ts_ms, seq=self._seq))
        self._wake.set()

    async def _send(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            if self.connected.is_set():
                self._publish_some()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)

    def _publish_some(self) -> None:
        room = MAX_INFLIGHT - len(self._inflight)
        if room <= 0:
            return
        for row in self.spool.oldest(room, after_id=self._live_cursor):
            if not self._publish(row.id, row.payload):
                return
            self._live_cursor = row.id
            room -= 1
        allowance = min(room, self._replay_allowance())
        if allowance > 0:
            for row in self.spool.oldest(
                allowance, after_id=self._backlog_cursor, up_to_id=self._backlog_mark
            ):
                if not self._publish(row.id, row.payload):
                    return
                self._backlog_cursor = row.id
                self._tokens -= 1

    def _replay_allowance(self) -> int:
        now = time.monotonic()
        rate = self.options.replay_rate
        self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)  # at most a second's worth
        self._tokens_at = now
        return int(self._tokens)

    def _publish(self, row_id: int, payload: bytes) -> bool:
        info = self._client.publish(self.topics.telemetry(self.options.device_id), payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False  # not connected after all: the row stays spooled
        self._inflight[info.mid] = row_id
        self.sent += 1
        return True
