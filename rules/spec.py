"""Rule specs: which series a rule watches, the condition, and what the alert says.

Specs are pydantic models (they come from operators, YAML files and the API, where precise errors
matter); evaluation never touches pydantic (see :mod:`rules.conditions`).
"""

from __future__ import annotations

from datetime import time
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from cityops.catalogue import Catalogue
from cityops.errors import CityopsError
from cityops.model import Domain, Severity


class RuleSpecError(CityopsError):
    """A rule spec is invalid; the message says where and why."""


class Op(StrEnum):
    GT = ">"
    GE = ">="
    LT = "<"
    LE = "<="

    @property
    def upward(self) -> bool:
        return self in (Op.GT, Op.GE)

    def holds(self, value: float, level: float) -> bool:
        if self is Op.GT:
            return value > level
        if self is Op.GE:
            return value >= level
        if self is Op.LT:
            return value < level
        return value <= level


def _check_clear(op: Op, value: float, clear: float | None) -> None:
    """Hysteresis only makes sense with the clear level on the safe side of the firing level."""
    if clear is None or (clear <= value if op.upward else clear >= value):
        return
    side = "at or below" if op.upward else "at or above"
    raise ValueError(f"clear ({clear}) must be {side} value ({value}) for op {op.value!r}")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Seconds = Annotated[float, Field(ge=0, le=31 * 86400)]
PositiveSeconds = Annotated[float, Field(gt=0, le=31 * 86400)]


class Threshold(_Spec):
    """``value op level`` for ``for_s`` seconds fires; it clears once past ``clear`` (hysteresis)."""

    type: Literal["threshold"] = "threshold"
    metric: str
    op: Op
    value: float
    clear: float | None = Field(default=None, description="clear level; default: the firing level")
    for_s: Seconds = 0

    @model_validator(mode="after")
    def _clear_on_the_safe_side(self) -> Threshold:
        _check_clear(self.op, self.value, self.clear)
        return self


class Range(_Spec):
    """Outside ``[low, high]`` for ``for_s`` seconds fires; back inside clears."""

    type: Literal["range"] = "range"
    metric: str
    low: float
    high: float
    for_s: Seconds = 0

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class RateOfChange(_Spec):
    """A rise (or fall) of at least ``delta`` within ``window_s`` fires; e.g. the pressure drop of a burst."""

    type: Literal["rate_of_change"] = "rate_of_change"
    metric: str
    direction: Literal["rise", "fall"]
    delta: float = Field(gt=0)
    window_s: PositiveSeconds


class Window(_Spec):
    """An aggregate over a sliding window (24 h PM2.5 average, 3 h rainfall sum) against a level."""

    type: Literal["window"] = "window"
    metric: str
    agg: Literal["avg", "min", "max", "sum"]
    window_s: PositiveSeconds
    op: Op
    value: float
    clear: float | None = None

    @model_validator(mode="after")
    def _clear_on_the_safe_side(self) -> Window:
        _check_clear(self.op, self.value, self.clear)
        return self


class NoData(_Spec):
    """No reading (of ``metric``, or of any metric) for ``after_s`` seconds: offline or stale."""

    type: Literal["no_data"] = "no_data"
    metric: str | None = None
    after_s: PositiveSeconds


class Flatline(_Spec):
    """Readings that stay within ``epsilon`` of each other for ``for_s`` seconds: a stuck sensor."""

    type: Literal["flatline"] = "flatline"
    metric: str
    epsilon: float = Field(ge=0)
    for_s: PositiveSeconds


Leaf = Annotated[Threshold | Range | RateOfChange | Window | NoData | Flatline, Field(discriminator="type")]


class Composite(_Spec):
    """All (or any) of several conditions, over the metrics of one device or one district."""

    type: Literal["all", "any"]
    scope: Literal["device", "district"] = "device"
    conditions: list[Leaf] = Field(min_length=2, max_length=8)


