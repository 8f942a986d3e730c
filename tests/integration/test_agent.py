"""The device agent against a broker that goes away: readings spooled on disk during the outage
arrive afterwards with their original timestamps, none lost, none stored twice."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn
from cityops.embedded import MosquittoProcess
from device_sim.agent import Agent, AgentOptions
from device_sim.sources import QueueSource
from tests.conftest import MqttServer
from tests.mqtt_helpers import collect, publish, publisher, subscriber
from tests.pipeline_helpers import pipeline_settings, running_pipeline
from tests.waiting import eventually

START_MS = (int(time.time()) - 3600) * 1000  # an hour ago, one reading a second from there


async def stored_times(conn: AsyncConn) -> list[int]:
    cur = await conn.execute(
        "SELECT (extract(epoch FROM r.time) * 1000)::bigint FROM readings r "
        "JOIN devices d ON d.id = r.device_id WHERE d.external_id = 'pd-1' ORDER BY 1"
    )
    return [row[0] for row in await cur.fetchall()]


async def test_readings_made_while_the_broker_is_down_arrive_once_with_their_timestamps(
    fleet_conn: AsyncConn,
    database_url: str,
    mosquitto: str,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    broker = MosquittoProcess(tmp_path / "broker", mosquitto).start()
    server = MqttServer(broker.url, broker.url, shared_subscriptions=True)
    # A plain subscription: after a restart Mosquitto keeps queueing for the pipeline's session before
    # it reconnects, which it does not do for a shared subscription whose members are all away.
    settings = pipeline_settings(
        database_url, server, topic_root, tmp_path, rules_enabled=False, subscription_group=""
    )
    source = QueueSource()
    agent = Agent(
        AgentOptions("pd-1", broker.url, topic_root, tmp_path / "spool.sqlite", replay_rate=200), source
    )
    stop = asyncio.Event()
    try:
        async with running_pipeline(settings, catalogue):
            task = asyncio.create_task(agent.run(stop), name="test-agent")
            await asyncio.wait_for(agent.connected.wait(), 15)
            for i in range(20):
                await source.queue.put((START_MS + i * 1000, {"ponding_depth": float(i)}))

            async def first_twenty() -> None:
                assert await stored_times(fleet_conn) == [START_MS + i * 1000 for i in range(20)]

            await eventually(first_twenty, deadline_s=20)

            broker.stop()  # the outage

            async def disconnected() -> None:
                assert not agent.connected.is_set()

            await eventually(disconnected)
            for i in range(20, 320):
                await source.queue.put((START_MS + i * 1000, {"ponding_depth": float(i % 50)}))

            async def all_spooled() -> None:
                assert len(agent.spool) == 300

            await eventually(all_spooled)
            broker.start()  # same port, same persistence: the pipeline's session is still there
            for i in range(320, 330):  # live readings beside the replay
                await source.queue.put((START_MS + i * 1000, {"ponding_depth": 1.0}))

            async def all_stored() -> None:
                assert await stored_times(fleet_conn) == [START_MS + i * 1000 for i in range(330)]
                assert len(agent.spool) == 0

            await eventually(all_stored, deadline_s=60)
            assert agent.spool.dropped == 0
            stop.set()
            await asyncio.wait_for(task, 15)
    finally:
        stop.set()
        broker.stop()
    cur = await fleet_conn.execute("SELECT count(*), count(DISTINCT time) FROM readings")
    assert await cur.fetchone() == (330, 330)


async def test_commands_are_answered_on_their_result_topic(
    mqtt_server: MqttServer, topic_root: str, tmp_path: Path
) -> None:
    source = QueueSource()
    agent = Agent(AgentOptions("pd-1", mqtt_server.url_v311, topic_root, tmp_path / "spool.sqlite"), source)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="test-agent")
    try:
        await asyncio.wait_for(agent.listening.wait(), 15)
        base = f"{topic_root}/v1/pd-1/cmd"
        with subscriber(mqtt_server.url, f"{base}/+/result") as inbox, publisher(mqtt_server.url) as client:
            publish(client, f"{base}/c1", b'{"command": "ping"}')
            publish(client, f"{base}/c2", b'{"command": "set_interval", "interval_s": 5}')
            publish(client, f"{base}/c3", b"not json")
            replies = await asyncio.to_thread(collect, inbox, 3)
        by_topic = {r.topic.split("/")[-2]: orjson.loads(r.payload) for r in replies}
        assert by_topic["c1"]["ok"] is True and by_topic["c1"]["result"]["spooled"] == 0
        assert by_topic["c2"] == {
            "ok": False,
            "command": "set_interval",
            "error": "this source has no sampling interval",
        }
        assert by_topic["c3"]["ok"] is False and "JSON object" in by_topic["c3"]["error"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
