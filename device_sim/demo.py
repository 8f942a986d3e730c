"""``cityops up --demo``: a small simulated city playing the ``demo`` scenario in a loop, live.

A newcomer sees readings arrive and, within minutes, alerts open and clear: a gas leak, a
cloudburst that floods ponding gauges and jams roads, a water main burst. Each loop starts the
scenario afresh from the present, so the readings are always live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from cityops.catalogue import Catalogue
from cityops.components import Services
from cityops.db.connection import connection
from cityops.registry import import_fleet
from cityops.settings import Settings
from device_sim.fleet import build_fleet
from device_sim.load import SimPlan, publish_share
from device_sim.payloads import Shape
from device_sim.scenario import find_scenario

log = logging.getLogger(__name__)

SCENARIO = "demo"
PREFIX = "demo"
SEED = 1
# The pipeline starts beside the demo; give it this long to subscribe before the first reading.
START_DELAY_S = 5.0
RETRY_S = 5.0


class DemoComponent:
    name = "demo"
    help = "a simulated city playing the demo scenario in a loop (what `cityops up --demo` runs)"
    order = 50

    def enabled(self, settings: Settings) -> bool:
        """Part of `cityops up` only with --demo."""
        return settings.demo

    def describe(self, settings: Settings, services: Services) -> str:
        scenario = find_scenario(SCENARIO)
        return f"demo: {scenario.fleet_size} simulated devices ({PREFIX}-*), scenario {SCENARIO!r} in a loop"

    async def run(
        self, settings: Settings, catalogue: Catalogue, services: Services, stop: asyncio.Event
    ) -> None:
        scenario = find_scenario(SCENARIO)
        fleet = build_fleet(scenario.fleet_size, catalogue, seed=SEED, prefix=PREFIX)
        async with connection(services.database_url) as conn:
            await import_fleet(conn, [d.spec for d in fleet])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), START_DELAY_S)
        halt = threading.Event()
        relay = asyncio.create_task(_relay(stop, halt), name="demo-stop-relay")
        try:
            while not stop.is_set():
                now_ms = time.time_ns() // 1_000_000
                plan = SimPlan(
                    fleet_size=scenario.fleet_size,
                    seed=SEED,
                    prefix=PREFIX,
                    start_ms=now_ms,
                    end_ms=now_ms + int(scenario.duration_s * 1000),
                    interval_ms=None,
                    scenario=SCENARIO,
                    shape=Shape.SINGLE,
                    qos=1,
                    mqtt_url=services.mqtt_url_v311,
                    topic_root=settings.topic_root,
                    processes=1,
                    max_rate=float("inf"),
                )
                log.info(
                    "demo scenario starting",
                    extra={"scenario": SCENARIO, "minutes": scenario.duration_s / 60},
                )
                report = await asyncio.to_thread(publish_share, plan, 0, None, halt)
                log.info("demo scenario done", extra={"readings": report.readings})
        finally:
            halt.set()
            relay.cancel()


async def _relay(stop: asyncio.Event, halt: threading.Event) -> None:
    await stop.wait()
    halt.set()


component = DemoComponent()
