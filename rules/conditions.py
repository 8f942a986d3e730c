"""The state of one condition over one series, advanced reading by reading in event time.

Each state answers ``observe(time_us, value)`` and ``tick(now_us)`` with a :class:`Status`; ``tick``
drives what time alone decides (``no_data``, and ``for`` durations when readings are sparse) from
an injected clock. Plain classes with slots: evaluation is a tight loop, not pydantic.
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum
from typing import Protocol

from rules.spec import Flatline, Leaf, NoData, Op, Range, RateOfChange, Threshold, Window

US = 1_000_000


class Status(IntEnum):
    INACTIVE = 0
    PENDING = 1  # the condition holds, its `for` duration has not passed yet
    FIRING = 2


class ConditionState(Protocol):
    value: float | None  # what the status is about (the reading, or the aggregate)

    def observe(self, time_us: int, value: float) -> Status: ...

    def tick(self, now_us: int) -> Status: ...


class _Hysteresis:
    """Breach for ``for_us`` to fire; once firing, only the clear test ends it."""

    __slots__ = ("breach_since", "firing", "for_us", "value")

    def __init__(self, for_s: float) -> None:
        self.for_us = int(for_s * US)
        self.breach_since: int | None = None
        self.firing = False
        self.value: float | None = None

    def _step(self, time_us: int, breached: bool, cleared: bool) -> Status:
        if self.firing:
            if cleared:
                self.firing = False
                self.breach_since = None
                return Status.INACTIVE
            return Status.FIRING
        if not breached:
            self.breach_since = None
            return Status.INACTIVE
        if self.breach_since is None:
            self.breach_since = time_us
        return self.tick(time_us)

    def tick(self, now_us: int) -> Status:
        if self.firing:
            return Status.FIRING
        if self.breach_since is None:
            return Status.INACTIVE
        if now_us - self.breach_since >= self.for_us:
            self.firing = True
            return Status.FIRING
        return Status.PENDING


def _cleared(op: Op, value: float, clear: float) -> bool:
    """Past the clear level on the safe side (for ``>`` with clear 12: at or below 12)."""
    return not op.holds(value, clear)


class ThresholdState(_Hysteresis):
    __slots__ = ("clear", "level", "op")

    def __init__(self, spec: Threshold) -> None:
        super().__init__(spec.for_s)
        self.op, self.level = spec.op, spec.value
        self.clear = spec.value if spec.clear is None else spec.clear

    def observe(self, time_us: int, value: float) -> Status:
        self.value = value
        return self._step(time_us, self.op.holds(value, self.level), _cleared(self.op, value, self.clear))


class RangeState(_Hysteresis):
    __slots__ = ("high", "low")

    def __init__(self, spec: Range) -> None:
        super().__init__(spec.for_s)
        self.low, self.high = spec.low, spec.high

    def observe(self, time_us: int, value: float) -> Status:
        self.value = value
        inside = self.low <= value <= self.high
        return self._step(time_us, not inside, inside)


class _Extremes:
    """Sliding-window min and max in O(1) amortised per in-order reading (monotonic deques)."""

    __slots__ = ("_max", "_min")

    def __init__(self) -> None:
        self._min: deque[tuple[int, float]] = deque()
        self._max: deque[tuple[int, float]] = deque()

    def push(self, time_us: int, value: float) -> None:
        while self._min and self._min[-1][1] >= value:
            self._min.pop()
        self._min.append((time_us, value))
        while self._max and self._max[-1][1] <= value:
            self._max.pop()
        self._max.append((time_us, value))

    def evict_before(self, start_us: int) -> None:
        while self._min and self._min[0][0] < start_us:
            self._min.popleft()
        while self._max and self._max[0][0] < start_us:
            self._max.popleft()

    def rebuild(self, points: deque[tuple[int, float]]) -> None:
        self._min.clear()
        self._max.clear()
        for time_us, value in points:
            self.push(time_us, value)

    @property
    def min(self) -> float:
        return self._min[0][1]

    @property
    def max(self) -> float:
        return self._max[0][1]


class _Sliding:
    """The readings of the last ``window_us``, in time order, with sum and extremes."""

    __slots__ = ("extremes", "latest_us", "points", "sum", "window_us")

    def __init__(self, window_s: float) -> None:
        self.window_us = int(window_s * US)
        self.points: deque[tuple[int, float]] = deque()
        self.extremes = _Extremes()
        self.sum = 0.0
        self.latest_us = -(1 << 62)

    def add(self, time_us: int, value: float) -> bool:
        """Add a reading; False when it is already outside the window (too old to matter)."""
        if time_us < self.latest_us - self.window_us:
            return False
        if time_us >= self.latest_us:
            self.points.append((time_us, value))
            self.extremes.push(time_us, value)
            self.latest_us = time_us
        else:  # out of order, inside the window: insert in place, rebuild the extremes
            index = next(i for i, (t, _) in enumerate(self.points) if t > time_us)
            self.points.insert(index, (time_us, value))
            self.extremes.rebuild(self.points)
        self.sum += value
        start = self.latest_us - self.window_us
        while self.points and self.points[0][0] <= start:
            self.sum -= self.points.popleft()[1]
        self.extremes.evict_before(start + 1)
        return True


class WindowState(_Hysteresis):
    __slots__ = ("agg", "clear", "level", "op", "window")

    def __init__(self, spec: Window) -> None:
        super().__init__(0)
        self.window = _Sliding(spec.window_s)
        self.agg, self.op, self.level = spec.agg, spec.op, spec.value
        self.clear = spec.value if spec.clear is None else spec.clear

    def observe(self, time_us: int, value: float) -> Status:
        self.window.add(time_us, value)
        w = self.window
        if self.agg == "avg":
            current = w.sum / len(w.points)
        elif self.agg == "sum":
            current = w.sum
        elif self.agg == "min":
            current = w.extremes.min
        else:
            current = w.extremes.max
        self.value = current
        return self._step(
            w.latest_us, self.op.holds(current, self.level), _cleared(self.op, current, self.clear)
        )


class RateOfChangeState(_Hysteresis):
    __slots__ = ("delta", "fall", "window")

    def __init__(self, spec: RateOfChange) -> None:
        super().__init__(0)
        self.window = _Sliding(spec.window_s)
        self.delta, self.fall = spec.delta, spec.direction == "fall"

    def observe(self, time_us: int, value: float) -> Status:
        self.window.add(time_us, value)
        latest = self.window.points[-1][1]
        ext = self.window.extremes
        change = ext.max - latest if self.fall else latest - ext.min
        self.value = change
        breached = change >= self.delta
        return self._step(self.window.latest_us, breached, not breached)


class FlatlineState:
    __slots__ = ("epsilon", "firing", "for_us", "high", "low", "since", "value")

    def __init__(self, spec: Flatline) -> None:
        self.for_us, self.epsilon = int(spec.for_s * US), spec.epsilon
        self.since: int | None = None
        self.low = self.high = 0.0
        self.firing = False
        self.value: float | None = None

    def observe(self, time_us: int, value: float) -> Status:
        self.value = value
        if self.since is None or max(self.high, value) - min(self.low, value) > self.epsilon:
            self.since, self.low, self.high = time_us, value, value  # it moved: a new flat run starts
            self.firing = False
            return Status.INACTIVE
        self.low, self.high = min(self.low, value), max(self.high, value)
        return self.tick(time_us)

    def tick(self, now_us: int) -> Status:
        if self.since is not None and now_us - self.since >= self.for_us:
            self.firing = True
        return Status.FIRING if self.firing else Status.INACTIVE


class NoDataState:
    __slots__ = ("after_us", "last_us", "value")

    def __init__(self, spec: NoData, started_us: int) -> None:
        self.after_us = int(spec.after_s * US)
        self.last_us = started_us  # a series that never reports is stale `after_s` after we started
        self.value: float | None = None

    def observe(self, time_us: int, value: float) -> Status:
        self.last_us = max(self.last_us, time_us)
        self.value = value
        return Status.INACTIVE

    def tick(self, now_us: int) -> Status:
        return Status.FIRING if now_us - self.last_us >= self.after_us else Status.INACTIVE


def new_state(spec: Leaf, now_us: int) -> ConditionState:
    if isinstance(spec, Threshold):
        return ThresholdState(spec)
    if isinstance(spec, Range):
        return RangeState(spec)
    if isinstance(spec, Window):
        return WindowState(spec)
    if isinstance(spec, RateOfChange):
        return RateOfChangeState(spec)
    if isinstance(spec, Flatline):
        return FlatlineState(spec)
    return NoDataState(spec, now_us)
