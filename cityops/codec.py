"""Payload codec of the wire contract (DESIGN §3): JSON or MessagePack, four shapes.

Decoding never raises on input: every payload yields rows, rejects, or both. Structure problems of
the whole message reject it whole; a problem with one reading rejects that reading only, so one bad
sensor on a multi-sensor gateway does not cost the others their readings.

The per-reading loop is hand-written (no pydantic): a dict lookup, a type check, a finite check and a
tuple. Validation that needs the database (device known and enabled) is the gateway's, per message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgpack
import orjson

from cityops.catalogue import Catalogue
from cityops.model import Quality, RejectReason, Row

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Devices without a real-time clock report 1970 or 2000-era times; such a ts is a fault, not backfill.
MIN_TIME_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z
_MIN_TIME_MS = MIN_TIME_US // 1000
_RESERVED_KEYS = frozenset(("ts", "seq"))
_DETAIL_MAX = 200
# Plain ints: IntFlag arithmetic costs a method call per reading.
_OUT_OF_RANGE = int(Quality.OUT_OF_RANGE)
_RECEIVE_TIME = int(Quality.RECEIVE_TIME)


class Encoding(StrEnum):
    JSON = "json"
    MSGPACK = "msgpack"

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES[self]


_CONTENT_TYPES = {Encoding.JSON: "application/json", Encoding.MSGPACK: "application/msgpack"}
_ENCODING_BY_CONTENT_TYPE = {
    "application/json": Encoding.JSON,
    "text/json": Encoding.JSON,
    "application/msgpack": Encoding.MSGPACK,
    "application/x-msgpack": Encoding.MSGPACK,
    "application/vnd.msgpack": Encoding.MSGPACK,
}


@dataclass(slots=True)
class Reject:
    reason: RejectReason
    detail: str
    count: int = 1


@dataclass(slots=True)
class Decoded:
    """What one message produced: rows to store, and rejects to dead-letter (per reason)."""

    rows: list[Row] = field(default_factory=list)
    rejects: dict[RejectReason, Reject] = field(default_factory=dict)
    seq: int | None = None

    def reject(self, reason: RejectReason, detail: str) -> None:
        existing = self.rejects.get(reason)
        if existing is None:
            self.rejects[reason] = Reject(reason, detail[:_DETAIL_MAX])
        else:
            existing.count += 1

    @property
    def rejected_readings(self) -> int:
        return sum(r.count for r in self.rejects.values())


class _MalformedError(Exception):
    """Internal: the whole message is unusable."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def detect_encoding(payload: bytes, content_type: str | None) -> Encoding | None:
    """MQTT 5 content type decides when present; else the first non-blank byte (``{``/``[`` is JSON)."""
    if content_type:
        return _ENCODING_BY_CONTENT_TYPE.get(content_type.split(";", 1)[0].strip().lower())
    first = payload[:1]
    if first in b" \t\r\n":  # rare: JSON with leading blanks (b"" is "in" too, and falls through)
        first = payload.lstrip(b" \t\r\n")[:1]
    return Encoding.JSON if first in (b"{", b"[") else Encoding.MSGPACK


def parse_document(payload: bytes, encoding: Encoding) -> Any:
    """The foreign parsers' errors end here: any failure is a malformed payload."""
    try:
        if encoding is Encoding.JSON:
            return orjson.loads(payload)
        return msgpack.unpackb(payload, raw=False, strict_map_key=False, timestamp=0)
    except Exception as exc:
        raise _MalformedError(RejectReason.MALFORMED_PAYLOAD, f"{encoding.value}: {exc}") from None


