"""Evaluating rules over batches of readings: state per (rule, subject, condition), event time.

A batch is evaluated per device segment: the rules that watch each of its metrics are found through
an index by metric id, filtered by a per-device selector match that is computed once. Each rule's
status for a subject (a device, or a district for district-scoped composites) is reported when it
changes, and while it fires (so an open alert learns its latest value), at most once per batch.

Event time: each series (device, metric) has a watermark, its latest reading time. A reading older
than the watermark minus the rule's allowed lateness is stored but does not change any state; one
inside the lateness only feeds sliding windows (a newer reading already decided the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from cityops.catalogue import Catalogue
from cityops.model import Domain, Row
from rules.conditions import (
    US,
    ConditionState,
    FlatlineState,
    NoDataState,
    RateOfChangeState,
    Status,
    WindowState,
    new_state,
)
from rules.spec import Composite, Flatline, Leaf, NoData, Range, RateOfChange, RuleSpec, Schedule, Threshold

Clock = Callable[[], int]  # epoch microseconds


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What selectors match on."""

    id: int
    external_id: str
    tenant: str
    kind: str
    domain: Domain | None = None
    district: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Signal:
    """A rule's status for a subject after a batch (or a tick)."""

    rule: str
    subject: str  # the device's external id, or "district:<name>"
    device: str | None
    status: Status
    value: float | None
    metric: str | None
    at_us: int
    observations: int = 1  # readings that kept it firing in this batch


MINUTE_US = 60 * US


class _Hours:
    """Whether an instant falls in a schedule's local hours; cached per minute (schedules are HH:MM)."""

    __slots__ = ("_active", "_minute", "end", "start", "zone")

    def __init__(self, schedule: Schedule) -> None:
        self.zone = ZoneInfo(schedule.timezone)
        self.start = schedule.start.hour * 60 + schedule.start.minute
        self.end = schedule.end.hour * 60 + schedule.end.minute
        self._minute = -1
        self._active = False

    def active(self, time_us: int) -> bool:
        minute = time_us // MINUTE_US
        if minute != self._minute:
            local = datetime.fromtimestamp(minute * 60, self.zone)
            of_day = local.hour * 60 + local.minute
            if self.start < self.end:
                self._active = self.start <= of_day < self.end
            else:  # wraps midnight
                self._active = of_day >= self.start or of_day < self.end
            self._minute = minute
        return self._active


@dataclass(slots=True)
class _Compiled:
    spec: RuleSpec
    leaves: list[Leaf]
    metric_ids: list[int | None]  # per leaf; None: any metric (no_data without a metric)
    scope: str  # device | district
    any_of: bool
    lateness_us: int
    hours: _Hours | None


_SLIDING = (WindowState, RateOfChangeState)


