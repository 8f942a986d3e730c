"""Every condition type, table-driven in event time; time-driven parts by an injected clock."""

from __future__ import annotations

import pytest

from rules.conditions import NoDataState, Status, new_state
from rules.spec import Flatline, NoData, Op, Range, RateOfChange, Threshold, Window

OFF, PEND, FIRE = Status.INACTIVE, Status.PENDING, Status.FIRING
S = 1_000_000  # microseconds per second


def run(spec: object, readings: list[tuple[float, float]]) -> list[Status]:
    state = new_state(spec, 0)  # type: ignore[arg-type]
    return [state.observe(int(t * S), v) for t, v in readings]


CASES = [
    (
        "threshold fires and clears at its level",
        Threshold(metric="ponding_depth", op=Op.GE, value=15),
        [(0, 10), (60, 15), (120, 20), (180, 14.9)],
        [OFF, FIRE, FIRE, OFF],
    ),
    (
        "hysteresis: stays firing until the clear level",
        Threshold(metric="ponding_depth", op=Op.GE, value=15, clear=12),
        [(0, 16), (60, 13), (120, 12.5), (180, 11.9), (240, 13)],
        [FIRE, FIRE, FIRE, OFF, OFF],
    ),
    (
        "below-threshold op with hysteresis (free chlorine low)",
        Threshold(metric="free_chlorine", op=Op.LT, value=0.05, clear=0.1),
        [(0, 0.2), (60, 0.04), (120, 0.08), (180, 0.12)],
        [OFF, FIRE, FIRE, OFF],
    ),
    (
        "`for`: pending until the breach has lasted",
        Threshold(metric="combustible_gas_lel", op=Op.GE, value=20, for_s=120),
        [(0, 25), (60, 30), (119, 22), (120, 21), (180, 5)],
        [PEND, PEND, PEND, FIRE, OFF],
    ),
    (
        "`for` restarts when the breach is interrupted",
        Threshold(metric="combustible_gas_lel", op=Op.GE, value=20, for_s=120),
        [(0, 25), (60, 10), (90, 25), (200, 25), (210, 25)],
        [PEND, OFF, PEND, PEND, FIRE],
    ),
    (
        "range: outside fires, inside clears",
        Range(metric="ph", low=6.5, high=8.5),
        [(0, 7), (60, 8.6), (120, 6.4), (180, 7.2)],
        [OFF, FIRE, FIRE, OFF],
    ),
    (
        "range with `for`",
        Range(metric="ph", low=6.5, high=8.5, for_s=300),
        [(0, 9), (299, 9), (300, 9)],
        [PEND, PEND, FIRE],
    ),
    (
        "window average (24 h PM2.5, scaled down)",
        Window(metric="pm25", agg="avg", window_s=120, op=Op.GT, value=75),
        [(0, 70), (60, 80), (120, 90), (180, 60), (240, 50)],
        [OFF, OFF, FIRE, OFF, OFF],
    ),
    (
        "window sum with a clear level (3 h rainfall, scaled down)",
        Window(metric="rainfall", agg="sum", window_s=180, op=Op.GE, value=50, clear=30),
        [(0, 20), (60, 20), (120, 15), (180, 0), (240, 0), (300, 0)],
        [OFF, OFF, FIRE, FIRE, OFF, OFF],
    ),
    (
        "window max",
        Window(metric="lamax", agg="max", window_s=60, op=Op.GT, value=80),
        [(0, 70), (30, 85), (60, 70), (100, 70)],
        [OFF, FIRE, FIRE, OFF],
    ),
    (
        "window min",
        Window(metric="dissolved_oxygen", agg="min", window_s=60, op=Op.LT, value=2),
        [(0, 5), (30, 1.5), (60, 4), (100, 4)],
        [OFF, FIRE, FIRE, OFF],
    ),
    (
        "rate of change: a pressure fall of 0.1 MPa within 5 min (burst)",
        RateOfChange(metric="network_pressure", direction="fall", delta=0.1, window_s=300),
        [(0, 0.40), (60, 0.39), (120, 0.28), (180, 0.28), (500, 0.28)],
        [OFF, OFF, FIRE, FIRE, OFF],
    ),
    (
        "rate of change: a rise",
        RateOfChange(metric="flow_rate", direction="rise", delta=50, window_s=600),
        [(0, 100), (300, 140), (400, 160), (1100, 160)],
        [OFF, OFF, FIRE, OFF],
    ),
    (
        "flatline: unchanged within epsilon for an hour",
        Flatline(metric="network_pressure", epsilon=0.001, for_s=3600),
        [(0, 0.35), (1800, 0.3505), (3600, 0.3502), (3700, 0.36)],
        [OFF, OFF, FIRE, OFF],
    ),
]


