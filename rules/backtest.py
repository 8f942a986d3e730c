"""Backtest: what alerts rules would have raised over stored readings, by the live evaluator.

The readings of a time range are fed, oldest first, to the same :class:`~rules.evaluator.Evaluator`
the pipeline runs, with a clock that follows event time; timers (``no_data``, ``for`` between
sparse readings, schedules) are ticked every ``resolution_s`` of event time, as the pipeline ticks
them every ``rules_tick_interval`` of wall time. Signals go through the store's lifecycle, kept in
memory: pending, firing, resolved, and a trigger within the flap window reopens the same alert.
So rules decided by readings give the same intervals as the live path; timer-decided ones agree
to within ``resolution_s``.

Bounded: at most ``max_rows`` readings (:class:`BacktestLimitError` beyond), so an API call cannot
scan a year of a city.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn
from cityops.errors import CityopsError
from rules.conditions import US, Status
from rules.evaluator import DeviceInfo, Evaluator, Signal
from rules.spec import Composite, Leaf, NoData, RuleSpec

DEFAULT_MAX_ROWS = 2_000_000
DEFAULT_RESOLUTION_S = 60.0
FETCH_ROWS = 10_000


class BacktestLimitError(CityopsError):
    """The range holds more readings than the backtest may read; narrow it."""


@dataclass(slots=True)
class BacktestAlert:
    rule: str
    subject: str
    device: str | None
    severity: str
    started_at: datetime
    resolved_at: datetime | None = None
    fired: bool = False  # reached firing (not only pending)
    count: int = 0
    flap_count: int = 0
    last_value: float | None = None


@dataclass(slots=True)
class BacktestResult:
    alerts: list[BacktestAlert] = field(default_factory=list)
    readings: int = 0


class _Lifecycle:
    """The store's alert lifecycle (rules.store), in memory: what would have been written."""

    def __init__(self, rules: dict[str, RuleSpec]) -> None:
        self._rules = rules
        self._open: dict[tuple[str, str], BacktestAlert] = {}
        self._last: dict[tuple[str, str], BacktestAlert] = {}
        self.alerts: list[BacktestAlert] = []

    def apply(self, signals: Iterable[Signal]) -> None:
        for s in signals:
            key = (s.rule, s.subject)
            at = _dt(s.at_us)
            alert = self._open.get(key)
            if s.status is Status.INACTIVE:
                if alert is not None:
                    alert.resolved_at = at
                    if s.value is not None:
                        alert.last_value = s.value
                    del self._open[key]
                continue
            if alert is None:
                alert = self._reopen(key, at) or self._new(s, at)
                self._open[key] = alert
            alert.count += s.observations
            alert.fired = alert.fired or s.status is Status.FIRING
            if s.value is not None:
                alert.last_value = s.value

    def _reopen(self, key: tuple[str, str], at: datetime) -> BacktestAlert | None:
        last = self._last.get(key)
        window = self._rules[key[0]].flap_window_s
        if last is None or last.resolved_at is None or (at - last.resolved_at).total_seconds() > window:
            return None
        last.resolved_at = None
        last.flap_count += 1
        return last

    def _new(self, s: Signal, at: datetime) -> BacktestAlert:
        alert = BacktestAlert(s.rule, s.subject, s.device, self._rules[s.rule].severity.value, at)
        self.alerts.append(alert)
        self._last[(s.rule, s.subject)] = alert
        return alert


class _EventClock:
    def __init__(self, now_us: int) -> None:
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us


async def load_devices(conn: AsyncConn, catalogue: Catalogue) -> list[DeviceInfo]:
    cur = await conn.execute(
        "SELECT id, external_id, tenant, kind, district, tags FROM devices WHERE enabled ORDER BY id"
    )
    kinds = catalogue.kinds
    return [
        DeviceInfo(i, ext, tenant, kind, kinds[kind].domain if kind in kinds else None, district, tags)
        for i, ext, tenant, kind, district, tags in await cur.fetchall()
    ]


async def backtest(
    conn: AsyncConn,
    rules: list[RuleSpec],
    catalogue: Catalogue,
    start: datetime,
    end: datetime,
    *,
    devices: Iterable[str] | None = None,
    resolution_s: float = DEFAULT_RESOLUTION_S,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> BacktestResult:
    """The alerts ``rules`` would have raised from the readings in ``[start, end)``."""
    if end <= start:
        raise BacktestLimitError("the range is empty: `end` must be after `start`")
    wanted = set(devices) if devices is not None else None
    fleet = {
        d.id: d for d in await load_devices(conn, catalogue) if wanted is None or d.external_id in wanted
    }
    clock = _EventClock(int(start.timestamp() * US))
    evaluator = Evaluator(rules, catalogue, clock)
    lifecycle = _Lifecycle({r.name: r for r in rules})
    for device in fleet.values():
        evaluator.watch_for_silence(device)
    metric_ids = sorted({catalogue.metrics[m].id for r in rules for m in r.metrics()})
    step_us = int(resolution_s * US)
    next_tick = clock.now_us + step_us
    result = BacktestResult()
    # A no_data rule without a metric is reset by any reading: then every metric is read.
    every_metric = any(isinstance(leaf, NoData) and leaf.metric is None for r in rules for leaf in _leaves(r))
    query = (
        "SELECT device_id, metric_id, (extract(epoch FROM time) * 1000000)::bigint, value, quality "
        "FROM readings WHERE time >= %(start)s AND time < %(end)s AND device_id = ANY(%(devices)s)"
        + ("" if every_metric else " AND metric_id = ANY(%(metrics)s)")
        + " ORDER BY time LIMIT %(limit)s"
    )
    params = {
        "start": start,
        "end": end,
        "devices": list(fleet),
        "metrics": metric_ids,
        "limit": max_rows + 1,
    }
    async with conn.transaction():
        cur = conn.cursor("backtest")
        await cur.execute(query, params)
        while rows := await cur.fetchmany(FETCH_ROWS):
            result.readings += len(rows)
            if result.readings > max_rows:
                raise BacktestLimitError(
                    f"the range holds more than {max_rows} readings: narrow the time range or the devices"
                )
            for device_id, metric_id, time_us, value, quality in rows:
                while next_tick <= time_us:
                    clock.now_us = next_tick
                    lifecycle.apply(evaluator.tick())
                    next_tick += step_us
                clock.now_us = time_us
                lifecycle.apply(evaluator.observe(fleet[device_id], [(time_us, metric_id, value, quality)]))
        await cur.close()
    end_us = int(end.timestamp() * US)
    while next_tick <= end_us:
        clock.now_us = next_tick
        lifecycle.apply(evaluator.tick())
        next_tick += step_us
    result.alerts = lifecycle.alerts
    return result


def _leaves(rule: RuleSpec) -> list[Leaf]:
    return list(rule.condition.conditions) if isinstance(rule.condition, Composite) else [rule.condition]


def _dt(us: int) -> datetime:
    return datetime.fromtimestamp(us / US, tz=UTC)
