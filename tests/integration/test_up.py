"""`cityops up`: configured services, or embedded ones when none are configured; clean stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg

from cityops.catalogue import Catalogue
from cityops.db.connection import connection
from cityops.db.migrate import migration_files
from cityops.embedded import port_open
from cityops.model import DeviceSpec
from cityops.registry import import_fleet
from cityops.services import Endpoints, read_runtime
from cityops.settings import MqttEndpoint, Settings, StorageMode
from cityops.up import run_up
from tests.mqtt_helpers import collect, publish, publisher, subscriber
from tests.waiting import eventually


async def test_up_with_configured_services(
    database_url: str, mqtt_url: str, topic_root: str, tmp_path: Path, catalogue: Catalogue
) -> None:
    settings = Settings(
        database_url=database_url,
        mqtt_url=mqtt_url,
        data_dir=tmp_path / "state",
        topic_root=topic_root,
        mqtt_client_id=f"up-{topic_root}",
        subscription_group=topic_root,
        pipeline_metrics_port=0,
    )
    stop = asyncio.Event()
    seen: list[Endpoints] = []

    async def ready(endpoints: Endpoints) -> None:
        seen.append(endpoints)
        assert read_runtime(settings) == endpoints
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (
                len(migration_files(StorageMode.NATIVE)),
            )
            assert conn.execute(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'readings'::regclass"
            ).fetchone() != (0,)
        stop.set()

    await asyncio.wait_for(run_up(settings, catalogue, ready=ready, stop=stop), 60)
    assert seen[0].embedded == [] and seen[0].database_url == database_url
    assert read_runtime(settings) is None


async def test_up_starts_and_stops_embedded_services(tmp_path: Path, catalogue: Catalogue) -> None:
    settings = Settings(data_dir=tmp_path / "state", pipeline_metrics_port=0)
    stop = asyncio.Event()
    seen: list[Endpoints] = []

    async def ready(endpoints: Endpoints) -> None:
        seen.append(endpoints)

        def check() -> None:
            with psycopg.connect(endpoints.database_url) as conn:
                assert conn.execute(
                    "SELECT value FROM cityops_meta WHERE key = 'storage_mode'"
                ).fetchone() == ("native",)
            with subscriber(endpoints.mqtt_url, "x/#") as inbox, publisher(endpoints.mqtt_url) as client:
                publish(client, "x/y", b"1")
                assert collect(inbox, 1)[0].payload == b"1"

        await asyncio.to_thread(check)
        # The pipeline runs inside `cityops up`: a registered device's reading gets stored.
        async with connection(endpoints.database_url) as conn:
            await import_fleet(
                conn, [DeviceSpec(external_id="up-1", tenant="water", kind="ponding_gauge", name="Up test")]
            )
            attempt = 0

            async def stored() -> None:
                nonlocal attempt
                attempt += 1  # each try publishes again: the first may precede the subscription
                with publisher(endpoints.mqtt_url) as client:
                    publish(client, "cityops/v1/up-1/telemetry", b'{"ponding_depth": %d}' % attempt)
                cur = await conn.execute("SELECT count(*) FROM readings")
                row = await cur.fetchone()
                assert row is not None and row[0] >= 1

            await eventually(stored, deadline_s=30)
        stop.set()

    await asyncio.wait_for(run_up(settings, catalogue, ready=ready, stop=stop), 120)
    (endpoints,) = seen
    assert endpoints.embedded == ["postgresql", "mqtt"]
    assert (tmp_path / "state" / "postgres" / "data" / "PG_VERSION").exists()
    db_port = int(endpoints.database_url.split(":")[2].split("/")[0])
    mqtt = MqttEndpoint.parse(endpoints.mqtt_url)
    assert not port_open("127.0.0.1", db_port) and not port_open(mqtt.host, mqtt.port)


async def test_maintenance_runs_a_round_then_waits_for_its_interval(
    migrated_conn: object, settings: Settings
) -> None:
    from datetime import UTC, datetime

    from cityops.up import maintenance_loop

    assert settings.database_url is not None
    rounds: list[datetime] = []

    def clock() -> datetime:
        rounds.append(datetime.now(UTC))
        return rounds[-1]

    stop = asyncio.Event()
    task = asyncio.create_task(
        maintenance_loop(settings.database_url, settings, stop, clock, interval_s=3600)
    )

    async def one_round_done() -> None:
        assert rounds
        cur = await migrated_conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        )  # type: ignore[attr-defined]
        assert (await cur.fetchone())[0] == 1  # the round's connection is closed: it is waiting now

    await eventually(one_round_done)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert len(rounds) == 1
