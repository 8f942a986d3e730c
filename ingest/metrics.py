"""Prometheus metrics of the ingest path, registered in a registry the caller owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Batches commit in milliseconds normally and in seconds when the database is struggling.
COMMIT_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 10, 100, 1_000, 5_000, 10_000, 20_000, 50_000, 100_000)


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows_inserted = Counter(
            "cityops_readings_stored", "Readings committed to the readings table", registry=registry
        )
        self.rows_duplicate = Counter(
            "cityops_readings_duplicate", "Readings dropped as already stored (redelivery)", registry=registry
        )
        self.batch_rows = Histogram(
            "cityops_batch_rows", "Readings per committed batch", buckets=ROW_BUCKETS, registry=registry
        )
        self.commit_seconds = Histogram(
            "cityops_batch_commit_seconds",
            "Time to commit a batch",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.merged_batches = Counter(
            "cityops_batches_merged", "Batches that went through the staging merge", registry=registry
        )
        self.retries = Counter("cityops_db_retries", "Transient database errors retried", registry=registry)
        self.data_errors = Counter(
            "cityops_data_error_messages",
            "Messages dead-lettered by a permanent data error",
            registry=registry,
        )
        self.db_up = Gauge("cityops_db_up", "1 when the last database operation succeeded", registry=registry)
        self.rollup_refreshes = Counter(
            "cityops_rollup_refreshes", "Rollup refresh rounds run", registry=registry
        )
        self.rollup_lag_seconds = Gauge(
            "cityops_rollup_lag_seconds",
            "Age of the oldest reading not yet in the rollups",
            registry=registry,
        )
