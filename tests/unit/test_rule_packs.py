"""The default rule packs shipped in rules/packs: valid, unique, sourced, and covering the reference."""

from __future__ import annotations

from cityops.catalogue import load_default_catalogue
from rules.spec import default_packs

CATALOGUE = load_default_catalogue()


def test_packs_parse_with_unique_names_and_sources() -> None:
    packs = default_packs(CATALOGUE)
    rules = [rule for pack in packs.values() for rule in pack]
    names = [rule.name for rule in rules]
    assert len(names) == len(set(names))
    assert all(rule.source.strip() for rule in rules)


def test_packs_cover_the_reference_thresholds() -> None:
    packs = default_packs(CATALOGUE)
    watched = {m for pack in packs.values() for rule in pack for m in rule.metrics()}
    for metric in (
        "pm25",
        "pm10",
        "o3",
        "no2",
        "so2",
        "co",
        "turbidity",
        "ph",
        "free_chlorine",
        "combustible_gas_lel",
        "co_ppm",
        "ponding_depth",
        "rainfall",
        "network_pressure",
        "dissolved_oxygen",
        "average_speed",
        "congestion_index",
        "laeq",
    ):
        assert metric in watched, metric
    levels = {r.name: r.condition for r in packs["drainage"]}
    assert levels["drainage-ponding-15cm"].value == 15 and levels["drainage-ponding-25cm"].value == 25  # type: ignore[union-attr]
    assert levels["rainstorm-red"].window_s == 10800 and levels["rainstorm-red"].value == 100  # type: ignore[union-attr]


def test_noise_pack_has_day_and_night_limits_for_every_zone_class() -> None:
    limits = {
        (r.selector.tags["zone_class"], r.schedule.start.hour): r.condition.value  # type: ignore[union-attr]
        for r in default_packs(CATALOGUE)["noise_gb3096"]
        if r.severity == "low"
    }
    expected = {"0": (50, 40), "1": (55, 45), "2": (60, 50), "3": (65, 55), "4a": (70, 55), "4b": (70, 60)}
    assert limits == {
        **{(c, 6): day for c, (day, _) in expected.items()},
        **{(c, 22): night for c, (_, night) in expected.items()},
    }
