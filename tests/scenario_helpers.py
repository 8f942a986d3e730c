"""Running a simulation through the default rule packs without services: what alerts would fire."""

from __future__ import annotations

from cityops.catalogue import Catalogue
from device_sim.fleet import SimDevice
from device_sim.simulation import Simulation
from rules.conditions import Status
from rules.evaluator import DeviceInfo, Evaluator
from rules.spec import default_packs

MAX_CLOCK_SKEW_MS = 300_000  # the gateway's default: further ahead is rejected
TICK_MS = 60_000


def rule_device(device: SimDevice) -> DeviceInfo:
    spec = device.spec
    return DeviceInfo(
        0, spec.external_id, spec.tenant, spec.kind, device.kind.domain, spec.district, spec.tags
    )


def fired_alerts(
    sim: Simulation, fleet: list[SimDevice], catalogue: Catalogue, until_ms: int
) -> set[tuple[str, str]]:
    """(rule, subject) of every alert that reached firing, as the pipeline would decide them."""
    now = [sim.start_ms]
    rules = [rule for pack in default_packs(catalogue).values() for rule in pack]
    evaluator = Evaluator(rules, catalogue, lambda: now[0] * 1000)
    devices = {}
    for number, device in enumerate(fleet, start=1):
        info = rule_device(device)
        devices[device.id] = DeviceInfo(
            number,
            *(getattr(info, f) for f in ("external_id", "tenant", "kind", "domain", "district", "tags")),
        )
        evaluator.watch_for_silence(devices[device.id], sim.start_ms * 1000)
    fired: set[tuple[str, str]] = set()

    def note(signals: list[object]) -> None:
        fired.update((s.rule, s.subject) for s in signals if s.status is Status.FIRING)  # type: ignore[attr-defined]

    next_tick = sim.start_ms + TICK_MS
    metric_ids = {name: m.id for name, m in catalogue.metrics.items()}
    for emission in sim.run_until(until_ms):
        while next_tick <= emission.time_ms:
            now[0] = next_tick
            note(evaluator.tick())
            next_tick += TICK_MS
        now[0] = emission.time_ms
        if emission.malformed or emission.ts_ms - emission.time_ms > MAX_CLOCK_SKEW_MS:
            continue  # a dead letter, never evaluated
        rows = [(emission.ts_ms * 1000, metric_ids[m], v, 0) for m, v in emission.values.items()]
        note(evaluator.observe(devices[emission.device], rows))
    while next_tick <= until_ms:
        now[0] = next_tick
        note(evaluator.tick())
        next_tick += TICK_MS
    return fired
