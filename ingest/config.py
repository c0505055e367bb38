"""The ingest tier's own settings (``BACKBONE_INGEST_*`` and friends), read once at start-up."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping

import msgspec

from eventstore import ConfigError
from eventstore.settings import PREFIX, env_float, env_int
from ingest.ratelimit import DEFAULT_LIMITS, ClassLimits, LoginPolicy

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class IngestConfig(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body: int = 1024 * 1024
    """Largest request body in bytes (the batch path is the only one near it): 413 above."""
    projection_wait: float = 2.0
    """How long a command refused by a projected check waits for the read model to catch up."""
    read_wait_max: float = 5.0
    """Upper bound of a read's ``min_position`` wait."""
    trusted_proxies: tuple[Network, ...] = ()
    """Proxies whose ``X-Forwarded-For`` is believed, walking the chain from the right."""
    bcrypt_cost: int = 12
    shutdown_grace: float = 10.0
    jwt_issuer: str = "urn:backbone:ingest"
    jwt_audience: str = "urn:backbone:api"
    access_ttl: int = 900
    """Seconds an access token lives (short: revocation is also checked live)."""
    refresh_reuse_interval: float = 5.0
    """Seconds after a rotation during which the spent refresh token gets its successor back
    instead of revoking the session (0: never)."""
    api_key_cache_ttl: float = 30.0
    """Seconds a process trusts an API key it verified without asking PostgreSQL (0: no cache);
    revocations reach it at once over the revocation feed, this bounds a lost message."""
    rate_limits: dict[str, ClassLimits] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_LIMITS)
    )
    login_policy: LoginPolicy = msgspec.field(default_factory=LoginPolicy)


def _networks(raw: str, variable: str) -> tuple[Network, ...]:
    nets: list[Network] = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{variable}: {item!r} is not an address or CIDR") from None
    return tuple(nets)


def load_ingest_config(env: Mapping[str, str] | None = None) -> IngestConfig:
    env = os.environ if env is None else env
    cost = env_int(env, "BCRYPT_COST", 12)
    if not 12 <= cost <= 16:
        raise ConfigError(f"{PREFIX}BCRYPT_COST={cost} must be between 12 and 16")
    return IngestConfig(
        host=env.get(PREFIX + "INGEST_HOST", "127.0.0.1") or "127.0.0.1",
        port=env_int(env, "INGEST_PORT", 8080),
        max_body=env_int(env, "INGEST_MAX_BODY", 1024 * 1024, minimum=1024),
        projection_wait=env_float(env, "PROJECTION_WAIT", 2.0),
        read_wait_max=env_float(env, "READ_WAIT_MAX", 5.0),
        trusted_proxies=_networks(
            env.get(PREFIX + "TRUSTED_PROXIES", ""), PREFIX + "TRUSTED_PROXIES"
        ),
        bcrypt_cost=cost,
        shutdown_grace=env_float(env, "INGEST_SHUTDOWN_GRACE", 10.0),
        jwt_issuer=env.get(PREFIX + "JWT_ISSUER", "") or "urn:backbone:ingest",
        jwt_audience=env.get(PREFIX + "JWT_AUDIENCE", "") or "urn:backbone:api",
        access_ttl=env_int(env, "ACCESS_TTL", 900, minimum=30),
        refresh_reuse_interval=_seconds(env, "REFRESH_REUSE_INTERVAL", 5.0, maximum=60.0),
        api_key_cache_ttl=_seconds(env, "API_KEY_CACHE_TTL", 30.0, maximum=3600.0),
        rate_limits=_rate_limits(env.get(PREFIX + "RATE_LIMITS", "")),
    )


def _seconds(env: Mapping[str, str], name: str, default: float, *, maximum: float) -> float:
    """A duration in seconds where 0 means "off", bounded above."""
    variable = PREFIX + name
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{variable}={raw!r} is not a number") from None
    if not 0 <= value <= maximum:
        raise ConfigError(f"{variable}={value} must be between 0 and {maximum:g}")
    return value


def _rate_limits(raw: str) -> dict[str, ClassLimits]:
    """Defaults, with classes replaced by ``BACKBONE_RATE_LIMITS`` (JSON) where it names them.

    e.g. ``{"message": {"per_user": {"rate": 1000, "burst": 2000}}}``
    """
    limits = dict(DEFAULT_LIMITS)
    if not raw.strip():
        return limits
    try:
        given = msgspec.json.decode(raw, type=dict[str, ClassLimits])
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"{PREFIX}RATE_LIMITS: {exc}") from None
    unknown = set(given) - set(limits)
    if unknown:
        raise ConfigError(f"{PREFIX}RATE_LIMITS: unknown classes {sorted(unknown)}")
    limits.update(given)
    return limits
