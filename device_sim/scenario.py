"""Scenarios: incidents scripted in time and space, and the ground truth of what cityops must raise.

A scenario file (YAML) lists incidents. Each picks its devices from the fleet (a district, kinds,
tags, how many), acts on their readings between ``start_s`` and ``start_s + duration_s`` after the
scenario starts, and declares the alerts it must cause (``expect``). The simulator writes the ground
truth (which incident, which devices, when, which alerts, which dead letters) to a file, so a test
can check that cityops raised exactly those alerts.

Incident types:

- ``rainstorm``: rain over a district (triangular intensity up to ``peak_mm_h``); its ponding
  gauges fill with the last two hours' rain, its roads slow down and congest.
- ``water_main_burst``: pressure steps down by ``pressure_drop`` MPa, flow steps up.
- ``gas_leak``: %LEL at a detector ramps up to ``peak_lel``.
- ``pollution_episode``: PM2.5 and PM10 multiplied by ``factor``.
- ``noise_night``: ``extra_db`` more noise during the incident (schedule it at night).
- ``stuck``: a metric freezes at its value when the fault starts (a stuck sensor).
- ``dropout``: the device says nothing (offline).
- ``spikes``: one reading in ``every`` of a metric jumps to ``value`` (out of range: stored, flagged).
- ``clock_skew``: the device's clock runs ``offset_s`` ahead (too far ahead: rejected).
- ``duplicates``: every message is sent twice (the pipeline stores it once).
- ``malformed``: one message in ``every`` is garbage (a dead letter).
- ``reconnect_storm``: the load generator's clients drop and reconnect (nothing may be lost).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cityops.errors import CityopsError
from device_sim.fleet import DISTRICT_NAMES, SimDevice
from device_sim.signals import LOCAL

HOUR_MS = 3_600_000
MINUTE_MS = 60_000
# Ponding follows the rain of the last two hours; integrated in 5-minute steps.
PONDING_MEMORY_MS = 2 * HOUR_MS
PONDING_STEP_MS = 5 * MINUTE_MS

IncidentType = Literal[
    "rainstorm",
    "water_main_burst",
    "gas_leak",
    "pollution_episode",
    "noise_night",
    "stuck",
    "dropout",
    "spikes",
    "clock_skew",
    "duplicates",
    "malformed",
    "reconnect_storm",
]


class ScenarioError(CityopsError):
    """A scenario file is invalid; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Select(_Model):
    """Which devices an incident acts on: every field given must match; ``limit`` takes the first N."""

    district: str | None = None
    kinds: list[str] = Field(default_factory=list)
    devices: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    limit: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _known_district(self) -> Select:
        if self.district is not None and self.district not in DISTRICT_NAMES:
            raise ValueError(f"unknown district {self.district!r}; known: {', '.join(DISTRICT_NAMES)}")
        return self


class Expect(_Model):
    """An alert the incident must raise: on each selected device of these kinds (and tags), or on
    the district (``scope: district``). ``rule`` may name device tags: ``noise-class{zone_class}-night``."""

    rule: str
    kinds: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    scope: Literal["device", "district"] = "device"


class Incident(_Model):
    id: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")
    type: IncidentType
    start_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    select: Select = Field(default_factory=Select)
    params: dict[str, float | str] = Field(default_factory=dict)
    expect: list[Expect] = Field(default_factory=list)
    expect_dead_letters: list[str] = Field(default_factory=list, description="reject reasons it causes")


class Scenario(_Model):
    name: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")
    description: str = ""
    duration_s: float = Field(gt=0)
    fleet_size: int = Field(default=300, ge=20, le=100_000)
    align_local: time | None = Field(
        default=None, description="start at this local time (Asia/Shanghai): night works begin at night"
    )
    incidents: list[Incident] = Field(default_factory=list)

    @model_validator(mode="after")
    def _incidents_fit(self) -> Scenario:
        ids = [i.id for i in self.incidents]
        if len(ids) != len(set(ids)):
            raise ValueError("incident ids must be unique")
        for incident in self.incidents:
            if incident.start_s + incident.duration_s > self.duration_s:
                raise ValueError(f"incident {incident.id!r} ends after the scenario")
        return self


def default_start_ms(scenario: Scenario, now_ms: int) -> int:
    """Where a scenario starts by default: wholly in the past (it is sent as backfill, as fast as the
    pipeline takes it, and alerts are decided in event time), at ``align_local`` if it has one."""
    start = datetime.fromtimestamp((now_ms - scenario.duration_s * 1000) / 1000, LOCAL)
    if scenario.align_local is not None:
        aligned = start.replace(
            hour=scenario.align_local.hour, minute=scenario.align_local.minute, second=0, microsecond=0
        )
        start = aligned if aligned <= start else aligned - timedelta(days=1)
    return int(start.timestamp() * 1000)


