"""PostgreSQL binary COPY of readings, encoded straight from the decoder's tuples.

One ``struct.pack`` per row: adapting each field through psycopg's dumpers costs several times
more, and ``time_us`` needs only a shift of epoch to become a binary timestamptz.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from ingest.batch import Segment

COLUMNS = "(time, device_id, metric_id, value, quality)"
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)
# Binary timestamptz counts microseconds from 2000-01-01; readings carry them from 1970-01-01.
PG_EPOCH_OFFSET_US = 946_684_800_000_000
# field count, then (length, value) for: int8 time, int4 device, int2 metric, float8 value, int2 quality
_ROW = struct.Struct("!hiqiiihidih")


def encode(segments: Iterable[Segment]) -> bytes:
    pack = _ROW.pack
    offset = PG_EPOCH_OFFSET_US
    parts = [HEADER]
    for segment in segments:
        device_id = segment.device_id
        parts.extend(
            [
                pack(5, 8, t - offset, 4, device_id, 2, metric, 8, value, 2, quality)
                for t, metric, value, quality in segment.rows
            ]
        )
    parts.append(TRAILER)
    return b"".join(parts)
