"""The wire codec: every shape, every reject reason, and property tests over arbitrary input."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cityops.catalogue import Catalogue, load_default_catalogue
from cityops.codec import (
    Decoded,
    Decoder,
    Encoding,
    detect_encoding,
    encode_batch,
    encode_compact,
    encode_values,
)
from cityops.model import Quality, RejectReason

CATALOGUE = load_default_catalogue()
NOW_MS = 1_763_700_000_000  # 2025-11-21T04:40:00Z
NOW_US = NOW_MS * 1000
PM25 = CATALOGUE.metrics["pm25"].id
PM10 = CATALOGUE.metrics["pm10"].id


@pytest.fixture
def decoder() -> Decoder:
    return Decoder(CATALOGUE, max_clock_skew_s=300)


def decode(decoder: Decoder, payload: bytes, content_type: str | None = None) -> Decoded:
    return decoder.decode(payload, content_type, NOW_US)


def reasons(out: Decoded) -> set[str]:
    return {r.value for r in out.rejects}


class TestShapes:
    def test_ts_values_object(self, decoder: Decoder) -> None:
        out = decode(decoder, b'{"ts": 1732170000123, "values": {"pm25": 35.2, "pm10": 61}}')
        assert out.rows == [(1732170000123000, PM25, 35.2, 0), (1732170000123000, PM10, 61.0, 0)]
        assert out.rejects == {}

    def test_rfc3339_timestamp(self, decoder: Decoder) -> None:
        out = decode(decoder, b'{"ts": "2024-11-21T06:20:00.5+08:00", "values": {"pm25": 1}}')
        expected = int(datetime(2024, 11, 20, 22, 20, 0, 500000, tzinfo=UTC).timestamp() * 1_000_000)
        assert out.rows == [(expected, PM25, 1.0, 0)]

    def test_flat_object_uses_receive_time_and_flags_it(self, decoder: Decoder) -> None:
        out = decode(decoder, b'{"pm25": 35.2}')
        assert out.rows == [(NOW_US, PM25, 35.2, Quality.RECEIVE_TIME)]

    def test_flat_object_with_ts_and_seq(self, decoder: Decoder) -> None:
        out = decode(decoder, b'{"ts": 1732170000000, "seq": 17, "pm10": 3}')
        assert out.rows == [(1732170000000000, PM10, 3.0, 0)]
        assert out.seq == 17

    def test_batch_of_objects(self, decoder: Decoder) -> None:
        payload = orjson.dumps([{"ts": 1732170000000, "values": {"pm25": 1}}, {"pm10": 2, "seq": 4}])
        out = decode(decoder, payload)
        assert out.rows == [(1732170000000000, PM25, 1.0, 0), (NOW_US, PM10, 2.0, Quality.RECEIVE_TIME)]
        assert out.seq == 4

    def test_compact_list(self, decoder: Decoder) -> None:
        payload = msgpack.packb([[1732170000000, "pm25", 1.5], [1732170000001, "pm10", 7]])
        out = decode(decoder, payload)
        assert out.rows == [(1732170000000000, PM25, 1.5, 0), (1732170000001000, PM10, 7.0, 0)]

    def test_compact_json_list(self, decoder: Decoder) -> None:
        out = decode(decoder, b'[[1732170000000, "pm25", 2]]')
        assert out.rows == [(1732170000000000, PM25, 2.0, 0)]

    def test_msgpack_timestamp_extension(self, decoder: Decoder) -> None:
        stamp = msgpack.Timestamp.from_unix_nano(1732170000123456000)
        out = decode(decoder, msgpack.packb({"ts": stamp, "values": {"pm25": 1}}))
        assert out.rows == [(1732170000123456, PM25, 1.0, 0)]

    def test_out_of_range_is_stored_with_flag(self, decoder: Decoder) -> None:
        out = decode(decoder, b'{"ts": 1732170000000, "values": {"pm25": -5, "pm10": 10}}')
        assert out.rows == [
            (1732170000000000, PM25, -5.0, Quality.OUT_OF_RANGE),
            (1732170000000000, PM10, 10.0, 0),
        ]

    def test_boolean_values_are_numbers(self, decoder: Decoder) -> None:
        out = decode(decoder, b'{"ts": 1732170000000, "values": {"gas_meter_leak": true}}')
        assert [r[2] for r in out.rows] == [1.0]

    def test_old_timestamps_are_backfill_not_rejects(self, decoder: Decoder) -> None:
        out = decode(decoder, b'{"ts": 1262304000000, "values": {"pm25": 1}}')  # 2010
        assert len(out.rows) == 1 and out.rejects == {}


class TestRejects:
    @pytest.mark.parametrize(
        ("payload", "reason"),
        [
            (b"", "empty_payload"),
            (b"[]", "empty_payload"),
            (b"{bad json", "malformed_payload"),
            (b"42", "malformed_payload"),
            (b"\xc1", "malformed_payload"),  # never-used msgpack byte
            (b'[[1732170000000, "pm25"]]', "malformed_payload"),
            (b'["pm25"]', "malformed_payload"),
            (b'{"ts": 1732170000000, "values": [1, 2]}', "malformed_payload"),
            (b'{"seq": -1, "pm25": 1}', "malformed_payload"),
            (b'{"ts": 1732170000000, "values": {"nope": 1}}', "unknown_metric"),
            (b"[[1732170000000, 5, 1]]", "unknown_metric"),
            (b'{"ts": 1732170000000, "values": {"pm25": "high"}}', "invalid_value"),
            (b'{"ts": 1732170000000, "values": {"pm25": null}}', "invalid_value"),
            (b'{"ts": 1732170000000, "values": {"pm25": 1e400}}', "malformed_payload"),
            (b'{"ts": "yesterday", "values": {"pm25": 1}}', "invalid_timestamp"),
            (b'{"ts": "2024-11-21T06:20:00", "values": {"pm25": 1}}', "invalid_timestamp"),
            (b'{"ts": 5, "values": {"pm25": 1}}', "invalid_timestamp"),
            (b'{"ts": true, "values": {"pm25": 1}}', "invalid_timestamp"),
            (orjson.dumps({"ts": NOW_MS + 301_000, "values": {"pm25": 1}}), "clock_skew"),
        ],
    )
    def test_reason(self, decoder: Decoder, payload: bytes, reason: str) -> None:
        out = decode(decoder, payload)
        assert reasons(out) == {reason}
        assert out.rows == []

    def test_non_finite_msgpack_values(self, decoder: Decoder) -> None:
        payload = msgpack.packb(
            {"ts": 1732170000000, "values": {"pm25": math.nan, "pm10": math.inf, "o3": 1}}
        )
        out = decode(decoder, payload)
        assert reasons(out) == {"non_finite_value"}
        assert out.rejects[RejectReason.NON_FINITE_VALUE].count == 2
        assert [r[1] for r in out.rows] == [CATALOGUE.metrics["o3"].id]

    def test_huge_integer_is_non_finite(self, decoder: Decoder) -> None:
        out = decode(decoder, msgpack.packb([[1732170000000, "pm25", 2**63]]) + b"")
        assert out.rows == [(1732170000000000, PM25, float(2**63), 1)]
        out = decode(decoder, b'{"ts": 1732170000000, "values": {"pm25": ' + b"9" * 400 + b"}}")
        assert out.rows == []
        assert reasons(out) <= {"non_finite_value", "malformed_payload"}

    def test_clock_skew_within_tolerance_is_accepted(self, decoder: Decoder) -> None:
        out = decode(decoder, orjson.dumps({"ts": NOW_MS + 299_000, "values": {"pm25": 1}}))
        assert len(out.rows) == 1

    def test_one_bad_reading_does_not_cost_the_others(self, decoder: Decoder) -> None:
        payload = orjson.dumps(
            [[1732170000000, "pm25", 1], [1732170000000, "bogus", 2], [1732170000000, "pm10", 3]]
        )
        out = decode(decoder, payload)
        assert [r[1] for r in out.rows] == [PM25, PM10]
        assert out.rejects[RejectReason.UNKNOWN_METRIC].count == 1
        assert "bogus" in out.rejects[RejectReason.UNKNOWN_METRIC].detail

    def test_unsupported_content_type(self, decoder: Decoder) -> None:
        out = decode(decoder, b'{"pm25": 1}', "text/csv")
        assert reasons(out) == {"unsupported_content_type"}


class TestEncodingDetection:
    def test_content_type_wins(self) -> None:
        assert detect_encoding(b"{}", "application/msgpack") is Encoding.MSGPACK
        assert detect_encoding(b"\x81", "application/json; charset=utf-8") is Encoding.JSON

    def test_first_byte(self) -> None:
        assert detect_encoding(b'  {"a":1}', None) is Encoding.JSON
        assert detect_encoding(b"[1]", None) is Encoding.JSON
        assert detect_encoding(b"\x91\x01", None) is Encoding.MSGPACK


# --- property tests ---------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=40,
)
metric_names = st.sampled_from(sorted(CATALOGUE.metrics)) | st.text(max_size=10)
ts_values = st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=30) | st.none()
shaped = st.one_of(
    st.fixed_dictionaries(
        {"ts": ts_values, "values": st.dictionaries(metric_names, json_scalars, max_size=5)}
    ),
    st.dictionaries(metric_names, json_scalars, max_size=5),
    st.lists(st.tuples(ts_values, metric_names, json_scalars | st.floats()).map(list), max_size=8),
)
msgpack_values = st.recursive(
    json_scalars | st.floats() | st.binary(max_size=10),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=12) | st.integers(), children, max_size=6)
    ),
    max_leaves=40,
)


def assert_well_formed(out: Decoded) -> None:
    assert out.rows or out.rejects or out.rows == []
    for time_us, metric_id, value, quality in out.rows:
        assert type(time_us) is int and metric_id in CATALOGUE.by_id
        assert math.isfinite(value) and quality in (0, 1, 2, 3)
    for reject in out.rejects.values():
        assert isinstance(reject.reason, RejectReason) and reject.count >= 1


PROPERTY = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    assert_well_formed(Decoder(CATALOGUE, 300).decode(payload, None, NOW_US))


@PROPERTY
@given(json_values | shaped)
def test_arbitrary_json_never_raises(doc: object) -> None:
    try:
        payload = orjson.dumps(doc)
    except (orjson.JSONEncodeError, TypeError):
        return
    assert_well_formed(Decoder(CATALOGUE, 300).decode(payload, None, NOW_US))


@PROPERTY
@given(msgpack_values | shaped)
def test_arbitrary_msgpack_never_raises(doc: object) -> None:
    try:
        payload = msgpack.packb(doc, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return
    assert_well_formed(Decoder(CATALOGUE, 300).decode(payload, None, NOW_US))


# --- round trips --------------------------------------------------------------------------------
known_metrics = st.sampled_from(sorted(CATALOGUE.metrics))
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
past_ms = st.integers(min_value=946_684_800_000, max_value=NOW_MS)
encodings = st.sampled_from(list(Encoding))


def expected_row(ts_ms: int, name: str, value: float, base: int = 0) -> tuple[int, int, float, int]:
    metric = CATALOGUE.metrics[name]
    flag = 0 if metric.min <= value <= metric.max else int(Quality.OUT_OF_RANGE)
    return (ts_ms * 1000, metric.id, value, base | flag)


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(known_metrics, finite, min_size=1, max_size=8),
    past_ms,
    encodings,
    st.none() | st.integers(0, 2**31),
)
def test_round_trip_ts_values(
    values: dict[str, float], ts_ms: int, encoding: Encoding, seq: int | None
) -> None:
    out = Decoder(CATALOGUE, 300).decode(
        encode_values(values, ts_ms, seq=seq, encoding=encoding), None, NOW_US
    )
    assert out.rejects == {}
    assert out.rows == [expected_row(ts_ms, n, v) for n, v in values.items()]
    assert out.seq == seq


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(known_metrics, finite, min_size=1, max_size=8), encodings)
def test_round_trip_flat(values: dict[str, float], encoding: Encoding) -> None:
    out = Decoder(CATALOGUE, 300).decode(
        encode_values(values, encoding=encoding), encoding.content_type, NOW_US
    )
    assert out.rows == [expected_row(NOW_MS, n, v, int(Quality.RECEIVE_TIME)) for n, v in values.items()]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(past_ms, st.dictionaries(known_metrics, finite, min_size=1, max_size=4)),
        min_size=1,
        max_size=10,
    ),
    encodings,
)
def test_round_trip_batch(items: list[tuple[int, dict[str, float]]], encoding: Encoding) -> None:
    out = Decoder(CATALOGUE, 300).decode(encode_batch(items, seq=9, encoding=encoding), None, NOW_US)
    assert out.rows == [expected_row(ts, n, v) for ts, values in items for n, v in values.items()]
    assert out.seq == 9


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(past_ms, known_metrics, finite), min_size=1, max_size=50), encodings)
def test_round_trip_compact(readings: list[tuple[int, str, float]], encoding: Encoding) -> None:
    out = Decoder(CATALOGUE, 300).decode(encode_compact(readings, encoding=encoding), None, NOW_US)
    assert out.rejects == {}
    assert out.rows == [expected_row(ts, n, v) for ts, n, v in readings]


def test_catalogue_type_is_used() -> None:
    assert isinstance(CATALOGUE, Catalogue)
