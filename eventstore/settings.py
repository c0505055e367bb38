"""Settings read from the environment once, at start-up, with the ``BACKBONE_`` prefix.

A missing or malformed value stops start-up with a :class:`~eventstore.errors.ConfigError`
naming the variable, never a traceback from deep inside a client library.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping

import msgspec

from eventstore.errors import ConfigError

PREFIX = "BACKBONE_"


class MasterKey(msgspec.Struct, frozen=True):
    """A key-encryption key: wraps every subject's data key."""

    key_id: str
    key: bytes


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """What every tier needs to reach the log, the key store and the caches."""

    kafka_bootstrap: str
    postgres_dsn: str
    redis_url: str
    master_keys: tuple[MasterKey, ...]
    topic_prefix: str = "chat"
    kafka_replication_factor: int = 1
    kafka_min_insync: int = 1
    user_partitions: int = 4
    conversation_partitions: int = 8
    send_timeout: float = 10.0
    source: str = "urn:backbone"
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_region: str = "us-east-1"

    @property
    def master_key(self) -> MasterKey:
        """The key that wraps new data keys (the first one listed)."""
        return self.master_keys[0]


def parse_master_keys(raw: str, variable: str) -> tuple[MasterKey, ...]:
    """Parse ``id:base64key[,id:base64key...]``; the first is current, the rest unwrap only.

    A bare base64 key (no ``id:``) gets the id ``k1``. Each key must be 32 bytes (AES-256).
    """
    keys: list[MasterKey] = []
    for index, item in enumerate(part.strip() for part in raw.split(",") if part.strip()):
        key_id, sep, encoded = item.partition(":")
        if not sep:
            key_id, encoded = f"k{index + 1}", item
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{variable}: key {key_id!r} is not valid base64") from None
        if len(key) != 32:
            raise ConfigError(
                f"{variable}: key {key_id!r} is {len(key)} bytes; AES-256 needs 32 "
                "(generate one with: python -c 'import os,base64;"
                "print(base64.b64encode(os.urandom(32)).decode())')"
            )
        keys.append(MasterKey(key_id=key_id, key=key))
    if not keys:
        raise ConfigError(f"{variable} is empty")
    if len({k.key_id for k in keys}) != len(keys):
        raise ConfigError(f"{variable}: key ids must be unique")
    return tuple(keys)


def env_required(env: Mapping[str, str], name: str) -> str:
    variable = PREFIX + name
    value = env.get(variable, "").strip()
    if not value:
        raise ConfigError(f"{variable} is not set")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    variable = PREFIX + name
    raw = env.get(variable)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{variable}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{variable}={value} is below the minimum {minimum}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    variable = PREFIX + name
    raw = env.get(variable)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{variable}={raw!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{variable}={value} must be positive")
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read :class:`Settings` from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    bootstrap = env_required(env, "KAFKA_BOOTSTRAP")
    for address in bootstrap.split(","):
        host, sep, port = address.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"{PREFIX}KAFKA_BOOTSTRAP: {address!r} is not host:port")
    dsn = env_required(env, "POSTGRES_DSN")
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{PREFIX}POSTGRES_DSN must be a postgresql:// URL")
    redis_url = env_required(env, "REDIS_URL")
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{PREFIX}REDIS_URL must be a redis:// URL")
    master_keys = parse_master_keys(env_required(env, "MASTER_KEY"), PREFIX + "MASTER_KEY")
    rf = env_int(env, "KAFKA_REPLICATION_FACTOR", 1)
    min_isr = env_int(env, "KAFKA_MIN_INSYNC", 1)
    if min_isr > rf:
        raise ConfigError(
            f"{PREFIX}KAFKA_MIN_INSYNC={min_isr} exceeds {PREFIX}KAFKA_REPLICATION_FACTOR={rf}"
        )
    prefix = env.get(PREFIX + "TOPIC_PREFIX", "chat").strip() or "chat"
    return Settings(
        kafka_bootstrap=bootstrap,
        postgres_dsn=dsn,
        redis_url=redis_url,
        master_keys=master_keys,
        topic_prefix=prefix,
        kafka_replication_factor=rf,
        kafka_min_insync=min_isr,
        user_partitions=env_int(env, "USER_PARTITIONS", 4),
        conversation_partitions=env_int(env, "CONVERSATION_PARTITIONS", 8),
        send_timeout=env_float(env, "SEND_TIMEOUT", 10.0),
        source=env.get(PREFIX + "SOURCE", "urn:backbone") or "urn:backbone",
        s3_endpoint=env.get(PREFIX + "S3_ENDPOINT", ""),
        s3_access_key=env.get(PREFIX + "S3_ACCESS_KEY", ""),
        s3_secret_key=env.get(PREFIX + "S3_SECRET_KEY", ""),
        s3_region=env.get(PREFIX + "S3_REGION", "us-east-1") or "us-east-1",
    )
