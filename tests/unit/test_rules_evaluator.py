"""The evaluator: selector index, signals per batch, event time and lateness, composites, timers."""

from __future__ import annotations

from cityops.catalogue import load_default_catalogue
from cityops.model import Domain
from rules.conditions import Status
from rules.evaluator import DeviceInfo, Evaluator
from rules.spec import RuleSpec, parse_rules

CAT = load_default_catalogue()
M = {name: m.id for name, m in CAT.metrics.items()}
S = 1_000_000
PD1 = DeviceInfo(1, "pd-1", "water", "ponding_gauge", Domain.DRAINAGE, "tianhe")
PD2 = DeviceInfo(2, "pd-2", "water", "ponding_gauge", Domain.DRAINAGE, "tianhe")
RG1 = DeviceInfo(3, "rg-1", "water", "rain_gauge", Domain.DRAINAGE, "tianhe")
OTHER = DeviceInfo(4, "x-1", "gas", "gas_detector", Domain.GAS, "haizhu")


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def rules(*docs: dict[str, object]) -> list[RuleSpec]:
    return parse_rules([{"severity": "high", "source": "test", **d} for d in docs], CAT)


PONDING = {
    "name": "ponding",
    "selector": {"kinds": ["ponding_gauge"]},
    "condition": {"type": "threshold", "metric": "ponding_depth", "op": ">=", "value": 15, "clear": 12},
}


def rows(metric: str, *points: tuple[float, float]) -> list[tuple[int, int, float, int]]:
    return [(int(t * S), M[metric], v, 0) for t, v in points]


def summary(signals: list[object]) -> list[tuple[str, str, Status, float | None, int]]:
    return [(s.rule, s.subject, s.status, s.value, s.observations) for s in signals]  # type: ignore[attr-defined]


def test_signals_on_change_and_while_firing_coalesced_per_batch() -> None:
    ev = Evaluator(rules(PONDING), CAT, Clock())
    assert ev.observe(PD1, rows("ponding_depth", (0, 5), (60, 8))) == []
    assert summary(ev.observe(PD1, rows("ponding_depth", (120, 16), (180, 18), (240, 20)))) == [
        ("ponding", "pd-1", Status.FIRING, 20.0, 3)
    ]
    assert summary(ev.observe(PD1, rows("ponding_depth", (300, 13)))) == [
        ("ponding", "pd-1", Status.FIRING, 13.0, 1)
    ]
    assert summary(ev.observe(PD1, rows("ponding_depth", (360, 11)))) == [
        ("ponding", "pd-1", Status.INACTIVE, 11.0, 1)
    ]
    assert ev.observe(PD1, rows("ponding_depth", (420, 10))) == []


def test_selector_decides_which_devices_a_rule_watches() -> None:
    ev = Evaluator(
        rules(PONDING, {**PONDING, "name": "tianhe-only", "selector": {"districts": ["haizhu"]}}),
        CAT,
        Clock(),
    )
    fake = DeviceInfo(9, "odd-1", "water", "rain_gauge", Domain.DRAINAGE, "tianhe")
    assert ev.observe(fake, rows("ponding_depth", (0, 30))) == []  # not a ponding gauge, not in haizhu
    assert [s.rule for s in ev.observe(PD1, rows("ponding_depth", (0, 30)))] == ["ponding"]
    assert ev.observe(OTHER, rows("combustible_gas_lel", (0, 99))) == []


def test_late_readings_do_not_flip_state() -> None:
    ev = Evaluator(rules({**PONDING, "allowed_lateness_s": 60}), CAT, Clock())
    ev.observe(PD1, rows("ponding_depth", (1000, 5)))
    assert ev.observe(PD1, rows("ponding_depth", (900, 40))) == []  # older than watermark - lateness
    assert ev.observe(PD1, rows("ponding_depth", (970, 40))) == []  # within lateness, but out of order


def test_out_of_order_within_lateness_feeds_windows() -> None:
    rain = {
        "name": "rain-3h",
        "allowed_lateness_s": 3600,
        "condition": {
            "type": "window",
            "metric": "rainfall",
            "agg": "sum",
            "window_s": 10800,
            "op": ">=",
            "value": 50,
        },
    }
    ev = Evaluator(rules(rain), CAT, Clock())
    ev.observe(RG1, rows("rainfall", (3600, 30)))
    assert summary(ev.observe(RG1, rows("rainfall", (3000, 25)))) == [
        ("rain-3h", "rg-1", Status.FIRING, 55.0, 1)
    ]


