"""The batching writer's database half: one transaction per batch, retried until it commits.

A batch goes in by binary COPY straight into ``readings``. When that hits a unique violation (a
redelivered message, or a duplicate inside the batch) the same rows go through a staging table and
``INSERT … ON CONFLICT DO NOTHING`` instead, so duplicates never land and the stream never blocks.
Transient errors are retried with backoff while nothing is acknowledged; a permanent data error is
narrowed down to the messages that cause it, which become dead letters, and the rest commits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg import errors as pg_errors

from cityops.db.connection import AsyncConn, OwnConnection
from cityops.db.maintenance import ensure_partitions
from cityops.db.retry import Backoff, is_transient
from cityops.model import RejectReason
from cityops.settings import StorageMode
from ingest import copy
from ingest.batch import Batch, DeadLetter, Segment
from ingest.metrics import IngestMetrics

log = logging.getLogger(__name__)

DAY_US = 86_400_000_000
# Beyond this span a batch's days are listed exactly instead of assumed contiguous (rare backfill).
CONTIGUOUS_DAYS_MAX = 62
_STAGE = "readings_stage"
_CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE readings INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class WriteResult:
    rows_offered: int
    rows_inserted: int
    merged: bool
    dead_letters: int
    time_range_us: tuple[int, int] | None
    device_ids: frozenset[int] = field(default_factory=frozenset)
    # The segments with only the rows this write inserted (a redelivered row is not among them): what
    # the rules evaluate, so that the same readings twice never count twice.
    inserted: list[Segment] = field(default_factory=list)


class BatchWriter:
    """Writes batches over one connection of its own, reconnecting as needed."""

    def __init__(
        self,
        database_url: str,
        mode: StorageMode,
        metrics: IngestMetrics,
        *,
        backoff: Backoff | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._mode = mode
        self._metrics = metrics
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._conn = OwnConnection(database_url)
        self._known_days: set[int] = set()

    async def close(self) -> None:
        await self._conn.drop()

    async def write(self, batch: Batch) -> WriteResult:
        """Commit ``batch``; returns only once it is durable (cancel the call to give up)."""
        while True:
            try:
                conn = await self._conn.get()
                if self._mode is StorageMode.NATIVE:
                    await self._ensure_partitions(conn, batch)
                started = time.perf_counter()
                result = await self._commit_isolating(conn, batch)
                self._metrics.commit_seconds.observe(time.perf_counter() - started)
                self._metrics.db_up.set(1)
                self._backoff.reset()
                return result
            except pg_errors.CheckViolation as exc:
                # Retention dropped a day we thought existed: relearn the partitions, once.
                if not _is_missing_partition(exc) or not self._known_days:
                    raise
                self._known_days.clear()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                await self._after_transient(exc)

    async def _after_transient(self, exc: BaseException) -> None:
        self._metrics.retries.inc()
        self._metrics.db_up.set(0)
        delay = self._backoff.next_delay()
        log.warning(
            "database unavailable; batch kept, retrying",
            extra={"error": str(exc).strip()[:200], "retry_in_s": round(delay, 2)},
        )
        await self._conn.drop()
        await self._sleep(delay)

    # --- partitions (native mode) ---------------------------------------------------------------
    async def _ensure_partitions(self, conn: AsyncConn, batch: Batch) -> None:
        span = batch.time_range_us()
        if span is None:
            return
        first, last = span[0] // DAY_US, span[1] // DAY_US
        if last - first <= CONTIGUOUS_DAYS_MAX:
            days = set(range(first, last + 1))
        else:
            days = {t // DAY_US for s in batch.segments for t, *_ in s.rows}
        missing = sorted(days - self._known_days)
        for run_first, run_last in _runs(missing):
            created = await ensure_partitions(conn, _day(run_first), _day(run_last))
            if created:
                log.info(
                    "created partitions",
                    extra={"first": str(_day(run_first)), "last": str(_day(run_last)), "count": created},
                )
        self._known_days.update(missing)

    # --- commit --------------------------------------------------------------------------------
    async def _commit_isolating(self, conn: AsyncConn, batch: Batch) -> WriteResult:
        try:
            return await self._commit(conn, batch)
        except psycopg.Error as exc:
            if is_transient(exc) or not _is_data_error(exc):
                raise
            log.warning(
                "data error in a batch; isolating its messages", extra={"error": str(exc).strip()[:200]}
            )
            return await self._isolate(conn, batch, exc)

    async def _isolate(self, conn: AsyncConn, batch: Batch, exc: psycopg.Error) -> WriteResult:
        """Split the batch until the failing messages are alone; dead-letter those, commit the rest."""
        if len(batch.segments) <= 1:
            culprit = Batch(
                dead_letters=[*batch.dead_letters, *(_dead_letter(s, exc) for s in batch.segments)],
                statuses=batch.statuses,
            )
            self._metrics.data_errors.inc(len(batch.segments))
            return await self._commit(conn, culprit)
        middle = len(batch.segments) // 2
        head = Batch(dead_letters=batch.dead_letters, statuses=batch.statuses)
        tail = Batch()
        for index, segment in enumerate(batch.segments):
            (head if index < middle else tail).add_segment(segment)
        results = [await self._commit_isolating(conn, part) for part in (head, tail)]
        return _combine(results)

    async def _commit(self, conn: AsyncConn, batch: Batch) -> WriteResult:
        merged = False
        segments = batch.segments
        async with conn.transaction():
            if batch.segments:
                try:
                    async with conn.transaction():  # savepoint: a unique violation undoes only the COPY
                        await _copy_readings(conn, "readings", batch.segments)
                except pg_errors.UniqueViolation:
                    merged = True
                    segments = await _merge_through_stage(conn, batch.segments)
            if batch.dead_letters:
                await _write_dead_letters(conn, batch.dead_letters)
            if batch.statuses:
                await _write_statuses(conn, batch)
        inserted = sum(len(s.rows) for s in segments)
        self._metrics.rows_inserted.inc(inserted)
        self._metrics.rows_duplicate.inc(batch.rows - inserted)
        if merged:
            self._metrics.merged_batches.inc()
        return WriteResult(
            rows_offered=batch.rows,
            rows_inserted=inserted,
            merged=merged,
            dead_letters=len(batch.dead_letters),
            time_range_us=batch.time_range_us(),
            device_ids=frozenset(s.device_id for s in batch.segments),
            inserted=segments,
        )


async def _copy_readings(conn: AsyncConn, table: str, segments: list[Segment]) -> None:
    data = copy.encode(segments)
    async with (
        conn.cursor() as cur,
        cur.copy(f"COPY {table} {copy.COLUMNS} FROM STDIN (FORMAT BINARY)") as pipe,
    ):
        await pipe.write(data)


async def _merge_through_stage(conn: AsyncConn, segments: list[Segment]) -> list[Segment]:
    """Insert what is new; the segments cut down to the rows that were inserted."""
    await conn.execute(_CREATE_STAGE)
    await _copy_readings(conn, _STAGE, segments)
    cursor = await conn.execute(
        f"INSERT INTO readings {copy.COLUMNS} "
        f"SELECT time, device_id, metric_id, value, quality FROM {_STAGE} "
        "ON CONFLICT (device_id, metric_id, time) DO NOTHING "
        "RETURNING device_id, metric_id, (extract(epoch FROM time) * 1000000)::bigint"
    )
    new = set(await cursor.fetchall())
    await conn.execute(f"TRUNCATE {_STAGE}")
    kept: list[Segment] = []
    for segment in segments:
        rows = []
        for row in segment.rows:
            key = (segment.device_id, row[1], row[0])
            if key in new:
                new.discard(key)  # a duplicate inside the batch was inserted once
                rows.append(row)
        if rows:
            kept.append(Segment(segment.device_id, rows, segment.source, segment.device))
    return kept


async def _write_dead_letters(conn: AsyncConn, letters: list[DeadLetter]) -> None:
    async with (
        conn.cursor() as cur,
        cur.copy(
            "COPY dead_letters (received_at, topic, device, reason, detail, readings, content_type, payload) "
            "FROM STDIN"
        ) as pipe,
    ):
        for d in letters:
            await pipe.write_row(
                (
                    d.received_at,
                    d.topic,
                    d.device,
                    d.reason,
                    d.detail,
                    d.readings,
                    d.content_type,
                    d.payload,
                )
            )


async def _write_statuses(conn: AsyncConn, batch: Batch) -> None:
    latest: dict[int, tuple[str, datetime]] = {}
    for update in batch.statuses:
        known = latest.get(update.device_id)
        if known is None or known[1] <= update.at:
            latest[update.device_id] = (update.status, update.at)
    ids = sorted(latest)  # one lock order for every pipeline: no deadlocks between them
    await conn.execute(
        """
        UPDATE devices d SET status = s.status, status_at = s.at
        FROM unnest(%s::int[], %s::text[], %s::timestamptz[]) AS s(id, status, at)
        WHERE d.id = s.id AND (d.status_at IS NULL OR d.status_at <= s.at)
        """,
        (ids, [latest[i][0] for i in ids], [latest[i][1] for i in ids]),
    )


def _is_data_error(exc: psycopg.Error) -> bool:
    if _is_missing_partition(exc):
        return False  # our bookkeeping, not the data: write() relearns the partitions
    state = exc.sqlstate or ""
    return state.startswith(("22", "23"))


def _is_missing_partition(exc: BaseException) -> bool:
    return isinstance(exc, pg_errors.CheckViolation) and "no partition" in str(exc)


def _dead_letter(segment: Segment, exc: psycopg.Error) -> DeadLetter:
    source = segment.source
    return DeadLetter(
        topic=source.topic,
        device=segment.device,
        reason=RejectReason.DATA_ERROR.value,
        detail=f"{exc.sqlstate}: {str(exc).strip()}"[:500],
        readings=len(segment.rows),
        content_type=source.content_type,
        payload=source.payload,
        received_at=datetime.fromtimestamp(source.received_us / 1_000_000, tz=UTC),
    )


def _combine(results: list[WriteResult]) -> WriteResult:
    spans = [r.time_range_us for r in results if r.time_range_us]
    return WriteResult(
        rows_offered=sum(r.rows_offered for r in results),
        rows_inserted=sum(r.rows_inserted for r in results),
        merged=any(r.merged for r in results),
        dead_letters=sum(r.dead_letters for r in results),
        time_range_us=(min(s[0] for s in spans), max(s[1] for s in spans)) if spans else None,
        device_ids=frozenset().union(*(r.device_ids for r in results)),
        inserted=[s for r in results for s in r.inserted],
    )


def _day(index: int) -> date:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=index)).date()


def _runs(days: list[int]) -> list[tuple[int, int]]:
    """Sorted day indexes as contiguous (first, last) runs."""
    runs: list[tuple[int, int]] = []
    for day in days:
        if runs and runs[-1][1] == day - 1:
            runs[-1] = (runs[-1][0], day)
        else:
            runs.append((day, day))
    return runs
