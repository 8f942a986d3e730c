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


# A sliding window keeps at most this many buckets, whatever the reading rate: a 24 h window at
# one reading a second would otherwise hold 86,400 points per series. Readings in one bucket
# (1/240 of the window: 6 min of a 24 h window, 45 s of a 3 h one) enter and leave together.
WINDOW_BUCKETS = 240


class _Bucket:
    __slots__ = ("count", "high", "last_us", "low", "start_us", "sum")

    def __init__(self, start_us: int, time_us: int, value: float) -> None:
        self.start_us, self.last_us = start_us, time_us
        self.sum, self.count, self.low, self.high = value, 1, value, value

    def add(self, time_us: int, value: float) -> None:
        self.sum += value
        self.count += 1
        self.low = min(self.low, value)
        self.high = max(self.high, value)
        self.last_us = max(self.last_us, time_us)


class _Sliding:
    """The readings of the last ``window_us`` as time buckets: sum, count, min, max, the latest.

    A bucket leaves the window when its newest reading does, so with one reading per bucket (the
    usual sampling rates) the window is exact. Min and max come from monotonic deques of buckets,
    O(1) amortised for in-order readings; a late reading rebuilds them (O(buckets)).
    """

    __slots__ = (
        "buckets",
        "count",
        "latest_us",
        "latest_value",
        "maxq",
        "minq",
        "sum",
        "width_us",
        "window_us",
    )

    def __init__(self, window_s: float) -> None:
        self.window_us = int(window_s * US)
        self.width_us = max(1, self.window_us // WINDOW_BUCKETS)
        self.buckets: deque[_Bucket] = deque()
        self.minq: deque[_Bucket] = deque()
        self.maxq: deque[_Bucket] = deque()
        self.sum = 0.0
        self.count = 0
        self.latest_us = -(1 << 62)
        self.latest_value = 0.0

    def add(self, time_us: int, value: float) -> bool:
        """Add a reading; False when it is already outside the window (too old to matter)."""
        if time_us <= self.latest_us - self.window_us:
            return False
        start = time_us - time_us % self.width_us
        buckets = self.buckets
        last = buckets[-1] if buckets else None
        if last is not None and last.start_us == start:
            # The hot path (several readings per bucket): only what changed is touched.
            last.sum += value
            last.count += 1
            if time_us > last.last_us:
                last.last_us = time_us
            if value < last.low:
                last.low = value
                self._push_min(last)
            if value > last.high:
                last.high = value
                self._push_max(last)
        elif last is None or start > last.start_us:
            bucket = _Bucket(start, time_us, value)
            buckets.append(bucket)
            self._push_min(bucket)
            self._push_max(bucket)
        else:
            self._insert_late(start, time_us, value)
        self.sum += value
        self.count += 1
        if time_us >= self.latest_us:
            self.latest_us, self.latest_value = time_us, value
            if buckets[0].last_us <= time_us - self.window_us:
                self._evict()
        return True

    def _push_min(self, bucket: _Bucket) -> None:
        minq = self.minq
        while minq and (minq[-1] is bucket or minq[-1].low >= bucket.low):
            minq.pop()
        minq.append(bucket)

    def _push_max(self, bucket: _Bucket) -> None:
        maxq = self.maxq
        while maxq and (maxq[-1] is bucket or maxq[-1].high <= bucket.high):
            maxq.pop()
        maxq.append(bucket)

    def _insert_late(self, start: int, time_us: int, value: float) -> None:
        index = len(self.buckets)
        while index > 0 and self.buckets[index - 1].start_us > start:
            index -= 1
        if index > 0 and self.buckets[index - 1].start_us == start:
            self.buckets[index - 1].add(time_us, value)
        else:
            self.buckets.insert(index, _Bucket(start, time_us, value))
        self.minq.clear()
        self.maxq.clear()
        for bucket in self.buckets:
            self._push_min(bucket)
            self._push_max(bucket)

    def _evict(self) -> None:
        edge = self.latest_us - self.window_us
        buckets = self.buckets
        while buckets and buckets[0].last_us <= edge:
            gone = buckets.popleft()
            self.sum -= gone.sum
            self.count -= gone.count
            if self.minq and self.minq[0] is gone:
                self.minq.popleft()
            if self.maxq and self.maxq[0] is gone:
                self.maxq.popleft()

    @property
    def min(self) -> float:
        return self.minq[0].low

    @property
    def max(self) -> float:
        return self.maxq[0].high


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
            current = w.sum / w.count
        elif self.agg == "sum":
            current = w.sum
        elif self.agg == "min":
            current = w.min
        else:
            current = w.max
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
        w = self.window
        w.add(time_us, value)
        change = w.max - w.latest_value if self.fall else w.latest_value - w.min
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
    """Silence, two ways. ``tick``: nothing has *arrived* for ``after_s`` by the clock (offline now).
    ``observe``: a reading stamped ``after_s`` or more after the previous one ends a silence that
    happened in the readings' own time, whether or not the clock saw it (data sent late, as
    backfill); ``gap_from`` says since when. Live, the two agree.
    """

    __slots__ = ("after_us", "arrived_us", "gap_from", "last_us", "value")

    def __init__(self, spec: NoData, started_us: int) -> None:
        self.after_us = int(spec.after_s * US)
        self.arrived_us = started_us  # a series that never reports is silent `after_s` after we started
        self.last_us: int | None = None  # the latest reading's own time
        self.gap_from: int | None = None
        self.value: float | None = None

    def arrived(self, now_us: int) -> None:
        """A reading arrived now (or, after a restart, the device was last heard from then)."""
        self.arrived_us = max(self.arrived_us, now_us)

    def observe(self, time_us: int, value: float) -> Status:
        last = self.last_us
        self.gap_from = last if last is not None and time_us - last >= self.after_us else None
        if last is None or time_us > last:
            self.last_us = time_us
        self.value = value
        return Status.INACTIVE

    def tick(self, now_us: int) -> Status:
        return Status.FIRING if now_us - self.arrived_us >= self.after_us else Status.INACTIVE


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
