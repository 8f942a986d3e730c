"""The rule engine against a real database, with an injected clock: state rebuilt on start."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn
from cityops.model import DeviceSpec, Domain
from cityops.settings import Settings
from rules.engine import RuleEngine
from rules.evaluator import DeviceInfo
from rules.metrics import RuleMetrics
from tests.pipeline_helpers import register_fleet

S = 1_000_000
NOW = datetime(2026, 7, 1, 12, tzinfo=UTC)
FLEET = [
    DeviceSpec(external_id="rg-1", tenant="water", kind="rain_gauge", name="Rain 1", district="tianhe"),
    DeviceSpec(external_id="pd-9", tenant="water", kind="ponding_gauge", name="Ponding 9", district="tianhe"),
]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now_us = int(now.timestamp() * S)

    def __call__(self) -> int:
        return self.now_us


async def open_alerts(conn: AsyncConn) -> list[tuple[object, ...]]:
    cur = await conn.execute(
        "SELECT labels->>'rule', labels->>'subject' FROM alerts WHERE state <> 'resolved' ORDER BY 1, 2"
    )
    return await cur.fetchall()


async def test_start_rebuilds_windows_and_silences_from_the_database(
    migrated_conn: AsyncConn, settings: Settings, catalogue: Catalogue
) -> None:
    ids = await register_fleet(migrated_conn, FLEET)
    rain = catalogue.metrics["rainfall"].id
    # 45 mm over the last two hours (under the 50 mm / 3 h orange signal); pd-9 last seen 4 h ago.
    for minutes_ago, mm in ((110, 15.0), (70, 15.0), (30, 15.0)):
        await migrated_conn.execute(
            "SELECT cityops_ensure_partitions(%s::date, %s::date)", (NOW.date(), NOW.date())
        )
        await migrated_conn.execute(
            "INSERT INTO readings (time, device_id, metric_id, value, quality) VALUES (%s, %s, %s, %s, 0)",
            (NOW - timedelta(minutes=minutes_ago), ids["rg-1"], rain, mm),
        )
    await migrated_conn.execute(
        "UPDATE devices SET last_seen = %s WHERE external_id = 'pd-9'", (NOW - timedelta(hours=4),)
    )
    await migrated_conn.execute("UPDATE devices SET last_seen = %s WHERE external_id = 'rg-1'", (NOW,))
    devices = [
        DeviceInfo(ids["rg-1"], "rg-1", "water", "rain_gauge", Domain.DRAINAGE, "tianhe"),
        DeviceInfo(ids["pd-9"], "pd-9", "water", "ponding_gauge", Domain.DRAINAGE, "tianhe"),
    ]
    assert settings.database_url is not None
    clock = Clock(NOW)
    metrics = RuleMetrics(CollectorRegistry())
    async with RuleEngine(settings.database_url, catalogue, settings, metrics, clock) as engine:
        await engine.start(devices)
        assert metrics.rules_loaded._value.get() > 40  # the default packs, installed into the empty table
        assert metrics.replayed._value.get() == 3
        assert await open_alerts(migrated_conn) == []
        # pd-9 has been silent for 4 h: the first tick raises the 3 h no-data alert, not 3 h later.
        await engine.tick()
        assert await open_alerts(migrated_conn) == [("device-no-data-3h", "pd-9")]
        # 10 mm more: 55 mm in 3 h, counting the replayed readings: the blue, yellow and orange signals.
        clock.now_us += 60 * S
        await engine.evaluate([(devices[0], [(clock.now_us, rain, 10.0, 0)])])
        assert await open_alerts(migrated_conn) == [
            ("device-no-data-3h", "pd-9"),
            ("rainstorm-blue", "rg-1"),
            ("rainstorm-orange", "rg-1"),
            ("rainstorm-yellow", "rg-1"),
        ]