@pytest.mark.parametrize(("case", "spec", "readings", "expected"), CASES, ids=[c[0] for c in CASES])
def test_condition(
    case: str, spec: object, readings: list[tuple[float, float]], expected: list[Status]
) -> None:
    assert run(spec, readings) == expected


def test_out_of_order_reading_inside_the_window_counts() -> None:
    state = new_state(Window(metric="rainfall", agg="sum", window_s=600, op=Op.GE, value=50), 0)
    assert state.observe(300 * S, 30) is OFF
    assert state.observe(100 * S, 25) is FIRE  # late but inside the window: the sum is 55
    assert state.value == 55


def test_reading_older_than_the_window_is_ignored() -> None:
    state = new_state(Window(metric="rainfall", agg="sum", window_s=60, op=Op.GE, value=50), 0)
    state.observe(600 * S, 40)
    assert state.observe(100 * S, 40) is OFF
    assert state.value == 40


def test_for_fires_on_the_clock_between_sparse_readings() -> None:
    state = new_state(Threshold(metric="co_ppm", op=Op.GE, value=50, for_s=3600), 0)
    assert state.observe(0, 80) is PEND
    assert state.tick(3599 * S) is PEND
    assert state.tick(3600 * S) is FIRE


def test_no_data_is_driven_by_the_clock() -> None:
    state = new_state(NoData(after_s=900), now_us=0)
    assert isinstance(state, NoDataState)
    assert state.tick(899 * S) is OFF
    assert state.tick(900 * S) is FIRE  # never reported since start
    assert state.observe(1000 * S, 1.0) is OFF
    state.arrived(1000 * S)
    assert state.tick(1899 * S) is OFF
    assert state.tick(1900 * S) is FIRE


def test_no_data_finds_silences_in_late_readings() -> None:
    state = new_state(NoData(after_s=900), now_us=50_000 * S)  # the present; the readings are older
    assert isinstance(state, NoDataState)
    state.observe(1000 * S, 1.0)
    assert state.gap_from is None
    state.observe(1600 * S, 1.0)
    assert state.gap_from is None  # 600 s apart
    state.observe(2600 * S, 1.0)
    assert state.gap_from == 1600 * S  # 1000 s of silence, in the readings' own time
    state.observe(2000 * S, 1.0)
    assert state.gap_from is None and state.last_us == 2600 * S  # an older straggler ends nothing


def test_flatline_on_the_clock() -> None:
    state = new_state(Flatline(metric="ponding_depth", epsilon=0.0, for_s=60), 0)
    state.observe(0, 3.0)
    assert state.tick(59 * S) is OFF
    assert state.tick(60 * S) is FIRE


def test_a_window_holds_bounded_buckets_at_any_rate() -> None:
    state = new_state(Window(metric="pm25", agg="avg", window_s=86400, op=Op.GT, value=75), 0)
    for i in range(100_000):  # ten readings a second for close to three hours, then the window slides
        state.observe(i * S // 10, 50.0 if i % 2 else 100.0)
    window = state.window  # type: ignore[attr-defined]
    assert len(window.buckets) <= 241 and window.count == 100_000
    assert state.value == 75.0
    for i in range(10):  # a day later: everything before has left the window
        state.observe(200_000 * S + i * S, 10.0)
    assert window.count == 10 and state.value == 10.0 and len(window.buckets) == 1