class Decoder:
    """Turns payloads into rows for one catalogue and clock-skew tolerance."""

    def __init__(self, catalogue: Catalogue, max_clock_skew_s: float) -> None:
        self._metrics: dict[Any, tuple[int, float, float]] = {
            m.name: (m.id, m.min, m.max) for m in catalogue.metrics.values()
        }
        self._skew_us = int(max_clock_skew_s * 1_000_000)

    def decode(self, payload: bytes, content_type: str | None, received_us: int) -> Decoded:
        out = Decoded()
        try:
            if not payload:
                raise _MalformedError(RejectReason.EMPTY_PAYLOAD, "empty payload")
            encoding = detect_encoding(payload, content_type)
            if encoding is None:
                raise _MalformedError(RejectReason.UNSUPPORTED_CONTENT_TYPE, f"content type {content_type!r}")
            self._document(parse_document(payload, encoding), out, received_us)
        except _MalformedError as exc:
            out.rows.clear()
            out.reject(exc.reason, exc.detail)
        return out

    # --- shapes ------------------------------------------------------------------------------------
    def _document(self, doc: Any, out: Decoded, received_us: int) -> None:
        if type(doc) is dict:
            self._object(doc, out, received_us)
        elif type(doc) is list:
            if not doc:
                raise _MalformedError(RejectReason.EMPTY_PAYLOAD, "empty list")
            self._list(doc, out, received_us)
        else:
            raise _MalformedError(RejectReason.MALFORMED_PAYLOAD, f"top level is {type(doc).__name__}")

    def _list(self, items: list[Any], out: Decoded, received_us: int) -> None:
        metrics = self._metrics
        rows = out.rows
        max_us = received_us + self._skew_us
        max_ms = max_us // 1000
        for item in items:
            kind = type(item)
            if kind is list or kind is tuple:
                # compact fast path: [ts_ms, "metric", value]; the common types are checked inline
                # because a call per reading is a fifth of the whole cost here
                if len(item) != 3:
                    out.reject(RejectReason.MALFORMED_PAYLOAD, f"compact item of length {len(item)}")
                    continue
                raw_ts, name, raw_value = item
                if type(raw_ts) is int and _MIN_TIME_MS <= raw_ts <= max_ms:
                    time_us = raw_ts * 1000
                else:
                    parsed = self._time(raw_ts, out, max_us)
                    if parsed is None:
                        continue
                    time_us = parsed
                spec = metrics.get(name) if type(name) is str else None
                if spec is None:
                    out.reject(RejectReason.UNKNOWN_METRIC, f"unknown metric {_short(name)}")
                    continue
                if type(raw_value) is float and raw_value - raw_value == 0.0:
                    value = raw_value
                else:
                    checked = _number(raw_value, out)
                    if checked is None:
                        continue
                    value = checked
                rows.append((time_us, spec[0], value, 0 if spec[1] <= value <= spec[2] else _OUT_OF_RANGE))
            elif kind is dict:
                self._object(item, out, received_us)
            else:
                out.reject(RejectReason.MALFORMED_PAYLOAD, f"batch item is {kind.__name__}")

    def _object(self, obj: dict[Any, Any], out: Decoded, received_us: int) -> None:
        seq = obj.get("seq")
        if seq is not None:
            if type(seq) is int and seq >= 0:
                out.seq = seq if out.seq is None else max(out.seq, seq)
            else:
                out.reject(
                    RejectReason.MALFORMED_PAYLOAD, f"seq must be a non-negative integer: {_short(seq)}"
                )
                return
        values: Any
        if "values" in obj:
            values = obj["values"]
            if type(values) is not dict:
                out.reject(RejectReason.MALFORMED_PAYLOAD, "'values' must be an object")
                return
            items: Iterable[tuple[Any, Any]] = values.items()
        else:
            items = ((k, v) for k, v in obj.items() if k not in _RESERVED_KEYS)
        raw_ts = obj.get("ts")
        time_us: int
        if raw_ts is None:
            time_us, base_quality = received_us, _RECEIVE_TIME
        else:
            parsed = self._time(raw_ts, out, received_us + self._skew_us)
            if parsed is None:
                return
            time_us, base_quality = parsed, 0
        metrics = self._metrics
        rows = out.rows
        for name, raw_value in items:
            spec = metrics.get(name) if type(name) is str else None
            if spec is None:
                out.reject(RejectReason.UNKNOWN_METRIC, f"unknown metric {_short(name)}")
                continue
            if type(raw_value) is float and raw_value - raw_value == 0.0:
                value = raw_value
            else:
                checked = _number(raw_value, out)
                if checked is None:
                    continue
                value = checked
            quality = base_quality if spec[1] <= value <= spec[2] else base_quality | _OUT_OF_RANGE
            rows.append((time_us, spec[0], value, quality))

    # --- fields ------------------------------------------------------------------------------------
    def _time(self, raw: Any, out: Decoded, max_us: int) -> int | None:
        kind = type(raw)
        time_us: int
        if kind is int:
            time_us = raw * 1000
        elif kind is float:
            scaled = raw * 1000.0
            if scaled - scaled != 0.0:  # NaN, ±inf, or so large that scaling overflowed
                out.reject(RejectReason.INVALID_TIMESTAMP, f"ts is {raw}")
                return None
            time_us = int(scaled)
        elif kind is str:
            parsed = _parse_rfc3339(raw)
            if parsed is None:
                out.reject(
                    RejectReason.INVALID_TIMESTAMP, f"ts is not RFC 3339 with an offset: {_short(raw)}"
                )
                return None
            time_us = parsed
        elif isinstance(raw, msgpack.Timestamp):
            time_us = raw.to_unix_nano() // 1000
        else:
            out.reject(
                RejectReason.INVALID_TIMESTAMP, f"ts must be epoch ms or RFC 3339, got {kind.__name__}"
            )
            return None
        if time_us < MIN_TIME_US:
            out.reject(RejectReason.INVALID_TIMESTAMP, f"ts {_short(raw)} is before 2000-01-01")
            return None
        if time_us > max_us:
            out.reject(RejectReason.CLOCK_SKEW, f"ts {_short(raw)} is ahead of the receive time")
            return None
        return time_us


