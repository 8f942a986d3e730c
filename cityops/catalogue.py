"""The metric catalogue and device kinds, shipped as ``cityops/data/catalogue.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from cityops.errors import ConfigError
from cityops.model import Domain


@dataclass(frozen=True, slots=True)
class Metric:
    id: int
    name: str
    domain: Domain
    unit: str
    unit_code: str
    unit_text: str | None
    min: float
    max: float
    fiware_attribute: str | None
    sample_interval_s: int
    description: str
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeviceKind:
    name: str
    domain: Domain
    description: str
    metrics: tuple[str, ...]


class Catalogue:
    """Metrics by name and id, and device kinds; immutable once built."""

    def __init__(self, metrics: list[Metric], kinds: list[DeviceKind], common_metrics: tuple[str, ...]):
        self.metrics: dict[str, Metric] = {}
        self.by_id: dict[int, Metric] = {}
        for metric in metrics:
            if metric.name in self.metrics or metric.id in self.by_id:
                raise ConfigError(f"catalogue: duplicate metric {metric.name!r} or id {metric.id}")
            if not metric.min < metric.max:
                raise ConfigError(f"catalogue: metric {metric.name!r} has min >= max")
            self.metrics[metric.name] = metric
            self.by_id[metric.id] = metric
        self.kinds: dict[str, DeviceKind] = {kind.name: kind for kind in kinds}
        self.common_metrics = common_metrics
        for kind in kinds:
            unknown = set(kind.metrics) - self.metrics.keys()
            if unknown:
                raise ConfigError(f"catalogue: kind {kind.name!r} names unknown metrics {sorted(unknown)}")

    def metrics_of_kind(self, kind: str) -> tuple[str, ...]:
        return self.kinds[kind].metrics + self.common_metrics

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Catalogue:
        metrics = [
            Metric(
                id=int(m["id"]),
                name=m["name"],
                domain=Domain(m["domain"]),
                unit=m["unit"],
                unit_code=m["unit_code"],
                unit_text=m.get("unit_text"),
                min=float(m["min"]),
                max=float(m["max"]),
                fiware_attribute=m.get("fiware_attribute"),
                sample_interval_s=int(m["sample_interval_s"]),
                description=m["description"],
                sources=tuple(m.get("sources", ())),
            )
            for m in doc["metrics"]
        ]
        kinds = [
            DeviceKind(
                name=k["name"],
                domain=Domain(k["domain"]),
                description=k["description"],
                metrics=tuple(k["metrics"]),
            )
            for k in doc["device_kinds"]
        ]
        return cls(metrics, kinds, tuple(doc.get("common_metrics", ())))


def load_default_catalogue() -> Catalogue:
    """Parse the catalogue shipped in the package; processes load it once at start-up."""
    text = resources.files("cityops").joinpath("data/catalogue.json").read_text(encoding="utf-8")
    return Catalogue.from_document(json.loads(text))
