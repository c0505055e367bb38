"""Prometheus counters of security events (served by every tier's ``/metrics``).

Labels are small fixed vocabularies (reasons, kinds), never user ids, logins or addresses:
those belong in the structured logs, where they are not a cardinality bomb.
"""

from __future__ import annotations

from prometheus_client import Counter

AUTH_FAILURES = Counter(
    "backbone_auth_failures_total",
    "Refused authentications by kind (login, reauthentication, access_token, refresh_token,"
    " api_key) and reason.",
    ["kind", "reason"],
)
LOGINS = Counter(
    "backbone_logins_total",
    "Successful password logins.",
)
SESSIONS_REVOKED = Counter(
    "backbone_sessions_revoked_total",
    "Sessions revoked, by reason (logout, refresh_reuse, password_change, erasure, admin).",
    ["reason"],
)
API_KEY_CACHE = Counter(
    "backbone_api_key_cache_total",
    "API-key verifications while the in-process cache is on, by outcome (hit, miss).",
    ["outcome"],
)
REFRESH_REPLAYS = Counter(
    "backbone_refresh_token_replays_total",
    "Spent refresh tokens presented again within the reuse interval, answered with their"
    " successor instead of revoking the session.",
)
