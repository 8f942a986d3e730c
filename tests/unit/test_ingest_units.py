"""Ingest pieces without services: COPY encoding, retry classification, backoff, rollup marks."""

from __future__ import annotations

import random
import struct
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from cityops.db.retry import Backoff, is_transient
from cityops.errors import DatabaseError
from ingest import copy
from ingest.batch import Batch, MessageSource, Segment
from ingest.rollups import RollupTracker
from ingest.writer import DAY_US, WriteResult, _runs

SOURCE = MessageSource("t", b"", None, 0)


def decode_copy(data: bytes) -> list[tuple[int, int, int, float, int]]:
    assert data.startswith(copy.HEADER) and data.endswith(copy.TRAILER)
    body = data[len(copy.HEADER) : -len(copy.TRAILER)]
    row = struct.Struct("!hiqiiihidih")
    out = []
    for fields in row.iter_unpack(body):
        assert fields[0] == 5 and fields[1::2][:5] == (8, 4, 2, 8, 2)
        out.append((fields[2], fields[4], fields[6], fields[8], fields[10]))
    return out


def test_copy_encodes_every_row_with_its_device_and_pg_epoch() -> None:
    segments = [
        Segment(7, [(1_732_170_000_123_000, 60, 35.2, 0), (1_732_170_000_124_000, 61, -1.5, 1)], SOURCE),
        Segment(9, [(946_684_800_000_000, 20, 16.0, 2)], SOURCE),
    ]
    rows = decode_copy(copy.encode(segments))
    assert rows == [
        (1_732_170_000_123_000 - copy.PG_EPOCH_OFFSET_US, 7, 60, 35.2, 0),
        (1_732_170_000_124_000 - copy.PG_EPOCH_OFFSET_US, 7, 61, -1.5, 1),
        (0, 9, 20, 16.0, 2),
    ]


def test_batch_tracks_its_time_span() -> None:
    batch = Batch()
    assert not batch and batch.time_range_us() is None
    batch.add_segment(Segment(1, [(50, 1, 1.0, 0), (20, 1, 1.0, 0)], SOURCE))
    batch.add_segment(Segment(2, [(90, 1, 1.0, 0)], SOURCE))
    batch.add_segment(Segment(3, [], SOURCE))
    assert batch and batch.rows == 3 and batch.time_range_us() == (20, 90)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (psycopg.OperationalError("connection lost"), True),
        (psycopg.errors.AdminShutdown(), True),
        (psycopg.errors.SerializationFailure(), True),
        (psycopg.errors.DeadlockDetected(), True),
        (psycopg.errors.TooManyConnections(), True),
        (psycopg.errors.DiskFull(), True),
        (psycopg.errors.QueryCanceled(), False),
        (psycopg.errors.NumericValueOutOfRange(), False),
        (psycopg.errors.UniqueViolation(), False),
        (psycopg.errors.UndefinedTable(), False),
        (ValueError("bug"), False),
        (ConnectionRefusedError(), True),
    ],
)
def test_transient_errors(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_translated_errors_are_judged_by_their_cause() -> None:
    translated = DatabaseError("cannot connect")
    translated.__cause__ = psycopg.OperationalError("server closed the connection")
    assert is_transient(translated)
    assert not is_transient(DatabaseError("no cause"))


def test_backoff_is_capped_jittered_and_resets() -> None:
    backoff = Backoff(base_s=0.1, cap_s=2.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(12)]
    ceilings = [min(2.0, 0.1 * 2**i) for i in range(12)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, never in lock step
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_day_runs() -> None:
    assert _runs([]) == []
    assert _runs([3, 4, 5, 9, 11, 12]) == [(3, 5), (9, 9), (11, 12)]


def result(first_us: int, last_us: int, devices: set[int], inserted: int = 1) -> WriteResult:
    return WriteResult(1, inserted, False, 0, (first_us, last_us), frozenset(devices))


def test_rollup_marks_split_by_day_and_merge() -> None:
    tracker = RollupTracker()
    day = 20_000 * DAY_US
    tracker.note(result(day + 10, day + 20, {1}))
    tracker.note(result(day + 5, day + DAY_US + 7, {2}))  # spans midnight
    tracker.note(result(day + 1, day + 2, {3}, inserted=0))  # all duplicates: nothing to refresh
    marks = tracker.take()
    as_us = [(int(a.timestamp() * 1e6), int(b.timestamp() * 1e6), d) for a, b, d in marks]
    assert as_us == [(day + 5, day + DAY_US - 1, [1, 2]), (day + DAY_US, day + DAY_US + 7, [2])]
    assert tracker.take() == []


def test_rollup_marks_survive_a_failed_refresh() -> None:
    tracker = RollupTracker()
    now = datetime(2026, 11, 21, 12, tzinfo=UTC)
    tracker.note_everything(now - timedelta(minutes=5), now)
    marks = tracker.take()
    assert marks[0][2] is None  # every device
    tracker.restore(marks)
    assert tracker.oldest_pending() == now - timedelta(minutes=5)
    assert tracker.take() == marks
