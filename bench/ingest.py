"""End-to-end ingest throughput, beside the ceilings it is judged against, measured in the same run.

  .venv/bin/python bench/ingest.py [--seconds 20] [--admin-url postgresql://…/postgres] [--mqtt-url mqtt://…]

Brings up a Mosquitto of its own (the `mosquitto` binary with deploy/mosquitto/mosquitto.conf) unless
--mqtt-url is given, a database of its own on the PostgreSQL at --admin-url (default 127.0.0.1:5432,
else an embedded one) and a `cityops pipeline` process. Separate publisher processes drive each
payload shape at QoS 1 for a fixed time, as fast as the consumer keeps up: the backlog at the broker
is capped, so the consumer is saturated and the drain afterwards is short. The stored rate is the
pipeline's own counter over the steady-state window; afterwards every published reading is checked
to be stored exactly once.

The publisher is device_sim.wire.BulkPublisher (QoS 1, a window of unacknowledged packets, PUBACKs
counted in bulk): a paho publisher tops out near 12 k msg/s, below what is measured here.

Ceilings, same machine, same run:
  * bare paho: a QoS 1 subscriber that only counts, fed the same single-reading stream;
  * bare COPY: binary COPY of the same kind of rows in 20 k-row batches, one connection.
Targets (DESIGN §8): single readings >= 20 k/s and >= 80 % of bare paho; compact >= 250 k/s and
>= 60 % of bare COPY.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and its name would shadow the
# `ingest` package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import itertools
import asyncio
import contextlib
import multiprocessing as mp
import os
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cityops.catalogue import load_default_catalogue
from cityops.db.connection import connection
from cityops.db.migrate import migrate
from cityops.embedded import MosquittoProcess, EmbeddedPostgres, free_port
from cityops.model import DeviceSpec
from cityops.registry import import_fleet
from cityops.settings import MqttEndpoint, Settings
from device_sim.wire import BulkPublisher
from ingest import copy as pgcopy
from ingest.batch import MessageSource, Segment

DEVICES = 1000
METRICS = ("pm25", "pm10", "o3", "no2", "so2", "co")
WARMUP_S = 3.0
REPO = Path(__file__).resolve().parents[1]
CHUNK_MESSAGES = 1000  # published between two looks at the backlog
# Readings published but not yet consumed, at most: the consumer never starves, the drain is short.
BACKLOG_READINGS = 400_000


@dataclass(frozen=True)
class Shape:
    key: str
    name: str
    readings_per_message: int


SHAPES = (
    Shape("single", "single JSON reading", 1),
    Shape("batch", "JSON batch of 50", 50),
    Shape("compact", "compact msgpack of 100", 100),
)


# Quiet values sit inside every default rule, as a city does most of the time; --alarm sends values
# that keep every device in alarm (each reading then updates an open alert: the rules' worst case).
QUIET = {"pm25": 32.0, "pm10": 58.0, "o3": 80.0, "no2": 35.0, "so2": 9.0, "co": 0.8}
ALARM = False  # set from --alarm before the publisher processes fork


def payloads(shape: str, base_ms: int) -> Iterator[tuple[str, bytes]]:
    """Endless distinct readings: device i takes timestamps base + k ms, k counting per device."""
    counters = [0] * DEVICES
    while True:
        for device in range(DEVICES):
            k = counters[device]
            if shape == "single":
                counters[device] = k + 1
                pm25 = k % 300 if ALARM else 20 + k % 20
                yield f"d{device}", b'{"ts":%d,"values":{"pm25":%d.5}}' % (base_ms + k, pm25)
            elif shape == "batch":
                counters[device] = k + 50
                items = b",".join(b'{"ts":%d,"values":{"pm10":%d}}' % (base_ms + k + j, j) for j in range(50))
                yield f"d{device}", b"[" + items + b"]"
            else:
                counters[device] = k + 100
                doc = [
                    [
                        base_ms + k + j,
                        METRICS[j % 6],
                        j * 0.5 if ALARM else QUIET[METRICS[j % 6]] * (1 + j % 5 / 50),
                    ]
                    for j in range(100)
                ]
                yield f"d{device}", msgpack.packb(doc)


# --- publisher process ------------------------------------------------------------------------------
def publisher_main(
    url: str,
    root: str,
    shape: str,
    per_message: int,
    seconds: float,
    base_ms: int,
    consumed: mp.Value,
    sent_out: mp.Value,
) -> None:  # type: ignore[type-arg]
    endpoint = MqttEndpoint.parse(url)
    source = (
        (f"{root}/v1/{device}/telemetry".encode(), payload) for device, payload in payloads(shape, base_ms)
    )
    deadline = time.monotonic() + seconds
    with BulkPublisher(endpoint.host, endpoint.port, f"bench-pub-{uuid.uuid4().hex[:6]}") as publisher:
        while time.monotonic() < deadline:
            if publisher.sent * per_message - consumed.value > BACKLOG_READINGS:
                time.sleep(0.002)  # pacing: the consumer is a whole backlog behind
                continue
            publisher.publish_many(itertools.islice(source, CHUNK_MESSAGES))
        publisher.flush()
        sent_out.value = publisher.sent


class Publisher:
    """The separate publisher process of one measurement."""

    def __init__(self, url: str, root: str, shape: Shape, seconds: float, base_ms: int, consumed: mp.Value):  # type: ignore[type-arg]
        self.sent = mp.Value("q", 0)
        self.proc = mp.Process(
            target=publisher_main,
            args=(url, root, shape.key, shape.readings_per_message, seconds, base_ms, consumed, self.sent),
        )
        self.proc.start()

    def join(self) -> int:
        self.proc.join(300)
        return int(self.sent.value)


# --- consumers: the bare subscriber, and the pipeline's counter ---------------------------------------
def bare_subscriber_main(
    url: str,
    root: str,
    ready: mp.Event,
    stop: mp.Event,  # type: ignore[type-arg]
    received: mp.Value,
) -> None:
    endpoint = MqttEndpoint.parse(url)
    count = 0

    def on_message(_c: mqtt.Client, _u: object, _m: mqtt.MQTTMessage) -> None:
        nonlocal count
        count += 1
        if count % 500 == 0:
            received.value = count

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
    )
    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = 20_000
    client.connect(endpoint.host, endpoint.port, properties=props)
    client.loop_start()
    client.subscribe(f"$share/bare/{root}/v1/+/telemetry", qos=1)
    subscribed.wait(10)
    ready.set()
    stop.wait()
    received.value = count
    client.disconnect()
    client.loop_stop()


def scrape_stored(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("cityops_readings_stored_total "):
                return float(line.split()[1])
    return 0.0


class Follower:
    """Copies a consumer's progress into a shared value every few milliseconds, for the publishers."""

    def __init__(self, read: Callable[[], float]) -> None:
        self.value = mp.Value("d", read())
        self._read, self._stop = read, threading.Event()
        self._thread = threading.Thread(target=self._run, name="follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Scraping costs the pipeline CPU; five times a second keeps the backlog cap honest enough.
        while not self._stop.wait(0.2):
            self.value.value = self._read()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def window_rate(read: Callable[[], float], seconds: float) -> float:
    time.sleep(WARMUP_S)
    t0, c0 = time.monotonic(), read()
    time.sleep(seconds)
    t1, c1 = time.monotonic(), read()
    return (c1 - c0) / (t1 - t0)


def start_publishers(
    shape: Shape, url: str, root: str, seconds: float, base_ms: int, follower: Follower
) -> Publisher:
    return Publisher(url, root, shape, seconds, base_ms, follower.value)


def measure_pipeline(
    shape: Shape, mqtt_url: str, root: str, metrics_port: int, seconds: float, base_ms: int
) -> tuple[float, int, float]:
    before = scrape_stored(metrics_port)
    follower = Follower(lambda: scrape_stored(metrics_port) - before)
    publishers = start_publishers(shape, mqtt_url, root, seconds + WARMUP_S, base_ms, follower)
    rate = window_rate(lambda: scrape_stored(metrics_port), seconds)
    published = publishers.join() * shape.readings_per_message
    deadline = time.monotonic() + 300
    while scrape_stored(metrics_port) - before < published and time.monotonic() < deadline:
        time.sleep(0.1)
    follower.close()
    return rate, published, scrape_stored(metrics_port) - before


def measure_bare_paho(mqtt_url: str, seconds: float, base_ms: int) -> float:
    root = f"bare{uuid.uuid4().hex[:6]}"
    ready, stop, received = mp.Event(), mp.Event(), mp.Value("q", 0)
    sub = mp.Process(target=bare_subscriber_main, args=(mqtt_url, root, ready, stop, received))
    sub.start()
    ready.wait(30)
    follower = Follower(lambda: float(received.value))
    publishers = start_publishers(SHAPES[0], mqtt_url, root, seconds + WARMUP_S, base_ms, follower)
    rate = window_rate(lambda: float(received.value), seconds)
    publishers.join()
    stop.set()
    sub.join(30)
    follower.close()
    return rate


def measure_bare_copy(admin_url: str, seconds: float) -> float:
    name = f"bench_copy_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(database(admin_url, name), autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE readings (time timestamptz NOT NULL, device_id int NOT NULL, "
                "metric_id smallint NOT NULL, value float8 NOT NULL, quality smallint NOT NULL, "
                "UNIQUE (device_id, metric_id, time))"
            )
            base_us = int(time.time() * 1_000_000) - 3_600_000_000
            source = MessageSource("bench", b"", None, 0)
            rows = batch_no = 0
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                segments = [
                    Segment(
                        d,
                        [(base_us + (batch_no * 100 + j) * 1000, 60 + j % 6, j * 0.5, 0) for j in range(100)],
                        source,
                    )
                    for d in range(200)
                ]
                data = pgcopy.encode(segments)
                with (
                    conn.transaction(),
                    conn.cursor().copy(f"COPY readings {pgcopy.COLUMNS} FROM STDIN (FORMAT BINARY)") as pipe,
                ):
                    pipe.write(data)
                rows += 20_000
                batch_no += 1
            return rows / (time.monotonic() - start)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def database(admin_url: str, name: str) -> str:
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


