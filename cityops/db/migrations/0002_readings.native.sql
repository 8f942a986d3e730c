-- Plain PostgreSQL: readings partitioned by UTC day (created ahead by cityops_ensure_partitions),
-- BRIN on time, rollup tables maintained by cityops_refresh_rollups, retention by dropping partitions.

CREATE TABLE readings (
    time      timestamptz NOT NULL,
    device_id integer NOT NULL,
    metric_id smallint NOT NULL,
    value     double precision NOT NULL,
    quality   smallint NOT NULL DEFAULT 0,
    CONSTRAINT readings_series_time_key UNIQUE (device_id, metric_id, time)
) PARTITION BY RANGE (time);
CREATE INDEX readings_time_brin ON readings USING brin (time);

CREATE TABLE readings_1m (
    bucket    timestamptz NOT NULL,
    device_id integer NOT NULL,
    metric_id smallint NOT NULL,
    count     bigint NOT NULL,
    sum       double precision NOT NULL,
    avg       double precision NOT NULL,
    min       double precision NOT NULL,
    max       double precision NOT NULL,
    last      double precision NOT NULL,
    last_time timestamptz NOT NULL,
    PRIMARY KEY (device_id, metric_id, bucket)
);
CREATE TABLE readings_1h (LIKE readings_1m INCLUDING ALL);
CREATE INDEX readings_1m_bucket ON readings_1m USING brin (bucket);
CREATE INDEX readings_1h_bucket ON readings_1h USING brin (bucket);

-- Partition of one UTC day: readings_pYYYYMMDD.
CREATE FUNCTION cityops_partition_name(p_day date) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'readings_p' || to_char(p_day, 'YYYYMMDD') $$;

-- Creates the missing daily partitions for p_from..p_to (inclusive); returns how many it created.
CREATE FUNCTION cityops_ensure_partitions(p_from date, p_to date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    day     date := p_from;
    created integer := 0;
BEGIN
    IF p_to < p_from THEN
        RAISE EXCEPTION 'cityops_ensure_partitions: % is before %', p_to, p_from;
    END IF;
    IF p_to - p_from > 3660 THEN
        RAISE EXCEPTION 'cityops_ensure_partitions: % days at once is more than 10 years', p_to - p_from;
    END IF;
    -- Concurrent writers backfilling the same day must not race on CREATE TABLE.
    PERFORM pg_advisory_xact_lock(hashtext('cityops_ensure_partitions'));
    WHILE day <= p_to LOOP
        IF to_regclass(cityops_partition_name(day)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
                cityops_partition_name(day),
                day::timestamp AT TIME ZONE 'UTC',
                (day + 1)::timestamp AT TIME ZONE 'UTC');
            created := created + 1;
        END IF;
        day := day + 1;
    END LOOP;
    RETURN created;
END
$$;

-- Drops every daily partition that ends at or before p_cutoff; returns the dropped names.
CREATE FUNCTION cityops_drop_partitions_before(p_cutoff timestamptz) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part text;
BEGIN
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'readings'::regclass
          AND c.relname ~ '^readings_p[0-9]{8}$'
          AND (to_date(substr(c.relname, 11), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC' <= p_cutoff
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %I', part);
        RETURN NEXT part;
    END LOOP;
END
$$;

-- Recomputes the 1-minute and 1-hour rollups touching [p_from, p_to] from the raw rows, optionally
-- for some devices only. Idempotent: a bucket is rewritten whole, so re-running it is harmless.
CREATE FUNCTION cityops_refresh_rollups(p_from timestamptz, p_to timestamptz, p_devices integer[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    m_from timestamptz := date_trunc('minute', p_from);
    m_to   timestamptz := date_trunc('minute', p_to) + interval '1 minute';
    h_from timestamptz := date_trunc('hour', p_from);
    h_to   timestamptz := date_trunc('hour', p_to) + interval '1 hour';
BEGIN
    INSERT INTO readings_1m AS r (bucket, device_id, metric_id, count, sum, avg, min, max, last, last_time)
    SELECT date_trunc('minute', time), device_id, metric_id, count(*), sum(value), avg(value),
           min(value), max(value), (array_agg(value ORDER BY time DESC))[1], max(time)
    FROM readings
    WHERE time >= m_from AND time < m_to
      AND (p_devices IS NULL OR device_id = ANY (p_devices))
    GROUP BY 1, 2, 3
    ON CONFLICT (device_id, metric_id, bucket) DO UPDATE
    SET count = excluded.count, sum = excluded.sum, avg = excluded.avg, min = excluded.min,
        max = excluded.max, last = excluded.last, last_time = excluded.last_time;

    INSERT INTO readings_1h AS r (bucket, device_id, metric_id, count, sum, avg, min, max, last, last_time)
    SELECT date_trunc('hour', bucket), device_id, metric_id, sum(count), sum(sum), sum(sum) / sum(count),
           min(min), max(max), (array_agg(last ORDER BY last_time DESC))[1], max(last_time)
    FROM readings_1m
    WHERE bucket >= h_from AND bucket < h_to
      AND (p_devices IS NULL OR device_id = ANY (p_devices))
    GROUP BY 1, 2, 3
    ON CONFLICT (device_id, metric_id, bucket) DO UPDATE
    SET count = excluded.count, sum = excluded.sum, avg = excluded.avg, min = excluded.min,
        max = excluded.max, last = excluded.last, last_time = excluded.last_time;
END
$$;
