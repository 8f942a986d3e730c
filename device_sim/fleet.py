"""A city fleet: Guangzhou's districts, devices of every kind spread over them, department tenants.

Deterministic for a seed: the same ``build_fleet(n, seed)`` gives the same devices, names,
coordinates and tags, so a scenario's ground truth can name devices and a test can rebuild them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from cityops.catalogue import Catalogue, DeviceKind
from cityops.model import DeviceSpec, Domain


@dataclass(frozen=True, slots=True)
class District:
    name: str
    lat: float
    lon: float
    radius_km: float  # devices are spread within this distance of the centre


# Guangzhou's eleven districts, approximate centres (WGS 84) and extents.
DISTRICTS = (
    District("yuexiu", 23.129, 113.267, 3.0),
    District("liwan", 23.125, 113.244, 3.5),
    District("haizhu", 23.084, 113.318, 5.0),
    District("tianhe", 23.125, 113.361, 5.5),
    District("baiyun", 23.158, 113.273, 9.0),
    District("huangpu", 23.106, 113.459, 8.0),
    District("panyu", 22.937, 113.384, 10.0),
    District("huadu", 23.404, 113.220, 12.0),
    District("nansha", 22.801, 113.525, 14.0),
    District("conghua", 23.548, 113.587, 18.0),
    District("zengcheng", 23.261, 113.811, 16.0),
)
DISTRICT_NAMES = tuple(d.name for d in DISTRICTS)

# Which department runs which domain's devices.
TENANT_OF = {
    Domain.WATER_SUPPLY: "water",
    Domain.DRAINAGE: "water",
    Domain.GAS: "gas",
    Domain.AIR: "environment",
    Domain.NOISE: "environment",
    Domain.SURFACE_WATER: "environment",
    Domain.TRAFFIC: "traffic",
    Domain.DEVICE: "operations",
}
# Relative numbers of each kind in a city (many gas detectors and traffic detectors, few stations).
WEIGHTS = {
    "air_station": 1,
    "air_sensor_node": 6,
    "water_quality_station": 2,
    "pressure_logger": 6,
    "flow_meter": 3,
    "tank_level_sensor": 1,
    "ponding_gauge": 6,
    "rain_gauge": 3,
    "river_level_gauge": 1,
    "gas_detector": 8,
    "manhole_gas_monitor": 4,
    "gas_pressure_logger": 2,
    "gas_meter": 4,
    "noise_monitor": 3,
    "surface_water_station": 1,
    "traffic_detector": 8,
    "traffic_segment": 4,
}
# Acoustic zone classes of the monitors: mostly class 2 (urban mixed), some 3 and 4a (industrial,
# beside trunk roads). Quiet class 0/1 zones are left out: the baseline city is too loud for them.
ZONE_CLASSES = ("2", "2", "2", "3", "4a")
ROAD_CLASSES = ("arterial", "arterial", "secondary", "expressway")
KM_PER_DEGREE = 111.0


@dataclass(frozen=True, slots=True)
class SimDevice:
    spec: DeviceSpec
    kind: DeviceKind
    metrics: tuple[str, ...]
    seed: int
    district: District = field(compare=False)

    @property
    def id(self) -> str:
        return self.spec.external_id


def build_fleet(count: int, catalogue: Catalogue, *, seed: int = 1, prefix: str = "gz") -> list[SimDevice]:
    """``count`` devices: every kind at least once (when count allows), then by city weights."""
    rng = random.Random(seed)
    kinds = [catalogue.kinds[name] for name in WEIGHTS if name in catalogue.kinds]
    order = list(kinds)
    weights = [WEIGHTS[k.name] for k in kinds]
    while len(order) < count:
        order.append(rng.choices(kinds, weights)[0])
    devices = []
    placed: dict[str, int] = {}
    for index, kind in enumerate(order[:count]):
        # Each kind's devices go round the districts in order, central ones first: every district
        # gets one of a kind before any gets two, so incidents anywhere find their instruments.
        nth = placed[kind.name] = placed.get(kind.name, -1) + 1
        devices.append(_device(index, kind, DISTRICTS[nth % len(DISTRICTS)], rng, prefix))
    return devices


def _device(index: int, kind: DeviceKind, district: District, rng: random.Random, prefix: str) -> SimDevice:
    lat, lon = _spread(district, rng)
    tags: dict[str, str] = {}
    if kind.domain is Domain.NOISE:
        tags["zone_class"] = rng.choice(ZONE_CLASSES)
    if kind.domain is Domain.TRAFFIC:
        tags["road_class"] = rng.choice(ROAD_CLASSES)
    external_id = f"{prefix}-{kind.name.replace('_', '-')}-{index:05d}"
    spec = DeviceSpec(
        external_id=external_id,
        tenant=TENANT_OF[kind.domain],
        kind=kind.name,
        name=f"{kind.description.split('(')[0].strip()} {index} ({district.name})",
        lat=round(lat, 6),
        lon=round(lon, 6),
        district=district.name,
        tags=tags,
    )
    return SimDevice(spec, kind, kind.metrics, rng.getrandbits(32), district)


def _spread(district: District, rng: random.Random) -> tuple[float, float]:
    """A point within the district's radius (uniform over the disc)."""
    distance = district.radius_km * rng.random() ** 0.5 / KM_PER_DEGREE
    angle = rng.uniform(0, 2 * math.pi)
    return district.lat + distance * math.sin(angle), district.lon + distance * math.cos(angle)
