"""The fanout tier's settings (``BACKBONE_FANOUT_*``), read once at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

from eventstore import ConfigError
from eventstore.settings import PREFIX, env_float, env_int
from ingest.auth.tokens import DEFAULT_LEEWAY


class FanoutConfig(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8090
    origins: tuple[str, ...] = ()
    """Allowed ``Origin`` values (``*`` allows any); requests without ``Origin`` pass."""
    auth_timeout: float = 5.0
    """Seconds a new socket has, from its accept, to complete the upgrade and send its
    ``auth`` frame; bytes sent meanwhile (pings, a trickled request head) do not extend it."""
    max_frame: int = 16 * 1024
    """Largest client message in bytes; a bigger one closes the socket with 1009."""
    max_fragments: int = 128
    """Most frames one client message may come in (RFC 6455 fragmentation; empty ones count);
    more closes the socket with 1008. Messages this small need few frames; 128 still lets a
    ``max_frame`` message come in fragments of 128 bytes."""
    queue_limit: int = 1024 * 1024
    """Bytes a socket may have waiting to be sent before it is closed with 4008."""
    send_buffer: int = 0
    """``SO_SNDBUF`` of accepted sockets (0: the kernel's autotuning)."""
    frame_rate: float = 20.0
    """Client frames per second allowed per socket (token bucket) ..."""
    frame_burst: int = 60
    """... with this burst; past it an error frame, and 4029 on repeat."""
    max_violations: int = 3
    """Malformed or over-limit frames tolerated before the socket is closed."""
    typing_interval: float = 1.0
    """At most one typing signal per conversation and socket in this many seconds."""
    presence_ttl: float = 60.0
    """Presence entries expire this long after the last heartbeat (sent every third of it)."""
    idle_timeout: float = 120.0
    """A socket that sent nothing (not even a ping) for this long is closed."""
    resume_wait: float = 2.0
    """How long a resume waits for the recent-history cache before reading the log."""
    resume_timeout: float = 20.0
    """Bound on reading a resume's missed events from the log (waiting for a reader included)."""
    replay_stall: float = 10.0
    """Seconds a resuming socket may leave its replay unread (send buffer past high water)
    before it is closed with 4008, like a socket whose queue passed ``queue_limit``."""
    membership_window: float = 120.0
    """Seconds of membership changes kept to reconcile a bootstrap with the live tail."""
    shutdown_grace: float = 5.0
    jwt_issuer: str = "urn:backbone:ingest"
    jwt_audience: str = "urn:backbone:api"
    token_leeway: int = DEFAULT_LEEWAY
    """Seconds of clock skew allowed when checking a token's times (as ingest allows): a
    socket is closed with 4001 once its token's ``exp`` plus this has passed."""


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(f"{PREFIX}FANOUT_ORIGINS: {origin!r} is not an http(s) origin")
    return origins


def load_fanout_config(env: Mapping[str, str] | None = None) -> FanoutConfig:
    env = os.environ if env is None else env
    return FanoutConfig(
        host=env.get(PREFIX + "FANOUT_HOST", "127.0.0.1") or "127.0.0.1",
        port=env_int(env, "FANOUT_PORT", 8090),
        origins=_origins(env.get(PREFIX + "FANOUT_ORIGINS", "")),
        auth_timeout=env_float(env, "FANOUT_AUTH_TIMEOUT", 5.0),
        max_frame=env_int(env, "FANOUT_MAX_FRAME", 16 * 1024, minimum=256),
        queue_limit=env_int(env, "FANOUT_QUEUE_LIMIT", 1024 * 1024, minimum=4096),
        send_buffer=env_int(env, "FANOUT_SEND_BUFFER", 0, minimum=0),
        frame_rate=env_float(env, "FANOUT_FRAME_RATE", 20.0),
        frame_burst=env_int(env, "FANOUT_FRAME_BURST", 60),
        presence_ttl=env_float(env, "FANOUT_PRESENCE_TTL", 60.0),
        idle_timeout=env_float(env, "FANOUT_IDLE_TIMEOUT", 120.0),
        shutdown_grace=env_float(env, "FANOUT_SHUTDOWN_GRACE", 5.0),
        jwt_issuer=env.get(PREFIX + "JWT_ISSUER", "") or "urn:backbone:ingest",
        jwt_audience=env.get(PREFIX + "JWT_AUDIENCE", "") or "urn:backbone:api",
        token_leeway=env_int(env, "FANOUT_TOKEN_LEEWAY", DEFAULT_LEEWAY, minimum=0),
    )
