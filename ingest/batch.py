"""What the gateway hands to the writer: readings grouped by source message, and dead letters."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cityops.model import Row


class Source(Protocol):
    """The message a segment came from; kept so that a permanent data error can dead-letter it."""

    topic: str
    payload: bytes
    content_type: str | None
    received_us: int


@dataclass(frozen=True, slots=True)
class MessageSource:
    """A :class:`Source` for callers that have no message object of their own."""

    topic: str
    payload: bytes
    content_type: str | None
    received_us: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    device: str | None
    reason: str
    detail: str
    readings: int
    content_type: str | None
    payload: bytes
    received_at: datetime


@dataclass(slots=True)
class Segment:
    """The rows of one message of one device."""

    device_id: int
    rows: list[Row]
    source: Source
    device: str | None = None  # the external id, for a dead letter should the segment fail


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    device_id: int
    status: str  # online | offline
    at: datetime


@dataclass(slots=True)
class Batch:
    """One transaction's worth of work; committed whole, then its messages are acknowledged."""

    segments: list[Segment] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    rows: int = 0
    first_us: int | None = None  # earliest and latest reading time, epoch microseconds
    last_us: int | None = None

    def add_segment(self, segment: Segment) -> None:
        self.segments.append(segment)
        self.rows += len(segment.rows)
        if segment.rows:
            # Rows compare by time first, so min/max of the tuples are the time span.
            low, high = min(segment.rows)[0], max(segment.rows)[0]
            self.first_us = low if self.first_us is None else min(self.first_us, low)
            self.last_us = high if self.last_us is None else max(self.last_us, high)

    def __bool__(self) -> bool:
        return bool(self.segments or self.dead_letters or self.statuses)

    def time_range_us(self) -> tuple[int, int] | None:
        if self.first_us is None or self.last_us is None:
            return None
        return self.first_us, self.last_us
