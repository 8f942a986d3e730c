-- TimescaleDB: readings is a hypertable of 1-day chunks, compressed by series; readings_1m and
-- readings_1h are continuous aggregates with the same columns as the native rollup tables.
-- Policies whose intervals come from settings (compression, retention) are applied by
-- `cityops db migrate` after the files, so changing a setting needs no new migration.

CREATE TABLE readings (
    time      timestamptz NOT NULL,
    device_id integer NOT NULL,
    metric_id smallint NOT NULL,
    value     double precision NOT NULL,
    quality   smallint NOT NULL DEFAULT 0,
    CONSTRAINT readings_series_time_key UNIQUE (device_id, metric_id, time)
);
SELECT create_hypertable('readings', by_range('time', INTERVAL '1 day'));
ALTER TABLE readings SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id, metric_id',
    timescaledb.compress_orderby = 'time DESC'
);

CREATE MATERIALIZED VIEW readings_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 minute', time) AS bucket, device_id, metric_id,
       count(*) AS count, sum(value) AS sum, avg(value) AS avg, min(value) AS min, max(value) AS max,
       last(value, time) AS last, max(time) AS last_time
FROM readings
GROUP BY 1, 2, 3
WITH NO DATA;

CREATE MATERIALIZED VIEW readings_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', time) AS bucket, device_id, metric_id,
       count(*) AS count, sum(value) AS sum, avg(value) AS avg, min(value) AS min, max(value) AS max,
       last(value, time) AS last, max(time) AS last_time
FROM readings
GROUP BY 1, 2, 3
WITH NO DATA;

SELECT add_continuous_aggregate_policy('readings_1m',
    start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '1 minute');
SELECT add_continuous_aggregate_policy('readings_1h',
    start_offset => INTERVAL '7 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '15 minutes');
