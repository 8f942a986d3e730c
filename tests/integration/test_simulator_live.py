"""`cityops sim` against the real pipeline: a scenario's readings all stored once, and the alerts
cityops raises are exactly the ones its ground truth declares; its dead letters too."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn
from cityops.embedded import MosquittoProcess
from tests.conftest import MqttServer
from tests.pipeline_helpers import pipeline_settings, running_pipeline

SCENARIO = "device-faults"


async def fired_alerts(conn: AsyncConn) -> set[tuple[str, str]]:
    cur = await conn.execute(
        "SELECT DISTINCT a.labels->>'rule', a.labels->>'subject' FROM alerts a "
        "JOIN alert_events e ON e.alert_id = a.id WHERE e.to_state = 'firing'"
    )
    return {(rule, subject) for rule, subject in await cur.fetchall()}


async def test_a_scenario_through_the_pipeline_matches_its_ground_truth(
    migrated_conn: AsyncConn,
    database_url: str,
    mosquitto: str,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    # A broker configured like deploy/mosquitto (its queues never drop), so the scenario goes at full speed.
    with MosquittoProcess(tmp_path / "broker", mosquitto) as broker:
        server = MqttServer(broker.url, broker.url)
        settings = pipeline_settings(database_url, server, topic_root, tmp_path)
        truth_file = tmp_path / "truth.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
        env |= {
            "CITYOPS_DATABASE_URL": database_url,
            "CITYOPS_MQTT_URL": broker.url,
            "CITYOPS_TOPIC_ROOT": topic_root,
            "CITYOPS_DATA_DIR": str(tmp_path / "sim"),
        }
        async with running_pipeline(settings, catalogue):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cityops", "sim", "--scenario", SCENARIO, "--truth", str(truth_file),
                "--verify", "--verify-timeout", "120", "--max-rate", "0", "--processes", "2",
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 240)
    report = out.decode()
    assert proc.returncode == 0, report
    assert " 0 missing, 0 duplicated" in report, report
    truth = orjson.loads(truth_file.read_bytes())
    expected = {(a["rule"], a["subject"]) for i in truth["incidents"] for a in i["expected_alerts"]}
    assert expected and await fired_alerts(migrated_conn) == expected
    cur = await migrated_conn.execute("SELECT reason, count(*) FROM dead_letters GROUP BY 1")
    dead = dict(await cur.fetchall())
    declared: dict[str, int] = {}
    for incident in truth["incidents"]:
        for reason, count in incident["expected_dead_letters"].items():
            declared[reason] = declared.get(reason, 0) + count
    assert (
        declared == {"clock_skew": declared["clock_skew"], "malformed_payload": 12}
        and declared["clock_skew"] > 0
    )
    assert dead == declared