async def prepare_database(admin_url: str) -> str:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = database(admin_url, name)
    async with connection(url) as conn:
        await migrate(conn, Settings(database_url=url), load_default_catalogue())
        await import_fleet(
            conn,
            [
                DeviceSpec(external_id=f"d{i}", tenant="environment", kind="air_station", name=f"bench {i}")
                for i in range(DEVICES)
            ],
        )
    return url


def start_pipeline(
    db_url: str, mqtt_url: str, root: str, metrics_port: int, tmp: Path, extra: list[str]
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    env.update(
        {
            "CITYOPS_DATABASE_URL": db_url,
            "CITYOPS_MQTT_URL": mqtt_url,
            "CITYOPS_TOPIC_ROOT": root,
            "CITYOPS_MQTT_CLIENT_ID": f"bench-pipeline-{root}",
            "CITYOPS_SUBSCRIPTION_GROUP": root,
            "CITYOPS_PIPELINE_METRICS_PORT": str(metrics_port),
            "CITYOPS_LOG_LEVEL": "WARNING",
            "CITYOPS_DATA_DIR": str(tmp / "data"),
        }
    )
    env.update(dict(item.split("=", 1) for item in extra))
    log = (tmp / "pipeline.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cityops", "pipeline"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            scrape_stored(metrics_port)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((tmp / "pipeline.log").read_text()[-2000:]) from None
            time.sleep(0.1)
    time.sleep(1.0)  # the metrics endpoint comes up just before the subscription
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window per shape")
    parser.add_argument("--admin-url", help="PostgreSQL to create the bench databases on")
    parser.add_argument("--mqtt-url", help="use this broker instead of starting a Mosquitto")
    parser.add_argument("--shapes", default="single,batch,compact", help="subset of single,batch,compact")
    parser.add_argument(
        "--pipeline-env",
        action="append",
        default=[],
        metavar="CITYOPS_X=V",
        help="extra setting for the pipeline process (repeatable), for tuning runs",
    )
    parser.add_argument("--alarm", action="store_true", help="values that keep every device in alarm")
    args = parser.parse_args()
    global ALARM
    ALARM = args.alarm
    chosen = [s for s in SHAPES if s.key in args.shapes.split(",")]

    with tempfile.TemporaryDirectory(prefix="cityops-bench-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        admin_url = args.admin_url
        if not admin_url:
            local = "postgresql://postgres@127.0.0.1:5432/postgres"
            try:
                psycopg.connect(local, connect_timeout=2).close()
                admin_url = local
            except psycopg.Error:
                admin_url = stack.enter_context(EmbeddedPostgres(tmp / "pg")).admin_url
        mqtt_url = args.mqtt_url or stack.enter_context(MosquittoProcess(tmp / "broker")).url
        print(
            f"PostgreSQL {admin_url.rsplit('@', 1)[-1]}, broker {mqtt_url}, {os.cpu_count()} cores; "
            f"{args.seconds:.0f} s windows after {WARMUP_S:.0f} s warm-up; "
            + ("values keep every device in alarm" if ALARM else "quiet values (no rule fires)")
        )
        base_ms = int(time.time() * 1000) - 6 * 3_600_000

        copy_rate = measure_bare_copy(admin_url, args.seconds)
        print(f"ceiling  bare binary COPY, 20 k-row batches, one connection: {copy_rate:>10,.0f} rows/s")
        paho_rate = float("nan")
        if any(s.key == "single" for s in chosen):
            paho_rate = measure_bare_paho(mqtt_url, args.seconds, base_ms)
            print(f"ceiling  bare paho QoS 1 subscriber, single JSON:            {paho_rate:>10,.0f} msg/s")

        db_url = asyncio.run(prepare_database(admin_url))
        root = f"bench{uuid.uuid4().hex[:6]}"
        metrics_port = free_port()
        pipeline = start_pipeline(db_url, mqtt_url, root, metrics_port, tmp, args.pipeline_env)
        results: dict[str, float] = {}
        try:
            for i, shape in enumerate(chosen):
                rate, published, stored = measure_pipeline(
                    shape, mqtt_url, root, metrics_port, args.seconds, base_ms + (i + 1) * 3_600_000
                )
                results[shape.key] = rate
                label = f"pipeline {shape.name}, QoS 1, ack after commit:"
                print(
                    f"{label:<61}{rate:>10,.0f} readings/s  ({published:,} published, {stored:,.0f} stored, "
                    f"{published - stored:,.0f} missing)"
                )
        finally:
            pipeline.terminate()
            pipeline.wait(60)
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE "{db_url.rsplit("/", 1)[1]}" WITH (FORCE)')

    print()
    if "single" in results:
        single = results["single"]
        print(
            f"single JSON: {single:,.0f} readings/s = {single / paho_rate:.0%} of bare paho "
            "(targets: >= 20,000/s, >= 80 %)"
        )
    if "compact" in results:
        compact = results["compact"]
        print(
            f"compact:     {compact:,.0f} readings/s = {compact / copy_rate:.0%} of bare COPY "
            "(targets: >= 250,000/s, >= 60 %)"
        )


if __name__ == "__main__":
    main()
