from __future__ import annotations

import pytest

from cityops.catalogue import Catalogue, load_default_catalogue
from cityops.errors import ConfigError
from cityops.model import Domain

CATALOGUE = load_default_catalogue()


def test_every_domain_of_the_reference_has_metrics() -> None:
    domains = {m.domain for m in CATALOGUE.metrics.values()}
    assert domains == set(Domain)


@pytest.mark.parametrize(
    ("name", "unit_code", "domain"),
    [
        ("network_pressure", "MPA", Domain.WATER_SUPPLY),
        ("free_chlorine", "M1", Domain.WATER_SUPPLY),
        ("turbidity", "NTU", Domain.WATER_SUPPLY),
        ("ponding_depth", "CMT", Domain.DRAINAGE),
        ("rainfall", "MMT", Domain.DRAINAGE),
        ("combustible_gas_lel", "P1", Domain.GAS),
        ("co_ppm", "59", Domain.GAS),
        ("pm25", "GQ", Domain.AIR),
        ("co", "GP", Domain.AIR),
        ("laeq", "2N", Domain.NOISE),
        ("dissolved_oxygen", "M1", Domain.SURFACE_WATER),
        ("orp", "2Z", Domain.SURFACE_WATER),
        ("average_speed", "KMH", Domain.TRAFFIC),
    ],
)
def test_reference_metrics_with_their_units(name: str, unit_code: str, domain: Domain) -> None:
    metric = CATALOGUE.metrics[name]
    assert (metric.unit_code, metric.domain) == (unit_code, domain)
    assert metric.min < metric.max and metric.sample_interval_s > 0
    assert metric.sources


def test_orp_can_be_negative() -> None:
    assert CATALOGUE.metrics["orp"].min < -200  # heavy black-odorous water is below -200 mV


def test_ids_are_unique_and_small() -> None:
    ids = [m.id for m in CATALOGUE.metrics.values()]
    assert len(ids) == len(set(ids)) and all(0 < i < 32768 for i in ids)


def test_kinds_report_catalogue_metrics_plus_device_health() -> None:
    for name in (
        "air_station",
        "water_quality_station",
        "pressure_logger",
        "ponding_gauge",
        "rain_gauge",
        "gas_detector",
        "noise_monitor",
        "traffic_detector",
        "surface_water_station",
    ):
        metrics = CATALOGUE.metrics_of_kind(name)
        assert {"battery_level", "rssi"} <= set(metrics)
        assert all(m in CATALOGUE.metrics for m in metrics)
    assert "ponding_depth" in CATALOGUE.metrics_of_kind("ponding_gauge")


def test_inconsistent_catalogue_is_refused() -> None:
    doc = {
        "metrics": [
            {
                "id": 1,
                "name": "a",
                "domain": "air",
                "unit": "x",
                "unit_code": "C62",
                "min": 0,
                "max": 1,
                "sample_interval_s": 1,
                "description": "",
            }
        ],
        "device_kinds": [{"name": "k", "domain": "air", "description": "", "metrics": ["b"]}],
    }
    with pytest.raises(ConfigError, match="unknown metrics"):
        Catalogue.from_document(doc)
