"""The simulator: a quiet city raises nothing; each shipped scenario raises exactly what it declares."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from cityops.catalogue import load_default_catalogue
from device_sim.fleet import build_fleet
from device_sim.scenario import default_start_ms, shipped_scenarios
from device_sim.simulation import Simulation
from tests.scenario_helpers import fired_alerts

CAT = load_default_catalogue()
START_MS = int(datetime(2026, 7, 1, 0, 0, tzinfo=UTC).timestamp() * 1000)  # 08:00 in Guangzhou
DAY_MS = 86_400_000
SCENARIOS = shipped_scenarios()


def test_a_quiet_day_raises_no_alert() -> None:
    fleet = build_fleet(300, CAT, seed=1)
    sim = Simulation(fleet, CAT, start_ms=START_MS, seed=1)
    assert fired_alerts(sim, fleet, CAT, START_MS + DAY_MS) == set()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_raises_exactly_its_ground_truth(name: str) -> None:
    scenario = SCENARIOS[name]
    fleet = build_fleet(scenario.fleet_size, CAT, seed=1)
    start = default_start_ms(scenario, START_MS + DAY_MS)
    sim = Simulation(fleet, CAT, start_ms=start, scenario=scenario, seed=1)
    fired = fired_alerts(sim, fleet, CAT, start + int(scenario.duration_s * 1000))
    truth = sim.ground_truth()
    expected = {(a["rule"], a["subject"]) for i in truth["incidents"] for a in i["expected_alerts"]}  # type: ignore[index]
    assert expected, "a scenario must declare what it raises"
    assert fired == expected


def test_generators_stay_in_range_and_keep_their_sampling_intervals() -> None:
    fleet = build_fleet(120, CAT, seed=3)
    sim = Simulation(fleet, CAT, start_ms=START_MS, seed=3)
    seen: dict[tuple[str, str], list[int]] = {}
    for emission in sim.run_until(START_MS + DAY_MS):
        for metric, value in emission.values.items():
            m = CAT.metrics[metric]
            assert m.min <= value <= m.max, (emission.device, metric, value)
            seen.setdefault((emission.device, metric), []).append(emission.time_ms)
    assert {metric for _, metric in seen} == {m for d in fleet for m in d.metrics}  # every series reports
    for (_device, metric), times in seen.items():
        gaps = {b - a for a, b in itertools.pairwise(times)}
        assert gaps <= {CAT.metrics[metric].sample_interval_s * 1000}, (metric, gaps)


def test_the_fleet_covers_every_kind_and_district_deterministically() -> None:
    fleet = build_fleet(300, CAT, seed=1)
    assert {d.kind.name for d in fleet} == {k for k, kind in CAT.kinds.items() if kind.metrics}
    assert len({d.spec.district for d in fleet}) == 11
    assert [d.spec for d in build_fleet(300, CAT, seed=1)] == [d.spec for d in fleet]
    assert {d.spec.tenant for d in fleet} == {"water", "gas", "environment", "traffic"}
    assert all(22.5 < (d.spec.lat or 0) < 23.8 and 113.0 < (d.spec.lon or 0) < 114.1 for d in fleet)