Condition = Annotated[
    Threshold | Range | RateOfChange | Window | NoData | Flatline | Composite, Field(discriminator="type")
]


class Selector(_Spec):
    """Which series a rule watches; every given field must match (an empty selector matches all)."""

    tenant: str | None = None
    domain: Domain | None = None
    kinds: list[str] = Field(default_factory=list)
    devices: list[str] = Field(default_factory=list)
    districts: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)


class Schedule(_Spec):
    """The local hours a rule applies (GB 3096 day 06–22, night 22–06); ``start`` > ``end`` wraps midnight.

    Outside its hours a rule is inactive: an alert it raised clears when the hours end, and the
    rule for the other hours (with its own limit) takes over.
    """

    start: time
    end: time
    timezone: str = "Asia/Shanghai"

    @model_validator(mode="after")
    def _valid(self) -> Schedule:
        if self.start == self.end:
            raise ValueError("start and end must differ")
        if self.start.second or self.end.second or self.start.microsecond or self.end.microsecond:
            raise ValueError("start and end are whole minutes (HH:MM)")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.timezone!r}") from None
        return self


class RuleSpec(_Spec):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,99}$")
    description: str = ""
    severity: Severity
    selector: Selector = Field(default_factory=Selector)
    condition: Condition
    labels: dict[str, str] = Field(default_factory=dict)
    message: str = Field(default="{rule} on {device}: {metric} = {value}", max_length=500)
    source: str = Field(min_length=1, description="the standard or document the rule comes from")
    schedule: Schedule | None = None
    enabled: bool = True
    flap_window_s: Seconds = 900
    allowed_lateness_s: Seconds = 300

    def metrics(self) -> set[str]:
        leaves = self.condition.conditions if isinstance(self.condition, Composite) else [self.condition]
        return {leaf.metric for leaf in leaves if leaf.metric is not None}


_RULES = TypeAdapter(list[RuleSpec])


def check_against(spec: RuleSpec, catalogue: Catalogue) -> list[str]:
    """Problems a spec has that only the catalogue can tell: unknown metrics and device kinds."""
    unknown_metrics = sorted(spec.metrics() - catalogue.metrics.keys())
    unknown_kinds = [k for k in spec.selector.kinds if k not in catalogue.kinds]
    return [f"condition: unknown metric {m!r}" for m in unknown_metrics] + [
        f"selector.kinds: unknown device kind {k!r}" for k in unknown_kinds
    ]


def parse_rules(doc: Any, catalogue: Catalogue, *, origin: str = "rules") -> list[RuleSpec]:
    """A list of specs (or ``{"rules": [...]}``), each checked; one error lists every problem."""
    items = doc.get("rules") if isinstance(doc, dict) else doc
    try:
        specs = _RULES.validate_python(items)
    except ValidationError as exc:
        raise RuleSpecError(f"{origin}: " + _describe(exc)) from None
    problems = [f"{origin}: rule {s.name!r}: {p}" for s in specs for p in check_against(s, catalogue)]
    names = [s.name for s in specs]
    problems += [
        f"{origin}: rule name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})
    ]
    if problems:
        raise RuleSpecError("\n".join(problems))
    return specs


def load_rules(path: Path, catalogue: Catalogue) -> list[RuleSpec]:
    """Rules from a YAML or JSON file."""
    text = path.read_text(encoding="utf-8")
    try:
        doc = orjson.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise RuleSpecError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from None
    return parse_rules(doc, catalogue, origin=str(path))


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'rules'}: {e['msg']}" for e in exc.errors())


def default_packs(catalogue: Catalogue) -> dict[str, list[RuleSpec]]:
    """The rule packs shipped in ``rules/packs/`` (one per standard), by pack name."""
    folder = resources.files("rules").joinpath("packs")
    packs = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            doc = yaml.safe_load(entry.read_text(encoding="utf-8"))
            packs[entry.name.removesuffix(".yaml")] = parse_rules(
                doc, catalogue, origin=f"packs/{entry.name}"
            )
    return packs
