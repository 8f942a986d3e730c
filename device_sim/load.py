"""``cityops sim``: publish a simulated fleet to the broker, as a scenario or as load.

Two ways to run:

- **scenario** (``--scenario NAME``): the fleet at its catalogue sampling intervals with the
  scenario's incidents. By default the scenario lies wholly in the past and is sent as backfill as
  fast as the broker takes it (alerts are decided in event time, so they are the same as live);
  ``--start`` puts it elsewhere, and the part that lies in the future is sent in real time. The
  ground truth goes to ``--truth`` (JSON).
- **load** (``--rate R``): every device reports all its metrics at the period that makes R readings
  a second across the fleet, stamped with the current time, for ``--duration`` seconds.

Publishing is split across ``--processes`` processes (a device always in the same one), each with
its own connection. ``--verify`` then waits for the pipeline to store what was sent and reconciles
per device: readings missing, readings stored more than once (or never sent).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cityops.catalogue import Catalogue, load_default_catalogue
from cityops.settings import MqttEndpoint
from cityops.topics import Topics
from device_sim.fleet import SimDevice, build_fleet
from device_sim.payloads import Message, Shape, messages
from device_sim.scenario import Scenario, find_scenario
from device_sim.simulation import Emission, Simulation
from device_sim.wire import BulkPublisher

log = logging.getLogger(__name__)

# Simulated time is cut into slices this long: each is generated, encoded and published in one go.
SLICE_MS = 1_000
# How far behind the wall clock a live simulation may fall before it says so.
LAG_WARNING_MS = 5_000
DEFAULT_MAX_RATE = 5_000.0
MAX_CLOCK_SKEW_MS = 300_000  # the gateway's default (CITYOPS_MAX_CLOCK_SKEW): further ahead is rejected


@dataclass(frozen=True, slots=True)
class SimPlan:
    """Everything a publisher process needs to rebuild its share of the simulation."""

    fleet_size: int
    seed: int
    prefix: str
    start_ms: int
    end_ms: int
    interval_ms: int | None  # load mode; None: catalogue intervals (scenario mode)
    scenario: str | None
    shape: Shape
    qos: int
    mqtt_url: str
    topic_root: str
    processes: int
    max_clock_skew_ms: int = MAX_CLOCK_SKEW_MS
    # Backfill is paced to this many readings a second: a broker queues only so much for a busy
    # subscriber (stock Mosquitto: 1000 messages) and drops the rest without telling the publisher.
    max_rate: float = DEFAULT_MAX_RATE


@dataclass(slots=True)
class PublisherReport:
    messages: int = 0
    readings: int = 0  # readings the pipeline should store
    expected: dict[str, int] = field(default_factory=dict)  # per device
    emitted: dict[str, dict[str, int]] = field(default_factory=dict)  # per incident: fault counts
    seconds: float = 0.0
    max_lag_ms: int = 0


def fleet_for(plan: SimPlan, catalogue: Catalogue) -> list[SimDevice]:
    return build_fleet(plan.fleet_size, catalogue, seed=plan.seed, prefix=plan.prefix)


def share(fleet: list[SimDevice], index: int, processes: int) -> set[str]:
    return {d.id for n, d in enumerate(fleet) if n % processes == index}


def publish_share(
    plan: SimPlan, index: int, now_ms: Any = None, halt: threading.Event | None = None
) -> PublisherReport:
    """One process's share: simulate, encode, publish at QoS ``plan.qos``, paced by the wall clock.
    ``halt`` ends it early (what was sent is still flushed)."""
    clock = now_ms or (lambda: time.time_ns() // 1_000_000)
    catalogue = load_default_catalogue()
    fleet = fleet_for(plan, catalogue)
    scenario = find_scenario(plan.scenario) if plan.scenario else None
    sim = Simulation(
        fleet,
        catalogue,
        start_ms=plan.start_ms,
        scenario=scenario,
        seed=plan.seed,
        interval_ms=plan.interval_ms,
        emit_only=share(fleet, index, plan.processes),
    )
    topics = Topics(plan.topic_root)
    endpoint = MqttEndpoint.parse(plan.mqtt_url)
    report = PublisherReport()
    expected: Counter[str] = Counter()
    began = time.monotonic()
    publisher = _connect(endpoint, index)
    try:
        cursor = plan.start_ms
        while cursor < plan.end_ms and not (halt is not None and halt.is_set()):
            wall = clock()
            if cursor + SLICE_MS > wall:  # caught up with the present: real time from here
                time.sleep(min(SLICE_MS, cursor + SLICE_MS - wall) / 1000)
                continue
            report.max_lag_ms = max(report.max_lag_ms, wall - cursor - SLICE_MS) if plan.interval_ms else 0
            until = min(plan.end_ms, cursor + SLICE_MS)
            emissions = _accepted(sim.run_until(until), expected, clock() + plan.max_clock_skew_ms)
            batch = list(messages(emissions, plan.shape))
            publisher = _reconnect_if_storming(sim, publisher, endpoint, index, until)
            publisher.publish_many(
                ((topics.telemetry(m.device).encode(), m.payload) for m in batch), qos=plan.qos
            )
            report.messages += len(batch)
            report.readings += sum(m.readings for m in batch)
            cursor = until
            _pace(report.readings + report.messages, began, plan.max_rate / plan.processes)
        publisher.flush()
    finally:
        publisher.close()
    report.expected = dict(expected)
    report.emitted = {i.spec.id: dict(i.emitted) for i in sim.incidents}
    report.seconds = time.monotonic() - began
    return report


def _pace(sent: int, began: float, rate: float) -> None:
    """Sleep as long as sending is ahead of ``rate`` (counting messages too: garbage weighs nothing)."""
    ahead = sent / rate - (time.monotonic() - began)
    if ahead > 0:
        time.sleep(ahead)


def _accepted(emissions: Iterable[Emission], expected: Counter[str], latest_ts_ms: int) -> Iterator[Emission]:
    """Emissions passed through, counting per device the readings the pipeline must store: not
    garbage, and not stamped further ahead of the present than the gateway allows."""
    for e in emissions:
        if not e.malformed and e.ts_ms <= latest_ts_ms:
            expected[e.device] += len(e.values)
        yield e


def _connect(endpoint: MqttEndpoint, index: int) -> BulkPublisher:
    return BulkPublisher(
        endpoint.host,
        endpoint.port,
        f"cityops-sim-{index}-{uuid.uuid4().hex[:6]}",
        username=endpoint.username,
        password=endpoint.password,
    )


def _reconnect_if_storming(
    sim: Simulation, publisher: BulkPublisher, endpoint: MqttEndpoint, index: int, at_ms: int
) -> BulkPublisher:
    """During a ``reconnect_storm`` incident the connection drops and comes back every slice (after
    everything sent was acknowledged: a storm must not lose anything)."""
    storming = any(i.spec.type == "reconnect_storm" and i.active(at_ms) for i in sim.incidents)
    if not storming:
        return publisher
    publisher.flush()
    publisher.close()
    for incident in sim.incidents:
        if incident.spec.type == "reconnect_storm" and incident.active(at_ms):
            incident.emitted["reconnects"] = incident.emitted.get("reconnects", 0) + 1
    return _connect(endpoint, index)


def _worker(plan: SimPlan, index: int, results: Any) -> None:
    try:
        results.put((index, publish_share(plan, index), None))
    except Exception as exc:  # reported to the parent, which fails the run with it
        results.put((index, None, f"{type(exc).__name__}: {exc}"))


def publish(plan: SimPlan) -> PublisherReport:
    """Run the plan in ``plan.processes`` processes; their reports merged."""
    if plan.processes == 1:
        return publish_share(plan, 0)
    context = mp.get_context("fork")
    results = context.Queue()
    workers = [
        context.Process(target=_worker, args=(plan, i, results), name=f"sim-publisher-{i}")
        for i in range(plan.processes)
    ]
    for worker in workers:
        worker.start()
    reports: list[PublisherReport] = []
    errors: list[str] = []
    for _ in workers:
        _index, report, error = results.get()
        if error:
            errors.append(error)
        else:
            reports.append(report)
    for worker in workers:
        worker.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return merge(reports)


def merge(reports: list[PublisherReport]) -> PublisherReport:
    total = PublisherReport()
    for r in reports:
        total.messages += r.messages
        total.readings += r.readings
        total.expected.update(r.expected)
        for incident, counts in r.emitted.items():
            into = total.emitted.setdefault(incident, {})
            for key, n in counts.items():
                into[key] = into.get(key, 0) + n
        total.seconds = max(total.seconds, r.seconds)
        total.max_lag_ms = max(total.max_lag_ms, r.max_lag_ms)
    return total


def scenario_truth(plan: SimPlan, scenario: Scenario, report: PublisherReport) -> dict[str, Any]:
    """The scenario's ground truth, with the fault counts the publishers actually produced."""
    catalogue = load_default_catalogue()
    sim = Simulation(
        fleet_for(plan, catalogue), catalogue, start_ms=plan.start_ms, scenario=scenario, seed=plan.seed
    )
    for incident in sim.incidents:
        incident.emitted.update(report.emitted.get(incident.spec.id, {}))
    return sim.ground_truth()


def messages_of(plan: SimPlan) -> list[Message]:
    """Every message of a plan in one process, without publishing (for tests and dry runs)."""
    catalogue = load_default_catalogue()
    scenario = find_scenario(plan.scenario) if plan.scenario else None
    sim = Simulation(
        fleet_for(plan, catalogue),
        catalogue,
        start_ms=plan.start_ms,
        scenario=scenario,
        seed=plan.seed,
        interval_ms=plan.interval_ms,
    )
    return list(messages(sim.run_until(plan.end_ms), plan.shape))
