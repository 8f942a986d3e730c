"""Running a pipeline for a test: in-process, or as a `cityops pipeline` child process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from cityops.catalogue import Catalogue
from cityops.components import Services
from cityops.db.connection import AsyncConn
from cityops.model import DeviceSpec
from cityops.registry import import_fleet
from cityops.settings import Settings
from gateway.pipeline import Pipeline
from tests.conftest import MqttServer
from tests.waiting import eventually

FLEET = [
    DeviceSpec(external_id="aq-1", tenant="environment", kind="air_station", name="Air 1", district="yuexiu"),
    DeviceSpec(external_id="aq-2", tenant="environment", kind="air_station", name="Air 2", district="tianhe"),
    DeviceSpec(external_id="pd-1", tenant="water", kind="ponding_gauge", name="Ponding 1", district="tianhe"),
    DeviceSpec(external_id="off-1", tenant="water", kind="ponding_gauge", name="Disabled", enabled=False),
]


async def register_fleet(conn: AsyncConn, fleet: list[DeviceSpec] | None = None) -> dict[str, int]:
    await import_fleet(conn, fleet or FLEET)
    cur = await conn.execute("SELECT external_id, id FROM devices")
    return {row[0]: row[1] for row in await cur.fetchall()}


def pipeline_settings(
    database_url: str, mqtt: MqttServer, topic_root: str, tmp: Path, **overrides: object
) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "mqtt_url": mqtt.url,
        "topic_root": topic_root,
        # The embedded broker cannot hold a persistent shared subscription: one plain subscriber there.
        "subscription_group": f"g{topic_root}" if mqtt.shared_subscriptions else "",
        "mqtt_client_id": f"pipeline-{topic_root}",
        "pipeline_metrics_port": 0,
        "batch_interval": 0.05,
        "rollup_interval": 0.5,
        "presence_interval": 0.5,
        "data_dir": tmp / "data",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class RunningPipeline:
    pipeline: Pipeline
    stop: asyncio.Event
    task: asyncio.Task[None]


@asynccontextmanager
async def running_pipeline(settings: Settings, catalogue: Catalogue) -> AsyncIterator[RunningPipeline]:
    assert settings.database_url and settings.mqtt_url
    pipeline = Pipeline(settings, catalogue, Services(settings.database_url, settings.mqtt_url))
    stop = asyncio.Event()
    ready = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    task = asyncio.create_task(pipeline.run(stop, ready=on_ready), name="test-pipeline")
    waiter = asyncio.ensure_future(ready.wait())
    await asyncio.wait([waiter, task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises what stopped it
    assert ready.is_set(), "pipeline did not come up within 30 s"
    try:
        yield RunningPipeline(pipeline, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def pipeline_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    for field in (
        "database_url",
        "mqtt_url",
        "topic_root",
        "subscription_group",
        "mqtt_client_id",
        "batch_interval",
        "pipeline_metrics_port",
        "data_dir",
        "receive_maximum",
        "rollup_interval",
        "shutdown_timeout",
    ):
        env[f"CITYOPS_{field.upper()}"] = str(getattr(settings, field))
    env["CITYOPS_LOG_FORMAT"] = "json"
    return env


def spawn_pipeline(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "cityops", "pipeline"],
        env=pipeline_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def unique_root() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


async def wait_running(log: Path, times: int = 1) -> None:
    """Until the child pipeline has subscribed (``times`` counts restarts writing to the same log)."""

    async def subscribed() -> None:
        text = await asyncio.to_thread(lambda: log.read_text() if log.exists() else "")
        assert text.count("pipeline running") >= times, text[-2000:]

    await eventually(subscribed, deadline_s=30)