def _number(raw: Any, out: Decoded) -> float | None:
    kind = type(raw)
    if kind is float:
        value: float = raw
    elif kind is int or kind is bool:
        try:
            value = float(raw)
        except OverflowError:
            out.reject(RejectReason.NON_FINITE_VALUE, f"value {_short(raw)} overflows a double")
            return None
    else:
        out.reject(RejectReason.INVALID_VALUE, f"value must be a number, got {kind.__name__}")
        return None
    if value - value != 0.0:  # NaN and ±inf; cheaper than a call to math.isfinite
        out.reject(RejectReason.NON_FINITE_VALUE, f"value is {value}")
        return None
    return value


def _parse_rfc3339(text: str) -> int | None:
    if not 10 <= len(text) <= 40:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return (parsed - EPOCH) // _ONE_MICROSECOND


_ONE_MICROSECOND = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - EPOCH


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- encoders (the simulator and the device agent use these) --------------------------------------
def _dump(doc: Any, encoding: Encoding) -> bytes:
    if encoding is Encoding.JSON:
        return orjson.dumps(doc)
    packed: bytes = msgpack.packb(doc, use_bin_type=True)
    return packed


def _object_doc(values: Mapping[str, float], ts_ms: int | None, seq: int | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"ts": ts_ms, "values": dict(values)} if ts_ms is not None else dict(values)
    if seq is not None:
        doc["seq"] = seq
    return doc


def encode_values(
    values: Mapping[str, float],
    ts_ms: int | None = None,
    *,
    seq: int | None = None,
    encoding: Encoding = Encoding.JSON,
) -> bytes:
    """``{"ts": …, "values": {…}}``, or the flat ``{"pm25": …}`` when there is no timestamp."""
    return _dump(_object_doc(values, ts_ms, seq), encoding)


def encode_batch(
    items: Sequence[tuple[int | None, Mapping[str, float]]],
    *,
    seq: int | None = None,
    encoding: Encoding = Encoding.JSON,
) -> bytes:
    """A list of timestamped value objects; ``seq``, when given, rides on the last one."""
    docs = [_object_doc(values, ts_ms, None) for ts_ms, values in items]
    if seq is not None and docs:
        docs[-1]["seq"] = seq
    return _dump(docs, encoding)


def encode_compact(
    readings: Iterable[tuple[int, str, float]], *, encoding: Encoding = Encoding.MSGPACK
) -> bytes:
    """``[[ts_ms, "metric", value], …]``: the fast path for high-rate devices."""
    return _dump([list(r) for r in readings], encoding)