def load_scenario(path: Path) -> Scenario:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        return Scenario.model_validate(doc)
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ScenarioError(f"{path}: {problems}") from None


def shipped_scenarios() -> dict[str, Scenario]:
    """The scenarios in ``device_sim/scenarios/``, by name."""
    folder = resources.files("device_sim").joinpath("scenarios")
    found = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            scenario = Scenario.model_validate(yaml.safe_load(entry.read_text(encoding="utf-8")))
            found[scenario.name] = scenario
    return found


def find_scenario(name_or_path: str) -> Scenario:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_scenario(path)
    shipped = shipped_scenarios()
    if name_or_path not in shipped:
        raise ScenarioError(f"no scenario {name_or_path!r}; shipped: {', '.join(shipped)}")
    return shipped[name_or_path]


# --- the incidents at run time --------------------------------------------------------------------
@dataclass(slots=True)
class ActiveIncident:
    spec: Incident
    start_ms: int
    end_ms: int
    devices: list[SimDevice]
    stuck_values: dict[tuple[str, str], float] = field(default_factory=dict)
    emitted: dict[str, int] = field(default_factory=dict)  # fault counts: what the ground truth reports

    def active(self, time_ms: int) -> bool:
        return self.start_ms <= time_ms < self.end_ms

    def param(self, name: str, default: float) -> float:
        return float(self.spec.params.get(name, default))

    def expected_alerts(self) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for expect in self.spec.expect:
            if expect.scope == "district":
                for district in sorted({d.spec.district or "" for d in self.devices}):
                    out.append({"rule": expect.rule, "subject": f"district:{district}"})
                continue
            for device in self.devices:
                if expect.kinds and device.kind.name not in expect.kinds:
                    continue
                if any(device.spec.tags.get(k) != v for k, v in expect.tags.items()):
                    continue
                out.append({"rule": expect.rule.format(**device.spec.tags), "subject": device.id})
        return out


def select_devices(select: Select, fleet: Iterable[SimDevice]) -> list[SimDevice]:
    chosen = [
        d
        for d in fleet
        if (select.district is None or d.spec.district == select.district)
        and (not select.kinds or d.kind.name in select.kinds)
        and (not select.devices or d.id in select.devices)
        and all(d.spec.tags.get(k) == v for k, v in select.tags.items())
    ]
    chosen.sort(key=lambda d: d.id)
    return chosen[: select.limit] if select.limit else chosen


def activate(scenario: Scenario, fleet: list[SimDevice], start_ms: int) -> list[ActiveIncident]:
    active = []
    for incident in scenario.incidents:
        devices = select_devices(incident.select, fleet)
        if not devices and incident.type != "reconnect_storm":
            raise ScenarioError(f"incident {incident.id!r} selects no device of a {len(fleet)}-device fleet")
        begin = start_ms + int(incident.start_s * 1000)
        active.append(ActiveIncident(incident, begin, begin + int(incident.duration_s * 1000), devices))
    return active


def ground_truth(
    scenario: Scenario, incidents: list[ActiveIncident], start_ms: int, seed: int
) -> dict[str, Any]:
    """What cityops must make of the scenario: alerts by rule and subject, dead letters by reason."""
    return {
        "scenario": scenario.name,
        "start_ms": start_ms,
        "end_ms": start_ms + int(scenario.duration_s * 1000),
        "fleet_seed": seed,
        "incidents": [
            {
                "id": i.spec.id,
                "type": i.spec.type,
                "start_ms": i.start_ms,
                "end_ms": i.end_ms,
                "devices": [d.id for d in i.devices],
                "expected_alerts": i.expected_alerts(),
                "expected_dead_letters": {
                    reason: i.emitted.get(reason, 0) for reason in i.spec.expect_dead_letters
                },
                "emitted": dict(i.emitted),
            }
            for i in incidents
        ],
    }


def rain_intensity(incidents: list[ActiveIncident], district: str | None, time_ms: int) -> float:
    """mm/h falling on a district: the sum of its rainstorms' triangular profiles."""
    total = 0.0
    for incident in incidents:
        if incident.spec.type != "rainstorm" or not incident.active(time_ms):
            continue
        if incident.spec.select.district not in (None, district):
            continue
        span = incident.end_ms - incident.start_ms
        position = (time_ms - incident.start_ms) / span
        total += incident.param("peak_mm_h", 60.0) * (1 - abs(2 * position - 1))
    return total


def recent_rain_mm(incidents: list[ActiveIncident], district: str | None, time_ms: int) -> float:
    """The rain of the last two hours on a district, in mm (5-minute steps)."""
    steps = PONDING_MEMORY_MS // PONDING_STEP_MS
    return sum(
        rain_intensity(incidents, district, time_ms - k * PONDING_STEP_MS) * PONDING_STEP_MS / HOUR_MS
        for k in range(steps)
    )
