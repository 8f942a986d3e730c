"""Messages in, batches out: topic check, registry check, decode, dead letters, status, presence."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from cityops.codec import Decoded, Decoder
from cityops.model import RejectReason
from cityops.topics import ParsedTopic, TopicKind, Topics
from gateway.metrics import GatewayMetrics
from gateway.registry import DeviceInfo, DeviceRegistry
from gateway.session import InboundMessage
from ingest.batch import Batch, DeadLetter, Segment, StatusUpdate

_STATUSES = {b"online": "online", b"offline": "offline"}
# Bound of the parsed-topic cache: a flood of junk topics must not grow it without limit.
TOPIC_CACHE_MAX = 200_000


@dataclass(slots=True)
class PendingBatch:
    """A batch being built, with the messages to acknowledge once it commits."""

    batch: Batch = field(default_factory=Batch)
    messages: list[InboundMessage] = field(default_factory=list)
    unknown: list[InboundMessage] = field(default_factory=list)  # decided after a registry reload

    def __len__(self) -> int:
        return len(self.messages) + len(self.unknown)


class Batcher:
    def __init__(
        self,
        decoder: Decoder,
        registry: DeviceRegistry,
        topics: Topics,
        metrics: GatewayMetrics,
        last_seen: dict[int, int],
    ) -> None:
        self._decoder = decoder
        self._registry = registry
        self._topics = topics
        self._metrics = metrics
        self._last_seen = last_seen  # device id -> latest receive time (µs); written by the presence task
        self._telemetry_count = metrics.messages.labels("telemetry")
        self._readings_accepted = metrics.readings_accepted
        self.pending = PendingBatch()
        # Device topics are few (one or two per device) and seen again and again: parse each once.
        self._parsed: dict[str, ParsedTopic | None] = {}
        self._telemetry_seen = 0

    def take(self) -> PendingBatch:
        pending, self.pending = self.pending, PendingBatch()
        self._readings_accepted.inc(pending.batch.rows)
        return pending

    def count(self) -> None:
        """Move the per-message tallies into the metrics (once per drain of the inbox, not per message)."""
        if self._telemetry_seen:
            self._telemetry_count.inc(self._telemetry_seen)
            self._telemetry_seen = 0

    def _parse(self, topic: str) -> ParsedTopic | None:
        try:
            return self._parsed[topic]
        except KeyError:
            if len(self._parsed) >= TOPIC_CACHE_MAX:
                self._parsed.clear()
            parsed = self._parsed[topic] = self._topics.parse(topic)
            return parsed

    def accept(self, message: InboundMessage) -> None:
        parsed = self._parse(message.topic)
        if parsed is None:
            self._metrics.messages.labels("other").inc()
            self._dead_letter(message, None, RejectReason.INVALID_TOPIC, "not a cityops device topic")
            return
        device = self._registry.get(parsed.device_id)
        if device is None:
            self.pending.unknown.append(message)
            return
        if parsed.kind is TopicKind.TELEMETRY:
            self._telemetry_seen += 1
            self._telemetry(message, device)
        elif parsed.kind is TopicKind.STATUS:
            self._metrics.messages.labels("status").inc()
            self._status(message, device)
        else:
            self._metrics.messages.labels("other").inc()
            self._dead_letter(
                message, device.external_id, RejectReason.INVALID_TOPIC, "commands are not ingested"
            )

    def settle_unknown(self) -> None:
        """After a registry reload: messages of devices still unknown become dead letters."""
        waiting, self.pending.unknown = self.pending.unknown, []
        for message in waiting:
            parsed = self._parse(message.topic)
            assert parsed is not None
            if self._registry.get(parsed.device_id) is not None:
                self.accept(message)
                continue
            self._metrics.messages.labels(
                parsed.kind.value if parsed.kind is not TopicKind.COMMAND_RESULT else "other"
            ).inc()
            self._dead_letter(
                message,
                parsed.device_id,
                RejectReason.UNKNOWN_DEVICE,
                f"device {parsed.device_id!r} is not registered",
            )

    def _telemetry(self, message: InboundMessage, device: DeviceInfo) -> None:
        if not device.enabled:
            self._dead_letter(
                message,
                device.external_id,
                RejectReason.DEVICE_DISABLED,
                f"device {device.external_id!r} is disabled",
            )
            return
        self._last_seen[device.id] = message.received_us
        decoded = self._decoder.decode(message.payload, message.content_type, message.received_us)
        pending = self.pending
        pending.messages.append(message)
        if decoded.rows:
            pending.batch.add_segment(Segment(device.id, decoded.rows, message, device.external_id))
        if decoded.rejects:
            self._reject_readings(message, device, decoded)

    def _reject_readings(self, message: InboundMessage, device: DeviceInfo, decoded: Decoded) -> None:
        for reject in decoded.rejects.values():
            detail = reject.detail if reject.count == 1 else f"{reject.detail} (and {reject.count - 1} more)"
            self._record(message, device.external_id, reject.reason, detail, reject.count)

    def _status(self, message: InboundMessage, device: DeviceInfo) -> None:
        payload = message.payload.strip().lower()
        if not payload:  # a cleared retained status: nothing to record
            self.pending.messages.append(message)
            return
        status = _STATUSES.get(payload)
        if status is None:
            self._dead_letter(
                message,
                device.external_id,
                RejectReason.MALFORMED_PAYLOAD,
                "status must be 'online' or 'offline'",
            )
            return
        self.pending.messages.append(message)
        self.pending.batch.statuses.append(StatusUpdate(device.id, status, _datetime(message.received_us)))

    def _dead_letter(
        self, message: InboundMessage, device: str | None, reason: RejectReason, detail: str
    ) -> None:
        """The whole message is rejected: it is acknowledged once its dead letter commits."""
        self.pending.messages.append(message)
        self._record(message, device, reason, detail, 0)

    def _record(
        self, message: InboundMessage, device: str | None, reason: RejectReason, detail: str, readings: int
    ) -> None:
        self._metrics.rejects.labels(reason.value).inc(max(readings, 1))
        self._metrics.dead_letters.labels(reason.value).inc()
        self.pending.batch.dead_letters.append(
            DeadLetter(
                topic=message.topic,
                device=device,
                reason=reason.value,
                detail=detail,
                readings=readings,
                content_type=message.content_type,
                payload=message.payload,
                received_at=_datetime(message.received_us),
            )
        )


def _datetime(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)