def test_composite_all_on_one_device() -> None:
    both = {
        "name": "both",
        "condition": {
            "type": "all",
            "conditions": [
                {"type": "threshold", "metric": "rainfall", "op": ">=", "value": 10},
                {"type": "threshold", "metric": "battery_level", "op": "<", "value": 0.2},
            ],
        },
    }
    ev = Evaluator(rules(both), CAT, Clock())
    assert ev.observe(RG1, rows("rainfall", (0, 12))) == []
    assert summary(ev.observe(RG1, rows("battery_level", (10, 0.1)))) == [
        ("both", "rg-1", Status.FIRING, 0.1, 1)
    ]
    assert summary(ev.observe(RG1, rows("rainfall", (20, 0)))) == [("both", "rg-1", Status.INACTIVE, 0.0, 1)]


def test_district_composite_across_devices() -> None:
    storm = {
        "name": "storm-flooding",
        "condition": {
            "type": "all",
            "scope": "district",
            "conditions": [
                {
                    "type": "window",
                    "metric": "rainfall",
                    "agg": "sum",
                    "window_s": 10800,
                    "op": ">=",
                    "value": 50,
                },
                {"type": "threshold", "metric": "ponding_depth", "op": ">=", "value": 15},
            ],
        },
    }
    ev = Evaluator(rules(storm), CAT, Clock())
    assert ev.observe(RG1, rows("rainfall", (0, 30), (600, 30))) == []
    assert summary(ev.observe(PD2, rows("ponding_depth", (700, 16)))) == [
        ("storm-flooding", "district:tianhe", Status.FIRING, 16.0, 1)
    ]
    assert ev.observe(PD1, rows("ponding_depth", (710, 3))) != []  # still firing: pd-2 is flooded
    assert [s.status for s in ev.observe(PD2, rows("ponding_depth", (800, 4)))] == [Status.INACTIVE]


def test_no_data_by_the_clock_for_devices_that_never_report() -> None:
    clock = Clock()
    silent = {
        "name": "silent",
        "selector": {"kinds": ["ponding_gauge"]},
        "condition": {"type": "no_data", "after_s": 1800},
    }
    ev = Evaluator(rules(silent), CAT, clock)
    ev.watch_for_silence(PD1)
    clock.now = 1799 * S
    assert ev.tick() == []
    clock.now = 1800 * S
    assert summary(ev.tick()) == [("silent", "pd-1", Status.FIRING, None, 1)]
    assert summary(ev.observe(PD1, rows("ponding_depth", (1900, 1)))) == [
        ("silent", "pd-1", Status.INACTIVE, 1.0, 1)
    ]


def test_changed_rules_restart_unchanged_rules_keep_state() -> None:
    clock = Clock()
    gas = {
        "name": "lel",
        "condition": {
            "type": "threshold",
            "metric": "combustible_gas_lel",
            "op": ">=",
            "value": 20,
            "for_s": 60,
        },
    }
    ev = Evaluator(rules(PONDING, gas), CAT, clock)
    ev.observe(OTHER, rows("combustible_gas_lel", (0, 25)))
    ev.observe(PD1, rows("ponding_depth", (0, 20)))
    ev.set_rules(rules(PONDING, {**gas, "condition": {**gas["condition"], "value": 22}}))  # type: ignore[dict-item]
    # lel was changed: its 60 s `for` starts again (pending, not firing); ponding kept its state.
    assert summary(ev.observe(OTHER, rows("combustible_gas_lel", (60, 25)))) == [
        ("lel", "x-1", Status.PENDING, 25.0, 1)
    ]
    assert summary(ev.observe(PD1, rows("ponding_depth", (60, 13)))) == [
        ("ponding", "pd-1", Status.FIRING, 13.0, 1)
    ]


def test_the_latest_reading_again_changes_nothing() -> None:
    ev = Evaluator(rules(PONDING), CAT, Clock())
    first = summary(ev.observe(PD1, rows("ponding_depth", (0, 20))))
    assert first == [("ponding", "pd-1", Status.FIRING, 20.0, 1)]
    assert ev.observe(PD1, rows("ponding_depth", (0, 20))) == []  # redelivered: no second count


