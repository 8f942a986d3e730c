"""API latency on a city-sized database: a 24 h series at 1-minute buckets, and the alert list.

Builds its own database (dropped afterwards): --devices devices reporting one metric every minute
for --days days (1000 × 7 days ≈ 10 M readings), the rollups, and --alerts alerts. Serves the API
with uvicorn in this process and times --requests requests of each kind over HTTP. The ceiling,
measured in the same run, is the same question put to PostgreSQL directly over one connection: what
is left is the API's own cost (auth, validation, JSON, HTTP).

Run: python bench/api.py [--devices 1000] [--days 7] [--alerts 20000] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and bench/rules.py would hide the
# `rules` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx
import psycopg
import uvicorn

from cityops.apikeys import Role, create_key
from cityops.catalogue import load_default_catalogue
from cityops.db.connection import connection
from cityops.db.migrate import migrate
from cityops.embedded import free_port
from cityops.settings import Settings
from control_api.app import create_app
from control_api.component import _Server

LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return f"p50 {statistics.median(ordered) * 1000:6.1f} ms  p95 {p95 * 1000:6.1f} ms"


async def build(url: str, devices: int, days: int, alerts: int, start: datetime) -> str:
    catalogue = load_default_catalogue()
    metric = catalogue.metrics["ponding_depth"].id
    async with connection(url, autocommit=True) as conn:
        await migrate(conn, Settings(database_url=url), catalogue)
        await conn.execute(
            "INSERT INTO devices (external_id, tenant, kind, name, district) "
            "SELECT 'pd-' || i, 'water', 'ponding_gauge', 'Gauge ' || i, 'tianhe' FROM generate_series(1, %s) i",
            (devices,),
        )
        await conn.execute(
            "SELECT cityops_ensure_partitions(%s::date, %s::date)",
            (start.date(), (start + timedelta(days=days)).date()),
        )
        began = time.perf_counter()
        for day in range(days):  # a day at a time: one transaction per day's partition
            lo = start + timedelta(days=day)
            await conn.execute(
                "INSERT INTO readings (time, device_id, metric_id, value, quality) "
                "SELECT t, d.id, %s, 10 + 10 * sin(extract(epoch FROM t) / 3600.0 + d.id), 0 "
                "FROM devices d, generate_series(%s::timestamptz, %s::timestamptz - interval '1 minute', interval '1 minute') t",
                (metric, lo, lo + timedelta(days=1)),
            )
            await conn.execute("SELECT cityops_refresh_rollups(%s, %s)", (lo, lo + timedelta(days=1)))
        cur = await conn.execute("SELECT count(*) FROM readings")
        (rows,) = await cur.fetchone()  # type: ignore[misc]
        print(f"database: {rows:,} readings, rollups refreshed, in {time.perf_counter() - began:.0f} s")
        await conn.execute(
            "INSERT INTO alerts (fingerprint, state, severity, tenant, labels, summary, started_at, last_seen_at) "
            "SELECT md5(i::text), (ARRAY['firing','acknowledged','resolved','resolved'])[1 + i %% 4], "
            "(ARRAY['low','medium','high','critical'])[1 + i %% 4], 'water', "
            "jsonb_build_object('rule', 'r' || (i %% 20), 'device', 'pd-' || (1 + i %% %s), 'district', 'tianhe', "
            "'domain', 'drainage'), 'alert ' || i, %s + i * interval '30 seconds', %s + i * interval '30 seconds' "
            "FROM generate_series(1, %s) i",
            (devices, start, start, alerts),
        )
        await conn.execute("ANALYZE")
        _, key = await create_key(conn, "bench", Role.VIEWER, ["water"])
    return key


def serve(url: str) -> tuple[_Server, threading.Thread, int]:
    app = create_app(Settings(database_url=url, api_rate_limit=0), load_default_catalogue(), url)
    port = free_port()
    server = _Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on", access_log=False)
    )
    thread = threading.Thread(target=server.run, name="bench-api", daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, port


def time_http(client: httpx.Client, requests: list[tuple[str, dict[str, object]]]) -> list[float]:
    samples = []
    for path, params in requests:
        began = time.perf_counter()
        response = client.get(path, params=params)  # type: ignore[arg-type]
        samples.append(time.perf_counter() - began)
        assert response.status_code == 200, response.text[:300]
    return samples


def time_sql(url: str, queries: list[tuple[str, tuple[object, ...]]]) -> list[float]:
    samples = []
    with psycopg.connect(url) as conn:
        for sql, params in queries:
            began = time.perf_counter()
            conn.execute(sql, params).fetchall()
            samples.append(time.perf_counter() - began)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--admin-url", default=LOCAL)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--alerts", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    name = f"cityops_bench_api_{random.randrange(1 << 30)}"
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = args.admin_url.rsplit("/", 1)[0] + "/" + name
    start = datetime(2026, 6, 1, tzinfo=UTC)
    try:
        key = asyncio.run(build(url, args.devices, args.days, args.alerts, start))
        server, thread, port = serve(url)
        rng = random.Random(3)
        series = []
        for _ in range(args.requests):
            day = start + timedelta(days=rng.randrange(args.days - 1), hours=rng.randrange(24))
            series.append(("/api/v1/readings", {"device": f"pd-{rng.randrange(1, args.devices + 1)}", "metric": "ponding_depth",
                                                "from": day.isoformat(), "to": (day + timedelta(hours=24)).isoformat(),
                                                "bucket": "1m", "agg": "avg"}))  # fmt: skip
        lists = [
            ("/api/v1/alerts", {"limit": 100, **({"state": "firing"} if i % 2 else {})})
            for i in range(args.requests)
        ]
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as client:
            time_http(client, series[:10] + lists[:10])  # warm-up: plans cached, pool filled
            series_http = time_http(client, series)
            list_http = time_http(client, lists)
        server.should_exit = True
        thread.join(15)
        series_sql = time_sql(url, [(
            "SELECT date_bin('1 minute', bucket, 'epoch'), sum(sum) / sum(count) FROM readings_1m r "
            "JOIN devices d ON d.id = r.device_id WHERE d.external_id = %s AND metric_id = %s "
            "AND bucket >= %s AND bucket < %s GROUP BY 1 ORDER BY 1",
            (p["device"], load_default_catalogue().metrics["ponding_depth"].id, datetime.fromisoformat(str(p["from"])), datetime.fromisoformat(str(p["to"]))),
        ) for _, p in series])  # fmt: skip
        list_sql = time_sql(url, [(
            "SELECT * FROM alerts WHERE tenant = ANY(%s)" + (" AND state = ANY(%s)" if "state" in p else "")
            + " ORDER BY started_at DESC, id DESC LIMIT 101",
            (["water"], ["firing"]) if "state" in p else (["water"],),
        ) for _, p in lists])  # fmt: skip
        print(f"24 h series, 1-min buckets (1440 points), {args.requests} requests:")
        print(f"  API   {percentiles(series_http)}")
        print(f"  SQL   {percentiles(series_sql)}   (ceiling: the rollup query alone, one connection)")
        print(f"alert list, 100 per page, {args.requests} requests over {args.alerts:,} alerts:")
        print(f"  API   {percentiles(list_http)}")
        print(f"  SQL   {percentiles(list_sql)}   (ceiling)")
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
