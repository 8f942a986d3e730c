"""A bare MQTT 3.1.1 QoS 1 publisher over a socket, for load generation.

paho spends tens of microseconds per QoS 1 message and slows down as its in-flight set grows; a load
generator has to outrun the system under test, so this one encodes PUBLISH packets in bulk, keeps a
window of unacknowledged packet ids, and counts PUBACKs as they stream back. It speaks just enough
MQTT for that: CONNECT, PUBLISH (QoS 1), PUBACK, DISCONNECT.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

from cityops.errors import CityopsError

# Unacknowledged messages allowed at once: enough to cover the round trip at 100 k msg/s, well
# under the 65 535 packet ids and the broker's in-flight limit.
DEFAULT_WINDOW = 2000
_PUBACK = 0x40
KEEPALIVE_S = 600
_CONNECT_TIMEOUT_S = 10.0


class WireError(CityopsError):
    """The broker refused or closed the connection."""


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


class BulkPublisher:
    """QoS 1 publishing with a window of unacknowledged messages; blocking, one thread."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        window: int = DEFAULT_WINDOW,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._window = window
        self._next_id = 1
        self.sent = 0
        self.acked = 0
        self._pending = b""
        self._sock = socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flags = 0x02  # clean session
        payload = _string(client_id.encode())
        if username is not None:
            flags |= 0x80
            payload += _string(username.encode())
            if password is not None:
                flags |= 0x40
                payload += _string(password.encode())
        # Some brokers (rumqttd) refuse a keep-alive of 0; a publisher this busy never idles that long.
        variable = _string(b"MQTT") + bytes([4, flags]) + struct.pack("!H", KEEPALIVE_S)
        body = variable + payload
        self._sock.sendall(bytes([0x10]) + _remaining_length(len(body)) + body)
        connack = self._read_exactly(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise WireError(f"CONNACK refused: return code {connack[3]}")

    def publish_many(self, messages: Iterable[tuple[bytes, bytes]], *, qos: int = 1) -> None:
        """Publish (topic, payload) pairs in order, blocking while the window is full.

        QoS 0 messages need no packet id and get no PUBACK: they count as acknowledged at once.
        """
        chunk: list[bytes] = []
        for topic, payload in messages:
            if qos == 0:
                chunk.append(
                    b"\x30" + _remaining_length(2 + len(topic) + len(payload)) + _string(topic) + payload
                )
                self.sent += 1
                self.acked += 1
                if len(chunk) >= 256:
                    self._sock.sendall(b"".join(chunk))
                    chunk.clear()
                continue
            while self.sent - self.acked >= self._window:
                if chunk:
                    self._sock.sendall(b"".join(chunk))
                    chunk.clear()
                self._read_acks(block=True)
            packet_id = self._next_id
            self._next_id = packet_id + 1 if packet_id < 65535 else 1
            body_len = 2 + len(topic) + 2 + len(payload)
            chunk.append(
                b"\x32"
                + _remaining_length(body_len)
                + struct.pack("!H", len(topic))
                + topic
                + struct.pack("!H", packet_id)
                + payload
            )
            self.sent += 1
            if len(chunk) >= 256:
                self._sock.sendall(b"".join(chunk))
                chunk.clear()
                self._read_acks(block=False)
        if chunk:
            self._sock.sendall(b"".join(chunk))

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every message published so far is acknowledged."""
        self._sock.settimeout(timeout_s)
        while self.acked < self.sent:
            self._read_acks(block=True)

    def close(self) -> None:
        try:
            self._sock.sendall(b"\xe0\x00")  # DISCONNECT
        finally:
            self._sock.close()

    def __enter__(self) -> BulkPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_acks(self, *, block: bool) -> None:
        self._sock.setblocking(block)
        try:
            data = self._sock.recv(65536)
        except BlockingIOError:
            return
        finally:
            self._sock.setblocking(True)
        if not data:
            raise WireError("the broker closed the connection")
        data = self._pending + data
        usable = len(data) - len(data) % 4
        packets = data[:usable]
        self._pending = data[usable:]
        if packets[::4].count(_PUBACK) != usable // 4:
            raise WireError("unexpected packet from the broker (only PUBACKs are expected)")
        self.acked += usable // 4

    def _read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self._sock.recv(n - len(data))
            if not more:
                raise WireError("the broker closed the connection during CONNECT")
            data += more
        return data
