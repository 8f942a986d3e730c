"""Prometheus metrics of the gateway, registered in a registry the caller owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From a healthy ~0.3 s (batch interval plus commit) to minutes while the database is down.
ACK_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "cityops_messages_received", "MQTT messages received", ["kind"], registry=registry
        )
        self.readings_accepted = Counter(
            "cityops_readings_accepted", "Readings decoded and valid, before commit", registry=registry
        )
        self.rejects = Counter(
            "cityops_rejects", "Readings or messages rejected, by reason", ["reason"], registry=registry
        )
        self.dead_letters = Counter(
            "cityops_dead_letters", "Dead letters written, by reason", ["reason"], registry=registry
        )
        self.inflight = Gauge(
            "cityops_inflight_messages", "Messages received and not yet acknowledged", registry=registry
        )
        self.ack_lag = Histogram(
            "cityops_ack_lag_seconds",
            "Receive-to-PUBACK time of the oldest message of each batch",
            buckets=ACK_LAG_BUCKETS,
            registry=registry,
        )
        self.batches_waiting = Gauge(
            "cityops_batches_waiting", "Batches built and waiting for the writer", registry=registry
        )
        self.qos0_dropped = Counter(
            "cityops_qos0_dropped",
            "QoS 0 messages dropped because the in-flight bound was reached",
            registry=registry,
        )
        self.stale_acks = Counter(
            "cityops_stale_acks",
            "Messages committed after their connection dropped (redelivered)",
            registry=registry,
        )
        self.connects = Counter(
            "cityops_mqtt_connects", "Successful (re)connections to the broker", registry=registry
        )
        self.devices_known = Gauge(
            "cityops_registry_devices", "Devices in the in-memory registry", registry=registry
        )
