"""Zero loss, zero duplicates: the pipeline killed, its connections terminated, its database stopped."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cityops.catalogue import Catalogue
from cityops.codec import encode_compact
from cityops.db.connection import AsyncConn, connection
from cityops.db.migrate import migrate
from cityops.embedded import EmbeddedPostgres, free_port
from cityops.settings import Settings
from cityops.topics import Topics
from tests.conftest import MqttServer
from tests.mqtt_helpers import publish, publisher
from tests.pipeline_helpers import (
    pipeline_settings,
    register_fleet,
    running_pipeline,
    spawn_pipeline,
    wait_running,
)
from tests.waiting import eventually

DEVICES = ("aq-1", "aq-2", "pd-1")
METRIC = {"aq-1": "pm25", "aq-2": "pm10", "pd-1": "ponding_depth"}
PER_MESSAGE = 25


def messages(count: int, start_ms: int) -> list[tuple[str, bytes, set[tuple[str, str, int]]]]:
    """``count`` compact messages with distinct timestamps, and the readings each one carries."""
    out = []
    for i in range(count):
        device = DEVICES[i % len(DEVICES)]
        readings = [(start_ms + i * PER_MESSAGE + j, METRIC[device], float(j)) for j in range(PER_MESSAGE)]
        out.append((device, encode_compact(readings), {(device, m, t) for t, m, _ in readings}))
    return out


async def stored(conn: AsyncConn) -> list[tuple[str, str, int]]:
    cur = await conn.execute(
        "SELECT d.external_id, m.name, (extract(epoch FROM r.time) * 1000)::bigint FROM readings r "
        "JOIN devices d ON d.id = r.device_id JOIN metrics m ON m.id = r.metric_id"
    )
    return [(d, m, int(t)) for d, m, t in await cur.fetchall()]


async def count(conn: AsyncConn) -> int:
    cur = await conn.execute("SELECT count(*) FROM readings")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


class Publisher:
    """Publishes at QoS 1 on a thread of its own, in two halves with a gate between them."""

    def __init__(self, url: str, topics: Topics, batch: list[tuple[str, bytes, set[tuple[str, str, int]]]]):
        self.url, self.topics, self.batch = url, topics, batch
        self.gate = threading.Event()
        self.first_half_sent = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-publisher", daemon=True)

    def _run(self) -> None:
        try:
            half = len(self.batch) // 2
            with publisher(self.url) as client:
                for device, payload, _ in self.batch[:half]:
                    publish(client, self.topics.telemetry(device), payload)
                self.first_half_sent.set()
                if not self.gate.wait(60):
                    raise TimeoutError("the test never opened the gate")
                for device, payload, _ in self.batch[half:]:
                    publish(client, self.topics.telemetry(device), payload)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Publisher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self.thread.join(60)
        if self.error is not None:
            raise self.error

    async def wait_first_half(self) -> None:
        assert await asyncio.to_thread(self.first_half_sent.wait, 30), "first half not sent in 30 s"


def expected(batch: list[tuple[str, bytes, set[tuple[str, str, int]]]]) -> set[tuple[str, str, int]]:
    return set().union(*(r for *_, r in batch))


async def test_sigkill_mid_stream_loses_nothing_and_doubles_nothing(
    fleet_conn: AsyncConn, database_url: str, mqtt_server: MqttServer, topic_root: str, tmp_path: Path
) -> None:
    settings = pipeline_settings(
        database_url, mqtt_server, topic_root, tmp_path, receive_maximum=100, batch_interval=0.02
    )
    batch = messages(400, int(time.time() * 1000) - 600_000)
    want = expected(batch)
    log = tmp_path / "pipeline.log"
    first = spawn_pipeline(settings, log)
    try:
        await wait_running(log)
        with Publisher(mqtt_server.url, Topics(topic_root), batch) as pub:
            await pub.wait_first_half()

            async def some_stored() -> int:
                n = await count(fleet_conn)
                assert n > 0
                return n

            at_kill = await eventually(some_stored, deadline_s=30)
            first.kill()  # SIGKILL: no flush, no DISCONNECT, acks of the batch in flight never sent
            first.wait(10)
            assert at_kill < len(want)
            pub.gate.set()  # the second half is published while no pipeline runs
            second = spawn_pipeline(settings, log)
            try:

                async def all_stored() -> None:
                    assert await count(fleet_conn) == len(want)

                await eventually(all_stored, deadline_s=60)
            finally:
                second.terminate()
                assert second.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    rows = await stored(fleet_conn)
    assert len(rows) == len(set(rows)) == len(want)
    assert set(rows) == want
    cur = await fleet_conn.execute("SELECT count(*) FROM dead_letters")
    assert await cur.fetchone() == (0,)


async def test_terminated_connections_mid_stream(
    fleet_conn: AsyncConn,
    database_url: str,
    mqtt_server: MqttServer,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    settings = pipeline_settings(database_url, mqtt_server, topic_root, tmp_path, receive_maximum=100)
    batch = messages(300, int(time.time() * 1000) - 600_000)
    want = expected(batch)
    async with running_pipeline(settings, catalogue) as running:
        with Publisher(mqtt_server.url, Topics(topic_root), batch) as pub:
            await pub.wait_first_half()

            async def some_stored() -> None:
                assert await count(fleet_conn) > 0

            await eventually(some_stored, deadline_s=30)
            cur = await fleet_conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            terminated = await cur.fetchone()
            assert terminated is not None and terminated[0] >= 1
            pub.gate.set()

        async def all_stored() -> None:
            assert await count(fleet_conn) == len(want)

        await eventually(all_stored, deadline_s=60)
        assert running.pipeline.ingest_metrics.retries._value.get() >= 1
    assert set(await stored(fleet_conn)) == want


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL this test may stop and start."""
    with EmbeddedPostgres(tmp_path / "own-pg") as server:
        yield server


