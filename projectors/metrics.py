"""Prometheus metrics of the projectors."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter(
    "backbone_projector_events_total",
    "Log items handled by the projector, by outcome (applied, skipped, dead_lettered) and type.",
    ["outcome", "type"],
)
BATCH_SECONDS = Histogram(
    "backbone_projector_batch_seconds",
    "Time to apply one batch: PostgreSQL transaction, caches and offsets.",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BATCH_EVENTS = Histogram(
    "backbone_projector_batch_events",
    "Items per applied batch.",
    buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000),
)
POSITIONS_MOVED = Counter(
    "backbone_projector_positions_moved_total",
    "Batches rolled back because the stored offsets moved (another member applied them).",
)
ASSUMED_KEYS_TAKEN = Counter(
    "backbone_projector_assumed_keys_taken_total",
    "Batches applied again with every key read, because a row assumed new was stored already.",
)
LAST_APPLIED = Gauge(
    "backbone_projector_last_applied_offset",
    "Offset of the last record applied, per partition.",
    ["topic", "partition"],
)
LAG = Gauge(
    "backbone_projector_lag",
    "Records in the log not yet applied (log end - next offset to apply), per partition.",
    ["topic", "partition"],
)
FENCED_CACHE_WRITES = Counter(
    "backbone_projector_cache_writes_fenced_total",
    "Batch cache writes refused (for some partitions) because a later batch's write was there "
    "already: a worker resumed after its transaction had ended (projectors.caches).",
)
