"""Prometheus metrics of the event store (shared by every tier that writes or reads the log)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENTS_SKIPPED = Counter(
    "backbone_events_skipped_total",
    "Records read from the log and skipped, by reason (unknown_type, poison) and event type.",
    ["reason", "type"],
)
PRODUCE_LATENCY = Histogram(
    "backbone_produce_seconds",
    "Time from queueing a record batch's first record until Kafka acknowledged the batch "
    "(acks=all); one observation per batch.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
PRODUCE_ERRORS = Counter(
    "backbone_produce_errors_total",
    "Appends that failed, by error class.",
    ["error"],
)
PRODUCER_RECREATED = Counter(
    "backbone_producer_recreated_total",
    "Times the Kafka producer was rebuilt after it became unusable (e.g. OutOfOrderSequence).",
)