async def test_database_stopped_for_seconds_bounded_memory_nothing_lost(
    own_postgres: EmbeddedPostgres,
    mqtt_server: MqttServer,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    receive_maximum = 40
    url = own_postgres.url
    settings = pipeline_settings(url, mqtt_server, topic_root, tmp_path, receive_maximum=receive_maximum)
    async with connection(url) as conn:
        await migrate(conn, Settings(database_url=url), catalogue)
        await register_fleet(conn)
    batch = messages(240, int(time.time() * 1000) - 600_000)
    want = expected(batch)
    async with running_pipeline(settings, catalogue) as running:
        metrics = running.pipeline.ingest_metrics
        with Publisher(mqtt_server.url, Topics(topic_root), batch) as pub:
            await pub.wait_first_half()
            async with connection(url) as conn:

                async def some_stored() -> None:
                    assert await count(conn) > 0

                await eventually(some_stored, deadline_s=30)
            await asyncio.to_thread(own_postgres.stop)
            stopped_at = time.monotonic()
            pub.gate.set()
        # Every message is now with the broker or the pipeline. The pipeline holds at most its bound;
        # the broker holds the rest until the database is back.
        session = running.pipeline.session

        async def down_for_seconds() -> None:
            assert time.monotonic() - stopped_at >= 4.0  # the scenario: an outage of several seconds
            assert metrics.retries._value.get() >= 3
            assert session.inflight == receive_maximum

        await eventually(down_for_seconds, deadline_s=60)
        assert session.inflight <= receive_maximum and len(session.inbox) <= receive_maximum
        assert metrics.db_up._value.get() == 0
        await asyncio.to_thread(own_postgres.start)
        async with connection(url) as conn:

            async def all_stored() -> None:
                assert await count(conn) == len(want)

            await eventually(all_stored, deadline_s=90)
            assert set(await stored(conn)) == want
        assert metrics.db_up._value.get() == 1


async def test_backfill_days_old_native(
    fleet_conn: AsyncConn,
    database_url: str,
    mqtt_server: MqttServer,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    settings = pipeline_settings(database_url, mqtt_server, topic_root, tmp_path)
    day_ms = 86_400_000
    now_ms = int(time.time() * 1000)
    old = [
        (now_ms - 3 * day_ms, "pm25", 11.0),
        (now_ms - 40 * day_ms, "pm25", 12.0),
        (now_ms - 400 * day_ms, "pm25", 13.0),
    ]
    async with running_pipeline(settings, catalogue):
        with publisher(mqtt_server.url) as client:
            publish(client, Topics(topic_root).telemetry("aq-1"), encode_compact(old))

        async def backfilled() -> None:
            assert sorted(t for _, _, t in await stored(fleet_conn)) == sorted(t for t, _, _ in old)

        await eventually(backfilled)

        async def rolled_up() -> None:
            cur = await fleet_conn.execute("SELECT count(*), sum(count) FROM readings_1m")
            assert await cur.fetchone() == (3, 3)

        await eventually(rolled_up)
    cur = await fleet_conn.execute("SELECT count(*) FROM dead_letters")
    assert await cur.fetchone() == (0,)


async def test_sigterm_commits_and_acks_what_it_received(
    fleet_conn: AsyncConn,
    database_url: str,
    mqtt_server: MqttServer,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    metrics_port = free_port()
    settings = pipeline_settings(
        database_url,
        mqtt_server,
        topic_root,
        tmp_path,
        batch_interval=30.0,
        pipeline_metrics_port=metrics_port,
    )
    batch = messages(30, int(time.time() * 1000) - 600_000)
    log = tmp_path / "pipeline.log"
    proc = spawn_pipeline(settings, log)
    try:
        await wait_running(log)
        with publisher(mqtt_server.url) as client:
            for device, payload, _ in batch:
                publish(client, Topics(topic_root).telemetry(device), payload)

        async def all_received() -> None:
            text = await asyncio.to_thread(scrape, metrics_port)
            assert 'cityops_messages_received_total{kind="telemetry"} 30.0' in text

        await eventually(all_received)
        # The batch interval is 30 s: nothing is committed until SIGTERM makes the pipeline flush.
        assert await count(fleet_conn) == 0
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert set(await stored(fleet_conn)) == expected(batch)
    assert "pipeline stopped" in log.read_text()
    # Everything was acknowledged: the next session of the same client gets no redelivery before a
    # fresh message (a broker resends unacknowledged messages first on reconnect).
    async with running_pipeline(
        settings.model_copy(update={"pipeline_metrics_port": 0, "batch_interval": 0.05}), catalogue
    ) as again:
        with publisher(mqtt_server.url) as client:
            publish(
                client,
                Topics(topic_root).telemetry("aq-1"),
                encode_compact([(int(time.time() * 1000), "pm25", 1)]),
            )

        async def marker_stored() -> None:
            assert await count(fleet_conn) == len(expected(batch)) + 1

        await eventually(marker_stored)
        assert again.pipeline.ingest_metrics.rows_duplicate._value.get() == 0
        assert again.pipeline.gateway_metrics.messages.labels("telemetry")._value.get() == 1


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()
