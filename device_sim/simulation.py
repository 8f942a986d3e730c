"""The simulation: which readings each device emits, when, and what incidents do to them.

Pure and clock-free: :meth:`Simulation.run_until` yields every emission due up to an instant, in
time order, from a fleet, a start time, an optional scenario and a seed. The same inputs give the
same emissions, so a test can run a scenario without a broker and compare with its ground truth.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

from cityops.catalogue import Catalogue
from device_sim.fleet import SimDevice
from device_sim.scenario import (
    ActiveIncident,
    Scenario,
    activate,
    ground_truth,
    rain_intensity,
    recent_rain_mm,
)
from device_sim.signals import Series

HOUR_MS = 3_600_000
# Traffic slows to this on an arterial at the height of a storm (km/h), congestion climbs to this.
STORM_SPEED_KMH = 12.0
STORM_CONGESTION = 8.6


@dataclass(slots=True)
class Emission:
    device: str
    time_ms: int  # when the reading was taken
    values: dict[str, float]
    ts_ms: int  # the timestamp the device puts in its message (differs under clock skew)
    seq: int
    copies: int = 1  # sent twice under the duplicates fault
    malformed: bool = False


@dataclass(slots=True)
class _DeviceState:
    device: SimDevice
    series: dict[str, Series]
    groups: list[tuple[int, tuple[str, ...]]]  # (interval ms, metrics reported together)
    incidents: list[ActiveIncident] = field(default_factory=list)
    seq: int = 0
    emissions: int = 0


class Simulation:
    def __init__(
        self,
        fleet: list[SimDevice],
        catalogue: Catalogue,
        *,
        start_ms: int,
        scenario: Scenario | None = None,
        seed: int = 1,
        interval_ms: int | None = None,
        emit_only: Collection[str] | None = None,
    ) -> None:
        """``interval_ms``: one emission of all metrics per device at this period (load generation);
        default: each metric at its catalogue sampling interval. ``emit_only``: the devices this
        simulation emits for (one publisher process's share); incidents still see the whole fleet."""
        self.scenario = scenario
        self.start_ms = start_ms
        self.seed = seed
        self.incidents = activate(scenario, fleet, start_ms) if scenario else []
        self._rain_districts = {i.spec.select.district for i in self.incidents if i.spec.type == "rainstorm"}
        self._devices: list[_DeviceState] = []
        self._queue: list[tuple[int, int, int]] = []  # (due ms, device index, group index)
        for device in fleet:
            if emit_only is not None and device.id not in emit_only:
                continue
            index = len(self._devices)
            # Per-device generators: a device reads the same whichever process simulates it.
            series_rng = random.Random(device.seed ^ seed)
            series = {m: Series(catalogue.metrics[m], series_rng, start_ms) for m in device.metrics}
            state = _DeviceState(device, series, _groups(device, catalogue, interval_ms))
            state.incidents = [i for i in self.incidents if device in i.devices]
            self._devices.append(state)
            for group_index, (interval, _) in enumerate(state.groups):
                first = start_ms + series_rng.randrange(max(1, interval))  # phases spread over the interval
                self._queue.append((first, index, group_index))
        heapq.heapify(self._queue)

    @property
    def series_count(self) -> int:
        return sum(len(d.series) for d in self._devices)

    def ground_truth(self) -> dict[str, object]:
        assert self.scenario is not None
        return ground_truth(self.scenario, self.incidents, self.start_ms, self.seed)

    def run_until(self, until_ms: int) -> Iterator[Emission]:
        """Every emission due before ``until_ms``, in time order."""
        queue = self._queue
        while queue and queue[0][0] < until_ms:
            due, index, group_index = heapq.heappop(queue)
            state = self._devices[index]
            interval, metrics = state.groups[group_index]
            heapq.heappush(queue, (due + interval, index, group_index))
            emission = self._emit(state, due, metrics)
            if emission is not None:
                yield emission

    def _emit(self, state: _DeviceState, time_ms: int, metrics: tuple[str, ...]) -> Emission | None:
        values = {m: state.series[m].value(time_ms) for m in metrics}
        district = state.device.spec.district
        if district is not None and district in self._rain_districts:
            self._weather(state, values, time_ms, district)
        emission = Emission(state.device.id, time_ms, values, time_ms, state.seq)
        for incident in state.incidents:
            if incident.active(time_ms) and not _apply(incident, state, emission):
                return None  # dropout: nothing is sent
        state.seq += 1
        state.emissions += 1
        return emission

    def _weather(self, state: _DeviceState, values: dict[str, float], time_ms: int, district: str) -> None:
        intensity = rain_intensity(self.incidents, district, time_ms)
        peak = max(
            (i.param("peak_mm_h", 60.0) for i in self.incidents if i.spec.type == "rainstorm"), default=1.0
        )
        share = intensity / peak if peak else 0.0
        for metric in values:
            series = state.series[metric]
            if metric == "rain_intensity":
                values[metric] = series.clamp(intensity)
            elif metric == "rainfall":
                interval = next(i for i, group in state.groups if metric in group)
                values[metric] = series.clamp(intensity * interval / HOUR_MS)
            elif metric == "ponding_depth":
                values[metric] = series.clamp(0.5 * recent_rain_mm(self.incidents, district, time_ms))
            elif metric == "average_speed" and share:
                values[metric] = series.clamp(
                    values[metric] - (values[metric] - STORM_SPEED_KMH) * min(1.0, 1.5 * share)
                )
            elif metric == "congestion_index" and share:
                values[metric] = series.clamp(max(values[metric], STORM_CONGESTION * min(1.0, 1.5 * share)))
            elif metric == "occupancy" and share:
                values[metric] = series.clamp(values[metric] + 0.4 * share)


def _apply(incident: ActiveIncident, state: _DeviceState, emission: Emission) -> bool:
    """Act on one emission; False when the device sends nothing."""
    kind = incident.spec.type
    values = emission.values
    elapsed_ms = emission.time_ms - incident.start_ms

    def scale(metric: str, factor: float) -> None:
        if metric in values:
            values[metric] = state.series[metric].clamp(values[metric] * factor)

    def shift(metric: str, delta: float) -> None:
        if metric in values:
            values[metric] = state.series[metric].clamp(values[metric] + delta)

    if kind == "water_main_burst":
        shift("network_pressure", -incident.param("pressure_drop", 0.2))
        scale("flow_rate", incident.param("flow_factor", 2.5))
    elif kind == "gas_leak":
        ramp_ms = incident.param("ramp_s", 600) * 1000
        lel = incident.param("peak_lel", 45.0) * min(1.0, elapsed_ms / ramp_ms if ramp_ms else 1.0)
        if "combustible_gas_lel" in values:
            values["combustible_gas_lel"] = max(values["combustible_gas_lel"], lel)
    elif kind == "pollution_episode":
        for metric in ("pm25", "pm10", "aqi"):
            scale(metric, incident.param("factor", 4.0))
    elif kind == "noise_night":
        for metric in ("laeq", "lamax", "l10", "l50", "l90"):
            shift(metric, incident.param("extra_db", 20.0))
    elif kind == "stuck":
        metric = str(incident.spec.params.get("metric", ""))
        if metric in values:
            key = (state.device.id, metric)
            values[metric] = incident.stuck_values.setdefault(key, values[metric])
    elif kind == "dropout":
        incident.emitted["dropped"] = incident.emitted.get("dropped", 0) + 1
        return False
    elif kind == "spikes":
        metric = str(incident.spec.params.get("metric", ""))
        if metric in values and state.emissions % int(incident.param("every", 10)) == 0:
            values[metric] = incident.param("value", 9999.0)  # out of range on purpose: not clamped
            incident.emitted["spikes"] = incident.emitted.get("spikes", 0) + 1
    elif kind == "clock_skew":
        emission.ts_ms = emission.time_ms + int(incident.param("offset_s", 900) * 1000)
        incident.emitted["clock_skew"] = incident.emitted.get("clock_skew", 0) + 1
    elif kind == "duplicates":
        emission.copies = 2
        incident.emitted["duplicates"] = incident.emitted.get("duplicates", 0) + 1
    elif kind == "malformed" and state.emissions % int(incident.param("every", 5)) == 0:
        emission.malformed = True
        incident.emitted["malformed_payload"] = incident.emitted.get("malformed_payload", 0) + 1
    return True


def _groups(
    device: SimDevice, catalogue: Catalogue, interval_ms: int | None
) -> list[tuple[int, tuple[str, ...]]]:
    if interval_ms is not None:
        return [(interval_ms, device.metrics)] if device.metrics else []
    by_interval: dict[int, list[str]] = {}
    for metric in device.metrics:
        by_interval.setdefault(catalogue.metrics[metric].sample_interval_s * 1000, []).append(metric)
    return [(interval, tuple(metrics)) for interval, metrics in sorted(by_interval.items())]
