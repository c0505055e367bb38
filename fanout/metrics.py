"""Prometheus metrics of the fanout tier (served on ``/metrics`` of the fanout port).

Gauges that are sums over sockets (connections, queued bytes) are computed when scraped,
not maintained on the delivery path.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("fanout_connections", "Open sockets, by state", ["state"])
QUEUE_BYTES = Gauge("fanout_queue_bytes", "Bytes waiting to be sent, summed over sockets")
DELIVERIES = Counter("fanout_deliveries_total", "Event frames written to sockets")
EVENTS = Counter(
    "fanout_events_total", "Events read from the log, by whether anyone here got them", ["audience"]
)
SLOW_DISCONNECTS = Counter("fanout_slow_disconnects_total", "Sockets closed with 4008")
CLOSES = Counter("fanout_closes_total", "Sockets closed by the server, by close code", ["code"])
FRAMES_REFUSED = Counter(
    "fanout_frames_refused_total", "Requests and client frames refused", ["reason"]
)
RESUMES = Counter(
    "fanout_resumes_total",
    "Conversations resumed, by where the missed events came from",
    ["source"],
)
DELIVERY_LATENCY = Histogram(
    "fanout_delivery_latency_seconds",
    "Event time (CloudEvents time) to the write on the sockets",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
TOKEN_EXPIRIES = Counter(
    "fanout_token_expiries_total", "Sockets closed with 4001 because their access token expired"
)
REAUTHS = Counter(
    "fanout_reauths_total",
    "In-band re-authentications (a later auth frame), by outcome",
    ["outcome"],
)