class Evaluator:
    def __init__(self, rules: Iterable[RuleSpec], catalogue: Catalogue, clock: Clock) -> None:
        self._catalogue = catalogue
        self._clock = clock
        self._rules: dict[str, _Compiled] = {}
        self._by_metric: dict[int | None, list[tuple[_Compiled, int]]] = {}
        self._matches: dict[tuple[str, int], bool] = {}
        # Per (device id, metric id): the (rule, leaf index) pairs whose selector picks that series.
        self._plans: dict[tuple[int, int | None], list[tuple[_Compiled, int]]] = {}
        self._states: dict[tuple[str, str, int], ConditionState] = {}
        self._firing_devices: dict[tuple[str, str, int], set[str]] = {}  # district scope
        self._reported: dict[tuple[str, str], Status] = {}
        self._watermarks: dict[tuple[int, int], int] = {}
        self._devices: dict[str, DeviceInfo] = {}
        self.set_rules(rules)

    # --- rules ---------------------------------------------------------------------------------
    def set_rules(self, rules: Iterable[RuleSpec]) -> None:
        """Replace the rule set; rules whose spec is unchanged keep their state."""
        compiled = {spec.name: self._compile(spec) for spec in rules if spec.enabled}
        for name, old in self._rules.items():
            if name not in compiled or compiled[name].spec != old.spec:
                self._forget(name)
        self._rules = compiled
        self._by_metric = {}
        for rule in compiled.values():
            for index, metric_id in enumerate(rule.metric_ids):
                self._by_metric.setdefault(metric_id, []).append((rule, index))
        self._matches.clear()
        self._plans.clear()

    def _compile(self, spec: RuleSpec) -> _Compiled:
        composite = isinstance(spec.condition, Composite)
        leaves: list[Leaf] = (
            list(spec.condition.conditions) if isinstance(spec.condition, Composite) else [spec.condition]
        )
        metric_ids = [self._catalogue.metrics[leaf.metric].id if leaf.metric else None for leaf in leaves]
        scope = spec.condition.scope if isinstance(spec.condition, Composite) else "device"
        any_of = composite and spec.condition.type == "any"
        hours = _Hours(spec.schedule) if spec.schedule else None
        return _Compiled(spec, leaves, metric_ids, scope, any_of, int(spec.allowed_lateness_s * US), hours)

    def _forget(self, name: str) -> None:
        for key in [k for k in self._states if k[0] == name]:
            del self._states[key]
        for key in [k for k in self._firing_devices if k[0] == name]:
            del self._firing_devices[key]
        for reported in [k for k in self._reported if k[0] == name]:
            del self._reported[reported]

    def forget_devices(self) -> None:
        """The registry changed: selector matches are recomputed on next use."""
        self._matches.clear()
        self._plans.clear()

    def _selects(self, rule: _Compiled, device: DeviceInfo) -> bool:
        key = (rule.spec.name, device.id)
        hit = self._matches.get(key)
        if hit is None:
            s = rule.spec.selector
            hit = self._matches[key] = (
                (s.tenant is None or s.tenant == device.tenant)
                and (s.domain is None or s.domain == device.domain)
                and (not s.kinds or device.kind in s.kinds)
                and (not s.devices or device.external_id in s.devices)
                and (not s.districts or device.district in s.districts)
                and all(device.tags.get(k) == v for k, v in s.tags.items())
            )
        return hit

    # --- readings ------------------------------------------------------------------------------
    def _plan(self, device: DeviceInfo, metric_id: int | None) -> list[tuple[_Compiled, int]]:
        key = (device.id, metric_id)
        plan = self._plans.get(key)
        if plan is None:
            entries = self._by_metric.get(metric_id, ())
            plan = self._plans[key] = [
                (rule, index) for rule, index in entries if self._selects(rule, device)
            ]
        return plan

    def observe(self, device: DeviceInfo, rows: list[Row]) -> list[Signal]:
        """Advance every rule that watches these rows; the signals of what changed or fires."""
        self._devices[device.external_id] = device
        out: dict[tuple[str, str], Signal] = {}
        plans, device_id = self._plans, device.id
        for time_us, metric_id, value, _quality in rows:
            plan = plans.get((device_id, metric_id))
            if plan is None:
                plan = self._plan(device, metric_id)
            if not plan:
                continue
            series = (device_id, metric_id)
            watermark = self._watermarks.get(series)
            if watermark == time_us:
                continue  # the latest reading again (a redelivery): already evaluated
            in_order = watermark is None or time_us > watermark
            if in_order:
                self._watermarks[series] = watermark = time_us
            assert watermark is not None
            for rule, index in plan:
                if not in_order and time_us < watermark - rule.lateness_us:
                    continue  # late: stored, but no longer allowed to change what was decided
                if rule.hours is not None and not rule.hours.active(time_us):
                    self._off_hours(rule, device, index, time_us, out)
                    continue
                state = self._state(rule, device.external_id, index)
                if not in_order and not isinstance(state, _SLIDING):
                    continue
                status = state.observe(time_us, value)
                if isinstance(state, NoDataState):
                    state.arrived(self._clock())
                    if state.gap_from is not None:
                        self._silence_in_the_past(rule, device, state, out)
                self._settle(rule, device, index, status, state.value, time_us, out)
        if rows:
            self._observe_any_metric(device, rows, out)
        return list(out.values())

    def _observe_any_metric(
        self, device: DeviceInfo, rows: list[Row], out: dict[tuple[str, str], Signal]
    ) -> None:
        """Rules on any reading of a device (``no_data`` without a metric): once per batch, its latest."""
        plan = self._plans.get((device.id, None))
        if plan is None:
            plan = self._plan(device, None)
        if not plan:
            return
        latest = max(rows)
        earliest = min(rows)[0]
        for rule, index in plan:
            state = self._state(rule, device.external_id, index)
            if isinstance(state, NoDataState):
                state.arrived(self._clock())
                if _may_hide_a_gap(state, earliest, latest[0]):
                    for time_us in sorted({row[0] for row in rows}):  # silences between these readings
                        state.observe(time_us, latest[2])
                        if state.gap_from is not None:
                            self._silence_in_the_past(rule, device, state, out)
            status = state.observe(latest[0], latest[2])
            if isinstance(state, NoDataState) and state.gap_from is not None:
                self._silence_in_the_past(rule, device, state, out)
            self._settle(rule, device, index, status, state.value, latest[0], out)

    def _silence_in_the_past(
        self, rule: _Compiled, device: DeviceInfo, state: NoDataState, out: dict[tuple[str, str], Signal]
    ) -> None:
        """A reading ended a silence the clock did not see fire (it arrived late): report it as the
        alert it was, firing from ``after_s`` into the silence; the reading then resolves it."""
        if len(rule.leaves) != 1 or state.gap_from is None:
            return
        key = (rule.spec.name, device.external_id)
        if self._reported.get(key) is Status.FIRING:
            return  # the clock saw it: already firing, the reading resolves it
        self._reported[key] = Status.FIRING
        at = state.gap_from + state.after_us
        out[(key[0], f"{key[1]}\x00silence@{at}")] = Signal(
            key[0], key[1], device.external_id, Status.FIRING, None, rule.leaves[0].metric, at
        )

    def tick(self) -> list[Signal]:
        """What time alone decides: ``for`` durations between sparse readings, schedules, ``no_data``.

        ``no_data`` runs on the clock: silence is measured against the present. Every other timer
        runs on its series' event time: the watermark plus the allowed lateness (the longest a
        reading may still be on its way), capped by the clock. A series being backfilled hours
        behind the present therefore gets its ``for`` and flatline durations from its own readings,
        not from the wall clock, and a live series gets them on time.
        """
        now = self._clock()
        out: dict[tuple[str, str], Signal] = {}
        for (name, device_id, index), state in list(self._states.items()):
            rule = self._rules.get(name)
            device = self._devices.get(device_id)
            if rule is None or device is None:
                continue
            at = now if isinstance(state, NoDataState) else self._series_time(rule, device, index, now)
            if at is None:
                continue
            if rule.hours is not None and not rule.hours.active(at):
                self._off_hours(rule, device, index, at, out)
                continue
            self._settle(rule, device, index, state.tick(at), state.value, at, out, by_clock=True)
        return list(out.values())

    def _series_time(self, rule: _Compiled, device: DeviceInfo, index: int, now: int) -> int | None:
        """Where a series' timers stand: its watermark plus the rule's lateness, at most now."""
        watermark = self._watermarks.get((device.id, rule.metric_ids[index]))  # type: ignore[arg-type]
        if watermark is None:
            return None
        return min(now, watermark + rule.lateness_us)

    def watch_for_silence(self, device: DeviceInfo, last_seen_us: int | None = None) -> None:
        """Start no_data timers for a device that may never report (called for registered devices).

        ``last_seen_us``: when it last reported, so that a restart does not reset its silence.
        """
        self._devices[device.external_id] = device
        for entries in self._by_metric.values():
            for rule, index in entries:
                if isinstance(rule.leaves[index], NoData) and self._selects(rule, device):
                    state = self._state(rule, device.external_id, index)
                    if last_seen_us is not None and isinstance(state, NoDataState):
                        state.arrived_us = last_seen_us

    @property
    def devices(self) -> Mapping[str, DeviceInfo]:
        """Every device the evaluator has seen or watches, by external id."""
        return self._devices

    @property
    def rules(self) -> Mapping[str, RuleSpec]:
        return {name: rule.spec for name, rule in self._rules.items()}

    def statuses(self) -> dict[tuple[str, str], Status]:
        """The last reported status per (rule, subject): what the open alerts should agree with."""
        return dict(self._reported)

    def assume_firing(self, rule_name: str, subject: str) -> None:
        """An open alert says this fired: start its device's states as firing before a replay.

        Hysteresis needs history: a reading between the clear and the firing level keeps a firing
        rule firing and a quiet one quiet. After a restart the open alert is that history.
        """
        rule = self._rules.get(rule_name)
        if rule is None or rule.scope != "device":
            return
        for index, leaf in enumerate(rule.leaves):
            if isinstance(leaf, NoData):
                continue
            state = self._state(rule, subject, index)
            if hasattr(state, "firing") and not isinstance(state, FlatlineState):
                state.firing = True
        self._reported[(rule_name, subject)] = Status.FIRING

    def horizon_us(self, metric_id: int) -> int:
        """How much history of a metric a replay needs for every rule watching it to be exact."""
        longest = 0
        for rule, index in self._by_metric.get(metric_id, ()):
            longest = max(longest, _leaf_horizon_us(rule.leaves[index]) + rule.lateness_us)
        return longest

    def _off_hours(
        self, rule: _Compiled, device: DeviceInfo, index: int, at_us: int, out: dict[tuple[str, str], Signal]
    ) -> None:
        """Outside a rule's hours its state starts over (a night breach is not a day one) and it clears."""
        state = self._states.pop((rule.spec.name, device.external_id, index), None)
        if state is not None:
            self._settle(rule, device, index, Status.INACTIVE, state.value, at_us, out)

    def _state(self, rule: _Compiled, device: str, index: int) -> ConditionState:
        key = (rule.spec.name, device, index)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = new_state(rule.leaves[index], self._clock())
        return state

    def _settle(
        self,
        rule: _Compiled,
        device: DeviceInfo,
        index: int,
        leaf_status: Status,
        value: float | None,
        at_us: int,
        out: dict[tuple[str, str], Signal],
        *,
        by_clock: bool = False,
    ) -> None:
        """Combine a leaf's status into its rule's and report it: on a change, or on a reading while
        firing (a repeat trigger the alert counts). The clock alone reports only changes."""
        name = rule.spec.name
        if len(rule.leaves) == 1:
            subject = device.external_id if rule.scope == "device" else f"district:{device.district}"
            key = (name, subject)
            before = self._reported.get(key, Status.INACTIVE)
            if leaf_status is before and (by_clock or leaf_status is not Status.FIRING):
                return  # the common case: nothing changed
            status = leaf_status
        else:
            subject, status = self._combined(rule, device, index, leaf_status, at_us)
            key = (name, subject)
            before = self._reported.get(key, Status.INACTIVE)
            if status is before and (by_clock or status is not Status.FIRING):
                return
        self._reported[key] = status
        metric = rule.leaves[index].metric
        previous = out.get(key)
        count = (previous.observations + 1) if previous is not None and status is Status.FIRING else 1
        out[key] = Signal(name, subject, device.external_id, status, value, metric, at_us, count)

    def _combined(
        self, rule: _Compiled, device: DeviceInfo, index: int, leaf_status: Status, at_us: int
    ) -> tuple[str, Status]:
        """A composite's subject and status, with one of its leaves just changed to ``leaf_status``."""
        name = rule.spec.name
        if rule.scope == "district":
            subject = f"district:{device.district}"
            firing = self._firing_devices.setdefault((name, subject, index), set())
            if leaf_status is Status.FIRING:
                firing.add(device.external_id)
            else:
                firing.discard(device.external_id)
            statuses = [
                Status.FIRING if self._firing_devices.get((name, subject, i)) else Status.INACTIVE
                for i in range(len(rule.leaves))
            ]
        else:
            subject = device.external_id
            statuses = [
                (leaf_status if i == index else self._leaf_status(name, subject, i, at_us))
                for i in range(len(rule.leaves))
            ]
        return subject, _combine(statuses, rule.any_of)

    def _leaf_status(self, name: str, subject: str, index: int, now_us: int) -> Status:
        state = self._states.get((name, subject, index))
        if state is None:
            return Status.INACTIVE
        if isinstance(state, NoDataState):
            return state.tick(now_us)
        return Status.FIRING if getattr(state, "firing", False) else Status.INACTIVE


def _may_hide_a_gap(state: NoDataState, earliest_us: int, latest_us: int) -> bool:
    """Whether a batch spanning these times could contain a silence of ``after_s`` (rarely: the
    usual batch spans milliseconds, and one reading at its latest time settles it)."""
    start = earliest_us if state.last_us is None else min(earliest_us, state.last_us)
    return latest_us - start >= state.after_us


# A threshold without ``for`` is decided by its last readings (an open alert seeds the hysteresis);
# this much history covers a device that reports every few minutes.
RECENT_US = 15 * 60 * US


def _leaf_horizon_us(leaf: Leaf) -> int:
    if isinstance(leaf, Threshold | Range):
        return int(leaf.for_s * US) + RECENT_US
    if isinstance(leaf, Flatline):
        return int(leaf.for_s * US) + RECENT_US
    if isinstance(leaf, RateOfChange) or not isinstance(leaf, NoData):
        return int(leaf.window_s * US) + RECENT_US
    return 0  # no_data: seeded from the device's last_seen


def _combine(statuses: list[Status], any_of: bool) -> Status:
    if any_of:
        return max(statuses)
    return min(statuses)
