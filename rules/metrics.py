"""Prometheus metrics of the rule engine, registered in a registry the caller owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Evaluating a batch takes from microseconds (nothing watched) to tens of milliseconds (20k rows).
EVALUATE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class RuleMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rules_loaded = Gauge("cityops_rules_loaded", "Enabled rules being evaluated", registry=registry)
        self.rules_invalid = Gauge(
            "cityops_rules_invalid",
            "Rows of the rules table skipped because they do not validate",
            registry=registry,
        )
        self.reloads = Counter("cityops_rules_reloads", "Rule set reloads", registry=registry)
        self.readings = Counter(
            "cityops_rules_readings_evaluated", "Inserted readings evaluated", registry=registry
        )
        self.evaluate_seconds = Histogram(
            "cityops_rules_evaluate_seconds",
            "Time to evaluate one batch (without writing alerts)",
            buckets=EVALUATE_BUCKETS,
            registry=registry,
        )
        self.signals = Counter(
            "cityops_rules_signals", "Rule status signals sent to the store", registry=registry
        )
        self.transitions = Counter(
            "cityops_alert_transitions", "Alert transitions written, by kind", ["kind"], registry=registry
        )
        self.retries = Counter(
            "cityops_rules_store_retries", "Alert writes retried after a transient error", registry=registry
        )
        self.store_errors = Counter(
            "cityops_rules_store_errors",
            "Alert writes that failed permanently (signals dropped)",
            registry=registry,
        )
        self.replayed = Counter(
            "cityops_rules_replayed_readings",
            "Readings replayed to rebuild rule state on start",
            registry=registry,
        )
