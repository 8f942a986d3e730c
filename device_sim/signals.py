"""Signal generators: what a quiet city's sensors read, metric by metric, at any instant.

Each metric has a profile from the reference (``shared/reference/sensor-catalog.md``): a base level,
a daily cycle (night-time pressure maximum, afternoon ozone, rush-hour traffic), noise and slow
drift. Weather and incidents act on top (:mod:`device_sim.scenario`). Every value is clamped to the
metric's physical range in the catalogue, so a generator never produces an out-of-range reading
unless a scenario's fault asks for one.

The baseline is tuned to stay inside every default rule: a simulated day without incidents raises
no alert, so the alerts a scenario raises are the ones its ground truth declares.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import StrEnum
from zoneinfo import ZoneInfo

from cityops.catalogue import Metric

LOCAL = ZoneInfo("Asia/Shanghai")


class Shape(StrEnum):
    FLAT = "flat"
    DAILY = "daily"  # one peak a day at ``peak_hour`` (cosine)
    RUSH = "rush"  # two peaks, 08:00 and 18:00


@dataclass(frozen=True, slots=True)
class Profile:
    base: float
    amplitude: float = 0.0  # added at the peak, subtracted at the trough (DAILY); added at rush (RUSH)
    peak_hour: float = 12.0
    noise: float = 0.0  # standard deviation of the reading noise
    shape: Shape = Shape.DAILY
    drift_per_day: float = 0.0


# Typical levels (reference §1–7 "typical range"; Guangzhou monthly air figures [E3]).
PROFILES: dict[str, Profile] = {
    # water supply: pressure highest at night (02:00–04:00), demand peaks in the morning
    "network_pressure": Profile(0.37, 0.035, 3, 0.004),
    "pressure_compliance_rate": Profile(99.0, 0.3, 12, 0.1),
    "flow_rate": Profile(120.0, 50.0, 8, 4.0),
    "free_chlorine": Profile(0.45, 0.05, 6, 0.015),
    "turbidity": Profile(0.25, 0.05, 12, 0.02),
    "ph": Profile(7.4, 0.08, 14, 0.02),
    "ammonia_n": Profile(0.1, 0.02, 12, 0.01),
    "tank_level": Profile(4.0, 1.0, 5, 0.03),
    # drainage: dry weather; rain comes from scenarios
    "ponding_depth": Profile(0.0, shape=Shape.FLAT),
    "rainfall": Profile(0.0, shape=Shape.FLAT),
    "rain_intensity": Profile(0.0, shape=Shape.FLAT),
    "river_level": Profile(8.0, 0.25, 2, 0.01),
    # gas: near zero, a little sewer biogas
    "combustible_gas_lel": Profile(0.5, noise=0.2, shape=Shape.FLAT),
    "manhole_ch4": Profile(0.2, 0.08, 15, 0.03),
    "manhole_c2h6": Profile(0.0, shape=Shape.FLAT),
    "co_ppm": Profile(1.5, 0.6, 8, 0.3),
    "o2_pct": Profile(20.9, noise=0.05, shape=Shape.FLAT),
    "h2s_ppm": Profile(0.3, 0.1, 15, 0.08),
    "gas_pipe_pressure": Profile(0.3, 0.015, 3, 0.002),
    "gas_meter_leak": Profile(0.0, shape=Shape.FLAT),
    # air: morning traffic peak for PM, NO2 and CO; ozone in the afternoon
    "pm25": Profile(32.0, 8.0, 8, 3.0),
    "pm10": Profile(58.0, 12.0, 8, 4.0),
    "o3": Profile(70.0, 45.0, 15, 5.0),
    "no2": Profile(35.0, 14.0, 8, 3.0),
    "so2": Profile(9.0, 2.0, 10, 0.8),
    "co": Profile(0.8, 0.2, 8, 0.05),
    "aqi": Profile(60.0, 15.0, 12, 3.0),
    "relative_humidity": Profile(0.72, 0.12, 5, 0.02),
    # noise: class 2 zone, day up to ~55 dB(A), night 43-46 dB(A)
    "laeq": Profile(49.0, 6.0, 14, 0.8),
    "lamax": Profile(64.0, 6.0, 14, 2.0),
    "laeq_day": Profile(56.0, noise=0.5, shape=Shape.FLAT),
    "laeq_night": Profile(44.0, noise=0.5, shape=Shape.FLAT),
    "l10": Profile(54.0, 6.0, 14, 0.8),
    "l50": Profile(49.0, 6.0, 14, 0.8),
    "l90": Profile(43.0, 5.0, 14, 0.8),
    # surface water: GB 3838 class III-ish river
    "dissolved_oxygen": Profile(6.8, 1.0, 15, 0.15),
    "codmn": Profile(3.5, 0.3, 12, 0.1),
    "cod": Profile(15.0, 1.0, 12, 0.5),
    "nh3_n": Profile(0.5, 0.1, 9, 0.03),
    "tp": Profile(0.12, 0.02, 12, 0.005),
    "tn": Profile(1.2, 0.1, 12, 0.04),
    "surface_ph": Profile(7.6, 0.15, 15, 0.03),
    "orp": Profile(220.0, 20.0, 15, 5.0),
    "transparency": Profile(60.0, noise=2.0, shape=Shape.FLAT),
    # traffic: per 30 s sample; speed dips at the rush hours
    "vehicle_count": Profile(8.0, 8.0, shape=Shape.RUSH, noise=1.5),
    "occupancy": Profile(0.12, 0.15, shape=Shape.RUSH, noise=0.02),
    "average_speed": Profile(46.0, -14.0, shape=Shape.RUSH, noise=2.0),
    "congestion_index": Profile(2.0, 2.5, shape=Shape.RUSH, noise=0.2),
    # device health
    "battery_level": Profile(0.9, noise=0.002, shape=Shape.FLAT, drift_per_day=-0.005),
    "rssi": Profile(-75.0, noise=3.0, shape=Shape.FLAT),
}


# China Standard Time has had no daylight saving since 1991: a fixed offset is exact, and far cheaper
# per reading than a time-zone lookup.
LOCAL_OFFSET_H = 8


def local_hour(time_ms: int) -> float:
    """The hour of the day in Guangzhou, with fractions."""
    return (time_ms / 3_600_000 + LOCAL_OFFSET_H) % 24


def daily_factor(shape: Shape, hour: float, peak_hour: float) -> float:
    """-1..1 for DAILY (1 at the peak), 0..1 for RUSH (1 at 08:00 and 18:00), 0 for FLAT."""
    if shape is Shape.DAILY:
        return math.cos((hour - peak_hour) / 24 * 2 * math.pi)
    if shape is Shape.RUSH:
        return max(math.exp(-(((hour - 8) / 1.3) ** 2)), math.exp(-(((hour - 18) / 1.5) ** 2)))
    return 0.0


class Series:
    """One metric of one device: ``value(time_ms)`` for a quiet day, before any incident."""

    __slots__ = ("metric", "origin_ms", "profile", "rng")

    def __init__(self, metric: Metric, rng: random.Random, origin_ms: int) -> None:
        self.metric = metric
        self.profile = PROFILES.get(metric.name) or Profile(metric.min + (metric.max - metric.min) * 0.1)
        self.rng = rng
        self.origin_ms = origin_ms

    def value(self, time_ms: int) -> float:
        p = self.profile
        level = p.base + p.amplitude * daily_factor(p.shape, local_hour(time_ms), p.peak_hour)
        level += p.drift_per_day * (time_ms - self.origin_ms) / 86_400_000
        if p.noise:
            level += self.rng.gauss(0.0, p.noise)
        return self.clamp(level)

    def clamp(self, value: float) -> float:
        return min(self.metric.max, max(self.metric.min, value))