NOISE = DeviceInfo(5, "nm-1", "environment", "noise_monitor", Domain.NOISE, "yuexiu", {"zone_class": "2"})
# 2026-07-01 00:00 Asia/Shanghai, in UTC seconds: local 21:00 is HOUR * 21 after it.
MIDNIGHT_LOCAL = 1782835200
HOUR = 3600


def test_schedule_hands_over_from_the_day_limit_to_the_night_limit() -> None:
    night = {
        "name": "night",
        "selector": {"tags": {"zone_class": "2"}},
        "schedule": {"start": "22:00", "end": "06:00"},
        "condition": {"type": "threshold", "metric": "laeq", "op": ">", "value": 50, "clear": 48},
    }
    day = {**night, "name": "day", "schedule": {"start": "06:00", "end": "22:00"}}
    day["condition"] = {**night["condition"], "value": 60, "clear": 58}  # type: ignore[dict-item]
    clock = Clock()
    ev = Evaluator(rules(night, day), CAT, clock)
    at = MIDNIGHT_LOCAL + 21 * HOUR  # 21:00 local: day hours, 55 dB is within the day limit
    assert ev.observe(NOISE, rows("laeq", (at, 55))) == []
    at = MIDNIGHT_LOCAL + 22 * HOUR  # 22:00: night hours, 55 dB breaks the night limit
    assert summary(ev.observe(NOISE, rows("laeq", (at, 55)))) == [("night", "nm-1", Status.FIRING, 55.0, 1)]
    # 06:00 next morning, still 55 dB: the night rule clears when its hours end, the day rule is quiet.
    at = MIDNIGHT_LOCAL + 30 * HOUR
    assert summary(ev.observe(NOISE, rows("laeq", (at, 55)))) == [("night", "nm-1", Status.INACTIVE, 55.0, 1)]


def test_schedule_ends_in_the_series_event_time() -> None:
    night = {
        "name": "night",
        "selector": {"tags": {"zone_class": "2"}},
        "schedule": {"start": "22:00", "end": "06:00"},
        "condition": {"type": "threshold", "metric": "laeq", "op": ">", "value": 50},
    }
    clock = Clock()
    ev = Evaluator(rules(night), CAT, clock)
    at = MIDNIGHT_LOCAL + 5 * HOUR + 57 * 60  # 05:57 local
    clock.now = at * S
    assert [s.status for s in ev.observe(NOISE, rows("laeq", (at, 70)))] == [Status.FIRING]
    # The clock passes 06:00, but the series' own time (its last reading plus the 5 min it may
    # still be late) is 06:02: the night rule ends there, not later and not from the clock alone.
    clock.now = (MIDNIGHT_LOCAL + 7 * HOUR) * S
    (ended,) = ev.tick()
    assert (ended.status, ended.at_us) == (Status.INACTIVE, (at + 300) * S)
    assert ev.tick() == []


def test_timers_of_a_backfilled_series_run_on_its_readings_not_the_clock() -> None:
    held = {**PONDING, "name": "held", "condition": {**PONDING["condition"], "for_s": 600}}  # type: ignore[dict-item]
    clock = Clock()
    clock.now = 100_000 * S  # the present; the readings below are a day old (backfill)
    ev = Evaluator(rules(held), CAT, clock)
    assert [s.status for s in ev.observe(PD1, rows("ponding_depth", (10_000, 20)))] == [Status.PENDING]
    assert ev.tick() == []  # the clock is far past `for`, the series is not: still pending
    assert [s.status for s in ev.observe(PD1, rows("ponding_depth", (10_300, 5)))] == [Status.INACTIVE]
    ev.observe(PD1, rows("ponding_depth", (10_600, 20)))
    assert [s.status for s in ev.observe(PD1, rows("ponding_depth", (11_200, 21)))] == [Status.FIRING]


def test_a_silence_found_in_late_readings_is_raised_and_resolved() -> None:
    silent = {"name": "silent", "condition": {"type": "no_data", "after_s": 3600}}
    clock = Clock()
    clock.now = 100_000 * S  # the present: the readings arrive as backfill, all at once
    ev = Evaluator(rules(silent), CAT, clock)
    assert ev.observe(PD1, rows("ponding_depth", (0, 1), (600, 1))) == []
    signals = ev.observe(PD1, rows("ponding_depth", (10_000, 1), (10_600, 1)))
    assert [(s.status, s.at_us) for s in signals] == [
        (Status.FIRING, 4200 * S),
        (Status.INACTIVE, 10_600 * S),
    ]
    assert ev.tick() == []  # it arrived just now: not silent by the clock
