"""The batch writer reports exactly the rows it inserted: what the rules may evaluate."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn
from cityops.settings import Settings, StorageMode
from ingest.batch import Batch, MessageSource, Segment
from ingest.metrics import IngestMetrics
from ingest.writer import BatchWriter
from tests.pipeline_helpers import register_fleet

S = 1_000_000
T0 = 1_763_700_000 * S


def batch(device_id: int, metric_id: int, *points: tuple[int, float]) -> Batch:
    out = Batch()
    source = MessageSource("t", b"", None, T0)
    out.add_segment(Segment(device_id, [(T0 + t * S, metric_id, v, 0) for t, v in points], source, "pd-1"))
    return out


async def test_a_redelivered_batch_reports_only_its_new_rows(
    migrated_conn: AsyncConn, settings: Settings, catalogue: Catalogue
) -> None:
    ids = await register_fleet(migrated_conn)
    metric = catalogue.metrics["ponding_depth"].id
    assert settings.database_url is not None
    writer = BatchWriter(settings.database_url, StorageMode.NATIVE, IngestMetrics(CollectorRegistry()))
    try:
        first = await writer.write(batch(ids["pd-1"], metric, (0, 1.0), (60, 2.0)))
        assert not first.merged and [s.rows for s in first.inserted] == [
            [(T0, metric, 1.0, 0), (T0 + 60 * S, metric, 2.0, 0)]
        ]
        # The same two rows again, one new one, and the new one twice inside the batch.
        again = await writer.write(batch(ids["pd-1"], metric, (0, 1.0), (60, 2.0), (120, 3.0), (120, 3.0)))
        assert again.merged and again.rows_inserted == 1
        assert [s.rows for s in again.inserted] == [[(T0 + 120 * S, metric, 3.0, 0)]]
        replay = await writer.write(batch(ids["pd-1"], metric, (0, 1.0), (120, 3.0)))
        assert replay.inserted == [] and replay.rows_inserted == 0
    finally:
        await writer.close()
