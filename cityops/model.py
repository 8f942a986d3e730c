"""Domain model: readings, devices, alerts and the enums they share.

Readings travel as plain tuples on the hot path (see :data:`Row`); the pydantic models here are for
the API, the registry and the alert store, where validation matters more than nanoseconds.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import IntFlag, StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
DeviceExternalId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]


class Domain(StrEnum):
    WATER_SUPPLY = "water_supply"
    DRAINAGE = "drainage"
    GAS = "gas"
    AIR = "air"
    NOISE = "noise"
    SURFACE_WATER = "surface_water"
    TRAFFIC = "traffic"
    DEVICE = "device"


class Severity(StrEnum):
    """FIWARE ``Alert.severity``; the order is the escalation order."""

    INFORMATIONAL = "informational"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {severity: rank for rank, severity in enumerate(Severity)}


class AlertState(StrEnum):
    PENDING = "pending"
    FIRING = "firing"
    ACKNOWLEDGED = "acknowledged"
    SHELVED = "shelved"
    RESOLVED = "resolved"

    @property
    def is_open(self) -> bool:
        return self is not AlertState.RESOLVED


class Quality(IntFlag):
    """Bits of ``readings.quality``; 0 means a clean reading."""

    GOOD = 0
    OUT_OF_RANGE = 1  # outside the metric's physical range: stored, flagged
    RECEIVE_TIME = 2  # no device timestamp: the gateway's receive time was used


class RejectReason(StrEnum):
    """Stable reason codes of ``dead_letters.reason``; integrators match on these strings."""

    MALFORMED_PAYLOAD = "malformed_payload"
    EMPTY_PAYLOAD = "empty_payload"
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    INVALID_TOPIC = "invalid_topic"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_DISABLED = "device_disabled"
    UNKNOWN_METRIC = "unknown_metric"
    INVALID_VALUE = "invalid_value"
    NON_FINITE_VALUE = "non_finite_value"
    INVALID_TIMESTAMP = "invalid_timestamp"
    CLOCK_SKEW = "clock_skew"
    DATA_ERROR = "data_error"


Row = tuple[int, int, float, int]
"""One decoded reading: ``(time_us, metric_id, value, quality)``.

``time_us`` is epoch microseconds (UTC). A plain tuple, not a NamedTuple: building one costs a tenth
as much, and the decoder builds one per reading.
"""


class Reading(BaseModel):
    """A stored reading as the API shows it."""

    model_config = ConfigDict(frozen=True)

    time: datetime
    device: DeviceExternalId
    metric: str
    value: float
    quality: int = 0


class DeviceSpec(BaseModel):
    """What an integrator declares about a device (CSV/JSON-lines import, API create)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    external_id: DeviceExternalId
    tenant: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$")
    kind: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=200)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    district: str | None = Field(default=None, max_length=100)
    tags: dict[str, str] = Field(default_factory=dict)
    parent: DeviceExternalId | None = None
    enabled: bool = True


class Device(DeviceSpec):
    """A registered device."""

    id: int
    last_seen: datetime | None = None
    created_at: datetime
    updated_at: datetime


class Alert(BaseModel):
    """An alert; one open alert per fingerprint."""

    id: int
    fingerprint: str
    rule_id: int | None
    state: AlertState
    severity: Severity
    tenant: str
    labels: dict[str, str]
    summary: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    count: int = 1
    flap_count: int = 0
    last_value: float | None = None
    started_at: datetime
    last_seen_at: datetime
    resolved_at: datetime | None = None
    shelved_until: datetime | None = None
